"""Losses against explicit formulas and brute-force loops (never against values the code printed)."""

from __future__ import annotations

import math

import pytest
import torch

from contrastlab.errors import ConfigError
from contrastlab.objectives import BYOLLoss, InfoNCELoss, NegativeCosineSimilarity, NTXentLoss


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())


def _nt_xent_brute_force(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. (1): average over all 2N anchors, log-softmax written out by hand."""
    n = z1.shape[0]
    zs = [z1[i] for i in range(n)] + [z2[i] for i in range(n)]
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        denominator = 0.0
        for b in range(2 * n):
            if b != a:
                denominator = denominator + torch.exp(_cos(zs[a], zs[b]) / t)
        total = total - (_cos(zs[a], zs[positive]) / t - torch.log(denominator))
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_brute_force(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), 3.0 * torch.randn(5, 7, generator=g)
    loss, _ = NTXentLoss(temperature=t)(z1, z2)
    assert loss.item() == pytest.approx(_nt_xent_brute_force(z1, z2, t).item(), rel=1e-5)


def test_nt_xent_base_temperature_scales_the_loss_as_supcontrast() -> None:
    """ContrastiveCrop's NT_Xent_dist: ``-(T / base_T) * mean log-prob`` (T 0.5, base_T 0.07)."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss, _ = NTXentLoss(temperature=0.5, base_temperature=0.07)(z1, z2)
    assert loss.item() == pytest.approx(0.5 / 0.07 * _nt_xent_brute_force(z1, z2, 0.5).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="base_temperature"):
        NTXentLoss(temperature=0.5, base_temperature=0.0)


def test_nt_xent_gradient_matches_brute_force_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = NTXentLoss(temperature=0.3)(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    ref = _nt_xent_brute_force(z1, z2, 0.3)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)


def test_nt_xent_logits_by_anchor() -> None:
    g = torch.Generator().manual_seed(2)
    n, t = 4, 0.5
    z1, z2 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    _, info = NTXentLoss(temperature=t)(z1, z2)
    assert info["pos_logits"].shape == (2 * n,)
    assert info["neg_logits"].shape == (2 * n, 2 * n - 2)
    zs = [z1[i] for i in range(n)] + [z2[i] for i in range(n)]
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        assert info["pos_logits"][a].item() == pytest.approx(_cos(zs[a], zs[positive]).item() / t, abs=1e-5)
        expected = sorted(_cos(zs[a], zs[b]).item() / t for b in range(2 * n) if b not in (a, positive))
        got = sorted(info["neg_logits"][a].tolist())
        assert got == pytest.approx(expected, abs=1e-5)
    assert not info["neg_logits"].requires_grad


def test_nt_xent_gather_is_identity_in_single_process() -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    a, _ = NTXentLoss(0.2, gather_distributed=False)(z1, z2)
    b, _ = NTXentLoss(0.2, gather_distributed=True)(z1, z2)
    assert a.item() == b.item()


def test_nt_xent_rejects_bad_temperature() -> None:
    with pytest.raises(ConfigError):
        NTXentLoss(temperature=0.0)


def test_info_nce_matches_formula() -> None:
    g = torch.Generator().manual_seed(4)
    b, k, d, t = 3, 6, 5, 0.2
    q, key = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    bank = torch.randn(k, d, generator=g)
    bank = bank / bank.norm(dim=1, keepdim=True)
    loss, info = InfoNCELoss(temperature=t)(q, key, bank)
    total = 0.0
    for i in range(b):
        qi = q[i] / q[i].norm()
        ki = key[i] / key[i].norm()
        pos = math.exp(float(qi @ ki) / t)
        negs = [math.exp(float(qi @ bank[j]) / t) for j in range(k)]
        total += -math.log(pos / (pos + sum(negs)))
        assert info["pos_logits"][i].item() == pytest.approx(float(qi @ ki) / t, abs=1e-5)
        assert info["neg_logits"][i].tolist() == pytest.approx(
            [float(qi @ bank[j]) / t for j in range(k)], abs=1e-5
        )
    assert loss.item() == pytest.approx(total / b, rel=1e-5)
    assert info["logits"].shape == (b, 1 + k)
    assert info["neg_logits"].shape == (b, k)


def test_info_nce_gradient_reaches_negatives() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, generator=g, requires_grad=True)
    bank = torch.randn(5, 4, generator=g, requires_grad=True)
    loss, _ = InfoNCELoss(0.1)(q, torch.randn(2, 4, generator=g), bank)
    loss.backward()
    assert q.grad is not None and bank.grad is not None and bank.grad.abs().sum() > 0


def test_negative_cosine_matches_formula() -> None:
    g = torch.Generator().manual_seed(6)
    p, z = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    expected = -sum(_cos(p[i], z[i]).item() for i in range(4)) / 4
    assert NegativeCosineSimilarity()(p, z).item() == pytest.approx(expected, rel=1e-6)
    assert NegativeCosineSimilarity()(p, 2.5 * p).item() == pytest.approx(-1.0, abs=1e-6)


def test_byol_loss_is_two_minus_two_cos() -> None:
    g = torch.Generator().manual_seed(7)
    p, z = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    expected = sum(2.0 - 2.0 * _cos(p[i], z[i]).item() for i in range(4)) / 4
    assert BYOLLoss()(p, z).item() == pytest.approx(expected, rel=1e-6)
    # And the normalised squared distance it is defined as.
    mse = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum().item() for i in range(4)) / 4
    assert BYOLLoss()(p, z).item() == pytest.approx(mse, rel=1e-6)
    assert BYOLLoss()(p, -p).item() == pytest.approx(4.0, abs=1e-6)


def test_split_positive_equals_boolean_mask_indexing_and_passes_gradients() -> None:
    from contrastlab.objectives.batch_info_nce import split_positive

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, requires_grad=True)
    positive = torch.randint(0, 11, (7,), generator=g)
    mask = torch.zeros(7, 11, dtype=torch.bool)
    mask[torch.arange(7), positive] = True
    pos, neg = split_positive(logits, positive)
    assert torch.equal(pos, logits[mask]) and torch.equal(neg, logits[~mask].view(7, 10))
    (pos.sum() + 2 * neg.sum()).backward()
    assert torch.equal(logits.grad, torch.where(mask, 1.0, 2.0))
