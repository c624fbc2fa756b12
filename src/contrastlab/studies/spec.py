"""The parts of a study file (see :mod:`contrastlab.studies.study`): its keys, the checks that name the file and key
of a mistake, and the objects they parse into: a group's :class:`Resources`, its :class:`Evaluation` s and the
:class:`Group` itself (a recipe with overrides, trained once per seed)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from contrastlab.errors import ConfigError

STUDY_KEYS = ("name", "description", "reproduces", "seeds", "evaluate", "resources", "overrides", "groups", "grid")
GROUP_KEYS = ("name", "recipe", "overrides", "rows", "evaluate", "resources")
GRID_KEYS = ("recipes", "overrides")
EVALUATION_KEYS = ("kind", "recipe", "data", "overrides")
EVALUATION_KINDS = ("knn", "linear", "finetune")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def check_keys(data: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")


def as_mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {type(value).__name__} {value!r}")
    return value


def string_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, e.g. [optim.lr=0.5, views.planner=joint_crop], "
                          f"got {value!r}")
    return tuple(value)


def override_list(value: Sequence[str] | None, where: str) -> tuple[str, ...]:
    """Overrides given outside the study file (the command line's ``key=value``); ConfigError naming one that is
    not a string or has no ``=``."""
    if value is None:
        return ()
    if isinstance(value, str):
        raise ConfigError(f"{where}: expected a list of key=value strings, e.g. ['data.root=/data/imagenet'], got "
                          f"the string {value!r}")
    found = tuple(value)
    for text in found:
        if not isinstance(text, str) or "=" not in text.lstrip("="):
            raise ConfigError(f"{where}: {text!r} is not a key=value override, e.g. data.root=/data/imagenet")
    return found


def usable_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value) or "__" in value:
        raise ConfigError(f"{where}: {value!r} is not a usable name: letters, digits, '_', '.', '-' (no '__'), "
                          "starting with a letter or digit; it names folders and files")
    return value



@dataclass(frozen=True)
class Resources:
    """What one cell asks for: GPUs per node, nodes, CPU cores (per node), wall time, SLURM partition/account/mem.

    ``gpus`` above 1 trains (and fine-tunes) under ``torchrun`` (one process per GPU); the local launcher gives each
    running cell its GPUs through ``CUDA_VISIBLE_DEVICES``. ``time`` is the limit of one job: a training run stopped
    at it resumes in the next (``resume=auto``).
    """

    gpus: int = 0
    nodes: int = 1
    cpus: int = 2
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    mem: str | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], where: str) -> Resources:
        """Resources from a mapping of some of the fields; ConfigError naming a bad key or value."""
        keys = tuple(f.name for f in dataclasses.fields(cls))
        check_keys(data, keys, where)
        for key in ("gpus", "nodes", "cpus"):
            value = data.get(key, getattr(cls, key))
            least = 0 if key == "gpus" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{where}.{key}: expected a whole number >= {least}, got {value!r}")
        for key in ("time", "partition", "account", "mem"):
            value = data.get(key)
            if value is not None and not isinstance(value, (str, int)):
                raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
        return cls(**{k: (str(v) if k in ("time", "partition", "account", "mem") and v is not None else v)
                      for k, v in data.items()})

    def describe(self) -> str:
        """One line: ``gpus 1, nodes 1, cpus 8, time 02:00:00, partition gpu``."""
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if getattr(self, f.name) is not None)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a cell's checkpoint: ``knn`` (the training run's own kNN monitor), or a
    ``contrastlab eval KIND`` stage with a protocol ``recipe`` (``linear/<name>``, ``finetune/<name>``), another
    ``data`` set, or ``overrides``."""

    kind: str
    recipe: str | None = None
    data: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def from_training_run(self) -> bool:
        """A plain ``knn``: the kNN the training run reports in results.json (``knn_top1``), no stage of its own."""
        return self.kind == "knn" and self.data is None and not self.overrides

    @classmethod
    def parse(cls, value: Any, where: str) -> Evaluation:
        """``knn`` | ``{kind: linear, recipe: linear/<name>, data: ..., overrides: [...]}``."""
        if isinstance(value, str):
            value = {"kind": value}
        data = as_mapping(value, where)
        check_keys(data, EVALUATION_KEYS, where)
        kind = data.get("kind")
        if kind not in EVALUATION_KINDS:
            raise ConfigError(f"{where}: kind {kind!r} is not an evaluation; choose from {', '.join(EVALUATION_KINDS)}")
        recipe = data.get("recipe")
        if recipe is not None:
            if kind == "knn":
                raise ConfigError(f"{where}: knn takes no recipe (its settings are the run's monitor.knn_*; change them "
                                  "with overrides: [monitor.knn_k=200])")
            if not isinstance(recipe, str) or not recipe.startswith(f"{kind}/"):
                raise ConfigError(f"{where}.recipe: a {kind} evaluation takes a {kind}/<name> protocol recipe "
                                  f"(`contrastlab recipes`), got {recipe!r}")
        if data.get("data") is not None and not isinstance(data["data"], str):
            raise ConfigError(f"{where}.data: expected a dataset name, got {data['data']!r}")
        return cls(kind, recipe, data.get("data"), string_list(data.get("overrides"), f"{where}.overrides"))

    def describe(self) -> str:
        if self.from_training_run:
            return "knn"
        extra = [f"recipe {self.recipe}"] * bool(self.recipe) + [f"data {self.data}"] * bool(self.data)
        extra += list(self.overrides)
        return f"{self.kind} ({', '.join(extra)})" if extra else self.kind


@dataclass(frozen=True)
class Group:
    """A recipe with overrides, trained once per seed of the study."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()
    evaluate: tuple[Evaluation, ...] = ()
    resources: Resources = field(default_factory=Resources)

