"""Tests of JointCrop(beta) (Zhang et al., AAAI 2025) against independent computations: the log-ratio CDFs
derived here from the densities, the appendix's closed form for two independent crops (Eq. 5-10), a
restatement of the released ``JointCrop.get_params`` under the same RNG state, and box geometry.

Goodness of fit uses the one-sample Kolmogorov-Smirnov statistic D (no scipy in the venv): with n samples
from the hypothesised law, sqrt(n) D exceeds 1.95 with probability about 0.001, so ``KS_CRITICAL / sqrt(n)``
is the rejection threshold. All generators are seeded, so the tests are deterministic.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from contrastlab.errors import ConfigError
from contrastlab.views import (
    PLANNERS,
    JointCropPlanner,
    Planner,
    RandomResizedCropPlanner,
    area_ratio_statistics,
    box_area,
    box_to_pixels,
    log_area_ratio_bound,
    make_planner,
    sample_area_pair,
    sample_resized_crop,
    validate_box,
)

KS_CRITICAL = 1.95  # P(sqrt(n) D > 1.95) ~ 0.001 under the null (Kolmogorov distribution)
THREE_QUARTERS = (3 / 4, 4 / 3)


def ks_statistic(samples: list[float], cdf) -> float:
    """sup_x |F_n(x) - F(x)| for the empirical CDF F_n of ``samples``."""
    xs = sorted(samples)
    n = len(xs)
    d = 0.0
    for i, x in enumerate(xs):
        f = cdf(x)
        d = max(d, (i + 1) / n - f, f - i / n)
    return d


def ks_rejects(samples: list[float], cdf) -> bool:
    return math.sqrt(len(samples)) * ks_statistic(samples, cdf) > KS_CRITICAL


def phi_cdf(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def log_ratio_cdf(beta: float, bound: float):
    """CDF of r = log(s2 / s1) on [-L, L], derived from the densities of Algorithm 1.

    beta = 0: uniform. beta > 0: X ~ N(0, sigma^2) truncated to [-L, L], sigma = L / beta, so
    G(x) = (Phi(x / sigma) - Phi(-L / sigma)) / (Phi(L / sigma) - Phi(-L / sigma)). beta < 0: X as for |beta|,
    then Y = -L - X for X < 0 and Y = L - X for X >= 0, so for y < 0 P(Y <= y) = P(-L - y <= X < 0)
    = G(0) - G(-L - y), and for y >= 0 P(Y <= y) = P(X < 0) + P(X >= L - y) = G(0) + 1 - G(L - y).
    """
    if beta == 0:
        return lambda x: min(1.0, max(0.0, (x + bound) / (2 * bound)))
    sigma = bound / abs(beta)
    lo, hi = phi_cdf(-bound / sigma), phi_cdf(bound / sigma)

    def g(x: float) -> float:
        return (phi_cdf(x / sigma) - lo) / (hi - lo)

    if beta > 0:
        return lambda x: min(1.0, max(0.0, g(x)))
    return lambda y: min(1.0, max(0.0, g(0.0) - g(-bound - y) if y < 0 else g(0.0) + 1.0 - g(bound - y)))


def independent_ratio_cdf(smin: float, smax: float):
    """CDF of X = s1 / s2 for s1, s2 i.i.d. U[smin, smax]: the appendix's Eq. (5) for x <= 1, and
    P(X <= x) = 1 - P(1 / X < 1 / x) = 1 - F(1 / x) for x > 1 (X and 1 / X have the same law); the
    derivative of each branch is Eq. (8)."""

    def below_one(x: float) -> float:
        if x <= smin / smax:
            return 0.0
        return (smax**2 * x / 2 - smax * smin + smin**2 / (2 * x)) / (smax - smin) ** 2

    return lambda x: below_one(x) if x <= 1 else 1.0 - below_one(1 / x)


def appendix_eq9(x: float) -> float:
    """The appendix's Eq. (9): the CDF for smin = 0.2, smax = 1, as printed."""
    if x < 0.2:
        return 0.0
    if x <= 1:
        return 25 / 32 * x - 5 / 16 + 1 / (32 * x)
    return min(1.0, -x / 32 + 21 / 16 - 25 / (32 * x))


