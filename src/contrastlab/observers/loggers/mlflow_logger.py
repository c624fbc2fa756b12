"""MLflow tracking (logger ``mlflow``; ``pip install "contrastlab[mlflow]"``, the client-only ``mlflow-skinny``).

One MLflow run per training run, in experiment ``log.project``, named ``log.run_name`` (default: the run
directory's name), with the resolved config as parameters (dotted keys). ``log.mlflow_uri`` is the tracking URI:
a server (``http://...``), a database (``sqlite:///...``, needs the full ``mlflow`` package), or by default a
file store in ``<run>/mlruns`` (MLflow 3 keeps file stores in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``,
which this logger sets for local stores unless it is set already). A resumed training run continues the same
MLflow run (its id is the logger's checkpointed state).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from contrastlab.observers.base import Run
from contrastlab.observers.loggers.base import Logger, require
from contrastlab.registry import register_logger

MAX_BATCH = 100  #: parameters per ``log_batch`` call (MLflow's limit)


class MLflowLogger(Logger):
    """Scalars to an MLflow run through ``MlflowClient`` (no global active run is touched)."""

    def __init__(self) -> None:
        self.client, self.run_id = None, None

    def on_start(self, run: Run) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from contrastlab.config.load import config_to_dict, flat_params

        log = run.config.log
        uri = log.mlflow_uri or (run.out / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(log.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(log.project)
        self.run_id = self.client.create_run(experiment_id, run_name=log.run_name or run.out.name).info.run_id
        params = [Param(k, v) for k, v in flat_params(config_to_dict(run.config)).items()]
        for start in range(0, len(params), MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("run_id")


@register_logger("mlflow")
def mlflow_logger(run: Run) -> MLflowLogger:
    require("mlflow", "mlflow", "mlflow")
    return MLflowLogger()
