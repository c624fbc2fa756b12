"""Study files: a set of training runs (recipes x overrides x seeds) and what to evaluate, as one object.

A study file (YAML; shipped ones in ``contrastlab/studies/files/<name>.yaml``, a user's anywhere) names groups of
runs, each a recipe plus overrides, and the seeds every group is trained with. Each group x seed is a :class:`Cell`
with its own run directory, and each cell is a list of :class:`Stage` command lines: ``contrastlab train`` (always
with ``resume=auto``, so an interrupted cell continues), then the evaluations (``contrastlab eval ...``). A stage is
done when its output file exists, so a study run again never recomputes or overwrites anything.

Everything is checked when the study loads, before anything runs: unknown keys (the file and key are named, with
the valid keys), unknown recipes (with the nearest names) and each group's overrides, by loading its config through
:func:`contrastlab.config.load.load_config`, so a typo fails at once and not hours later in a cluster job.

The study directory (``studies/<name>`` under the current directory unless given)::

    study.yaml                  the study file as first run (a change to existing cells is refused unless forced)
    study.json                  how it was first run (--smoke or not), from where, with which contrastlab, and the
                                command line's overrides of every cell (``overrides``)
    runs/<cell id>/             each cell's run directory (``out=``); its eval_*.json land beside results.json
    cells/<cell id>.json        each cell's state, written by the cell runner (:mod:`contrastlab.studies.cell_runner`)
    logs/<cell id>.<stage>.log  stdout and stderr of each stage

A study only starts ``python -m contrastlab ...`` command lines and reads the files a run writes; it never imports
the trainer, so a run made by hand and a run made by a study are the same thing.

Example:
    >>> from contrastlab.studies.study import Study
    >>> study = Study.from_dict({"name": "tiny", "seeds": [0, 1], "groups": [{"name": "simclr", "recipe": "demo"}]},
    ...                         validate=False)
    >>> [cell.id for cell in study.cells()]
    ['simclr__s0', 'simclr__s1']
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.studies.cells import STATES, Cell, CellStatus, Stage, runner_alive, slurm_job
from contrastlab.studies.spec import (
    GRID_KEYS,
    GROUP_KEYS,
    STUDY_KEYS,
    Evaluation,
    Group,
    Resources,
    as_mapping,
    check_keys,
    override_list,
    string_list,
    usable_name,
)

STUDY_FILES = Path(__file__).parent / "files"
"""The shipped study files (``contrastlab study list``)."""

SMOKE_EVAL_OVERRIDES = {"linear": ["linear.epochs=1", "linear.max_train=256", "linear.max_test=256"],
                        "finetune": ["finetune.epochs=1", "finetune.batch_size=16", "finetune.warmup_epochs=0"]}
"""Overrides an evaluation stage gets under ``--smoke`` (the checkpoint's own config is already a smoke config; a
protocol recipe brings its own epochs)."""


def _contrastlab() -> list[str]:
    return [sys.executable, "-m", "contrastlab"]


def study_dir(name: str, dir: str | os.PathLike | None = None) -> Path:
    """A study's directory: ``dir``, else ``studies/<name>`` under the current directory."""
    return Path(dir) if dir is not None else Path("studies") / name


def study_names() -> list[str]:
    """The shipped study names, sorted."""
    return sorted(p.stem for p in STUDY_FILES.glob("*.yaml"))


