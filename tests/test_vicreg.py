"""VICReg (Bardes, Ponce, LeCun, ICLR 2022; facebookresearch/vicreg main_vicreg.py): the loss against loop
formulas, its gradients, invariances, two gloo ranks against one process, exact resume, and the recipes' settings
against the released ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_ranks
from torch import nn

from contrastlab.engine.distributed import wrap_ddp
from contrastlab.errors import ConfigError
from contrastlab.methods import VICReg, build_method, method_defaults
from contrastlab.models import build_backbone
from contrastlab.objectives import VICRegLoss

# --------------------------------------------------------------------------------------------------------------
# The loss against loops over samples and dimensions (float64)


def _loop_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float) -> tuple[float, float, float]:
    """(invariance, variance averaged over the views, covariance summed over the views), element by element."""
    n, d = z1.shape
    a, b = z1.tolist(), z2.tolist()
    invariance = sum((a[i][k] - b[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def variance(z: list[list[float]]) -> float:
        total = 0.0
        for k in range(d):
            mean = sum(z[i][k] for i in range(n)) / n
            var = sum((z[i][k] - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + eps))
        return total / d

    def covariance(z: list[list[float]]) -> float:
        means = [sum(z[i][k] for i in range(n)) / n for k in range(d)]
        total = 0.0
        for p in range(d):
            for q in range(d):
                if p != q:
                    c = sum((z[i][p] - means[p]) * (z[i][q] - means[q]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    return invariance, (variance(a) + variance(b)) / 2, covariance(a) + covariance(b)


def _pair(n: int, d: int, scale1: float, scale2: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = scale1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + scale2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1, z2


@pytest.mark.parametrize("n, d, scale1, scale2, eps", [
    (6, 5, 0.5, 0.3, 1e-4),  # std below 1: the variance hinge is active
    (7, 4, 3.0, 1.0, 1e-4),  # std above 1: the hinge is zero in most dimensions
    (2, 3, 1.0, 1.0, 1e-4),  # the smallest batch with a variance
    (5, 1, 0.2, 0.1, 1e-2),  # one dimension: no off-diagonal covariance
])
def test_loss_terms_equal_loop_formulas(n, d, scale1, scale2, eps):
    z1, z2 = _pair(n, d, scale1, scale2)
    weights = (3.0, 5.0, 7.0)
    loss, terms = VICRegLoss(*weights, eps=eps)(z1, z2)
    expected = _loop_terms(z1, z2, eps)
    for name, value in zip(("invariance", "variance", "covariance"), expected):
        assert terms[name].item() == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert loss.item() == pytest.approx(sum(w * t for w, t in zip(weights, expected)), rel=1e-12)
    assert loss.dtype == torch.float64
    if d == 1:
        assert terms["covariance"].item() == 0.0


def test_released_coefficients_are_the_defaults():
    """main_vicreg.py: --sim-coeff 25, --std-coeff 25, --cov-coeff 1, eps 0.0001, --mlp 8192-8192-8192."""
    loss_fn = VICRegLoss()
    assert (loss_fn.sim_coeff, loss_fn.std_coeff, loss_fn.cov_coeff, loss_fn.eps) == (25.0, 25.0, 1.0, 1e-4)
    defaults = method_defaults("vicreg")
    assert {k: defaults[k] for k in ("proj_hidden_dim", "proj_out_dim", "proj_layers", "proj_last_bias",
                                     "sim_coeff", "std_coeff", "cov_coeff", "eps", "gather_distributed",
                                     "variance_scope")} == {
        "proj_hidden_dim": 8192, "proj_out_dim": 8192, "proj_layers": 3, "proj_last_bias": False,
        "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "eps": 1e-4, "gather_distributed": True,
        "variance_scope": "global"}


def test_gradients_match_finite_differences():
    z1, z2 = _pair(5, 4, 0.5, 2.0, seed=1)  # view 1 under the hinge, view 2 mostly above it
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss_fn = VICRegLoss(sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b)[0], (z1, z2))


def test_collapsed_embeddings_get_the_full_variance_penalty_and_a_finite_gradient():
    """Constant embeddings: std = sqrt(eps), so v = 1 - sqrt(eps) per view, no covariance, and eps keeps the
    gradient finite (the reason the release adds it)."""
    z = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    loss, terms = VICRegLoss(eps=1e-4)(z, z.detach() * 1)
    assert terms["variance"].item() == pytest.approx(1 - 1e-2)
    assert terms["covariance"].item() == 0.0 and terms["invariance"].item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_batch_permutation_leaves_the_loss_unchanged():
    z1, z2 = _pair(8, 6, 0.7, 0.5, seed=2)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    loss_fn = VICRegLoss()
    loss, terms = loss_fn(z1, z2)
    loss_p, terms_p = loss_fn(z1[perm], z2[perm])
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-12)
    for name in terms:
        assert terms_p[name].item() == pytest.approx(terms[name].item(), rel=1e-12, abs=1e-15)


def test_swapping_the_views_leaves_the_loss_unchanged():
    z1, z2 = _pair(8, 6, 0.7, 0.5, seed=4)
    loss_fn = VICRegLoss()
    (loss, terms), (loss_s, terms_s) = loss_fn(z1, z2), loss_fn(z2, z1)
    assert loss_s.item() == pytest.approx(loss.item(), rel=1e-12)
    for name in terms:
        assert terms_s[name].item() == pytest.approx(terms[name].item(), rel=1e-12, abs=1e-15)


def test_both_variance_scopes_agree_in_one_process():
    z1, z2 = _pair(6, 4, 0.5, 0.5, seed=5)
    a = VICRegLoss(gather_distributed=True, variance_scope="global")(z1, z2)[0]
    b = VICRegLoss(gather_distributed=True, variance_scope="rank")(z1, z2)[0]
    assert a.item() == b.item()


def test_bf16_embeddings_are_scored_in_float32():
    z1, z2 = (z.float() for z in _pair(16, 8, 0.5, 0.5, seed=6))
    h1, h2 = z1.bfloat16(), z2.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = VICRegLoss()(h1, h2)
    assert loss.dtype == torch.float32
    expected, _ = VICRegLoss()(h1.double(), h2.double())  # the same bf16 values, scored in float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kwargs, key", [
    ({"variance_scope": "local"}, "method.variance_scope"),
    ({"std_coeff": -1.0}, "method.std_coeff"),
    ({"eps": 0.0}, "method.eps"),
])
def test_bad_settings_are_config_errors_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        VICRegLoss(**kwargs)
    net, dim = build_backbone("resnet20", width=0.25)
    with pytest.raises(ConfigError, match=key):
        build_method("vicreg", net, dim, proj_hidden_dim=8, proj_out_dim=8, **kwargs)


def test_a_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        VICRegLoss()(torch.randn(1, 4), torch.randn(1, 4))


# --------------------------------------------------------------------------------------------------------------
# The method


def _method(**kwargs) -> VICReg:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    return VICReg(net, dim, proj_hidden_dim=16, proj_out_dim=8, **kwargs)


def test_expander_is_the_released_linear_bn_relu_stack():
    """main_vicreg.py Projector: (Linear, BatchNorm1d, ReLU) per hidden layer, then a Linear without bias."""
    net, dim = build_backbone("resnet20", width=0.25)
    method = VICReg(net, dim, proj_hidden_dim=12, proj_out_dim=10, proj_layers=3)
    layers = list(method.projector)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [(dim, 12), (12, 12),
                                                                                               (12, 10)]
    assert layers[-1].bias is None
    with_bias = VICReg(net, dim, proj_hidden_dim=12, proj_out_dim=10, proj_last_bias=True)  # solo-learn's
    assert with_bias.projector[-1].bias is not None


def test_step_output_parts_are_the_unweighted_terms_of_the_embeddings():
    method = _method(sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    out = method([x1, x2], None, None)
    with torch.no_grad():  # BatchNorm in training mode sees the same batches again: the same embeddings
        z1, z2 = method.projector(method.backbone(x1)), method.projector(method.backbone(x2))
    expected = _loop_terms(z1.double(), z2.double(), 1e-4)
    for name, value in zip(("invariance", "variance", "covariance"), expected):
        assert out.parts[name].item() == pytest.approx(value, rel=1e-4)
    assert out.loss.item() == pytest.approx(2 * expected[0] + 3 * expected[1] + 4 * expected[2], rel=1e-4)
    torch.testing.assert_close(out.outputs["embeddings"], z1)


def test_method_is_invariant_to_batch_order_and_symmetric_in_the_views():
    method = _method()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out = method([x1, x2], None, None)
    permuted = method([x1[perm], x2[perm]], None, None)
    swapped = method([x2, x1], None, None)
    assert permuted.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    torch.testing.assert_close(permuted.outputs["embeddings"], out.outputs["embeddings"][perm], rtol=1e-4,
                               atol=1e-5)
    assert swapped.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_views_go_through_the_network_one_at_a_time():
    """As released, each view is normalised by BatchNorm over its own batch: the embeddings of view 0 do not
    depend on view 1 (a concatenated forward would mix their statistics)."""
    method = _method()
    g = torch.Generator().manual_seed(2)
    x1, x2, other = (torch.randn(6, 3, 16, 16, generator=g) for _ in range(3))
    a = method([x1, x2], None, None).outputs["embeddings"]
    b = method([x1, other], None, None).outputs["embeddings"]
    torch.testing.assert_close(a, b)


def test_extra_views_are_left_out():
    """The release has no multi-crop: with 2 global + 2 local views (views.planner=multicrop) the first two make the
    loss."""
    method = _method()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    local = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)]
    assert method([x1, x2, *local], None, None).loss.item() == method([x1, x2], None, None).loss.item()


def test_mid_epoch_resume_on_the_device_pipeline_is_exact(tmp_path, monkeypatch):
    """A run killed at its first mid-epoch checkpoint and resumed gives the uninterrupted run's losses and weights
    bit for bit (data.pipeline=gpu, here on CPU tensors), and records the three terms per epoch."""
    import json

    from test_reliability import _assert_same_run, _interrupt_then_resume

    _interrupt_then_resume(tmp_path, monkeypatch, ["method.name=vicreg", "data.pipeline=gpu",
                                                   "train.checkpoint_every_steps=4"])
    _assert_same_run(tmp_path / "full", tmp_path / "part")
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert set(record["parts"]) == {"invariance", "variance", "covariance"}


# --------------------------------------------------------------------------------------------------------------
# Two gloo ranks against one process on the global batch

WORLD, B, D = 2, 3, 5


def _global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    return _pair(WORLD * B, D, 0.6, 0.4, seed=10)


def _global_images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20 + step)
    shape = (WORLD * B, 3, 8, 8)
    return (torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))


def _ddp_method() -> VICReg:
    # BN on running statistics; float64, so that one process and two ranks agree far below what a wrong gradient moves
    return _method(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0).double().eval()


def _train(method: VICReg, model: nn.Module, rows: slice) -> list[torch.Tensor]:
    """Two SGD steps on the global images restricted to ``rows``; the losses."""
    opt = torch.optim.SGD(method.param_groups(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(2):
        x1, x2 = _global_images(step)
        out = model([x1[rows], x2[rows]], None, None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    return losses


def _worker(rank: int, folder: Path) -> dict:
    mine = slice(rank * B, (rank + 1) * B)
    result: dict[str, object] = {}
    for scope in ("global", "rank"):
        z1_all, z2_all = _global_embeddings()
        z1 = z1_all[mine].clone().requires_grad_(True)
        z2 = z2_all[mine].clone().requires_grad_(True)
        loss, terms = VICRegLoss(gather_distributed=True, variance_scope=scope)(z1, z2)
        loss.backward()
        result[scope] = {"loss": loss.detach(), "grad1": z1.grad, "grad2": z2.grad, "terms": terms}
    method = _ddp_method()
    result["losses"] = _train(method, wrap_ddp(method, torch.device("cpu")), mine)
    result["params"] = [p.detach().clone() for p in method.parameters()]
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("vicreg_dist"), WORLD)


def _reference(z1: torch.Tensor, z2: torch.Tensor, scope: str) -> torch.Tensor:
    """The loss whose gradient DDP's averaged step follows, on the global batch, written with plain torch ops:
    mean over ranks of the per-rank invariance (and, for the "rank" scope, variance) terms; the covariance (and
    the "global" variance) on the whole batch."""
    def variance(z):
        return torch.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def covariance(z):
        c = torch.cov(z.T)
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / z.shape[1]

    shares = [slice(r * B, (r + 1) * B) for r in range(WORLD)]
    invariance = sum(((z1[s] - z2[s]) ** 2).mean() for s in shares) / WORLD
    if scope == "global":
        var = (variance(z1) + variance(z2)) / 2
    else:
        var = sum((variance(z1[s]) + variance(z2[s])) / 2 for s in shares) / WORLD
    return 25 * invariance + 25 * var + covariance(z1) + covariance(z2)


@pytest.mark.parametrize("scope", ["global", "rank"])
def test_two_ranks_give_the_single_process_gradient(ranks, scope):
    """Each rank's loss has its own invariance term and the gathered variance/covariance; the mean of the ranks'
    losses is the single-process loss, and each rank's gradient is W times the single-process gradient of its
    slice (the gather's backward sums the W ranks' identical global terms), which DDP's average over ranks
    divides by W again."""
    z1 = _global_embeddings()[0].requires_grad_(True)
    z2 = _global_embeddings()[1].requires_grad_(True)
    loss = _reference(z1, z2, scope)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert sum(r[scope]["loss"] for r in ranks).item() / WORLD == pytest.approx(loss.item(), rel=1e-12)
    assert ranks[0][scope]["loss"].item() != pytest.approx(ranks[1][scope]["loss"].item())  # per-rank invariance
    for rank, r in enumerate(ranks):
        mine = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(r[scope]["grad1"] / WORLD, g1[mine], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r[scope]["grad2"] / WORLD, g2[mine], rtol=1e-10, atol=1e-12)
    if scope == "global":  # the covariance and variance terms are the global batch's on every rank
        for name in ("variance", "covariance"):
            assert ranks[0][scope]["terms"][name].item() == ranks[1][scope]["terms"][name].item()


def test_two_ranks_under_ddp_take_the_single_process_steps(ranks):
    single = _ddp_method()
    losses = _train(single, single, slice(None))
    for step in range(2):
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]).item() / WORLD
        assert mean == pytest.approx(losses[step].item(), rel=1e-10)
    initial = list(_ddp_method().parameters())
    assert any(not torch.equal(p, q) for p, q in zip(single.parameters(), initial))  # the steps moved something
    for a, b, p in zip(ranks[0]["params"], ranks[1]["params"], single.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Recipes: the resolved settings against the released ones (values read from the upstream files named, written here)


def _released_vicreg_lr(step: int, steps_per_epoch: int, epochs: int, batch: int, base_lr: float) -> float:
    """facebookresearch/vicreg main_vicreg.py adjust_learning_rate."""
    max_steps, warmup = epochs * steps_per_epoch, 10 * steps_per_epoch
    peak = base_lr * batch / 256
    if step < warmup:
        return peak * step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup)))
    return peak * q + peak * 0.001 * (1 - q)


def _recipe_views(cfg) -> list:
    from contrastlab.views.photometric import make_photometric

    return [make_photometric(cfg.views.photometric, v, (0.5,) * 3, (0.25,) * 3) for v in range(2)]


def test_imagenet_recipe_is_the_released_run():
    """README (run_with_submitit.py --epochs 1000 --batch-size 2048 --base-lr 0.2), main_vicreg.py defaults,
    augmentations.py TrainTransform and evaluate.py (--lr-head 0.02)."""
    from contrastlab.config.derived import derive
    from contrastlab.config.load import load_config
    from contrastlab.engine.schedules import run_learning_rate

    cfg = load_config("imagenet/vicreg_r50_1000ep")
    d = derive(cfg, world_size=32, dataset_len=1281167)
    assert (cfg.data.batch_size, cfg.train.epochs, d.per_rank_batch_size) == (2048, 1000, 64)
    for step in (0, 1, 3125, 6249, 6250, 6251, 300000, d.total_steps - 1):
        epoch = step // d.steps_per_epoch
        assert run_learning_rate(cfg, d, epoch, step) == pytest.approx(
            _released_vicreg_lr(step, d.steps_per_epoch, 1000, 2048, 0.2), rel=1e-9, abs=1e-12)
    o = cfg.optim
    assert (o.name, o.weight_decay, o.momentum, o.lars_trust_coefficient) == ("lars", 1e-6, 0.9, 0.001)
    m = cfg.method.params
    assert (m["proj_hidden_dim"], m["proj_out_dim"], m["proj_layers"], m["proj_last_bias"]) == (8192, 8192, 3, False)
    assert (m["sim_coeff"], m["std_coeff"], m["cov_coeff"], m["eps"]) == (25.0, 25.0, 1.0, 1e-4)
    assert m["gather_distributed"] and m["variance_scope"] == "global"
    assert (cfg.model.arch, cfg.model.zero_init_residual, cfg.model.sync_bn) == ("resnet50", True, True)
    assert cfg.train.precision == "fp16"  # torch.cuda.amp.autocast + GradScaler
    assert (cfg.data.image_size, tuple(cfg.views.scale), cfg.views.num_views) == (224, (0.08, 1.0), 2)
    for view, blur, solarize in ((0, 1.0, 0.0), (1, 0.1, 0.2)):
        r = _recipe_views(cfg)[view]
        assert (r.jitter, r.jitter_prob, r.grayscale_prob, r.flip_prob) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5)
        assert (r.blur_prob, tuple(r.blur_sigma), r.solarize_prob) == (blur, (0.1, 2.0), solarize)
    lin = cfg.linear
    assert (lin.epochs, lin.batch_size, lin.lr, lin.optimizer, lin.momentum, lin.weight_decay, lin.schedule) == (
        100, 256, 0.02, "sgd", 0.9, 1e-6, "cosine")
    assert (tuple(lin.scale), lin.crop_fraction) == ((0.08, 1.0), 224 / 256)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_recipes_are_solo_learns_runs(dataset):
    """vturrisi/solo-learn scripts/pretrain/cifar/vicreg.yaml, solo/args/pretrain.py (lr x batch x devices / 256),
    solo/methods/base.py (warmup_cosine: 10 warm-up epochs from 3e-5, min_lr 0, per step), solo/methods/vicreg.py
    (projector with a bias on its last Linear)."""
    from contrastlab.config.derived import derive
    from contrastlab.config.load import load_config

    cfg = load_config(f"{dataset}/vicreg_r18_1000ep")
    d = derive(cfg, world_size=1, dataset_len=50000)
    assert (cfg.data.name, cfg.data.batch_size, cfg.train.epochs, d.lr) == (dataset, 256, 1000, 0.3)
    assert (d.warmup_steps, d.warmup_start_lr, d.final_lr) == (10 * (50000 // 256), 3e-5, 0.0)
    o = cfg.optim
    assert (o.name, o.larc_clip, o.larc_exclude, o.lars_trust_coefficient, o.weight_decay, o.momentum) == (
        "larc", True, True, 0.02, 1e-4, 0.9)
    m = cfg.method.params
    assert (m["proj_hidden_dim"], m["proj_out_dim"], m["proj_layers"], m["proj_last_bias"]) == (2048, 2048, 3, True)
    assert (m["sim_coeff"], m["std_coeff"], m["cov_coeff"]) == (25.0, 2 * 25.0, 1.0)  # solo-learn adds the views
    assert (cfg.model.arch, cfg.model.cifar_stem, cfg.model.zero_init_residual) == ("resnet18", True, False)
    assert cfg.train.precision == "fp16"  # 16-mixed
    assert tuple(cfg.views.scale) == (0.2, 1.0)
    for r in _recipe_views(cfg):
        assert (r.jitter, r.jitter_prob, r.grayscale_prob, r.flip_prob) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5)
        assert (r.blur_prob, r.solarize_prob) == (0.0, 0.1)


def test_solo_learns_summed_variance_is_our_average_with_twice_the_weight():
    """solo/losses/vicreg.py adds the two views' variance terms; main_vicreg.py averages them."""
    z1, z2 = _pair(8, 5, 0.5, 0.5, seed=11)

    def hinge(z):
        return torch.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def cov(z):
        c = torch.cov(z.T)
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / z.shape[1]

    solo = 25 * ((z1 - z2) ** 2).mean() + 25 * (hinge(z1) + hinge(z2)) + (cov(z1) + cov(z2))
    assert VICRegLoss(25.0, 50.0, 1.0)(z1, z2)[0].item() == pytest.approx(solo.item(), rel=1e-12)


