"""``contrastlab study list | run | status | table`` (and the launchers' internal ``run-cell``).

Each command is a thin layer over :class:`~contrastlab.studies.study.Study`; everything here is reachable from Python.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

STUDY_COMMANDS = "{list,run,status,table}"
"""The commands the help lists (``run-cell`` is the launchers' own)."""

_CORE_RUN_OPTIONS = {"command", "study_command", "func", "study", "launcher", "parallel", "smoke", "dry_run", "dir",
                     "force", "cells", "overrides"}


def cmd_list(args: argparse.Namespace) -> int:
    from contrastlab.studies.study import Study, study_names

    names = study_names()
    width = max(map(len, names), default=0)
    for name in names:
        study = Study.load(name, validate=False)
        print(f"{name:<{width}} {len(study.groups) * len(study.seeds):>3} cells  {study.description}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from contrastlab.studies.study import Study

    study = Study.load(args.study, dir=args.dir, overrides=args.overrides)
    options = {k: v for k, v in vars(args).items() if k not in _CORE_RUN_OPTIONS}
    failed = study.run(args.launcher, smoke=args.smoke, dry_run=args.dry_run, parallel=args.parallel, force=args.force,
                       cells=args.cells, options=options)
    return min(failed, 100)


def cmd_status(args: argparse.Namespace) -> int:
    from collections import Counter

    from contrastlab.studies.study import Study

    study = Study.load(args.study, dir=args.dir, validate=False)
    statuses = study.status()
    for status in statuses:
        print(status.describe())
    counts = Counter(s.state for s in statuses)
    smoke = " (--smoke runs)" if study.smoke_of_dir() else ""
    recorded = study.recorded_overrides()
    given = f" with {shlex.join(recorded)}" if recorded else ""  # the command line's overrides, from study.json
    print(f"study {study.name} ({study.dir}){smoke}{given}: "
          + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from contrastlab.studies.study import Study

    study = Study.load(args.study, dir=args.dir, validate=False)
    print(study.table(fmt=args.format, figure=args.figure))
    return 0


def cmd_run_cell(args: argparse.Namespace) -> int:
    from contrastlab.studies.cell_runner import run_cell

    return run_cell(args.study_dir, args.cell, stage=args.stage, launcher=args.launcher, gpus=args.gpus,
                    nodes=args.nodes)


def builtin_launchers() -> list[type]:
    """The launcher classes the package ships (``BUILTIN_LAUNCHERS``), found without a registry lookup: building the
    parser must not import plug-in packages (a broken one is reported when ``study run`` looks its name up in
    ``LAUNCHERS``, which also checks the name and names the nearest ones)."""
    import importlib
    import inspect

    from contrastlab.studies.launchers import BUILTIN_LAUNCHERS, Launcher

    found = []
    for name in BUILTIN_LAUNCHERS:
        module = importlib.import_module(name)
        found += [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, Launcher)
                  and obj.__module__ == name]
    return found


def add_study_parser(sub: Any) -> None:
    """Register ``contrastlab study ...`` on the main parser's subcommands."""
    launchers = builtin_launchers()
    parser = sub.add_parser("study", help="run a study (recipes x overrides x seeds) and report it: "
                            "study list | run | status | table (docs/studies.md)")
    commands = parser.add_subparsers(dest="study_command", required=True, metavar=STUDY_COMMANDS)

    p = commands.add_parser("list", help="the shipped studies")
    p.set_defaults(func=cmd_list)

    where = "the study directory (default studies/<name> under the current directory)"
    p = commands.add_parser("run", help="run a study's cells that are not done")
    p.add_argument("study", help="a shipped study name (`contrastlab study list`) or a study file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every cell, after the study's and "
                   "the group's, e.g. data.root=/data/imagenet; recorded in the study directory (status and table "
                   "read them from there), and a later run with other ones is refused unless --force")
    p.add_argument("--launcher", default="local", help=f"how cells start: {', '.join(c.name for c in launchers)}, or "
                   "one a plug-in registers with contrastlab.studies.launchers.register_launcher (default local)")
    p.add_argument("--parallel", type=int, default=1, help="cells at a time (local launcher; default 1)")
    p.add_argument("--smoke", action="store_true", help="2-step CPU runs on the embedded demo data (checks the whole "
                   "study in minutes; a full run in the same directory later moves them aside)")
    p.add_argument("--dry-run", action="store_true", help="print every cell, its commands and resources; run nothing")
    p.add_argument("--dir", help=where)
    p.add_argument("--force", action="store_true", help="accept a changed study file or other key=value overrides for a "
                   "directory run before: the changed cells' runs are moved aside and run afresh")
    p.add_argument("--cells", help="only the cells whose id matches this shell pattern, e.g. 'simclr_*' or '*__s0'")
    for launcher in launchers:
        launcher.add_arguments(p.add_argument_group(f"{launcher.name} launcher"))
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("status", help="each cell: pending, running (where), done, failed (why, log), interrupted")
    p.add_argument("study")
    p.add_argument("--dir", help=where)
    p.set_defaults(func=cmd_status)

    p = commands.add_parser("table", help="the study's results as a table (and a figure)")
    p.add_argument("study")
    p.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
    p.add_argument("--figure", help="also draw the figure to this file")
    p.add_argument("--dir", help=where)
    p.set_defaults(func=cmd_table)

    p = commands.add_parser("run-cell")  # what launchers start: not listed
    p.add_argument("study_dir")
    p.add_argument("cell")
    p.add_argument("--stage", help="run only this stage")
    p.add_argument("--launcher", help="the launcher that started it (recorded in the state file)")
    p.add_argument("--gpus", type=int, help="GPUs per node, over the study file's resources.gpus")
    p.add_argument("--nodes", type=int, help="nodes, over the study file's resources.nodes")
    p.set_defaults(func=cmd_run_cell)