def side_bounds_ok(box, width: int, height: int, scale, ratio, slack: float = 1e-5) -> bool:
    """A box whose sides are round(sqrt(A a)), round(sqrt(A / a)) for some area fraction in ``scale`` and
    aspect ratio a in ``ratio``: each side is within 0.5 px of the exact one, so the exact area lies in
    [(w - 0.5)(h - 0.5), (w + 0.5)(h + 0.5)] (relative slack for the float32 target area)."""
    area = width * height
    w, h = box[2] - box[0], box[3] - box[1]
    return (
        (w + 0.5) * (h + 0.5) >= scale[0] * area * (1 - slack)
        and (w - 0.5) * (h - 0.5) <= scale[1] * area * (1 + slack)
        and (w + 0.5) / max(h - 0.5, 1e-9) >= ratio[0] * (1 - slack)
        and (w - 0.5) / (h + 0.5) <= ratio[1] * (1 + slack)
    )


# ----------------------------------------------------------------------------------- the log-ratio law


@pytest.mark.parametrize("beta", [-2.0, 0.0, 2.0])
def test_log_area_ratio_follows_density(beta):
    scale, epsilon = (0.2, 1.0), 0.1
    bound = math.log(scale[1] / scale[0] - epsilon)  # L = log(smax / smin - epsilon), in float64 here
    gen = torch.Generator().manual_seed(11)
    pairs = [sample_area_pair(beta, scale, epsilon, gen) for _ in range(6000)]
    logs = [p.log_ratio for p in pairs]
    assert max(abs(r) for r in logs) <= bound + 1e-6
    assert not ks_rejects(logs, log_ratio_cdf(beta, bound))
    for p in pairs:
        # Both areas inside [smin, smax] and second / first = exp(r) (float32 arithmetic).
        assert scale[0] * (1 - 1e-6) <= p.first <= scale[1] * (1 + 1e-6)
        assert scale[0] * (1 - 1e-6) <= p.second <= scale[1] * (1 + 1e-6)
        assert p.second / p.first == pytest.approx(math.exp(p.log_ratio), rel=1e-5)


def test_log_area_ratio_law_with_paper_bound():
    # epsilon = 0 is Algorithm 1's s_b = log(smax / smin); here with MoCo v2's scale (0.08, 1).
    bound = math.log(1.0 / 0.08)
    gen = torch.Generator().manual_seed(5)
    logs = [sample_area_pair(1.0, (0.08, 1.0), 0.0, gen).log_ratio for _ in range(4000)]
    assert not ks_rejects(logs, log_ratio_cdf(1.0, bound))
    # Strongly negative beta piles the mass on the edges, which epsilon = 0 lets reach log(12.5).
    edge = [sample_area_pair(-8.0, (0.08, 1.0), 0.0, gen) for _ in range(300)]
    assert max(abs(p.log_ratio) for p in edge) > bound - 0.02
    assert all(0.08 * (1 - 1e-6) <= a <= 1 + 1e-6 for p in edge for a in (p.first, p.second))


def test_goodness_of_fit_detects_a_wrong_beta():
    # The KS test above can fail: samples of one beta are rejected under the CDF of a nearby beta.
    bound = math.log(4.9)
    gen = torch.Generator().manual_seed(3)
    # Largest CDF gaps: 0.042 for beta 2 vs 1.5 (and -2 vs -1.5), 0.07 for 0 vs +-1.5; the threshold at
    # n = 5000 is 0.028.
    for true_beta, wrong_beta in [(2.0, 1.5), (-2.0, -1.5), (0.0, 1.5), (0.0, -1.5)]:
        logs = [sample_area_pair(true_beta, (0.2, 1.0), 0.1, gen).log_ratio for _ in range(5000)]
        assert ks_rejects(logs, log_ratio_cdf(wrong_beta, bound)), (true_beta, wrong_beta)
        assert not ks_rejects(logs, log_ratio_cdf(true_beta, bound)), true_beta


