"""Study tables and figures (contrastlab.studies.table, .figures): every aggregate is checked against
statistics.mean / statistics.stdev over values the test itself wrote into run directories, and the reader is
checked against run directories written by `contrastlab train --smoke` and `contrastlab eval knn`."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import statistics
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from contrastlab.cli import main
from contrastlab.errors import ContrastlabError
from contrastlab.studies import published
from contrastlab.studies.figures import bar_data, curve_data, curves_path, write_figures
from contrastlab.studies.study import Study
from contrastlab.studies.table import (
    LABELS,
    METRIC_SOURCES,
    Aggregate,
    CellRecord,
    build_table,
    read_run,
    run_state,
    study_table,
    table_from_runs,
)

RNG = random.Random(24)


def write_run(run_dir: Path, *, seed: int, recipe: str = "demo", results: dict | None = None,
              evals: dict[str, dict] | None = None, records: list[dict] | None = None, global_batch: int = 64,
              config: dict | None = None, data: str = "demo") -> Path:
    """A run directory with the files the trainer and `contrastlab eval` write, holding the given values."""
    run_dir.mkdir(parents=True)
    tree = {"out": str(run_dir), "seed": seed, "resume": None, "overwrite": False,
            "data": {"name": data, "batch_size": global_batch}, "method": {"name": "simclr", "temperature": 0.5}}
    for key, value in (config or {}).items():
        section, name = key.split(".")
        tree[section][name] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    (run_dir / "run.json").write_text(json.dumps({"recipe": recipe, "device_name": "cpu",
                                                  "derived": {"global_batch_size": global_batch}}))
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps({"recipe": recipe, "out": str(run_dir), **results}))
    for kind, result in (evals or {}).items():
        (run_dir / f"eval_{kind}_{data}.json").write_text(json.dumps(result))
    if records is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def curve(epochs: int) -> list[dict]:
    return [{"epoch": e, "step": 10 * e, "loss": 5.0, "lr": 0.1, "img_per_s": RNG.uniform(50, 200),
             "knn_top1": RNG.uniform(20, 80)} for e in range(1, epochs + 1)]


ROWS = {
    "paper/a/linear": SimpleNamespace(id="paper/a/linear", label="Method A, 100 ep", metric="linear_top1",
                                      value=61.3, std=0.4, runs=3, source="Paper A Table 1"),
    "paper/b/knn": SimpleNamespace(id="paper/b/knn", label="Method B", metric="knn_top1", value=55.0, std=None,
                                   runs=None, source="Paper B README"),
}


@pytest.fixture
def study_runs(tmp_path):
    """Group ``a`` (3 done seeds, a failed and a pending cell) reproducing a linear row, group ``b`` (one seed)
    reproducing a kNN row; returns the records and the values written for the done cells."""
    records, written = [], {"a": {"knn_top1": [], "linear_top1": []}, "b": {"knn_top1": []}}
    for seed in (0, 1, 2):
        knn, linear = RNG.uniform(40, 60), RNG.uniform(55, 65)
        written["a"]["knn_top1"].append(knn)
        written["a"]["linear_top1"].append(linear)
        run = write_run(tmp_path / f"a__s{seed}", seed=seed, results={"knn_top1": RNG.uniform(0, 10)},
                        evals={"knn": {"knn_top1": knn, "knn_k": 20}, "linear": {"top1": linear, "epochs": 100}},
                        records=curve(3))
        records.append(CellRecord("a", seed, run, ["paper/a/linear"], "done"))
    failed = write_run(tmp_path / "a__s3", seed=3, results={"knn_top1": 99.0}, evals={"linear": {"top1": 99.0}},
                       records=curve(2))
    records.append(CellRecord("a", 3, failed, ["paper/a/linear"], "failed"))
    records.append(CellRecord("a", 4, tmp_path / "a__s4", ["paper/a/linear"], "pending"))
    knn = RNG.uniform(40, 60)
    written["b"]["knn_top1"].append(knn)
    run = write_run(tmp_path / "b__s0", seed=0, recipe="other", results={"knn_top1": knn, "knn_k": 50},
                    records=curve(3))
    records.append(CellRecord("b", 0, run, ["paper/b/knn"], "done"))
    return records, written


def test_aggregates_are_mean_and_sample_std_of_the_done_cells(study_runs):
    records, written = study_runs
    table = build_table(records, published=ROWS.__getitem__)
    a, b = table.groups
    assert (a.name, b.name) == ("a", "b")
    for metric, values in written["a"].items():
        assert a.metrics[metric].n == 3
        assert a.metrics[metric].mean == pytest.approx(statistics.mean(values), abs=1e-12)
        assert a.metrics[metric].std == pytest.approx(statistics.stdev(values), abs=1e-12)  # n - 1
    assert a.status == "3/5 done, 1 failed, 1 pending"  # the failed cell's 99.0 is never averaged
    assert a.counts["failed"] == 1 and a.counts["pending"] == 1
    assert b.metrics["knn_top1"].n == 1 and b.metrics["knn_top1"].std is None
    assert b.metrics["knn_top1"].text() == f"{written['b']['knn_top1'][0]:.2f} (1)"
    assert b.status == "1/1 done"
    assert table.metrics == ["knn_top1", "linear_top1", "train_loop_min"]


def test_difference_in_points_and_published_std(study_runs):
    records, written = study_runs
    table = build_table(records, published=ROWS.__getitem__)
    (ca,), (cb,) = table.groups[0].comparisons, table.groups[1].comparisons
    mean = statistics.mean(written["a"]["linear_top1"])
    assert ca.metric == "linear_top1" and ca.value == 61.3
    assert ca.diff == pytest.approx(mean - 61.3, abs=1e-12)
    assert ca.diff_in_std == pytest.approx((mean - 61.3) / 0.4, abs=1e-9)
    assert cb.diff == pytest.approx(written["b"]["knn_top1"][0] - 55.0, abs=1e-12)
    assert cb.diff_in_std is None  # the paper gives no std
    assert build_table(records, published=None).groups[0].comparisons == []


def test_unknown_published_row_and_missing_module(study_runs, monkeypatch):
    records, _ = study_runs

    def row(row_id):
        raise ContrastlabError(f"unknown published row {row_id!r}")

    with pytest.raises(ContrastlabError, match="paper/a/linear"):
        build_table(records, published=row)
    monkeypatch.setitem(__import__("sys").modules, "contrastlab.studies.published", None)
    with pytest.raises(ContrastlabError, match="published=None"):
        build_table(records)


def test_markdown_csv_and_latex(study_runs, tmp_path):
    records, written = study_runs
    records.append(CellRecord("a_b 50% & #1", 0, write_run(tmp_path / "odd", seed=0, results={"knn_top1": 1.0}),
                              [], "done"))
    table = build_table(records, published=ROWS.__getitem__)
    knn, linear = written["a"]["knn_top1"], written["a"]["linear_top1"]

    lines = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [line["group"] for line in lines] == ["a", "b", "a_b 50% & #1"]
    a = lines[0]
    assert float(a["knn_top1_mean"]) == pytest.approx(statistics.mean(knn), abs=1e-12)
    assert float(a["linear_top1_std"]) == pytest.approx(statistics.stdev(linear), abs=1e-12)
    assert (a["linear_top1_n"], a["done"], a["failed"], a["pending"], a["cells"]) == ("3", "3", "1", "1", "5")
    assert a["published_row"] == "paper/a/linear" and float(a["published_std"]) == 0.4
    assert float(a["diff_points"]) == pytest.approx(statistics.mean(linear) - 61.3, abs=1e-12)
    assert lines[1]["knn_top1_std"] == "" and lines[1]["diff_published_std"] == ""
    assert lines[2]["linear_top1_n"] == "0" and lines[2]["published_row"] == ""

    markdown = table.to_markdown()
    row_a = next(line for line in markdown.splitlines() if line.startswith("| a |"))
    assert f"{statistics.mean(linear):.2f} ± {statistics.stdev(linear):.2f} (3)" in row_a
    assert "3/5 done, 1 failed, 1 pending" in row_a and "61.30 ± 0.40 (3 runs)" in row_a
    assert f"{(statistics.mean(linear) - 61.3) / 0.4:+.2f}σ" in row_a
    assert "eval_linear_demo.json top1 (epochs 100)" in markdown  # how the number was measured
    assert "paper/a/linear: Method A, 100 ep, linear_top1, Paper A Table 1" in markdown

    latex = table.to_latex()
    body = [line for line in latex.splitlines() if not line.startswith("%")]
    assert r"a\_b 50\% \& \#1 &" in latex
    assert f"{statistics.mean(knn):.2f} $\\pm$ {statistics.stdev(knn):.2f} (3)" in latex
    assert r"\begin{tabular}" in body[0] and body[-1] == r"\end{tabular}"
    assert not any(ch in line for line in body for ch in "±σΔ–…")
    columns = {len(re.findall(r"(?<!\\)&", line)) for line in body[2:-2] if line != r"\midrule"}
    assert columns == {len(table._header()) - 1}  # every line has one cell per column
    with pytest.raises(ContrastlabError, match="markdown, csv, latex"):
        table.format("html")


def test_results_json_test_top1_of_cohorts_and_supervised(tmp_path):
    heads = {"peer0": 70.0, "peer1": 72.5, "ensemble": 74.0, "peer_mean": 71.25, "peer_best": 72.5}
    mcl = read_run(write_run(tmp_path / "mcl", seed=0, results={"test_top1": heads,
                                                                "test_top1_protocol": "final epoch"}))
    assert mcl.metrics["test_top1"] == max(heads["peer0"], heads["peer1"])  # the papers' best peer
    assert mcl.metrics["test_top1_peer_mean"] == statistics.mean([heads["peer0"], heads["peer1"]])
    assert mcl.metrics["test_top1_ensemble"] == 74.0
    assert "test_top1.peer_best" in mcl.measured["test_top1"]
    sup = read_run(write_run(tmp_path / "sup", seed=0, results={"test_top1": {"classifier": 93.1}}))
    assert sup.metrics["test_top1"] == 93.1 and "test_top1_peer_mean" not in sup.metrics
    odd = write_run(tmp_path / "odd", seed=0, results={"test_top1": {"x": 1.0, "y": 2.0}})
    with pytest.raises(ContrastlabError, match="peer_best"):
        read_run(odd)


def test_eval_files_and_training_loop_time(tmp_path):
    records = [{"epoch": 1, "step": 10, "img_per_s": 100.0, "knn_top1": 30.0},
               {"epoch": 2, "step": 25, "img_per_s": 40.0, "knn_top1": 35.0}]
    run = write_run(tmp_path / "r", seed=3, results={"knn_top1": 35.0}, records=records, global_batch=64,
                    evals={"knn": {"knn_top1": 41.0}, "finetune": {"finetune_top1": 80.5}})
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"epoch": 3, "st')  # torn last line
    result = read_run(run)
    assert result.seed == 3 and result.recipe == "demo"
    assert result.metrics["knn_top1"] == 41.0  # `contrastlab eval knn` wins over the monitor's last epoch
    assert result.metrics["finetune_top1"] == 80.5 and "linear_top1" not in result.metrics
    assert result.knn_curve == [(1, 30.0), (2, 35.0)]
    assert result.metrics["train_loop_min"] == pytest.approx((10 * 64 / 100.0 + 15 * 64 / 40.0) / 60.0)
    (run / "eval_linear_demo.json").write_text(json.dumps({"top5": 90.0}))
    with pytest.raises(ContrastlabError, match="eval_linear_demo.json holds no number under 'top1'"):
        read_run(run)
    (run / "eval_linear_demo.json").write_text("{")
    with pytest.raises(ContrastlabError, match="not valid JSON"):
        read_run(run)


def test_linear_top5_is_read_from_the_probes_file(tmp_path):
    run = write_run(tmp_path / "r", seed=0, results={}, evals={"linear": {"top1": 61.25, "top5": 87.5, "epochs": 3}})
    result = read_run(run)
    assert result.metrics["linear_top1"] == 61.25 and result.metrics["linear_top5"] == 87.5
    assert result.measured["linear_top5"] == "eval_linear_demo.json top5 (epochs 3)"
    (run / "eval_linear_demo.json").write_text(json.dumps({"top1": 61.25}))  # a probe file without top5: top-1 only
    assert "linear_top5" not in read_run(run).metrics and read_run(run).metrics["linear_top1"] == 61.25


def test_the_solo_learn_study_table_compares_linear_top5_with_its_acc5_row(tmp_path):
    """The shipped study and published rows: a cell's eval_linear_cifar10.json `top5` (written here) against the
    published Acc@5, on the group's Acc@5 line."""
    study = Study.load("solo_learn_cifar10", dir=tmp_path / "solo", validate=False)
    cell = study.cell("barlow_twins__s0")
    top1, top5 = RNG.uniform(80, 90), RNG.uniform(95, 99)
    write_run(cell.run_dir, seed=0, recipe=cell.recipe, results={}, data="cifar10",
              evals={"linear": {"top1": top1, "top5": top5}})
    assert cell.stage("linear").output == cell.run_dir / "eval_linear_cifar10.json"
    (study.dir / "cells").mkdir()
    (study.dir / "cells" / f"{cell.id}.json").write_text(json.dumps({"cell": cell.id, "state": "done"}))
    lines = {line["published_row"]: line for line in csv.DictReader(io.StringIO(study.table(fmt="csv")))}
    row = published.row("solo_learn_cifar10/barlow_twins/top5")
    assert row.metric == "linear_top5"
    line = lines[row.id]
    assert line["published_metric"] == "linear_top5" and float(line["published"]) == row.value
    assert float(line["linear_top5_mean"]) == top5 and float(line["diff_points"]) == pytest.approx(top5 - row.value)
    assert float(lines["solo_learn_cifar10/barlow_twins/top1"]["diff_points"]) == pytest.approx(
        top1 - published.row("solo_learn_cifar10/barlow_twins/top1").value)
    assert "linear top-5" in study.table()


