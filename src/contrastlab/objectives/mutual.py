"""Mutual Contrastive Learning (MCL): contrast within and across a cohort of peer networks.

Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022
(arXiv 2104.12565); the formulas follow the released code (github.com/winycg/MCL).

A cohort of ``M`` peers embeds the same images. Four terms are computed:

- **VCL** (vanilla contrast inside one network): peer ``m``'s anchors against peer ``m``'s candidates.
- **ICL** (interactive contrast across networks): peer ``m``'s anchors against peer ``n``'s candidates.
- **Soft VCL** and **Soft ICL** ("mutual mimicry"): each peer's softened similarity distribution is
  pulled towards another peer's (detached) distribution with :func:`kl_mimicry`.

VCL has ``M`` terms, one per peer; ICL, Soft VCL and Soft ICL have ``M(M - 1)`` directional terms, one
per ordered pair ``(m, n)``, ``m != n``. With ``reduction="sum"`` (the released code, whose weights were
tuned with it) each group is the sum of its terms, so the effective weight of the pairwise groups grows as
``O(M^2)``; ``reduction="mean"`` averages each group over its terms instead.

Three contrast sources share the four-term structure and the return type :class:`MutualTerms`:

- :class:`MutualContrastLoss`: supervised, in-batch (CIFAR-100 setting, tau 0.1), with labels and a
  batch from :class:`~contrastlab.data.MPerClassSampler`;
- :func:`memory_bank_mutual_loss`: supervised, one per-sample memory bank per peer (ImageNet setting,
  tau 0.07), see :class:`~contrastlab.memory.SampleMemoryBank`;
- :func:`moco_mutual_loss`: self-supervised, one MoCo queue per peer (tau 0.07).

:func:`logit_distillation` is the optional distillation of class logits from the peer ensemble.

Normalisation: every function here L2-normalises the embeddings it receives from networks (anchors,
queries, keys); stored embeddings (memory-bank rows, queue rows) are used as given, as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_no_grad, gather_with_grad, get_rank, get_world_size
from contrastlab.errors import ConfigError
from contrastlab.objectives.feature_transform import FeatureTransform

__all__ = [
    "CROSS_VIEW_OPTIONS",
    "DISTILL_TARGETS",
    "REDUCTIONS",
    "DistillationTerms",
    "InBatchMasks",
    "MutualContrastLoss",
    "MutualTerms",
    "in_batch_masks",
    "kl_mimicry",
    "logit_distillation",
    "memory_bank_mutual_loss",
    "moco_mutual_loss",
    "supcon_operator",
]

REDUCTIONS: tuple[str, ...] = ("sum", "mean")
"""How the terms of one group are combined: ``"sum"`` (released code) or ``"mean"``."""

CROSS_VIEW_OPTIONS: tuple[str, ...] = ("exclude", "positive")
"""In-batch ICL: what the same image seen by the other network is (see :func:`in_batch_masks`)."""

DISTILL_TARGETS: tuple[str, ...] = ("all", "last", "upstream_cifar")
"""Which peers :func:`logit_distillation` distils."""


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (bf16/fp16 logits under autocast lose too much in a softmax)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def supcon_operator(logits: torch.Tensor, pos_mask: torch.Tensor, denom_mask: torch.Tensor) -> torch.Tensor:
    """MCL's supervised-contrastive operator ``L(S)`` (arXiv 2104.12565; github.com/winycg/MCL).

    ``L(S) = -(1/A) sum_a (1/|P_a|) sum_b P_ab [S_ab - log sum_c D_ac exp(S_ac)]``

    Each anchor (row) averages the log-probability of its positives (``P``) under a softmax restricted
    to its denominator set (``D``). The log-normaliser is a masked ``logsumexp``, so it is stable for
    any logit scale (the released code has no max-subtraction; the value is the same). An anchor
    without any positive contributes nothing and the mean runs over the anchors that have at least one
    (with the m-per-class sampler every anchor has one, and the mean is the plain ``1/A``); a slice in
    which no anchor has a positive gives 0.

    Args:
        logits: ``S`` of shape ``[..., A, C]`` (anchors by candidates), already divided by the
            temperature. Leading dimensions are independent problems.
        pos_mask: ``P``, boolean or 0/1, broadcastable to ``logits``.
        denom_mask: ``D``, boolean or 0/1, broadcastable to ``logits``.

    Returns:
        ``L(S)`` of shape ``[...]`` (a scalar for 2-D logits), in at least float32.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> eye = torch.eye(4, dtype=torch.bool)
        >>> pos = (labels[:, None] == labels[None, :]) & ~eye
        >>> z = F.normalize(torch.randn(4, 8), dim=1)
        >>> supcon_operator(z @ z.T / 0.1, pos, ~eye).shape
        torch.Size([])
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., A, C], got {tuple(logits.shape)}")
    logits = _float(logits)
    pos = torch.broadcast_to(pos_mask.to(device=logits.device, dtype=torch.bool), logits.shape)
    denom = torch.broadcast_to(denom_mask.to(device=logits.device, dtype=torch.bool), logits.shape)
    log_norm = logits.masked_fill(~denom, float("-inf")).logsumexp(dim=-1, keepdim=True)
    log_prob = logits - log_norm
    num_pos = pos.sum(dim=-1)  # [..., A]
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=-1)
    mean_log_prob_pos = pos_log_prob / num_pos.clamp(min=1)
    has_pos = num_pos > 0
    total = torch.where(has_pos, mean_log_prob_pos, torch.zeros_like(mean_log_prob_pos)).sum(dim=-1)
    return -total / has_pos.sum(dim=-1).clamp(min=1)


