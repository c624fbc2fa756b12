"""The slurm launcher: a study's cells as SLURM job arrays, submitted with ``sbatch`` (``--launcher slurm``).

Cells that share resources form one chain of job arrays: a ``train`` array with one element per cell, then one array
per evaluation stage whose element *i* starts when element *i* of the array before it completes
(``--dependency=aftercorr:<job>``) and is cancelled when that one fails (``--kill-on-invalid-dep=yes``; without it
the element would stay pending forever). Each element runs the cell runner for its cell and stage
(``contrastlab study run-cell DIR CELL --stage S --launcher slurm``, :func:`~contrastlab.studies.cell_runner.
run_cell_argv`), which writes the cell's logs and state file as under any launcher. Evaluation stages run one after
another rather than all after train: two runners of one cell at once would race on its state file (the runner refuses
a second one). Only the cells that are not done are submitted, from the first stage that is not done, and not those
already queued or running from an earlier submission (``<study dir>/slurm/*/jobs.json``, asked of ``squeue``).

Why generated sbatch scripts rather than submitit: preemption and time limits are handled by the engine's own
protocol, the same as ``examples/slurm/train.sbatch``: ``--signal=USR1@N`` makes SLURM send SIGUSR1 N seconds before
the time limit to the processes of the job's steps (not to the batch shell), so the runner runs under ``srun``; it
passes the signal on to the training run, which writes a checkpoint at the next step and exits with status 75, as does
the runner; the script then requeues its own element (``${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}``: the array's
own id would requeue every element), at most ``--max-requeues`` times, and the requeued element continues from the
checkpoint (``resume=auto``). A preemption (``--requeue``; SLURM requeues the element itself) resumes from the newest
checkpoint the same way, and ``--open-mode=append`` keeps every attempt's output. submitit would pickle a Python
callable, handle the signals in its own process and requeue by its own rules, around a runner that already does this;
a shell script says everything SLURM is asked to do, and a user can read it, change it and submit it again by hand.
The scripts, their output and a record of the submitted jobs are written to ``<study dir>/slurm/<time>/``.

A cell on several nodes runs one runner per node (``srun --ntasks-per-node=1``), each starting one ``torchrun``
agent that meets the others at ``$MASTER_ADDR:$MASTER_PORT`` (the first node of the job, set by the script); the
runner of node 0 reports the cell. Evaluation stages run on one node with at most one GPU.

Resources per cell come from the study file's ``resources`` (study or group level): ``partition``, ``account``,
``time``, ``gpus`` (per node), ``cpus`` (per node: one task a node), ``mem`` and ``nodes``; each can be overridden on
the command line (``--partition P --account A --time T --gpus-per-node N --cpus-per-task C --mem M --nodes N``), and
``--gpus-per-node``/``--nodes`` also reach the runner, so torchrun starts as many processes as the job got GPUs.
``--smoke`` cells ask for one node and no GPU (they train on the CPU). Jobs inherit the environment of
``contrastlab study run`` (``sbatch --export=ALL``, SLURM's default): the runner is started with this Python
(``sys.executable``), which the compute nodes must see at the same path, and so must the study directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contrastlab.errors import ContrastlabError
from contrastlab.studies.cell_runner import run_cell_argv
from contrastlab.studies.cells import Cell, Stage, runner_alive
from contrastlab.studies.launchers import Launcher, register_launcher
from contrastlab.studies.spec import Resources
from contrastlab.studies.study import Study

EXIT_PREEMPTED = 75
"""The runner's status after a checkpoint on a preemption signal (:data:`contrastlab.engine.preemption.EXIT_PREEMPTED`)."""

MAX_REQUEUES = 20
"""Default cap on the times one element requeues itself (``--max-requeues``)."""

RESOURCE_OPTIONS = {"partition": "partition", "account": "account", "time": "time", "gpus_per_node": "gpus",
                    "cpus_per_task": "cpus", "mem": "mem", "nodes": "nodes"}
"""Command-line option (its ``dest``) -> the :class:`~contrastlab.studies.spec.Resources` field it overrides."""

