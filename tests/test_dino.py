"""DINO (Caron et al., ICCV 2021): the loss and its centre, the head, the teacher-temperature schedule, the frozen last
layer, multi-crop grouping, DINO's ViTs, two DDP ranks against one process, exact resume, recipes as released."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import run_on_ranks
from torch import nn

from contrastlab.cli import main
from contrastlab.config.derived import final_lr
from contrastlab.config.load import load_config
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.engine.distributed import broadcast_ignored_buffers, wrap_ddp
from contrastlab.errors import ConfigError
from contrastlab.methods import DINO, build_method
from contrastlab.models import build_backbone
from contrastlab.models.dino_head import DINOHead, WeightNormLinear
from contrastlab.models.multicrop import forward_by_resolution, resolution_groups
from contrastlab.objectives import DINOLoss, teacher_temperature

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only contends on CI's 2 cores

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="ViTs need the [vit] extra (timm)")

B, K = 4, 7


def _logits(n: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, K, generator=g, dtype=torch.float64) for _ in range(n)]


def _brute_force(student, teacher, center, tau_s: float, tau_t: float) -> float:
    """DINO's loss, one scalar at a time: H(softmax((t_i - c) / tau_t), softmax(s_v / tau_s)) over v != i."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            ce = 0.0
            for b in range(t.shape[0]):
                e = [math.exp((float(t[b, k]) - float(center[k])) / tau_t) for k in range(t.shape[1])]
                log_z = math.log(sum(math.exp(float(s[b, k]) / tau_s) for k in range(t.shape[1])))
                ce -= sum(e[k] / sum(e) * (float(s[b, k]) / tau_s - log_z) for k in range(t.shape[1]))
            total += ce / t.shape[0]
            pairs += 1
    return total / pairs


# --- the loss ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("crops", "global_crops", "tau_t"), [(5, 2, 0.04), (2, 2, 0.07), (3, 1, 0.5)])
def test_loss_and_centre_update_equal_the_formulas(crops: int, global_crops: int, tau_t: float) -> None:
    student, teacher = _logits(crops, 0, scale=0.3), _logits(global_crops, 1, scale=0.3)
    loss_fn = DINOLoss(K, student_temperature=0.1, center_momentum=0.9, gather_distributed=False).double()
    center = torch.randn(1, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    loss_fn.center.copy_(center)
    loss, info = loss_fn(student, teacher, teacher_temperature=tau_t)
    assert loss.item() == pytest.approx(_brute_force(student, teacher, center[0], 0.1, tau_t), rel=1e-10)
    assert info["pair_losses"].shape == (global_crops, crops)
    assert all(info["pair_losses"][i, i] == 0 for i in range(global_crops))  # a crop is never its own target
    assert int((info["pair_losses"] != 0).sum()) == global_crops * crops - global_crops
    # the centre moves towards the mean raw teacher output, after being used with its old value
    mean = sum(t.sum(0) for t in teacher) / (global_crops * B)
    torch.testing.assert_close(loss_fn.center[0], 0.9 * center[0] + 0.1 * mean, rtol=0, atol=1e-12)
    targets = [F.softmax((t - center) / tau_t, dim=1) for t in teacher]
    entropy = sum(float(-(p * p.log()).sum()) for p in targets) / (global_crops * B)
    assert info["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-9)


def test_centre_left_alone_when_asked_and_edge_settings() -> None:
    loss_fn = DINOLoss(K, center_momentum=0.0, gather_distributed=False).double()
    student, teacher = _logits(3, 3), _logits(2, 4)
    loss_fn(student, teacher, 0.04, update_center=False)
    assert torch.equal(loss_fn.center, torch.zeros(1, K, dtype=torch.float64))
    loss_fn(student, teacher, 0.04)  # momentum 0: the centre is the batch mean
    torch.testing.assert_close(loss_fn.center[0], torch.cat(teacher).mean(0))
    with pytest.raises(ValueError, match="teacher crops"):
        loss_fn(student[:1], teacher, 0.04)
    with pytest.raises(ValueError, match="teacher_temperature"):
        loss_fn(student, teacher, 0.0)


def test_loss_gradient_passes_gradcheck_and_never_reaches_the_teacher() -> None:
    loss_fn = DINOLoss(K, gather_distributed=False).double()
    loss_fn.center.normal_(generator=torch.Generator().manual_seed(5))
    student = [s.requires_grad_(True) for s in _logits(3, 6)]
    teacher = [t.requires_grad_(True) for t in _logits(2, 7)]
    assert torch.autograd.gradcheck(lambda *s: loss_fn(list(s), teacher, 0.07, update_center=False)[0], student)
    loss_fn(student, teacher, 0.07)[0].backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_loss_is_invariant_to_batch_order_and_to_swapping_crops() -> None:
    loss_fn = DINOLoss(K, gather_distributed=False).double()
    student, teacher = _logits(5, 8), _logits(2, 9)
    base, _ = loss_fn(student, teacher, 0.04, update_center=False)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(10))
    permuted, _ = loss_fn([s[perm] for s in student], [t[perm] for t in teacher], 0.04, update_center=False)
    assert permuted.item() == pytest.approx(base.item(), rel=1e-12)
    # swapping the two global crops (in both networks) and reordering the local ones changes nothing
    swapped, _ = loss_fn([student[1], student[0], student[4], student[2], student[3]], [teacher[1], teacher[0]], 0.04,
                         update_center=False)
    assert swapped.item() == pytest.approx(base.item(), rel=1e-12)
    # the centre's update does not depend on the order either
    a, b = DINOLoss(K, gather_distributed=False).double(), DINOLoss(K, gather_distributed=False).double()
    a(student, teacher, 0.04)
    b([s[perm] for s in student], [teacher[1][perm], teacher[0][perm]], 0.04)
    torch.testing.assert_close(a.center, b.center, rtol=0, atol=1e-14)


def test_teacher_temperature_schedule_is_upstreams_per_epoch_linspace() -> None:
    for warmup, epochs in ((30, 100), (1, 5), (0, 5), (50, 60)):
        released = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(epochs - warmup) * 0.07))
        for epoch in range(epochs):
            ours = teacher_temperature(epoch + 0.75, warmup_temperature=0.04, temperature=0.07, warmup_epochs=warmup)
            assert ours == pytest.approx(released[epoch], abs=1e-15), (warmup, epoch)


