"""Feature Transformation (FT): positive extrapolation and negative interpolation in embedding space.

Zhu, Zhao, Liu, Sun, Chen, "Improving Contrastive Learning by Visualizing Feature Transformation",
ICCV 2021 (arXiv 2108.02982), section 4; reference code ``memory/mem_moco.py`` (``RGBMoCo_dropmix_norm``)
of github.com/DTennant/CL-Visualizing-Feature-Transformation.

FT is a hook between the L2-normalised embeddings and the logits of any InfoNCE loss. For a positive
pair ``(q, k)`` and a set of negatives ``n_1..n_K``:

- **positive extrapolation**: ``q' = lam * q + (1 - lam) * k`` and ``k' = lam * k + (1 - lam) * q`` with
  one ``lam = 1 + Beta(alpha_pos, alpha_pos)`` shared by the two (so ``lam >= 1``). Then
  ``q' - k' = (2 lam - 1)(q - k)``: the pair is pushed apart along its own difference and, for unit
  ``q, k`` with cosine ``c``, ``q'.k' = c + 2 lam (1 - lam)(1 - c) <= c`` (a harder positive);
- **negative interpolation**: ``n'_j = lam_j * n_j + (1 - lam_j) * n_perm(j)`` with ``perm`` a uniformly
  random permutation of the ``K`` negatives and ``lam ~ Beta(alpha_neg, alpha_neg)``.

The transformed query is used against the transformed negatives too (as upstream, which computes every
logit from the mixed ``q``). Nothing is re-normalised afterwards unless asked (upstream's default), so
transformed features are not unit vectors and their dot products are not cosines. The given tensors are
never modified: the negatives (a MoCo queue) are read, and the queue still receives the raw keys.

**Randomness.** Every draw comes from a ``torch.Generator`` on the features' device. It is seeded from
``(seed, rank, epoch)``: give each rank its rank (``rank=None`` reads the process group's rank when the
first draw happens) and the same ``seed``; the stream is re-seeded at every whole epoch that
:meth:`FeatureTransform.set_epoch` reports, so a run resumed from an epoch boundary draws the same
coefficients as an uninterrupted one. An explicit ``generator`` overrides all of this. Per call the
draws happen in this order: positive coefficients, negative coefficients, then the permutation.

Example:
    >>> ft = FeatureTransform(target="posneg", pos_alpha=2.0, neg_alpha=1.6, seed=0, rank=0)
    >>> q, k = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> queue = F.normalize(torch.randn(32, 8), dim=1)
    >>> out = ft(q, k, queue)
    >>> out.q.shape, out.negatives.shape, bool(out.pos_lambda.min() >= 1)
    (torch.Size([4, 8]), torch.Size([32, 8]), True)
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import get_rank
from contrastlab.errors import ConfigError

__all__ = [
    "GRANULARITIES",
    "LAWS",
    "RENORMALIZE",
    "TARGETS",
    "FeatureTransform",
    "FeatureTransformOutput",
    "build_feature_transform",
    "sample_beta",
]

TARGETS = ("pos", "neg", "posneg")
LAWS = ("beta", "uniform")
GRANULARITIES = ("step", "sample", "element")
RENORMALIZE = ("none", "pos", "neg", "both")

# Published setting (upstream README's training command): --mixnorm_target posneg --sep_alpha
# --pos_alpha 2.0 --neg_alpha 1.6 --mask_distribution beta --expolation_mask, --dim_mask none (its default).
DEFAULT_POS_ALPHA = 2.0
DEFAULT_NEG_ALPHA = 1.6


class FeatureTransformOutput(NamedTuple):
    """The transformed features and the random quantities that produced them.

    Attributes:
        q: transformed queries ``[B, D]`` (the input itself when positives are not transformed).
        k: transformed keys ``[B, D]``.
        negatives: transformed negatives ``[K, D]`` (a new tensor), or the input (possibly ``None``).
        pos_lambda: the positive coefficients, broadcastable to ``[B, D]`` (``[1, 1]``, ``[B, 1]`` or
            ``[B, D]``), float32; ``None`` when positives were not transformed.
        neg_lambda: the negative coefficients, broadcastable to ``[K, D]``; ``None`` when not drawn.
        permutation: the partner of each negative, ``[K]`` long; ``None`` when not drawn.
    """

    q: torch.Tensor
    k: torch.Tensor
    negatives: torch.Tensor | None
    pos_lambda: torch.Tensor | None
    neg_lambda: torch.Tensor | None
    permutation: torch.Tensor | None


def sample_beta(
    alpha: float, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """Draw ``Beta(alpha, alpha)`` samples of ``shape`` (float32) from ``generator``.

    ``X / (X + Y)`` with ``X, Y ~ Gamma(alpha, 1)`` independent, drawn by ``torch._standard_gamma``, the
    only gamma sampler of PyTorch that takes an explicit generator (``torch.distributions`` does not).
    The rare case ``X + Y == 0`` (both underflow, only for tiny ``alpha``) gives 0.5.

    Args:
        alpha: both concentration parameters, ``> 0``.
        shape: output shape.
        generator: the random stream; its device must be ``device``.
        device: where to sample (default: the generator's device).

    Returns:
        a float32 tensor of ``shape`` with values in ``[0, 1]``.
    """
    device = generator.device if device is None else torch.device(device)
    concentration = torch.full(shape, float(alpha), dtype=torch.float32, device=device)
    x = torch._standard_gamma(concentration, generator=generator)
    y = torch._standard_gamma(concentration, generator=generator)
    total = x + y
    return torch.where(
        total > 0, x / total.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(x, 0.5)
    )


def _stream_seed(seed: int, rank: int, epoch: int) -> int:
    """A distinct, reproducible seed for each (seed, rank, epoch), apart from the trainer's own streams."""
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101 + 0xF7F7) % 2**63


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ConfigError(
            f"feature_transform.{key} must be one of {', '.join(map(repr, valid))}; got {value!r}"
        )
    return value


