"""Launchers: how a study's cells get started (``contrastlab study run STUDY --launcher NAME``).

A launcher only starts ``contrastlab study run-cell DIR CELL`` commands (:func:`~contrastlab.studies.cell_runner.
run_cell_argv`), as local processes or inside cluster jobs; the cell runner does the work and writes each cell's state.
Launchers adapt existing engines (local processes, SLURM's sbatch); none schedules, retries or queues work beyond what
that engine does.

``LAUNCHERS`` is a :class:`~contrastlab.registry.Registry` like the others; add your own with
:func:`register_launcher`::

    from contrastlab.studies.launchers import Launcher, register_launcher

    @register_launcher("echo")
    class EchoLauncher(Launcher):
        name = "echo"

        def launch(self, study, cells, *, smoke, options):
            for cell in cells:
                print(shlex.join(run_cell_argv(study.dir, cell.id, launcher=self.name)))
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, ClassVar

from contrastlab.registry import Registry
from contrastlab.studies.cell_runner import run_cell_argv
from contrastlab.studies.cells import Cell
from contrastlab.studies.study import Study, format_command

BUILTIN_LAUNCHERS = ("contrastlab.studies.launchers.local", "contrastlab.studies.launchers.slurm")
"""Modules that register the built-in launchers (imported on the first lookup)."""

LAUNCHERS: Registry = Registry("launcher", "--launcher", BUILTIN_LAUNCHERS,
                               "contrastlab.studies.launchers.register_launcher")
"""Launcher classes (:class:`Launcher` subclasses) by name: ``local``, ``slurm``, and those registered by plug-ins."""


def register_launcher(name: str | None = None, obj: Any = None, **info: Any) -> Any:
    """Register a :class:`Launcher` subclass as ``study run --launcher name`` (usable as a decorator)."""
    return LAUNCHERS.register(name, obj, **info)


class Launcher:
    """Starts the cell runners of a study's cells. Subclasses set ``name`` and implement :meth:`launch`.

    ``options`` hold ``parallel`` (cells at a time) and the launcher's own command-line options
    (:meth:`add_arguments`).
    """

    name: ClassVar[str] = ""

    @classmethod
    def add_arguments(cls, parser: argparse._ActionsContainer) -> None:
        """Add this launcher's own options to ``contrastlab study run`` (none by default)."""

    def launch(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> int | None:
        """Start (and for a local launcher, wait for) the runners of ``cells`` in ``study.dir``, which
        :meth:`Study.prepare <contrastlab.studies.study.Study.prepare>` has made ready.

        Returns:
            The number of cells that failed, or None for a launcher that only submits jobs.
        """
        raise NotImplementedError

    def resources_note(self, cell: Cell, smoke: bool, options: dict[str, Any]) -> str:
        """How this launcher places one cell (a line of :meth:`describe`)."""
        return f"resources: {cell.resources.describe()}"

    def describe(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> str:
        """What :meth:`launch` would do (``--dry-run``): every cell, its resources, the runner command and each stage's
        command and output, with the stages already done marked."""
        lines = [f"study {study.name}: {study.description}".rstrip(": "),
                 (f"directory {study.dir}, launcher {self.name}, {len(cells)} cells, "
                  f"{sum(c.done() for c in cells)} done; {'--smoke runs' if smoke else 'full runs'}; "
                  f"python = {sys.executable}")]
        if study.extra_overrides:
            lines.append(f"command-line overrides of every cell (after the study's and the group's): "
                         f"{shlex.join(study.extra_overrides)}")
        recorded = study.recorded_overrides()
        if recorded is not None and recorded != study.extra_overrides:
            lines.append(f"the directory was run with other command-line overrides ({shlex.join(recorded) or 'none'}):"
                         " a run refuses this unless --force")
        for cell in cells:
            lines.append("")
            lines.append(f"cell {cell.id} (group {cell.group}, seed {cell.seed}"
                         + (f", rows {', '.join(cell.rows)}" if cell.rows else "") + ")")
            lines.append(f"  {self.resources_note(cell, smoke, options)}")
            lines.append(f"  runner: {format_command(run_cell_argv(study.dir, cell.id, launcher=self.name), study.dir)}")
            for stage in cell.stages:
                mark = "done" if stage.done() else "to run"
                lines.append(f"  {stage.name} [{mark}] -> {format_command([str(stage.output)], study.dir)}")
                lines.append(f"    {format_command(stage.command(), study.dir)}")
            own = [e.kind for e in cell.evaluations if e.from_training_run]
            if own:
                lines.append(f"  {', '.join(own)}: the training run's own monitor (knn_top1 in results.json)")
        return "\n".join(lines)