# --- the head ----------------------------------------------------------------------------------------------------


def test_head_layers_normalised_bottleneck_and_weight_normalised_last_layer() -> None:
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=9, hidden_dim=16, bottleneck_dim=5)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert all(m.bias is not None and not m.bias.any() for m in head.mlp if isinstance(m, nn.Linear))
    bn = DINOHead(12, out_dim=9, hidden_dim=16, bottleneck_dim=5, use_bn=True, num_layers=2)
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert bn.mlp[0].bias is not None  # kept before the BN, as released
    assert isinstance(DINOHead(12, 9, bottleneck_dim=5, num_layers=1).mlp, nn.Linear)
    x = torch.randn(3, 12, dtype=torch.float64)
    head = head.double()
    z = head.mlp(x)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    assert v.shape == (9, 5) and g.shape == (9, 1) and not g.requires_grad and torch.equal(g, torch.ones_like(g))
    expected = (z / z.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)
    assert torch.equal(head.project(x), z)
    free = WeightNormLinear(5, 3, fixed_norm=False).double()
    assert free.weight_g.requires_grad
    with torch.no_grad():
        free.weight_g.copy_(torch.tensor([[2.0], [0.5], [3.0]]))
    torch.testing.assert_close(free.weight.norm(dim=1), torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64))


# --- the method --------------------------------------------------------------------------------------------------


def _conv_net() -> tuple[nn.Module, int]:
    """A BN-free backbone for any input size: each sample's features depend on that sample only."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 6


def _dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    net, dim = _conv_net()
    return DINO(net, dim, out_dim=K, hidden_dim=8, bottleneck_dim=4, **kwargs).double()


def _crops(batch: int, seed: int, local: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
            + [torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(local)])


def test_step_is_the_loss_of_the_student_and_teacher_outputs_and_the_centre_follows() -> None:
    method = _dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3)
    method.set_progress(1.5, 10, per_epoch=False)
    assert method.current_teacher_temp == pytest.approx(0.055)
    views = _crops(B, 11)
    with torch.no_grad():  # computed independently: one network call per crop
        student = [method.head(method.backbone(v)) for v in views]
        teacher = [method.teacher_head(method.teacher_backbone(v)) for v in views[:2]]
    out = method(views, None, None)
    expected = _brute_force(student, teacher, torch.zeros(K), 0.1, 0.055)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert out.parts["teacher_temp"].item() == pytest.approx(0.055)
    torch.testing.assert_close(method.criterion.center[0], 0.1 * torch.cat(teacher).mean(0))
    torch.testing.assert_close(out.outputs["embeddings"], method.head.project(method.backbone(views[0])))
    # the teacher starts as the student, takes no gradient and follows it by EMA
    out.loss.backward()
    assert all(p.grad is None for p in [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()])
    pairs = [(method.backbone, method.teacher_backbone), (method.head, method.teacher_head)]
    for online, target in pairs:
        for a, b in zip(online.parameters(), target.parameters()):
            assert torch.equal(a, b)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher_backbone.parameters()]
    method.after_optimizer_step(0.9)
    for t0, t1, s in zip(before, method.teacher_backbone.parameters(), method.backbone.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)


def test_a_step_never_waits_for_the_device(monkeypatch) -> None:
    """No .item(), boolean mask or other host read in the loss, the head, the grouping or the method's step."""
    from sync_guard import forbid_host_sync

    import contrastlab.methods.dino as method_module
    import contrastlab.models.dino_head as head_module
    import contrastlab.models.multicrop as multicrop_module
    import contrastlab.objectives.dino as loss_module

    method = _dino(freeze_last_layer=1)
    forbid_host_sync(monkeypatch, *(m.__file__ for m in (method_module, head_module, multicrop_module, loss_module)))
    method.set_progress(0.5, 10, per_epoch=False)
    out = method(_crops(B, 14), None, None)
    out.loss.backward()
    method.before_optimizer_step(0)
    method.after_optimizer_step(0.99)