def test_bound_is_log_of_ratio_minus_epsilon():
    assert log_area_ratio_bound((0.2, 1.0), 0.1) == pytest.approx(math.log(4.9), abs=1e-6)
    assert log_area_ratio_bound((0.08, 1.0), 0.0) == pytest.approx(math.log(12.5), abs=1e-6)
    assert JointCropPlanner(scale=(0.5, 0.6), epsilon=0.2).log_ratio_bound == 0.0
    # A zero bound means equal areas, for every beta.
    gen = torch.Generator().manual_seed(0)
    for beta in (-3.0, 0.0, 3.0):
        p = sample_area_pair(beta, (0.5, 0.6), 0.2, gen)
        assert p.log_ratio == 0.0 and p.first == p.second


# ----------------------------------------------------------------------------------- boxes and areas


def released_joint_crop_params(width: int, height: int, scale, ratio) -> list[tuple[int, int, int, int]]:
    """The released ``JointCrop.get_params`` (github.com/btzyd/JointCrop, moco/loader.py), restated: on
    torch's global RNG, r ~ U[-L, L] with L = log(smax / smin - 0.1) in float32; the first area fraction
    uniform on [max(smin, smin / e^r), min(smax / e^r, smax)] times the image area, the second that times
    e^r; per view up to 10 log-uniform aspect ratios with the area fixed, then top and left; a view that
    never fits is the whole image. Returns (top, left, height, width) of both views."""
    log_aspect = torch.log(torch.tensor(ratio))
    bound = float(torch.log(torch.tensor(scale[1] / scale[0] - 0.1)))
    r = torch.empty(1).uniform_(-bound, bound)
    e_r = torch.exp(r).item()
    first = (width * height) * torch.empty(1).uniform_(max(scale[0], scale[0] / e_r), min(scale[1] / e_r, scale[1]))
    params = []
    for target in (first, first * e_r):
        for _ in range(10):
            aspect = torch.exp(torch.empty(1).uniform_(float(log_aspect[0]), float(log_aspect[1]))).item()
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                params.append((top, left, h, w))
                break
        else:
            params.append((0, 0, height, width))
    return params


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0)])
def test_beta_zero_equals_released_code(scale):
    planner = JointCropPlanner(beta=0.0, scale=scale)
    for seed in range(25):
        for width, height in [(224, 224), (500, 375), (64, 48), (1000, 12), (7, 9)]:
            torch.manual_seed(seed)
            expected = released_joint_crop_params(width, height, scale, THREE_QUARTERS)
            after = torch.rand(1)
            torch.manual_seed(seed)
            boxes = planner.plan(seed, width, height)
            assert [box_to_pixels(b) for b in boxes] == expected, (seed, width, height)
            assert torch.equal(torch.rand(1), after)  # same number of draws


def test_planner_draws_the_pair_of_sample_area_pair():
    # The planner's first step is sample_area_pair: with the same seed, each box has the drawn area
    # (ratio (1, 1) on a large square image: squares, no failed attempt, only rounding of the side).
    width = height = 2000
    for beta in (-2.0, 0.0, 2.0):
        planner = JointCropPlanner(beta=beta, ratio=(1.0, 1.0))
        for seed in range(30):
            pair = sample_area_pair(beta, planner.scale, planner.epsilon, torch.Generator().manual_seed(seed))
            b1, b2 = planner.plan(0, width, height, torch.Generator().manual_seed(seed))
            for box, fraction in ((b1, pair.first), (b2, pair.second)):
                side = box[2] - box[0]
                assert side == box[3] - box[1]
                assert abs(side - math.sqrt(fraction * width * height)) <= 0.5 + 1e-3


def test_planner_log_ratio_law_end_to_end():
    # log(area2 / area1) of the planned boxes on a large image follows the beta-0 law; the side rounding
    # (<= 0.5 px on sides >= 894 px) moves each log ratio by at most ~2e-3.
    planner = JointCropPlanner(beta=0.0, ratio=(1.0, 1.0))
    gen = torch.Generator().manual_seed(2)
    logs = []
    for _ in range(3000):
        b1, b2 = planner.plan(0, 2000, 2000, gen)
        logs.append(math.log(box_area(b2) / box_area(b1)))
    assert not ks_rejects(logs, log_ratio_cdf(0.0, math.log(4.9)))
    # ...and not the law of two independent crops (log of a ratio with the appendix's CDF).
    independent = independent_ratio_cdf(0.2, 1.0)
    assert ks_rejects(logs, lambda x: independent(math.exp(x)))