def study_path(study: str | os.PathLike) -> Path:
    """The file of a shipped study name or a path; ConfigError naming the nearest names when neither exists."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(f"study file {path} does not exist; give a shipped study name ({', '.join(study_names())}) "
                              "or the path of a .yaml study file")
        return path
    shipped = STUDY_FILES / f"{study}.yaml"
    if shipped.is_file():
        return shipped
    if path.is_file():
        return path
    close = difflib.get_close_matches(str(study), study_names(), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown study {str(study)!r}.{hint} Shipped studies: {', '.join(study_names())} "
                      "(`contrastlab study list`); a path to a .yaml study file also works.")



# ------------------------------------------------------------------------------------------ derived values


def _data_name(recipe: str, overrides: tuple[str, ...], smoke: bool) -> str:
    """The dataset a cell trains on, read without building the config (cheap; checked against the loaded config
    when the study is validated). ``--smoke`` trains on ``demo`` unless the overrides name another."""
    from contrastlab.config.load import parse_override, read_recipe
    from contrastlab.config.schema import DataConfig

    name: Any = "demo" if smoke else (read_recipe(recipe).get("data") or {}).get("name", DataConfig.name)
    for text in overrides:
        key, value = parse_override(text)
        if key == "data.name":
            name = value
        elif key == "data" and isinstance(value, dict) and "name" in value:
            name = value["name"]
    return str(name)


def _stage_names(evaluations: tuple[Evaluation, ...]) -> list[str]:
    """``knn``, ``linear``, ...; ``<kind>_<data>`` where a kind appears more than once."""
    kinds = [e.kind for e in evaluations if not e.from_training_run]
    return [e.kind if kinds.count(e.kind) == 1 else f"{e.kind}_{e.data or 'own'}"
            for e in evaluations if not e.from_training_run]



# --------------------------------------------------------------------------------------------------- Study


@dataclass(frozen=True)
class Study:
    """A study file, loaded and checked. Build it with :meth:`load` (a shipped name or a path) or :meth:`from_dict`.

    Attributes:
        name: The study's name (its default directory is ``studies/<name>``).
        dir: The study directory (``studies/<name>`` under the current directory unless given).
        groups: Explicit groups first, then the grid's in order.
        source: Where it was read from (a path, or ``<dict>``); errors name it.
        text: The study file as written (copied to ``<dir>/study.yaml`` at the first run).
        extra_overrides: ``key=value`` overrides of every cell given when the study was loaded or run (the command
            line's, ``contrastlab study run STUDY key=value ...``), after the study's and the group's; recorded in
            ``<dir>/study.json``, so that status, table and the cell runner read them back from there.
    """

    name: str
    description: str
    seeds: tuple[int, ...]
    groups: tuple[Group, ...]
    evaluate: tuple[Evaluation, ...]
    resources: Resources
    overrides: tuple[str, ...]
    reproduces: tuple[str, ...]
    source: str
    text: str
    dir: Path
    extra_overrides: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """How to name this study on the command line: its shipped name, or its file."""
        return self.name if Path(self.source).parent == STUDY_FILES else self.source

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, study: str | os.PathLike, *, dir: str | os.PathLike | None = None, validate: bool = True,
             overrides: Sequence[str] | None = None) -> Study:
        """Load a shipped study by name (``contrastlab study list``) or a study file by path, and check it.

        Args:
            study: A shipped name (``"demo"``) or the path of a ``.yaml`` study file.
            dir: The study directory (default ``studies/<name>`` under the current directory).
            validate: Load each group's config to check its recipe and overrides (what a typo needs to fail early).
            overrides: ``key=value`` overrides of every cell, after the study's and the group's
                (:attr:`extra_overrides`; ``contrastlab study run STUDY key=value ...``), checked with them.

        Raises:
            ConfigError: naming the file, the key and the fix.
        """
        path = study_path(study)
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"study file {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path), dir=dir, validate=validate, text=text,
                             default_name=path.stem if path.parent != STUDY_FILES else None, overrides=overrides)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>", dir: str | os.PathLike | None = None,
                  validate: bool = True, text: str | None = None, default_name: str | None = None,
                  overrides: Sequence[str] | None = None) -> Study:
        """A study from the mapping a study file holds (see docs/studies.md); ``overrides`` as :meth:`load`'s."""
        data = as_mapping(data, f"study {source}")
        check_keys(data, STUDY_KEYS, source)
        name = data.get("name", default_name)
        if name is None:
            raise ConfigError(f"{source}: the study needs a `name:` (it names its directory, studies/<name>)")
        name = usable_name(name, f"{source}: name")
        description = data.get("description") or ""
        seeds = data.get("seeds", [0])
        if (not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise ConfigError(f"{source}: seeds: expected a non-empty list of different whole numbers, e.g. [0, 1, 2], "
                              f"got {seeds!r}")
        evaluate = cls._evaluations(data.get("evaluate", ["knn"]), f"{source}: evaluate")
        resources_data = as_mapping(data.get("resources"), f"{source}: resources")
        resources = Resources.parse(resources_data, f"{source}: resources")
        groups = cls._groups(data, source, evaluate, resources_data)
        study = cls(name=name, description=str(description), seeds=tuple(seeds), groups=groups, evaluate=evaluate,
                    resources=resources, overrides=string_list(data.get("overrides"), f"{source}: overrides"),
                    reproduces=string_list(data.get("reproduces"), f"{source}: reproduces"), source=source,
                    text=text if text is not None else yaml.safe_dump(data, sort_keys=False),
                    dir=study_dir(name, dir), extra_overrides=override_list(overrides, "command-line overrides"))
        if validate:
            study.validate()
        return study

    @staticmethod
    def _evaluations(value: Any, where: str) -> tuple[Evaluation, ...]:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, e.g. [knn, {{kind: linear, recipe: linear/<name>}}], "
                              f"got {value!r}")
        evaluations = tuple(Evaluation.parse(v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(set(evaluations)) != len(evaluations):
            raise ConfigError(f"{where}: an evaluation is listed twice")
        return evaluations

    @classmethod
    def _groups(cls, data: dict[str, Any], source: str, evaluate: tuple[Evaluation, ...],
                resources: dict[str, Any]) -> tuple[Group, ...]:
        groups: list[Group] = []
        explicit = data.get("groups") or []
        if not isinstance(explicit, list):
            raise ConfigError(f"{source}: groups: expected a list of {{name, recipe, overrides}} mappings")
        for i, item in enumerate(explicit):
            where = f"{source}: groups[{i}]"
            item = as_mapping(item, where)
            check_keys(item, GROUP_KEYS, where)
            name = usable_name(item.get("name"), f"{where}.name")
            where = f"{source}: groups[{i}] ({name})"
            recipe = item.get("recipe")
            if not isinstance(recipe, str) or not recipe:
                raise ConfigError(f"{where}.recipe: every group needs a recipe name (`contrastlab recipes`) or path")
            own = as_mapping(item.get("resources"), f"{where}.resources")
            groups.append(Group(
                name=name, recipe=recipe, overrides=string_list(item.get("overrides"), f"{where}.overrides"),
                rows=string_list(item.get("rows"), f"{where}.rows"),
                evaluate=cls._evaluations(item["evaluate"], f"{where}.evaluate") if "evaluate" in item else evaluate,
                resources=Resources.parse({**resources, **own}, f"{where}.resources")))
        grid = as_mapping(data.get("grid"), f"{source}: grid")
        if grid:
            check_keys(grid, GRID_KEYS, f"{source}: grid")
            recipes = as_mapping(grid.get("recipes"), f"{source}: grid.recipes")
            variants = as_mapping(grid.get("overrides"), f"{source}: grid.overrides") or {"": []}
            if not recipes:
                raise ConfigError(f"{source}: grid.recipes: give at least one `key: recipe` (the group names are "
                                  "<recipe key>_<override key>)")
            for rkey, recipe in recipes.items():
                usable_name(rkey, f"{source}: grid.recipes key")
                if not isinstance(recipe, str):
                    raise ConfigError(f"{source}: grid.recipes.{rkey}: expected a recipe name, got {recipe!r}")
                for okey, overrides in variants.items():
                    name = f"{rkey}_{okey}" if okey else str(rkey)
                    if okey:
                        usable_name(okey, f"{source}: grid.overrides key")
                    groups.append(Group(name=name, recipe=recipe,
                                        overrides=string_list(overrides, f"{source}: grid.overrides.{okey}"),
                                        evaluate=evaluate, resources=Resources.parse(resources, f"{source}: resources")))
        if not groups:
            raise ConfigError(f"{source}: the study has no groups; give `groups:` (a list of {{name, recipe, "
                              "overrides}}) and/or `grid:` ({recipes: {key: recipe}, overrides: {key: [...]}})")
        names = [g.name for g in groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{source}: group names must differ; {', '.join(twice)} appear(s) twice")
        return tuple(groups)

    def validate(self) -> None:
        """Load every group's config (recipe, the study's and the group's overrides, the seed) and every
        evaluation's protocol recipe; ConfigError naming the file, the group and the key at the first problem."""
        from contrastlab.config.load import (
            finetune_section,
            is_finetune_recipe,
            is_linear_recipe,
            linear_section,
            load_config,
            recipe_path,
        )

        sections = {"linear": linear_section, "finetune": finetune_section}
        for i, group in enumerate(self.groups):
            where = f"{self.source}: group {group.name!r}"
            try:
                recipe_path(group.recipe)
            except ContrastlabError as exc:
                raise ConfigError(f"{where}: recipe: {exc}") from None
            if is_linear_recipe(group.recipe) or is_finetune_recipe(group.recipe):
                raise ConfigError(f"{where}: recipe {group.recipe} is an evaluation protocol, not a training recipe; "
                                  "list it under evaluate: [{kind: linear, recipe: ...}]")
            overrides = [*self.overrides, *group.overrides, *self.extra_overrides]
            try:
                cfg = load_config(group.recipe, [*overrides, f"seed={self.seeds[0]}"])
            except ContrastlabError as exc:
                given = (f"overrides {[*self.overrides, *group.overrides]} then the command line's "
                         f"{list(self.extra_overrides)}" if self.extra_overrides else f"overrides {overrides}")
                raise ConfigError(f"{where} (recipe {group.recipe}): {given}: {exc}") from None
            if cfg.data.name != _data_name(group.recipe, tuple(overrides), smoke=False):  # the cheap reading agrees
                raise ConfigError(f"{where}: set the dataset with data.name=NAME (found {cfg.data.name!r} otherwise)")
            for evaluation in group.evaluate:
                if evaluation.from_training_run and "knn" not in cfg.observers:
                    raise ConfigError(f"{where}: evaluate: knn reads knn_top1 from the training run's results.json, but "
                                      f"its config lists no knn observer (observers: {cfg.observers}); add "
                                      "`observers+=[knn]` to its overrides, or evaluate {kind: knn, data: NAME} as a "
                                      "stage of its own")
                if evaluation.recipe is not None:
                    try:
                        sections[evaluation.kind](evaluation.recipe)
                    except ContrastlabError as exc:
                        raise ConfigError(f"{where}: evaluate {evaluation.kind}: {exc}") from None
                if evaluation.overrides:
                    try:
                        load_config(group.recipe, [*overrides, *evaluation.overrides])
                    except ContrastlabError as exc:
                        raise ConfigError(f"{where}: evaluate {evaluation.kind} overrides "
                                          f"{list(evaluation.overrides)}: {exc}") from None

    # -------------------------------------------------------------------------------------------- cells

    def at(self, dir: str | os.PathLike | None) -> Study:
        """This study with its directory at ``dir`` (itself when None)."""
        return self if dir is None else dataclasses.replace(self, dir=Path(dir))

    def with_resources(self, **changes: Any) -> Study:
        """This study with ``changes`` (:class:`Resources` fields; None leaves a field as it is) over the resources of
        the study and of every group: a cluster launcher's command-line overrides (``--gpus-per-node 4``). The cell
        runner gets the same ``gpus`` and ``nodes`` (``run-cell --gpus G --nodes N``), so its training command
        (torchrun's processes and nodes) matches what the job asked for."""
        given = {k: v for k, v in changes.items() if v is not None}
        if not given:
            return self
        parsed = Resources.parse(given, "resources overrides")
        fields = {k: getattr(parsed, k) for k in given}
        groups = tuple(dataclasses.replace(g, resources=dataclasses.replace(g.resources, **fields)) for g in self.groups)
        return dataclasses.replace(self, groups=groups, resources=dataclasses.replace(self.resources, **fields))

    def with_overrides(self, overrides: Sequence[str], *, validate: bool = True) -> Study:
        """This study with ``overrides`` as its :attr:`extra_overrides` (every cell's, after the study's and the
        group's); checked as :meth:`load` checks them unless ``validate`` is False."""
        study = dataclasses.replace(self, extra_overrides=override_list(overrides, "command-line overrides"))
        if validate:
            study.validate()
        return study

    def recorded_overrides(self) -> tuple[str, ...] | None:
        """The command-line overrides the study directory was run with (``study.json`` ``overrides``); None when
        the directory was never prepared. A ``study.json`` from before they were recorded gives ``()``."""
        path = self.dir / "study.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ContrastlabError(f"{path} cannot be read ({exc}); it is written by `contrastlab study run`") from exc
        value = meta.get("overrides", []) if isinstance(meta, dict) else None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ContrastlabError(f"{path}: 'overrides' should be a list of key=value strings, got {value!r}")
        return tuple(value)

    def as_recorded(self) -> Study:
        """This study with the command-line overrides its directory was run with (:meth:`recorded_overrides`), so
        that its cells are the directory's; itself when the directory was never prepared."""
        recorded = self.recorded_overrides()
        if recorded is None or recorded == self.extra_overrides:
            return self
        return dataclasses.replace(self, extra_overrides=recorded)

    def cells(self, *, smoke: bool = False, pattern: str | None = None) -> list[Cell]:
        """Every group x seed, seed by seed (every group's seed 0 first), with its stages in ``self.dir``.

        Args:
            smoke: Build the ``--smoke`` stages (2-step CPU runs on the demo data).
            pattern: Only the cells whose id matches this shell pattern (``"simclr_*"``, ``"*__s0"``).
        """
        root = self.dir.resolve()
        cells = [self._cell(group, seed, root, smoke) for seed in self.seeds for group in self.groups]
        if pattern is not None:
            cells = [c for c in cells if fnmatch.fnmatchcase(c.id, pattern)]
            if not cells:
                raise ContrastlabError(f"no cell of study {self.name} matches {pattern!r}; its cells: "
                                       f"{', '.join(c.id for c in self.cells(smoke=smoke))}")
        return cells

    def cell(self, cell_id: str, *, smoke: bool = False) -> Cell:
        """The cell named ``cell_id``; ContrastlabError naming the nearest ids."""
        cells = {c.id: c for c in self.cells(smoke=smoke)}
        if cell_id not in cells:
            close = difflib.get_close_matches(cell_id, list(cells), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ContrastlabError(f"study {self.name} has no cell {cell_id!r}.{hint} Cells are <group>__s<seed>: "
                                   f"{', '.join(cells)}")
        return cells[cell_id]

    def _cell(self, group: Group, seed: int, root: Path, smoke: bool) -> Cell:
        cell_id = f"{group.name}__s{seed}"
        run_dir = root / "runs" / cell_id
        overrides = (*self.overrides, *group.overrides, *self.extra_overrides)
        distributed = not smoke and group.resources.gpus > 1
        placement = {"processes": group.resources.gpus if distributed else 1,
                     "nodes": group.resources.nodes if not smoke else 1}
        train = [*_contrastlab(), "train", group.recipe, *overrides, f"seed={seed}", f"out={run_dir}", "resume=auto"]
        stages = [Stage("train", train + ["--smoke"] * smoke, run_dir / "results.json", **placement)]
        outputs = {"train": run_dir / "results.json"}
        names = iter(_stage_names(group.evaluate))
        data = _data_name(group.recipe, overrides, smoke)
        for evaluation in group.evaluate:
            if evaluation.from_training_run:
                outputs[evaluation.kind] = run_dir / "results.json"
                continue
            name = next(names)
            output = run_dir / f"eval_{evaluation.kind}_{evaluation.data or data}.json"
            argv = [*_contrastlab(), "eval", evaluation.kind, str(run_dir / "checkpoints" / "last.pt"),
                    "--out", str(output)]
            argv += ["--recipe", evaluation.recipe] * bool(evaluation.recipe)
            argv += ["--data", evaluation.data] * bool(evaluation.data)
            argv += ["--resume", "auto"] * (evaluation.kind == "finetune")
            argv += [*evaluation.overrides, *(SMOKE_EVAL_OVERRIDES.get(evaluation.kind, []) if smoke else [])]
            # fine-tuning trains the whole network: it runs on the cell's GPUs and nodes, as training does
            stages.append(Stage(name, argv, output, **(placement if evaluation.kind == "finetune" else {})))
            outputs[name] = output
        return Cell(id=cell_id, group=group.name, seed=seed, recipe=group.recipe, overrides=overrides, rows=group.rows,
                    evaluations=group.evaluate, resources=group.resources, run_dir=run_dir, stages=tuple(stages),
                    outputs=outputs)

    # ----------------------------------------------------------------------------------- the directory

    def prepare(self, *, smoke: bool = False, force: bool = False) -> None:
        """Make the study directory ready for its cells: ``study.yaml`` (the file as first run) and ``study.json``.

        A directory first run with another version of the study file, or with other command-line overrides
        (:attr:`extra_overrides`, recorded in ``study.json``), is refused, naming the cells whose recipe,
        overrides, seed or evaluations changed or that were removed, unless ``force``: then the changed cells' run
        directories and state files are moved aside (``runs/<id>.replaced-<time>``) so they run afresh. Added groups
        or seeds and other edits (description, rows, resources) are taken as they are. A directory of ``--smoke``
        runs is moved aside (``<dir>.smoke-<time>``) when a full run starts there; a ``--smoke`` run in a directory
        of full runs is refused.
        """
        root = self.dir
        copy, meta = root / "study.yaml", root / "study.json"
        if copy.is_file() and self.smoke_of_dir() and not smoke:  # a check run before the real one: set it aside
            aside = root.with_name(f"{root.name}.smoke-{time.strftime('%Y%m%d-%H%M%S')}")
            root.rename(aside)
            print(f"{root} held --smoke runs of study {self.name}: moved them to {aside}", file=sys.stderr)
        if copy.is_file():
            previous = Study.from_dict(yaml.safe_load(copy.read_text()), source=str(copy), dir=root, validate=False,
                                       overrides=self.recorded_overrides())
            if smoke and not self.smoke_of_dir():
                raise ContrastlabError(f"{root} holds full runs of study {self.name}; run --smoke in another directory "
                                       "(--dir DIR / Study.run(dir=...)): the real runs there would be resumed by "
                                       "2-step smoke runs otherwise")
            old = {c.id: c for c in previous.cells(smoke=smoke)}
            new = {c.id: c for c in self.cells(smoke=smoke)}
            changed = sorted(i for i in old.keys() & new.keys() if old[i].definition() != new[i].definition())
            removed = sorted(old.keys() - new.keys())
            if changed or removed:
                what = "; ".join([f"changed cells (recipe, overrides or evaluations): {', '.join(changed)}"] * bool(changed)
                                 + [f"removed cells: {', '.join(removed)}"] * bool(removed))
                if previous.extra_overrides != self.extra_overrides:
                    what += (f"; the command-line overrides were {_shell(previous.extra_overrides)}, now "
                             f"{_shell(self.extra_overrides)}")
                if not force:
                    raise ContrastlabError(
                        f"{root} was first run with another version of study {self.name} ({copy}): {what}. Undo the "
                        "change (give the same command-line overrides again), run the new version in another "
                        "directory (--dir DIR), or pass --force: the changed cells' run directories are then moved "
                        "aside and those cells run afresh")
                stamp = time.strftime("%Y%m%d-%H%M%S")
                for cell_id in changed:
                    for path in (root / "runs" / cell_id, root / "cells" / f"{cell_id}.json"):
                        if path.exists():
                            path.rename(path.with_name(f"{path.name}.replaced-{stamp}"))
                print(f"--force: {what}; moved the changed cells' runs aside (*.replaced-{stamp})", file=sys.stderr)
        for folder in ("runs", "cells", "logs"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            from contrastlab import __version__

            meta.write_text(json.dumps({"smoke": smoke, "source": self.source, "contrastlab": __version__,
                                        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                                        "overrides": list(self.extra_overrides)}, indent=2) + "\n")
        elif self.recorded_overrides() != self.extra_overrides:  # accepted above (--force), or never recorded
            record = json.loads(meta.read_text())
            record["overrides"] = list(self.extra_overrides)
            meta.write_text(json.dumps(record, indent=2) + "\n")
        text = self.text if (yaml.safe_load(self.text) or {}).get("name") else f"name: {self.name}\n{self.text}"
        if not copy.is_file() or copy.read_text() != text:  # the copy names the study itself
            copy.write_text(text)

    def state_path(self, cell_id: str) -> Path:
        return self.dir / "cells" / f"{cell_id}.json"

    def log_path(self, cell_id: str, stage: str) -> Path:
        return self.dir / "logs" / f"{cell_id}.{stage}.log"

    def read_state(self, cell_id: str) -> dict[str, Any]:
        """A cell's state file (``{}`` when there is none or it cannot be read)."""
        try:
            record = json.loads(self.state_path(cell_id).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_state(self, cell_id: str, state: str, *, stage: str | None = None, log: Path | None = None,
                    reason: str = "", launcher: str | None = None) -> dict[str, Any]:
        """Write a cell's state file atomically, with this process's host, pid and SLURM job."""
        from contrastlab.engine.run_lock import _process_start

        assert state in STATES, state
        record = {"cell": cell_id, "state": state, "stage": stage, "launcher": launcher, "host": socket.gethostname(),
                  "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "job": slurm_job(),
                  "log": str(log) if log else None, "reason": reason,
                  "updated": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        path = self.state_path(cell_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        return record

    def smoke_of_dir(self) -> bool:
        """Whether the study directory holds ``--smoke`` runs (its ``study.json``); False when never run."""
        try:
            return bool(json.loads((self.dir / "study.json").read_text()).get("smoke"))
        except (OSError, ValueError):
            return False

    # ---------------------------------------------------------------------------------- run and report

    def status(self, *, dir: str | os.PathLike | None = None) -> list[CellStatus]:
        """Each cell's state: done (every output exists), running (where, which job), interrupted (its state file
        says running but the process or job is gone), failed (the reason and the log), or pending."""
        study = self.at(dir).as_recorded()  # the directory's cells: its command-line overrides, not repeated
        return [study._status(cell) for cell in study.cells(smoke=study.smoke_of_dir())]

    def _status(self, cell: Cell) -> CellStatus:
        record = self.read_state(cell.id)
        keep = {k: record.get(k) for k in ("launcher", "host", "pid", "job", "log", "updated")}
        if cell.done():
            return CellStatus(cell.id, "done", **keep)
        todo = next(s.name for s in cell.stages if not s.done())
        state = record.get("state")
        if state == "running":
            alive = runner_alive(record)
            if alive is False:
                return CellStatus(cell.id, "interrupted", stage=record.get("stage") or todo, **keep,
                                  reason="its runner is gone (killed, or its job ended); the next `study run` "
                                  "resumes it")
            return CellStatus(cell.id, "running", stage=record.get("stage") or todo, **keep,
                              reason="" if alive else "cannot check from this host whether it still runs")
        if state == "failed":
            return CellStatus(cell.id, "failed", stage=record.get("stage") or todo, **keep,
                              reason=record.get("reason") or "")
        done = [s.name for s in cell.stages if s.done()]
        reason = record.get("reason") or (f"{', '.join(done)} done" if done else "")
        return CellStatus(cell.id, "pending", stage=todo, **keep, reason=reason)

    def describe(self, *, launcher: str = "local", smoke: bool = False, parallel: int = 1,
                 dir: str | os.PathLike | None = None, cells: str | None = None,
                 options: dict[str, Any] | None = None) -> str:
        """Every cell, its commands and resources, as ``launcher`` would run them; runs nothing."""
        from contrastlab.studies.launchers import LAUNCHERS

        study = self.at(dir)
        chosen = study.cells(smoke=smoke, pattern=cells)
        return LAUNCHERS[launcher]().describe(study, chosen, smoke=smoke, options={"parallel": parallel, **(options or {})})

    def run(self, launcher: str = "local", *, smoke: bool = False, dry_run: bool = False, parallel: int = 1,
            dir: str | os.PathLike | None = None, force: bool = False, cells: str | None = None,
            options: dict[str, Any] | None = None, overrides: Sequence[str] | None = None) -> int:
        """Run the cells that are not done with ``launcher`` (``LAUNCHERS``: ``local``, or one you register).

        Args:
            smoke: 2-step CPU runs on the demo data (a check of the whole study in minutes).
            dry_run: Print :meth:`describe` and run nothing.
            parallel: Cells at a time (local launcher).
            dir: The study directory (default ``self.dir``).
            force: Accept a changed study file or other command-line overrides for a directory run before (see
                :meth:`prepare`).
            cells: Only the cells matching this shell pattern.
            options: The launcher's own options.
            overrides: ``key=value`` overrides of every cell (checked, then :attr:`extra_overrides`); default: the
                study's own :attr:`extra_overrides` (those given to :meth:`load`).

        Returns:
            The number of cells that failed (0 when every cell is done, or when the launcher only submits jobs).
        """
        from contrastlab.studies.launchers import LAUNCHERS

        study = self.at(dir) if overrides is None else self.at(dir).with_overrides(overrides)
        opts = {"parallel": parallel, **(options or {})}
        chosen = study.cells(smoke=smoke, pattern=cells)
        runner = LAUNCHERS[launcher]()
        if dry_run:
            print(runner.describe(study, chosen, smoke=smoke, options=opts))
            return 0
        study.prepare(smoke=smoke, force=force)
        return int(runner.launch(study, chosen, smoke=smoke, options=opts) or 0)

    def table(self, fmt: str = "markdown", figure: str | os.PathLike | None = None) -> str:
        """The study's results as a table (:func:`contrastlab.studies.table.study_table`)."""
        try:
            from contrastlab.studies.table import study_table
        except ModuleNotFoundError as exc:
            if exc.name != "contrastlab.studies.table":
                raise
            raise ContrastlabError("contrastlab.studies.table is not installed") from None
        return study_table(self.as_recorded(), fmt=fmt, figure=figure)


def _shell(overrides: Sequence[str]) -> str:
    """Overrides as the command line gives them (``none`` when there are none)."""
    return shlex.join(overrides) if overrides else "none"


def format_command(argv: list[str], study_dir: Path | None = None) -> str:
    """A command line as a shell would take it, with the study directory shortened to its path from here."""
    text = shlex.join(argv)
    if study_dir is not None:
        absolute = str(study_dir.resolve())
        try:
            short = os.path.relpath(absolute)
        except ValueError:
            short = absolute
        if not short.startswith(".."):
            text = text.replace(absolute, short)
    return text.replace(sys.executable, "python", 1) if text.startswith(sys.executable) else text