def test_crops_of_one_size_share_a_backbone_call() -> None:
    views = [torch.randn(2, 3, *size) for size in [(8, 8)] * 2 + [(4, 4)] * 3 + [(8, 8)]]
    assert resolution_groups(views) == [(0, 2), (2, 5), (5, 6)]
    calls = []
    bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bn.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    features = forward_by_resolution(bn, views)
    assert calls == [4, 6, 2]
    # a BatchNorm in training mode normalises the global crops together, as upstream's MultiCropWrapper
    torch.testing.assert_close(features[:4], bn(torch.cat(views[:2])))
    assert not torch.allclose(features[:2], bn(views[0]))


def test_last_layer_frozen_during_the_first_epochs_only() -> None:
    method = _dino(freeze_last_layer=2)
    for epoch, frozen in ((0.0, True), (1.9, True), (2.0, False), (5.0, False)):
        method.zero_grad()
        method.set_progress(epoch, 10, per_epoch=False)
        method(_crops(B, 12), None, None).loss.backward()
        method.before_optimizer_step(0)
        assert (method.head.last_layer.weight_v.grad is None) == frozen, epoch
        assert method.head.mlp[0].weight.grad is not None
    unnormed = _dino(norm_last_layer=False, freeze_last_layer=1)
    unnormed.set_progress(0.0, 10, per_epoch=True)
    unnormed(_crops(B, 13), None, None).loss.backward()
    unnormed.before_optimizer_step(0)
    assert unnormed.head.last_layer.weight_g.grad is None and unnormed.head.last_layer.weight_v.grad is None


