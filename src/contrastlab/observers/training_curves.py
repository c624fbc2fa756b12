"""Training-curve PNGs at the end of a run (observer ``plots``, rank 0): loss, learning rate, kNN top-1, throughput.

The observer keeps every epoch's record as its checkpointed state, so a resumed run plots its whole history.
"""

from __future__ import annotations

from typing import Any

from contrastlab.observers.base import Observer, Run
from contrastlab.registry import register_observer


class TrainingCurves(Observer):
    """Collects the epoch records and draws them with :func:`contrastlab.viz.curves.plot_training_curves`."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        self.history.append(record)  # the dict itself: entries later observers add are plotted too

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        if self.history:
            from contrastlab.viz.curves import plot_training_curves

            plot_training_curves(self.history, run.out / "plots")

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [r for r in state["history"]]


@register_observer("plots")
def plots_observer(run: Run) -> TrainingCurves | None:
    """``plots``: on rank 0."""
    return TrainingCurves() if run.is_main else None
