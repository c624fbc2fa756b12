"""An observer of your own: every step's loss, kept per epoch and reported in the epoch's record.

Register the class itself with ``contrastlab.register_observer`` (a factory ``(run) -> Observer`` works too) and add
it to a recipe's observers with ``observers+=[loss_trace]``. The step's loss stays on the device until the epoch
ends, so the trainer never waits for it; the trace is part of every checkpoint, so a resumed run goes on with it.
"""

from __future__ import annotations

import torch

import contrastlab


@contrastlab.register_observer("loss_trace")
class LossTrace(contrastlab.Observer):
    """Adds ``loss_first_step`` / ``loss_last_step`` (this epoch's) and ``steps_traced`` (the run's) to each record."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []  # this epoch's losses, on the device
        self.trace: list[float] = []  # every finished epoch's, on the host

    def on_step_end(self, run, output):
        self.pending.append(output.loss)  # detached by the trainer

    def on_epoch_end(self, run, record):
        losses = torch.stack(self.pending).tolist() if self.pending else []
        self.pending = []
        self.trace += losses
        if losses:
            record.update(loss_first_step=losses[0], loss_last_step=losses[-1])
        record["steps_traced"] = len(self.trace)

    def state_dict(self):
        return {"trace": list(self.trace)}  # plain data only: checkpoints never hold other objects

    def load_state_dict(self, state):
        self.trace = list(state["trace"])
