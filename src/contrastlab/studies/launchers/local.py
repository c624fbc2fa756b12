"""The local launcher: a study's cells as processes on this machine, one after another or ``--parallel N`` at a time.

Each cell is a ``contrastlab study run-cell`` subprocess. On a machine with GPUs each running cell gets its own
GPUs through ``CUDA_VISIBLE_DEVICES`` (``resources.gpus`` of them, at least one; a cell asking for several trains
under ``torchrun``), and a cell waits until enough GPUs are free. ``--smoke`` cells run on the CPU and get none.
A cell that fails does not stop the others; :meth:`LocalLauncher.launch` returns how many failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from typing import Any

from contrastlab.errors import ContrastlabError
from contrastlab.studies.cell_runner import run_cell_argv
from contrastlab.studies.cells import Cell
from contrastlab.studies.launchers import Launcher, register_launcher
from contrastlab.studies.study import Study


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (empty without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


@register_launcher("local")
class LocalLauncher(Launcher):
    """Cells as local subprocesses (``options["parallel"]`` at a time), each GPU to one cell at a time."""

    name = "local"

    @staticmethod
    def gpus_needed(cell: Cell, smoke: bool, gpus: list[str]) -> int:
        """GPUs a cell gets here: none for ``--smoke`` or a machine without GPUs, else ``max(1, resources.gpus)``."""
        if smoke:
            return 0
        return max(1, cell.resources.gpus) if gpus else cell.resources.gpus

    def _check(self, cells: list[Cell], smoke: bool, gpus: list[str]) -> None:
        for cell in cells:
            if cell.resources.nodes > 1 and not smoke:
                raise ContrastlabError(f"cell {cell.id} asks for {cell.resources.nodes} nodes (resources.nodes); the "
                                       "local launcher runs on this machine only: use a cluster launcher "
                                       "(--launcher slurm) or set resources: {nodes: 1}")
            need = self.gpus_needed(cell, smoke, gpus)
            if need > len(gpus):
                have = f"only {len(gpus)} ({','.join(gpus)})" if gpus else "none"
                raise ContrastlabError(f"cell {cell.id} asks for {need} GPU(s) (resources.gpus) and this machine has "
                                       f"{have}; lower resources.gpus in the study file, or run with --smoke (CPU)")

    def resources_note(self, cell: Cell, smoke: bool, options: dict[str, Any]) -> str:
        gpus = [] if smoke else visible_gpus()
        need = self.gpus_needed(cell, smoke, gpus)
        where = f"{need} of this machine's GPUs ({','.join(gpus)})" if need else "the CPU"
        return f"resources: {cell.resources.describe()}; here: {where}"

    def describe(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> str:
        parallel = max(1, int(options.get("parallel") or 1))
        return (super().describe(study, cells, smoke=smoke, options=options)
                + f"\n\nlocal launcher: {parallel} cell(s) at a time; cells already done are not started")

    def launch(self, study: Study, cells: list[Cell], *, smoke: bool, options: dict[str, Any]) -> int:
        parallel = max(1, int(options.get("parallel") or 1))
        todo = [c for c in cells if not c.done()]
        if not todo:
            print(f"study {study.name}: all {len(cells)} cells are done; nothing to run ({study.dir})", flush=True)
            return 0
        gpus = [] if smoke else visible_gpus()
        self._check(todo, smoke, gpus)
        print(f"study {study.name}: {len(todo)} of {len(cells)} cells to run, {parallel} at a time"
              f"{f' on GPUs {gpus}' if gpus else ''} ({study.dir})", flush=True)
        queue, free = deque(todo), list(gpus)
        running: dict[subprocess.Popen, tuple[Cell, list[str]]] = {}
        failed: list[str] = []
        try:
            while queue or running:
                while queue and len(running) < parallel and self.gpus_needed(queue[0], smoke, gpus) <= len(free):
                    cell = queue.popleft()
                    need = self.gpus_needed(cell, smoke, gpus)
                    mine, free = free[:need], free[need:]
                    env = dict(os.environ)
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
                    proc = subprocess.Popen(run_cell_argv(study.dir, cell.id, launcher=self.name), env=env)
                    running[proc] = (cell, mine)
                for proc in [p for p in running if p.poll() is not None]:
                    cell, mine = running.pop(proc)
                    free += mine
                    if proc.returncode != 0:
                        failed.append(cell.id)
                time.sleep(0.2)
        except KeyboardInterrupt:  # the terminal sent SIGINT to every runner too: let them record their state
            for proc in running:
                proc.wait()
            raise
        done = sum(c.done() for c in cells)
        print(f"study {study.name}: {done} of {len(cells)} cells done"
              + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
              + f" (contrastlab study status {study.reference} --dir {study.dir})", file=sys.stderr, flush=True)
        return len(failed)