def test_param_groups_as_released_get_params_groups() -> None:
    """Regularised: every trainable tensor of 2+ dimensions (the last layer's v, and g when it trains); not: biases
    and norms. The teacher is in no group."""
    for norm in (True, False):
        method = _dino(norm_last_layer=norm)
        groups = {g["name"]: g for g in method.param_groups()}
        names = {id(p): n for n, p in method.named_parameters()}
        released = {n for n, p in method.named_parameters() if p.requires_grad and not n.endswith(".bias") and p.ndim > 1}
        assert {names[id(p)] for p in groups["dino"]["params"]} == released
        assert {names[id(p)] for p in groups["dino_1d"]["params"]} == {
            n for n, p in method.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
        assert groups["dino_1d"]["weight_decay_exempt"] and not groups["dino"]["weight_decay_exempt"]
        assert ("head.last_layer.weight_g" in released) == (not norm)
        assert not any(n.startswith("teacher") for n in released)


def test_bad_settings_are_config_errors() -> None:
    net, dim = _conv_net()
    for kwargs, key in (({"teacher_temp": 0.0}, "teacher_temp"), ({"center_momentum": 1.5}, "center_momentum"),
                        ({"freeze_last_layer": -1}, "freeze_last_layer"), ({"num_global_views": 0}, "num_global_views"),
                        ({"warmup_teacher_temp_epochs": 2.5}, "warmup_teacher_temp_epochs")):
        with pytest.raises(ConfigError, match=key):
            build_method("dino", net, dim, out_dim=K, hidden_dim=8, bottleneck_dim=4, **kwargs)
    with pytest.raises(ConfigError, match="at least 2 views"):
        _dino()([torch.randn(2, 3, 8, 8, dtype=torch.float64)], None, None)


# --- DINO's ViTs -------------------------------------------------------------------------------------------------


def _bicubic_1d(values: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    """PyTorch's bicubic (Keys, a = -0.75) along the last axis, align_corners=False, source x = (i + 0.5) / scale
    - 0.5, indices clamped at the borders, written out by hand."""
    a = -0.75

    def w(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    n = values.shape[-1]
    result = torch.zeros(*values.shape[:-1], out, dtype=values.dtype)
    for i in range(out):
        x = (i + 0.5) / scale - 0.5
        left = math.floor(x)
        for j in range(left - 1, left + 3):
            result[..., i] += w(x - j) * values[..., min(max(j, 0), n - 1)]
    return result


@needs_timm
def test_dino_position_embedding_interpolation_by_hand() -> None:
    from contrastlab.models.vit import interpolate_position_embedding

    side, dim = 4, 3
    pe = torch.randn(1, 1 + side * side, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    assert interpolate_position_embedding(pe, side, side) is pe
    for gh, gw in ((2, 2), (3, 2), (6, 5)):
        grid = pe[0, 1:].reshape(side, side, dim).permute(2, 0, 1)  # [D, rows, cols]
        rows = _bicubic_1d(grid.transpose(1, 2), gh, (gh + 0.1) / side).transpose(1, 2)  # resize the rows' axis
        both = _bicubic_1d(rows, gw, (gw + 0.1) / side)
        expected = torch.cat([pe[0, :1], both.permute(1, 2, 0).reshape(gh * gw, dim)])
        torch.testing.assert_close(interpolate_position_embedding(pe, gh, gw)[0], expected)


@needs_timm
def test_dino_vits_are_timms_and_take_any_crop_size() -> None:
    """DINO's ViT-S/16 has 6 heads (MoCo v3's 12); the keys and outputs are timm's standard ViT's (checked on the
    tiny one, 3 heads, to keep the test fast)."""
    import timm

    from contrastlab.models.vit import VIT_ARCHS

    assert VIT_ARCHS["vit_small_dino"]["num_heads"] == 6 and VIT_ARCHS["vit_base_dino"]["num_heads"] == 12
    torch.manual_seed(0)
    vit, dim = build_backbone("vit_tiny_dino", img_size=32, drop_path_rate=0.1)
    assert dim == 192 and vit.blocks[0].attn.num_heads == 3 and vit.pos_embed.requires_grad
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    reference.load_state_dict(vit.state_dict(), strict=True)
    vit.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(x), reference(x))  # on the native grid the interpolation is the identity
    assert vit(torch.randn(2, 3, 16, 16)).shape == vit(torch.randn(2, 3, 48, 48)).shape == (2, 192)
    # the student keeps its stochastic depth, the teacher has none
    method = DINO(vit, dim, out_dim=16, hidden_dim=8, bottleneck_dim=4).train()
    assert method.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in method.teacher_backbone.modules())
    with torch.no_grad():
        torch.testing.assert_close(method.teacher_backbone(x), method.teacher_backbone(x))
        assert not torch.equal(method.backbone(x), method.backbone(x))


# --- two ranks against one process -------------------------------------------------------------------------------

WORLD, RANK_BATCH, STEPS = 2, 3, 2


def _global_crops(step: int) -> list[torch.Tensor]:
    return _crops(WORLD * RANK_BATCH, 100 + step)


def _train(method: DINO, model: nn.Module, rows: slice) -> dict[str, list]:
    """STEPS SGD steps on the global crops restricted to ``rows``; the losses and centres after each step."""
    opt = torch.optim.SGD(method.param_groups(), lr=0.1, momentum=0.9)
    seen: dict[str, list] = {"loss": [], "center": []}
    for step in range(STEPS):
        method.set_progress(float(step), STEPS, per_epoch=True)
        out = model([v[rows] for v in _global_crops(step)], None, None)
        opt.zero_grad()
        out.loss.backward()
        method.before_optimizer_step(step)
        opt.step()
        method.after_optimizer_step(0.9)
        seen["loss"].append(out.loss.detach().clone())
        seen["center"].append(method.criterion.center.clone())
    seen["params"] = [p.detach().clone() for p in method.parameters()]
    return seen


def _dino_worker(rank: int, folder: Path) -> dict:
    method = _dino(freeze_last_layer=1, warmup_teacher_temp_epochs=2, teacher_temp=0.06)
    broadcast_ignored_buffers(method)
    ddp = wrap_ddp(method, torch.device("cpu"))
    seen = _train(method, ddp, slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH))
    seen["ignored"] = sorted(ddp.parameters_to_ignore)
    return seen


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(_dino_worker, tmp_path_factory.mktemp("dino_dist"), WORLD)


def test_two_ranks_equal_one_process_on_the_global_batch(ranks: list[dict]) -> None:
    """The centre is identical on both ranks and equal to the single process's on the global batch; the mean of the
    ranks' losses is the global loss; after two steps (the last layer frozen in the first) the weights agree."""
    single_method = _dino(freeze_last_layer=1, warmup_teacher_temp_epochs=2, teacher_temp=0.06)
    single = _train(single_method, single_method, slice(None))
    assert ranks[0]["ignored"] == ["criterion.center"]
    for step in range(STEPS):
        assert torch.equal(ranks[0]["center"][step], ranks[1]["center"][step])
        torch.testing.assert_close(ranks[0]["center"][step], single["center"][step], rtol=0, atol=1e-13)
        mean_loss = (ranks[0]["loss"][step] + ranks[1]["loss"][step]) / WORLD
        assert mean_loss.item() == pytest.approx(single["loss"][step].item(), rel=1e-12)
    for rank in ranks:
        for a, b in zip(rank["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- training runs -----------------------------------------------------------------------------------------------

RUN = ["data.subset=24", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
       "model.width=0.25", "train.epochs=2", "monitor.knn_every=0", "monitor.max_bank=32", "monitor.max_test=16",
       "monitor.knn_k=5", "observers=[progress]", "train.log_every=1000", "train.deterministic=true",
       "method.name=dino", "method.out_dim=32", "method.hidden_dim=16", "method.bottleneck_dim=8",
       "method.warmup_teacher_temp_epochs=2", "method.teacher_temp=0.07", "views.planner=multicrop",
       "views.num_small=2", "views.small_size=8", "views.photometric=dino", "optim.clip_grad=3.0",
       "optim.clip_grad_mode=per_parameter", "optim.weight_decay_end=0.4", "optim.exclude_bias_bn_wd=true",
       "train.ema_momentum=0.996", "train.ema_schedule=cosine"]  # 3 steps an epoch


def test_mid_epoch_resume_gives_the_uninterrupted_run(tmp_path, monkeypatch) -> None:
    """The centre, the teacher and the per-epoch schedules (teacher temperature, frozen last layer) resume exactly
    from a checkpoint written in the middle of the first epoch."""
    from test_reliability import _assert_same_run, _interrupt_then_resume

    monkeypatch.setattr("test_reliability.TINY", RUN)
    _interrupt_then_resume(tmp_path, monkeypatch, ["train.checkpoint_every_steps=2"])
    _assert_same_run(tmp_path / "full", tmp_path / "part")
    weights = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["method"]
    assert weights["criterion.center"].abs().sum() > 0
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["parts"]["teacher_temp"], 6) for r in records] == [0.04, 0.07]


def test_cli_trains_multicrop_on_the_gpu_pipeline_with_the_last_layer_frozen_in_epoch_one(tmp_path) -> None:
    """One epoch through the CLI, views rendered in batches (data.pipeline=gpu, here on CPU tensors): the student's
    last layer never moves, so the teacher's stays equal to it, while the rest of the student does move."""
    out = tmp_path / "run"
    assert main(["train", "demo", "--smoke", f"out={out}", *RUN[4:], "train.epochs=1", "train.max_steps=0",
                 "data.subset=24", "data.pipeline=gpu", "views.small_size=8"]) == 0
    weights = load_checkpoint(out / "checkpoints" / "last.pt")["method"]
    torch.testing.assert_close(weights["head.last_layer.weight_v"], weights["teacher_head.last_layer.weight_v"],
                               rtol=0, atol=1e-6)
    moved = (weights["head.mlp.0.weight"] - weights["teacher_head.mlp.0.weight"]).abs().max()
    assert moved > 1e-5


# --- evaluating as released: the teacher, and a ViT's last blocks ------------------------------------------------


@needs_timm
def test_last_blocks_features_are_the_normalised_class_tokens_of_the_last_blocks() -> None:
    """``linear.n_last_blocks`` / ``linear.avgpool_patch_tokens`` (eval_linear.py): the tokens every block outputs,
    caught by forward hooks and passed through the final LayerNorm here, against the module's own block loop."""
    from contrastlab.models.vit import build_vit
    from contrastlab.models.vit_features import LastBlocksFeatures

    torch.manual_seed(0)
    vit, dim = build_vit("vit_small_dino", img_size=32)
    vit.eval()
    x = torch.randn(3, 3, 32, 32)
    caught: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: caught.append(out)) for block in vit.blocks]
    with torch.no_grad():
        final = vit(x)
        for hook in hooks:
            hook.remove()
        normed = [vit.norm(out) for out in caught]
        torch.testing.assert_close(LastBlocksFeatures(vit, 1)(x), final)  # one block: the backbone's own output
        four = LastBlocksFeatures(vit, 4)
        assert four.dim == 4 * dim
        torch.testing.assert_close(four(x), torch.cat([n[:, 0] for n in normed[-4:]], dim=1))
        pooled = LastBlocksFeatures(vit, 1, avgpool_patch_tokens=True)(x)
    patch_mean = normed[-1][:, 1:].mean(dim=1)
    for i in range(dim):  # interleaved as released: cls_0, mean_0, cls_1, mean_1, ...
        torch.testing.assert_close(pooled[:, 2 * i], normed[-1][:, 0, i])
        torch.testing.assert_close(pooled[:, 2 * i + 1], patch_mean[:, i])
    with pytest.raises(ConfigError, match="avgpool_patch_tokens=true reads the last block only"):
        LastBlocksFeatures(vit, 4, avgpool_patch_tokens=True)
    with pytest.raises(ConfigError, match="between 1 and the ViT's 12 blocks"):
        LastBlocksFeatures(vit, 13)
    with pytest.raises(ConfigError, match="set linear.n_last_blocks=1"):
        LastBlocksFeatures(build_backbone("resnet18")[0], 4)


