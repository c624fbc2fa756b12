"""Published numbers as data: every row of the result tables contrastlab reproduces.

One entry of ``published.yaml`` (shipped beside this module) holds one published number: the value, its
``+-`` and run count where the paper or README gives them, the table and source it comes from, the metric and
protocol that measured it, and the recipe(s) that train it here. The systems and their tables:

- MoCo v3 (Chen, Xie, He, ICCV 2021) and JointCrop (Zhang et al., AAAI 2025): ResNet-50 linear top-1 at 100, 300
  and 1000 epochs; the ViT rows (linear, fine-tuned, transfer); JointCrop's appendix (MoCo v1 and DINO).
- MCL (Yang et al., AAAI 2022): CIFAR-100 (x2, x4, x4 + logit KD), ImageNet, MoCo + MCL.
- CaCo (Wang et al., TPAMI 2023): ImageNet linear top-1.
- Feature Transformation (Zhu et al., ICCV 2021): ImageNet linear top-1, VOC and COCO detection, ImageNet-100.
- The base methods contrastlab adds: solo-learn's CIFAR table (DINO, SwAV, Barlow Twins, VICReg) and the
  ImageNet rows of those four papers / READMEs that a shipped recipe trains.

ContrastiveCrop (CVPR 2022) and SemanticCrop (PRCV 2023): ContrastiveCrop's README prints no result numbers (its
range of gains is the paper's abstract) and SemanticCrop's states only a range; the per-cell tables of the papers are
not transcribed here; the one row-level pair, MoCo v1 with RandomCrop and with ContrastiveCrop on ImageNet, is in
JointCrop's appendix table.

Example:
    >>> from contrastlab.studies.published import row, rows
    >>> row("mocov3_jointcrop/r50_100ep/jointcrop").value
    69.47
    >>> [r.id for r in rows("caco_imagenet")][:1]
    ['caco/r50_200ep_bs1024']
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contrastlab.errors import ContrastlabError

DATA_FILE = Path(__file__).with_name("published.yaml")
"""The shipped data file."""

METRICS: dict[str, str] = {
    "knn_top1": "kNN top-1 (%) of the frozen backbone (results.json `knn_top1`, or eval_knn_<data>.json)",
    "linear_top1": "linear-probe top-1 (%) on the frozen backbone (eval_linear_<data>.json `top1`)",
    "linear_top5": "linear-probe top-5 (%) on the frozen backbone (eval_linear_<data>.json `top5`)",
    "finetune_top1": "end-to-end fine-tuning top-1 (%) (eval_finetune_<data>.json)",
    "test_top1": "test top-1 (%) of a supervised network or cohort (results.json of a supervised / MCL run)",
    "transfer_top1": "top-1 (%) after fine-tuning on another dataset; protocol outside contrastlab (see the row's note)",
    "voc_ap50": "PASCAL VOC07+12 detection AP50 (detectron2, outside contrastlab; see the row's note)",
    "coco_ap": "COCO detection box AP (detectron2, outside contrastlab; see the row's note)",
}
"""Metric name -> what it measures and where a run directory holds it."""

PROTOCOLS: dict[str, str] = {
    "linear": "linear probe on the frozen backbone (`contrastlab eval linear`)",
    "knn": "weighted kNN on the frozen backbone (the recipe's monitor, or `contrastlab eval knn`)",
    "finetune": "end-to-end fine-tuning (`contrastlab eval finetune`)",
    "supervised": "the supervised network's own test accuracy after training (`contrastlab train`)",
    "detection": "detectron2 fine-tuning of the exported backbone (outside contrastlab)",
    "transfer": "fine-tuning on another dataset with the upstream project's recipe (outside contrastlab)",
}
"""Protocol name -> how the number is measured."""

OUTSIDE_PROTOCOLS = frozenset({"detection", "transfer"})
"""Protocols that run outside contrastlab: their rows' notes give the export that feeds them."""

FIELDS: tuple[str, ...] = ("id", "recipes", "protocol", "metric", "value", "std", "runs", "source", "table",
                           "eval_recipe", "label", "note")
"""Every field of an entry, all required (``std``, ``runs``, ``eval_recipe`` may be null; ``note`` may be "")."""

_ID = re.compile(r"^[a-z0-9][a-z0-9_.]*(/[a-z0-9][a-z0-9_.]*)*$")


