"""Methods: one forward/backward on a tiny backbone, momentum encoders, the MoCo queue, the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.methods import BYOL, METHODS, MoCo, SimCLR, SimSiam, StepOutput, Supervised, build_method
from contrastlab.models import build_backbone, build_cohort

B, S = 4, 16


def _backbone() -> tuple[nn.Module, int]:
    return build_backbone("resnet20", width=0.25)


def _networks(name: str) -> tuple[nn.Module, int]:
    """A tiny backbone, or for cohort methods (MCL) a cohort of two tiny peers."""
    if METHODS[name].takes_cohort:
        cohort = build_cohort("resnet20", 2, width=0.25)
        return cohort, cohort.feature_dim
    return _backbone()


def _views(seed: int = 0, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, S, S, generator=g) for _ in range(n)]


def _labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 1])


def _small(name: str) -> dict:
    return {
        "simclr": {"proj_hidden_dim": 32, "proj_out_dim": 8},
        "moco": {"proj_hidden_dim": 32, "proj_out_dim": 8, "queue_size": 16},
        "mocov3": {"proj_hidden_dim": 32, "proj_out_dim": 8},
        "caco": {"proj_hidden_dim": 32, "proj_out_dim": 8, "memory_size": 16, "warm_start": False},
        "byol": {"proj_hidden_dim": 32, "proj_out_dim": 8, "pred_hidden_dim": 16},
        "simsiam": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 8},
        "barlow_twins": {"proj_hidden_dim": 32, "proj_out_dim": 16},
        "supervised": {"num_classes": 3},
        "mcl": {"num_classes": 3, "embed_dim": 8},
        "moco_mcl": {"proj_out_dim": 8, "queue_size": 16},
        "vicreg": {"proj_hidden_dim": 32, "proj_out_dim": 16},
        "swav": {"proj_hidden_dim": 32, "proj_out_dim": 8, "num_prototypes": 10},
        "dino": {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8},
    }[name]


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(a.shape[0])]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    net, dim = _networks(name)
    method = build_method(name, net, dim, **_small(name))
    out = method(_views(), _labels(), torch.arange(B))
    assert isinstance(out, StepOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grad = method.backbone.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert out.outputs["embeddings"].shape[0] == B
    for value in list(out.outputs.values()) + list(out.parts.values()):
        assert not value.requires_grad
    peer0 = net.peer(0) if METHODS[name].takes_cohort else net
    assert method.backbone is peer0 and method.feature_dim == dim == 16
    if name in ("simclr", "moco", "mocov3", "caco", "moco_mcl"):
        pos, neg = out.outputs["pos_logits"], out.outputs["neg_logits"]
        assert pos.dim() == 1 and neg.dim() == 2 and pos.shape[0] == neg.shape[0]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward_under_bf16_autocast(name: str) -> None:
    """The recipes' bf16 mixed precision (smoke runs use fp32 on the CPU): losses come out in float32."""
    torch.manual_seed(0)
    net, dim = _networks(name)
    method = build_method(name, net, dim, **_small(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(_views(), _labels(), torch.arange(B))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert method.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_param_groups_cover_trainable_params_once(name: str) -> None:
    net, dim = _networks(name)
    method = build_method(name, net, dim, **_small(name))
    groups = method.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in method.parameters() if p.requires_grad}
    for g in groups:
        assert g["exclude_from_lars"] == g["weight_decay_exempt"] == all(p.ndim <= 1 for p in g["params"])
        assert isinstance(g["name"], str)


def test_simclr_logit_shapes_and_loss() -> None:
    torch.manual_seed(0)
    net, dim = _backbone()
    method = SimCLR(net, dim, proj_hidden_dim=32, proj_out_dim=8, temperature=0.5)
    x1, x2 = _views()
    out = method([x1, x2], _labels(), torch.arange(B))
    assert out.outputs["pos_logits"].shape == (2 * B,)
    assert out.outputs["neg_logits"].shape == (2 * B, 2 * B - 2)
    with torch.no_grad():
        z1, z2 = method.projector(method.backbone(torch.cat([x1, x2]))).chunk(2)
    torch.testing.assert_close(out.outputs["embeddings"], z1)
    expected_pos = [c / 0.5 for c in _cos_rows(z1, z2)]
    assert out.outputs["pos_logits"][:B].tolist() == pytest.approx(expected_pos, abs=1e-4)


def _moco(**kw) -> MoCo:
    torch.manual_seed(0)
    net, dim = _backbone()
    args = {"proj_hidden_dim": 32, "proj_out_dim": 8, "queue_size": 8, "temperature": 0.2}
    args.update(kw)
    return MoCo(net, dim, **args)


def _expected_keys(method: MoCo, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(method.key_encoder(x), dim=1)


def test_moco_key_encoder_gets_no_gradient_and_follows_ema() -> None:
    method = _moco()
    out = method(_views(), _labels(), torch.arange(B))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.key_encoder.parameters())
    torch.optim.SGD(method.param_groups(), lr=0.5).step()
    online = [p.detach().clone() for m in (method.backbone, method.projector) for p in m.parameters()]
    key_before = [p.detach().clone() for p in method.key_encoder.parameters()]
    buffers_before = [b.clone() for b in method.key_encoder.buffers()]
    assert any(not torch.equal(o, k) for o, k in zip(online, key_before))
    method.after_optimizer_step(0.9)
    for k_new, k_old, o in zip(method.key_encoder.parameters(), key_before, online):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * o, rtol=0, atol=1e-6)
    for b_new, b_old in zip(method.key_encoder.buffers(), buffers_before):
        assert torch.equal(b_new, b_old)  # BN running statistics are not averaged