def test_evaluation_reads_the_teacher_when_the_run_says_so(tmp_path) -> None:
    """``model.evaluated_network=momentum`` (DINO's recipes): kNN during training, ``eval`` and ``export`` read the
    teacher's backbone; ``--network online`` the student's. Checked by exporting both and comparing with the
    checkpoint's ``teacher_backbone.*`` and ``backbone.*`` tensors, which differ after training."""
    out = tmp_path / "run"
    assert main(["train", "demo", "--smoke", f"out={out}", *RUN[4:], "train.epochs=1", "train.max_steps=2",
                 "data.subset=16", "views.small_size=8", "model.evaluated_network=momentum", "model.arch=resnet18",
                 "model.cifar_stem=false", "model.width=1.0"]) == 0
    ckpt = out / "checkpoints" / "last.pt"
    weights = load_checkpoint(ckpt)["method"]
    for network, prefix in (("momentum", "teacher_backbone."), ("online", "backbone.")):
        assert main(["export", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / f"{network}.pth"),
                     "--network", network]) == 0
        exported = torch.load(tmp_path / f"{network}.pth", weights_only=True)
        name = "conv1.weight"
        torch.testing.assert_close(exported[name], weights[prefix + name], rtol=0, atol=0)
    assert not torch.equal(weights["teacher_backbone.conv1.weight"], weights["backbone.conv1.weight"])
    assert main(["eval", "knn", str(ckpt), "monitor.max_bank=16", "monitor.max_test=8"]) == 0
    assert json.loads((out / "eval_knn_demo.json").read_text())["network"] == "momentum"
    with pytest.raises(ConfigError, match="method 'simclr' keeps no momentum copy"):
        load_config("demo", ["model.evaluated_network=momentum"])


