"""Non-finite losses and gradients: the per-step flag, and the deferred check of ``train.finite_check_every > 1``.

With ``train.finite_check_every = 1`` the trainer reads the flag after every backward pass and stops (or skips
the step, ``train.nonfinite=skip``); with ``N > 1`` the flags of N steps are OR-ed on the device and read once,
so the host never waits for the device inside a step, and a bad step stops the run up to N - 1 steps late.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from contrastlab.engine import distributed as dist
from contrastlab.errors import ContrastlabError


class NonFiniteLossError(ContrastlabError, FloatingPointError):
    """The loss became NaN or infinite."""


def finite_flag(loss: torch.Tensor, parameters: Iterable[nn.Parameter], check_gradients: bool = True) -> torch.Tensor:
    """A device bool: the loss and (with ``check_gradients``) every gradient are finite; no host read."""
    finite = torch.isfinite(loss.detach())
    grads = [p.grad for p in parameters if p.grad is not None] if check_gradients else []
    if not grads:
        return finite
    return finite & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()


class DeferredFiniteCheck:
    """Flags of the steps since the last check, OR-ed on the device, read every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.reset(0)

    def reset(self, step: int) -> None:
        """Forget the pending flags; the next check covers the steps after ``step``."""
        self.pending: torch.Tensor | None = None
        self.since = step

    def add(self, finite: torch.Tensor) -> None:
        self.pending = ~finite if self.pending is None else self.pending | ~finite

    def check(self, step: int, device: torch.device) -> None:
        """Raise :class:`NonFiniteLossError` if a step since the last check had a non-finite loss or gradient."""
        if self.pending is None:
            return
        bad = dist.any_rank(bool(self.pending.item()), device)
        first = self.since + 1
        self.reset(step)
        if bad:
            raise NonFiniteLossError(
                f"a loss or gradient became non-finite between step {first} and step {step} (checked every "
                f"{self.every} steps, train.finite_check_every); the weights are no longer usable, the last "
                "checkpoint is. Lower optim.lr, use train.precision=fp32, set optim.clip_grad, or "
                "train.finite_check_every=1 with train.nonfinite=skip to skip such steps.")
