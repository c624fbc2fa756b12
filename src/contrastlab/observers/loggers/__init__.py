"""Loggers selected by the config list ``log.to``: ``jsonl`` (``metrics.jsonl``), ``tensorboard``, ``wandb``,
``mlflow`` (:mod:`contrastlab.observers.loggers.base` describes the interface).
"""

from contrastlab.observers.loggers import jsonl_logger, mlflow_logger, tensorboard_logger, wandb_logger
from contrastlab.observers.loggers.base import Logger, epoch_scalars

__all__ = ["Logger", "epoch_scalars", "jsonl_logger", "mlflow_logger", "tensorboard_logger", "wandb_logger"]