def test_moco_queue_writes_keys_after_the_loss_and_wraps() -> None:
    method = _moco(queue_size=8)
    t = 0.2
    initial = method.queue.queue.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(8))

    x1, x2 = _views(1)
    keys = _expected_keys(method, x2)
    with torch.no_grad():
        q = F.normalize(method.projector(method.backbone(x1)), dim=1)
    out = method([x1, x2], _labels(), torch.arange(B))
    # The loss saw the queue as it was before this step's keys.
    torch.testing.assert_close(out.outputs["neg_logits"], q @ initial.T / t, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.outputs["pos_logits"], (q * keys).sum(1) / t, rtol=0, atol=1e-4)
    torch.testing.assert_close(method.queue.queue[:B], keys, rtol=0, atol=1e-6)
    assert torch.equal(method.queue.queue[B:], initial[B:])
    assert int(method.queue.ptr) == B

    x1, x2 = _views(2)
    keys_2 = _expected_keys(method, x2)
    method([x1, x2], _labels(), torch.arange(B))
    torch.testing.assert_close(method.queue.queue[B:], keys_2, rtol=0, atol=1e-6)
    assert int(method.queue.ptr) == 0  # wrapped around

    x1, x2 = _views(3)
    keys_3 = _expected_keys(method, x2)
    method([x1, x2], _labels(), torch.arange(B))
    torch.testing.assert_close(method.queue.queue[:B], keys_3, rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue.queue[B:], keys_2, rtol=0, atol=1e-6)
    assert int(method.queue.ptr) == B
    state = method.state_dict()
    assert "queue.queue" in state and "queue.ptr" in state


def test_moco_symmetric_enqueues_both_key_sets_in_order() -> None:
    method = _moco(queue_size=16, symmetric=True)
    x1, x2 = _views(4)
    k1, k2 = _expected_keys(method, x1), _expected_keys(method, x2)
    out = method([x1, x2], _labels(), torch.arange(B))
    torch.testing.assert_close(method.queue.queue[: 2 * B], torch.cat([k1, k2]), rtol=0, atol=1e-6)
    assert int(method.queue.ptr) == 2 * B
    parts = out.parts
    assert out.loss.item() == pytest.approx(
        0.5 * (parts["info_nce_12"] + parts["info_nce_21"]).item(), rel=1e-6
    )
    assert out.outputs["pos_logits"].shape == (2 * B,)
    assert out.outputs["neg_logits"].shape == (2 * B, 16)


def test_moco_queue_size_must_divide() -> None:
    method = _moco(queue_size=10)
    with pytest.raises(ConfigError, match="10.*4"):
        method(_views(), _labels(), torch.arange(B))


def test_moco_v1_linear_head() -> None:
    method = _moco(proj_layers=1)
    assert len(method.projector) == 1 and isinstance(method.projector[0], nn.Linear)


def test_byol_loss_and_target_ema() -> None:
    torch.manual_seed(0)
    net, dim = _backbone()
    method = BYOL(net, dim, proj_hidden_dim=32, proj_out_dim=8, pred_hidden_dim=16)
    x1, x2 = _views(5)
    with torch.no_grad():
        p1 = method.predictor(method.projector(method.backbone(x1)))
        p2 = method.predictor(method.projector(method.backbone(x2)))
        t1, t2 = method.target_encoder(x1), method.target_encoder(x2)
    expected = sum(2 - 2 * c for c in _cos_rows(p1, t2)) / B + sum(2 - 2 * c for c in _cos_rows(p2, t1)) / B
    out = method([x1, x2], _labels(), torch.arange(B))
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    out.loss.backward()
    assert all(p.grad is None for p in method.target_encoder.parameters())
    assert method.predictor[0].weight.grad is not None
    torch.optim.SGD(method.param_groups(), lr=0.5).step()
    online = [p.detach().clone() for m in (method.backbone, method.projector) for p in m.parameters()]
    before = [p.detach().clone() for p in method.target_encoder.parameters()]
    method.after_optimizer_step(0.99)
    for new, old, o in zip(method.target_encoder.parameters(), before, online):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * o, rtol=0, atol=1e-6)


