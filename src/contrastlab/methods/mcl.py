"""Supervised Mutual Contrastive Learning: a cohort of classifiers that contrast within and across peers.

Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022
(arXiv 2104.12565); the released code is github.com/winycg/MCL.

A :class:`~contrastlab.models.Cohort` of ``M`` peers (independent, or on a shared trunk) sees one view of
each image. Every peer has a linear classifier and a projection head ``Linear(d, 128) - ReLU -
Linear(128, 128)`` (L2-normalised in the loss). The loss of a step is

    sum_m CE(logits_m, y)  [+ logit distillation from the peer ensemble]  [+ the four MCL terms]

with the MCL terms (VCL, ICL, Soft VCL, Soft ICL; :mod:`contrastlab.objectives.mutual`) from one of two
contrast sources:

- ``contrast="in_batch"`` (CIFAR-100 setting): the batch itself, built by the m-per-class sampler
  (``data.sampler=m_per_class``), tau 0.1;
- ``contrast="memory_bank"`` (ImageNet setting): one per-sample memory bank per peer, with an own slot,
  ``pos_k`` same-class slots and ``neg_k`` other-class slots sampled per anchor, tau 0.07, and the
  momentum update of the anchors' rows after the loss;
- ``contrast="none"``: no MCL terms, every peer trained with cross-entropy alone: upstream's "baseline"
  (which trains two independent networks and reports the better one).

Defects of the release fixed by default (arXiv 2104.12565; github.com/winycg/MCL): the logit-distillation teacher
is detached and every peer is distilled (``distill_targets="last"`` and ``distill_detach_teacher=False``
reproduce the ImageNet script); the number of peers and trunk sharing are separate settings
(``model.peers``, ``model.shared_until``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.data.samplers import ClassIndex
from contrastlab.errors import ConfigError
from contrastlab.memory.sample_bank import SampleMemoryBank, sample_contrast_indices
from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.cohort import Cohort
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.mutual import (
    CROSS_VIEW_OPTIONS,
    DISTILL_TARGETS,
    REDUCTIONS,
    MutualContrastLoss,
    logit_distillation,
    memory_bank_mutual_loss,
)
from contrastlab.registry import register_method

__all__ = ["MCL", "cohort_predictions"]

CONTRASTS = ("in_batch", "memory_bank", "none")


def cohort_predictions(logits: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Class scores of every peer (``peer0`` ...) and of the ensemble (sum of the peers' logits)."""
    scores = {f"peer{i}": x for i, x in enumerate(logits)}
    scores["ensemble"] = torch.stack(list(logits)).sum(dim=0)
    return scores


