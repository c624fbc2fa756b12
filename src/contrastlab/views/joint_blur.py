"""JointBlur(beta): the two views' Gaussian-blur strengths drawn jointly, and the JointCrop-or-JointBlur mode.

Zhang et al., AAAI 2025 (arXiv 2412.16522), appendix: besides JointCrop the authors sample the blur of the
two views jointly, and report as best drawing, for each pair, *one* of JointCrop or JointBlur with p = 0.5.
The appendix does not publish JointBlur's formula, so this is a **reconstruction**: the JointCrop(beta) law
(:mod:`contrastlab.views.planners.joint_crop`) applied to the blur sigmas instead of the crop areas.

    L = log(sigma_max / sigma_min - epsilon),   r = log(sigma_2 / sigma_1) ~ the beta family on [-L, L],
    sigma_1 | r ~ U[max(sigma_min, sigma_min e^-r), min(sigma_max, sigma_max e^-r)],   sigma_2 = sigma_1 e^r.

The family depends only on ratios, so it is drawn by :func:`~contrastlab.views.planners.joint_crop.sample_area_pair`
on ``(sigma_min / sigma_max, 1)`` and scaled by ``sigma_max``. Each view keeps its own blur probability
(a view whose blur coin fails is not blurred); when it is blurred its sigma is the joint one.

Modes: ``"always"`` blurs every pair jointly (boxes from the recipe's planner); ``"either"`` flips a fair coin
per pair (the appendix's best): heads, the JointCrop planner's boxes and independent blur sigmas; tails,
independent RandomResizedCrop boxes (same scale and ratio) and joint blur sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrastlab.errors import ConfigError
from contrastlab.views.planners.joint_crop import (
    log_area_ratio_bound,
    sample_area_pair,
    sample_area_pair_batch,
)

__all__ = ["JOINT_BLUR_MODES", "JointBlur"]

JOINT_BLUR_MODES = ("off", "always", "either")


@dataclass(frozen=True)
class JointBlur:
    """Joint sampling of the two views' blur sigmas (a reconstruction, see the module docstring).

    Args:
        mode: ``always`` (every pair) or ``either`` (per pair, JointCrop or JointBlur with p = 0.5).
        beta: shape of the log-sigma-ratio law (0 uniform, > 0 alike sigmas, < 0 one sharp and one blurred).
        sigma: ``(sigma_min, sigma_max)`` of the blur (the recipes' 0.1 - 2.0).
        epsilon: subtracted from ``sigma_max / sigma_min`` inside the bound's log, as JointCrop.

    Example:
        >>> JointBlur(beta=0.0).sample(torch.Generator().manual_seed(0))[0] >= 0.1
        True
    """

    mode: str = "always"
    beta: float = 0.0
    sigma: tuple[float, float] = (0.1, 2.0)
    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in JOINT_BLUR_MODES[1:]:
            raise ConfigError(f"views.joint_blur must be one of {', '.join(JOINT_BLUR_MODES)}, got {self.mode!r}")
        low, high = (float(v) for v in self.sigma)
        if not 0 < low < high:
            raise ConfigError(f"joint blur sigma range must satisfy 0 < min < max, got {self.sigma!r}")
        object.__setattr__(self, "sigma", (low, high))
        sample_area_pair(self.beta, (low / high, 1.0), self.epsilon, torch.Generator())  # validates beta, epsilon

    def use_joint_blur(self, generator: torch.Generator | None) -> bool:
        """Whether this pair's blur is joint: always, or a fair coin in ``either`` mode (drawn first)."""
        if self.mode == "always":
            return True
        return bool(torch.rand(1, generator=generator) < 0.5)

    def sample(self, generator: torch.Generator | None) -> tuple[float, float]:
        """``(sigma_1, sigma_2)`` of one pair."""
        low, high = self.sigma
        pair = sample_area_pair(self.beta, (low / high, 1.0), self.epsilon, generator)
        return pair.first * high, min(high, pair.second * high)

    def sample_batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batched law: each pair's decision and sigmas for ``batch`` pairs, on the generator's device.

        Returns:
            ``use_joint [B]`` bool (all True in mode ``always``, a fair coin in ``either``) and ``sigmas [B, 2]``
            float32: the JointCrop(beta) law on ``(sigma_min / sigma_max, 1)`` scaled by ``sigma_max``, the second
            sigma clamped to at most ``sigma_max``; the same law as :meth:`use_joint_blur` and :meth:`sample`.

        Example:
            >>> use, sigmas = JointBlur().sample_batch(4, torch.Generator().manual_seed(0))
            >>> tuple(use.shape), tuple(sigmas.shape)
            ((4,), (4, 2))
        """
        device = generator.device
        if self.mode == "always":
            use_joint = torch.ones(batch, dtype=torch.bool, device=device)
        else:
            use_joint = torch.rand(batch, generator=generator, device=device) < 0.5
        low, high = self.sigma
        scale = (low / high, 1.0)
        bound = log_area_ratio_bound(scale, self.epsilon)
        _, first, second = sample_area_pair_batch(self.beta, bound, scale, (batch,), generator)
        sigmas = torch.stack([first * high, torch.clamp_max(second * high, high)], dim=1)
        return use_joint, sigmas