# --- importing released files ------------------------------------------------------------------------------------


class _UpstreamHead(nn.Module):
    """DINOHead's structure and forward as ``vision_transformer.py`` writes it (weight norm spelled out)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Module()
        self.last_layer.weight_g = nn.Parameter(torch.rand(out_dim, 1) + 0.5)
        self.last_layer.weight_v = nn.Parameter(torch.randn(out_dim, bottleneck))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, g = self.last_layer.weight_v, self.last_layer.weight_g
        return F.normalize(self.mlp(x), dim=-1) @ (g * v / v.norm(dim=1, keepdim=True)).T


def upstream_dino_checkpoint(seed: int, full: bool = True) -> tuple[dict, dict[str, nn.Module]]:
    """A ``main_dino.py`` checkpoint (or, ``full=False``, a backbone-only file) of a ViT-Ti/16 at 16 px, written in
    upstream's naming from timm's ViT and the head above; and the upstream networks it holds."""
    import timm

    torch.manual_seed(seed)
    nets = {name: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16).eval()
            for name in ("student", "teacher")}
    if not full:
        return dict(nets["teacher"].state_dict()), nets
    heads = {name: _UpstreamHead(192, 64, 32, 8) for name in ("student", "teacher")}
    wrapper = {name: nn.ModuleDict({"backbone": nets[name], "head": heads[name]}) for name in nets}
    raw = {"student": {f"module.{k}": v for k, v in wrapper["student"].state_dict().items()},
           "teacher": dict(wrapper["teacher"].state_dict()), "optimizer": {}, "epoch": 300,
           "dino_loss": {"center": torch.randn(1, 64)}, "args": "Namespace(arch='vit_tiny')"}
    return raw, {**nets, **{f"{n}_head": h for n, h in heads.items()}}


@needs_timm
def test_importing_a_full_checkpoint_and_a_backbone_file_gives_upstreams_networks() -> None:
    from contrastlab.importers import convert_released

    raw, up = upstream_dino_checkpoint(30)
    converted = convert_released(raw, "checkpoint.pth", "dino", overrides=["data.image_size=16"], log=lambda s: None)
    method, record = converted.method.eval(), converted.checkpoint["imported"]
    assert converted.checkpoint["recipe"] == "imagenet/dino_vit_s16_300ep" and record["kind"] == "pretrain"
    assert (method.criterion.center == raw["dino_loss"]["center"]).all()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(method.backbone(x), up["student"](x))
        torch.testing.assert_close(method.teacher_backbone(x), up["teacher"](x))
        torch.testing.assert_close(method.head(method.backbone(x)), up["student_head"](up["student"](x)))
        torch.testing.assert_close(method.teacher_head(method.teacher_backbone(x)), up["teacher_head"](up["teacher"](x)))
    state, up = upstream_dino_checkpoint(31, full=False)
    converted = convert_released(state, "dino_deittiny16_pretrain.pth", "dino", overrides=["data.image_size=16"],
                                 log=lambda s: None)
    method = converted.method.eval()
    assert converted.checkpoint["imported"]["kind"] == "backbone" and method.backbone.embed_dim == 192
    with torch.no_grad():
        torch.testing.assert_close(method.backbone(x), up["teacher"](x))
        torch.testing.assert_close(method.teacher_backbone(x), up["teacher"](x))


@needs_timm
def test_a_released_linear_classifier_reads_the_last_four_class_tokens(tmp_path) -> None:
    """``import --from dino --classifier *_linearweights.pth`` beside a backbone file: ``eval linear
    --stored-classifier`` scores it on the 4 x 192 last-blocks features (a 192-wide classifier is refused), and its
    top-1 equals the accuracy of the file's Linear on hooked tokens of the upstream network, computed here."""
    from contrastlab import assemble
    from contrastlab.config.load import config_from_dict
    from contrastlab.errors import CheckpointError
    from contrastlab.importers import import_checkpoint

    state, up = upstream_dino_checkpoint(32, full=False)
    backbone = tmp_path / "dino_deittiny16_pretrain.pth"
    torch.save(state, backbone)
    linear = nn.Linear(4 * 192, 10)
    probe = tmp_path / "dino_deittiny16_linearweights.pth"
    torch.save({"epoch": 100, "state_dict": {f"module.linear.{k}": v for k, v in linear.state_dict().items()},
                "optimizer": {}, "scheduler": {}, "best_acc": 72.0}, probe)
    with pytest.raises(CheckpointError, match="--classifier"):
        import_checkpoint(probe, "dino", tmp_path / "x.pt", log=lambda s: None)
    out = tmp_path / "imported.pt"
    small = ["data.image_size=16", "data.name=demo", "data.root=null", "data.train_split=train", "data.test_split=test",
             "data.workers=0", "train.device=cpu"]
    assert main(["import", str(backbone), "--from", "dino", "--classifier", str(probe), "--out", str(out), *small]) == 0
    assert main(["eval", "linear", str(out), "--stored-classifier", *small]) == 0
    result = json.loads((tmp_path / "imported.eval_linear_demo_stored.json").read_text())
    ckpt = load_checkpoint(out)
    cfg = config_from_dict(__import__("yaml").safe_load(ckpt["config"]))
    test = list(assemble.evaluation_views(cfg, assemble.dataset(cfg, cfg.data.test_split)))
    images, labels = torch.stack([views[0] for views, _, _ in test]), torch.tensor([label for _, label, _ in test])
    caught: list[torch.Tensor] = []
    teacher = up["teacher"]
    hooks = [block.register_forward_hook(lambda _m, _i, o: caught.append(o)) for block in teacher.blocks[-4:]]
    with torch.no_grad():
        teacher(images)
        features = torch.cat([teacher.norm(o)[:, 0] for o in caught], dim=1)
        expected = (linear(features).argmax(1) == labels).float().mean().item() * 100
    for hook in hooks:
        hook.remove()
    assert result["top1"] == pytest.approx(expected, abs=1e-4) and result["network"] == "momentum"
    narrow = tmp_path / "narrow_linearweights.pth"
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(10, 192), "module.linear.bias": torch.zeros(10)}},
               narrow)
    assert main(["import", str(backbone), "--from", "dino", "--classifier", str(narrow), "--out",
                 str(tmp_path / "narrow.pt"), *small]) == 2  # refused: the probe reads 768-d features


