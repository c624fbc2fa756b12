"""Study tables: read run directories, aggregate each group of cells over its seeds, compare with published rows.

A table reads only what a run directory holds (``config.yaml``, ``run.json``, ``metrics.jsonl``, ``results.json``
and the ``eval_<kind>_<data>.json`` files of ``contrastlab eval``), so a run made by hand and a run made by a study
are read the same way. :data:`METRIC_SOURCES` says where each metric comes from.

Each group (the cells of a study that differ only in their seed; for runs given by hand, the runs whose
``config.yaml`` differs only in :data:`IGNORED_CONFIG_KEYS`) gives, for every metric, mean +- sample standard
deviation (n - 1) over its **done** cells, with n. Failed, interrupted, running and pending cells are counted in
the group's status (``2/3 done, 1 failed``) and never averaged in. For every published row the group reproduces
(``contrastlab.studies.published``), the table shows the published value and the difference in points and, where
the paper gives a standard deviation, in published standard deviations.

Example:
    >>> from contrastlab.studies.table import Aggregate
    >>> Aggregate((70.0, 72.0)).text()
    '71.00 ± 1.41 (2)'
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contrastlab.errors import ContrastlabError

FORMATS = ("markdown", "csv", "latex")

#: Every metric a table knows -> where it is read from, in column order.
METRIC_SOURCES: dict[str, str] = {
    "knn_top1": "eval_knn_<data>.json `knn_top1` when `contrastlab eval knn` ran, else results.json `knn_top1` "
                "(the kNN monitor after the last epoch)",
    "linear_top1": "eval_linear_<data>.json `top1` (final epoch of the probe)",
    "linear_top5": "eval_linear_<data>.json `top5` (the same probe, top-5)",
    "finetune_top1": "eval_finetune_<data>.json `finetune_top1` (after the final epoch)",
    "test_top1": "results.json `test_top1` at the final epoch: `peer_best` for a cohort (MCL's papers report "
                 "the best peer), else the `classifier` head",
    "test_top1_peer_mean": "results.json `test_top1.peer_mean` (cohorts: the mean over peers)",
    "test_top1_ensemble": "results.json `test_top1.ensemble` (cohorts: the summed logits of the peers)",
    "epoch_s": "results.json `wall_seconds` / `epochs`: seconds per epoch of the whole run (set-up, monitors and "
               "checkpoints included; summed over resumed processes)",
    "train_loop_min": "metrics.jsonl: the sum over epochs of the epoch's images / `img_per_s`, in minutes "
                      "(the training loop only: no set-up, monitors or checkpoints); for runs that predate "
                      "`wall_seconds`",
}

#: Column headings of the markdown and LaTeX tables.
LABELS: dict[str, str] = {
    "knn_top1": "kNN top-1", "linear_top1": "linear top-1", "linear_top5": "linear top-5",
    "finetune_top1": "fine-tune top-1",
    "test_top1": "test top-1", "test_top1_peer_mean": "test top-1 (peer mean)",
    "test_top1_ensemble": "test top-1 (ensemble)", "epoch_s": "s / epoch", "train_loop_min": "train loop (min)",
}

#: Cell states, in the order a group's status names them; only ``done`` cells are averaged.
STATES = ("done", "failed", "interrupted", "running", "pending")

#: ``config.yaml`` keys that do not change what a run measures: runs differing only in these form one group.
IGNORED_CONFIG_KEYS = ("seed", "out", "resume", "overwrite", "log.run_name")

_EVAL_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "knn": (("knn_top1", "knn_top1"),),
    "linear": (("linear_top1", "top1"), ("linear_top5", "top5")),
    "finetune": (("finetune_top1", "finetune_top1"),),
}
"""``contrastlab eval KIND``'s file -> (metric, key) read from it; the first key must be there."""

_LOCK_NAME, _LOCK_TIMEOUT = "run.lock", 300.0  # contrastlab.engine.run_lock.LOCK_NAME, DEFAULT_TIMEOUT


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    """What one run directory holds, as a table reads it.

    Attributes:
        run_dir: the run directory.
        recipe: ``run.json`` ``recipe`` (``None`` when absent).
        config: ``config.yaml`` as a nested dict (empty when absent).
        seed: the config's ``seed``.
        metrics: metric name (a key of :data:`METRIC_SOURCES`) -> value.
        measured: metric name -> how that value was measured (file, key, protocol settings).
        knn_curve: ``(epoch, kNN top-1)`` after every epoch where the kNN monitor ran (``metrics.jsonl``).
        device: ``run.json`` ``device_name``: the hardware of ``train_loop_min``.
    """

    run_dir: Path
    recipe: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    measured: dict[str, str] = field(default_factory=dict)
    knn_curve: list[tuple[int, float]] = field(default_factory=list)
    device: str | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ContrastlabError(f"{path} is not valid JSON ({exc}); was it written by contrastlab?") from exc