def test_simsiam_loss_stop_gradient_and_fixed_lr() -> None:
    torch.manual_seed(0)
    net, dim = _backbone()
    method = SimSiam(net, dim, proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=8)
    assert isinstance(method.projector[-1], nn.BatchNorm1d) and not method.projector[-1].affine
    assert sum(isinstance(m, nn.Linear) for m in method.projector) == 3
    assert sum(isinstance(m, nn.Linear) for m in method.predictor) == 2
    x1, x2 = _views(6)
    with torch.no_grad():
        z1 = method.projector(method.backbone(x1))
        z2 = method.projector(method.backbone(x2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
    expected = -0.5 * sum(_cos_rows(p1, z2)) / B - 0.5 * sum(_cos_rows(p2, z1)) / B
    out = method([x1, x2], _labels(), torch.arange(B))
    assert out.loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    groups = method.param_groups()
    predictor_ids = {id(p) for p in method.predictor.parameters()}
    for g in groups:
        in_predictor = {id(p) in predictor_ids for p in g["params"]}
        assert len(in_predictor) == 1
        assert g["fixed_lr"] == in_predictor.pop()
    assert any(g["fixed_lr"] for g in groups)
    off = SimSiam(
        *_backbone(), proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=8, fixed_predictor_lr=False
    )
    assert not any(g["fixed_lr"] for g in off.param_groups())


def test_simsiam_stop_gradient() -> None:
    # The gradient reaching each projection z must come only through its own prediction p.
    torch.manual_seed(0)
    net, dim = _backbone()
    method = SimSiam(net, dim, proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=8)
    x1, x2 = _views(7)
    z: dict[int, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        z[len(z)] = output

    method.projector.register_forward_hook(record)
    out = method([x1, x2], _labels(), torch.arange(B))
    z1, z2 = z[0], z[1]
    g1, g2 = torch.autograd.grad(out.loss, (z1, z2), retain_graph=True)
    # Reference: the same loss with the stop-gradient written out explicitly.
    p1, p2 = method.predictor(z1), method.predictor(z2)
    ref = 0.5 * (-F.cosine_similarity(p1, z2.detach()).mean() - F.cosine_similarity(p2, z1.detach()).mean())
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)


def test_supervised_cross_entropy() -> None:
    torch.manual_seed(0)
    net, dim = _backbone()
    method = Supervised(net, dim, num_classes=3)
    (x,) = _views(8, n=1)
    labels = _labels()
    out = method([x], labels, torch.arange(B))
    logits = out.outputs["logits"]
    assert logits.shape == (B, 3)
    expected = (
        -sum(
            float(logits[i, labels[i]]) - math.log(sum(math.exp(float(v)) for v in logits[i]))
            for i in range(B)
        )
        / B
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.outputs["embeddings"].shape == (B, dim)


def test_two_views_required() -> None:
    net, dim = _backbone()
    with pytest.raises(ConfigError, match="2 views"):
        SimCLR(net, dim, proj_hidden_dim=8, proj_out_dim=4)(_views(n=1), _labels(), torch.arange(B))


def test_after_optimizer_step_is_noop_without_momentum_encoder() -> None:
    net, dim = _backbone()
    method = SimCLR(net, dim, proj_hidden_dim=8, proj_out_dim=4)
    before = [p.detach().clone() for p in method.parameters()]
    method.after_optimizer_step(0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, method.parameters()))


def test_build_method_errors() -> None:
    net, dim = _backbone()
    with pytest.raises(ConfigError, match="moco") as excinfo:
        build_method("mocco", net, dim)
    assert "did you mean" in str(excinfo.value).lower()
    with pytest.raises(ConfigError, match="queue_sz") as excinfo:
        build_method("moco", net, dim, queue_sz=1024)
    message = str(excinfo.value)
    assert "queue_size" in message and "temperature" in message and "shuffle_bn" in message
    with pytest.raises(ConfigError, match="num_classes"):
        build_method("supervised", net, dim)
    method = build_method("moco", net, dim, proj_hidden_dim=16, proj_out_dim=4, queue_size=32, symmetric=True)
    assert isinstance(method, MoCo) and method.symmetric and method.queue.size == 32
    assert set(METHODS) == {"simclr", "moco", "mocov3", "byol", "simsiam", "caco", "supervised", "mcl", "moco_mcl",
                            "barlow_twins", "vicreg", "swav", "dino"}