@pytest.mark.parametrize("beta", [-2.0, 0.0, 2.0])
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.3, 0.8), (0.08, 1.0)])
def test_areas_within_scale(beta, scale):
    # Tolerance: the sides are the rounded sqrt(A a), sqrt(A / a), so A lies in
    # [(w - 0.5)(h - 0.5), (w + 0.5)(h + 0.5)] (see side_bounds_ok). A view that falls back is the whole image.
    planner = JointCropPlanner(beta=beta, scale=scale)
    gen = torch.Generator().manual_seed(int(10 * beta) + 100)
    for width, height in [(224, 224), (500, 375), (375, 500), (96, 96), (320, 180)]:
        fallbacks = 0
        for _ in range(60):
            for box in planner.plan(0, width, height, gen):
                if box == (0.0, 0.0, float(width), float(height)):
                    fallbacks += 1
                else:
                    assert side_bounds_ok(box, width, height, scale, THREE_QUARTERS), (box, width, height)
        if scale[1] < 0.9 and width == height:
            # An area <= 0.8 fits a square unless the aspect ratio is beyond 1.25 either way, which 10
            # attempts in a row are (0.13 / 0.575)^10 ~ 3e-7 likely to be.
            assert fallbacks == 0


SHAPES = [(32, 32), (64, 48), (48, 64), (500, 375), (7, 9), (1000, 12), (12, 1000), (300, 40), (1, 1), (2, 1000)]


@pytest.mark.parametrize("fallback", ["whole_image", "central_crop"])
def test_boxes_inside_image_for_many_shapes(fallback):
    gen = torch.Generator().manual_seed(4)
    for beta in (-3.0, 0.0, 3.0):
        planner = JointCropPlanner(beta=beta, fallback=fallback, num_small=2)
        for width, height in SHAPES:
            for _ in range(25):
                boxes = planner.plan(0, width, height, gen)
                assert len(boxes) == 4
                for box in boxes:
                    validate_box(box, width, height)
                    assert all(float(v).is_integer() for v in box)


def test_fallbacks_whole_image_and_central_crop():
    # On a 1000 x 12 strip no crop of area >= 0.2 * 12000 px with ratio in [3/4, 4/3] fits (its height would
    # be >= 42 px), so every view falls back: the whole image (released code), or RandomResizedCrop's
    # central crop, w = 12 * 4/3 = 16, computed by hand as in test_views.
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert JointCropPlanner().plan(0, 1000, 12, gen) == [(0.0, 0.0, 1000.0, 12.0)] * 2
        assert JointCropPlanner(fallback="central_crop").plan(0, 1000, 12, gen) == [(492.0, 0.0, 508.0, 12.0)] * 2
        assert JointCropPlanner(fallback="central_crop").plan(0, 12, 1000, gen) == [(0.0, 492.0, 12.0, 508.0)] * 2
        # The same box as RandomResizedCrop's own fallback.
        assert sample_resized_crop(1000, 12, (0.2, 1.0), THREE_QUARTERS, gen) == (492.0, 0.0, 508.0, 12.0)


def test_fallback_is_per_view():
    # 400 x 100: an area fraction up to ~1/3 can fit (h = sqrt(A s / a) <= 100), a large one cannot. With
    # beta = -4 most pairs are one small and one large view: the large one falls back alone.
    width, height = 400, 100
    for fallback, fallback_box in [("whole_image", (0.0, 0.0, 400.0, 100.0)), ("central_crop", (133.0, 0.0, 266.0, 100.0))]:
        planner = JointCropPlanner(beta=-4.0, fallback=fallback)
        gen = torch.Generator().manual_seed(8)
        mixed = 0
        for _ in range(300):
            boxes = planner.plan(0, width, height, gen)
            is_fallback = [box == fallback_box for box in boxes]
            mixed += is_fallback[0] != is_fallback[1]
            for box, fell_back in zip(boxes, is_fallback):
                if not fell_back:
                    assert side_bounds_ok(box, width, height, (0.2, 1.0), THREE_QUARTERS)
        assert mixed > 50