@register_method()
class MCL(Method):
    """Supervised MCL over a cohort of peer networks.

    Args:
        backbone: the :class:`~contrastlab.models.Cohort` (``model.peers``, ``model.shared_until``).
        feature_dim: each peer's feature dimension.
        num_classes: number of classes.
        contrast: ``"in_batch"``, ``"memory_bank"`` or ``"none"`` (cross-entropy only, the baseline).
        embed_dim: output of the projection heads (128).
        temperature: contrast tau; ``None`` picks the released value of the contrast source (0.1 in
            batch, 0.07 with memory banks).
        kl_temperature: T of Soft VCL and Soft ICL (3).
        alpha, gamma, beta, lam: weights of VCL, Soft VCL, ICL, Soft ICL (0.1 / 1.0 / 0.1 / 1.0).
        cross_view: in-batch ICL: the same image seen by another peer is ``"exclude"``-d from positives
            and denominator (released CIFAR behaviour) or a ``"positive"``.
        reduction: ``"sum"`` over peers and pairs (released; grows as O(M^2)) or ``"mean"``.
        logit_distill: add logit distillation from the peer ensemble (``--logit-distill``).
        distill_targets: distilled peers: ``"all"`` (default), ``"last"`` (upstream ImageNet),
            ``"upstream_cifar"`` (both when M = 2, else the last).
        distill_detach_teacher: detach the ensemble teacher (default; upstream ImageNet did not).
        distill_temperature: T of the logit distillation (3).
        dataset_targets: the training set's labels (``memory_bank`` only; the trainer passes them).
        pos_k, neg_k: memory bank: same-class slots (1) and other-class slots (8192) per anchor.
        bank_momentum: memory bank update ``M[a] <- normalise(m M[a] + (1 - m) z_a)`` (0.5).
        gather_distributed: gather the in-batch candidates / bank updates over ranks.

    Example:
        >>> from contrastlab.models import build_cohort
        >>> cohort = build_cohort("resnet32", num_peers=2)
        >>> method = MCL(cohort, cohort.feature_dim, num_classes=10)
        >>> labels = torch.arange(4).repeat_interleave(2)
        >>> out = method([torch.randn(8, 3, 32, 32)], labels, torch.arange(8))
        >>> sorted(out.parts)[:3]
        ['cross_entropy', 'icl', 'soft_icl']
    """

    name = "mcl"
    takes_cohort = True

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        contrast: str = "in_batch",
        embed_dim: int = 128,
        temperature: float | None = None,
        kl_temperature: float = 3.0,
        alpha: float = 0.1,
        gamma: float = 1.0,
        beta: float = 0.1,
        lam: float = 1.0,
        cross_view: str = "exclude",
        reduction: str = "sum",
        logit_distill: bool = False,
        distill_targets: str = "all",
        distill_detach_teacher: bool = True,
        distill_temperature: float = 3.0,
        dataset_targets: Sequence[int] | None = None,
        pos_k: int = 1,
        neg_k: int = 8192,
        bank_momentum: float = 0.5,
        gather_distributed: bool = True,
    ) -> None:
        if not isinstance(backbone, Cohort):
            raise ConfigError("method 'mcl' needs a cohort of peers; set model.peers (and model.shared_until)")
        super().__init__(backbone.peer(0), feature_dim)
        for key, value, options in (("contrast", contrast, CONTRASTS), ("cross_view", cross_view, CROSS_VIEW_OPTIONS),
                                    ("reduction", reduction, REDUCTIONS),
                                    ("distill_targets", distill_targets, DISTILL_TARGETS)):
            if value not in options:
                raise ConfigError(f"method.{key} must be one of {', '.join(options)}, got {value!r}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.cohort = backbone
        self.num_peers = backbone.num_peers
        self.classifiers = nn.ModuleList(nn.Linear(feature_dim, num_classes) for _ in range(self.num_peers))
        self.contrast = contrast
        self.embeds = nn.ModuleList()
        if contrast != "none":
            self.embeds.extend(build_mlp(feature_dim, embed_dim, embed_dim, 2, hidden_bn=False)
                               for _ in range(self.num_peers))
        tau = temperature if temperature is not None else (0.07 if contrast == "memory_bank" else 0.1)
        weights = {"kl_temperature": kl_temperature, "alpha": alpha, "gamma": gamma, "beta": beta, "lam": lam,
                   "reduction": reduction}
        self.mutual = MutualContrastLoss(temperature=tau, cross_view=cross_view,
                                         gather_distributed=gather_distributed, **weights)
        self.bank_settings = {"temperature": tau, "pos_k": pos_k, **weights}
        self.neg_k = neg_k
        self.gather_distributed = gather_distributed
        self.logit_distill = logit_distill
        self.distill = {"temperature": distill_temperature, "targets": distill_targets,
                        "detach_teacher": distill_detach_teacher, "reduction": reduction}
        self.bank: SampleMemoryBank | None = None
        if contrast == "memory_bank":
            if dataset_targets is None:
                raise ConfigError("method.contrast=memory_bank needs the training labels (dataset_targets)")
            self.class_index = ClassIndex(dataset_targets)
            self.bank = SampleMemoryBank(len(dataset_targets), embed_dim, self.num_peers, momentum=bank_momentum)

    def batch_size_needed(self) -> tuple[int, str]:
        if self.contrast == "in_batch":
            return 2, "method.contrast=in_batch contrasts each image with the batch's other images"
        return super().batch_size_needed()

    def ddp_ignored_buffers(self) -> list[str]:
        return ["bank.memory"] if self.bank is not None else []  # updated from gathered anchors on every rank

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every peer's class logits for images ``x``."""
        return [classifier(h) for classifier, h in zip(self.classifiers, self.cohort(x))]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return cohort_predictions(self.logits(x))

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if not views:
            raise ConfigError("method 'mcl' needs at least 1 view per image, got 0")
        features = self.cohort(views[0])
        logits = [classifier(h) for classifier, h in zip(self.classifiers, features)]
        ce = torch.stack([F.cross_entropy(x.float(), labels) for x in logits]).sum()
        loss = ce
        parts: dict[str, torch.Tensor] = {"cross_entropy": ce.detach()}
        if self.logit_distill:
            kd = logit_distillation([x.float() for x in logits], **self.distill)
            loss = loss + kd.loss
            parts.update(kd.as_dict())
        z = [embed(h) for embed, h in zip(self.embeds, features)]
        if self.contrast == "in_batch":
            terms = self.mutual(z, labels)
        elif self.contrast == "memory_bank":
            assert self.bank is not None
            slots = sample_contrast_indices(index, labels, self.class_index, self.bank_settings["pos_k"], self.neg_k)
            terms = memory_bank_mutual_loss(z, [self.bank.gather(n, slots) for n in range(self.num_peers)],
                                            **self.bank_settings)
            for n, zn in enumerate(z):  # after the loss, as released: the anchors' rows move toward z
                self.bank.update(n, index, zn, gather_distributed=self.gather_distributed)
        if self.contrast != "none":
            loss = loss + terms.loss
            parts.update({k: v for k, v in terms.as_dict().items() if k != "total"})
        for i, x in enumerate(logits):
            parts[f"train_top1_peer{i}"] = (x.detach().argmax(dim=1) == labels).float().mean() * 100.0
        return StepOutput(
            loss=loss,
            outputs={"embeddings": (z[0] if z else features[0]).detach(), "logits": logits[0].detach()},
            parts=parts,
        )
