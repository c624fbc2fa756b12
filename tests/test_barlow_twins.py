"""Barlow Twins: the loss against an entry-by-entry formula, its gradient, invariances, the method as released, the
released and solo-learn optimisers against their update rules, the recipes, two DDP ranks and an exact resume.

Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021;
facebookresearch/barlowtwins ``main.py``; vturrisi/solo-learn ``scripts/pretrain/cifar/barlow.yaml``,
``solo/utils/lars.py``. The expected values are written here from those sources, never read from the code under test.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_on_ranks
from torch import nn

from contrastlab.config.derived import derive
from contrastlab.config.load import load_config
from contrastlab.config.schema import OptimConfig
from contrastlab.engine.distributed import all_reduce_with_grad, wrap_ddp
from contrastlab.engine.optim import build_optimizer, set_learning_rate
from contrastlab.engine.schedules import run_learning_rate
from contrastlab.errors import ConfigError
from contrastlab.methods import BarlowTwins, build_method, make_param_groups
from contrastlab.models import build_backbone
from contrastlab.objectives import BarlowTwinsLoss, cross_correlation
from contrastlab.views.photometric import make_photometric

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only contends on shared cores

LAMBD = 0.0051


def loop_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, scale: float = 1.0, eps: float = 1e-5):
    """The paper's equations (1)-(2) entry by entry in Python floats: each column standardised with the batch mean
    and biased variance (+ eps), ``C_ij = sum_n a_ni b_nj / N``. Returns (loss, on term, off term, C)."""
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> list[list[float]]:
        columns = []
        for j in range(d):
            column = [float(z[i, j]) for i in range(n)]
            mean = sum(column) / n
            var = sum((v - mean) ** 2 for v in column) / n
            columns.append([(v - mean) / math.sqrt(var + eps) for v in column])
        return columns

    a, b = standardise(z1), standardise(z2)
    c = [[sum(a[i][k] * b[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return scale * (on + lambd * off), scale * on, scale * lambd * off, c


def _pair(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    return z1, 0.5 * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)  # correlated views


# --- the loss -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "lambd", "scale"), [(6, 4, LAMBD, 1.0), (5, 3, 0.0, 1.0), (2, 5, 2.0, 0.1),
                                                      (9, 2, LAMBD, 0.0625)])
def test_loss_equals_the_entry_by_entry_formula(n, d, lambd, scale):
    z1, z2 = _pair(n, d, seed=n * d)
    loss, info = BarlowTwinsLoss(lambd=lambd, scale=scale)(z1, z2)
    expected, on, off, c = loop_loss(z1, z2, lambd, scale)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert info["on_diagonal"].item() == pytest.approx(on, rel=1e-12)
    assert info["off_diagonal"].item() == pytest.approx(off, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(cross_correlation(z1, z2), torch.tensor(c, dtype=torch.float64))


def test_cross_correlation_is_the_releases_batchnorm_product():
    """main.py: ``c = bn(z1).T @ bn(z2) / batch`` with ``bn = BatchNorm1d(D, affine=False)`` in training mode."""
    z1, z2 = _pair(7, 5, seed=1)
    bn = nn.BatchNorm1d(5, affine=False).double().train()
    torch.testing.assert_close(cross_correlation(z1, z2), bn(z1).T @ bn(z2) / 7)


def test_a_constant_dimension_gives_a_finite_loss():
    """A collapsed dimension standardises to 0 (eps keeps the division finite): C_ii = 0, its term is 1."""
    z1, z2 = _pair(5, 3, seed=2)
    z1[:, 1] = 4.0
    loss, _ = BarlowTwinsLoss(lambd=LAMBD)(z1, z2)
    expected, _, _, c = loop_loss(z1, z2, LAMBD)
    assert torch.isfinite(loss) and c[1][1] == 0.0 and loss.item() == pytest.approx(expected, rel=1e-12)


def test_gradcheck():
    z1, z2 = _pair(4, 3, seed=3)
    loss_fn = BarlowTwinsLoss(lambd=0.3, scale=0.7)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b)[0], (z1.requires_grad_(), z2.requires_grad_()))


def test_permuting_the_batch_leaves_c_and_the_loss_unchanged():
    z1, z2 = _pair(8, 4, seed=4)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cross_correlation(z1[perm], z2[perm]), cross_correlation(z1, z2))
    loss_fn = BarlowTwinsLoss(lambd=LAMBD)
    assert loss_fn(z1[perm], z2[perm])[0].item() == pytest.approx(loss_fn(z1, z2)[0].item(), rel=1e-12)
    # the pairs matter: permuting one view only is another batch
    assert loss_fn(z1[perm], z2)[0].item() != pytest.approx(loss_fn(z1, z2)[0].item(), rel=1e-3)


def test_swapping_the_views_transposes_c_and_keeps_the_loss_and_its_gradients():
    z1, z2 = _pair(6, 4, seed=5)
    c12, c21 = cross_correlation(z1, z2), cross_correlation(z2, z1)
    torch.testing.assert_close(c21, c12.T)
    assert not torch.allclose(c12, c12.T)  # C itself is not symmetric: only the loss is
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss_fn = BarlowTwinsLoss(lambd=LAMBD)
    ga, gb = torch.autograd.grad(loss_fn(a, b)[0], (a, b))
    gb_swapped, ga_swapped = torch.autograd.grad(loss_fn(b, a)[0], (b, a))
    torch.testing.assert_close(ga, ga_swapped)
    torch.testing.assert_close(gb, gb_swapped)


def test_c_is_computed_in_float32_under_bf16_autocast():
    z1, z2 = (t.to(torch.bfloat16) for t in _pair(16, 8, seed=6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = cross_correlation(z1, z2)
        loss, _ = BarlowTwinsLoss()(z1, z2)
    assert c.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(c, cross_correlation(z1.float(), z2.float()))


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="method.lambd"):
        BarlowTwinsLoss(lambd=-0.1)
    with pytest.raises(ConfigError, match="method.scale_loss"):
        build_method("barlow_twins", nn.Flatten(), 4, proj_hidden_dim=8, proj_out_dim=8, scale_loss=0.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        cross_correlation(torch.zeros(4, 3), torch.zeros(4, 2))


# --- the method -----------------------------------------------------------------------------------------------


def _tiny_method(**kwargs) -> BarlowTwins:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    return BarlowTwins(net, dim, proj_hidden_dim=16, proj_out_dim=8, **kwargs).double()


def test_projector_and_defaults_as_released():
    """main.py: sizes [2048] + [8192, 8192, 8192]; Linear(bias=False), BatchNorm1d, ReLU per hidden layer, then
    Linear(bias=False); --lambd 0.0051; the loss unscaled."""
    defaults = {k: p.default for k, p in inspect.signature(BarlowTwins).parameters.items()}
    assert (defaults["proj_hidden_dim"], defaults["proj_out_dim"], defaults["proj_layers"]) == (8192, 8192, 3)
    assert (defaults["lambd"], defaults["scale_loss"]) == (0.0051, 1.0)
    method = _tiny_method()
    assert [type(m).__name__ for m in method.projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert all(m.bias is None for m in method.projector if isinstance(m, nn.Linear))
    assert method.projector[-1].out_features == 8 and method.projector[3].in_features == 16
    # SyncBN (the trainer under model.sync_bn, main.py for the whole model) converts the projector's norms; the loss
    # holds none: it standardises over the global batch itself
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_tiny_method())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.projector) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.criterion.modules())


def test_forward_is_the_loss_of_each_view_projected_on_its_own():
    method = _tiny_method(lambd=0.02)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out = method([x1, x2], torch.zeros(6), torch.arange(6))
    with torch.no_grad():  # training mode: batch statistics of each view alone, as main.py's two forwards
        z1, z2 = method.projector(method.backbone(x1)), method.projector(method.backbone(x2))
    expected, on, off, _ = loop_loss(z1, z2, 0.02)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert out.parts["barlow_on_diagonal"].item() == pytest.approx(on, rel=1e-10)
    assert out.parts["barlow_off_diagonal"].item() == pytest.approx(off, rel=1e-10)
    torch.testing.assert_close(out.outputs["embeddings"], z1)
    assert not out.outputs["embeddings"].requires_grad


def test_smoke_runs_shrink_only_the_projector_widths():
    assert BarlowTwins.smoke_overrides({"proj_hidden_dim": 8192, "proj_out_dim": 8192}) == [
        "method.proj_hidden_dim=512", "method.proj_out_dim=512"]
    assert BarlowTwins.smoke_overrides({"proj_hidden_dim": 256, "proj_out_dim": 128}) == []
    from contrastlab.cli import _load

    smoke = _load("demo", ["method.name=barlow_twins", "method.proj_out_dim=64"], smoke=True)  # defaults: 8192
    assert smoke.method.params == {"proj_hidden_dim": 512, "proj_out_dim": 64}
    assert _load("imagenet/barlow_twins_r50_1000ep", [], smoke=True).method.params["proj_out_dim"] == 512


# --- optimisers: the release's LARS and solo-learn's -------------------------------------------------------------


def _linear_bn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()


def _two_steps(model: nn.Module, opt: torch.optim.Optimizer, lr: float, grad_scale: float) -> None:
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * grad_scale
        set_learning_rate(opt, lr, lr)
        opt.step()


def test_recipe_lars_is_main_pys_lars_with_the_biases_rate():
    """main.py's LARS step written out: weight decay and the trust ratio eta ||w|| / ||g + wd w|| on matrices only;
    mu <- 0.9 mu + dp; w <- w - lr mu; lr 0.2 x batch/256 for matrices, 0.0048 x batch/256 for 1-D parameters."""
    cfg = load_config("imagenet/barlow_twins_r50_1000ep")
    base = cfg.data.batch_size / 256
    model, reference = _linear_bn(), _linear_bn()
    opt = build_optimizer(make_param_groups("bt", model.parameters()), cfg.optim, derive(cfg, 1, 1_281_167).lr)
    _two_steps(model, opt, 0.2 * base, grad_scale=1.0)
    mu = [torch.zeros_like(p) for p in reference.parameters()]
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        with torch.no_grad():
            for p, m in zip(reference.parameters(), mu):
                dp = torch.randn(p.shape, generator=g, dtype=p.dtype)
                if p.ndim != 1:
                    dp = dp + 1e-6 * p
                    dp = dp * (0.001 * p.norm() / dp.norm())
                m.mul_(0.9).add_(dp)
                p.sub_(m * (0.2 if p.ndim != 1 else 0.0048) * base)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)


def test_solo_learn_lars_is_larc_clipping_with_biases_and_norms_excluded():
    """solo/utils/lars.py step written out: for p.ndim != 1 with nonzero norms, r = eta ||p|| / (||g|| + wd ||p|| +
    eps), clipped to min(r / lr, 1), dp = (g + wd p) r; 1-D parameters dp = g; buf = dp, then 0.9 buf + dp;
    p <- p - lr buf. eta 0.02, wd 1e-4, lr 0.3 (barlow.yaml)."""
    cfg = load_config("cifar10/barlow_twins_r18_1000ep")
    lr, eta, wd = 0.3, 0.02, 1e-4
    for grad_scale in (1e-4, 10.0):  # small gradients: r / lr > 1, clipped; large: r / lr < 1, kept
        model, reference = _linear_bn(), _linear_bn()
        opt = build_optimizer(make_param_groups("bt", model.parameters()), cfg.optim, derive(cfg, 1, 50_000).lr)
        _two_steps(model, opt, lr, grad_scale)
        buffers: list[torch.Tensor | None] = [None] * len(list(reference.parameters()))
        clipped = []
        for step in range(2):
            g = torch.Generator().manual_seed(10 + step)
            with torch.no_grad():
                for k, p in enumerate(reference.parameters()):
                    dp = torch.randn(p.shape, generator=g, dtype=p.dtype) * grad_scale
                    if p.ndim != 1:
                        r = eta * p.norm() / (dp.norm() + wd * p.norm() + 1e-8)
                        clipped.append(bool(r / lr > 1))
                        dp = (dp + wd * p) * min(r / lr, 1.0)
                    buffers[k] = dp.clone() if buffers[k] is None else buffers[k].mul(0.9).add(dp)
                    p.sub_(lr * buffers[k])
        assert all(clipped) if grad_scale < 1 else not any(clipped)
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs)


def test_a_step_with_solo_learns_lars_never_waits_for_the_device(monkeypatch):
    """The loss, the method and LARC (whose plain-SGD case is decided on the device) call nothing that reads a
    device value to the host, as the trainer's steps must not with train.finite_check_every > 1."""
    from sync_guard import forbid_host_sync

    import contrastlab.engine.optim as optim_module
    import contrastlab.methods.barlow_twins as method_module
    import contrastlab.objectives.barlow_twins as loss_module

    method = _tiny_method()
    cfg = load_config("cifar10/barlow_twins_r18_1000ep")
    opt = build_optimizer(method.param_groups(), cfg.optim, 0.3)
    x1, x2 = _ddp_images(0)
    with monkeypatch.context() as m:
        forbid_host_sync(m, *(module.__file__ for module in (optim_module, method_module, loss_module)))
        out = method([x1, x2], torch.zeros(8), torch.arange(8))
        out.loss.backward()
        opt.step()
    assert any(p.grad is not None for p in method.parameters())