def test_aspect_ratio_per_view_is_log_uniform():
    # On a 2000 x 2000 image areas up to 0.7 always fit (0.7 * 4/3 < 1), so no attempt is rejected and each
    # view's log aspect ratio is uniform on [log 3/4, log 4/3], as in RandomResizedCrop. Sides >= 770 px:
    # rounding moves log(w / h) by at most ~1.3e-3.
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    planner = JointCropPlanner(beta=-1.0, scale=(0.2, 0.7))
    gen = torch.Generator().manual_seed(9)
    logs = []
    for _ in range(2500):
        for box in planner.plan(0, 2000, 2000, gen):
            logs.append(math.log((box[2] - box[0]) / (box[3] - box[1])))
    assert not ks_rejects(logs, lambda x: min(1.0, max(0.0, (x - lo) / (hi - lo))))
    # ...and not, say, uniform in the aspect ratio itself.
    assert ks_rejects(logs, lambda x: min(1.0, max(0.0, (math.exp(x) - 3 / 4) / (4 / 3 - 3 / 4))))


# --------------------------------------------------------------------- independent crops: appendix H


def test_appendix_eq9_is_eq5_at_default_scale():
    cdf = independent_ratio_cdf(0.2, 1.0)
    for x in [0.2, 0.3, 0.5, 0.77, 1.0, 1.3, 2.0, 3.7, 5.0]:
        assert appendix_eq9(x) == pytest.approx(cdf(x), abs=1e-12)


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0)])
def test_independent_crop_area_ratio_matches_appendix_closed_form(scale):
    # Two RandomResizedCrops with ratio (1, 1) on a large square image: no attempt fails, so the areas are
    # i.i.d. uniform and s1 / s2 has the appendix's density (Eq. 8); sides >= 565 px keep rounding small.
    planner = RandomResizedCropPlanner(num_views=2, scale=scale, ratio=(1.0, 1.0))
    gen = torch.Generator().manual_seed(12)
    ratios = []
    for _ in range(3000):
        b1, b2 = planner.plan(0, 2000, 2000, gen)
        ratios.append(box_area(b1) / box_area(b2))
    assert not ks_rejects(ratios, independent_ratio_cdf(*scale))
    if scale == (0.2, 1.0):
        assert not ks_rejects(ratios, appendix_eq9)
    # JointCrop(0)'s pairs do not follow it.
    joint = JointCropPlanner(scale=scale, ratio=(1.0, 1.0))
    joint_ratios = []
    for _ in range(1200):
        b1, b2 = joint.plan(0, 2000, 2000, gen)
        joint_ratios.append(box_area(b1) / box_area(b2))
    assert ks_rejects(joint_ratios, independent_ratio_cdf(*scale))


def test_joint_and_independent_ratio_statistics_differ():
    # Closed forms with ratio (1, 1) (no rejection): JointCrop(0) has |r| ~ U[0, L], so the median ratio is
    # e^(L / 2) = sqrt(4.9) and P(ratio > 2) = 1 - log 2 / log 4.9. Independent crops: P(ratio > 2) =
    # 2 F(1/2) = 9/32 by Eq. (9), and the median m solves F(1 / m) = 1/4, i.e. 25 x^2 - 18 x + 1 = 0.
    gen = torch.Generator().manual_seed(13)
    n = 2000
    joint = area_ratio_statistics(JointCropPlanner(ratio=(1.0, 1.0)), n, 1000, 1000, gen)
    indep = area_ratio_statistics(RandomResizedCropPlanner(scale=(0.2, 1.0), ratio=(1.0, 1.0)), n, 1000, 1000, gen)
    assert joint.n == indep.n == n
    assert joint.median == pytest.approx(math.sqrt(4.9), abs=0.12)
    assert joint.share_above_2 == pytest.approx(1 - math.log(2) / math.log(4.9), abs=0.035)
    assert indep.median == pytest.approx(50 / (18 + math.sqrt(224)), abs=0.06)
    assert indep.share_above_2 == pytest.approx(9 / 32, abs=0.035)
    # On the usual 224 x 224 image with the usual aspect ratios the gap remains.
    joint = area_ratio_statistics(JointCropPlanner(), 1000, 224, 224, gen)
    indep = area_ratio_statistics(RandomResizedCropPlanner(scale=(0.2, 1.0)), 1000, 224, 224, gen)
    assert joint.median > indep.median + 0.4
    assert joint.share_above_2 > indep.share_above_2 + 0.15
    # beta orders the difficulty: larger beta, areas more alike.
    easy = area_ratio_statistics(JointCropPlanner(beta=2.0), 800, 224, 224, gen)
    hard = area_ratio_statistics(JointCropPlanner(beta=-2.0), 800, 224, 224, gen)
    assert easy.median < joint.median < hard.median