#: Published metrics that contrastlab does not measure: fine-tuning on another dataset and detectron2 detection,
#: run outside it on an exported backbone (docs/study_tables.md); their table lines stay empty.
MEASURED_OUTSIDE = {"transfer_top1", "voc_ap50", "coco_ap"}


def test_every_published_metric_is_read_by_the_table_or_measured_outside():
    for metric in published.METRICS:
        assert (metric in METRIC_SOURCES) != (metric in MEASURED_OUTSIDE), metric
    assert MEASURED_OUTSIDE <= set(published.METRICS)  # no stale name in the list
    assert set(LABELS) == set(METRIC_SOURCES)
    for row in published.rows():  # a row the table cannot read is measured by a protocol outside contrastlab
        assert (row.metric in MEASURED_OUTSIDE) == (row.protocol in published.OUTSIDE_PROTOCOLS), row.id


def test_duplicate_seed_in_a_group_is_refused(tmp_path):
    runs = [write_run(tmp_path / n, seed=0, results={"knn_top1": 50.0}) for n in ("x", "y")]
    with pytest.raises(ContrastlabError, match="both have seed 0"):
        build_table([CellRecord("g", 0, r, [], "done") for r in runs], published=None)


def test_run_state_of_runs_made_by_hand(tmp_path):
    assert run_state(tmp_path / "absent") == "pending"
    run = write_run(tmp_path / "r", seed=0)
    assert run_state(run) == "interrupted"
    (run / "run.lock").write_text(json.dumps({"heartbeat": time.time()}))
    assert run_state(run) == "running"
    assert run_state(run, now=time.time() + 3600) == "interrupted"  # a stale lock: its holder is gone
    (run / "results.json").write_text("{}")
    assert run_state(run) == "done"


