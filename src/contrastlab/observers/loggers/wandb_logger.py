"""Weights & Biases (logger ``wandb``; ``pip install "contrastlab[wandb]"``).

One wandb run per training run, in ``<run>/wandb`` (``wandb.init(dir=...)``), named ``log.run_name`` (default:
the run directory's name) in project ``log.project``, with the resolved config as its config. Every tag shares
wandb's single step axis, so the epoch's scalars are recorded at the epoch's last step. A resumed training run
continues the same wandb run (its id is the logger's checkpointed state). Offline runs (``WANDB_MODE=offline``)
write everything under ``<run>/wandb/offline-run-*`` for a later ``wandb sync``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contrastlab.observers.base import Run
from contrastlab.observers.loggers.base import Logger, require
from contrastlab.registry import register_logger


class WandbLogger(Logger):
    """Scalars to a wandb run, and the final results into its summary.

    Args:
        wandb: The imported ``wandb`` module.
    """

    def __init__(self, wandb: Any) -> None:
        self.wandb, self.run, self.run_id = wandb, None, None

    def on_start(self, run: Run) -> None:
        from contrastlab.config.load import config_to_dict

        log = run.config.log
        run.out.mkdir(parents=True, exist_ok=True)
        resume = {"id": self.run_id, "resume": "allow"} if self.run_id else {}
        self.run = self.wandb.init(project=log.project, name=log.run_name or run.out.name, dir=str(run.out),
                                   config=config_to_dict(run.config), **resume)
        self.run_id = self.run.id

    def epoch_step(self, record: Mapping[str, Any]) -> int:
        return int(record["step"])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
        self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("id")


@register_logger("wandb")
def wandb_logger(run: Run) -> WandbLogger:
    return WandbLogger(require("wandb", "wandb", "wandb"))