def test_area_ratio_statistics_errors():
    with pytest.raises(ValueError):
        area_ratio_statistics(JointCropPlanner(), 0, 32, 32)
    with pytest.raises(ValueError):
        area_ratio_statistics(RandomResizedCropPlanner(num_views=1), 10, 32, 32)


# ------------------------------------------------------------------------------ multi-crop, API, errors


def test_multicrop_order_and_counts():
    planner = JointCropPlanner(beta=-1.0, num_small=6)
    assert planner.num_views == 8 and JointCropPlanner().num_views == 2
    width, height = 640, 480
    for seed in range(40):
        boxes = planner.plan(0, width, height, torch.Generator().manual_seed(seed))
        assert len(boxes) == 8
        for k, box in enumerate(boxes):
            validate_box(box, width, height)
            scale = (0.2, 1.0) if k < 2 else (0.05, 0.14)
            assert box == (0.0, 0.0, 640.0, 480.0) or side_bounds_ok(box, width, height, scale, THREE_QUARTERS)
        # The joint pair comes first, drawn as without small views; then independent random resized crops
        # from the same stream.
        gen = torch.Generator().manual_seed(seed)
        expected = JointCropPlanner(beta=-1.0).plan(0, width, height, gen)
        expected += [sample_resized_crop(width, height, (0.05, 0.14), THREE_QUARTERS, gen) for _ in range(6)]
        assert boxes == expected


def test_registry_protocol_and_pickle():
    assert PLANNERS["joint_crop"] is JointCropPlanner
    planner = make_planner("joint_crop", beta=-2.0, scale=[0.2, 1.0], num_small=2, fallback="central_crop")
    assert isinstance(planner, Planner) and planner.scale == (0.2, 1.0)
    clone = pickle.loads(pickle.dumps(planner))
    assert clone == planner
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert clone.plan(7, 90, 60, g1) == planner.plan(7, 90, 60, g2)
    with pytest.raises(ConfigError, match="beta"):
        make_planner("joint_crop", betta=1.0)
    with pytest.raises(ConfigError, match="joint_crop"):
        make_planner("jointcrop")


