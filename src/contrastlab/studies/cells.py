"""A study's cells: one group trained with one seed (:class:`Cell`), the command lines it runs (:class:`Stage`), what
``study status`` says of it (:class:`CellStatus`), and whether the runner a state file names is still alive."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contrastlab.errors import ContrastlabError
from contrastlab.studies.spec import Evaluation, Resources

STATES = ("pending", "running", "done", "failed", "interrupted")
"""What ``study status`` says of a cell; ``interrupted``: its state file says running, but its process is gone."""


@dataclass(frozen=True)
class Stage:
    """One command line of a cell; done when ``output`` exists.

    ``argv`` is the contrastlab command (``[python, -m, contrastlab, ...]``); :meth:`command` is what runs, under
    ``torchrun`` when ``processes`` > 1 (one worker per GPU; several ``nodes`` meet at ``$MASTER_ADDR:$MASTER_PORT``).
    A cell's train and finetune stages run on all its GPUs and nodes; knn and linear stages in one process.
    """

    name: str
    argv: list[str]
    output: Path
    processes: int = 1
    nodes: int = 1

    def done(self) -> bool:
        return self.output.is_file()

    def command(self, environ: dict[str, str] | None = None) -> list[str]:
        """The command line that runs this stage (``environ``: where a multi-node rendezvous is read)."""
        if self.processes <= 1 and self.nodes <= 1:
            return list(self.argv)
        assert self.argv[1:3] == ["-m", "contrastlab"], self.argv
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(self.processes)]
        if self.nodes <= 1:
            runner.append("--standalone")
        else:
            env = os.environ if environ is None else environ
            where = f"{env.get('MASTER_ADDR', '$MASTER_ADDR')}:{env.get('MASTER_PORT', '29500')}"
            runner += ["--nnodes", str(self.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", where,
                       "--rdzv-id", self.output.parent.name]
        return [*runner, "-m", "contrastlab", *self.argv[3:]]


@dataclass(frozen=True)
class Cell:
    """One group trained with one seed: its run directory, stages and resources.

    ``overrides`` are the study's, the group's, then the command line's (:attr:`Study.extra_overrides`; the train
    stage adds ``seed``, ``out`` and ``resume=auto``);
    ``outputs`` maps every stage and evaluation to the file that holds its result (a plain ``knn`` evaluation reads
    ``knn_top1`` from the training run's ``results.json``).
    """

    id: str
    group: str
    seed: int
    recipe: str
    overrides: tuple[str, ...]
    rows: tuple[str, ...]
    evaluations: tuple[Evaluation, ...]
    resources: Resources
    run_dir: Path
    stages: tuple[Stage, ...]
    outputs: dict[str, Path]

    def done(self) -> bool:
        """Whether every stage's output exists."""
        return all(stage.done() for stage in self.stages)

    def stage(self, name: str) -> Stage:
        names = [s.name for s in self.stages]
        if name not in names:
            raise ContrastlabError(f"cell {self.id} has no stage {name!r}; its stages: {', '.join(names)}")
        return self.stages[names.index(name)]

    def definition(self) -> tuple[Any, ...]:
        """What makes its results: recipe, overrides, seed and evaluations (a change of these is a new cell)."""
        return (self.recipe, self.overrides, self.seed, self.evaluations)


@dataclass(frozen=True)
class CellStatus:
    """A cell's state (``STATES``) as ``study status`` reports it, from its outputs and its state file."""

    cell: str
    state: str
    stage: str | None = None
    launcher: str | None = None
    host: str | None = None
    pid: int | None = None
    job: str | None = None
    log: str | None = None
    reason: str = ""
    updated: str | None = None

    def describe(self) -> str:
        """One line for ``study status``."""
        parts = [f"{self.cell:<28} {self.state:<11}"]
        if self.stage and self.state != "done":
            parts.append(f"stage {self.stage}")
        if self.state in ("running", "interrupted"):
            where = f"host {self.host}, pid {self.pid}" + (f", job {self.job}" if self.job else "")
            parts.append(f"({where})")
        if self.reason:
            parts.append(f"- {self.reason}")
        if self.log and self.state in ("failed", "interrupted", "running"):
            parts.append(f"[log {self.log}]")
        return " ".join(parts)


def slurm_job() -> str | None:
    """This process's SLURM job: ``<array job>_<task>`` in an array, else the job id; None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def job_alive(job: str) -> bool | None:
    """Whether SLURM still knows job ``job`` (pending, running, requeued), by ``squeue``; None without squeue."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.returncode == 0 and bool(out.stdout.strip())


def runner_alive(record: dict[str, Any]) -> bool | None:
    """Whether the runner a ``running`` state file names still runs: its SLURM job (squeue), else its pid on this
    host; None when neither can be checked from here (another host, no squeue)."""
    from contrastlab.engine.run_lock import pid_alive

    if record.get("job"):
        alive = job_alive(str(record["job"]))
        if alive is not None:
            return alive
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return pid_alive(record["pid"], record.get("pid_start"))
    return None