def _check_alpha(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(f"feature_transform.{key} must be a positive finite number, got {value!r}")
    return float(value)


class FeatureTransform(nn.Module):
    """Positive extrapolation and negative interpolation of Zhu et al. (ICCV 2021).

    The module has no parameters and no buffers (it adds nothing to a state dict). It expects
    L2-normalised features, as upstream, whose projection heads end in an L2 normalisation.

    Args:
        target: what to transform: ``"pos"`` (the pair ``q, k``), ``"neg"`` (the negatives) or
            ``"posneg"`` (both; the published setting). Upstream ``--mixnorm_target``.
        pos_alpha: ``alpha`` of the positive law ``Beta(alpha, alpha)`` (published 2.0).
        neg_alpha: ``alpha`` of the negative law (published 1.6).
        alpha: one ``alpha`` shared by both laws (upstream ``--beta_alpha`` without ``--sep_alpha``);
            exclusive with ``pos_alpha`` / ``neg_alpha``.
        law: ``"beta"`` or ``"uniform"`` (``U(0, 1)``; the alphas are then unused). Upstream
            ``--mask_distribution``.
        pos_granularity: how many positive coefficients a step draws: ``"step"`` (one scalar for the
            whole batch; published), ``"sample"`` (one per pair, shared by all dimensions) or
            ``"element"`` (one per pair and per dimension, upstream's "dim mask").
        neg_granularity: the same for the negatives: one scalar, one per negative, or one per negative
            and dimension.
        extrapolate: positive coefficients are ``1 + draw`` (extrapolation; published). ``False`` gives
            positive *interpolation* (``lam = draw`` in ``[0, 1]``), the paper's ablation.
        renormalize: L2-normalise after mixing: ``"none"`` (published), ``"pos"`` (``q', k'``; what
            upstream's ``--postmix_norm`` really does), ``"neg"`` or ``"both"``.
        start_epoch: first (0-based) epoch with FT; before it the transform is the identity.
        seed: seed of the random stream (combine it with the run's seed yourself if you want them tied).
        rank: this process's rank, mixed into the seed; ``None`` reads it from the process group when
            the first draw happens.
        generator: an explicit stream to use instead (on the features' device); then ``seed``, ``rank``
            and the per-epoch re-seeding are unused.

    Example:
        >>> ft = FeatureTransform(target="pos", pos_granularity="sample", seed=3, rank=0)
        >>> q, k = F.normalize(torch.randn(5, 16), dim=1), F.normalize(torch.randn(5, 16), dim=1)
        >>> out = ft(q, k)
        >>> out.pos_lambda.shape
        torch.Size([5, 1])
    """

    def __init__(
        self,
        target: str = "posneg",
        pos_alpha: float | None = None,
        neg_alpha: float | None = None,
        alpha: float | None = None,
        law: str = "beta",
        pos_granularity: str = "step",
        neg_granularity: str = "step",
        extrapolate: bool = True,
        renormalize: str = "none",
        start_epoch: int = 0,
        seed: int = 0,
        rank: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.target = _check_choice("target", target, TARGETS)
        self.law = _check_choice("law", law, LAWS)
        self.pos_granularity = _check_choice("pos_granularity", pos_granularity, GRANULARITIES)
        self.neg_granularity = _check_choice("neg_granularity", neg_granularity, GRANULARITIES)
        self.renormalize = _check_choice("renormalize", renormalize, RENORMALIZE)
        shared = _check_alpha("alpha", alpha)
        pos, neg = _check_alpha("pos_alpha", pos_alpha), _check_alpha("neg_alpha", neg_alpha)
        if shared is not None and (pos is not None or neg is not None):
            raise ConfigError(
                "feature_transform.alpha (one alpha for both laws) excludes "
                "feature_transform.pos_alpha and feature_transform.neg_alpha; set one or the other"
            )
        self.pos_alpha = shared if shared is not None else (DEFAULT_POS_ALPHA if pos is None else pos)
        self.neg_alpha = shared if shared is not None else (DEFAULT_NEG_ALPHA if neg is None else neg)
        if not isinstance(extrapolate, bool):
            raise ConfigError(f"feature_transform.extrapolate must be true or false, got {extrapolate!r}")
        self.extrapolate = extrapolate
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ConfigError(f"feature_transform.start_epoch must be an integer >= 0, got {start_epoch!r}")
        self.start_epoch = start_epoch
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"feature_transform.seed must be an integer, got {seed!r}")
        self.seed = seed
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ConfigError(f"feature_transform.rank must be an integer >= 0 or None, got {rank!r}")
        self.rank = rank
        self.epoch: float = 0.0
        self._explicit_generator = generator
        self._generator: torch.Generator | None = None
        self._generator_key: tuple[str, int] | None = None

    # ----------------------------------------------------------------------------------------- options
    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options of the constructor (the keys a config mapping may hold)."""
        return [
            name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "generator")
        ]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> FeatureTransform:
        """Build from a config mapping; an unknown key is a :class:`ConfigError` naming the nearest ones."""
        if not isinstance(options, Mapping):
            raise ConfigError(f"feature_transform must be a mapping of options or null, got {options!r}")
        valid = cls.option_names()
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ConfigError(
                    f"unknown feature_transform option {key!r}.{hint} Valid: {', '.join(valid)}"
                )
        return cls(**dict(options))

    @property
    def transforms_positives(self) -> bool:
        """Whether ``q, k`` are transformed (target ``pos`` or ``posneg``)."""
        return self.target in ("pos", "posneg")

    @property
    def transforms_negatives(self) -> bool:
        """Whether the negatives are transformed (target ``neg`` or ``posneg``)."""
        return self.target in ("neg", "posneg")

    # ------------------------------------------------------------------------------------- schedule
    def set_epoch(self, epoch: float) -> None:
        """Where training stands (0-based, whole or fractional epochs): switches FT on at ``start_epoch``."""
        self.epoch = float(epoch)

    @property
    def active(self) -> bool:
        """Whether the epoch is at or past ``start_epoch`` (before it, :meth:`forward` is the identity)."""
        return math.floor(self.epoch) >= self.start_epoch

    # ----------------------------------------------------------------------------------- randomness
    def generator(self, device: torch.device | str) -> torch.Generator:
        """The random stream on ``device`` for the current epoch (created or re-seeded when needed)."""
        if self._explicit_generator is not None:
            return self._explicit_generator
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        epoch = max(0, math.floor(self.epoch))
        key = (str(device), epoch)
        if self._generator is None or self._generator_key != key:
            rank = get_rank() if self.rank is None else self.rank
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(_stream_seed(self.seed, rank, epoch))
            self._generator_key = key
        return self._generator

    def random_state(self) -> dict[str, Any] | None:
        """The current stream's position (for mid-epoch checkpoints); ``None`` before the first draw."""
        if self._generator is None:
            return None
        return {"key": self._generator_key, "state": self._generator.get_state()}

    def set_random_state(self, state: dict[str, Any] | None) -> None:
        """Continue the stream of :meth:`random_state` (a run resumed mid-epoch draws what it would have)."""
        if state is None:
            self._generator, self._generator_key = None, None
            return
        device, epoch = state["key"]
        self._generator = torch.Generator(device=device)
        self._generator.set_state(state["state"].cpu())
        self._generator_key = (device, epoch)

    def _draw(
        self, alpha: float, shape: tuple[int, ...], generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        if self.law == "uniform":
            return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        return sample_beta(alpha, shape, generator, device)

    @staticmethod
    def _shape(granularity: str, rows: int, dim: int) -> tuple[int, int]:
        return {"step": (1, 1), "sample": (rows, 1), "element": (rows, dim)}[granularity]

    # ------------------------------------------------------------------------------------ transforms
    def positive_coefficients(
        self, rows: int, dim: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One draw of the pair coefficients ``lam`` (``[1, 1]``, ``[rows, 1]`` or ``[rows, dim]`` by
        ``pos_granularity``; ``1 + draw`` when extrapolating)."""
        generator = self.generator(device) if generator is None else generator
        lam = self._draw(self.pos_alpha, self._shape(self.pos_granularity, rows, dim), generator,
                         torch.device(device))
        return lam + 1.0 if self.extrapolate else lam

    def mix_pairs(self, q: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q' = lam q + (1 - lam) k``, ``k' = lam k + (1 - lam) q`` (broadcasting; last dim = features)."""
        weight = lam.to(q.dtype)
        q_new = weight * q + (1 - weight) * k
        k_new = weight * k + (1 - weight) * q
        if self.renormalize in ("pos", "both"):
            q_new, k_new = F.normalize(q_new, dim=-1), F.normalize(k_new, dim=-1)
        return q_new, k_new

    def negative_coefficients(
        self, count: int, dim: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw of the negatives' mixing: ``(lam, perm)`` for ``count`` negatives of ``dim`` features."""
        generator = self.generator(device) if generator is None else generator
        device = torch.device(device)
        lam = self._draw(self.neg_alpha, self._shape(self.neg_granularity, count, dim), generator, device)
        perm = torch.randperm(count, generator=generator, device=device)
        return lam, perm

    def mix_negatives(self, negatives: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``n'_j = lam_j n_j + (1 - lam_j) n_perm(j)`` along dim -2 (a new tensor; the input is untouched)."""
        weight = lam.to(negatives.dtype)
        mixed = weight * negatives + (1 - weight) * negatives[..., perm, :]
        if self.renormalize in ("neg", "both"):
            mixed = F.normalize(mixed, dim=-1)
        return mixed

    def transform_positives(
        self, q: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Extrapolate (or interpolate) each pair: ``(q', k', lam)``, whatever :attr:`target` says."""
        if q.shape != k.shape or q.dim() != 2:
            raise ValueError(f"q and k must both be [B, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        lam = self.positive_coefficients(*q.shape, q.device, generator)
        return (*self.mix_pairs(q, k, lam), lam)

    def interpolate_negatives(
        self, negatives: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mix every negative with a random partner: ``(n', lam, perm)``; ``negatives`` is left untouched."""
        if negatives.dim() != 2:
            raise ValueError(f"negatives must be [K, D], got {tuple(negatives.shape)}")
        lam, perm = self.negative_coefficients(*negatives.shape, negatives.device, generator)
        return self.mix_negatives(negatives, lam, perm), lam, perm

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> FeatureTransformOutput:
        """Transform a batch of pairs ``q, k [B, D]`` and, when given, the negatives ``[K, D]``.

        Before ``start_epoch`` everything is returned as given. The inputs are never modified in place.
        """
        if not self.active:
            return FeatureTransformOutput(q, k, negatives, None, None, None)
        generator = self.generator(q.device)
        pos_lambda = neg_lambda = perm = None
        if self.transforms_positives:
            q, k, pos_lambda = self.transform_positives(q, k, generator)
        if self.transforms_negatives and negatives is not None:
            negatives, neg_lambda, perm = self.interpolate_negatives(negatives, generator)
        return FeatureTransformOutput(q, k, negatives, pos_lambda, neg_lambda, perm)

    def extra_repr(self) -> str:
        return (
            f"target={self.target!r}, law={self.law!r}, pos_alpha={self.pos_alpha}, "
            f"neg_alpha={self.neg_alpha}, pos_granularity={self.pos_granularity!r}, "
            f"neg_granularity={self.neg_granularity!r}, extrapolate={self.extrapolate}, "
            f"renormalize={self.renormalize!r}, start_epoch={self.start_epoch}"
        )


def build_feature_transform(options: Mapping[str, Any] | FeatureTransform | None) -> FeatureTransform | None:
    """``None`` stays ``None``; a mapping of options is validated (:meth:`FeatureTransform.from_options`)."""
    if options is None or isinstance(options, FeatureTransform):
        return options
    return FeatureTransform.from_options(options)
