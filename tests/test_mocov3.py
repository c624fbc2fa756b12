"""MoCo v3 (Chen, Xie, He, ICCV 2021): loss, heads, momentum schedule, and the ViT backbones."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.config.load import load_config
from contrastlab.engine.schedules import ema_momentum
from contrastlab.methods import MoCoV3, build_method
from contrastlab.models import build_backbone
from contrastlab.models.vit import sincos_position_embedding
from contrastlab.objectives.batch_info_nce import BatchInfoNCELoss

torch.set_num_threads(2)

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="ViTs need the [vit] extra (timm)")


def test_loss_equals_a_brute_force_cross_entropy_scaled_by_two_tau() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    tau = 0.2
    loss, info = BatchInfoNCELoss(temperature=tau)(q, k)
    expected = 0.0
    for i in range(6):
        qi = q[i] / q[i].norm()
        scores = [float(qi @ (k[j] / k[j].norm())) / tau for j in range(6)]
        expected += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    assert loss.item() == pytest.approx(2 * tau * expected / 6, rel=1e-9)
    assert info["neg_logits"].shape == (6, 5)
    for i in range(6):
        others = [float(F.normalize(q[i], dim=0) @ F.normalize(k[j], dim=0)) / tau for j in range(6) if j != i]
        assert info["neg_logits"][i].tolist() == pytest.approx(others)
    plain, _ = BatchInfoNCELoss(temperature=tau, scale_by_temperature=False)(q, k)
    assert plain.item() == pytest.approx(expected / 6, rel=1e-9)


def test_no_gradient_reaches_the_keys() -> None:
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    BatchInfoNCELoss()(q, k)[0].backward()
    assert q.grad is not None and k.grad is None


def _layers(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_resnet_heads_as_released() -> None:
    net, dim = build_backbone("resnet20", width=0.25)
    method = MoCoV3(net, dim, proj_hidden_dim=32, proj_out_dim=8)
    assert method.head == "resnet"
    assert _layers(method.projector) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert _layers(method.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert not method.projector[-1].affine
    for head in (method.projector, method.predictor):
        assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    assert [m.out_features for m in method.projector if isinstance(m, nn.Linear)] == [32, 8]


@needs_timm
def test_vit_heads_keep_the_predictor_last_bn() -> None:
    net, dim = build_backbone("vit_small", img_size=32)
    method = MoCoV3(net, dim, proj_hidden_dim=32, proj_out_dim=8)
    assert method.head == "vit" and dim == 384
    assert _layers(method.projector) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert _layers(method.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not method.predictor[-1].affine and not method.projector[-1].affine


def test_step_symmetric_and_momentum_encoder_follows() -> None:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    method = MoCoV3(net, dim, proj_hidden_dim=16, proj_out_dim=8, temperature=1.0)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = method([x1, x2], None, None)
    assert out.loss.item() == pytest.approx(float(out.parts["ctr_12"] + out.parts["ctr_21"]))
    assert out.outputs["pos_logits"].shape == (8,) and out.outputs["neg_logits"].shape == (8, 3)
    out.loss.backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
    key_before = [p.clone() for p in method.key_encoder.parameters()]
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0.75)
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    for before, after, o in zip(key_before, method.key_encoder.parameters(), online):
        torch.testing.assert_close(after, 0.75 * before + 0.25 * o.detach())


def test_cosine_momentum_is_upstream_moco_m_cos_per_iteration() -> None:
    """``1 - 0.5 * (1 + cos(pi * epoch / epochs)) * (1 - m)`` with ``epoch = e + i / iters`` (main_moco.py)."""
    epochs, iters, m = 7, 13, 0.99
    for step in range(0, epochs * iters, 5):
        epoch = step // iters + (step % iters) / iters
        upstream = 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m)
        assert ema_momentum(step, base=m, total_steps=epochs * iters, schedule="cosine") == pytest.approx(upstream)


def _sincos(a: float, b: float, dim: int) -> list[float]:
    """``[sin(a w_d)..., cos(a w_d)..., sin(b w_d)..., cos(b w_d)...]``, ``w_d = 10000^(-d / (dim / 4))``."""
    omegas = [1.0 / 10000 ** (d / (dim // 4)) for d in range(dim // 4)]
    return ([math.sin(a * o) for o in omegas] + [math.cos(a * o) for o in omegas]
            + [math.sin(b * o) for o in omegas] + [math.cos(b * o) for o in omegas])


def test_sincos_position_embedding_puts_the_row_first_as_upstream() -> None:
    """Patch (row r, column c) gets [sin r w, cos r w, sin c w, cos c w] (moco-v3 vits.py builds its grid with
    torch.meshgrid(grid_w, grid_h), "ij" indexing); the class token is zero."""
    side, dim = 4, 16
    pe = sincos_position_embedding(side, side, dim)
    assert pe.shape == (1, 1 + side * side, dim)
    assert torch.equal(pe[0, 0], torch.zeros(dim))
    for row in range(side):
        for col in range(side):
            assert pe[0, 1 + row * side + col].tolist() == pytest.approx(_sincos(row, col, dim), abs=1e-6)
    # a non-square grid keeps upstream's tensor: patch k gets (k // grid_h, k % grid_h)
    h, w = 3, 5
    pe = sincos_position_embedding(h, w, dim)
    for k in range(h * w):
        assert pe[0, 1 + k].tolist() == pytest.approx(_sincos(k // h, k % h, dim), abs=1e-6)


@needs_timm
def test_vit_small_as_mocov3_builds_it() -> None:
    torch.manual_seed(0)
    vit, dim = build_backbone("vit_small", img_size=64, stop_grad_conv1=True)
    assert dim == 384 and len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 12
    assert not vit.pos_embed.requires_grad
    torch.testing.assert_close(vit.pos_embed.data, sincos_position_embedding(4, 4, 384))
    assert not vit.patch_embed.proj.weight.requires_grad and not vit.patch_embed.proj.bias.requires_grad
    qkv = vit.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (384 + 384)) and qkv.abs().max() > 0.9 * math.sqrt(6 / (384 + 384))
    fc1 = vit.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (384 + 1536))
    assert torch.equal(vit.blocks[0].attn.qkv.bias, torch.zeros_like(vit.blocks[0].attn.qkv.bias))
    assert vit.cls_token.abs().max() < 1e-4
    assert vit(torch.randn(2, 3, 64, 64)).shape == (2, 384)


@needs_timm
def test_conv_stem_vit_has_one_block_less_and_a_trainable_stem() -> None:
    vit, dim = build_backbone("vit_conv_small", img_size=32)
    assert dim == 384 and len(vit.blocks) == 11
    convs = [m for m in vit.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 96, 192, 384, 384] and all(p.requires_grad for p in convs[0].parameters())
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 384)


@needs_timm
def test_vit_weights_load_strictly_into_timm() -> None:
    timm = pytest.importorskip("timm")
    vit, _ = build_backbone("vit_small", img_size=32)
    # timm's ViT-S has 6 heads: the same weight shapes, so the keys match strictly ...
    timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32).load_state_dict(
        vit.state_dict(), strict=True)
    # ... and with MoCo v3's 12 heads the same function.
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, num_heads=12)
    reference.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    vit.eval(), reference.eval()
    torch.testing.assert_close(reference(x), vit(x))


@needs_timm
def test_vit_config_errors_name_the_key() -> None:
    from contrastlab.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 16"):
        build_backbone("vit_small", img_size=40)
    with pytest.raises(ConfigError, match="stop_grad_conv1"):
        build_backbone("vit_conv_small", img_size=32, stop_grad_conv1=True)
    with pytest.raises(ConfigError, match="model.stop_grad_conv1=True is not an option of backbone .resnet20."):
        from contrastlab import assemble

        assemble.backbone(load_config("demo", ["model.stop_grad_conv1=true"]))
    with pytest.raises(ConfigError, match="head"):
        net, dim = build_backbone("resnet20", width=0.25)
        build_method("mocov3", net, dim, head="transformer")


@pytest.mark.parametrize("recipe,lr,batch", [("imagenet/mocov3_r50_100ep", 0.6, 4096),
                                             ("imagenet/mocov3_r50_1000ep", 0.3, 4096),
                                             ("imagenet/mocov3_vit_s_300ep", 1.5e-4, 4096),
                                             ("imagenet/mocov3_vit_s_300ep_bs1024", 1.5e-4, 1024)])
def test_recipes_carry_the_published_settings(recipe: str, lr: float, batch: int) -> None:
    from contrastlab.config.derived import derive

    cfg = load_config(recipe)
    assert cfg.optim.lr == lr and cfg.data.batch_size == batch and cfg.optim.base_batch_size == 256
    assert derive(cfg, 1, 1_281_167).lr == pytest.approx(lr * batch / 256)
    assert cfg.train.ema_schedule == "cosine" and cfg.model.sync_bn
    vit = "vit" in recipe
    assert cfg.method.params["temperature"] == (0.2 if vit else 1.0)
    assert cfg.views.params["scale"] == ([0.08, 1.0] if vit else [0.2, 1.0])
    assert cfg.optim.name == ("adamw" if vit else "lars") and cfg.optim.warmup_epochs == (40 if vit else 10)
    assert cfg.linear.epochs == 90 and cfg.linear.batch_size == 1024 and cfg.linear.lr == (12.0 if vit else 0.4)