def _number(value: Any) -> float | None:
    """A finite or NaN float from a JSON value; ``None`` for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a run killed while writing it) is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ContrastlabError(f"{path}:{number} is not valid JSON ({exc})") from exc
    return records


def _knn_settings(result: Mapping[str, Any]) -> str:
    parts = [f"k {result['knn_k']}" if "knn_k" in result else "",
             f"T {result['knn_temperature']}" if "knn_temperature" in result else "",
             f"{result['knn_features']} features" if "knn_features" in result else "",
             f"bank {result['knn_bank_size']}" if "knn_bank_size" in result else "",
             f"test {result['knn_test_size']}" if "knn_test_size" in result else ""]
    return ", ".join(p for p in parts if p)


def _test_top1(results: Mapping[str, Any], path: Path) -> tuple[dict[str, float], dict[str, str]]:
    """``test_top1`` (and a cohort's peer mean and ensemble) from a ``results.json``."""
    value = results.get("test_top1")
    protocol = results.get("test_top1_protocol", "")
    if _number(value) is not None:
        return {"test_top1": float(value)}, {"test_top1": f"{path.name} test_top1; {protocol}".rstrip("; ")}
    if not isinstance(value, Mapping) or not value:
        return {}, {}
    heads = {k: float(v) for k, v in value.items() if _number(v) is not None}
    metrics: dict[str, float] = {}
    measured: dict[str, str] = {}
    if "peer_best" in heads:
        metrics["test_top1"], head = heads["peer_best"], "peer_best"
    elif "classifier" in heads:
        metrics["test_top1"], head = heads["classifier"], "classifier"
    elif len(heads) == 1:
        (head, metrics["test_top1"]), = heads.items()
    else:
        raise ContrastlabError(f"{path}: test_top1 has heads {sorted(heads)} and none is 'peer_best' or "
                               "'classifier'; the table does not know which one to report")
    measured["test_top1"] = f"{path.name} test_top1.{head}; {protocol}".rstrip("; ")
    for key, metric in (("peer_mean", "test_top1_peer_mean"), ("ensemble", "test_top1_ensemble")):
        if key in heads:
            metrics[metric] = heads[key]
            measured[metric] = f"{path.name} test_top1.{key}; {protocol}".rstrip("; ")
    return metrics, measured


def _train_loop_minutes(records: Sequence[Mapping[str, Any]], global_batch: float | None) -> float | None:
    """Minutes of training loop: per epoch, its steps times the global batch over ``img_per_s``."""
    if not records or not global_batch:
        return None
    seconds, previous_step = 0.0, 0
    for record in records:
        step, rate = _number(record.get("step")), _number(record.get("img_per_s"))
        if step is None or rate is None or rate <= 0:
            return None
        seconds += (step - previous_step) * global_batch / rate
        previous_step = int(step)
    return seconds / 60.0


def read_run(run_dir: str | os.PathLike, data: str | None = None) -> RunResult:
    """Read a run directory's metrics (:data:`METRIC_SOURCES`), kNN curve, recipe, config and seed.

    Args:
        run_dir: a directory written by ``contrastlab train`` (files that are missing give no metric).
        data: the dataset whose ``eval_<kind>_<data>.json`` files are read (default: the run's ``data.name``).

    Raises:
        ContrastlabError: ``run_dir`` does not exist, or one of its files is not valid JSON/YAML.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ContrastlabError(f"run directory {run_dir} does not exist")
    out = RunResult(run_dir=run_dir)
    if (run_dir / "config.yaml").is_file():
        try:
            out.config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError as exc:
            raise ContrastlabError(f"{run_dir / 'config.yaml'} is not valid YAML ({exc})") from exc
        seed = out.config.get("seed")
        out.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    info = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    results = _read_json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    out.recipe = info.get("recipe") or results.get("recipe")
    out.device = info.get("device_name") or info.get("device")
    data = data or (out.config.get("data") or {}).get("name")

    if _number(results.get("knn_top1")) is not None:
        out.metrics["knn_top1"] = float(results["knn_top1"])
        out.measured["knn_top1"] = f"results.json knn_top1 ({_knn_settings(results)})"
    for kind, reads in _EVAL_METRICS.items():
        path = run_dir / f"eval_{kind}_{data}.json"
        if not path.is_file():
            continue
        result = _read_json(path)
        (_, first), *_ = reads
        if _number(result.get(first)) is None:
            raise ContrastlabError(f"{path} holds no number under {first!r}; was it written by `contrastlab eval {kind}`?")
        settings = _knn_settings(result) if kind == "knn" else ", ".join(
            f"{k} {result[k]}" for k in ("epochs", "lr", "protocol") if k in result)
        for metric, key in reads:  # the first key is required; the others where the file has them
            if _number(result.get(key)) is not None:
                out.metrics[metric] = float(result[key])
                out.measured[metric] = f"{path.name} {key}" + (f" ({settings})" if settings else "")
    metrics, measured = _test_top1(results, run_dir / "results.json")
    out.metrics.update(metrics)
    out.measured.update(measured)

    records = read_jsonl(run_dir / "metrics.jsonl")
    out.knn_curve = [(int(r["epoch"]), float(r["knn_top1"])) for r in records
                     if _number(r.get("knn_top1")) is not None and _number(r.get("epoch")) is not None]
    wall, epochs = _number(results.get("wall_seconds")), _number(results.get("epochs"))
    if wall is not None and epochs:
        out.metrics["epoch_s"] = wall / epochs
        out.measured["epoch_s"] = f"results.json wall_seconds / epochs on {out.device or 'an unrecorded device'}"
        return out
    minutes = _train_loop_minutes(records, _number((info.get("derived") or {}).get("global_batch_size")))
    if minutes is not None and results:  # a finished run only: a partial sum is not the run's time
        out.metrics["train_loop_min"] = minutes
        out.measured["train_loop_min"] = f"metrics.jsonl img_per_s on {out.device or 'an unrecorded device'}"
    return out


def run_state(run_dir: str | os.PathLike, now: float | None = None) -> str:
    """The state of a run made by hand, from its files: ``done`` (``results.json``), ``running`` (a ``run.lock``
    with a recent heartbeat), ``pending`` (no directory or no ``run.json``), else ``interrupted``."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return "done"
    lock = run_dir / _LOCK_NAME
    if lock.is_file():
        try:
            beat = float(json.loads(lock.read_text()).get("heartbeat", lock.stat().st_mtime))
        except (json.JSONDecodeError, OSError, TypeError, ValueError):
            return "running"  # being rewritten by its holder
        if (time.time() if now is None else now) - beat < _LOCK_TIMEOUT:
            return "running"
    return "interrupted" if (run_dir / "run.json").is_file() else "pending"


# ---------------------------------------------------------------------------------------------- aggregation
@dataclass(frozen=True)
class Aggregate:
    """Values of one metric over a group's done cells: mean, sample standard deviation (n - 1), n."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation; ``None`` for one value."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self, digits: int = 2) -> str:
        """``mean ± std (n)``, or ``mean (1)``."""
        std = f" ± {self.std:.{digits}f}" if self.std is not None else ""
        return f"{self.mean:.{digits}f}{std} ({self.n})"


@dataclass(frozen=True)
class Comparison:
    """A group's value against one published row (fields of ``contrastlab.studies.published.PublishedRow``)."""

    row_id: str
    label: str
    metric: str
    value: float
    std: float | None
    runs: int | None
    source: str
    ours: Aggregate | None

    @property
    def diff(self) -> float | None:
        """Our mean minus the published value, in points; ``None`` when we have no value."""
        return None if self.ours is None else self.ours.mean - self.value

    @property
    def diff_in_std(self) -> float | None:
        """:attr:`diff` in published standard deviations; ``None`` without a published one (or a zero one)."""
        return None if self.diff is None or not self.std else self.diff / self.std

    def published_text(self, digits: int = 2) -> str:
        """``value ± std (runs)`` as far as the paper gives them."""
        std = f" ± {self.std:.{digits}f}" if self.std is not None else ""
        runs = f" ({self.runs} runs)" if self.runs else ""
        return f"{self.value:.{digits}f}{std}{runs}"


@dataclass(frozen=True)
class CellRecord:
    """One cell of a table: its group, seed, run directory, the published rows its group reproduces, its state
    (one of :data:`STATES`)."""

    group: str
    seed: int
    run_dir: Path
    rows: list[str] = field(default_factory=list)
    state: str = "done"


@dataclass
class GroupResult:
    """One group: its cells (with what was read from each), aggregates over the done ones, comparisons."""

    name: str
    cells: list[CellRecord]
    results: list[RunResult | None]
    metrics: dict[str, Aggregate]
    comparisons: list[Comparison]

    @property
    def counts(self) -> dict[str, int]:
        """Cells per state, :data:`STATES` first, other states after."""
        counts = {s: 0 for s in STATES}
        for cell in self.cells:
            counts[cell.state] = counts.get(cell.state, 0) + 1
        return counts

    @property
    def status(self) -> str:
        """``3/3 done`` or ``2/3 done, 1 failed``."""
        counts = self.counts
        rest = [f"{n} {state}" for state, n in counts.items() if state != "done" and n]
        return ", ".join([f"{counts['done']}/{len(self.cells)} done", *rest])

    @property
    def recipes(self) -> list[str]:
        return sorted({r.recipe for r in self.results if r is not None and r.recipe})


def _published_lookup() -> Callable[[str], Any]:
    try:
        from contrastlab.studies.published import row
    except ImportError as exc:
        raise ContrastlabError("contrastlab.studies.published is not available, so published rows cannot be "
                               f"looked up ({exc}); pass published=None to leave them out") from exc
    return row


_DEFAULT: Any = object()


def _try_read(run_dir: Path, data: str | None) -> RunResult | None:
    """A cell that is not done: what its directory holds so far (its kNN curve), or ``None``."""
    try:
        return read_run(run_dir, data) if Path(run_dir).is_dir() else None
    except ContrastlabError:
        return None


def build_table(records: Iterable[CellRecord], published: Callable[[str], Any] | None = _DEFAULT,
                data: str | None = None) -> Table:
    """Group cells by :attr:`CellRecord.group` (everything but the seed) and aggregate their metrics.

    Args:
        records: the cells; only ``done`` ones are read into the aggregates, the others are counted.
        published: published row id -> an object with ``id, label, metric, value, std, runs, source``
            (default: ``contrastlab.studies.published.row``); ``None`` leaves the comparison out.
        data: the dataset of the ``eval_*`` files read (default: each run's own).

    Raises:
        ContrastlabError: two done cells of a group have the same seed, or a run directory cannot be read.
    """
    groups: dict[str, list[CellRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    lookup = None
    out = []
    for name, cells in groups.items():
        results = [read_run(c.run_dir, data) if c.state == "done" else _try_read(c.run_dir, data) for c in cells]
        done = [(c, r) for c, r in zip(cells, results) if c.state == "done"]
        seen: dict[int, Path] = {}
        for cell, _ in done:
            if cell.seed in seen:
                raise ContrastlabError(f"group {name!r}: {seen[cell.seed]} and {cell.run_dir} both have seed "
                                       f"{cell.seed}; one run per seed is averaged (pass only one of them)")
            seen[cell.seed] = cell.run_dir
        metrics = {m: Aggregate(tuple(r.metrics[m] for _, r in done if m in r.metrics))
                   for m in METRIC_SOURCES if any(m in r.metrics for _, r in done)}
        comparisons = []
        for row_id in dict.fromkeys(i for c in cells for i in c.rows):  # each row once, in order
            if published is None:
                break
            lookup = lookup or (_published_lookup() if published is _DEFAULT else published)
            row = lookup(row_id)
            comparisons.append(Comparison(
                row_id=row.id, label=row.label, metric=row.metric, value=float(row.value),
                std=None if row.std is None else float(row.std), runs=row.runs, source=row.source,
                ours=metrics.get(row.metric)))
        out.append(GroupResult(name, cells, results, metrics, comparisons))
    return Table(out)


# ---------------------------------------------------------------------------------------------- output
def _latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
             "±": r"$\pm$", "σ": r"$\sigma$", "Δ": r"$\Delta$", "–": "--", "…": r"\ldots{}"}
    return "".join(table.get(ch, ch) for ch in text)


def _signed(value: float | None, unit: str = "") -> str:
    return "" if value is None else f"{value:+.2f}{unit}"


@dataclass
class Table:
    """Groups of cells with their aggregates; one line per (group, published row), or per group without rows."""

    groups: list[GroupResult]

    @property
    def metrics(self) -> list[str]:
        """The metric columns: those any group has a value for, in :data:`METRIC_SOURCES` order."""
        return [m for m in METRIC_SOURCES if any(m in g.metrics for g in self.groups)]

    @property
    def has_published(self) -> bool:
        return any(g.comparisons for g in self.groups)

    def lines(self) -> list[tuple[GroupResult, Comparison | None]]:
        """The table's lines: a group with several published rows has one line per row."""
        return [(g, c) for g in self.groups for c in (g.comparisons or [None])]

    def notes(self) -> list[str]:
        """How every number was measured, and which source each published row is from."""
        notes = []
        for metric in self.metrics:
            how: dict[str, list[str]] = {}  # how it was measured -> the groups measured so
            for g in self.groups:
                for text in dict.fromkeys(r.measured[metric] for c, r in zip(g.cells, g.results)
                                          if c.state == "done" and r is not None and metric in r.measured):
                    how.setdefault(text, []).append(g.name)
            if len(how) == 1:
                notes.append(f"{metric}: {next(iter(how))}")
            else:
                notes += [f"{metric} ({', '.join(groups)}): {text}" for text, groups in how.items()]
        notes.append("mean ± sample standard deviation (n - 1) over the done cells (n); other cells are counted, "
                     "never averaged")
        for c in {c.row_id: c for g in self.groups for c in g.comparisons}.values():
            notes.append(f"{c.row_id}: {c.label}, {c.metric}, {c.source}")
        return notes

    def _cells(self) -> list[list[str]]:
        rows = []
        for group, comparison in self.lines():
            line = [group.name, group.status] + [group.metrics[m].text() if m in group.metrics else "–"
                                                 for m in self.metrics]
            if self.has_published:
                line += ["", "", "", ""] if comparison is None else [
                    comparison.row_id, comparison.published_text(), _signed(comparison.diff),
                    _signed(comparison.diff_in_std, "σ")]
            rows.append(line)
        return rows

    def _header(self) -> list[str]:
        head = ["group", "cells"] + [LABELS[m] for m in self.metrics]
        return head + (["published row", "published", "Δ (points)", "Δ (published σ)"] if self.has_published else [])

    def to_markdown(self) -> str:
        """A GitHub markdown table, then the notes on how each number was measured."""
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        header = self._header()
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        out += ["| " + " | ".join(cell(t) for t in line) + " |" for line in self._cells()]
        return "\n".join(out + [""] + [f"- {note}" for note in self.notes()]) + "\n"

    def to_csv(self) -> str:
        """One CSV line per table line, numbers at full precision (empty when missing)."""
        def num(value: float | None) -> str:
            return "" if value is None else repr(value)

        header = ["group", "recipe", "status", "cells", *STATES]
        for m in self.metrics:
            header += [f"{m}_mean", f"{m}_std", f"{m}_n"]
        header += ["published_row", "published_metric", "published", "published_std", "diff_points",
                   "diff_published_std"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        for group, c in self.lines():
            counts = group.counts
            line = [group.name, " ".join(group.recipes), group.status, len(group.cells), *(counts[s] for s in STATES)]
            for m in self.metrics:
                agg = group.metrics.get(m)
                line += ["", "", 0] if agg is None else [num(agg.mean), num(agg.std), agg.n]
            line += ["", "", "", "", "", ""] if c is None else [
                c.row_id, c.metric, num(c.value), num(c.std), num(c.diff), num(c.diff_in_std)]
            writer.writerow(line)
        return buffer.getvalue()

    def to_latex(self) -> str:
        """A booktabs ``tabular`` (text escaped for LaTeX); the notes follow as ``%`` comments."""
        header = self._header()
        spec = "ll" + "r" * (len(header) - 2)
        out = [r"\begin{tabular}{" + spec + "}", r"\toprule",
               " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(_latex_escape(t) for t in line) + r" \\" for line in self._cells()]
        out += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(out + [f"% {note}".replace("\n", " ") for note in self.notes()]) + "\n"

    def format(self, fmt: str) -> str:
        """``markdown``, ``csv`` or ``latex``."""
        if fmt not in FORMATS:
            raise ContrastlabError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return {"markdown": self.to_markdown, "csv": self.to_csv, "latex": self.to_latex}[fmt]()


# ---------------------------------------------------------------------------------------------- studies
def records_from_study(study: Any) -> list[CellRecord]:
    """The study's cells with the states ``study status`` gives them (:meth:`Study.status
    <contrastlab.studies.study.Study.status>`: done when every output exists, whoever wrote it; else what the cell's
    state file says, a running cell whose runner or SLURM job is gone being ``interrupted``)."""
    states = {status.cell: status.state for status in study.status()}
    return [CellRecord(group=cell.group, seed=cell.seed, run_dir=Path(cell.run_dir), rows=list(cell.rows),
                       state=states[cell.id]) for cell in study.cells(smoke=study.smoke_of_dir())]


def study_table(study: Any, fmt: str = "markdown", figure: str | os.PathLike | None = None,
                published: Callable[[str], Any] | None = _DEFAULT) -> str:
    """A study's table as text (``fmt``: markdown, csv or latex); with ``figure``, also write its figures
    (:func:`contrastlab.studies.figures.write_figures`)."""
    table = build_table(records_from_study(study), published=published)
    text = table.format(fmt)
    if figure is not None:
        from contrastlab.studies.figures import write_figures

        write_figures(table, figure)
    return text


# ---------------------------------------------------------------------------------------------- runs by hand
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _override_text(value: Any) -> str:
    """A config value as an override writes it: ``joint_crop``, ``0.2``, ``[0.2, 1.0]``, ``null``."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _config_key(result: RunResult) -> str:
    flat = {k: v for k, v in _flatten(result.config).items() if k not in IGNORED_CONFIG_KEYS}
    return json.dumps([result.recipe, flat], sort_keys=True, default=str)


def records_from_runs(run_dirs: Iterable[str | os.PathLike]) -> list[CellRecord]:
    """Cells for run directories made by hand: runs with the same recipe and the same ``config.yaml`` apart from
    :data:`IGNORED_CONFIG_KEYS` form one group, named by the recipe and the config values that tell it apart from
    the other groups of that recipe (values that differ first, then keys only it has; four at most).

    Raises:
        ContrastlabError: a directory is not a run directory (no ``config.yaml``).
    """
    results = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise ContrastlabError(f"{run_dir} is not a run directory (no config.yaml); pass directories written "
                                   "by `contrastlab train`")
        results.append(read_run(run_dir))
    keys = [_config_key(r) for r in results]
    flat = {key: _flatten(r.config) for key, r in zip(keys, results)}
    recipe_of = {key: r.recipe or "?" for key, r in zip(keys, results)}
    names = {}
    for key in dict.fromkeys(keys):
        others = [k for k in flat if k != key and recipe_of[k] == recipe_of[key]]
        # keys both configs have, with different values, first (views.planner); then keys only this one has
        both = {n for o in others for n in set(flat[key]) & set(flat[o]) if flat[key][n] != flat[o][n]}
        own = {n for o in others for n in set(flat[key]) - set(flat[o])}
        differing = [n for n in [*sorted(both), *sorted(own - both)] if n not in IGNORED_CONFIG_KEYS]
        values = [f"{name}={_override_text(flat[key][name])}" for name in differing]
        names[key] = " ".join([recipe_of[key], *values[:4], *(["…"] if len(values) > 4 else [])])
    return [CellRecord(group=names[key], seed=r.seed if r.seed is not None else 0, run_dir=r.run_dir,
                       state=run_state(r.run_dir)) for key, r in zip(keys, results)]


def table_from_runs(run_dirs: Iterable[str | os.PathLike]) -> Table:
    """The table of run directories made by hand (:func:`records_from_runs`), without published rows."""
    return build_table(records_from_runs(run_dirs), published=None)


def cmd_table(args: Any) -> int:
    """``contrastlab table RUN_DIR... [--format F] [--figure PATH]``: the table on stdout, figure paths on stderr."""
    import sys

    table = table_from_runs(args.runs)
    print(table.format(args.format), end="")
    if args.figure:
        from contrastlab.studies.figures import write_figures

        for path in write_figures(table, args.figure):
            print(path, file=sys.stderr)
    return 0
