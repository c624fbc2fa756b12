"""The cell runner: one cell's stages, in order, as subprocesses (``contrastlab study run-cell DIR CELL [--stage S]``).

Launchers only start this command (as a local process or inside a cluster job); it does the work:

- it reads the study from ``DIR/study.yaml`` (written by :meth:`Study.prepare <contrastlab.studies.study.Study.prepare>`
  before any cell starts), and from ``DIR/study.json`` the command line's overrides of every cell and whether the
  directory holds ``--smoke`` runs;
- it skips every stage whose output exists (a rerun recomputes nothing) and runs the others, each with its stdout and
  stderr appended to ``DIR/logs/<cell>.<stage>.log`` (a header line marks each attempt);
- it writes ``DIR/cells/<cell>.json`` before and after each stage: ``running`` (host, pid, SLURM job), ``done``,
  ``failed`` (the exit status and the last error line of the attempt's log, and the log's path), or ``pending`` after
  a preemption;
- SIGTERM and SIGUSR1 are passed on to the stage (a ``torchrun`` stage's workers get SIGUSR1: its agent would stop
  them without a checkpoint on SIGTERM); a training run checkpoints and exits with status 75
  (:data:`~contrastlab.engine.preemption.EXIT_PREEMPTED`), and so does the runner, so a SLURM job can be requeued and
  continue with ``resume=auto``. SLURM signals every process of a job step, the stage's own included: a ``torchrun``
  agent is started with SIGUSR1 ignored (its workers install their own handler), so that the signal meant for the
  workers does not kill the agent under them;
- a stage that spans several nodes runs one runner per node (``srun``, one task a node): the runner of node 0
  (``SLURM_PROCID``) reports the cell as above, the others only run their node's ``torchrun`` agent, logging to
  ``DIR/logs/<cell>.<stage>.node<k>.log``. A state file that names this runner's own SLURM job (an earlier attempt of
  a requeued job, or node 0 of this one) does not count as another runner of the cell.

Exit status: 0 when every stage is done, 75 when preempted or interrupted, 1 when a stage failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from contrastlab.engine.preemption import EXIT_PREEMPTED
from contrastlab.errors import ContrastlabError
from contrastlab.studies.cells import Cell, Stage, runner_alive, slurm_job
from contrastlab.studies.study import Study

EXIT_FAILED = 1
"""Exit status of a cell runner whose stage failed."""

_ERROR_WORDS = ("error", "exception", "traceback", "killed", "refused", "failed")


def run_cell_argv(study_dir: str | os.PathLike, cell_id: str, *, stage: str | None = None, launcher: str = "local",
                  gpus: int | None = None, nodes: int | None = None) -> list[str]:
    """The command that runs one cell (what every launcher starts); ``gpus`` and ``nodes`` override the study file's
    resources (a cluster launcher's ``--gpus-per-node`` and ``--nodes``)."""
    argv = [sys.executable, "-m", "contrastlab", "study", "run-cell", str(Path(study_dir).resolve()), cell_id,
            "--launcher", launcher]
    argv += ["--stage", stage] * (stage is not None)
    argv += ["--gpus", str(gpus)] * (gpus is not None)
    return argv + ["--nodes", str(nodes)] * (nodes is not None)


def node_rank(stage: Stage) -> int:
    """This runner's node in a stage that spans several nodes (``SLURM_PROCID``: one runner per node under srun);
    0 for a stage on one node."""
    return int(os.environ.get("SLURM_PROCID", "0") or 0) if stage.nodes > 1 else 0


def load_study_dir(study_dir: str | os.PathLike) -> tuple[Study, bool]:
    """The study a directory was prepared for (its ``study.yaml``), and whether it holds ``--smoke`` runs."""
    root = Path(study_dir)
    if not (root / "study.yaml").is_file():
        raise ContrastlabError(f"{root} holds no study.yaml: it is not a study directory, or its study never started; "
                               "start cells with `contrastlab study run STUDY`")
    study = Study.load(root / "study.yaml", dir=root, validate=False).as_recorded()  # + study.json's overrides
    return study, study.smoke_of_dir()


def last_error_line(log: Path, start: int = 0) -> str:
    """The last line of ``log`` (from byte ``start``: this attempt) that reads like an error, else its last line."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    lines = [line for line in lines if not line.startswith("==== contrastlab study")]
    for line in reversed(lines):
        if any(word in line.lower() for word in _ERROR_WORDS):
            return line[:500]
    return lines[-1][:500] if lines else ""


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``); empty where unknown."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(p) for p in (task / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    return found


class _Signals:
    """While a stage runs: SIGTERM / SIGUSR1 are passed on to it (recorded as a preemption), SIGINT is recorded
    (the terminal gave it to the stage already)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stage: Stage | None = None
        self.preempted = ""
        self.interrupted = False
        self._previous: dict[int, object] = {}
        self._signum = 0  # the last preemption signal, until it has been passed on

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self.preempted = signal.Signals(signum).name
        self._signum = signum
        self.pass_on()

    def pass_on(self) -> None:
        """Send the stage the preemption signal that came and was not passed on yet: called by the handler, and
        once the stage's process exists (a signal may come while it is being started)."""
        proc, stage, signum = self.proc, self.stage, self._signum
        if not signum or proc is None or proc.poll() is not None or stage is None:
            return
        self._signum = 0
        if stage.processes > 1 or stage.nodes > 1:  # torchrun: its workers checkpoint on SIGUSR1
            for child in _children(proc.pid):
                try:
                    os.kill(child, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        else:
            proc.send_signal(signum)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True

    def __enter__(self) -> _Signals:  # noqa: PYI034
        if threading.current_thread() is not threading.main_thread():  # Python installs handlers there only
            return self
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._forward)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def run_cell(study_dir: str | os.PathLike, cell_id: str, *, stage: str | None = None,
             launcher: str | None = None, gpus: int | None = None, nodes: int | None = None) -> int:
    """Run one cell's stages that are not done (or only ``stage``), writing its state file and logs.

    ``gpus`` and ``nodes`` override the study file's resources (what a cluster job was given).

    Returns:
        0 when the stages ran are done, 75 when preempted or interrupted (the next run resumes), 1 when one failed.
    """
    study, smoke = load_study_dir(study_dir)
    study = study.at(Path(study_dir).resolve()).with_resources(gpus=gpus, nodes=nodes)
    cell = study.cell(cell_id, smoke=smoke)
    launcher = launcher or ("slurm" if os.environ.get("SLURM_JOB_ID") else "local")
    stages = list(cell.stages) if stage is None else [cell.stage(stage)]
    rank = max((node_rank(s) for s in stages), default=0)
    if rank:
        return _follow(study, cell, [s for s in stages if s.nodes > 1], rank)
    record = study.read_state(cell.id)
    own_job = slurm_job()
    if (record.get("state") == "running" and record.get("pid") != os.getpid()
            and not (own_job and record.get("job") == own_job) and runner_alive(record)):
        raise ContrastlabError(f"cell {cell.id} is running already (host {record.get('host')}, pid {record.get('pid')}"
                               f"{', job ' + str(record['job']) if record.get('job') else ''}); "
                               f"see {study.state_path(cell.id)}")
    ran = False
    for current in stages:
        if current.done():
            print(f"{cell.id}: {current.name} done already ({current.output})", flush=True)
            continue
        ran = True
        if current.name != "train" and not cell.stages[0].done():
            log = study.log_path(cell.id, current.name)
            study.write_state(cell.id, "failed", stage=current.name, log=log, launcher=launcher,
                              reason=f"{current.name} needs the trained checkpoint, and train is not done")
            print(f"{cell.id}: {current.name} needs train done first", file=sys.stderr, flush=True)
            return EXIT_FAILED
        status = _run_stage(study, cell, current, launcher)
        if status != 0:
            return status
    if not ran and record.get("state") == ("done" if cell.done() else "pending"):
        return 0  # nothing ran: the state file stays as it was
    if cell.done():
        study.write_state(cell.id, "done", launcher=launcher)
    else:
        todo = [s.name for s in cell.stages if not s.done()]
        study.write_state(cell.id, "pending", stage=todo[0], launcher=launcher,
                          reason=f"stage(s) {', '.join(todo)} not run yet")
    return 0


def _ignore_sigusr1() -> None:
    """In a torchrun agent's process before exec: SIGUSR1 ignored (inherited through exec; the workers it starts
    install their own handler), so that SLURM's SIGUSR1 to every process of the step does not kill the agent."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _start(study: Study, cell: Cell, stage: Stage, log: Path) -> tuple[int, int, _Signals]:
    """Run ``stage`` with its output appended to ``log`` after a header line, passing on signals; its exit status,
    where this attempt's output starts in the log, and what the signals saw."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = stage.command()
    torchrun = stage.processes > 1 or stage.nodes > 1
    with log.open("ab") as out, _Signals() as signals:
        out.write(f"==== contrastlab study {study.name}: cell {cell.id}, stage {stage.name}, pid {os.getpid()}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n==== {' '.join(command)}\n".encode())
        out.flush()
        start = out.tell()
        signals.stage = stage
        # preexec_fn: the runner starts no threads, and the child only sets a signal's disposition before exec
        signals.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_ignore_sigusr1 if torchrun else None)  # noqa: PLW1509
        signals.pass_on()  # a SIGTERM / SIGUSR1 that came while the process was being started
        returncode = signals.proc.wait()
    return returncode, start, signals