def test_study_table_gives_each_cell_the_state_study_status_gives_it(tmp_path):
    """A study's table counts cells as `study status` does: done when the outputs exist (also a run made by hand or
    linked in from an identical cell of another study, with no state file), interrupted when the state file says
    running and its runner is gone, failed as its state file says, pending otherwise; only done cells are averaged."""
    study = Study.from_dict({"name": "demo", "seeds": [0, 1, 2, 3, 4], "groups": [{"name": "g", "recipe": "demo"}]},
                            dir=tmp_path / "studies" / "demo", validate=False)
    study.prepare()
    runs, values = study.dir / "runs", [RNG.uniform(10, 90) for _ in range(2)]
    write_run(runs / "g__s0", seed=0, results={"knn_top1": values[0]}, records=curve(2))
    study.write_state("g__s0", "done", stage="train")
    write_run(tmp_path / "elsewhere" / "g__s1", seed=1, results={"knn_top1": values[1]}, records=curve(2))
    (runs / "g__s1").symlink_to(tmp_path / "elsewhere" / "g__s1")  # no state file: done by its outputs
    write_run(runs / "g__s2", seed=2, records=curve(1))  # a running state file whose process is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    state = json.loads(study.state_path("g__s0").read_text())
    study.state_path("g__s2").write_text(json.dumps({**state, "cell": "g__s2", "state": "running", "pid": gone.pid,
                                                     "pid_start": None, "job": None}))
    study.write_state("g__s3", "failed", stage="train", reason="exited with status 1")
    assert [s.state for s in study.status()] == ["done", "done", "interrupted", "failed", "pending"]
    figure = tmp_path / "fig.png"
    (line,) = csv.DictReader(io.StringIO(study_table(study, fmt="csv", figure=figure, published=None)))
    assert line["status"] == "2/5 done, 1 failed, 1 interrupted, 1 pending"
    assert float(line["knn_top1_mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
    assert float(line["knn_top1_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
    for path in (figure, curves_path(figure)):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0


def test_figure_data(study_runs, tmp_path):
    records, written = study_runs
    table = build_table(records, published=ROWS.__getitem__)
    panels = {p.metric: p for p in bar_data(table)}
    assert set(panels) == {"knn_top1", "linear_top1"}  # the training-loop time is not drawn as a bar
    (bar,) = panels["linear_top1"].bars
    assert (bar.label, bar.n, bar.published, bar.published_std) == ("a", 3, 61.3, 0.4)
    assert bar.mean == pytest.approx(statistics.mean(written["a"]["linear_top1"]), abs=1e-12)
    assert bar.std == pytest.approx(statistics.stdev(written["a"]["linear_top1"]), abs=1e-12)
    knn_bars = {b.label: b for b in panels["knn_top1"].bars}
    assert knn_bars["b"].published == 55.0 and knn_bars["a"].published is None
    curves = curve_data(table)
    assert [(c.group, c.seed, c.state) for c in curves] == [
        ("a", 0, "done"), ("a", 1, "done"), ("a", 2, "done"), ("a", 3, "failed"), ("b", 0, "done")]
    for c, cell in zip(curves, [r for r in records if r.state != "pending"]):
        written_curve = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert c.epochs == tuple(r["epoch"] for r in written_curve)
        assert c.values == tuple(r["knn_top1"] for r in written_curve)
    paths = write_figures(table, tmp_path / "figs" / "table")  # no suffix: .png
    assert paths == [tmp_path / "figs" / "table.png", tmp_path / "figs" / "table_curves.png"]
    for path in paths:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
        assert path.stat().st_size > 0
    empty = build_table([CellRecord("z", 0, tmp_path / "none", [], "pending")], published=None)
    with pytest.raises(ContrastlabError, match="nothing to draw"):
        write_figures(empty, tmp_path / "e.png")


def test_aggregate_text():
    assert Aggregate((70.0, 72.0)).text() == f"71.00 ± {statistics.stdev([70.0, 72.0]):.2f} (2)"
    assert Aggregate((70.0,)).text() == "70.00 (1)"


# ---------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Two seeds of the demo smoke run and one with another temperature (kNN also by `contrastlab eval knn`)."""
    root = tmp_path_factory.mktemp("smoke")
    runs = {"s0": ["seed=0"], "s1": ["seed=1"], "t02": ["seed=0", "method.temperature=0.2"]}
    for name, overrides in runs.items():
        assert main(["train", "demo", "--smoke", f"out={root / name}", *overrides]) == 0
    assert main(["eval", "knn", str(root / "t02" / "checkpoints" / "last.pt")]) == 0
    return root


def test_table_of_real_runs_groups_seeds(smoke_runs, capsys, tmp_path):
    dirs = [smoke_runs / n for n in ("s0", "s1", "t02")]
    capsys.readouterr()
    assert main(["table", *map(str, dirs), "--format", "csv", "--figure", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr()
    lines = list(csv.DictReader(io.StringIO(out.out)))
    assert [line["group"] for line in lines] == ["demo method.temperature=0.5", "demo method.temperature=0.2"]
    seeds = [json.loads((d / "results.json").read_text())["knn_top1"] for d in dirs[:2]]
    assert lines[0]["status"] == "2/2 done" and lines[0]["knn_top1_n"] == "2"
    assert float(lines[0]["knn_top1_mean"]) == pytest.approx(statistics.mean(seeds), abs=1e-12)
    assert float(lines[0]["knn_top1_std"]) == pytest.approx(statistics.stdev(seeds), abs=1e-12)
    evaluated = json.loads((dirs[2] / "eval_knn_demo.json").read_text())["knn_top1"]
    assert float(lines[1]["knn_top1_mean"]) == evaluated and lines[1]["knn_top1_n"] == "1"
    assert out.err.split() == [str(tmp_path / "f.png"), str(tmp_path / "f_curves.png")]
    for path in out.err.split():
        with Image.open(path) as image:
            assert image.format == "PNG"

    table = table_from_runs(dirs)
    first = table.groups[0]
    assert [r.seed for r in first.results] == [0, 1] and first.recipes == ["demo"]
    for result in first.results:
        written = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert result.knn_curve == [(r["epoch"], r["knn_top1"]) for r in written]
        finished = json.loads((result.run_dir / "results.json").read_text())
        assert result.metrics["epoch_s"] == pytest.approx(finished["wall_seconds"] / finished["epochs"])
        assert "train_loop_min" not in result.metrics  # only for runs without wall_seconds
    assert table.groups[1].results[0].measured["knn_top1"].startswith("eval_knn_demo.json knn_top1 (k 10,")
    assert len(curve_data(table)) == 3


def test_table_cli_errors(tmp_path, capsys):
    assert main(["table", str(tmp_path / "missing")]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err


def test_runs_made_by_hand_are_grouped_by_config_without_seed_and_out(tmp_path):
    runs = [write_run(tmp_path / "a0", seed=0, results={"knn_top1": 40.0}),
            write_run(tmp_path / "a1", seed=1, results={"knn_top1": 44.0}),
            write_run(tmp_path / "b0", seed=0, results={"knn_top1": 50.0},
                      config={"method.temperature": 0.2, "method.extra": "x"}),
            write_run(tmp_path / "c0", seed=0, recipe="other", results={"knn_top1": 60.0})]
    table = table_from_runs(runs)
    names = ["demo method.temperature=0.5", "demo method.temperature=0.2 method.extra=x", "other"]
    assert [g.name for g in table.groups] == names
    assert [len(g.cells) for g in table.groups] == [2, 1, 1]
    assert table.groups[0].metrics["knn_top1"].mean == statistics.mean([40.0, 44.0])