# --- recipes as released -----------------------------------------------------------------------------------------

# main_dino.py defaults and the README's commands (facebookresearch/dino), transcribed independently of the recipes.
RELEASED_DEFAULTS = {"method.out_dim": 65536, "method.student_temp": 0.1, "method.center_momentum": 0.9,
                     "method.freeze_last_layer": 1, "train.ema_momentum": 0.996, "train.ema_schedule": "cosine",
                     "optim.warmup_epochs": 10, "optim.clip_grad": 3.0, "optim.clip_grad_mode": "per_parameter",
                     "views.num_views": 2, "views.small_size": 96, "data.image_size": 224, "optim.exclude_bias_bn_wd": True,
                     # eval_knn.py / eval_linear.py --checkpoint_key teacher; eval_linear.py --n_last_blocks 4 (ViT-S)
                     "model.evaluated_network": "momentum", "linear.n_last_blocks": 4,
                     "linear.avgpool_patch_tokens": False}
RELEASED = {
    "imagenet/dino_vit_s16_100ep": {"model.arch": "vit_small_dino", "model.drop_path_rate": 0.1, "train.epochs": 100,
                                    "data.batch_size": 512, "optim.name": "adamw", "optim.lr": 0.0005,
                                    "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "method.teacher_temp": 0.04,
                                    "method.warmup_teacher_temp_epochs": 0, "method.norm_last_layer": True,
                                    "views.num_small": 8, "views.scale": [0.4, 1.0], "views.small_scale": [0.05, 0.4]},
    "imagenet/dino_vit_s16_300ep": {"model.arch": "vit_small_dino", "train.epochs": 300, "data.batch_size": 1024,
                                    "method.teacher_temp": 0.07, "method.warmup_teacher_temp": 0.04,
                                    "method.warmup_teacher_temp_epochs": 30, "method.norm_last_layer": False,
                                    "views.num_small": 8},
    "imagenet/dino_vit_s16_800ep": {"model.arch": "vit_small_dino", "train.epochs": 800, "data.batch_size": 1024,
                                    "method.teacher_temp": 0.07, "method.warmup_teacher_temp_epochs": 30,
                                    "method.norm_last_layer": False, "optim.weight_decay_end": 0.4},
    "imagenet/dino_r50_100ep": {"model.arch": "resnet50", "train.epochs": 100, "data.batch_size": 512,
                                "optim.name": "sgd", "optim.lr": 0.03, "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
                                "optim.weight_decay_end": 1e-4, "views.scale": [0.14, 1.0],
                                "views.small_scale": [0.05, 0.14], "views.num_small": 8, "model.sync_bn": True,
                                "linear.n_last_blocks": 1},  # a ResNet's pooled features (eval_linear.py, resnet)
}


