"""Feature Transformation, the score-statistics observer and its plots, against formulas and brute force.

Zhu, Zhao, Liu, Sun, Chen, ICCV 2021. Expected values come from the published formulas written out here
(and, for random draws, from the same seeded stream replayed by hand), never from values the code printed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastlab.errors import ConfigError
from contrastlab.methods import CaCo, MoCo, MoCoMCL, MoCoV3, SimCLR
from contrastlab.models import build_backbone, build_cohort
from contrastlab.objectives import InfoNCELoss, NTXentLoss
from contrastlab.objectives.batch_info_nce import BatchInfoNCELoss
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform, sample_beta
from contrastlab.observers.score_statistics import (
    FIELDS,
    ScoreStatistics,
    _counts_floor,
    _counts_histc,
    read_score_file,
)
from contrastlab.viz import score_plots

B, D, K = 6, 5, 9


def _unit(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _ft(**kw) -> FeatureTransform:
    kw.setdefault("rank", 0)
    return FeatureTransform(**kw)


# ----------------------------------------------------------------------------------------- FT maths
def test_positive_extrapolation_follows_the_published_formula() -> None:
    q, k = _unit(B, D, seed=0), _unit(B, D, seed=1)
    out = _ft(target="pos", seed=1)(q, k)
    lam = out.pos_lambda.double()
    assert out.pos_lambda.shape == (1, 1) and 1.0 <= lam.item() <= 2.0
    torch.testing.assert_close(out.q, lam * q + (1 - lam) * k)
    torch.testing.assert_close(out.k, lam * k + (1 - lam) * q)
    # The pair moves apart along its own difference, by 2 lam - 1 >= 1 ...
    torch.testing.assert_close(out.q - out.k, (2 * lam - 1) * (q - k))
    # ... and the positive score drops: q'.k' = c + 2 lam (1 - lam)(1 - c) <= c.
    c = (q * k).sum(1)
    torch.testing.assert_close((out.q * out.k).sum(1), c + 2 * lam[0, 0] * (1 - lam[0, 0]) * (1 - c))
    assert ((out.q * out.k).sum(1) <= c + 1e-12).all()
    assert out.negatives is None and out.neg_lambda is None and out.permutation is None


def _recovered(new: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """lam from new = lam * a + (1 - lam) * b, element by element."""
    return (new - b) / (a - b)


@pytest.mark.parametrize("granularity", ["step", "sample", "element"])
def test_mask_granularity_shapes_and_sharing(granularity: str) -> None:
    q, k, bank = _unit(B, D, seed=2), _unit(B, D, seed=3), _unit(K, D, seed=4)
    out = _ft(pos_granularity=granularity, neg_granularity=granularity, seed=5)(q, k, bank)
    shapes = {"step": ((1, 1), (1, 1)), "sample": ((B, 1), (K, 1)), "element": ((B, D), (K, D))}[granularity]
    assert tuple(out.pos_lambda.shape) == shapes[0] and tuple(out.neg_lambda.shape) == shapes[1]
    pos = _recovered(out.q, q, k)  # [B, D]: the coefficient each element of q' was made with
    torch.testing.assert_close(pos, out.pos_lambda.double().expand(B, D))
    torch.testing.assert_close(_recovered(out.k, k, q), pos)  # the same lam for q' and k'
    moved = out.permutation != torch.arange(K)  # fixed points of the permutation are unchanged
    neg = _recovered(out.negatives[moved], bank[moved], bank[out.permutation][moved])
    torch.testing.assert_close(neg, out.neg_lambda.double().expand(K, D)[moved])
    spread_rows = pos.std(dim=1).max().item()
    spread_all = pos.std().item()
    if granularity == "step":
        assert spread_all < 1e-9
    elif granularity == "sample":
        assert spread_rows < 1e-9 and spread_all > 1e-3
    else:
        assert spread_rows > 1e-3


def test_negative_interpolation_partners_are_a_permutation_and_the_bank_is_untouched() -> None:
    q, k, bank = _unit(B, D, seed=6), _unit(B, D, seed=7), _unit(K, D, seed=8)
    before = bank.clone()
    out = _ft(target="neg", seed=2)(q, k, bank)
    assert torch.equal(torch.sort(out.permutation).values, torch.arange(K))
    lam = out.neg_lambda.double()
    assert 0.0 <= lam.item() <= 1.0
    torch.testing.assert_close(out.negatives, lam * bank + (1 - lam) * bank[out.permutation])
    assert out.q is q and out.k is k and out.pos_lambda is None  # target "neg" leaves the pair alone
    assert torch.equal(bank, before) and out.negatives.data_ptr() != bank.data_ptr()
    # interpolated unit vectors lie inside the ball
    assert (out.negatives.norm(dim=1) <= 1 + 1e-12).all()


def _beta_cdf_2(x: np.ndarray) -> np.ndarray:
    return 3 * x**2 - 2 * x**3  # Beta(2, 2)


@pytest.mark.parametrize("law", ["beta", "uniform"])
def test_laws_of_the_coefficients(law: str) -> None:
    ft = _ft(law=law, alpha=2.0, pos_granularity="element", neg_granularity="element", seed=11)
    n = 40_000
    q, k = _unit(n, 1, seed=9, dtype=torch.float32), _unit(n, 1, seed=10, dtype=torch.float32)
    out = ft(q, k, _unit(n, 1, seed=12, dtype=torch.float32))
    pos = out.pos_lambda.flatten().numpy()
    neg = out.neg_lambda.flatten().numpy()
    assert pos.min() >= 1.0 and pos.max() <= 2.0  # extrapolation: 1 + draw
    assert neg.min() >= 0.0 and neg.max() <= 1.0
    cdf = _beta_cdf_2 if law == "beta" else (lambda x: x)
    var = 1 / (4 * (2 * 2.0 + 1)) if law == "beta" else 1 / 12
    for draws in (pos - 1.0, neg):
        assert draws.mean() == pytest.approx(0.5, abs=0.01)
        assert draws.var() == pytest.approx(var, abs=0.004)
        grid = np.linspace(0.05, 0.95, 19)
        empirical = (draws[None, :] <= grid[:, None]).mean(axis=1)
        assert np.abs(empirical - cdf(grid)).max() < 0.015  # Kolmogorov-Smirnov distance


def test_separate_alphas_and_positive_interpolation() -> None:
    n = 40_000
    ft = _ft(
        pos_alpha=0.5,
        neg_alpha=5.0,
        extrapolate=False,
        pos_granularity="element",
        neg_granularity="element",
        seed=3,
    )
    out = ft(
        _unit(n, 1, seed=1, dtype=torch.float32),
        _unit(n, 1, seed=2, dtype=torch.float32),
        _unit(n, 1, seed=3, dtype=torch.float32),
    )
    pos, neg = out.pos_lambda.flatten().numpy(), out.neg_lambda.flatten().numpy()
    assert pos.min() >= 0.0 and pos.max() <= 1.0  # interpolation, not extrapolation
    assert pos.var() == pytest.approx(1 / (4 * 2.0), abs=0.004)  # Beta(a, a): 1 / (4 (2a + 1))
    assert neg.var() == pytest.approx(1 / (4 * 11.0), abs=0.002)
    defaults = FeatureTransform()
    assert (defaults.target, defaults.pos_alpha, defaults.neg_alpha, defaults.law) == (
        "posneg",
        2.0,
        1.6,
        "beta",
    )
    assert (defaults.pos_granularity, defaults.neg_granularity, defaults.renormalize) == (
        "step",
        "step",
        "none",
    )
    assert defaults.extrapolate and defaults.start_epoch == 0


@pytest.mark.parametrize("mode", ["none", "pos", "neg", "both"])
def test_renormalisation_option(mode: str) -> None:
    q, k, bank = _unit(B, D, seed=13), _unit(B, D, seed=14), _unit(K, D, seed=15)
    out = _ft(renormalize=mode, pos_granularity="sample", neg_granularity="sample", seed=4)(q, k, bank)
    q_unit = torch.allclose(out.q.norm(dim=1), torch.ones(B, dtype=q.dtype))
    n_unit = torch.allclose(out.negatives.norm(dim=1), torch.ones(K, dtype=q.dtype))
    assert q_unit == (mode in ("pos", "both"))
    assert n_unit == (mode in ("neg", "both"))
    if mode == "none":  # |lam q + (1 - lam) k|^2 = 1 - 2 lam (1 - lam)(1 - c) >= 1 for lam >= 1
        assert (out.q.norm(dim=1) >= 1 - 1e-12).all()


def test_start_epoch_and_set_epoch() -> None:
    q, k, bank = _unit(B, D, seed=16), _unit(B, D, seed=17), _unit(K, D, seed=18)
    ft = _ft(start_epoch=2)
    for epoch in (0, 1, 1.99):
        ft.set_epoch(epoch)
        out = ft(q, k, bank)
        assert (
            not ft.active and out.q is q and out.k is k and out.negatives is bank and out.pos_lambda is None
        )
    ft.set_epoch(2)
    assert ft.active and not torch.equal(ft(q, k, bank).q, q)
    method = SimCLR(
        *build_backbone("resnet20", width=0.25),
        proj_hidden_dim=16,
        proj_out_dim=8,
        feature_transform={"start_epoch": 3},
    )
    method.set_progress(2.5, 10, False)
    assert not method.feature_transform.active
    method.set_progress(3.0, 10, True)
    assert method.feature_transform.active


def test_seeded_streams_are_reproducible_per_rank_and_epoch() -> None:
    q, k, bank = _unit(B, D, seed=19), _unit(B, D, seed=20), _unit(K, D, seed=21)
    kw = {"pos_granularity": "sample", "neg_granularity": "element", "seed": 7}
    a, b, c = FeatureTransform(rank=0, **kw), FeatureTransform(rank=0, **kw), FeatureTransform(rank=1, **kw)
    for _ in range(2):
        oa, ob, oc = a(q, k, bank), b(q, k, bank), c(q, k, bank)
        assert torch.equal(oa.q, ob.q) and torch.equal(oa.negatives, ob.negatives)
        assert not torch.equal(oa.pos_lambda, oc.pos_lambda)
    # Re-seeded at each whole epoch: a run resumed at epoch 3 draws what an uninterrupted one draws.
    a.set_epoch(3.0)
    resumed = FeatureTransform(rank=0, **kw)
    resumed.set_epoch(3.0)
    assert torch.equal(a(q, k, bank).q, resumed(q, k, bank).q)
    # An explicit generator: positive draws, then negative draws, then the permutation.
    ft = FeatureTransform(generator=torch.Generator().manual_seed(5), **kw)
    out = ft(q, k, bank)
    g = torch.Generator().manual_seed(5)
    pos = 1 + sample_beta(2.0, (B, 1), g)
    neg = sample_beta(1.6, (K, D), g)
    perm = torch.randperm(K, generator=g)
    assert torch.equal(out.pos_lambda, pos) and torch.equal(out.neg_lambda, neg)
    assert torch.equal(out.permutation, perm)


def test_sample_beta_is_gamma_ratio() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draws = sample_beta(1.6, (4, 3), g1)
    x = torch._standard_gamma(torch.full((4, 3), 1.6), generator=g2)
    y = torch._standard_gamma(torch.full((4, 3), 1.6), generator=g2)
    torch.testing.assert_close(draws, x / (x + y))


def test_options_are_validated_with_the_key_named() -> None:
    for bad, key in (
        ({"target": "both"}, "target"),
        ({"law": "gauss"}, "law"),
        ({"pos_granularity": "dim"}, "pos_granularity"),
        ({"renormalize": True}, "renormalize"),
        ({"neg_alpha": -1.0}, "neg_alpha"),
        ({"start_epoch": -1}, "start_epoch"),
    ):
        with pytest.raises(ConfigError, match=key):
            FeatureTransform.from_options(bad)
    with pytest.raises(ConfigError, match="alpha"):
        FeatureTransform(alpha=1.0, pos_alpha=2.0)
    with pytest.raises(ConfigError, match="pos_alpha"):
        build_feature_transform({"pos_alph": 2.0})
    assert build_feature_transform(None) is None
    assert FeatureTransform(alpha=0.7).neg_alpha == 0.7


# ---------------------------------------------------------------------------------------- losses
def _replay(seed: int, q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, **kw):
    """The draws a FeatureTransform with generator seeded ``seed`` makes (same options, same inputs)."""
    return FeatureTransform(generator=torch.Generator().manual_seed(seed), **kw)(q, k, bank)


def test_info_nce_with_ft_equals_the_loss_on_transformed_features_by_hand() -> None:
    g = torch.Generator().manual_seed(30)
    t = 0.2
    q, key = (
        torch.randn(B, D, generator=g, dtype=torch.float64),
        torch.randn(B, D, generator=g, dtype=torch.float64),
    )
    bank = _unit(K, D, seed=31)
    before = bank.clone()
    kw = {"pos_granularity": "sample", "neg_granularity": "element"}
    loss_fn = InfoNCELoss(
        t, feature_transform=FeatureTransform(generator=torch.Generator().manual_seed(9), **kw)
    )
    loss, info = loss_fn(q, key, bank)
    assert torch.equal(bank, before)
    qn, kn = q / q.norm(dim=1, keepdim=True), key / key.norm(dim=1, keepdim=True)
    draws = _replay(9, qn, kn, bank, **kw)
    lam_p, lam_n, perm = draws.pos_lambda.double(), draws.neg_lambda.double(), draws.permutation
    total = 0.0
    for i in range(B):
        qi = lam_p[i] * qn[i] + (1 - lam_p[i]) * kn[i]
        ki = lam_p[i] * kn[i] + (1 - lam_p[i]) * qn[i]
        negs = [lam_n[j] * bank[j] + (1 - lam_n[j]) * bank[perm[j]] for j in range(K)]
        pos = float(qi @ ki) / t
        neg = [float(qi @ n) / t for n in negs]
        total += -(pos - math.log(math.exp(pos) + sum(math.exp(v) for v in neg)))
        assert info["pos_logits"][i].item() == pytest.approx(pos, abs=1e-9)
        assert info["neg_logits"][i].tolist() == pytest.approx(neg, abs=1e-9)
        assert info["pos_logits_raw"][i].item() == pytest.approx(float(qn[i] @ kn[i]) / t, abs=1e-9)
        assert info["neg_logits_raw"][i].tolist() == pytest.approx(
            [float(qn[i] @ bank[j]) / t for j in range(K)], abs=1e-9
        )
    assert loss.item() == pytest.approx(total / B, rel=1e-9)


def test_info_nce_with_inactive_ft_is_the_plain_loss() -> None:
    q, key, bank = _unit(B, D, seed=32), _unit(B, D, seed=33), _unit(K, D, seed=34)
    plain, plain_info = InfoNCELoss(0.1)(q, key, bank)
    ft = FeatureTransform(start_epoch=1, rank=0)
    loss, info = InfoNCELoss(0.1, feature_transform=ft)(q, key, bank)
    assert loss.item() == plain.item() and "pos_logits_raw" not in plain_info
    assert torch.equal(info["neg_logits_raw"], plain_info["neg_logits"])
    assert torch.equal(info["pos_logits"], info["pos_logits_raw"])


def test_nt_xent_with_ft_equals_the_loss_on_transformed_features_by_hand() -> None:
    g = torch.Generator().manual_seed(40)
    n, t = 4, 0.5
    z1, z2 = (
        torch.randn(n, D, generator=g, dtype=torch.float64),
        torch.randn(n, D, generator=g, dtype=torch.float64),
    )
    kw = {"pos_granularity": "sample", "neg_granularity": "sample"}
    loss, info = NTXentLoss(
        t, feature_transform=FeatureTransform(generator=torch.Generator().manual_seed(4), **kw)
    )(z1, z2)
    c = F.normalize(torch.cat([z1, z2]), dim=1)  # the 2N raw candidates
    draws = _replay(4, c[:n], c[n:], c, **kw)
    lam_p, lam_n, perm = draws.pos_lambda.double(), draws.neg_lambda.double(), draws.permutation
    q = [lam_p[i] * c[i] + (1 - lam_p[i]) * c[n + i] for i in range(n)]
    k = [lam_p[i] * c[n + i] + (1 - lam_p[i]) * c[i] for i in range(n)]
    anchors = q + k
    mixed = [lam_n[j] * c[j] + (1 - lam_n[j]) * c[perm[j]] for j in range(2 * n)]
    total = 0.0
    for a in range(2 * n):
        partner = (a + n) % (2 * n)
        pos = float(q[a % n] @ k[a % n]) / t
        neg = [float(anchors[a] @ mixed[b]) / t for b in range(2 * n) if b not in (a, partner)]
        total += -(pos - math.log(math.exp(pos) + sum(math.exp(v) for v in neg)))
        assert info["pos_logits"][a].item() == pytest.approx(pos, abs=1e-9)
        assert info["neg_logits"][a].tolist() == pytest.approx(neg, abs=1e-9)
        assert info["pos_logits_raw"][a].item() == pytest.approx(float(c[a] @ c[partner]) / t, abs=1e-9)
        raw_neg = [float(c[a] @ c[b]) / t for b in range(2 * n) if b not in (a, partner)]
        assert info["neg_logits_raw"][a].tolist() == pytest.approx(raw_neg, abs=1e-9)
    assert loss.item() == pytest.approx(total / (2 * n), rel=1e-9)


def test_batch_info_nce_with_ft_equals_the_loss_on_transformed_features_by_hand() -> None:
    """MoCo v3's in-batch loss: query i with its own key extrapolated, every other key of the batch an
    interpolated negative (partners drawn from all keys), scaled by 2 tau."""
    g = torch.Generator().manual_seed(50)
    n, t = 5, 0.2
    q, key = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)
    kw = {"pos_granularity": "sample", "neg_granularity": "sample"}
    loss, info = BatchInfoNCELoss(
        t, feature_transform=FeatureTransform(generator=torch.Generator().manual_seed(5), **kw)
    )(q, key)
    qn, kn = F.normalize(q, dim=1), F.normalize(key, dim=1)
    draws = _replay(5, qn, kn, kn, **kw)
    lam_p, lam_n, perm = draws.pos_lambda.double(), draws.neg_lambda.double(), draws.permutation
    mixed = [lam_n[j] * kn[j] + (1 - lam_n[j]) * kn[perm[j]] for j in range(n)]
    total = 0.0
    for i in range(n):
        qi = lam_p[i] * qn[i] + (1 - lam_p[i]) * kn[i]
        ki = lam_p[i] * kn[i] + (1 - lam_p[i]) * qn[i]
        pos = float(qi @ ki) / t
        neg = [float(qi @ mixed[j]) / t for j in range(n) if j != i]
        total += -(pos - math.log(math.exp(pos) + sum(math.exp(v) for v in neg)))
        assert info["pos_logits"][i].item() == pytest.approx(pos, abs=1e-9)
        assert info["neg_logits"][i].tolist() == pytest.approx(neg, abs=1e-9)
        assert info["pos_logits_raw"][i].item() == pytest.approx(float(qn[i] @ kn[i]) / t, abs=1e-9)
        assert info["neg_logits_raw"][i].tolist() == pytest.approx(
            [float(qn[i] @ kn[j]) / t for j in range(n) if j != i], abs=1e-9)
    assert loss.item() == pytest.approx(2 * t * total / n, rel=1e-9)
    plain, plain_info = BatchInfoNCELoss(t)(q, key)
    inactive, inactive_info = BatchInfoNCELoss(t, feature_transform=FeatureTransform(start_epoch=1, rank=0))(q, key)
    assert inactive.item() == plain.item() and torch.equal(inactive_info["neg_logits_raw"], plain_info["neg_logits"])


def test_losses_with_ft_under_bf16_autocast() -> None:
    layer = torch.nn.Linear(D, D)
    x, bank = torch.randn(B, D), _unit(K, D, seed=35, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x), layer(x.flip(0))
        loss_moco, info = InfoNCELoss(0.2, feature_transform=_ft())(z1, z2.detach(), bank)
        loss_simclr, _ = NTXentLoss(0.5, feature_transform=_ft())(z1, z2)
    assert loss_moco.dtype == loss_simclr.dtype == torch.float32
    assert (
        torch.isfinite(loss_moco)
        and torch.isfinite(loss_simclr)
        and info["neg_logits_raw"].dtype == torch.float32
    )
    (loss_moco + loss_simclr).backward()
    assert layer.weight.grad is not None


# ---------------------------------------------------------------------------------------- methods
def _views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_with_ft_exposes_raw_logits_and_enqueues_raw_keys(symmetric: bool) -> None:
    torch.manual_seed(0)
    method = MoCo(
        *build_backbone("resnet20", width=0.25),
        proj_hidden_dim=32,
        proj_out_dim=8,
        queue_size=16,
        symmetric=symmetric,
        feature_transform={"target": "posneg", "seed": 1, "rank": 0},
    )
    initial = method.queue.queue.clone()
    out = method(_views(), None, None)
    a = 8 if symmetric else 4
    assert out.outputs["pos_logits_raw"].shape == (a,) and out.outputs["neg_logits_raw"].shape == (a, 16)
    assert out.outputs["pos_logits"].shape == (a,) and not torch.equal(
        out.outputs["pos_logits"], out.outputs["pos_logits_raw"]
    )
    out.loss.backward()
    assert method.backbone.conv1.weight.grad is not None
    keys = out.outputs["keys"]
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(keys.shape[0]))  # raw unit keys, not transformed
    torch.testing.assert_close(method.queue.queue[: keys.shape[0]], keys)
    assert torch.equal(method.queue.queue[keys.shape[0] :], initial[keys.shape[0] :])
    with torch.no_grad():  # raw logits are the plain MoCo logits against the queue before the step
        q = F.normalize(method.projector(method.backbone(_views()[0])), dim=1)
    torch.testing.assert_close(out.outputs["neg_logits_raw"][:4], q @ initial.T / 0.2, atol=1e-4, rtol=0)


def _cross_entropy_at_0(logits: list[float]) -> float:
    return -(logits[0] - math.log(sum(math.exp(v) for v in logits)))


def test_caco_with_ft_transforms_the_encoder_loss_and_leaves_the_memory_update_alone() -> None:
    """Pair ``(q, w_y)`` extrapolated, the other memory columns interpolated (the mixture at ``y`` removed),
    replayed by hand; the memory gradient equals that of the same step without FT."""
    import copy

    torch.manual_seed(0)
    kw = {"pos_granularity": "sample", "neg_granularity": "sample"}
    plain = CaCo(*build_backbone("resnet20", width=0.25), proj_hidden_dim=16, proj_out_dim=8, memory_size=12,
                 warm_start=False, temperature=0.1)
    method = copy.deepcopy(plain)
    method.feature_transform = FeatureTransform(generator=torch.Generator().manual_seed(7), **kw)
    views = _views(3)
    out = method(views, None, None)
    reference = plain(views, None, None)
    torch.testing.assert_close(method._pending_gradient, plain._pending_gradient, rtol=0, atol=0)
    torch.testing.assert_close(out.outputs["pos_logits_raw"], reference.outputs["pos_logits"])
    with torch.no_grad():
        queries = [F.normalize(method.projector(method.backbone(x)), dim=1).double() for x in views]
        keys = [F.normalize(method.key_encoder(x), dim=1) for x in views]
        memory = method.memory.normalized().double()  # [d, K]
        positives = [method.memory.assign(k) for k in keys]
    replay = FeatureTransform(generator=torch.Generator().manual_seed(7), **kw)
    total, t = 0.0, 0.1
    for a, (i, j) in enumerate(((0, 1), (1, 0))):
        y = positives[j]
        draws = replay(queries[i].float(), memory.T[y].float(), memory.T.float())
        lam_p, lam_n, perm = draws.pos_lambda.double(), draws.neg_lambda.double(), draws.permutation
        for b in range(queries[i].shape[0]):
            q = lam_p[b] * queries[i][b] + (1 - lam_p[b]) * memory[:, y[b]]
            w = lam_p[b] * memory[:, y[b]] + (1 - lam_p[b]) * queries[i][b]
            mixed = [lam_n[c] * memory[:, c] + (1 - lam_n[c]) * memory[:, perm[c]] for c in range(12)]
            logits = [float(q @ w) / t] + [float(q @ mixed[c]) / t for c in range(12) if c != y[b]]
            assert out.outputs["pos_logits"][a * 4 + b].item() == pytest.approx(logits[0], abs=1e-4)
            assert out.outputs["neg_logits"][a * 4 + b].tolist() == pytest.approx(logits[1:], abs=1e-4)
            total += _cross_entropy_at_0(logits) / queries[i].shape[0]
    assert out.loss.item() == pytest.approx(total, rel=1e-4)  # the two views' CEs are summed, as released


def test_moco_mcl_with_ft_shares_one_draw_across_peer_pairs() -> None:
    """``l^{ij} = [q'_ij . k'_ij, q'_ij Q'_j] / tau`` with one pair coefficient per sample and one mixing of
    every queue (same coefficients, same permutation), replayed by hand; the queues get the raw keys."""
    torch.manual_seed(0)
    kw = {"pos_granularity": "sample", "neg_granularity": "sample"}
    cohort = build_cohort("resnet20", num_peers=2, width=0.25)
    method = MoCoMCL(cohort, cohort.feature_dim, proj_out_dim=8, queue_size=16, temperature=0.2, shuffle_bn=False)
    method.feature_transform = FeatureTransform(generator=torch.Generator().manual_seed(11), **kw)
    views = _views(4)
    queues = [q.queue.clone() for q in method.queues]
    out = method(views, None, None)
    with torch.no_grad():
        q = [F.normalize(p(h), dim=1).double() for p, h in zip(method.projectors, method.cohort(views[0]))]
        k = [x.double() for x in method.compute_keys(views[1])]
    for queue, key in zip(method.queues, k):
        torch.testing.assert_close(queue.queue[:4].double(), key)  # raw keys enqueued
    replay = FeatureTransform(generator=torch.Generator().manual_seed(11), **kw)
    lam_p = replay.positive_coefficients(4, 8, "cpu").double()
    lam_n, perm = replay.negative_coefficients(16, 8, "cpu")
    lam_n = lam_n.double()
    vcl = icl = 0.0
    for i in range(2):
        for j in range(2):
            mixed = [lam_n[c] * queues[j][c].double() + (1 - lam_n[c]) * queues[j][perm[c]].double()
                     for c in range(16)]
            for b in range(4):
                qb = lam_p[b] * q[i][b] + (1 - lam_p[b]) * k[j][b]
                kb = lam_p[b] * k[j][b] + (1 - lam_p[b]) * q[i][b]
                logits = [float(qb @ kb) / 0.2] + [float(qb @ m) / 0.2 for m in mixed]
                if i == j == 0:
                    assert out.outputs["pos_logits"][b].item() == pytest.approx(logits[0], abs=1e-4)
                    assert out.outputs["neg_logits"][b].tolist() == pytest.approx(logits[1:], abs=1e-4)
                if i == j:
                    vcl += _cross_entropy_at_0(logits) / 4
                else:
                    icl += _cross_entropy_at_0(logits) / 4
    assert out.parts["vcl"].item() == pytest.approx(vcl, rel=1e-4)
    assert out.parts["icl"].item() == pytest.approx(icl, rel=1e-4)
    raw = (q[0] * k[0]).sum(1) / 0.2
    torch.testing.assert_close(out.outputs["pos_logits_raw"].double(), raw, atol=1e-4, rtol=0)


def test_mocov3_with_ft_reports_transformed_and_raw_logits() -> None:
    torch.manual_seed(0)
    method = MoCoV3(*build_backbone("resnet20", width=0.25), proj_hidden_dim=16, proj_out_dim=8,
                    feature_transform={"rank": 0, "seed": 2})
    out = method(_views(5), None, None)
    assert out.outputs["pos_logits"].shape == out.outputs["pos_logits_raw"].shape == (8,)
    assert out.outputs["neg_logits_raw"].shape == (8, 3)
    assert bool((out.outputs["pos_logits"] <= out.outputs["pos_logits_raw"] + 1e-5).all())  # harder positives
    method.set_progress(0.0, 10, per_epoch=False)
    method.feature_transform.start_epoch = 1  # inactive: the plain MoCo v3 loss
    plain = method(_views(5), None, None)
    torch.testing.assert_close(plain.outputs["pos_logits"], plain.outputs["pos_logits_raw"])


def test_methods_without_ft_are_unchanged() -> None:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet20", width=0.25)
    plain = SimCLR(net, dim, proj_hidden_dim=16, proj_out_dim=8)
    assert plain.feature_transform is None
    out = plain(_views(), None, None)
    assert "pos_logits_raw" not in out.outputs
    with_ft = SimCLR(net, dim, proj_hidden_dim=16, proj_out_dim=8, feature_transform={"rank": 0})
    out = with_ft(_views(), None, None)
    assert out.outputs["neg_logits_raw"].shape == (8, 6) and torch.isfinite(out.loss)
    assert sorted(with_ft.state_dict()) == sorted(plain.state_dict())  # FT adds no state


# ------------------------------------------------------------------------------------- observer
def _on_bin_centres(shape: tuple[int, ...], t: float, seed: int, low=-1.0, high=1.0, bins=10) -> torch.Tensor:
    """Logits whose scores sit well inside histogram bins (and a few outside the range)."""
    g = torch.Generator().manual_seed(seed)
    width = (high - low) / bins
    index = torch.randint(-1, bins + 1, shape, generator=g).double()  # -1 and bins: outside the range
    jitter = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 0.6
    scores = low + (index + 0.5 + jitter) * width
    return (scores / t).float()


def _brute_force(pos_logits: torch.Tensor, neg_logits: torch.Tensor, t: float) -> np.ndarray:
    rows = []
    for a in range(pos_logits.shape[0]):
        p = float(pos_logits[a]) * t
        ns = [float(v) * t for v in neg_logits[a]]
        mean = sum(ns) / len(ns)
        var = sum((v - mean) ** 2 for v in ns) / (len(ns) - 1)
        rows.append(
            [
                p,
                mean,
                var,
                sum(math.exp(v / t) for v in ns) / len(ns),
                math.exp(p / t),
                max(ns),
                sum(v > p for v in ns),
            ]
        )
    return np.array(rows).T  # [F, A]


def _brute_hist(values: list[float], low=-1.0, high=1.0, bins=10) -> np.ndarray:
    counts = np.zeros(bins + 2)
    width = (high - low) / bins
    for v in values:
        counts[0 if v < low else bins + 1 if v > high else 1 + min(bins - 1, int((v - low) // width))] += 1
    return counts


def _record(folder, steps_logits, t, **kw) -> tuple[ScoreStatistics, object]:
    stats = ScoreStatistics(folder, bins=10, hist_range=(-1.0, 1.0), rank=kw.pop("rank", 0), **kw)
    for step, outputs in steps_logits:
        assert stats.update(outputs, t, step)
    return stats, stats.end_epoch(1)


def test_score_statistics_match_brute_force_and_round_trip(tmp_path) -> None:
    t, a, k = 0.2, 5, 7
    steps = []
    for s in range(3):
        outputs = {
            "pos_logits": _on_bin_centres((a,), t, 10 * s),
            "neg_logits": _on_bin_centres((a, k), t, 10 * s + 1),
            "pos_logits_raw": _on_bin_centres((a,), t, 10 * s + 2),
            "neg_logits_raw": _on_bin_centres((a, k), t, 10 * s + 3),
        }
        steps.append((100 + s, outputs))
    stats, path = _record(tmp_path, steps, t, keep_samples=True, timing=True)
    assert path.name == "epoch_0001.rank0.npz"
    data = read_score_file(path)
    assert data["fields"] == list(FIELDS) and data["variants"] == ["raw", "ft"]
    assert data["steps"].tolist() == [100, 101, 102] and data["anchors"].tolist() == [a] * 3
    assert data["negatives"].tolist() == [k] * 3 and data["transformed"].all()
    assert data["temperature"].tolist() == [t] * 3 and data["epoch"] == 1 and data["rank"] == 0
    hist_pos, hist_neg = np.zeros((2, 12)), np.zeros((2, 12))
    for s, (_, outputs) in enumerate(steps):
        for v, suffix in enumerate(("_raw", "")):
            pos, neg = outputs["pos_logits" + suffix], outputs["neg_logits" + suffix]
            expected = _brute_force(pos, neg, t)
            np.testing.assert_allclose(data["samples"][s, v], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                data["summary"][s, v, :, 0], expected.mean(axis=1), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                data["summary"][s, v, :, 1], expected.var(axis=1), rtol=1e-4, atol=1e-6
            )
            hist_pos[v] += _brute_hist([float(x) * t for x in pos])
            hist_neg[v] += _brute_hist([float(x) * t for x in neg.flatten()])
    np.testing.assert_array_equal(data["hist_pos"], hist_pos)
    np.testing.assert_array_equal(data["hist_neg"], hist_neg)
    assert hist_neg[:, 0].sum() > 0 and hist_neg[:, -1].sum() > 0  # the edge bins were exercised
    np.testing.assert_allclose(data["hist_edges"], np.linspace(-1, 1, 11))
    cost = stats.overhead()
    assert cost["updates"] == 3 and cost["host_ms"] > 0 and data["overhead_host_ms_per_update"] > 0
    assert stats.pending_steps == 0


def test_gpu_and_cpu_histogram_paths_agree() -> None:
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * 4 - 2
    torch.testing.assert_close(_counts_histc(x, 12, -2.0, 2.0), _counts_floor(x, 12, -2.0, 2.0))
    assert _counts_floor(x, 12, -2.0, 2.0).sum().item() == 50_000


def test_score_statistics_without_ft_or_logits(tmp_path) -> None:
    stats = ScoreStatistics(tmp_path, rank=0)
    assert not stats.update({"embeddings": torch.zeros(2, 3)}, 0.2, 0)
    assert stats.end_epoch(1) is None
    pos, neg = torch.randn(4), torch.randn(4, 6)
    assert stats.update({"pos_logits": pos, "neg_logits": neg}, 0.5, 0)
    data = read_score_file(stats.end_epoch(2))
    assert not data["transformed"].any() and "samples" not in data
    np.testing.assert_array_equal(data["summary"][:, 0], data["summary"][:, 1])  # raw repeats ft
    np.testing.assert_array_equal(data["hist_pos"][0], data["hist_pos"][1])


def test_ranks_are_merged_like_one_batch(tmp_path) -> None:
    t = 0.3
    logits = {
        r: [
            (
                s,
                {
                    "pos_logits": torch.randn(3 + r, generator=torch.Generator().manual_seed(10 * r + s)),
                    "neg_logits": torch.randn(
                        3 + r, 5, generator=torch.Generator().manual_seed(50 + 10 * r + s)
                    ),
                },
            )
            for s in range(2)
        ]
        for r in (0, 1)
    }
    for r in (0, 1):
        _record(tmp_path / "scores", logits[r], t, rank=r, flush_every=1)
    run = score_plots.load_scores(tmp_path, "merged")
    assert run.ranks == [0, 1] and run.label == "merged"
    for s in range(2):
        pos = torch.cat([logits[r][s][1]["pos_logits"] for r in (0, 1)])
        neg = torch.cat([logits[r][s][1]["neg_logits"] for r in (0, 1)])
        expected = _brute_force(pos, neg, t)
        np.testing.assert_allclose(run.summary[s, 1, :, 0], expected.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(run.summary[s, 1, :, 1], expected.var(axis=1), rtol=1e-4, atol=1e-6)
    assert run.hist_neg[1].sum() == (3 * 5 + 4 * 5) * 2 * 2  # 2 steps, 2 variants summed over both ranks


# ---------------------------------------------------------------------------------------- plots
def _fake_run(root, label_seed: int, epochs: int = 2, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(label_seed)
    stats = ScoreStatistics(root / "scores", bins=20, rank=0)
    for e in range(epochs):
        for s in range(steps):
            shift = 0.1 * (e * steps + s)
            outputs = {
                "pos_logits": (torch.rand(8, generator=g) * 0.5 + 0.3 + shift) / 0.2,
                "neg_logits": torch.randn(8, 32, generator=g) * 0.2 / 0.2,
            }
            outputs["pos_logits_raw"] = outputs["pos_logits"] + 0.5
            outputs["neg_logits_raw"] = outputs["neg_logits"] * 0.8
            stats.update(outputs, 0.2, e * steps + s)
        stats.end_epoch(e + 1)


def _assert_written(paths) -> None:
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0


def test_every_plot_writes_png_and_pdf_for_two_runs(tmp_path) -> None:
    for i, name in enumerate(("m0999", "m099")):
        _fake_run(tmp_path / name, i)
    run = score_plots.load_scores(tmp_path / "m0999", "m=0.999")
    assert run.epoch_numbers == [1, 2] and run.steps.tolist() == list(range(10))
    # The command line draws every figure: time series and waterfall over both runs, histogram
    # snapshots and before-vs-after FT for each run.
    out = tmp_path / "figs"
    assert (
        score_plots.main(
            [
                str(tmp_path / "m0999"),
                str(tmp_path / "m099"),
                "--label",
                "m=0.999",
                "--label",
                "m=0.99",
                "--out",
                str(out),
                "--series",
                "pos_mean",
                "neg_var",
                "--smooth",
                "3",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    stems = ["score_time_series_ft", "score_waterfall_pos_mean_ft", "score_waterfall_neg_var_ft"]
    for label in ("m=0.999", "m=0.99"):
        stems += [f"{label}_score_histograms_ft", f"{label}_score_before_after"]
    expected = sorted(f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf"))
    assert sorted(p.name for p in out.iterdir()) == expected
    _assert_written(list(out.iterdir()))


def test_epoch_moments_pool_steps_by_total_variance(tmp_path) -> None:
    _fake_run(tmp_path, 3, epochs=1, steps=4)
    run = score_plots.load_scores(tmp_path)
    pos = run.summary[:, 1, FIELDS.index("pos")]
    mean, var = run.moments(1)["pos"]
    # 4 equal-size batches: the pooled mean and variance of the union of their anchors
    assert mean == pytest.approx(pos[:, 0].mean()) and var == pytest.approx(
        (pos[:, 1] + pos[:, 0] ** 2).mean() - mean**2
    )
