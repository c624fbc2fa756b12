"""Backbones, heads and EMA against their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.models import build_backbone, build_mlp, copy_params_, ema_update_, momentum_copy
from contrastlab.models.cifar_resnet import BasicBlock


@pytest.mark.parametrize(
    ("name", "dim", "kw"),
    [
        ("resnet18", 512, {}),
        ("resnet34", 512, {}),
        ("resnet50", 2048, {}),
        ("resnet20", 64, {}),
        ("resnet32", 32, {"width": 0.5}),
        ("resnet56", 16, {"width": 0.25}),
    ],
)
def test_backbone_shapes(name: str, dim: int, kw: dict) -> None:
    net, feature_dim = build_backbone(name, **kw)
    assert feature_dim == dim
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim)


def test_cifar_stem() -> None:
    net, _ = build_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3)
    assert net.conv1.stride == (1, 1)
    assert net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    # Without the 4x downsampling of the ImageNet stem, a 16x16 input keeps 2x2 maps before pooling.
    feats: dict[str, torch.Size] = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        feats["layer4"] = output.shape

    net.layer4.register_forward_hook(record)
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16))
    assert feats["layer4"][-2:] == (2, 2)
    plain, _ = build_backbone("resnet18")
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)


def _cifar_resnet_param_count(n: int, widths: tuple[int, int, int]) -> int:
    """Parameters of a CIFAR ResNet with projection shortcuts, counted from the architecture by hand."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:
        return 2 * c

    total = conv(3, widths[0], 3) + bn(widths[0])
    cin = widths[0]
    for cout in widths:
        for _ in range(n):
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total


@pytest.mark.parametrize(
    ("name", "n", "width"), [("resnet20", 3, 1.0), ("resnet32", 5, 1.0), ("resnet20", 3, 0.5)]
)
def test_cifar_resnet_structure(name: str, n: int, width: float) -> None:
    net, _ = build_backbone(name, width=width)
    widths = tuple(int(c * width) for c in (16, 32, 64))
    assert sum(p.numel() for p in net.parameters()) == _cifar_resnet_param_count(n, widths)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 * n
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2  # first block of stages 2 and 3
    for b in projections:
        assert b.shortcut[0].kernel_size == (1, 1) and b.shortcut[0].stride == (2, 2)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)


def test_resnet20_known_size() -> None:
    # He et al. report 0.27M parameters for ResNet-20 (option-A shortcuts, 10-class fc): 269,722 exactly.
    # Drop the fc (64 * 10 + 10) and add the two 1x1 projections with BN (16->32, 32->64).
    net, _ = build_backbone("resnet20")
    assert sum(p.numel() for p in net.parameters()) == 269722 - 650 + (512 + 64) + (2048 + 128)


def test_zero_init_residual() -> None:
    net, _ = build_backbone("resnet20", width=0.25, zero_init_residual=True)
    for m in net.modules():
        if isinstance(m, BasicBlock):
            assert torch.all(m.bn2.weight == 0)
    tv, _ = build_backbone("resnet18", zero_init_residual=True)
    assert torch.all(tv.layer1[0].bn2.weight == 0)


def test_unknown_backbone_and_kwarg() -> None:
    with pytest.raises(ConfigError, match="resnet18") as excinfo:
        build_backbone("resnet19")
    assert "resnet56" in str(excinfo.value)
    with pytest.raises(ConfigError, match="width"):
        build_backbone("resnet18", width=2)
    with pytest.raises(ConfigError, match="depth_multiplier"):
        build_backbone("resnet20", depth_multiplier=2)


def test_build_mlp_structure() -> None:
    mlp = build_mlp(8, 16, 4, num_layers=3, last_bn=True, last_bn_affine=False)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    assert all(m.bias is None for m in linears)  # every Linear is followed by BN
    assert mlp[-1].weight is None and mlp[-1].bias is None  # no affine on the output BN

    two = build_mlp(8, 16, 4, num_layers=2)
    assert [type(m).__name__ for m in two] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert two[0].bias is None and two[-1].bias is not None

    no_bn = build_mlp(8, 16, 4, num_layers=2, hidden_bn=False, bias=False)
    assert [type(m).__name__ for m in no_bn] == ["Linear", "ReLU", "Linear"]
    assert no_bn[0].bias is None and no_bn[-1].bias is None

    one = build_mlp(8, 16, 4, num_layers=1)
    assert len(one) == 1 and isinstance(one[0], nn.Linear) and one[0].in_features == 8
    assert build_mlp(8, 16, 4, num_layers=2)(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ValueError):
        build_mlp(8, 16, 4, num_layers=0)


def test_ema_update_formula() -> None:
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    online = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expected = [0.9 * t + 0.1 * o for t, o in zip(target, online)]
    ema_update_(target, online, 0.9)
    for t, e in zip(target, expected):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-6)
    ema_update_(target, online, 0.0)
    for t, o in zip(target, online):
        assert torch.equal(t, o)


def test_ema_on_parameters_and_copy() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    copy_params_(target.parameters(), online.parameters())
    assert torch.equal(target.weight, online.weight)
    with torch.no_grad():
        online.weight.add_(1.0)
    before = target.weight.detach().clone()
    ema_update_(target.parameters(), online.parameters(), 0.75)
    torch.testing.assert_close(target.weight, 0.75 * before + 0.25 * online.weight, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        ema_update_(target.parameters(), online.parameters(), 1.5)


def test_momentum_copy_has_no_grad() -> None:
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert target[0].weight.data_ptr() != online[0].weight.data_ptr()
    torch.testing.assert_close(target[0].weight, online[0].weight)