@dataclass(frozen=True)
class PublishedRow:
    """One published number and what reproduces it.

    Attributes:
        id: stable, lowercase, ``/``-separated, e.g. ``"mocov3_jointcrop/r50_100ep/jointcrop"``.
        recipes: pre-training recipe(s) that train it (``recipe_names()`` spelling); empty when the source does not
            say enough to write one (the note says why).
        protocol: a key of :data:`PROTOCOLS`.
        metric: a key of :data:`METRICS`.
        value: the published value, in percent (or AP).
        std: the published ``+-``, where given.
        runs: the number of runs the value averages, where given.
        source: which table of which paper or README.
        table: id of the published table the row belongs to.
        eval_recipe: the protocol recipe (``linear/<name>``, ``finetune/<name>``), or None: the run's own section
            (a recipe's ``linear:``), its kNN monitor, its supervised test accuracy, or a protocol outside contrastlab.
        label: the row as the paper writes it.
        note: what a reader must know to compare with it (selection rule, ambiguity, the outside command).
    """

    id: str
    recipes: tuple[str, ...]
    protocol: str
    metric: str
    value: float
    std: float | None
    runs: int | None
    source: str
    table: str
    eval_recipe: str | None
    label: str
    note: str = ""

    def value_text(self) -> str:
        """``value``, then ``+- std`` and ``(n=runs)`` where given: ``72.96 +- 0.28 (n=3)``; value and std with the
        same decimals (``79.00 +- 0.41``, as printed)."""
        places = max(_decimals(self.value), _decimals(self.std) if self.std is not None else 0)
        text = f"{self.value:.{places}f}"
        if self.std is not None:
            text += f" +- {self.std:.{places}f}"
        if self.runs is not None:
            text += f" (n={self.runs})"
        return text


def _decimals(number: float) -> int:
    """Decimal places of a number as YAML read it, at least one (``82.47`` -> 2, ``0.2`` -> 1, ``74.0`` -> 1)."""
    return len(repr(float(number)).split(".")[1])


def _entry_error(path: Path, index: int, entry: Any, problem: str) -> ContrastlabError:
    """An error naming the file, the entry (its position and id) and the problem with its fix."""
    name = entry.get("id") if isinstance(entry, dict) else None
    which = f"entry {index}" + (f" ({name!r})" if isinstance(name, str) else "")
    return ContrastlabError(f"{path}: {which}: {problem}")