def _value(cfg, key: str):
    section, name = key.split(".")
    part = getattr(cfg, section)
    return part.params[name] if section == "method" else getattr(part, name)


@pytest.mark.parametrize("recipe", sorted(RELEASED))
def test_recipes_hold_the_released_settings(recipe: str) -> None:
    cfg = load_config(recipe)
    assert cfg.method.name == "dino" and cfg.views.planner == "multicrop" and cfg.views.photometric == "dino"
    for key, value in {**RELEASED_DEFAULTS, **RELEASED[recipe]}.items():
        assert _value(cfg, key) == pytest.approx(value), key
    assert final_lr(cfg) == pytest.approx(1e-6)  # --min_lr, not scaled with the batch upstream


# solo-learn scripts/pretrain/cifar/dino.yaml with solo/methods/dino.py's and solo/methods/base.py's defaults.
SOLO_LEARN = {"model.arch": "resnet18", "model.cifar_stem": True, "model.sync_bn": True, "data.batch_size": 256,
              "train.epochs": 1000, "views.planner": "random_resized", "views.num_views": 2, "views.scale": [0.08, 1.0],
              "views.photometric": "byol_small", "method.out_dim": 4096, "method.hidden_dim": 2048,
              "method.bottleneck_dim": 256, "method.norm_last_layer": True, "method.use_bn_in_head": False,
              "method.student_temp": 0.1, "method.teacher_temp": 0.07, "method.warmup_teacher_temp_epochs": 0,
              "method.freeze_last_layer": 1, "optim.clip_grad": 0.0, "optim.name": "larc", "optim.lr": 0.3,
              "optim.base_batch_size": 256, "optim.weight_decay": 1e-6, "optim.lars_trust_coefficient": 0.02,
              "optim.larc_clip": True, "optim.larc_exclude": True, "optim.warmup_epochs": 10, "optim.warmup_start_lr": 3e-5,
              "optim.final_lr": 0.0, "train.ema_momentum": 0.9995, "train.ema_schedule": "cosine"}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_recipes_hold_solo_learns_settings(dataset: str) -> None:
    cfg = load_config(f"{dataset}/dino_r18_1000ep")
    assert cfg.method.name == "dino" and cfg.data.name == dataset
    for key, value in SOLO_LEARN.items():
        got = _value(cfg, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


def test_smoke_runs_train_a_narrower_head_on_the_same_code_path() -> None:
    """--smoke caps the head's output (65536 released) and MLP widths; the user's own overrides still win."""
    from contrastlab.cli import _load

    cfg = _load("imagenet/dino_vit_s16_100ep", [], smoke=True)
    assert (cfg.method.params["out_dim"], cfg.method.params["hidden_dim"]) == (1024, 512)
    assert cfg.method.params["bottleneck_dim"] == load_config("imagenet/dino_vit_s16_100ep").method.params.get(
        "bottleneck_dim", 256)
    assert _load("imagenet/dino_vit_s16_100ep", ["method.out_dim=2048"], smoke=True).method.params["out_dim"] == 2048