_SCRIPT = """#!/bin/bash
# contrastlab study {study}{smoke}: stage(s) {stages} of {n} cell(s), one element of this job array per cell.
# Written and submitted by contrastlab's slurm launcher (contrastlab.studies.launchers.slurm).{after}
# The cell runner runs under srun: SLURM sends SIGUSR1 to the job's steps (not to this shell) {lead} s before the time
# limit; the runner passes it on to the run, which writes a checkpoint and exits with status {preempted}, and this script
# then requeues its own element; the requeued element resumes from the checkpoint. A preempted element (requeued by
# SLURM, --requeue) resumes from its newest checkpoint. The stages' logs: {logs}
{sbatch}

set -u
CELLS=({cells})
STAGES=({stage_of})
CELL=${{CELLS[$SLURM_ARRAY_TASK_ID]}}
STAGE=${{STAGES[$SLURM_ARRAY_TASK_ID]}}
SELF=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}  # this element (the array's own id names all its elements)
MAX_REQUEUES={max_requeues}
{rendezvous}echo "$(date '+%F %T') job $SELF (requeued ${{SLURM_RESTART_COUNT:-0}} times) on $SLURM_JOB_NODELIST: cell $CELL, stage $STAGE"
{srun}
status=$?
if [ "$status" -eq {preempted} ]; then
  if [ "${{SLURM_RESTART_COUNT:-0}}" -ge "$MAX_REQUEUES" ]; then
    echo "$(date '+%F %T') stopped after a checkpoint, requeued $MAX_REQUEUES times already: giving up"
  else
    echo "$(date '+%F %T') stopped after a checkpoint (status {preempted}): requeueing $SELF"
    scontrol requeue "$SELF"  # SLURM starts it again once this attempt has ended
  fi
fi
echo "$(date '+%F %T') cell runner exited with status $status"
exit "$status"  # {preempted}, not 0, while requeued: the element after this one never starts on it
"""
"""An array's sbatch script; :meth:`SlurmLauncher.script` fills it in."""

_CELL = "\0cell"
_STAGE = "\0stage"
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\Z")