def _check_type(path: Path, index: int, entry: dict, key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise _entry_error(path, index, entry, f"field {key!r} must be {expected}, found {entry[key]!r}")


def _row_from_entry(path: Path, index: int, entry: Any) -> PublishedRow:
    """Validate one YAML entry and build its row."""
    if not isinstance(entry, dict):
        raise _entry_error(path, index, entry, f"an entry is a mapping of the fields {', '.join(FIELDS)}; found "
                           f"{type(entry).__name__}")
    for key in entry:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _entry_error(path, index, entry, f"unknown field {key!r}{hint}; the fields are {', '.join(FIELDS)}")
    missing = [key for key in FIELDS if key not in entry]
    if missing:
        raise _entry_error(path, index, entry, f"missing field {missing[0]!r}: every entry has all of "
                           f"{', '.join(FIELDS)} (null for an absent std, runs or eval_recipe; \"\" for no note)")
    check = functools.partial(_check_type, path, index, entry)
    check("id", isinstance(entry["id"], str) and bool(_ID.match(entry["id"])),
          "lowercase words of [a-z0-9_.] separated by '/'")
    check("table", isinstance(entry["table"], str) and bool(_ID.match(entry["table"])) and "/" not in entry["table"],
          "one lowercase word of [a-z0-9_.]")
    recipes = entry["recipes"]
    check("recipes", isinstance(recipes, list) and all(isinstance(r, str) and r for r in recipes),
          "a list of recipe names ([] when no recipe trains the row)")
    if entry["protocol"] not in PROTOCOLS:
        raise _entry_error(path, index, entry, f"unknown protocol {entry['protocol']!r} in field 'protocol'; "
                           f"known: {', '.join(PROTOCOLS)}")
    if entry["metric"] not in METRICS:
        close = difflib.get_close_matches(str(entry["metric"]), METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _entry_error(path, index, entry, f"unknown metric {entry['metric']!r} in field 'metric'{hint}; "
                           f"known: {', '.join(METRICS)}")
    number = (int, float)
    check("value", isinstance(entry["value"], number) and not isinstance(entry["value"], bool)
          and math.isfinite(entry["value"]), "a number")
    check("std", entry["std"] is None or (isinstance(entry["std"], number) and not isinstance(entry["std"], bool)
                                          and entry["std"] >= 0), "null or a number >= 0")
    check("runs", entry["runs"] is None or (type(entry["runs"]) is int and entry["runs"] >= 1),
          "null or an integer >= 1")
    for key in ("source", "label"):
        check(key, isinstance(entry[key], str) and bool(entry[key].strip()), "a non-empty string")
    check("note", isinstance(entry["note"], str), "a string")
    eval_recipe = entry["eval_recipe"]
    check("eval_recipe", eval_recipe is None or (isinstance(eval_recipe, str)
                                                 and eval_recipe.startswith(("linear/", "finetune/"))),
          "null or a protocol recipe linear/<name> or finetune/<name>")
    return PublishedRow(id=entry["id"], recipes=tuple(recipes), protocol=entry["protocol"], metric=entry["metric"],
                        value=float(entry["value"]), std=None if entry["std"] is None else float(entry["std"]),
                        runs=entry["runs"], source=entry["source"], table=entry["table"], eval_recipe=eval_recipe,
                        label=entry["label"], note=entry["note"])


def load_rows(path: str | Path) -> list[PublishedRow]:
    """Read and validate a published-rows file (``rows:`` holding one mapping per published number).

    Raises:
        ContrastlabError: the file is missing or not YAML, or an entry has an unknown or missing field, an unknown
            metric or protocol, a value of the wrong type, or an id used twice; the message names the entry and field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ContrastlabError(f"published-rows file {path} cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ContrastlabError(f"published-rows file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"rows"} or not isinstance(data["rows"], list):
        raise ContrastlabError(f"{path}: the file holds one key, 'rows:', a list of entries with the fields "
                               f"{', '.join(FIELDS)}")
    out: list[PublishedRow] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(data["rows"]):
        item = _row_from_entry(path, index, entry)
        if item.id in seen:
            raise _entry_error(path, index, entry, f"field 'id': {item.id!r} is already entry {seen[item.id]}'s; "
                               "ids are unique")
        seen[item.id] = index
        out.append(item)
    return out


@functools.cache
def _shipped() -> tuple[PublishedRow, ...]:
    return tuple(load_rows(DATA_FILE))


def _matches(pattern: str, item: PublishedRow) -> bool:
    fields = (item.id, item.table, *item.recipes)
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(f, pattern) for f in fields)
    return any(pattern in f for f in fields)


def rows(filter: str | None = None) -> list[PublishedRow]:
    """The shipped rows in file order; ``filter`` keeps those whose id, table or a recipe contains it as a
    substring, or matches it as an ``fnmatch`` pattern when it has ``*``, ``?`` or ``[`` (case-insensitive)."""
    every = list(_shipped())
    if not filter:
        return every
    pattern = filter.lower()
    return [item for item in every if _matches(pattern, item)]


def row(row_id: str) -> PublishedRow:
    """The row with this id; ContrastlabError naming the closest ids when there is none."""
    for item in _shipped():
        if item.id == row_id:
            return item
    close = difflib.get_close_matches(row_id, [item.id for item in _shipped()], n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ContrastlabError(f"unknown published row {row_id!r}.{hint} `contrastlab published` lists every row.")


def tables() -> dict[str, list[PublishedRow]]:
    """Table id -> its rows, tables in the order they first appear in the data file."""
    out: dict[str, list[PublishedRow]] = {}
    for item in _shipped():
        out.setdefault(item.table, []).append(item)
    return out


def format_rows(selected: list[PublishedRow], long: bool = False) -> str:
    """Aligned lines ``id  recipes  protocol  metric  value  source``; ``long`` adds each row's label,
    protocol recipe and note on indented lines below it."""
    cells = [(item.id, ", ".join(item.recipes) or "-", item.protocol, item.metric, item.value_text(), item.source)
             for item in selected]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = []
    for item, cell in zip(selected, cells):
        lines.append("  ".join(text.ljust(width) for text, width in zip(cell, widths)) + "  " + cell[5])
        if long:
            lines.append(f"    label: {item.label}")
            lines.append(f"    eval: {item.eval_recipe or '-'}; table: {item.table}")
            if item.note:
                lines.append(f"    note: {item.note}")
    outside = sorted({item.protocol for item in selected if item.protocol in OUTSIDE_PROTOCOLS})
    if outside and not long:
        lines.append(f"({', '.join(outside)}: measured outside contrastlab; --long prints each row's note with the "
                     "export that feeds it)")
    return "\n".join(lines)


__all__ = ["DATA_FILE", "FIELDS", "METRICS", "OUTSIDE_PROTOCOLS", "PROTOCOLS", "PublishedRow", "format_rows",
           "load_rows", "row", "rows", "tables"]