# --- recipes --------------------------------------------------------------------------------------------------


def _release_lr(step: int, steps_per_epoch: int, epochs: int, batch: int) -> float:
    """main.py adjust_learning_rate (before the 0.2 / 0.0048 factors)."""
    max_steps, warmup_steps, base_lr = epochs * steps_per_epoch, 10 * steps_per_epoch, batch / 256
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    step, max_steps = step - warmup_steps, max_steps - warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return base_lr * q + base_lr * 0.001 * (1 - q)


@pytest.mark.parametrize("epochs", [1000, 300])
def test_imagenet_recipes_carry_main_pys_settings(epochs):
    cfg = load_config(f"imagenet/barlow_twins_r50_{epochs}ep")
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.data.image_size) == (epochs, 2048, 224)
    assert (cfg.model.arch, cfg.model.zero_init_residual, cfg.model.sync_bn, cfg.model.cifar_stem) == (
        "resnet50", True, True, False)
    p = cfg.method.params
    assert (cfg.method.name, p["proj_hidden_dim"], p["proj_out_dim"], p["proj_layers"], p["lambd"]) == (
        "barlow_twins", 8192, 8192, 3, 0.0051)
    assert p["scale_loss"] == 1 / 16  # the released gradient on the README's 16 GPUs
    o = cfg.optim
    assert (o.name, o.weight_decay, o.momentum, o.lars_trust_coefficient) == ("lars", 1e-6, 0.9, 0.001)
    views = [make_photometric(cfg.views.photometric, v, (0.5,) * 3, (0.25,) * 3) for v in range(2)]
    assert [(r.blur_prob, r.solarize_prob) for r in views] == [(1.0, 0.0), (0.1, 0.2)]
    assert views[0].jitter == (0.4, 0.4, 0.2, 0.1) and views[0].jitter_prob == 0.8 and views[0].grayscale_prob == 0.2
    assert tuple(cfg.views.scale) == (0.08, 1.0) and cfg.views.num_views == 2
    d = derive(cfg, world_size=16, dataset_len=1_281_167)
    spe = d.steps_per_epoch
    for step in (0, 1, 5 * spe + 3, 10 * spe, 10 * spe + 1, epochs * spe // 2, epochs * spe - 1):
        ours = run_learning_rate(cfg, d, step // spe, step)
        assert ours == pytest.approx(0.2 * _release_lr(step, spe, epochs, 2048), rel=1e-9, abs=1e-15)
        assert ours * o.bias_bn_lr_scale == pytest.approx(0.0048 * _release_lr(step, spe, epochs, 2048), rel=1e-9,
                                                           abs=1e-15)
    lin = cfg.linear  # evaluate.py --lr-classifier 0.3, its defaults otherwise
    assert (lin.epochs, lin.batch_size, lin.lr, lin.optimizer, lin.weight_decay, lin.schedule, lin.crop_fraction) == (
        100, 256, 0.3, "sgd", 1e-6, "cosine", 0.875)


def _solo_lr(step: int, warmup: int, total: int, base: float = 0.3, start: float = 3e-5) -> float:
    """solo-learn's LinearWarmupCosineAnnealingLR (per step, eta_min 0), in closed form."""
    if step < warmup:
        return start + (base - start) * step / (warmup - 1)
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_recipes_carry_solo_learns_settings(dataset):
    cfg = load_config(f"{dataset}/barlow_twins_r18_1000ep")
    assert (cfg.data.name, cfg.data.batch_size, cfg.train.epochs) == (dataset, 256, 1000)
    assert (cfg.model.arch, cfg.model.cifar_stem, cfg.model.zero_init_residual) == ("resnet18", True, False)
    p = cfg.method.params
    assert (p["proj_hidden_dim"], p["proj_out_dim"], p["proj_layers"], p["lambd"], p["scale_loss"]) == (
        2048, 2048, 3, 0.0051, 0.1)
    o = cfg.optim
    assert (o.name, o.larc_clip, o.larc_exclude, o.lars_trust_coefficient, o.weight_decay, o.momentum) == (
        "larc", True, True, 0.02, 1e-4, 0.9)
    views = [make_photometric(cfg.views.photometric, v, (0.5,) * 3, (0.25,) * 3) for v in range(2)]
    assert [(r.blur_prob, r.solarize_prob) for r in views] == [(0.0, 0.0), (0.0, 0.2)]
    assert all(r.jitter == (0.4, 0.4, 0.2, 0.1) and r.jitter_prob == 0.8 and r.grayscale_prob == 0.2
               and r.flip_prob == 0.5 for r in views)
    assert tuple(cfg.views.scale) == (0.08, 1.0)
    d = derive(cfg, world_size=1, dataset_len=50_000)
    spe, total = d.steps_per_epoch, d.total_steps
    assert d.lr == 0.3
    assert run_learning_rate(cfg, d, 0, 0) == pytest.approx(3e-5)
    for step in (10 * spe, 10 * spe + 7, total // 2, total - 1):  # the cosine, step for step
        assert run_learning_rate(cfg, d, step // spe, step) == pytest.approx(_solo_lr(step, 10 * spe, total), rel=1e-9)
    mid = 5 * spe  # the warm-up: solo-learn reaches the peak one step earlier (it divides by warm-up steps - 1)
    assert run_learning_rate(cfg, d, 5, mid) == pytest.approx(_solo_lr(mid, 10 * spe, total), rel=1e-3)


# --- two DDP ranks --------------------------------------------------------------------------------------------

WORLD, B, D = 2, 4, 5


def _global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    return _pair(WORLD * B, D, seed=7)


def _release_style_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """main.py's forward on one rank: the views standardised over the global batch (SyncBatchNorm, whose backward
    sums over ranks like all_reduce_with_grad), ``c = bn(z1).T @ bn(z2) / global batch``, then
    ``torch.distributed.all_reduce(c)``, which has no backward."""
    n = z1.shape[0] * dist.get_world_size()
    standardised = []
    for z in (z1, z2):
        centred = z - all_reduce_with_grad(z.sum(0)) / n
        standardised.append(centred / torch.sqrt(all_reduce_with_grad(centred.pow(2).sum(0)) / n + 1e-5))
    c = standardised[0].T @ standardised[1] / n
    dist.all_reduce(c)  # in place, outside autograd
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return (1 - torch.diagonal(c)).pow(2).sum() + LAMBD * off


def _ddp_images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(40 + step)
    return tuple(torch.randn(WORLD * B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))


DDP_OPTIM = OptimConfig(name="lars", weight_decay=1e-2, bias_bn_lr_scale=0.024, exclude_bias_bn_wd=True)


def _run_method(method: BarlowTwins, model: nn.Module, rows: slice) -> list[float]:
    """Two LARS steps (biases and norms at 0.024 x the rate) on the global images restricted to ``rows``."""
    opt = build_optimizer(method.param_groups(), DDP_OPTIM, 0.5)
    losses = []
    for step in range(2):
        x1, x2 = _ddp_images(step)
        out = model([x1[rows], x2[rows]], torch.zeros(B), torch.arange(B))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def _method_eval() -> BarlowTwins:
    return _tiny_method().eval()  # BatchNorm on running statistics: each image's projection is split-independent


def _worker(rank: int, folder: Path) -> dict:
    mine = slice(rank * B, (rank + 1) * B)
    z1_all, z2_all = _global_embeddings()
    z1, z2 = z1_all[mine].clone().requires_grad_(), z2_all[mine].clone().requires_grad_()
    loss, info = BarlowTwinsLoss(lambd=LAMBD, gather_distributed=True)(z1, z2)
    loss.backward()
    result: dict[str, object] = {"loss": loss.detach(), "on": info["on_diagonal"], "grad1": z1.grad,
                                 "grad2": z2.grad}
    r1, r2 = z1_all[mine].clone().requires_grad_(), z2_all[mine].clone().requires_grad_()
    release = _release_style_loss(r1, r2)
    release.backward()
    result.update(release_loss=release.detach(), release_grad1=r1.grad, release_grad2=r2.grad)
    method = _method_eval()
    result["losses"] = _run_method(method, wrap_ddp(method, torch.device("cpu")), mine)
    result["params"] = [p.detach().clone() for p in method.parameters()]
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("barlow_dist"), WORLD)


def test_two_ranks_give_the_global_batch_loss_and_gradient(ranks):
    """Every rank's loss is the single-process loss on the global batch; each rank's gradient is W x the global
    gradient of its own rows (the convention of gather_with_grad), so DDP's average is the single-process one."""
    z1, z2 = (t.requires_grad_() for t in _global_embeddings())
    loss, info = BarlowTwinsLoss(lambd=LAMBD)(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert loop_loss(z1.detach(), z2.detach(), LAMBD)[0] == pytest.approx(loss.item(), rel=1e-12)
    for rank, r in enumerate(ranks):
        mine = slice(rank * B, (rank + 1) * B)
        assert r["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        assert r["on"].item() == pytest.approx(info["on_diagonal"].item(), rel=1e-12)
        torch.testing.assert_close(r["grad1"] / WORLD, g1[mine])
        torch.testing.assert_close(r["grad2"] / WORLD, g2[mine])
        # main.py's all_reduce has no backward: its rank gradient is the global one, which DDP then divides by W
        assert r["release_loss"].item() == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(r["release_grad1"], g1[mine])
        torch.testing.assert_close(r["release_grad2"], g2[mine])


def test_two_ranks_train_the_method_as_one_process_on_the_global_batch(ranks):
    single = _method_eval()
    losses = _run_method(single, single, slice(None))
    initial = list(_method_eval().parameters())
    assert any(not torch.equal(p, q) for p, q in zip(single.parameters(), initial))
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, rel=1e-10)
        for a, p in zip(r["params"], single.parameters()):
            torch.testing.assert_close(a, p.detach(), rtol=1e-10, atol=1e-12)


# --- resume ---------------------------------------------------------------------------------------------------


def test_a_run_resumed_mid_epoch_matches_the_uninterrupted_one(tmp_path, monkeypatch):
    """On the GPU input pipeline (here on CPU tensors) with the solo-learn views and optimiser."""
    from test_reliability import _assert_same_run, _interrupt_then_resume

    _interrupt_then_resume(tmp_path, monkeypatch, [
        "method.name=barlow_twins", "method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.scale_loss=0.1",
        "views.photometric=byol_small", "optim.name=larc", "optim.larc_clip=true", "optim.larc_exclude=true",
        "optim.lars_trust_coefficient=0.02", "optim.warmup_epochs=1", "data.pipeline=gpu", "data.subset=32",
        "train.checkpoint_every_steps=3"])  # 4 steps an epoch: killed after step 3, inside the first epoch
    _assert_same_run(tmp_path / "full", tmp_path / "part")
