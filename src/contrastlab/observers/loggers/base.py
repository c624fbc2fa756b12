"""Loggers: observers that send a run's scalars somewhere (a file, TensorBoard, a tracking service).

A logger receives two streams: the per-step scalars published through
:meth:`~contrastlab.observers.base.Run.log_metrics` (``train/loss`` and ``train/lr`` every ``train.log_every``
steps, at the step count) and every epoch's record, flattened by :func:`epoch_scalars` (``epoch/loss``,
``epoch/knn_top1``, ``parts/<term>``, ``test_top1/<head>``, at the epoch number). Only rank 0 has loggers.

A new logger subclasses :class:`Logger`, implements :meth:`Logger.log_metrics` (and :meth:`Logger.close`), and
registers a factory ``(run) -> Logger | None`` with :func:`contrastlab.register_logger`; the config list ``log.to``
selects it. The factory is called on every rank (check optional packages there, so every rank fails alike);
the trainer keeps rank 0's logger.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from contrastlab.errors import ConfigError
from contrastlab.observers.base import Observer, Run

__all__ = ["Logger", "epoch_scalars", "require"]


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """An epoch record as flat scalar tags: ``{key: number}`` -> ``epoch/key``, ``{key: {sub: number}}`` -> ``key/sub``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update({f"{key}/{sub}": v for sub, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[f"epoch/{key}"] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(module: str, extra: str, logger: str) -> Any:
    """Import an optional package a logger needs; ConfigError naming the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"log.to lists {logger!r}, which needs the package {module!r}: "
                          f'pip install "contrastlab[{extra}]" (or remove {logger!r} from log.to)') from exc


class Logger(Observer):
    """Base class of loggers: :meth:`log_metrics` receives both streams; :meth:`close` runs at the end."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalars ``{tag: value}`` at ``step``."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release what the logger holds (files, a tracking run)."""

    def epoch_step(self, record: Mapping[str, Any]) -> int:
        """The step the epoch's scalars are recorded at: the epoch number (a logger with one step axis for
        every tag overrides this with ``record["step"]``)."""
        return int(record["epoch"])

    def on_log(self, run: Run, metrics: Mapping[str, float], step: int) -> None:
        self.log_metrics(metrics, step)

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        self.log_metrics(epoch_scalars(record), self.epoch_step(record))

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        self.close()