@pytest.mark.parametrize("lr", [0.3, 1e-4])  # the local rate below the global one, and above it (clipped to it)
def test_larc_with_clip_is_solo_learns_lars(lr):
    """solo/utils/lars.py with clip_lr and exclude_bias_n_norm, written out: r = eta |w| / (|g| + wd |w| + eps),
    r <- min(r / lr, 1), d = (g + wd w) r for matrices; plain SGD (no decay) for 1-D parameters; heavy ball."""
    from contrastlab.engine.optim import LARC

    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    eta, wd, mom = 0.02, 1e-4, 0.9
    opt = LARC([{"params": [w], "exclude_from_lars": False}, {"params": [b], "exclude_from_lars": True}], lr=lr,
               momentum=mom, weight_decay=wd, trust_coefficient=eta, clip=True, exclude=True)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    buf_w = buf_b = None
    clipped = []
    for step in range(2):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        (x @ w.T + b).pow(3).sum().backward()
        gw, gb = w.grad.clone(), b.grad.clone()
        opt.step()
        rate = eta * w_ref.norm() / (gw.norm() + wd * w_ref.norm() + 1e-8)
        clipped.append(bool(rate / lr > 1))
        dw = (gw + wd * w_ref) * min(rate.item() / lr, 1.0)
        buf_w = dw if buf_w is None else mom * buf_w + dw
        buf_b = gb if buf_b is None else mom * buf_b + gb
        w_ref, b_ref = w_ref - lr * buf_w, b_ref - lr * buf_b
        torch.testing.assert_close(w.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)
    assert clipped == [lr < 1e-3] * 2  # both regimes are exercised
