"""ContrastiveCrop, SimCCrop and SemanticCrop: box store, localiser and planners.

Every expectation is computed independently of the code under test: boxes from brute-force loops over a
bilinear upsampling written out here, centre fractions against a Beta CDF summed from its power series,
SemanticCrop's histogram against the density stated in its docstring, and the two-rank localisation
against a single-process run.
"""

from __future__ import annotations

import math
import os
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_ranks import start_ranks
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from contrastlab.errors import CheckpointError, ConfigError
from contrastlab.models import build_backbone
from contrastlab.views import sample_resized_crop, validate_box
from contrastlab.views.box_store import BoxStore, ConstantBox
from contrastlab.views.localiser import (
    boxes_from_heatmaps,
    heatmap,
    last_feature_map,
    localise,
)
from contrastlab.views.planners.contrastive_crop import (
    ALPHA_IMAGENET,
    ALPHA_SMALL,
    SIMCCROP_BOX,
    ContrastiveCropPlanner,
    SimCCropPlanner,
    place_crop,
    sample_beta,
)
from contrastlab.views.planners.semantic_crop import (
    SemanticCropPlanner,
    sample_suppressed_fraction,
    semantic_centre_density,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks on 2 shared cores: a second thread only contends


# ----------------------------------------------------------------------------- independent references


def beta_cdf(x: np.ndarray, a: float) -> np.ndarray:
    """CDF of Beta(a, a): the power series of the incomplete beta integral, mirrored above 1/2."""
    x = np.asarray(x, dtype=np.float64)
    low = np.minimum(x, 1.0 - x)
    log_b = 2 * math.lgamma(a) - math.lgamma(2 * a)
    total = np.zeros_like(low)
    coef = 1.0  # (1 - a)_n / n!
    for n in range(200):
        total += coef * low ** (a + n) / (a + n)
        coef *= (n + 1 - a) / (n + 1)
    cdf_low = total / math.exp(log_b)
    return np.where(x <= 0.5, cdf_low, 1.0 - cdf_low)


def ks_statistic(samples: np.ndarray, cdf) -> float:
    xs = np.sort(samples)
    n = len(xs)
    f = cdf(xs)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def suppressed_cdf(u: np.ndarray, s: float) -> np.ndarray:
    """CDF of the stated SemanticCrop density f_s(u) = (1 - s) + 2 s |2u - 1|."""
    u = np.asarray(u, dtype=np.float64)
    low = np.minimum(u, 1.0 - u)
    f_low = (1 - s) * low + s * (2 * low - 2 * low**2)
    return np.where(u <= 0.5, f_low, 1.0 - f_low)


def bilinear_upsample(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), one output pixel at a time."""
    h, w = m.shape
    out = np.zeros((height, width))
    for i in range(height):
        sy = max((i + 0.5) * h / height - 0.5, 0.0)
        y0 = min(math.floor(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(width):
            sx = max((j + 0.5) * w / width - 0.5, 0.0)
            x0 = min(math.floor(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = m[y0, x0] * (1 - fx) + m[y0, x1] * fx
            bottom = m[y1, x0] * (1 - fx) + m[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def brute_force_box(m: np.ndarray, height: int, width: int, threshold: float) -> list[float]:
    lo, hi = m.min(), m.max()
    up = bilinear_upsample((m - lo) / (hi - lo), height, width)
    hits = [(i, j) for i in range(height) for j in range(width) if up[i, j] > threshold]
    rows, cols = [i for i, _ in hits], [j for _, j in hits]
    return [min(cols) / width, min(rows) / height, (max(cols) + 1) / width, (max(rows) + 1) / height]


# ----------------------------------------------------------------------------- localiser


def test_blob_at_feature_resolution_gives_its_box() -> None:
    fmap = torch.zeros(2, 5, 8, 8)
    fmap[0, :, 2:5, 3:7] = 1.0  # rows 2..4, columns 3..6
    fmap[1, 2, 6:8, 0:1] = 3.0  # bottom-left corner
    boxes = boxes_from_heatmaps(heatmap(fmap), input_size=8, threshold=0.5)
    assert boxes.tolist() == [[3 / 8, 2 / 8, 7 / 8, 5 / 8], [0.0, 6 / 8, 1 / 8, 1.0]]


@pytest.mark.parametrize("threshold", [0.1, 0.35, 0.7])
def test_upsampled_blob_matches_brute_force(threshold: float) -> None:
    g = torch.Generator().manual_seed(0)
    fmap = 0.05 * torch.rand(1, 3, 5, 4, generator=g, dtype=torch.float64)
    fmap[0, :, 1:3, 2] += 1.0  # a blob on rows 1-2, column 2
    fmap[0, 0, 4, 0] += 0.6  # a weaker second blob
    maps = heatmap(fmap)
    got = boxes_from_heatmaps(maps, input_size=(13, 17), threshold=threshold)[0].tolist()
    want = brute_force_box(fmap[0].sum(0).numpy(), 13, 17, threshold)
    assert got == pytest.approx(want, abs=1e-6)  # float32 boxes; a one-pixel error would be >= 1/17


def test_mean_similarity_heatmap_is_cosine_to_pooled_feature() -> None:
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    got = heatmap(fmap, kind="mean_similarity")
    for b in range(2):
        f = fmap[b].numpy().reshape(6, -1)  # [C, h*w]
        mean = f.mean(1)
        cos = np.array([v @ mean / np.linalg.norm(v) / np.linalg.norm(mean) for v in f.T])
        want = (cos - cos.min()) / (cos.max() - cos.min())
        np.testing.assert_allclose(got[b].numpy().reshape(-1), want, atol=1e-6)


@pytest.mark.parametrize("kind", ["channel_sum", "mean_similarity"])
@pytest.mark.parametrize("value", [0.0, 1.0, -3.5, float("nan"), float("inf")])
def test_constant_or_broken_maps_give_the_whole_image(kind: str, value: float) -> None:
    fmap = torch.full((3, 4, 5, 5), value)
    if value == 1.0:
        fmap[1] += 1e-9 * torch.randn(4, 5, 5)  # float noise on a constant map is still constant
    if math.isnan(value):
        fmap[2] = torch.rand(4, 5, 5)
        fmap[2, 0, 0, 0] = value  # one broken value in an otherwise fine map
    maps = heatmap(fmap, kind)
    boxes = boxes_from_heatmaps(maps, input_size=20, threshold=0.1)
    assert not torch.isnan(maps).any() and not torch.isnan(boxes).any()
    assert boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3


def test_bad_threshold_and_kind_raise() -> None:
    with pytest.raises(ConfigError):
        boxes_from_heatmaps(torch.rand(1, 4, 4), 8, threshold=1.0)
    with pytest.raises(ConfigError):
        heatmap(torch.rand(1, 2, 4, 4), kind="gradcam")


class Staged(nn.Module):
    """A minimal staged network: declares its stages like every zoo backbone."""

    stage_spec = (("stem", ("conv",)), ("tail", ("act",)), ("pool", ("avgpool", "flatten")))
    upstream_shared_until = "stem"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.act(self.conv(x))), 1)


@pytest.mark.parametrize(
    ("name", "kw"), [("resnet20", {"width": 0.25}), ("resnet18", {"cifar_stem": True}), ("wrn_16_2", {})]
)
def test_last_feature_map_is_the_map_the_backbone_pools(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    net, dim = build_backbone(name, **kw)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fmap = last_feature_map(net)(x)
        assert fmap.dim() == 4 and fmap.shape[1] == dim
        torch.testing.assert_close(fmap.mean((2, 3)), net(x))
    if name == "resnet18":  # torchvision: everything before avgpool, written out by hand
        with torch.no_grad():
            y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            y = net.layer4(net.layer3(net.layer2(net.layer1(y))))
        torch.testing.assert_close(fmap, y)


def test_last_feature_map_uses_declared_stages_and_rejects_unstaged_nets() -> None:
    net = Staged()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(last_feature_map(net)(x), net.act(net.conv(x)))
    with pytest.raises(ConfigError):
        last_feature_map(nn.Sequential(nn.Conv2d(3, 3, 1)))


class BlobImages(Dataset):
    """Images with one bright rectangle each; yields (image, label, index) with a permuted index."""

    def __init__(self, rects: list[tuple[int, int, int, int]], size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = 0.01 * torch.rand(len(rects), 3, size, size, generator=g)
        for k, (x0, y0, x1, y1) in enumerate(rects):
            self.images[k, :, y0:y1, x0:x1] += 1.0
        self.order = list(reversed(range(len(rects))))  # position p holds the sample with index order[p]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, p: int) -> tuple[torch.Tensor, int, int]:
        index = self.order[p]
        return self.images[index], 0, index


class Identity4(nn.Module):
    """'Feature extractor' whose last feature map is the image itself; records its mode when called."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


def test_localise_single_process_orders_by_index_and_restores_modes() -> None:
    rects = [(2, 3, 6, 9), (0, 0, 16, 4), (10, 12, 16, 16), (5, 5, 6, 6)]
    data = BlobImages(rects)
    extractor = Identity4()
    extractor.train()
    extractor.bn.eval()  # a submodule in its own mode must come back in it
    table = localise(extractor, data, threshold=0.5, batch_size=3)
    assert table.tolist() == [[x0 / 16, y0 / 16, x1 / 16, y1 / 16] for x0, y0, x1, y1 in rects]
    assert extractor.modes == [False, False]
    assert extractor.training and not extractor.bn.training
    with pytest.raises(RuntimeError, match="not localised"):
        localise(extractor, torch.utils.data.Subset(data, [0, 1]), threshold=0.5, num_samples=4)


# ----------------------------------------------------------------------------- planners


def _store_with(box: tuple[float, float, float, float], n: int = 4) -> BoxStore:
    store = BoxStore(n)
    store.fill(torch.tensor([box]).repeat(n, 1))
    return store


EDGE_BOXES = [
    (0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.02, 0.02),
    (0.98, 0.97, 1.0, 1.0),
    (0.0, 0.9, 1.0, 1.0),
    (0.45, 0.0, 0.55, 1.0),
    (0.3, 0.3, 0.7, 0.7),
]
SHAPES = [(1, 1), (2, 7), (7, 2), (32, 32), (33, 17), (17, 96), (224, 160), (500, 375)]


@pytest.mark.parametrize("box", EDGE_BOXES)
def test_crops_always_lie_inside_the_image(box: tuple[float, float, float, float]) -> None:
    g = torch.Generator().manual_seed(3)
    store = _store_with(box)
    planners = [
        ContrastiveCropPlanner(store, alpha=0.1),
        ContrastiveCropPlanner(store, alpha=ALPHA_IMAGENET, scale=(0.08, 1.0), ratio=(0.5, 2.0), num_views=3),
        SemanticCropPlanner(store, suppression=1.0, push_apart=True, num_views=4),
        SemanticCropPlanner(store, suppression=0.3, push_apart=False),
        SimCCropPlanner(),
    ]
    for planner in planners:
        for width, height in SHAPES:
            for _ in range(10):
                boxes = planner.plan(0, width, height, g)
                assert len(boxes) == planner.num_views
                for b in boxes:
                    validate_box(b, width, height)
                    for side in (b[2] - b[0], b[3] - b[1]):  # whole-pixel crop sizes, sub-pixel positions
                        assert abs(side - round(side)) < 1e-9


def test_place_crop_is_the_nearest_feasible_position() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        length = int(rng.integers(1, 40))
        side = int(rng.integers(1, length + 1))
        centre = float(rng.uniform(-5, length + 5))
        box = place_crop(length, 10, side, 10, cx=centre, cy=5.0)
        candidates = np.linspace(0, length - side, 4001)  # every feasible left edge, finely
        best = candidates[np.argmin(np.abs(candidates + side / 2 - centre))]
        assert box[0] == pytest.approx(best, abs=(length - side) / 4000 + 1e-9)


def _centre_fractions(planner, n_plans: int, seed: int, size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Where each crop centre lies across the stored box (the store's float32 box, in pixels)."""
    g = torch.Generator().manual_seed(seed)
    bx0, by0, bx1, by1 = planner.store.box(0, size, size)
    fx, fy = [], []
    for _ in range(n_plans):
        for x0, y0, x1, y1 in planner.plan(0, size, size, g):
            fx.append(((x0 + x1) / 2 - bx0) / (bx1 - bx0))
            fy.append(((y0 + y1) / 2 - by0) / (by1 - by0))
    return np.array(fx), np.array(fy)


@pytest.mark.parametrize("alpha", [ALPHA_SMALL, ALPHA_IMAGENET, 2.0])
def test_centre_fractions_follow_beta_alpha(alpha: float) -> None:
    box = (0.4, 0.35, 0.6, 0.65)  # far from the edges; crops of at most ~52 px never need clamping
    planner = ContrastiveCropPlanner(_store_with(box), alpha=alpha, scale=(0.001, 0.002))
    fx, fy = _centre_fractions(planner, n_plans=1500, seed=11)
    critical = 1.95 / math.sqrt(len(fx))  # KS at the 0.1% level
    for f in (fx, fy):
        assert f.min() >= 0.0 and f.max() <= 1.0
        assert ks_statistic(f, lambda x: beta_cdf(x, alpha)) < critical
        for wrong in (alpha / 2, alpha * 2):  # the test can fail: a wrong alpha is rejected
            assert ks_statistic(f, lambda x, w=wrong: beta_cdf(x, w)) > 2 * critical
    assert abs(np.corrcoef(fx, fy)[0, 1]) < 0.05  # axes independent


@pytest.mark.parametrize(("a", "b"), [(2.5, 0.7), (0.05, 1.0)])
def test_sample_beta_moments(a: float, b: float) -> None:
    g = torch.Generator().manual_seed(13)
    x = np.array([sample_beta(a, b, g) for _ in range(20000)])
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert x.mean() == pytest.approx(mean, abs=4 * math.sqrt(var / len(x)))
    assert x.var() == pytest.approx(var, rel=0.05)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_whole_image_box_reaches_both_borders() -> None:
    """The upstream clamp never let a crop touch the bottom/right border; the fixed one is symmetric."""
    planner = ContrastiveCropPlanner(BoxStore(1), alpha=0.1)
    g = torch.Generator().manual_seed(5)
    touch = {"left": 0, "right": 0, "top": 0, "bottom": 0}
    n = 0
    for _ in range(1000):
        for x0, y0, x1, y1 in planner.plan(0, 32, 32, g):
            if x1 - x0 < 32 and y1 - y0 < 32:
                n += 1
                touch["left"] += round(x0) == 0
                touch["right"] += round(x1) == 32
                touch["top"] += round(y0) == 0
                touch["bottom"] += round(y1) == 32
    for near, far in (("left", "right"), ("top", "bottom")):
        assert touch[near] / n > 0.35 and touch[far] / n > 0.35
        assert abs(touch[near] - touch[far]) / n < 0.05


def test_disabled_store_gives_random_resized_crops() -> None:
    store = BoxStore(3, init_box=(0.4, 0.4, 0.6, 0.6), enabled=False)
    planners = (ContrastiveCropPlanner(store, scale=(0.3, 0.9)), SemanticCropPlanner(store, scale=(0.3, 0.9)))
    for planner in planners:
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        got = planner.plan(1, 48, 40, g1)
        want = [sample_resized_crop(48, 40, (0.3, 0.9), (3 / 4, 4 / 3), g2) for _ in range(2)]
        assert got == want


def test_simccrop_reads_the_central_half_box() -> None:
    planner = SimCCropPlanner()
    assert SIMCCROP_BOX == (0.25, 0.25, 0.75, 0.75)
    assert planner.store.box(123, 64, 32) == (16.0, 8.0, 48.0, 24.0)
    assert planner.alpha == ALPHA_SMALL and planner.scale == (0.2, 1.0)
    constant = ContrastiveCropPlanner(ConstantBox(SIMCCROP_BOX), scale=(0.0001, 0.0002))
    fx, fy = _centre_fractions(constant, 300, seed=2)
    assert fx.min() >= 0 and fx.max() <= 1 and fy.min() >= 0 and fy.max() <= 1


@pytest.mark.parametrize("suppression", [0.0, 0.6, 1.0])
def test_semantic_centre_density_matches_the_stated_density(suppression: float) -> None:
    box = (0.4, 0.4, 0.6, 0.6)
    store = _store_with(box)
    planner = SemanticCropPlanner(store, suppression=suppression, push_apart=False, scale=(0.001, 0.002))
    fx, fy = _centre_fractions(planner, n_plans=2000, seed=21)
    u = np.concatenate([fx, fy])
    n = len(u)
    # Stated density f_s(u) = (1 - s) + 2 s |2u - 1|: its bin averages are 1 - 0.9 s over [0.45, 0.55]
    # (the box centre) and 1 + 0.9 s over [0, 0.05] and [0.95, 1] (the box edges).
    centre = np.mean((u >= 0.45) & (u < 0.55)) / 0.1
    edges = np.mean((u < 0.05) | (u >= 0.95)) / 0.1
    tol = 4 * math.sqrt(1.9 * 0.1 / n) / 0.1  # four standard errors of a bin density
    assert centre == pytest.approx(1 - 0.9 * suppression, abs=tol)
    assert edges == pytest.approx(1 + 0.9 * suppression, abs=tol)
    assert edges - centre == pytest.approx(1.8 * suppression, abs=2 * tol)
    # Whole histogram against the stated CDF (chi-square, 10 bins, 9 dof; 0.1% critical value 27.9).
    cuts = np.linspace(0, 1, 11)
    expected = np.diff(suppressed_cdf(cuts, suppression)) * n
    observed = np.histogram(u, bins=cuts)[0]
    assert float(((observed - expected) ** 2 / expected).sum()) < 27.9


@pytest.mark.parametrize("suppression", [0.3, 0.8])
def test_suppressed_fraction_sampler_follows_the_stated_cdf(suppression: float) -> None:
    g = torch.Generator().manual_seed(31)
    u = np.array([sample_suppressed_fraction(suppression, g) for _ in range(40000)])
    critical = 1.95 / math.sqrt(len(u))  # KS at the 0.1% level
    assert ks_statistic(u, lambda x: suppressed_cdf(x, suppression)) < critical
    for wrong in (suppression - 0.15, suppression + 0.15):  # sharp enough to tell s from s +- 0.15
        assert ks_statistic(u, lambda x, w=wrong: suppressed_cdf(x, w)) > critical
    assert semantic_centre_density(0.5, suppression) == pytest.approx(1 - suppression)
    assert semantic_centre_density(0.0, suppression) == pytest.approx(1 + suppression)


def test_push_apart_puts_the_second_view_in_the_opposite_quadrant() -> None:
    box = (0.4, 0.4, 0.6, 0.6)
    s = 0.5
    store = _store_with(box)
    apart = SemanticCropPlanner(store, suppression=s, push_apart=True, scale=(0.001, 0.002), num_views=4)
    g = torch.Generator().manual_seed(8)
    bx0, by0, bx1, by1 = store.box(0, 1000, 1000)
    second = []
    for _ in range(1000):
        views = apart.plan(0, 1000, 1000, g)
        frac = [(((x0 + x1) / 2 - bx0) / (bx1 - bx0), ((y0 + y1) / 2 - by0) / (by1 - by0))
                for x0, y0, x1, y1 in views]
        for first, other in ((frac[0], frac[1]), (frac[2], frac[3])):
            for axis in (0, 1):
                assert (first[axis] < 0.5) != (other[axis] < 0.5)
            second.extend(other)
    assert ks_statistic(np.array(second), lambda x: suppressed_cdf(x, s)) < 1.95 / math.sqrt(len(second))
    together = SemanticCropPlanner(store, suppression=s, push_apart=False, scale=(0.001, 0.002))
    fx, _ = _centre_fractions(together, 800, seed=4)
    same_half = np.mean((fx[0::2] < 0.5) == (fx[1::2] < 0.5))
    assert 0.4 < same_half < 0.6  # without push_apart the halves are independent


def test_planner_validation() -> None:
    store = BoxStore(2)
    with pytest.raises(ConfigError):
        ContrastiveCropPlanner(store, alpha=0.0)
    with pytest.raises(ConfigError):
        ContrastiveCropPlanner(store, scale=(0.5, 0.2))
    with pytest.raises(ConfigError):
        ContrastiveCropPlanner(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        SemanticCropPlanner(store, suppression=1.5)
    with pytest.raises(ConfigError):
        BoxStore(3, init_box=(0.5, 0.0, 0.4, 1.0))
    with pytest.raises(ConfigError):
        ConstantBox((0.0, 0.0, 1.0, 1.5))


# ----------------------------------------------------------------------------- box store


def test_store_state_dict_round_trip_in_place() -> None:
    store = BoxStore(5, enabled=False)
    assert store.is_shared() and store.mean_area() == 1.0
    store.update(torch.tensor([1, 3]), torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.5, 1.0, 1.0]]))
    state = pickle.loads(pickle.dumps(store.state_dict()))  # what torch.save/torch.load carry
    assert store.mean_area() == pytest.approx((3 + 0.16 + 0.5) / 5)

    other = BoxStore(5)
    before = other.table.data_ptr()
    other.load_state_dict(state)
    assert torch.equal(other.table, store.table) and not other.enabled
    assert other.table.data_ptr() == before and other.is_shared()  # restored in place
    assert other.box(1, 200, 100) == pytest.approx((20.0, 20.0, 100.0, 60.0))

    with pytest.raises(CheckpointError):
        BoxStore(6).load_state_dict(state)
    with pytest.raises(CheckpointError):
        other.load_state_dict({"boxes": torch.tensor([[0.5, 0.0, 0.2, 1.0]]).repeat(5, 1)})
    with pytest.raises(ValueError):
        other.update([0], torch.tensor([[0.0, 0.0, 1.0, 1.1]]))
    with pytest.raises(IndexError):
        other.update([5], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_spawned_workers_receive_the_shared_table() -> None:
    """Spawned workers get the dataset through torch's ForkingPickler: the table travels by handle.

    (A real spawn-context DataLoader passes the same way but costs a fresh interpreter importing torch.)
    """
    store = BoxStore(4)
    received = pickle.loads(ForkingPickler.dumps(ContrastiveCropPlanner(store))).store
    store.update([2], torch.tensor([[0.25, 0.5, 0.75, 1.0]]))
    store.set_enabled(False)
    assert received.box(2, 4, 4) == (1.0, 2.0, 3.0, 4.0) and not received.enabled


def test_planners_pickle_with_their_store() -> None:
    store = BoxStore(3, init_box=(0.25, 0.25, 0.5, 0.75))
    planner = pickle.loads(pickle.dumps(SemanticCropPlanner(store, suppression=0.2)))
    assert planner.suppression == 0.2 and planner.store.box(2, 4, 4) == (1.0, 1.0, 2.0, 3.0)
    assert planner.store.is_shared()  # a plain copy is shared again, for workers forked later


class StoreProbe(Dataset):
    """Reports the worker's pid, the store's box and flag, and one planned crop."""

    def __init__(self, planner: ContrastiveCropPlanner) -> None:
        self.planner = planner

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, torch.Tensor]:
        store = self.planner.store
        crop = self.planner.plan(i, 100, 100)[0]
        return os.getpid(), torch.tensor(store.box(i, 100, 100)), store.enabled, torch.tensor(crop)


def test_persistent_workers_see_updated_boxes() -> None:
    store = BoxStore(8, enabled=False)
    planner = ContrastiveCropPlanner(store, alpha=0.1, scale=(0.0001, 0.0004))
    workers = 2
    loader = DataLoader(StoreProbe(planner), batch_size=None, num_workers=workers, persistent_workers=True)

    def epoch() -> tuple[set[int], torch.Tensor, list[bool], torch.Tensor]:
        items = list(loader)
        return (
            {p for p, *_ in items},
            torch.stack([b for _, b, _, _ in items]),
            [e for *_, e, _ in items],
            torch.stack([c for *_, c in items]),
        )

    pids, boxes, enabled, _ = epoch()
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 100.0, 100.0]]).repeat(8, 1)) and not any(enabled)

    # Localisation between epochs: in-place writes must reach the already-running workers.
    state = store.state_dict()
    store.fill(torch.tensor([[0.4, 0.4, 0.6, 0.6]]).repeat(8, 1))
    store.update([7], torch.tensor([[0.0, 0.0, 0.1, 0.1]]))
    store.set_enabled(True)
    pids2, boxes, enabled, crops = epoch()
    assert pids2 == pids and len(pids) == workers  # the same workers as before
    want = torch.tensor([[40.0, 40.0, 60.0, 60.0]]).repeat(8, 1)
    want[7] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    torch.testing.assert_close(boxes, want)
    assert all(enabled)
    centres = (crops[:, :2] + crops[:, 2:]) / 2
    assert ((centres[:7] >= 39) & (centres[:7] <= 61)).all() and (centres[7] <= 11).all()

    store.load_state_dict(state)  # resume: back to the saved table and flag
    pids3, boxes, enabled, _ = epoch()
    assert pids3 == pids and not any(enabled)
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 100.0, 100.0]]).repeat(8, 1))