def _preempted(returncode: int, signals: _Signals) -> bool:
    return returncode == EXIT_PREEMPTED or (returncode != 0 and bool(signals.preempted or signals.interrupted))


def _follow(study: Study, cell: Cell, stages: list[Stage], rank: int) -> int:
    """Node ``rank``'s part of stages that span several nodes: its torchrun agent, logged to
    ``<cell>.<stage>.node<rank>.log``; node 0's runner writes the cell's state. The exit status as :func:`run_cell`'s."""
    for stage in stages:
        if stage.done():
            continue
        log = study.log_path(cell.id, stage.name)
        log = log.with_name(f"{cell.id}.{stage.name}.node{rank}.log")
        print(f"{cell.id}: {stage.name} on node {rank}, log {log}", flush=True)
        returncode, _, signals = _start(study, cell, stage, log)
        if _preempted(returncode, signals):
            return EXIT_PREEMPTED
        if returncode != 0:
            print(f"{cell.id}: {stage.name} on node {rank} {_exit_reason(returncode)} (log {log})", file=sys.stderr,
                  flush=True)
            return EXIT_FAILED
    return 0


def _run_stage(study: Study, cell: Cell, stage: Stage, launcher: str) -> int:
    log = study.log_path(cell.id, stage.name)
    study.write_state(cell.id, "running", stage=stage.name, log=log, launcher=launcher)
    print(f"{cell.id}: {stage.name} running, log {log}", flush=True)
    returncode, start, signals = _start(study, cell, stage, log)
    if returncode == 0 and stage.done():
        print(f"{cell.id}: {stage.name} done", flush=True)
        return 0
    if _preempted(returncode, signals):
        why = signals.preempted or ("SIGINT" if signals.interrupted else "a preemption signal")
        how = f"{_exit_reason(returncode)}; the next run resumes it"
        if returncode != EXIT_PREEMPTED:  # e.g. the signal came while the stage was still starting, before it saved
            how += " from its last checkpoint, or starts it afresh if there is none"
        study.write_state(cell.id, "pending", stage=stage.name, log=log, launcher=launcher,
                          reason=f"{stage.name} stopped on {why} ({how})")
        print(f"{cell.id}: {stage.name} stopped on {why}; run again to resume", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if returncode == 0:
        reason = f"{stage.name} exited with status 0 but wrote no {stage.output}"
    else:
        reason = f"{stage.name} {_exit_reason(returncode)}: {last_error_line(log, start)}"
    study.write_state(cell.id, "failed", stage=stage.name, log=log, launcher=launcher, reason=reason)
    print(f"{cell.id}: failed: {reason} (log {log})", file=sys.stderr, flush=True)
    return EXIT_FAILED
