"""Self-supervised Mutual Contrastive Learning on MoCo: one query encoder, key encoder and queue per peer.

Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022; the
released ``main_moco_mcl.py`` / ``moco/builder_mcl.py`` (github.com/winycg/MCL).

Every peer ``i`` of the cohort has a query encoder (its backbone and projector), a momentum key encoder and
a queue ``Q_i`` of its own keys. One step (one direction, as MoCo v1/v2): queries ``q_i`` of ``views[0]``,
keys ``k_i`` of ``views[1]`` (shuffle-BN across ranks), then with ``l^{ij} = [q_i . k_j, q_i Q_j] / tau``:

- VCL ``= sum_i CE(l^{ii}, 0)``: the MoCo loss of every peer;
- ICL ``= sum_{i != j} CE(l^{ij}, 0)``: peer ``i``'s query against peer ``j``'s key **and queue**;
- Soft VCL ``= sum_{i != j} psi_T(l^{ii}, sg(l^{jj}))``, Soft ICL ``= sum_{i != j} psi_T(l^{ij}, sg(l^{ji}))``;

(:func:`~contrastlab.objectives.moco_mutual_loss`), all weights 1 and T = 3 as released (configurable
here). Afterwards every peer's keys are gathered across ranks and enqueued: the queues move in lockstep,
so column ``k`` of every queue holds a key of the same image and the peers' ``1 + K`` distributions line
up.

The released script's defects are not reproduced: it crashed at the end of the first epoch (undefined
metrics) and its ``--mlp`` head was registered under a dotted name and never used. Here
``proj_layers=1`` is the released configuration (MoCo v1's linear fc to 128, which is what the published
result used) and ``proj_layers=2`` a real MLP head.

**Feature Transformation** (``feature_transform``, off by default) enters all four terms with one draw per
step shared by the peer pairs (:func:`~contrastlab.objectives.moco_mutual_loss`); the queues still receive
the raw keys.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.memory.queue import FeatureQueue
from contrastlab.methods.base import Method, StepOutput
from contrastlab.methods.moco import shuffled_across_ranks
from contrastlab.models.cohort import Cohort
from contrastlab.models.ema import momentum_copy
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform
from contrastlab.objectives.mutual import REDUCTIONS, moco_mutual_loss
from contrastlab.registry import register_method

__all__ = ["MoCoMCL"]


class _KeyEncoder(nn.Module):
    """The momentum cohort and its projectors: images -> one key embedding per peer."""

    def __init__(self, cohort: Cohort, projectors: nn.ModuleList) -> None:
        super().__init__()
        self.cohort = momentum_copy(cohort)
        self.projectors = momentum_copy(projectors)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.normalize(p(h), dim=1) for p, h in zip(self.projectors, self.cohort(x))]


@register_method()
class MoCoMCL(Method):
    """MoCo with a cohort of ``M`` peers contrasting against each other's keys and queues.

    Args:
        backbone: the :class:`~contrastlab.models.Cohort` (``model.peers``; the release used 2 independent
            peers).
        feature_dim: each peer's feature dimension.
        proj_hidden_dim: hidden width when ``proj_layers > 1``.
        proj_out_dim: key dimension (128).
        proj_layers: 1 = a linear fc (as released), 2 = an MLP head.
        queue_size: keys per queue (65536).
        temperature: tau (0.07).
        kl_temperature: T of the mimicry terms (3).
        alpha, gamma, beta, lam: weights of VCL, Soft VCL, ICL, Soft ICL (all 1 as released).
        reduction: ``"sum"`` (released) or ``"mean"`` over peers and pairs.
        shuffle_bn: batch shuffle across ranks for the key encoders.
        gather_distributed: gather keys across ranks before enqueueing.
        feature_transform: FT options (``{}``: the published setting) or ``None`` (off).

    Example:
        >>> from contrastlab.models import build_cohort
        >>> cohort = build_cohort("resnet20", num_peers=2, width=0.25)
        >>> method = MoCoMCL(cohort, cohort.feature_dim, proj_out_dim=8, queue_size=16)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> out.outputs["neg_logits"].shape
        torch.Size([4, 16])
    """

    name = "moco_mcl"
    takes_cohort = True

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        proj_layers: int = 1,
        queue_size: int = 65536,
        temperature: float = 0.07,
        kl_temperature: float = 3.0,
        alpha: float = 1.0,
        gamma: float = 1.0,
        beta: float = 1.0,
        lam: float = 1.0,
        reduction: str = "sum",
        shuffle_bn: bool = True,
        gather_distributed: bool = True,
        feature_transform: dict[str, Any] | FeatureTransform | None = None,
    ) -> None:
        if not isinstance(backbone, Cohort):
            raise ConfigError("method 'moco_mcl' needs a cohort of peers; set model.peers (and model.shared_until)")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"method.reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        super().__init__(backbone.peer(0), feature_dim)
        self.cohort = backbone
        self.num_peers = backbone.num_peers
        self.projectors = nn.ModuleList(build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers)
                                        for _ in range(self.num_peers))
        self.key_encoder = _KeyEncoder(backbone, self.projectors)
        self.queues = nn.ModuleList(FeatureQueue(proj_out_dim, queue_size, seed=i) for i in range(self.num_peers))
        self.loss_settings = {"temperature": temperature, "kl_temperature": kl_temperature, "alpha": alpha,
                              "gamma": gamma, "beta": beta, "lam": lam, "reduction": reduction}
        self.shuffle_bn = shuffle_bn
        self.gather_distributed = gather_distributed
        self.feature_transform = build_feature_transform(feature_transform)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.cohort, self.key_encoder.cohort), (self.projectors, self.key_encoder.projectors)]

    @property
    def logit_temperature(self) -> float:
        return self.loss_settings["temperature"]

    def ddp_ignored_buffers(self) -> list[str]:
        return [f"queues.{i}.{name}" for i in range(self.num_peers) for name in ("queue", "ptr")]

    @torch.no_grad()
    def compute_keys(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every peer's L2-normalised keys of ``x``, with shuffle-BN across ranks if enabled."""
        encode = shuffled_across_ranks(self.key_encoder) if self.shuffle_bn else self.key_encoder
        return encode(x)

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        embeddings = [p(h) for p, h in zip(self.projectors, self.cohort(x1))]
        keys = self.compute_keys(x2)
        queues = [q.queue.clone() for q in self.queues]  # the queues as they were before this step's keys
        terms = moco_mutual_loss(embeddings, keys, queues, **self.loss_settings,
                                 feature_transform=self.feature_transform)
        for queue, k in zip(self.queues, keys):  # lockstep: every queue gets the same images' keys
            queue.enqueue(k, gather_distributed=self.gather_distributed)
        seen = terms.logits[0, 0]  # peer 0 against its own key and queue, as the loss saw it
        scores = {"pos_logits": seen[:, 0], "neg_logits": seen[:, 1:]}
        if self.feature_transform is not None:
            with torch.no_grad():
                q0 = F.normalize(embeddings[0].float(), dim=1)
                tau = self.loss_settings["temperature"]
                scores["pos_logits_raw"] = (q0 * keys[0].float()).sum(dim=1) / tau
                scores["neg_logits_raw"] = q0 @ queues[0].float().T / tau
        parts = {k: v for k, v in terms.as_dict().items() if k != "total"}
        return StepOutput(
            loss=terms.loss,
            outputs={"embeddings": embeddings[0].detach(), "keys": keys[0], **scores},
            parts=parts,
        )