def test_reproducible_with_explicit_generator():
    planner = JointCropPlanner(beta=1.5, num_small=3)
    a = [planner.plan(0, 300, 200, torch.Generator().manual_seed(21)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    gen = torch.Generator().manual_seed(21)
    assert planner.plan(0, 300, 200, gen) != planner.plan(0, 300, 200, gen)  # the stream moves on
    # An explicit generator leaves the global RNG alone; None draws from it.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    planner.plan(0, 300, 200, torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(77)
    first = planner.plan(0, 300, 200)
    torch.manual_seed(77)
    assert planner.plan(0, 300, 200) == first
    assert sample_area_pair(-1.0, generator=torch.Generator().manual_seed(4)) == sample_area_pair(
        -1.0, generator=torch.Generator().manual_seed(4)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": float("nan")},
        {"beta": float("inf")},
        {"beta": "0"},
        {"beta": True},
        {"scale": (0.5, 0.2)},
        {"scale": (0.0, 1.0)},
        {"scale": (0.2, 1.5)},
        {"scale": 0.2},
        {"ratio": (2.0, 1.0)},
        {"epsilon": -0.1},
        {"epsilon": float("nan")},
        {"scale": (0.9, 1.0), "epsilon": 0.2},  # 1.11 - 0.2 < 1: negative bound
        {"fallback": "center"},
        {"num_small": -1},
        {"num_small": 1.5},
        {"num_small": True},
        {"small_scale": (0.2, 0.1)},
    ],
)
def test_config_errors(kwargs):
    with pytest.raises(ConfigError):
        JointCropPlanner(**kwargs)
    with pytest.raises(ConfigError):
        make_planner("joint_crop", **kwargs)


def test_sample_area_pair_errors_and_image_size():
    with pytest.raises(ConfigError):
        sample_area_pair(float("nan"))
    with pytest.raises(ConfigError):
        sample_area_pair(0.0, (0.9, 1.0), 0.2)
    with pytest.raises(ConfigError):
        log_area_ratio_bound((0.2, 1.0), -1.0)
    with pytest.raises(ValueError):
        JointCropPlanner().plan(0, 0, 10)


# ------------------------------------------------------------------------------------------ JointBlur


@pytest.mark.parametrize("beta", [-2.0, 0.0, 2.0])
def test_joint_blur_log_sigma_ratio_follows_the_joint_crop_law(beta):
    from contrastlab.views.joint_blur import JointBlur

    blur = JointBlur(beta=beta, sigma=(0.1, 2.0), epsilon=0.1)
    bound = math.log(2.0 / 0.1 - 0.1)
    gen = torch.Generator().manual_seed(5)
    pairs = [blur.sample(gen) for _ in range(5000)]
    for s1, s2 in pairs:
        assert 0.1 * (1 - 1e-6) <= s1 <= 2.0 and 0.1 * (1 - 1e-6) <= s2 <= 2.0
    logs = [math.log(s2 / s1) for s1, s2 in pairs]
    assert max(abs(r) for r in logs) <= bound + 1e-5
    assert not ks_rejects(logs, log_ratio_cdf(beta, bound))


def test_joint_blur_sigma_reaches_the_blur_and_either_mode_splits_pairs():
    from PIL import Image

    from contrastlab.config.load import load_config
    from contrastlab.views import make_photometric
    from contrastlab.views.dataset import ViewDataset
    from contrastlab.views.joint_blur import JointBlur

    # A recipe that only blurs: the joint sigma is what the view's Gaussian blur uses.
    recipe = make_photometric("none", 0, (0.0,) * 3, (1.0,) * 3, blur_prob=1.0, flip_prob=0.0)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .to(torch.uint8).numpy())
    sharp, blurred = recipe(image, torch.Generator(), blur_sigma=0.1), recipe(image, torch.Generator(), blur_sigma=2.0)
    import torchvision.transforms.functional as TF

    expected = TF.to_tensor(TF.gaussian_blur(image, [3, 3], [2.0, 2.0]))
    torch.testing.assert_close(blurred, expected)
    assert not torch.allclose(sharp, blurred)

    # 'either': JointCrop boxes (joint areas) on about half the pairs, independent boxes on the rest.
    class OneImage:
        def __len__(self):
            return 400

        def __getitem__(self, i):
            return image, 0, i

    joint = JointCropPlanner(beta=-2.0, scale=(0.2, 1.0))
    independent = RandomResizedCropPlanner(num_views=2, scale=(0.2, 1.0))
    views = ViewDataset(OneImage(), joint, [8, 8], [recipe, recipe], seed=0,
                        joint_blur=JointBlur(mode="either", beta=0.0), independent_planner=independent)
    coins = [JointBlur(mode="either").use_joint_blur(torch.Generator().manual_seed(s)) for s in range(400)]
    assert 150 < sum(coins) < 250
    with pytest.raises(ConfigError, match="independent planner"):
        ViewDataset(OneImage(), joint, [8, 8], [recipe, recipe], joint_blur=JointBlur(mode="either"))
    assert len(views[0][0]) == 2
    with pytest.raises(ConfigError, match="never blurs"):
        from contrastlab import assemble

        assemble.training_views(load_config("demo", ["views.joint_blur=always", "views.photometric=small"]), OneImage())
    with pytest.raises(ConfigError, match="views.planner=joint_crop"):
        assemble.training_views(load_config("demo", ["views.joint_blur=either", "views.photometric=simclr"]), OneImage())
    with pytest.raises(ConfigError, match="views.joint_blur must be one of"):
        JointBlur(mode="sometimes")