def time_seconds(text: str) -> int:
    """A SLURM time limit in seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ContrastlabError(f"time limit {text!r} is not one SLURM reads; write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                               "D-HH:MM:SS (resources.time in the study file, or --time)")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    if third is not None:  # HH:MM:SS
        return first * 3600 + second * 60 + third
    return first * 60 + (second or 0)  # MM[:SS]


def signal_lead(resources: Resources, options: dict[str, Any]) -> int:
    """Seconds before the time limit that SIGUSR1 is sent: ``--signal-before``, else 300 or a tenth of the time
    limit when that is shorter (SLURM may send it up to a minute early)."""
    given = options.get("signal_before")
    limit = time_seconds(resources.time)
    if given is not None:
        if given <= 0 or given >= limit:
            raise ContrastlabError(f"--signal-before {given}: give a number of seconds between 1 and the time limit "
                                   f"({resources.time}, {limit} s)")
        return int(given)
    return max(1, min(300, limit // 10))


@dataclass(frozen=True)
class JobArray:
    """One sbatch job array: a stage of cells that share resources; element ``i`` runs ``tasks[i]``.

    Attributes:
        name: The file name's stem and the job name's end: the stage (``train``, ``linear``) and the chain's number.
        tasks: Task id -> (cell, stage name).
        resources: What every element asks for.
        after: The index in the plan of the array whose element ``i`` element ``i`` waits for (aftercorr), or None.
        runner: The runner command, with placeholders for the element's cell and stage.
    """

    name: str
    tasks: dict[int, tuple[Cell, str]]
    resources: Resources
    after: int | None
    runner: tuple[str, ...]

    @property
    def stages(self) -> list[str]:
        return sorted({stage for _, stage in self.tasks.values()})


def _sbatch_resources(resources: Resources) -> list[str]:
    lines = [f"--nodes={resources.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={resources.cpus}",
             f"--time={resources.time}"]
    lines += [f"--gpus-per-node={resources.gpus}"] * bool(resources.gpus)
    lines += [f"--{key}={getattr(resources, key)}" for key in ("partition", "account", "mem")
              if getattr(resources, key) is not None]
    return lines


@register_launcher("slurm")
class SlurmLauncher(Launcher):
    """Cells as SLURM job arrays (one per stage and set of resources), submitted with generated sbatch scripts."""

    name = "slurm"

    @classmethod
    def add_arguments(cls, parser: argparse._ActionsContainer) -> None:
        own = "over the study file's resources"
        parser.add_argument("--partition", help=f"SLURM partition ({own}.partition)")
        parser.add_argument("--account", help=f"SLURM account ({own}.account)")
        parser.add_argument("--time", help=f"time limit of each job, e.g. 04:00:00 or 2-00:00:00 ({own}.time)")
        parser.add_argument("--gpus-per-node", type=int, help=f"GPUs per node of a training job ({own}.gpus); "
                            "training runs one process per GPU")
        parser.add_argument("--cpus-per-task", type=int, help=f"CPU cores per node ({own}.cpus)")
        parser.add_argument("--mem", help=f"memory per node, e.g. 64G ({own}.mem)")
        parser.add_argument("--nodes", type=int, help=f"nodes of a training job ({own}.nodes)")
        parser.add_argument("--max-requeues", type=int, default=MAX_REQUEUES, help="times an element requeues itself "
                            f"after a checkpoint on SIGUSR1 before it gives up (default {MAX_REQUEUES})")
        parser.add_argument("--signal-before", type=int, help="seconds before the time limit that SLURM sends SIGUSR1 "
                            "(the run checkpoints and the element requeues itself); default 300, or a tenth of the "
                            "time limit when that is shorter")
        parser.add_argument("--sbatch-option", action="append", metavar="OPTION", help="an sbatch option for every "
                            "array, e.g. --sbatch-option=--qos=high (repeat for several)")

    # ------------------------------------------------------------------------------------------- the plan

    @staticmethod
    def _overrides(options: dict[str, Any]) -> dict[str, Any]:
        return {field: options.get(dest) for dest, field in RESOURCE_OPTIONS.items() if options.get(dest) is not None}

    def _cells(self, study: Study, cells: list[Cell], smoke: bool, options: dict[str, Any]) -> tuple[Study, list[Cell]]:
        """The study and cells with the command line's resources over the study file's."""
        overrides = self._overrides(options)
        if not overrides:
            return study, cells
        study = study.with_resources(**overrides)
        return study, [study.cell(c.id, smoke=smoke) for c in cells]

    @staticmethod
    def train_resources(cell: Cell, smoke: bool) -> Resources:
        """What a cell's train element asks for: its resources; ``--smoke``: one node, no GPU."""
        return dataclasses.replace(cell.resources, gpus=0, nodes=1) if smoke else cell.resources

    @staticmethod
    def eval_resources(cell: Cell, smoke: bool) -> Resources:
        """What an evaluation element asks for: one node, at most one GPU (none under ``--smoke``)."""
        return dataclasses.replace(cell.resources, nodes=1, gpus=0 if smoke else min(1, cell.resources.gpus))

    def _runner(self, study: Study, stage: Stage, options: dict[str, Any]) -> tuple[str, ...]:
        """The runner command of an element, with placeholders for the cell and stage."""
        train = stage.name == "train"  # the command-line layout reaches the runner: torchrun's processes and nodes
        argv = run_cell_argv(study.dir, _CELL, stage=_STAGE, launcher=self.name,
                             gpus=options.get("gpus_per_node") if train else None,
                             nodes=options.get("nodes") if train else None)
        return tuple(argv)

    def plan(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> list[JobArray]:
        """The job arrays that would run ``cells`` that are not done, in submission order.

        Each cell runs from its first stage that is not done to its last; cells whose remaining stages start at the
        same one (train, or an evaluation) with the same resources form one chain: an array per stage position, its
        element ``i`` after element ``i`` of the array before (the cells of a later array are among the earlier's).
        """
        chains: dict[tuple[bool, Resources], list[tuple[Cell, list[Stage]]]] = {}
        for cell in cells:
            todo = [i for i, s in enumerate(cell.stages) if not s.done()]
            if not todo:
                continue
            rest = list(cell.stages[todo[0]:])
            trains = rest[0].name == "train"
            key = (trains, self.train_resources(cell, smoke) if trains else self.eval_resources(cell, smoke))
            chains.setdefault(key, []).append((cell, rest))
        arrays: list[JobArray] = []
        for number, ((trains, _), members) in enumerate(chains.items(), start=1):
            previous = None
            for position in range(max(len(rest) for _, rest in members)):
                tasks = {i: (cell, rest[position].name) for i, (cell, rest) in enumerate(members) if len(rest) > position}
                names = {stage for _, stage in tasks.values()}
                name = names.pop() if len(names) == 1 else f"stage{position + 1}"
                first_cell, first_rest = next((c, r) for c, r in members if len(r) > position)
                stage = first_rest[position]
                resources = (self.train_resources(first_cell, smoke) if stage.name == "train"
                             else self.eval_resources(first_cell, smoke))
                arrays.append(JobArray(f"{name}-{number}", tasks, resources, previous,
                                       self._runner(study, stage, options)))
                previous = len(arrays) - 1
        return arrays

    # ------------------------------------------------------------------------------------------- the files

    def script(self, study: Study, array: JobArray, folder: Path, *, smoke: bool, options: dict[str, Any]) -> str:
        """The sbatch script of ``array`` (written to ``folder/<name>.sbatch``)."""
        res = array.resources
        lead = signal_lead(res, options)
        sbatch = [f"--job-name={study.name}.{array.name.rsplit('-', 1)[0]}", f"--array={','.join(map(str, array.tasks))}",
                  *_sbatch_resources(res), f"--signal=USR1@{lead}", "--requeue", "--open-mode=append",
                  f"--output={folder.resolve() / (array.name + '-%A_%a.out')}", f"--chdir={Path.cwd()}"]
        sbatch += ["--kill-on-invalid-dep=yes"] * (array.after is not None)
        runner = " ".join('"$CELL"' if a == _CELL else '"$STAGE"' if a == _STAGE else shlex.quote(a)
                          for a in array.runner)
        rendezvous = ("" if res.nodes <= 1 else
                      'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # node 0\n'
                      "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 2000))  # torchrun's c10d rendezvous\n")
        after = (" It is submitted with\n# --dependency=aftercorr:<the previous array's job>: element i starts when "
                 "that array's element i has completed,\n# and is cancelled when it fails."
                 if array.after is not None else "")
        return _SCRIPT.format(
            study=study.name, smoke=" (--smoke)" * smoke, stages=", ".join(array.stages), n=len(array.tasks),
            after=after, lead=lead, logs=study.dir.resolve() / "logs",
            sbatch="\n".join(f"#SBATCH {line}" for line in sbatch),
            cells=" ".join(f"[{i}]={cell.id}" for i, (cell, _) in array.tasks.items()),
            stage_of=" ".join(f"[{i}]={stage}" for i, (_, stage) in array.tasks.items()),
            max_requeues=int(options.get("max_requeues", MAX_REQUEUES)), rendezvous=rendezvous,
            srun=f"srun --nodes={res.nodes} --ntasks-per-node=1 --cpus-per-task={res.cpus} --kill-on-bad-exit=0 \\\n"
                 f"  {runner}", preempted=EXIT_PREEMPTED)

    @staticmethod
    def sbatch_command(script: Path, dependency: str | None, options: dict[str, Any]) -> list[str]:
        """The sbatch command line that submits ``script`` (after job ``dependency``, element by element)."""
        command = ["sbatch", "--parsable", *(options.get("sbatch_option") or [])]
        command += [f"--dependency=aftercorr:{dependency}"] * (dependency is not None)
        return [*command, str(script)]

    @staticmethod
    def folder(study: Study) -> Path:
        """A new folder for this submission's scripts: ``<study dir>/slurm/<time>``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder, n = study.dir / "slurm" / stamp, 1
        while folder.exists():
            n += 1
            folder = study.dir / "slurm" / f"{stamp}-{n}"
        return folder

    # ---------------------------------------------------------------------------------------- the launcher

    def resources_note(self, cell: Cell, smoke: bool, options: dict[str, Any]) -> str:
        train = " ".join(_sbatch_resources(self.train_resources(cell, smoke)))
        return f"resources: {cell.resources.describe()}; sbatch (train): {train}"

    def describe(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> str:
        study, cells = self._cells(study, cells, smoke, options)
        text = super().describe(study, cells, smoke=smoke, options=options)
        arrays = self.plan(study, cells, smoke=smoke, options=options)
        if not arrays:
            return text + "\n\nslurm launcher: every cell is done; nothing would be submitted"
        folder = study.dir / "slurm" / "<time>"
        lines = ["", f"slurm launcher: {len(arrays)} job array(s), written to {folder} and submitted in this order:"]
        for number, array in enumerate(arrays):
            script = folder / f"{array.name}.sbatch"
            after = None if array.after is None else f"<job of {arrays[array.after].name}>"
            lines += ["", f"{array.name}: {len(array.tasks)} element(s): "
                      + ", ".join(f"{i}={cell.id}" for i, (cell, _) in array.tasks.items()),
                      f"  {shlex.join(self.sbatch_command(script, after, options))}", f"  {script}:"]
            lines += [f"    {line}" for line in self.script(study, array, folder, smoke=smoke, options=options).splitlines()]
        return text + "\n".join(lines)

    def launch(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> None:
        study, cells = self._cells(study, cells, smoke, options)
        if shutil.which("sbatch") is None:
            raise ContrastlabError("sbatch is not on PATH: run `contrastlab study run --launcher slurm` where SLURM's "
                                   "commands work (a login node), or choose --launcher local")
        queued = self._queued(study)
        todo = []
        for cell in cells:
            if cell.done():
                continue
            record = study.read_state(cell.id)
            if cell.id in queued:
                print(f"{cell.id}: queued already as job {queued[cell.id]}; not submitted again", flush=True)
            elif record.get("state") == "running" and runner_alive(record):
                print(f"{cell.id}: its runner runs (job {record.get('job')}, host {record.get('host')}); not submitted "
                      "again", flush=True)
            else:
                todo.append(cell)
        arrays = self.plan(study, todo, smoke=smoke, options=options)
        if not arrays:
            print(f"study {study.name}: nothing to submit ({sum(c.done() for c in cells)} of {len(cells)} cells done)",
                  flush=True)
            return
        folder = self.folder(study)
        texts = [self.script(study, array, folder, smoke=smoke, options=options) for array in arrays]  # checks first
        folder.mkdir(parents=True)
        jobs: list[str] = []
        submitted: list[dict[str, Any]] = []
        for array, text in zip(arrays, texts, strict=True):
            script = folder / f"{array.name}.sbatch"
            script.write_text(text)
            dependency = None if array.after is None else jobs[array.after]
            command = self.sbatch_command(script, dependency, options)
            job = self._submit(command, script, jobs)
            jobs.append(job)
            submitted.append({"array": array.name, "job": job, "after": dependency, "script": str(script),
                           "tasks": {str(i): [cell.id, stage] for i, (cell, stage) in array.tasks.items()}})
            (folder / "jobs.json").write_text(json.dumps(submitted, indent=2) + "\n")
            after = f", after {dependency} element by element" if dependency else ""
            print(f"submitted job array {job} ({array.name}{after}): "
                  + ", ".join(f"{job}_{i} {cell.id}" for i, (cell, _) in array.tasks.items()), flush=True)
        print(f"study {study.name}: {len(todo)} cell(s) in {len(arrays)} job array(s) {', '.join(jobs)}; scripts and "
              f"job output in {folder}; `contrastlab study status {study.reference} --dir {study.dir}` follows them",
              flush=True)

    @staticmethod
    def _submit(command: list[str], script: Path, earlier: list[str]) -> str:
        """Run sbatch; its job id. A refusal cancels the arrays this launch submitted before and names the fix."""
        try:
            proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = subprocess.CompletedProcess(command, 1, "", str(exc))
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().split(";")[0]
        if earlier:
            subprocess.run(["scancel", *earlier], capture_output=True, check=False, timeout=60)
        cancelled = f"; cancelled the arrays submitted before it ({', '.join(earlier)})" if earlier else ""
        raise ContrastlabError(f"sbatch refused {script}: {(proc.stderr or proc.stdout).strip()}{cancelled}. Fix what "
                               "it names: SLURM here (`sinfo` should answer), or the resources (resources in the study "
                               "file, or --partition/--account/--time/--gpus-per-node/--cpus-per-task/--mem/--nodes, "
                               "--sbatch-option), then run again")

    @staticmethod
    def _queued(study: Study) -> dict[str, str]:
        """Cells with an element of an earlier submission that SLURM still knows (pending, running, requeued):
        cell id -> ``<array job>_<task>``."""
        elements: dict[str, str] = {}
        for path in sorted((study.dir / "slurm").glob("*/jobs.json")):
            try:
                for array in json.loads(path.read_text()):
                    for task, (cell, _) in array["tasks"].items():
                        elements[f"{array['job']}_{task}"] = cell
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if not elements or shutil.which("squeue") is None:
            return {}
        try:
            out = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i"], capture_output=True, text=True,
                                 check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        alive = set(out.stdout.split())
        return {cell: element for element, cell in elements.items() if element in alive}

