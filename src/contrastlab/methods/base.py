"""The method interface: what one training step returns, parameter groups, momentum updates.

A method owns its backbone (what kNN, the linear probe and export use), its heads and its objective.
``forward(views, labels, index)`` returns a :class:`StepOutput`; observers read ``outputs`` and never
reach into a loss. Methods with momentum encoders list them in :meth:`Method.momentum_pairs` and the
base class's :meth:`Method.after_optimizer_step` moves them (solo-learn's ``momentum_pairs`` shape).

Conventions of ``outputs`` (every tensor detached):

- ``embeddings [B, P]``: the online projection of ``views[0]`` as the projector outputs it (before any
  L2 normalisation); the backbone features for the supervised method.
- ``pos_logits`` and ``neg_logits`` (contrastive methods): row ``a`` of both belongs to the same
  anchor, so ``pos_logits`` is ``[A]`` and ``neg_logits`` is ``[A, K]`` for ``A`` anchors and ``K``
  negatives per anchor. ``A = B`` for one-directional MoCo, ``2B`` for SimCLR and symmetric MoCo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.models.ema import ema_update_

__all__ = ["Method", "StepOutput", "make_param_groups"]


@dataclass
class StepOutput:
    """What a method returns for one step.

    Attributes:
        loss: the scalar to back-propagate.
        outputs: detached tensors for observers (embeddings, pos/neg logits, class logits, ...).
        parts: named, detached loss terms for logging; they need not sum to ``loss``.
    """

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def check_step_output(method: nn.Module, result: Any) -> None:
    """ContrastlabError unless ``result`` is what a method's ``forward`` must return: a :class:`StepOutput` whose
    ``loss`` is a scalar floating-point tensor (the trainer checks a run's first step; a method written outside the
    package is told at once what is wrong, not by a traceback from deep inside the engine)."""
    what = f"{type(method).__module__}.{type(method).__qualname__}.forward(views, labels, index)"
    must = ("must return contrastlab.StepOutput(loss=<scalar tensor>, outputs={...}, parts={...}) (docs/extending.md, "
            "'A method')")
    if not isinstance(result, StepOutput):
        raise ContrastlabError(f"{what} returned a {type(result).__module__}.{type(result).__qualname__}; it {must}")
    loss = result.loss
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = (f"a tensor of shape {list(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor)
               else f"a {type(loss).__name__}")
        raise ContrastlabError(f"{what} returned a StepOutput whose loss is {got}; it {must}, the loss a 0-dim "
                               "floating-point tensor (reduce it with .mean() or .sum())")
    for field_name in ("outputs", "parts"):
        if not isinstance(getattr(result, field_name), dict):
            raise ContrastlabError(f"{what} returned a StepOutput whose {field_name} is a "
                                   f"{type(getattr(result, field_name)).__name__}; it {must}")


NETWORKS = ("online", "momentum")
"""What evaluation and export read (``model.evaluated_network``, ``--network``)."""


def evaluated_module(method: type[Method], network: str) -> str:
    """The module path, in a method's state, of the backbone that ``network`` names: ``backbone`` (``online``) or
    the method's momentum copy (``momentum``: :attr:`Method.momentum_backbone`, e.g. DINO's teacher)."""
    from contrastlab.registry import METHODS

    if network not in NETWORKS:
        raise ConfigError(f"model.evaluated_network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if network == "online":
        return "backbone"
    if method.momentum_backbone is None:
        keeping = ", ".join(name for name, cls in METHODS.items() if cls.momentum_backbone)
        raise ConfigError(f"evaluating the momentum network: method {method.name!r} keeps no momentum copy of its "
                          f"backbone (methods that do: {keeping}); set model.evaluated_network=online")
    return method.momentum_backbone


def capped_sizes(params: dict[str, Any], limits: dict[str, int]) -> list[str]:
    """``method.<key>=<limit>`` for each key of ``limits`` whose value in ``params`` exceeds it: what a method's
    :meth:`Method.smoke_overrides` returns to train its wide heads narrower in ``--smoke`` runs."""
    return [f"method.{key}={limit}" for key, limit in limits.items()
            if isinstance(params.get(key), int) and params[key] > limit]


def make_param_groups(name: str, params: Iterable[nn.Parameter], **flags: Any) -> list[dict[str, Any]]:
    """Split trainable ``params`` into a group of matrices/kernels and a group of 1-D tensors.

    The 1-D group (biases, BatchNorm scales and shifts) is flagged ``exclude_from_lars=True`` and
    ``weight_decay_exempt=True``; the other group has both ``False``. These flags only describe the
    groups: whether weight decay really skips them is the optimiser builder's choice (SimCLR and BYOL
    exempt them, MoCo v2 and SimSiam decay everything). Empty groups are dropped.

    Args:
        name: the group name; the 1-D group is called ``f"{name}_1d"``.
        params: parameters; those with ``requires_grad=False`` are skipped.
        **flags: extra keys copied into both groups (e.g. ``fixed_lr=True``).

    Returns:
        up to two dicts with ``params``, ``name``, ``exclude_from_lars``, ``weight_decay_exempt``,
        ``fixed_lr`` (default ``False``) and the given flags.
    """
    trainable = [p for p in params if p.requires_grad]
    matrices = [p for p in trainable if p.ndim > 1]
    vectors = [p for p in trainable if p.ndim <= 1]
    groups = []
    for group_name, group_params, exempt in ((name, matrices, False), (f"{name}_1d", vectors, True)):
        if group_params:
            group: dict[str, Any] = {
                "params": group_params,
                "name": group_name,
                "exclude_from_lars": exempt,
                "weight_decay_exempt": exempt,
                "fixed_lr": False,
            }
            group.update(flags)
            groups.append(group)
    return groups


class Method(nn.Module):
    """Base of every method.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.

    Attributes:
        name: registry name of the method.
        backbone: the online backbone.
        feature_dim: the backbone's output dimension.
    """

    name: ClassVar[str] = "method"
    takes_cohort: ClassVar[bool] = False  #: built around a Cohort of peers (model.peers), not one backbone
    min_batch_per_rank: ClassVar[int] = 1  #: the fewest images per rank a step learns from (see batch_size_needed)
    min_batch_reason: ClassVar[str] = ""  #: why, when more than 1 (ends the trainer's message)
    #: module path of the momentum (EMA) copy of ``backbone`` (DINO's teacher, MoCo's key encoder), which
    #: ``contrastlab eval/export --network momentum`` reads; None when the method keeps none
    momentum_backbone: ClassVar[str | None] = None

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ConfigError(f"feature_dim must be positive, got {feature_dim}")
        self.backbone = backbone
        self.feature_dim = feature_dim

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        """One step on a batch: ``views`` is a list of ``[B, 3, H, W]`` tensors."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups of every trainable parameter (see :func:`make_param_groups`)."""
        return make_param_groups(self.name, self.parameters())

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, momentum)`` module pairs that :meth:`after_optimizer_step` averages; none here."""
        return []

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Class scores ``[B, C]`` of each classifier head for images ``x``; ``None`` without classifiers.

        Supervised methods return their heads by name (MCL: ``peer0`` ... and ``ensemble``); the trainer's
        test-set classification monitor reports the accuracy of each.
        """
        return None

    @property
    def logit_temperature(self) -> float | None:
        """The temperature that divides the scores in ``outputs["pos_logits"/"neg_logits"]`` (None: no logits)."""
        criterion = getattr(self, "criterion", None)
        return getattr(criterion, "temperature", None)

    def ddp_ignored_buffers(self) -> list[str]:
        """Names of buffers the method keeps identical across ranks itself (queues, memories).

        The trainer tells DDP to leave them alone (no broadcast from rank 0 at every forward, which would
        cost a full copy per step) and broadcasts them once from rank 0 when training starts.
        """
        return []

    def rank_local_buffers(self) -> list[str]:
        """Names of buffers whose values differ from rank to rank (SwAV's queue of each rank's own embeddings).

        List them in :meth:`ddp_ignored_buffers` too, so DDP does not overwrite them with rank 0's. The trainer
        saves every rank's copy in each checkpoint and gives each rank its own back on resume (with the same number
        of ranks); the start-of-run broadcast leaves them alone. None by default.
        """
        return []

    def set_progress(self, epoch: float, total_epochs: int, per_epoch: bool) -> None:
        """Told by the trainer before every step where training stands, for the method's own schedules.

        Args:
            epoch: the current epoch; whole (the epoch index) when ``per_epoch``, else fractional.
            total_epochs: the run's number of epochs.
            per_epoch: whether schedules change once per epoch (``train.schedule_unit=epoch``).

        The default tells a Feature Transformation hook (a ``feature_transform`` attribute, when the method
        has one that is not ``None``) the epoch, which switches it on at its ``start_epoch``.
        """
        ft = getattr(self, "feature_transform", None)
        if ft is not None:
            ft.set_epoch(epoch)

    def random_state(self) -> dict[str, Any]:
        """The method's own random streams, saved in mid-epoch checkpoints so a resumed run draws the same numbers.

        The default holds a Feature Transformation hook's stream (``feature_transform``), when there is one.
        """
        ft = getattr(self, "feature_transform", None)
        return {} if ft is None else {"feature_transform": ft.random_state()}

    def set_random_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`random_state` returned."""
        ft = getattr(self, "feature_transform", None)
        if ft is not None:
            ft.set_random_state(state.get("feature_transform"))

    def batch_size_needed(self) -> tuple[int, str]:
        """The fewest images per rank (``data.batch_size`` / ranks) a training step works with, and why.

        The class's :attr:`min_batch_per_rank` (2 for methods whose negatives are the batch's other images); at
        least 2 when a BatchNorm1d layer (a projector's or predictor's) normalises over the batch in training
        mode, which needs more than one value per channel. The trainer refuses a smaller batch before training.
        """
        if self.min_batch_per_rank < 2 and any(isinstance(m, nn.BatchNorm1d) for m in self.modules()):
            return 2, "its BatchNorm1d layers (in the heads) normalise over the images of a rank's batch"
        return self.min_batch_per_rank, self.min_batch_reason

    @classmethod
    def smoke_overrides(cls, params: dict[str, Any]) -> list[str]:
        """Extra ``key=value`` overrides that ``--smoke`` adds for this method, given the ``method.*`` values the run
        would build it with (constructor defaults included): sizes that only make a 2-step CPU run slow and large
        (Barlow Twins' 8192-wide projector), never a code path. None by default."""
        return []

    def before_optimizer_step(self, step: int) -> None:
        """Called after the backward pass (and gradient clipping) of optimiser step ``step`` (0-based; warm-start
        steps are step 0), before the optimiser uses the gradients: a method may drop some here, as DINO freezes its
        last layer during the first epoch and SwAV its prototypes during the first iterations (set ``p.grad = None``
        to leave a parameter and its optimiser state untouched this step). Nothing by default."""

    def warm_start_steps(self, global_batch: int) -> int:
        """Steps the method needs before the first epoch (CaCo fills its memory); 0 for most methods.

        The trainer runs them at the peak learning rate without counting them as training steps.
        """
        return 0

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float) -> None:
        """EMA of every momentum module's parameters toward its online module (buffers untouched).

        Called by the trainer after each optimiser step with the scheduled momentum; a no-op for
        methods without momentum encoders.
        """
        for online, target in self.momentum_pairs():
            ema_update_(target.parameters(), online.parameters(), momentum)

    def _two_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first two views; a method that needs two fails clearly when given fewer."""
        if len(views) < 2:
            raise ConfigError(f"method {self.name!r} needs at least 2 views per image, got {len(views)}")
        return views[0], views[1]