# ----------------------------------------------------------------------------- DDP localisation

WORLD = 2
N_DDP = 7  # uneven: DistributedSampler pads one rank with a duplicate
THRESHOLD = 0.4


def _ddp_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(42)
    images = 0.1 * torch.randn(N_DDP, 3, 12, 12, generator=g)
    for k in range(N_DDP):  # a bright patch somewhere different in every image
        y, x = (3 * k) % 9, (5 * k) % 9
        images[k, :, y:y + 3, x:x + 4] += 2.0
    return images


class IndexedImages(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], 0, i


def _extractor() -> nn.Module:
    torch.manual_seed(0)
    net, _ = build_backbone("resnet20", width=0.25)
    return last_feature_map(net)


def _demo_views():
    """N_DDP demo images as whole-image evaluation views, and their device store (CPU tensors here)."""
    from contrastlab.data import build_dataset
    from contrastlab.data.device_images import DeviceImages
    from contrastlab.data.subsets import IndexedSubset
    from contrastlab.views import eval_view_dataset

    base = IndexedSubset(build_dataset("demo", None, "test"), range(N_DDP))
    views = eval_view_dataset(base, 28, (0.3,) * 3, (0.3,) * 3, crop_fraction=None)
    return views, DeviceImages.from_dataset(base, torch.device("cpu"))


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = IndexedImages(_ddp_images())
        extractor = _extractor()
        result = {
            "sharded": localise(extractor, data, THRESHOLD, batch_size=2),
            "sampler": localise(
                extractor,
                DataLoader(data, batch_size=3, sampler=DistributedSampler(data, shuffle=False)),
                THRESHOLD,
            ),
            "local": localise(extractor, data, THRESHOLD, batch_size=2, distributed=False),
        }
        from contrastlab.data.device_loader import DeviceEvalLoader

        views, store = _demo_views()  # each rank renders its strided share from the store, as the trainer does
        shard = DeviceEvalLoader(Subset(views, range(rank, N_DDP, WORLD)), torch.device("cpu"), 2, store)
        result["device"] = localise(extractor, shard, THRESHOLD, num_samples=N_DDP)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_localise_restores_dataset_order_on_every_rank(tmp_path: Path) -> None:
    start_ranks(_ddp_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    reference = localise(_extractor(), IndexedImages(_ddp_images()), THRESHOLD, batch_size=N_DDP)
    assert reference.shape == (N_DDP, 4)
    assert len({tuple(row) for row in reference.tolist()}) > 2  # the boxes differ between images
    for result in ranks:
        assert torch.equal(result["sharded"], result["local"])
        assert torch.equal(result["sampler"], result["local"])
        torch.testing.assert_close(result["sharded"], reference, atol=1e-6, rtol=0)
    assert torch.equal(ranks[0]["sharded"], ranks[1]["sharded"])
    assert torch.equal(ranks[0]["sampler"], ranks[1]["sampler"])
    views, _ = _demo_views()
    on_cpu = localise(_extractor(), views, THRESHOLD, batch_size=N_DDP)
    assert len({tuple(row) for row in on_cpu.tolist()}) > 2
    for result in ranks:
        torch.testing.assert_close(result["device"], on_cpu, atol=1e-6, rtol=0)
