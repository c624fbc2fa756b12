"""Mutual Contrastive Learning building blocks against explicit loops and formulas (arXiv 2104.12565; github.com/winycg/MCL).

The references below are written independently of :mod:`contrastlab.objectives.mutual`: plain Python
loops over peers, anchors and candidates, with masks spelled out from the labels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import contrastlab.memory.sample_bank as bank_module
import contrastlab.objectives.mutual as mutual_module
from contrastlab.data import ClassIndex, MPerClassSampler
from contrastlab.errors import ConfigError
from contrastlab.memory import SampleMemoryBank, sample_contrast_indices
from contrastlab.objectives import (
    InfoNCELoss,
    MutualContrastLoss,
    in_batch_masks,
    kl_mimicry,
    logit_distillation,
    memory_bank_mutual_loss,
    moco_mutual_loss,
    supcon_operator,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# Plain-Python references
# ----------------------------------------------------------------------------------------------------


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _contrast_row(row: list[float], positives: list[int], denominator: list[int]) -> float:
    """-mean over positives of log softmax restricted to the denominator columns."""
    log_norm = _lse([row[c] for c in denominator])
    return -sum(row[b] - log_norm for b in positives) / len(positives)


def _psi(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of KL(softmax(teacher/T) || softmax(student/T)), every column."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        ls = _lse([x / t for x in s_row])
        lt = _lse([x / t for x in t_row])
        for s, u in zip(s_row, t_row):
            log_pt, log_ps = u / t - lt, s / t - ls
            total += math.exp(log_pt) * (log_pt - log_ps)
    return t * t * total / len(student)


def _pairs(m: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(m) for j in range(m) if i != j]


def _in_batch_reference(
    zs: list[torch.Tensor], labels: list[int], tau: float, t: float, cross_view: str
) -> dict[str, list[float]]:
    """Every term of in-batch MCL by loops over peers, anchors and candidates."""
    z = [[_unit(row) for row in peer.tolist()] for peer in zs]
    peers, batch = len(z), len(labels)

    def sims(m: int, n: int) -> list[list[float]]:
        return [[_dot(z[m][a], z[n][c]) / tau for c in range(batch)] for a in range(batch)]

    def contrast(s: list[list[float]], cross: bool) -> float:
        keep_self = cross and cross_view == "positive"
        total = 0.0
        for a in range(batch):
            positives = [b for b in range(batch) if labels[b] == labels[a] and (b != a or keep_self)]
            denominator = [c for c in range(batch) if c != a or keep_self]
            total += _contrast_row(s[a], positives, denominator)
        return total / batch

    s = {(m, n): sims(m, n) for m in range(peers) for n in range(peers)}
    return {
        "vcl": [contrast(s[m, m], False) for m in range(peers)],
        "icl": [contrast(s[m, n], True) for m, n in _pairs(peers)],
        "soft_vcl": [_psi(s[m, m], s[n, n], t) for m, n in _pairs(peers)],
        "soft_icl": [_psi(s[m, n], s[n, m], t) for m, n in _pairs(peers)],
    }


def _two_per_class_labels(classes: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.arange(classes).repeat_interleave(2)
    return labels[torch.randperm(labels.numel(), generator=g)]


# ----------------------------------------------------------------------------------------------------
# The operator L(S) and psi_T
# ----------------------------------------------------------------------------------------------------


def test_supcon_operator_matches_loop_over_anchors_and_positives() -> None:
    g = torch.Generator().manual_seed(0)
    a, c = 7, 9
    s = 4.0 * torch.randn(a, c, generator=g, dtype=F64)
    pos = torch.rand(a, c, generator=g) < 0.3
    pos[torch.arange(a), torch.randint(0, c, (a,), generator=g)] = True  # at least one positive per row
    denom = (torch.rand(a, c, generator=g) < 0.7) | pos
    expected = 0.0
    for i in range(a):
        row = s[i].tolist()
        positives = [b for b in range(c) if pos[i, b]]
        expected += _contrast_row(row, positives, [b for b in range(c) if denom[i, b]])
    expected /= a
    assert supcon_operator(s, pos, denom).item() == pytest.approx(expected, rel=1e-12)
    # 0/1 float masks are accepted too, and leading dimensions are independent problems.
    assert supcon_operator(s, pos.double(), denom.double()).item() == pytest.approx(expected, rel=1e-12)
    stacked = supcon_operator(torch.stack([s, 2 * s]), pos, denom)
    assert stacked.shape == (2,) and stacked[0].item() == pytest.approx(expected, rel=1e-12)


def test_supcon_operator_is_stable_and_skips_anchors_without_positives() -> None:
    s = torch.tensor([[1000.0, 999.0, -5.0], [0.0, 1.0, 2.0]], dtype=F64)
    pos = torch.tensor([[False, True, False], [False, False, False]])
    denom = torch.tensor([[True, True, True], [True, True, True]])
    loss = supcon_operator(s, pos, denom)
    # Anchor 1 has no positive: the mean runs over anchor 0 only. Its value: -(999 - lse(1000, 999, -5)).
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(math.log1p(math.exp(1.0)), rel=1e-12)


def test_kl_mimicry_matches_formula_and_is_zero_for_equal_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 8, generator=g, dtype=F64), torch.randn(5, 8, generator=g, dtype=F64)
    for temperature in (1.0, 3.0, 4.5):
        expected = _psi(s.tolist(), t.tolist(), temperature)
        assert kl_mimicry(s, t, temperature).item() == pytest.approx(expected, rel=1e-12)
        assert abs(kl_mimicry(s, s.clone(), temperature).item()) < 1e-14


def test_kl_mimicry_scales_as_t_squared() -> None:
    # softmax(T x / T) = softmax(x), so psi_T(T s, T t) = T^2 psi_1(s, t).
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 10, generator=g, dtype=F64), torch.randn(6, 10, generator=g, dtype=F64)
    base = kl_mimicry(s, t, 1.0).item()
    for temperature in (2.0, 3.0, 7.0):
        scaled = kl_mimicry(temperature * s, temperature * t, temperature).item()
        assert scaled == pytest.approx(temperature**2 * base, rel=1e-12)


def test_kl_mimicry_gradient_reaches_only_the_student() -> None:
    g = torch.Generator().manual_seed(3)
    batch, temperature = 4, 3.0
    s = torch.randn(batch, 7, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(batch, 7, generator=g, dtype=F64, requires_grad=True)
    kl_mimicry(s, t, temperature).backward()
    assert t.grad is None
    # d/ds of T^2 KL(p_t || p_s) = T (p_s - p_t) / B.
    expected = temperature * (F.softmax(s / temperature, 1) - F.softmax(t / temperature, 1)) / batch
    torch.testing.assert_close(s.grad, expected.detach())


# ----------------------------------------------------------------------------------------------------
# In-batch supervised MCL
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_view", ["exclude", "positive"])
def test_in_batch_terms_match_loops(cross_view: str) -> None:
    g = torch.Generator().manual_seed(4)
    peers, tau, t = 3, 0.5, 2.0
    labels = _two_per_class_labels(3, g)
    zs = [torch.randn(6, 5, generator=g, dtype=F64) * (m + 1) for m in range(peers)]
    out = MutualContrastLoss(temperature=tau, kl_temperature=t, cross_view=cross_view)(zs, labels)
    ref = _in_batch_reference(zs, labels.tolist(), tau, t, cross_view)
    assert out.pairs == tuple(_pairs(peers))
    assert out.vcl_terms.tolist() == pytest.approx(ref["vcl"], rel=1e-10)
    assert out.icl_terms.tolist() == pytest.approx(ref["icl"], rel=1e-10)
    assert out.soft_vcl_terms.tolist() == pytest.approx(ref["soft_vcl"], rel=1e-10)
    assert out.soft_icl_terms.tolist() == pytest.approx(ref["soft_icl"], rel=1e-10)
    assert out.vcl.item() == pytest.approx(sum(ref["vcl"]), rel=1e-10)
    assert out.icl.item() == pytest.approx(sum(ref["icl"]), rel=1e-10)


def test_in_batch_weights_and_reductions() -> None:
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])  # more than two images per class is fine too
    labels[0] = 1  # class 1 has three images, class 0 one: anchor 3 has no positive and is skipped
    zs = [torch.randn(8, 4, generator=g, dtype=F64) for _ in range(3)]
    w = {"alpha": 0.3, "gamma": 0.7, "beta": 1.9, "lam": 0.05}
    summed = MutualContrastLoss(temperature=0.2, **w)(zs, labels)
    mean = MutualContrastLoss(temperature=0.2, reduction="mean", **w)(zs, labels)
    groups = ("vcl", "icl", "soft_vcl", "soft_icl")
    for name, count in zip(groups, (3, 6, 6, 6)):
        terms = getattr(summed, f"{name}_terms")
        assert terms.shape == (count,)
        assert getattr(summed, name).item() == pytest.approx(sum(terms.tolist()), rel=1e-12)
        assert getattr(mean, name).item() == pytest.approx(sum(terms.tolist()) / count, rel=1e-12)
    for out in (summed, mean):
        expected = (w["alpha"] * out.vcl + w["gamma"] * out.soft_vcl
                    + w["beta"] * out.icl + w["lam"] * out.soft_icl)
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
        assert set(out.as_dict()) == {"vcl", "icl", "soft_vcl", "soft_icl", "total"}
    # Anchors without a positive are skipped: compare VCL of peer 0 with a loop over the others.
    z0 = [_unit(r) for r in zs[0].tolist()]
    rows = []
    for a in range(8):
        pos = [b for b in range(8) if labels[b] == labels[a] and b != a]
        if pos:
            row = [_dot(z0[a], z0[c]) / 0.2 for c in range(8)]
            rows.append(_contrast_row(row, pos, [c for c in range(8) if c != a]))
    assert len(rows) == 7
    assert summed.vcl_terms[0].item() == pytest.approx(sum(rows) / len(rows), rel=1e-10)


@pytest.mark.parametrize("peers", [1, 2, 3, 4])
def test_term_counts(peers: int) -> None:
    g = torch.Generator().manual_seed(6)
    labels = _two_per_class_labels(4, g)
    out = MutualContrastLoss()([torch.randn(8, 16, generator=g) for _ in range(peers)], labels)
    assert out.vcl_terms.shape == (peers,)
    for terms in (out.icl_terms, out.soft_vcl_terms, out.soft_icl_terms):
        assert terms.shape == (peers * (peers - 1),)
    assert len(out.pairs) == len(set(out.pairs)) == peers * (peers - 1)
    assert all(m != n for m, n in out.pairs)
    assert torch.isfinite(out.loss)


def test_all_equal_embeddings_give_ln_127_per_term() -> None:
    labels = torch.arange(100).repeat_interleave(500)
    sampler = MPerClassSampler(labels, m=2, batch_size=128)
    batch = torch.tensor(next(iter(sampler)))
    z = torch.ones(128, 128)
    out = MutualContrastLoss(temperature=0.1, beta=0.1)([z, z, z, z], labels[batch])
    ln127 = math.log(127)
    assert out.vcl_terms.shape == (4,) and out.icl_terms.shape == (12,)
    assert out.vcl_terms.tolist() == pytest.approx([ln127] * 4, rel=1e-5)
    assert out.icl_terms.tolist() == pytest.approx([ln127] * 12, rel=1e-5)
    assert (0.1 * out.icl).item() == pytest.approx(1.2 * ln127, rel=1e-5)
    assert (0.1 * out.icl).item() == pytest.approx(5.81, abs=0.005)
    # Equal similarity distributions: nothing to mimic.
    assert out.soft_vcl.item() == pytest.approx(0.0, abs=1e-5)
    assert out.soft_icl.item() == pytest.approx(0.0, abs=1e-5)


def test_default_icl_masking_ignores_the_cross_view_diagonal() -> None:
    g = torch.Generator().manual_seed(7)
    labels = _two_per_class_labels(4, g)
    s = torch.randn(8, 8, generator=g, dtype=F64) / 0.1  # stands for S^{mn}
    bumped = s.clone()
    bumped[3, 3] += 5.0
    bumped[6, 6] -= 2.0
    exclude = in_batch_masks(labels)
    assert supcon_operator(bumped, exclude.cross_pos, exclude.cross_denom).item() == supcon_operator(
        s, exclude.cross_pos, exclude.cross_denom
    ).item()
    positive = in_batch_masks(labels, cross_view="positive")
    assert supcon_operator(bumped, positive.cross_pos, positive.cross_denom).item() != pytest.approx(
        supcon_operator(s, positive.cross_pos, positive.cross_denom).item(), rel=1e-6
    )
    # The masks themselves, spelled out: "exclude" is P/D of VCL; "positive" adds the diagonal.
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(8, dtype=torch.bool)
    assert torch.equal(exclude.cross_pos, same & ~eye) and torch.equal(exclude.cross_denom, ~eye)
    assert torch.equal(positive.cross_pos, same) and bool(positive.cross_denom.all())
    assert torch.equal(positive.pos, same & ~eye) and torch.equal(positive.denom, ~eye)


def test_in_batch_gradient_matches_autograd_through_a_loop() -> None:
    g = torch.Generator().manual_seed(8)
    labels = _two_per_class_labels(2, g)
    zs = [torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(2)]
    tau, t, w = 0.4, 3.0, (0.1, 1.0, 0.1, 1.0)
    out = MutualContrastLoss(temperature=tau, kl_temperature=t)(zs, labels)
    got = torch.autograd.grad(out.loss, zs)

    def sim(m: int, n: int) -> torch.Tensor:
        return F.normalize(zs[m], dim=1) @ F.normalize(zs[n], dim=1).T / tau

    def contrast(s: torch.Tensor) -> torch.Tensor:
        total = s.new_zeros(())
        for a in range(4):
            pos = [b for b in range(4) if labels[b] == labels[a] and b != a]
            log_norm = torch.logsumexp(torch.stack([s[a, c] for c in range(4) if c != a]), 0)
            total = total - sum(s[a, b] - log_norm for b in pos) / len(pos)
        return total / 4

    def psi(s: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        p_t = F.softmax(teacher.detach() / t, 1)
        return t * t * (p_t * (p_t.log() - F.log_softmax(s / t, 1))).sum(1).mean()

    vcl = contrast(sim(0, 0)) + contrast(sim(1, 1))
    icl = contrast(sim(0, 1)) + contrast(sim(1, 0))
    soft_vcl = psi(sim(0, 0), sim(1, 1)) + psi(sim(1, 1), sim(0, 0))
    soft_icl = psi(sim(0, 1), sim(1, 0)) + psi(sim(1, 0), sim(0, 1))
    ref = w[0] * vcl + w[1] * soft_vcl + w[2] * icl + w[3] * soft_icl
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(got, torch.autograd.grad(ref, zs)):
        torch.testing.assert_close(a, b)


def test_in_batch_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="cross_view"):
        MutualContrastLoss(cross_view="include")
    with pytest.raises(ConfigError, match="reduction"):
        MutualContrastLoss(reduction="avg")
    with pytest.raises(ConfigError):
        MutualContrastLoss(temperature=0.0)
    with pytest.raises(ValueError):
        MutualContrastLoss()([torch.randn(4, 8), torch.randn(4, 9)], torch.arange(4))


# ----------------------------------------------------------------------------------------------------
# Memory-bank variant (ImageNet) and the memory bank
# ----------------------------------------------------------------------------------------------------


def _bank_reference(
    zs: list[torch.Tensor], stored: list[torch.Tensor], pos_k: int, tau: float, t: float
) -> dict[str, list[float]]:
    """l^{mn}_a = M_n[I_a] . z_m^a / tau by loops; VCL drops column 0; ICL keeps it as a positive."""
    z = [[_unit(r) for r in peer.tolist()] for peer in zs]
    rows = [peer.tolist() for peer in stored]  # [B][K][D] per peer
    peers, batch, k = len(z), len(z[0]), len(rows[0][0])

    def logits(m: int, n: int) -> list[list[float]]:
        return [[_dot(z[m][a], rows[n][a][j]) / tau for j in range(k)] for a in range(batch)]

    ell = {(m, n): logits(m, n) for m in range(peers) for n in range(peers)}
    within = {m: [row[1:] for row in ell[m, m]] for m in range(peers)}
    all_cols = list(range(k))
    return {
        "vcl": [
            sum(_contrast_row(r, list(range(pos_k)), list(range(k - 1))) for r in within[m]) / batch
            for m in range(peers)
        ],
        "icl": [
            sum(_contrast_row(r, list(range(pos_k + 1)), all_cols) for r in ell[m, n]) / batch
            for m, n in _pairs(peers)
        ],
        "soft_vcl": [_psi(within[m], within[n], t) for m, n in _pairs(peers)],
        "soft_icl": [_psi(ell[m, n], ell[n, m], t) for m, n in _pairs(peers)],
    }


@pytest.mark.parametrize("pos_k", [1, 2])
def test_memory_bank_terms_match_loops(pos_k: int) -> None:
    g = torch.Generator().manual_seed(9)
    labels = torch.arange(5).repeat(6)  # 30 samples, 5 classes
    bank = SampleMemoryBank(num_samples=30, dim=6, num_banks=3, seed=1)
    for m in range(3):  # make some rows unit vectors, as after training
        bank.update(m, torch.arange(0, 30, 2), torch.randn(15, 6, generator=g))
    index = torch.tensor([0, 7, 11, 24])
    idx = sample_contrast_indices(index, labels[index], ClassIndex(labels), pos_k=pos_k, neg_k=9, generator=g)
    assert idx.shape == (4, 1 + pos_k + 9)
    zs = [torch.randn(4, 6, generator=g, dtype=F64) for _ in range(3)]
    stored = [bank.gather(m, idx).double() for m in range(3)]
    out = memory_bank_mutual_loss(zs, stored, pos_k=pos_k, temperature=0.3, kl_temperature=2.5)
    ref = _bank_reference(zs, stored, pos_k, 0.3, 2.5)
    assert out.vcl_terms.tolist() == pytest.approx(ref["vcl"], rel=1e-10)
    assert out.icl_terms.tolist() == pytest.approx(ref["icl"], rel=1e-10)
    assert out.soft_vcl_terms.tolist() == pytest.approx(ref["soft_vcl"], rel=1e-10)
    assert out.soft_icl_terms.tolist() == pytest.approx(ref["soft_icl"], rel=1e-10)
    assert out.loss.item() == pytest.approx(
        0.1 * sum(ref["vcl"]) + sum(ref["soft_vcl"]) + 0.1 * sum(ref["icl"]) + sum(ref["soft_icl"]), rel=1e-10
    )
    mean = memory_bank_mutual_loss(
        zs, stored, pos_k=pos_k, temperature=0.3, kl_temperature=2.5, reduction="mean"
    )
    assert mean.icl.item() == pytest.approx(sum(ref["icl"]) / 6, rel=1e-10)


def test_memory_bank_loss_sends_no_gradient_to_stored_rows() -> None:
    g = torch.Generator().manual_seed(10)
    zs = [torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(2)]
    stored = [torch.randn(3, 7, 4, generator=g, requires_grad=True) for _ in range(2)]
    memory_bank_mutual_loss(zs, stored).loss.backward()
    assert all(s.grad is None for s in stored)
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zs)


def test_bank_initialisation() -> None:
    bank = SampleMemoryBank(num_samples=2000, dim=128, num_banks=2, seed=3)
    bound = 1 / math.sqrt(128 / 3)
    assert bank.memory.shape == (2, 2000, 128)
    assert bank.nbytes == 2 * 2000 * 128 * 4
    assert float(bank.memory.abs().max()) <= bound
    assert float(bank.memory.max()) > 0.99 * bound and float(bank.memory.min()) < -0.99 * bound
    # Uniform on [-b, b]: mean 0, variance b^2 / 3.
    assert abs(float(bank.memory.mean())) < 0.002
    assert float(bank.memory.var()) == pytest.approx(bound**2 / 3, rel=0.01)
    assert torch.equal(bank.memory, SampleMemoryBank(2000, 128, 2, seed=3).memory)
    assert not torch.equal(bank.memory, SampleMemoryBank(2000, 128, 2, seed=4).memory)
    assert not torch.equal(bank.memory[0], bank.memory[1])
    with pytest.raises(ConfigError):
        SampleMemoryBank(10, momentum=1.5)


@pytest.mark.parametrize("momentum", [0.5, 0.2])
def test_bank_momentum_update_matches_formula(momentum: float) -> None:
    g = torch.Generator().manual_seed(11)
    bank = SampleMemoryBank(num_samples=12, dim=5, num_banks=2, momentum=momentum)
    before = bank.memory.clone()
    idx = torch.tensor([3, 7, 0])
    z = torch.randn(3, 5, generator=g)
    bank.update(1, idx, z)
    for row, i in enumerate(idx.tolist()):
        zu = _unit(z[row].tolist())
        mixed = [momentum * old + (1 - momentum) * new for old, new in zip(before[1, i].tolist(), zu)]
        assert bank.memory[1, i].tolist() == pytest.approx(_unit(mixed), abs=1e-6)
    untouched = [i for i in range(12) if i not in idx.tolist()]
    assert torch.equal(bank.memory[1, untouched], before[1, untouched])
    assert torch.equal(bank.memory[0], before[0])  # other peers' banks are not touched
    # gather reads the rows back.
    assert torch.equal(bank.gather(1, torch.tensor([[7, 3]])), bank.memory[1, [7, 3]].unsqueeze(0))


def test_bank_update_with_repeated_index_keeps_the_last() -> None:
    bank = SampleMemoryBank(num_samples=4, dim=3, num_banks=1)
    before = bank.memory[0, 2].clone()
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    bank.update(0, torch.tensor([2, 2]), z)
    expected = F.normalize(0.5 * before + 0.5 * z[1], dim=0)
    torch.testing.assert_close(bank.memory[0, 2], expected)


def test_sample_contrast_indices_positives_and_negatives() -> None:
    g = torch.Generator().manual_seed(12)
    # Class sizes 1, 3, 6, 10, interleaved.
    labels = torch.tensor([0] + [1] * 3 + [2] * 6 + [3] * 10)
    labels = labels[torch.randperm(20, generator=g)]
    index = torch.arange(20).repeat(50)  # every sample as an anchor, 50 times
    neg_k = 64
    idx = sample_contrast_indices(index, labels[index], ClassIndex(labels), neg_k=neg_k, generator=g)
    assert idx.shape == (1000, 2 + neg_k) and idx.dtype == torch.long
    assert torch.equal(idx[:, 0], index)  # first positive slot: the anchor's own index
    assert torch.equal(labels[idx[:, 1]], labels[index])  # second: same class
    singleton = index[labels[index] == 0]
    assert bool((idx[labels[index] == 0, 1] == singleton).all())  # a one-image class: itself
    negatives = idx[:, 2:]
    assert not bool((labels[negatives] == labels[index][:, None]).any())  # never the anchor's label
    # Uniform over the other classes' images: an anchor of class 3 sees each of the 10 others equally.
    of_class_3 = negatives[labels[index] == 3].reshape(-1)
    counts = torch.bincount(of_class_3, minlength=20)[labels != 3]
    expected = of_class_3.numel() / 10
    assert bool(((counts - expected).abs() < 0.15 * expected).all())


def test_sample_contrast_indices_accepts_groups_and_distinct_positives() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    groups = {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8]}
    index = torch.tensor([0, 4, 8])
    a = sample_contrast_indices(index, labels[index], groups, pos_k=3, neg_k=5,
                                generator=torch.Generator().manual_seed(0))
    b = sample_contrast_indices(index, labels[index], ClassIndex(labels), pos_k=3, neg_k=5,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for row, i in zip(a.tolist(), index.tolist()):
        assert sorted(row[1:4]) == groups[int(labels[i])]  # pos_k = class size: all distinct
    with pytest.raises(ConfigError):
        sample_contrast_indices(index, labels[index], {0: [0, 1, 2]}, neg_k=4)
    with pytest.raises(ConfigError):
        sample_contrast_indices(index, labels[index], groups, neg_k=0)


# ----------------------------------------------------------------------------------------------------
# MoCo variant
# ----------------------------------------------------------------------------------------------------


def _moco_logits(q: list[float], key: list[float], queue: list[list[float]], tau: float) -> list[float]:
    return [_dot(q, key) / tau] + [_dot(q, row) / tau for row in queue]


def _moco_inputs(peers: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(4, 6, generator=g, dtype=F64) for _ in range(peers)]
    # Keys close to their queries for peer i, so that swapping keys matters a lot.
    ks = [q + 0.3 * torch.randn(4, 6, generator=g, dtype=F64) for q in qs]
    queues = [F.normalize(torch.randn(10, 6, generator=g, dtype=F64), dim=1) for _ in range(peers)]
    return qs, ks, queues


def test_moco_terms_match_loops_with_the_other_peers_key_and_queue() -> None:
    peers, tau, t = 3, 0.2, 3.0
    qs, ks, queues = _moco_inputs(peers, 13)
    out = moco_mutual_loss(qs, ks, queues, temperature=tau, kl_temperature=t)
    q = [[_unit(r) for r in x.tolist()] for x in qs]
    k = [[_unit(r) for r in x.tolist()] for x in ks]
    queue = [x.tolist() for x in queues]

    def logits(i: int, key_peer: int, queue_peer: int) -> list[list[float]]:
        return [_moco_logits(q[i][b], k[key_peer][b], queue[queue_peer], tau) for b in range(4)]

    def ce(rows: list[list[float]]) -> float:
        return sum(_contrast_row(r, [0], list(range(len(r)))) for r in rows) / len(rows)

    vcl = [ce(logits(i, i, i)) for i in range(peers)]
    icl = [ce(logits(i, j, j)) for i, j in _pairs(peers)]
    soft_vcl = [_psi(logits(i, i, i), logits(j, j, j), t) for i, j in _pairs(peers)]
    soft_icl = [_psi(logits(i, j, j), logits(j, i, i), t) for i, j in _pairs(peers)]
    assert out.vcl_terms.tolist() == pytest.approx(vcl, rel=1e-10)
    assert out.icl_terms.tolist() == pytest.approx(icl, rel=1e-10)
    assert out.soft_vcl_terms.tolist() == pytest.approx(soft_vcl, rel=1e-10)
    assert out.soft_icl_terms.tolist() == pytest.approx(soft_icl, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(vcl) + sum(icl) + sum(soft_vcl) + sum(soft_icl), rel=1e-10)
    # Using the wrong key or the wrong queue gives other values: the test above can tell them apart.
    own_key = [ce(logits(i, i, j)) for i, j in _pairs(peers)]
    own_queue = [ce(logits(i, j, i)) for i, j in _pairs(peers)]
    for got, wrong_a, wrong_b in zip(out.icl_terms.tolist(), own_key, own_queue):
        assert abs(got - wrong_a) > 1e-3 and abs(got - wrong_b) > 1e-3


def test_moco_vcl_is_the_moco_loss_of_each_peer() -> None:
    qs, ks, queues = _moco_inputs(2, 14)
    out = moco_mutual_loss(qs, ks, queues, temperature=0.07)
    for i in range(2):
        expected, _ = InfoNCELoss(temperature=0.07)(qs[i], ks[i], queues[i])
        assert out.vcl_terms[i].item() == pytest.approx(expected.item(), rel=1e-10)


def test_moco_weights_and_no_gradient_to_keys_or_queues() -> None:
    qs, ks, queues = _moco_inputs(2, 15)
    qs = [q.clone().requires_grad_(True) for q in qs]
    ks = [k.clone().requires_grad_(True) for k in ks]
    queues = [x.clone().requires_grad_(True) for x in queues]
    out = moco_mutual_loss(qs, ks, queues, alpha=0.5, gamma=2.0, beta=3.0, lam=0.25, kl_temperature=4.0)
    expected = 0.5 * out.vcl + 2.0 * out.soft_vcl + 3.0 * out.icl + 0.25 * out.soft_icl
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    out.loss.backward()
    assert all(q.grad is not None for q in qs)
    assert all(k.grad is None for k in ks) and all(x.grad is None for x in queues)


# ----------------------------------------------------------------------------------------------------
# Logit distillation
# ----------------------------------------------------------------------------------------------------


def _psi_ensemble(logits: list[torch.Tensor], k: int, t: float) -> float:
    ensemble = (sum(x for x in logits) / len(logits)).tolist()
    return _psi(logits[k].tolist(), ensemble, t)


def test_logit_distillation_targets() -> None:
    g = torch.Generator().manual_seed(16)
    three = [torch.randn(5, 10, generator=g, dtype=F64) for _ in range(3)]
    out = logit_distillation(three, temperature=3.0)
    expected = [_psi_ensemble(three, k, 3.0) for k in range(3)]
    assert out.students == (0, 1, 2)
    assert out.terms.tolist() == pytest.approx(expected, rel=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected), rel=1e-10)
    mean = logit_distillation(three, reduction="mean")
    assert mean.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-10)
    last = logit_distillation(three, targets="last")
    assert last.students == (2,) and last.loss.item() == pytest.approx(expected[2], rel=1e-10)
    assert logit_distillation(three, targets="upstream_cifar").students == (2,)
    two = three[:2]
    cifar_two = logit_distillation(two, targets="upstream_cifar", temperature=2.0)
    assert cifar_two.students == (0, 1)
    assert cifar_two.loss.item() == pytest.approx(
        _psi_ensemble(two, 0, 2.0) + _psi_ensemble(two, 1, 2.0), rel=1e-10
    )
    assert logit_distillation(three + three[:1], targets="upstream_cifar").students == (3,)
    same = [three[0]] * 3
    assert abs(logit_distillation(same).loss.item()) < 1e-12
    with pytest.raises(ConfigError, match="targets"):
        logit_distillation(three, targets="first")


def test_logit_distillation_detaches_the_ensemble_by_default() -> None:
    g = torch.Generator().manual_seed(17)
    logits = [torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True) for _ in range(3)]
    detached = logit_distillation(logits, targets="last").loss
    grads = torch.autograd.grad(detached, logits, allow_unused=True)
    assert all(gr is None or not bool(gr.any()) for gr in grads[:2])  # only the student learns
    assert grads[2] is not None and bool(grads[2].any())
    # Not detached (upstream ImageNet): gradient reaches every peer through the teacher; check it
    # against autograd through the formula written out.
    attached = logit_distillation(logits, targets="last", detach_teacher=False).loss
    got = torch.autograd.grad(attached, logits)
    t = 3.0
    p_e = F.softmax((logits[0] + logits[1] + logits[2]) / 3 / t, dim=1)
    ref = t * t * (p_e * (p_e.log() - F.log_softmax(logits[2] / t, dim=1))).sum(1).mean()
    for a, b in zip(got, torch.autograd.grad(ref, logits)):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------
# Distributed: each rank's view simulated in one process (the collectives themselves are tested with
# real gloo ranks in tests/test_distributed.py)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_view", ["exclude", "positive"])
def test_gathered_in_batch_loss_equals_single_process(
    monkeypatch: pytest.MonkeyPatch, cross_view: str
) -> None:
    """Rank r scores its anchors against the gathered batch; the mean over ranks is the global loss.

    ``gather_with_grad`` is replaced by "the global tensor" (so gradient flows to every slice, as the
    all-reduce in its backward does across ranks); then ``d(mean_r loss_r)`` must equal ``dL`` of the
    single-process loss on the global batch.
    """
    world, local, peers = 2, 4, 3
    g = torch.Generator().manual_seed(21)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # whole class groups per rank, as the sampler gives
    zs = [torch.randn(world * local, 5, generator=g, dtype=F64, requires_grad=True) for _ in range(peers)]
    single = MutualContrastLoss(temperature=0.3, cross_view=cross_view)(zs, labels)
    expected_grads = torch.autograd.grad(single.loss, zs)

    rank = {"r": 0}
    normalised = None

    def fake_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
        assert x.shape == (local, peers, 5)
        return normalised.transpose(0, 1)  # [N, M, D], rank 0's rows first

    monkeypatch.setattr(mutual_module, "get_world_size", lambda: world)
    monkeypatch.setattr(mutual_module, "get_rank", lambda: rank["r"])
    monkeypatch.setattr(mutual_module, "gather_with_grad", fake_gather_with_grad)
    monkeypatch.setattr(mutual_module, "gather_no_grad", lambda x: labels)
    loss_fn = MutualContrastLoss(temperature=0.3, cross_view=cross_view, gather_distributed=True)
    total, icl = 0.0, 0.0
    normalised = F.normalize(torch.stack(zs), dim=-1)
    for r in range(world):
        rank["r"] = r
        mine = slice(r * local, (r + 1) * local)
        out = loss_fn([z[mine] for z in zs], labels[mine])
        assert out.vcl_terms.shape == (peers,) and out.icl_terms.shape == (peers * (peers - 1),)
        total = total + out.loss / world
        icl = icl + out.icl_terms / world
    assert total.item() == pytest.approx(single.loss.item(), rel=1e-12)
    torch.testing.assert_close(icl, single.icl_terms)
    for got, want in zip(torch.autograd.grad(total, zs), expected_grads):
        torch.testing.assert_close(got, want)


def test_gathered_bank_update_writes_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(22)
    index = torch.tensor([5, 1, 8, 2, 9, 0])
    z = torch.randn(6, 4, generator=g)
    single = SampleMemoryBank(num_samples=10, dim=4, num_banks=1)
    single.update(0, index, z)
    # Rank 1 of 2 holds the last three anchors; the gather hands back everyone's, rank 0's first.
    gathered = iter([index, z])
    monkeypatch.setattr(bank_module, "gather_no_grad", lambda x: next(gathered))
    ranked = SampleMemoryBank(num_samples=10, dim=4, num_banks=1)
    ranked.update(0, index[3:], z[3:], gather_distributed=True)
    torch.testing.assert_close(ranked.memory, single.memory)
    # Without the gather only this rank's rows change.
    alone = SampleMemoryBank(num_samples=10, dim=4, num_banks=1)
    alone.update(0, index[3:], z[3:], gather_distributed=False)
    assert torch.equal(alone.memory[0, [5, 1, 8]], SampleMemoryBank(10, 4, 1).memory[0, [5, 1, 8]])