def kl_mimicry(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 3.0,
    *,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """MCL's mutual mimicry ``psi_T`` (arXiv 2104.12565; github.com/winycg/MCL), Hinton et al.'s distillation loss.

    ``psi_T(s, t) = T^2 * (1/B) sum_a KL( softmax(t_a / T) || softmax(s_a / T) )``

    The softmax runs over every column, unmasked (in-batch: the self-similarity on the diagonal
    included). The teacher is detached inside, so no gradient reaches it.

    Args:
        student_logits: ``[..., B, C]``.
        teacher_logits: same shape as ``student_logits``.
        temperature: ``T`` (MCL: 3).
        detach_teacher: detach the teacher (MCL always does; ``False`` only reproduces upstream's
            ImageNet logit distillation, see :func:`logit_distillation`).

    Returns:
        ``[...]`` (a scalar for 2-D inputs), in at least float32.

    Example:
        >>> s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
        >>> kl_mimicry(s, t, 3.0).backward()
        >>> t.grad is None
        True
    """
    _check_positive("KL temperature", temperature)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(
            "student and teacher logits must have the same shape [..., B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    log_p_student = F.log_softmax(_float(student_logits) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(_float(teacher_logits) / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # [..., B]
    return kl.mean(dim=-1) * temperature**2


@dataclass(frozen=True)
class MutualTerms:
    """The four MCL terms, their directional parts and the weighted total.

    Attributes:
        loss: the weighted total ``alpha VCL + gamma SoftVCL + beta ICL + lam SoftICL``.
        vcl, icl, soft_vcl, soft_icl: each group reduced over its terms (sum or mean), unweighted.
        vcl_terms: ``[M]``, one term per peer.
        icl_terms, soft_vcl_terms, soft_icl_terms: ``[M(M - 1)]``, one term per ordered pair in
            :attr:`pairs`. For the pair ``(m, n)``: ICL contrasts peer ``m``'s anchors against peer ``n``'s
            candidates; Soft VCL makes peer ``m`` mimic peer ``n``; Soft ICL makes ``m``-against-``n``
            mimic ``n``-against-``m``.
        pairs: the ordered pairs ``(m, n)``, ``m != n``, in row-major order.
        logits: detached ``[M, M, B, 1 + K]`` logits ``l^{ij}`` the loss saw (:func:`moco_mutual_loss` only).
    """

    loss: torch.Tensor
    vcl: torch.Tensor
    icl: torch.Tensor
    soft_vcl: torch.Tensor
    soft_icl: torch.Tensor
    vcl_terms: torch.Tensor
    icl_terms: torch.Tensor
    soft_vcl_terms: torch.Tensor
    soft_icl_terms: torch.Tensor
    pairs: tuple[tuple[int, int], ...]
    logits: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Detached scalars for logging: the four groups (unweighted) and the weighted ``total``."""
        return {
            "vcl": self.vcl.detach(),
            "icl": self.icl.detach(),
            "soft_vcl": self.soft_vcl.detach(),
            "soft_icl": self.soft_icl.detach(),
            "total": self.loss.detach(),
        }


def _ordered_pairs(num_peers: int) -> tuple[tuple[int, int], ...]:
    return tuple((m, n) for m in range(num_peers) for n in range(num_peers) if m != n)


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean" and terms.numel() > 0:
        return terms.mean()
    return terms.sum()


def _assemble(
    vcl_terms: torch.Tensor,
    icl_terms: torch.Tensor,
    soft_vcl_terms: torch.Tensor,
    soft_icl_terms: torch.Tensor,
    pairs: tuple[tuple[int, int], ...],
    weights: tuple[float, float, float, float],
    reduction: str,
    logits: torch.Tensor | None = None,
) -> MutualTerms:
    alpha, gamma, beta, lam = weights
    vcl = _reduce(vcl_terms, reduction)
    icl = _reduce(icl_terms, reduction)
    soft_vcl = _reduce(soft_vcl_terms, reduction)
    soft_icl = _reduce(soft_icl_terms, reduction)
    loss = alpha * vcl + gamma * soft_vcl + beta * icl + lam * soft_icl
    return MutualTerms(loss, vcl, icl, soft_vcl, soft_icl, vcl_terms, icl_terms, soft_vcl_terms,
                       soft_icl_terms, pairs, logits)


def _stack_embeddings(embeddings: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """``[M, B, D]`` from ``M`` tensors ``[B, D]`` (or an ``[M, B, D]`` tensor)."""
    if len(embeddings) == 0:
        raise ValueError(f"{what}: need at least one peer")
    shapes = {tuple(e.shape) for e in embeddings}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{what}: every peer must be [B, D] with the same B and D, got {sorted(shapes)}")
    return torch.stack(list(embeddings))


class InBatchMasks(NamedTuple):
    """Boolean ``[B, N]`` masks of in-batch MCL (rows: this rank's anchors; columns: all candidates).

    Attributes:
        pos: VCL positives ``P``: same label, not the anchor itself.
        denom: VCL denominator ``D``: every column except the anchor itself.
        cross_pos: ICL positives: ``P`` (``"exclude"``) or same label including the same image
            (``"positive"``).
        cross_denom: ICL denominator: ``D`` (``"exclude"``) or every column (``"positive"``).
    """

    pos: torch.Tensor
    denom: torch.Tensor
    cross_pos: torch.Tensor
    cross_denom: torch.Tensor


def in_batch_masks(
    labels: torch.Tensor,
    column_labels: torch.Tensor | None = None,
    offset: int = 0,
    cross_view: str = "exclude",
) -> InBatchMasks:
    """The masks of in-batch supervised MCL (arXiv 2104.12565; github.com/winycg/MCL).

    The anchor in row ``a`` is candidate column ``a + offset`` (its own image). VCL excludes that
    column from positives and denominator. For ICL, column ``a + offset`` is the same image seen by the
    other network: ``cross_view="exclude"`` (released CIFAR code and the L-MCL follow-up) leaves it out of
    both, exactly like VCL, so the only cross-network positive is the other same-class image;
    ``cross_view="positive"`` makes it a positive and keeps it in the denominator.

    Args:
        labels: ``[B]`` labels of the anchors.
        column_labels: ``[N]`` labels of the candidates (the gathered batch); ``labels`` by default.
        offset: column of anchor 0 (``rank * B`` when candidates were gathered from every rank).
        cross_view: ``"exclude"`` or ``"positive"``.

    Returns:
        :class:`InBatchMasks`.

    Example:
        >>> masks = in_batch_masks(torch.tensor([0, 0, 1, 1]))
        >>> masks.pos.sum(dim=1).tolist()
        [1, 1, 1, 1]
    """
    _check_choice("cross_view", cross_view, CROSS_VIEW_OPTIONS)
    if column_labels is None:
        column_labels = labels
    rows = torch.arange(labels.shape[0], device=labels.device)
    own = torch.zeros(labels.shape[0], column_labels.shape[0], dtype=torch.bool, device=labels.device)
    own[rows, rows + offset] = True
    same = labels[:, None] == column_labels[None, :].to(labels.device)
    pos, denom = same & ~own, ~own
    if cross_view == "exclude":
        return InBatchMasks(pos, denom, pos, denom)
    return InBatchMasks(pos, denom, same, torch.ones_like(own))


class MutualContrastLoss(nn.Module):
    """Supervised in-batch MCL (CIFAR-100 setting of the release).

    For peers ``m, n`` let ``S^{mn} = z_m z_n^T / tau`` (anchors of peer ``m`` against candidates of
    peer ``n``), with the masks of :func:`in_batch_masks` and the operator ``L`` of
    :func:`supcon_operator`:

    - ``VCL = sum_m L(S^{mm})`` with ``P`` and ``D``;
    - ``ICL = sum_{m != n} L(S^{mn})`` with the cross-view masks;
    - ``SoftVCL = sum_{m != n} psi_T(S^{mm}, sg(S^{nn}))``;
    - ``SoftICL = sum_{m != n} psi_T(S^{mn}, sg(S^{nm}))``;
    - ``loss = alpha VCL + gamma SoftVCL + beta ICL + lam SoftICL``.

    Embeddings are L2-normalised inside (the MCL projection head already outputs unit vectors; a second
    normalisation changes nothing). The batch must give every anchor a same-class partner: use
    :class:`~contrastlab.data.MPerClassSampler` (64 classes x 2 images for a batch of 128); anchors
    without any positive are left out of ``L``.

    With ``gather_distributed=True`` the candidates (every peer's embeddings, with gradient, and the
    labels) are gathered from all ranks and each rank scores its own anchors against the global batch,
    averaged over its anchors. Under DDP (which averages gradients over ranks) this gives the gradient
    of the single-process loss on the global batch, as for
    :class:`~contrastlab.objectives.NTXentLoss`.

    Args:
        temperature: contrast ``tau`` (0.1 in the released code; 0.07 before Feb. 2022).
        kl_temperature: ``T`` of the mimicry terms (3).
        alpha: VCL weight. gamma: Soft VCL weight. beta: ICL weight. lam: Soft ICL weight
            (0.1 / 1.0 / 0.1 / 1.0 in every published run).
        cross_view: ``"exclude"`` (released CIFAR masking, default) or ``"positive"``; see
            :func:`in_batch_masks`.
        reduction: ``"sum"`` over peers and pairs (released, default; the pairwise groups grow as
            ``O(M^2)``) or ``"mean"``.
        gather_distributed: contrast against the batch of every rank.

    The forward pass takes ``embeddings`` (``M`` tensors ``[B, D]``, one per peer, same images in the
    same order) and ``labels [B]`` and returns :class:`MutualTerms`.

    Example:
        >>> loss_fn = MutualContrastLoss()
        >>> labels = torch.arange(4).repeat_interleave(2)  # 4 classes x 2 images
        >>> out = loss_fn([torch.randn(8, 128), torch.randn(8, 128)], labels)
        >>> out.icl_terms.shape, sorted(out.as_dict())
        (torch.Size([2]), ['icl', 'soft_icl', 'soft_vcl', 'total', 'vcl'])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        kl_temperature: float = 3.0,
        alpha: float = 0.1,
        gamma: float = 1.0,
        beta: float = 0.1,
        lam: float = 1.0,
        cross_view: str = "exclude",
        reduction: str = "sum",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        _check_positive("MCL temperature", temperature)
        _check_positive("MCL KL temperature", kl_temperature)
        _check_choice("cross_view", cross_view, CROSS_VIEW_OPTIONS)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.temperature = temperature
        self.kl_temperature = kl_temperature
        self.weights = (alpha, gamma, beta, lam)
        self.cross_view = cross_view
        self.reduction = reduction
        self.gather_distributed = gather_distributed

    def forward(self, embeddings: Sequence[torch.Tensor], labels: torch.Tensor) -> MutualTerms:
        z = F.normalize(_stack_embeddings(embeddings, "MutualContrastLoss"), dim=-1)  # [M, B, D]
        num_peers, batch, _ = z.shape
        if labels.shape != (batch,):
            raise ValueError(f"labels must be [{batch}], got {tuple(labels.shape)}")
        if self.gather_distributed and get_world_size() > 1:
            # gather_with_grad concatenates along dim 0: put the batch first.
            candidates = gather_with_grad(z.transpose(0, 1).contiguous()).transpose(0, 1)  # [M, N, D]
            column_labels = gather_no_grad(labels)
            offset = batch * get_rank()
        else:
            candidates, column_labels, offset = z, labels, 0
        masks = in_batch_masks(labels, column_labels, offset, self.cross_view)
        logits = _float(torch.einsum("mbd,nkd->mnbk", z, candidates)) / self.temperature  # [M, M, B, N]

        pairs = _ordered_pairs(num_peers)
        first = torch.tensor([m for m, _ in pairs], dtype=torch.long, device=z.device)
        second = torch.tensor([n for _, n in pairs], dtype=torch.long, device=z.device)
        peers = torch.arange(num_peers, device=z.device)
        within = logits[peers, peers]  # [M, B, N]: S^{mm}
        t = self.kl_temperature
        return _assemble(
            vcl_terms=supcon_operator(within, masks.pos, masks.denom),
            icl_terms=supcon_operator(logits[first, second], masks.cross_pos, masks.cross_denom),
            soft_vcl_terms=kl_mimicry(within[first], within[second], t),
            soft_icl_terms=kl_mimicry(logits[first, second], logits[second, first], t),
            pairs=pairs,
            weights=self.weights,
            reduction=self.reduction,
        )


def memory_bank_mutual_loss(
    embeddings: Sequence[torch.Tensor],
    stored: Sequence[torch.Tensor],
    *,
    pos_k: int = 1,
    temperature: float = 0.07,
    kl_temperature: float = 3.0,
    alpha: float = 0.1,
    gamma: float = 1.0,
    beta: float = 0.1,
    lam: float = 1.0,
    reduction: str = "sum",
) -> MutualTerms:
    """Supervised MCL against per-peer memory banks (ImageNet setting of the release).

    Every anchor ``a`` comes with ``K = 1 + pos_k + neg_k`` sampled dataset indices ``I_a`` (see
    :func:`~contrastlab.memory.sample_contrast_indices`): column 0 its own index, columns
    ``1 .. pos_k`` same-class indices, then ``neg_k`` other-class indices. ``stored[n][a, j]`` is peer
    ``n``'s bank row at ``I_a[j]`` (:meth:`~contrastlab.memory.SampleMemoryBank.gather`). Let
    ``l^{mn}_a = M_n[I_a] . z_m^a / tau`` (peer ``m``'s anchor against peer ``n``'s bank), ``[B, K]``:

    - ``VCL = sum_m`` of the mean over anchors of ``-mean_{positives} log softmax`` of ``l^{mm}`` with
      column 0 (the own slot) dropped: positives are the ``pos_k`` same-class slots;
    - ``ICL = sum_{m != n}`` of the same on ``l^{mn}`` over all ``K`` columns, with the own slot *and*
      the same-class slots as positives (unlike in-batch MCL, the same image is a cross-network positive);
    - ``SoftVCL = sum_{m != n} psi_T(l^{mm}, sg(l^{nn}))`` (own slot dropped);
    - ``SoftICL = sum_{m != n} psi_T(l^{mn}, sg(l^{nm}))`` (all columns; both use the same indices, so
      the distributions line up).

    Every column, positives included, is in the softmax denominator. The anchors are L2-normalised
    inside; the stored rows are detached and used as given (they start uniform in
    ``+-1/sqrt(dim/3)``, not unit vectors, as upstream). The loss does no communication: under DDP the
    banks are identical on every rank because :meth:`~contrastlab.memory.SampleMemoryBank.update`
    gathers before writing. Update the banks after this loss.

    Args:
        embeddings: ``M`` anchors ``[B, D]``, one per peer.
        stored: ``M`` tensors ``[B, K, D]``: peer ``n``'s bank rows at the sampled indices.
        pos_k: number of same-class slots after the own slot (1).
        temperature: contrast ``tau`` (0.07).
        kl_temperature: ``T`` of the mimicry terms (3).
        alpha, gamma, beta, lam: weights of VCL, Soft VCL, ICL, Soft ICL (0.1 / 1.0 / 0.1 / 1.0).
        reduction: ``"sum"`` (released) or ``"mean"`` over each group's terms.

    Returns:
        :class:`MutualTerms`, with the pair ``(m, n)`` meaning anchor ``m`` against bank ``n``.

    Example:
        >>> from contrastlab.data import ClassIndex
        >>> from contrastlab.memory import SampleMemoryBank, sample_contrast_indices
        >>> labels = torch.arange(10).repeat(5)  # 50 samples, 10 classes
        >>> bank = SampleMemoryBank(num_samples=50, dim=16, num_banks=2)
        >>> index = torch.tensor([0, 1, 2, 3])
        >>> idx = sample_contrast_indices(index, labels[index], ClassIndex(labels), neg_k=32)
        >>> z = [torch.randn(4, 16), torch.randn(4, 16)]
        >>> out = memory_bank_mutual_loss(z, [bank.gather(n, idx) for n in range(2)])
        >>> for n in range(2):
        ...     bank.update(n, index, z[n])
        >>> out.vcl_terms.shape
        torch.Size([2])
    """
    _check_positive("MCL temperature", temperature)
    _check_positive("MCL KL temperature", kl_temperature)
    _check_choice("reduction", reduction, REDUCTIONS)
    if pos_k < 1:
        raise ConfigError(f"pos_k must be at least 1, got {pos_k}")
    z = F.normalize(_stack_embeddings(embeddings, "memory_bank_mutual_loss"), dim=-1)  # [M, B, D]
    num_peers, batch, dim = z.shape
    if len(stored) != num_peers:
        raise ValueError(f"need one stored tensor per peer ({num_peers}), got {len(stored)}")
    bank_rows = torch.stack([s.detach() for s in stored])  # [M, B, K, D]
    if bank_rows.dim() != 4 or bank_rows.shape[1] != batch or bank_rows.shape[3] != dim:
        raise ValueError(f"stored tensors must be [{batch}, K, {dim}], got {tuple(bank_rows.shape[1:])}")
    columns = bank_rows.shape[2]
    if columns < pos_k + 2:
        raise ValueError(f"stored tensors need K >= 1 + pos_k + 1 = {pos_k + 2} columns, got {columns}")
    logits = _float(torch.einsum("mbd,nbkd->mnbk", z, bank_rows.to(z.dtype))) / temperature  # [M, M, B, K]

    cross_pos = torch.zeros(columns, dtype=torch.bool, device=z.device)
    cross_pos[: 1 + pos_k] = True
    within_pos = cross_pos[1:]  # own slot dropped: the pos_k same-class slots
    everything = torch.ones((), dtype=torch.bool, device=z.device)

    pairs = _ordered_pairs(num_peers)
    first = torch.tensor([m for m, _ in pairs], dtype=torch.long, device=z.device)
    second = torch.tensor([n for _, n in pairs], dtype=torch.long, device=z.device)
    peers = torch.arange(num_peers, device=z.device)
    within = logits[peers, peers][..., 1:]  # [M, B, K - 1]: own bank, own slot dropped
    t = kl_temperature
    return _assemble(
        vcl_terms=supcon_operator(within, within_pos, everything),
        icl_terms=supcon_operator(logits[first, second], cross_pos, everything),
        soft_vcl_terms=kl_mimicry(within[first], within[second], t),
        soft_icl_terms=kl_mimicry(logits[first, second], logits[second, first], t),
        pairs=pairs,
        weights=(alpha, gamma, beta, lam),
        reduction=reduction,
    )


def moco_mutual_loss(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    queues: Sequence[torch.Tensor],
    *,
    temperature: float = 0.07,
    kl_temperature: float = 3.0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    beta: float = 1.0,
    lam: float = 1.0,
    reduction: str = "sum",
    feature_transform: FeatureTransform | None = None,
) -> MutualTerms:
    """Self-supervised MCL on MoCo, one key encoder and one queue per peer (arXiv 2104.12565; github.com/winycg/MCL).

    For peers ``i, j`` let ``l^{ij} = [q_i . k_j, q_i Q_j^T] / tau`` (``[B, 1 + K]``; the positive in
    column 0): peer ``i``'s query against peer ``j``'s key **and** peer ``j``'s queue.

    - ``VCL = sum_i CE(l^{ii}, 0)``: the MoCo loss of every peer;
    - ``ICL = sum_{i != j} CE(l^{ij}, 0)``;
    - ``SoftVCL = sum_{i != j} psi_T(l^{ii}, sg(l^{jj}))``;
    - ``SoftICL = sum_{i != j} psi_T(l^{ij}, sg(l^{ji}))``.

    The queues must be filled in lockstep from the same gathered key batches, so column ``k`` of every
    queue comes from the same image and the ``(1 + K)``-way distributions are comparable across peers.
    Queries and keys are L2-normalised inside; keys and queues are detached (they come from momentum
    encoders), queue rows are used as given (:class:`~contrastlab.memory.FeatureQueue` holds unit
    vectors). The loss does no communication; enqueue with
    :meth:`~contrastlab.memory.FeatureQueue.enqueue` (which gathers keys first) after it. The released
    code hard-codes all weights to 1 and ``T = 3``; here they are arguments with those defaults.

    **Feature Transformation** (Zhu et al., ICCV 2021), when given and active, transforms every pair's
    logits with one draw per step shared by all peer pairs, so the peers' distributions stay comparable
    column by column: ``q'_ij = lam q_i + (1 - lam) k_j`` and ``k'_ij = lam k_j + (1 - lam) q_i`` (``lam``
    per step, sample or element, as the transform says), and every queue mixed with the same coefficients
    and the same permutation (column ``k`` of every mixed queue still mixes the same two images). Then
    ``l^{ij} = [q'_ij . k'_ij, q'_ij Q'_j] / tau`` feeds all four terms. The queues are not modified.

    Args:
        queries: ``M`` tensors ``[B, D]``, peer ``i``'s query encoder on the query view.
        keys: ``M`` tensors ``[B, D]``, peer ``i``'s key encoder on the key view.
        queues: ``M`` tensors ``[K, D]`` (rows are keys, the layout of
            :class:`~contrastlab.memory.FeatureQueue`).
        temperature: contrast ``tau`` (0.07).
        kl_temperature: ``T`` of the mimicry terms (3).
        alpha, gamma, beta, lam: weights of VCL, Soft VCL, ICL, Soft ICL (all 1).
        reduction: ``"sum"`` (released) or ``"mean"`` over each group's terms.
        feature_transform: optional FT hook (above).

    Returns:
        :class:`MutualTerms`, with the pair ``(i, j)`` meaning query ``i`` against key and queue ``j``.

    Example:
        >>> q = [torch.randn(4, 16), torch.randn(4, 16)]
        >>> k = [torch.randn(4, 16), torch.randn(4, 16)]
        >>> queues = [F.normalize(torch.randn(64, 16), dim=1) for _ in range(2)]
        >>> moco_mutual_loss(q, k, queues).loss.shape
        torch.Size([])
    """
    _check_positive("MCL temperature", temperature)
    _check_positive("MCL KL temperature", kl_temperature)
    _check_choice("reduction", reduction, REDUCTIONS)
    q = F.normalize(_stack_embeddings(queries, "moco_mutual_loss queries"), dim=-1)  # [M, B, D]
    k = F.normalize(_stack_embeddings(keys, "moco_mutual_loss keys").detach(), dim=-1)
    num_peers = q.shape[0]
    if k.shape != q.shape:
        raise ValueError(f"keys must match queries {tuple(q.shape)}, got {tuple(k.shape)}")
    if len(queues) != num_peers:
        raise ValueError(f"need one queue per peer ({num_peers}), got {len(queues)}")
    queue = torch.stack([x.detach() for x in queues]).to(q.dtype)  # [M, K, D]
    if queue.dim() != 3 or queue.shape[2] != q.shape[2]:
        raise ValueError(f"queues must be [K, {q.shape[2]}], got {tuple(queue.shape[1:])}")
    ft = feature_transform if feature_transform is not None and feature_transform.active else None
    if ft is None:
        positive = torch.einsum("ibd,jbd->ijb", q, k).unsqueeze(-1)  # [M, M, B, 1]
        negative = torch.einsum("ibd,jkd->ijbk", q, queue)  # [M, M, B, K]
    else:
        pair_q = q[:, None].expand(num_peers, num_peers, *q.shape[1:])  # [M, M, B, D]: q_i for every j
        if ft.transforms_positives:
            pair_lam = ft.positive_coefficients(q.shape[1], q.shape[2], q.device)  # not ``lam``, a loss weight
            pair_q, pair_k = ft.mix_pairs(pair_q, k[None], pair_lam)
        else:
            pair_k = k[None].expand_as(pair_q)
        if ft.transforms_negatives:
            queue = ft.mix_negatives(queue, *ft.negative_coefficients(queue.shape[1], queue.shape[2], q.device))
        positive = (pair_q * pair_k).sum(-1, keepdim=True)
        negative = torch.einsum("ijbd,jkd->ijbk", pair_q, queue)
    logits = _float(torch.cat([positive, negative], dim=-1)) / temperature  # [M, M, B, 1 + K]

    target = torch.zeros(logits.shape[-1], dtype=torch.bool, device=q.device)
    target[0] = True
    everything = torch.ones((), dtype=torch.bool, device=q.device)
    pairs = _ordered_pairs(num_peers)
    first = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=q.device)
    second = torch.tensor([j for _, j in pairs], dtype=torch.long, device=q.device)
    peers = torch.arange(num_peers, device=q.device)
    within = logits[peers, peers]  # [M, B, 1 + K]
    t = kl_temperature
    return _assemble(
        vcl_terms=supcon_operator(within, target, everything),
        icl_terms=supcon_operator(logits[first, second], target, everything),
        soft_vcl_terms=kl_mimicry(within[first], within[second], t),
        soft_icl_terms=kl_mimicry(logits[first, second], logits[second, first], t),
        pairs=pairs,
        weights=(alpha, gamma, beta, lam),
        reduction=reduction,
        logits=logits.detach(),
    )


@dataclass(frozen=True)
class DistillationTerms:
    """Result of :func:`logit_distillation`.

    Attributes:
        loss: the terms reduced (sum or mean).
        terms: ``[len(students)]``, ``psi_T(logits_k, ensemble)`` for each distilled peer ``k``.
        students: the distilled peers, in order.
    """

    loss: torch.Tensor
    terms: torch.Tensor
    students: tuple[int, ...]

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{"logit_kd": loss}``, detached, for logging."""
        return {"logit_kd": self.loss.detach()}


def logit_distillation(
    logits: Sequence[torch.Tensor],
    temperature: float = 3.0,
    targets: str = "all",
    detach_teacher: bool = True,
    reduction: str = "sum",
) -> DistillationTerms:
    """Distil class logits from the peer ensemble (MCL's ``--logit-distill``).

    The teacher is the ensemble mean ``e = (1/M) sum_m logits_m``; each distilled peer ``k`` adds
    ``psi_T(logits_k, e)`` (:func:`kl_mimicry`). There is no peer-to-peer logit term.

    Args:
        logits: ``M`` tensors ``[B, num_classes]``.
        temperature: ``T`` (3).
        targets: which peers are distilled: ``"all"`` (default), ``"last"`` (upstream ImageNet), or
            ``"upstream_cifar"`` (both peers when ``M == 2``, the last peer otherwise).
        detach_teacher: detach the ensemble (default, and upstream CIFAR). ``False`` reproduces
            upstream ImageNet, where gradient flows into every peer through the teacher.
        reduction: ``"sum"`` (released) or ``"mean"`` over the distilled peers.

    Returns:
        :class:`DistillationTerms`.

    Example:
        >>> out = logit_distillation([torch.randn(4, 10), torch.randn(4, 10)], targets="last")
        >>> out.students
        (1,)
    """
    _check_positive("logit distillation temperature", temperature)
    _check_choice("targets", targets, DISTILL_TARGETS)
    _check_choice("reduction", reduction, REDUCTIONS)
    stacked = _stack_embeddings(logits, "logit_distillation")  # [M, B, C]
    num_peers = stacked.shape[0]
    if targets == "all" or (targets == "upstream_cifar" and num_peers == 2):
        students = tuple(range(num_peers))
    else:
        students = (num_peers - 1,)
    ensemble = stacked.mean(dim=0)
    if detach_teacher:
        ensemble = ensemble.detach()
    chosen = stacked[list(students)]
    terms = kl_mimicry(chosen, ensemble.expand_as(chosen), temperature, detach_teacher=False)
    return DistillationTerms(_reduce(terms, reduction), terms, students)
