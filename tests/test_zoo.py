"""The MCL architecture zoo, staged networks and peer cohorts (Yang et al., AAAI 2022; github.com/winycg/MCL).

Parameter counts are compared with two independent sources: the architecture table of the MCL release (to the
rounding it shows) and the exact counts of the upstream implementation (winycg/MCL, models/*.py at HEAD:
``sum(p.numel())`` of ``<factory>(num_classes, number_net)``, which includes the fc of every peer).
Counts need no forward pass; forwards use 2 images of 32x32 (16x16 for backward passes).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.models import (
    BACKBONES,
    Cohort,
    build_backbone,
    build_cohort,
    momentum_copy,
    named_stages,
    run_stages,
    stage_names,
    upstream_shared_until,
)
from contrastlab.models.cifar_resnet import BasicBlock, Bottleneck

CIFAR_ARCHS = [
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet110_basic",
    "wrn_16_2",
    "wrn_40_2",
    "wrn_28_4",
    "shufflenetv2_05x",
    "shufflenetv2_1x",
    "hcgnet_a1",
    "hcgnet_a2",
]
IMAGENET_ARCHS = ["resnet18", "resnet34"]

FEATURE_DIM = {
    "resnet32": 64,
    "resnet56": 64,
    "resnet110": 256,  # Bottleneck: 64 * expansion 4
    "resnet110_basic": 64,
    "wrn_16_2": 128,
    "wrn_40_2": 128,
    "wrn_28_4": 256,
    "shufflenetv2_05x": 1024,
    "shufflenetv2_1x": 1024,
    "hcgnet_a1": 414,
    "hcgnet_a2": 716,
    "resnet18": 512,
    "resnet34": 512,
}

# The MCL release's table: (single, M=2 independent, M=4 shared trunk), as printed. "x2" means twice the single
# count. The table counts a 100-class fc per peer for CIFAR; its ImageNet ResNet numbers (11.69M =
# torchvision's ResNet-18) are those of the 1000-class ImageNet fc, so the ImageNet rows use 1000.
TABLE = {
    "resnet32": ("0.47M", "0.95M", "1.82M"),
    "resnet56": ("0.86M", "1.72M", "3.32M"),
    "resnet110": ("1.17M", "2.34M", "4.52M"),
    "wrn_16_2": ("0.70M", "x2", "2.71M"),
    "wrn_40_2": ("2.26M", "x2", "8.70M"),
    "wrn_28_4": ("5.87M", "x2", "22.7M"),
    "shufflenetv2_05x": ("0.44M", "0.89M", "1.75M"),
    "shufflenetv2_1x": ("1.36M", "2.71M", "5.33M"),
    "resnet18": ("11.69M", "23.4M", "44.7M"),
    "resnet34": ("21.80M", "43.6M", "83.1M"),
}
CLASSES = {"resnet18": 1000, "resnet34": 1000}  # others: 100

# Exact counts of the upstream implementation (single, M=2 via *_n, M=4 via *_b), fc included.
UPSTREAM_EXACT = {
    "resnet32": (472756, 945512, 1819552),
    "resnet56": (861620, 1723240, 3318944),
    "resnet110": (1170868, 2341736, 4517344),
    "wrn_16_2": (703284, 1406568, 2712864),
    "wrn_40_2": (2255156, 4510312, 8697632),
    "wrn_28_4": (5872180, 11744360, 22679776),
    "shufflenetv2_05x": (444292, 888584, 1754272),
    "shufflenetv2_1x": (1356104, 2712208, 5331752),
    "hcgnet_a1": (1102651, 2205302, 4057426),
    "hcgnet_a2": (3133679, 6267358, 11169209),
    "resnet18": (11689512, 23379024, 44708832),
    "resnet34": (21797672, 43595344, 83146976),
}

STAGES = {
    "resnet32": ["stem", "layer1", "layer2", "layer3", "pool"],
    "wrn_16_2": ["stem", "block1", "block2", "block3", "norm", "pool"],
    "shufflenetv2_05x": ["stem", "layer1", "layer2", "layer3", "conv5", "pool"],
    "hcgnet_a1": ["stem", "block1", "trans1", "block2", "trans2", "block3", "norm", "pool"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"],
}
UPSTREAM_SPLIT = {"resnet32": "layer1", "wrn_16_2": "block1", "shufflenetv2_05x": "layer1",
                  "hcgnet_a1": "trans1", "resnet18": "layer2"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: a second thread only contends


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() lists a shared tensor once


@functools.cache
def _counts(arch: str) -> tuple[int, int, int]:
    """(single, M=2 independent, M=4 upstream shared trunk), each with a fc per peer.

    The ImageNet ResNets are built on the meta device (shapes only: no memory, no initialisation cost).
    """
    with torch.device("meta" if arch in IMAGENET_ARCHS else "cpu"):
        net, dim = build_backbone(arch)
        independent = _numel(build_cohort(arch, 2))
        shared = _numel(build_cohort(arch, 4, shared_until="upstream"))
    fc = dim * CLASSES.get(arch, 100) + CLASSES.get(arch, 100)
    return _numel(net) + fc, independent + 2 * fc, shared + 4 * fc


def _matches(count: int, printed: str) -> bool:
    """``count`` rounds to ``printed`` (e.g. "0.47M") at the number of decimals shown."""
    digits = printed[:-1].split(".")
    decimals = len(digits[1]) if len(digits) == 2 else 0
    return f"{count / 1e6:.{decimals}f}" == printed[:-1]


@pytest.mark.parametrize("arch", list(TABLE))
def test_param_counts_match_mcl_table(arch: str) -> None:
    single, independent, shared = _counts(arch)
    printed_single, printed_two, printed_four = TABLE[arch]
    assert _matches(single, printed_single), (single, printed_single)
    if printed_two == "x2":
        assert independent == 2 * single
    else:
        assert _matches(independent, printed_two), (independent, printed_two)
    assert _matches(shared, printed_four), (shared, printed_four)


@pytest.mark.parametrize("arch", ["hcgnet_a1", "hcgnet_a2"])
def test_hcgnet_param_counts_match_readme(arch: str) -> None:
    # winycg/HCGNet README: 1.1M (A1) and 3.1M (A2) with a 100-class fc, printed to 0.1M. Tolerance:
    # that rounding, +-0.05M. the table gives no cohort counts ("-"), so those are checked by structure:
    # two independent nets, and trunk + 4 branches with the trunk measured on a fresh network.
    single, independent, shared = _counts(arch)
    assert abs(single / 1e6 - {"hcgnet_a1": 1.1, "hcgnet_a2": 3.1}[arch]) <= 0.05
    assert independent == 2 * single
    net, _ = build_backbone(arch)
    stages = dict(named_stages(net))
    trunk = sum(_numel(stages[s]) for s in ("stem", "block1", "trans1"))
    assert shared == trunk + 4 * (single - trunk)


@pytest.mark.parametrize("arch", list(UPSTREAM_EXACT))
def test_param_counts_equal_upstream_exactly(arch: str) -> None:
    assert _counts(arch) == UPSTREAM_EXACT[arch]


def test_every_zoo_name_is_registered() -> None:
    assert set(CIFAR_ARCHS + IMAGENET_ARCHS) <= set(BACKBONES)


@pytest.mark.parametrize("arch", CIFAR_ARCHS + IMAGENET_ARCHS)
def test_feature_dim_and_staged_forward(arch: str) -> None:
    torch.manual_seed(0)
    net, dim = build_backbone(arch)
    assert dim == FEATURE_DIM[arch]
    stages = named_stages(net)
    # The stages partition the parameters: each one belongs to exactly one stage.
    ids = [id(p) for _, stage in stages for p in stage.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        staged = x
        for _, stage in stages:
            staged = stage(staged)
        by_name = run_stages(net, x)
    assert out.shape == (2, dim)
    assert torch.allclose(staged, out, atol=1e-6) and torch.allclose(by_name, out, atol=1e-6)


@pytest.mark.parametrize("arch", list(STAGES))
def test_stage_names_and_upstream_split(arch: str) -> None:
    net, _ = build_backbone(arch)
    assert stage_names(net) == STAGES[arch]
    assert upstream_shared_until(net) == UPSTREAM_SPLIT[arch]
    assert build_cohort(arch, 1, shared_until="upstream").shared_until == UPSTREAM_SPLIT[arch]


def test_resnet110_is_the_bottleneck_variant() -> None:
    bottleneck, dim = build_backbone("resnet110")
    blocks = [m for m in bottleneck.modules() if isinstance(m, Bottleneck)]
    assert dim == 256 and len(blocks) == 36
    assert not any(isinstance(m, BasicBlock) for m in bottleneck.modules())
    layers = (bottleneck.layer1, bottleneck.layer2, bottleneck.layer3)
    assert [len(layer) for layer in layers] == [12, 12, 12]
    assert [layer[0].conv3.out_channels for layer in layers] == [64, 128, 256]
    basic, dim = build_backbone("resnet110_basic")
    assert dim == 64 and sum(isinstance(m, BasicBlock) for m in basic.modules()) == 54  # (110 - 2) / 2


def _conv_std(conv: nn.Conv2d) -> float:
    return conv.weight.detach().std().item()


def test_initialisation_rules() -> None:
    # The release's initialisation: Kaiming normal (fan_out) for ResNets and WRN, PyTorch defaults for ShuffleNetV2.
    torch.manual_seed(0)
    wrn, _ = build_backbone("wrn_28_4")
    conv = wrn.block3[1].conv2  # 256 -> 256, 3x3: 590k samples
    assert _conv_std(conv) == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
    resnet, _ = build_backbone("resnet110")
    conv = resnet.layer3[1].conv3  # 64 -> 256, 1x1: fan_out 256
    assert _conv_std(conv) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert torch.all(resnet.layer3[1].bn3.weight == 1) and torch.all(resnet.layer3[1].bn3.bias == 0)
    shuffle, _ = build_backbone("shufflenetv2_1x")
    # PyTorch default: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert _conv_std(shuffle.conv5) == pytest.approx(1 / math.sqrt(464) / math.sqrt(3), rel=0.02)
    assert shuffle.conv5.weight.abs().max().item() <= 1 / math.sqrt(464)


def test_zero_init_residual_makes_blocks_identities() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    wrn, _ = build_backbone("wrn_16_2", zero_init_residual=True)
    resnet, _ = build_backbone("resnet110", width=0.5, zero_init_residual=True)
    wrn.eval()
    resnet.eval()
    with torch.no_grad():
        assert torch.equal(wrn.block1[1](x), x)  # pre-activation: no ReLU after the sum
        assert torch.equal(resnet.layer1[1](x), torch.relu(x))  # 32 = 4 * 8 channels


# Backward passes on 16x16 inputs keep the cost low; the ImageNet stem brings them to 1x1 in layer4.
GRAD_CASES = [
    ("resnet32", 3, {"width": 0.25}),
    ("wrn_16_2", 2, {}),
    ("shufflenetv2_05x", 2, {}),
    ("hcgnet_a1", 2, {}),
    ("resnet18", 2, {}),
]


@pytest.mark.parametrize(("arch", "num_peers", "kw"), GRAD_CASES)
def test_shared_trunk_gets_gradient_from_every_branch(arch: str, num_peers: int, kw: dict) -> None:
    torch.manual_seed(0)
    cohort = build_cohort(arch, num_peers, shared_until="upstream", **kw)
    trunk = cohort.trunk_parameters()
    assert trunk and all(p.numel() for p in trunk)
    x = torch.randn(2, 3, 16, 16)
    for i in range(num_peers):
        cohort.zero_grad(set_to_none=True)
        outputs = cohort(x)
        assert len(outputs) == num_peers and all(o.shape == (2, cohort.feature_dim) for o in outputs)
        outputs[i].pow(2).sum().backward()
        assert all(p.grad is not None for p in trunk)
        assert sum(p.grad.abs().sum().item() for p in trunk) > 0
        assert all(p.grad is not None for p in cohort.branch_parameters(i))
        for j in range(num_peers):
            if j != i:
                assert all(p.grad is None for p in cohort.branch_parameters(j)), (i, j)


def test_shared_trunk_structure_and_peer_modules() -> None:
    torch.manual_seed(0)
    cohort = build_cohort("resnet32", 3, shared_until="upstream", width=0.25)
    p0, p1, p2 = (cohort.peer(i) for i in range(3))
    assert p1.conv1 is p0.conv1 and p2.bn1 is p0.bn1 and p2.layer1 is p0.layer1
    assert p1.layer2 is not p0.layer2
    # Branches are initialised independently, not copies of one branch.
    assert not torch.equal(p0.layer2[0].conv1.weight, p1.layer2[0].conv1.weight)
    assert not torch.equal(p1.layer3[0].conv1.weight, p2.layer3[0].conv1.weight)
    # peer(i) is a plain backbone of its family with the backbone's parameter names.
    single, _ = build_backbone("resnet32", width=0.25)
    assert type(p1) is type(single) and list(p1.state_dict()) == list(single.state_dict())
    cohort.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = cohort(x)
        for i in range(3):
            assert torch.allclose(outputs[i], cohort.peer(i)(x), atol=1e-6)
    # A deep copy (e.g. a momentum encoder) keeps the sharing among its own modules.
    target = momentum_copy(cohort)
    assert target.peer(1).conv1 is target.peer(0).conv1 and target.peer(0).conv1 is not p0.conv1
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(target(x), outputs, strict=True))
        p0.conv1.weight.add_(1.0)  # the copy runs its own trunk, not the original's
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(target(x), outputs, strict=True))


def test_shared_trunk_survives_sync_bn_conversion() -> None:
    cohort = build_cohort("resnet32", 2, shared_until="upstream", width=0.25)
    before = {id(p) for p in cohort.trunk_parameters()}
    cohort = nn.SyncBatchNorm.convert_sync_batchnorm(cohort)
    bn = cohort.peer(0).bn1
    assert isinstance(bn, nn.SyncBatchNorm) and cohort.peer(1).bn1.weight is bn.weight
    assert {id(p) for p in cohort.trunk_parameters()} == before
    calls: list[int] = []
    bn.register_forward_hook(lambda *_: calls.append(1))
    cohort.eval()  # SyncBatchNorm needs a process group only in training
    with torch.no_grad():
        cohort(torch.randn(2, 3, 16, 16))
    assert calls == [1]  # the trunk ran once, on the converted module


def test_independent_peers_share_nothing() -> None:
    torch.manual_seed(0)
    cohort = build_cohort("resnet32", 4, width=0.25)  # four peers: sharing is still off
    assert cohort.shared_until is None and cohort.trunk_parameters() == []
    ids = [{id(p) for p in cohort.peer(i).parameters()} for i in range(4)]
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
    assert not torch.equal(cohort.peer(0).conv1.weight, cohort.peer(1).conv1.weight)
    assert not torch.equal(cohort.peer(2).layer3[0].conv1.weight, cohort.peer(3).layer3[0].conv1.weight)
    single, _ = build_backbone("resnet32", width=0.25)
    assert _numel(cohort) == 4 * _numel(single)
    cohort.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = cohort(x)
        assert all(torch.allclose(o, cohort.peer(i)(x)) for i, o in enumerate(outputs))
    assert not torch.allclose(outputs[0], outputs[1])


def test_every_split_point_counts_trunk_once() -> None:
    single, _ = build_backbone("resnet32", width=0.25)
    stages = named_stages(single)
    for k, (name, _) in enumerate(stages[:-2]):  # after layer3 only "pool" (no parameters) would remain
        trunk = sum(_numel(stage) for _, stage in stages[: k + 1])
        cohort = build_cohort("resnet32", 3, shared_until=name, width=0.25)
        assert cohort.shared_until == name
        assert _numel(cohort) == trunk + 3 * (_numel(single) - trunk)
        assert sum(p.numel() for p in cohort.trunk_parameters()) == trunk


def test_cohort_attributes() -> None:
    cohort = build_cohort("wrn_16_2", 2, shared_until="block2")
    assert isinstance(cohort, Cohort)
    assert (cohort.num_peers, cohort.feature_dim, cohort.shared_until) == (2, 128, "block2")
    with pytest.raises(IndexError):
        cohort.peer(2)


def test_errors_name_valid_choices() -> None:
    with pytest.raises(ConfigError, match="resnet32") as excinfo:
        build_cohort("resnet33", 2)
    assert "hcgnet_a1" in str(excinfo.value)
    with pytest.raises(ConfigError, match="layer1") as excinfo:
        build_cohort("resnet32", 2, shared_until="layer4", width=0.25)
    assert "upstream" in str(excinfo.value)
    with pytest.raises(ConfigError, match="block1"):
        build_cohort("wrn_16_2", 2, shared_until="layer1")
    with pytest.raises(ConfigError, match="layer3"):  # sharing everything leaves the peers nothing
        build_cohort("resnet32", 2, shared_until="pool", width=0.25)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="num_peers"):
            build_cohort("resnet32", bad, width=0.25)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="zero_init_residual"):
        build_backbone("hcgnet_a1", zero_init_residual=True)
    with pytest.raises(ConfigError, match="dropout"):
        build_backbone("resnet32", dropout=0.1)
    net, _ = build_backbone("resnet32", width=0.25)
    with pytest.raises(ConfigError, match="separately built"):
        Cohort([net, net], 16)
    with pytest.raises(ConfigError, match="declares no stages"):
        Cohort([nn.Linear(2, 2), nn.Linear(2, 2)], 2, shared_until="upstream")
