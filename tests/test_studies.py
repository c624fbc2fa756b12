"""Studies (``contrastlab.studies``): a study file is checked when it loads, expands into group x seed cells whose
commands are written out here independently, runs through the cell runner and the local launcher, skips what is done,
reports a failing cell with its log while the others finish, and resumes a preempted or killed training run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from contrastlab.cli import main
from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.studies.cell_runner import load_study_dir
from contrastlab.studies.cells import Stage
from contrastlab.studies.launchers import LAUNCHERS, Launcher, register_launcher
from contrastlab.studies.launchers import local as local_launcher
from contrastlab.studies.study import Study

ROOT = Path(__file__).resolve().parent.parent
PAUSE_PLUGIN = Path(__file__).with_name("pause_at_step.py")
PY = sys.executable
CL = [PY, "-m", "contrastlab"]


def write_study(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- validation

GOOD = {"name": "check", "seeds": [0], "groups": [{"name": "rrc", "recipe": "demo", "overrides": ["optim.lr=0.1"]}]}


def _with(change) -> dict:
    data = json.loads(json.dumps(GOOD))
    change(data)
    return data


@pytest.mark.parametrize("change, needles", [
    (lambda d: d.update(seed=[0]), ["unknown key 'seed'", "did you mean 'seeds'", "valid keys:"]),
    (lambda d: d["groups"][0].update(override=[]), ["groups[0]", "unknown key 'override'", "'overrides'"]),
    (lambda d: d["groups"][0].update(recipe="demo/mocov2_r20_8e"), ["'rrc'", "recipe", "demo/mocov2_r20_8ep"]),
    (lambda d: d["groups"][0].update(overrides=["views.plannr=joint_crop"]), ["'rrc'", "views.plannr", "views.planner"]),
    (lambda d: d["groups"][0].update(overrides=["views.planner=jointcrop"]), ["'rrc'", "jointcrop", "joint_crop"]),
    (lambda d: d.update(overrides=["optim.lrr=1"]), ["'rrc'", "optim.lrr", "optim.lr"]),
    (lambda d: d.update(evaluate=["knnn"]), ["evaluate[0]", "'knnn'", "knn"]),
    (lambda d: d.update(evaluate=[{"kind": "linear", "recipe": "linear/demo_10e"}]), ["evaluate linear", "linear/demo_10ep"]),
    (lambda d: d["groups"][0].update(overrides=["observers=[progress]"]), ["no knn observer", "observers+=[knn]"]),
    (lambda d: d.update(resources={"gpu": 1}), ["resources", "unknown key 'gpu'", "'gpus'"]),
    (lambda d: d["groups"][0].update(name="a__b"), ["groups[0].name", "'a__b'"]),
    (lambda d: d["groups"].append({"name": "rrc", "recipe": "demo"}), ["rrc appear(s) twice"]),
    (lambda d: d.update(seeds=[0, 0]), ["seeds", "different whole numbers"]),
])
def test_a_bad_study_file_fails_at_load_naming_the_file_and_key(tmp_path, change, needles):
    path = write_study(tmp_path / "check.yaml", _with(change))
    with pytest.raises(ConfigError) as info:
        Study.load(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


def test_unknown_study_names_the_nearest_shipped_ones():
    with pytest.raises(ConfigError, match="Did you mean 'demo'") as info:
        Study.load("dem")
    assert "contrastlab study list" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        Study.load("no/such/study.yaml")


def test_the_good_file_loads(tmp_path):
    study = Study.load(write_study(tmp_path / "check.yaml", GOOD))
    assert [c.id for c in study.cells()] == ["rrc__s0"] and study.dir == Path("studies") / "check"
    unnamed = Study.load(write_study(tmp_path / "mine.yaml", {k: v for k, v in GOOD.items() if k != "name"}),
                         dir=tmp_path / "dir")
    assert unnamed.name == "mine"  # the file's name
    unnamed.prepare()
    assert load_study_dir(tmp_path / "dir")[0].name == "mine"  # the copy in the study directory says it


# -------------------------------------------------------------------------------------- cell expansion

GRID = {
    "name": "grid", "seeds": [3, 1], "overrides": ["train.epochs=2"],
    "evaluate": ["knn", {"kind": "linear", "recipe": "linear/demo_10ep"}],
    "resources": {"gpus": 1, "time": "00:10:00"},
    "groups": [{"name": "base", "recipe": "demo", "overrides": ["optim.lr=0.1"], "rows": ["x/y/z"],
                "evaluate": ["knn"], "resources": {"gpus": 2}}],
    "grid": {"recipes": {"simclr": "demo", "moco": "demo/mocov2_r20_8ep"},
             "overrides": {"rrc": [], "jc": ["views.planner=joint_crop"]}},
}


def test_cells_are_the_product_of_groups_and_seeds_with_their_commands(tmp_path):
    study = Study.from_dict(GRID, dir=tmp_path / "grid")
    groups = [("base", "demo", ["optim.lr=0.1"], ["knn"])]
    for rkey, recipe in GRID["grid"]["recipes"].items():
        for okey, overrides in GRID["grid"]["overrides"].items():
            groups.append((f"{rkey}_{okey}", recipe, overrides, ["knn", "linear"]))
    expected = [(f"{name}__s{seed}", name, seed, recipe, ("train.epochs=2", *overrides))
                for seed in (3, 1) for name, recipe, overrides, _ in groups]
    cells = study.cells()
    assert [(c.id, c.group, c.seed, c.recipe, c.overrides) for c in cells] == expected
    kinds = {name: kinds for name, _, _, kinds in groups}
    root = (tmp_path / "grid").resolve()
    for cell in cells:
        run = root / "runs" / cell.id
        assert cell.run_dir == run
        assert cell.stages[0].argv == [*CL, "train", cell.recipe, *cell.overrides, f"seed={cell.seed}", f"out={run}",
                                       "resume=auto"]
        assert cell.outputs["train"] == cell.outputs["knn"] == run / "results.json"
        if "linear" in kinds[cell.group]:
            assert [s.name for s in cell.stages] == ["train", "linear"]
            assert cell.stages[1].argv == [*CL, "eval", "linear", str(run / "checkpoints" / "last.pt"), "--out",
                                           str(run / "eval_linear_demo.json"), "--recipe", "linear/demo_10ep"]
            assert cell.outputs["linear"] == run / "eval_linear_demo.json"
        else:
            assert [s.name for s in cell.stages] == ["train"]
        assert cell.resources.gpus == (2 if cell.group == "base" else 1) and cell.resources.time == "00:10:00"
        assert cell.rows == (("x/y/z",) if cell.group == "base" else ())
    smoke = study.cells(smoke=True)
    assert all(c.stages[0].argv[-1] == "--smoke" and c.stages[0].processes == 1 for c in smoke)
    assert [s.argv[-3:] for c in smoke for s in c.stages[1:]] == [["linear.epochs=1", "linear.max_train=256",
                                                                    "linear.max_test=256"]] * 8
    assert [c.id for c in study.cells(pattern="moco_*__s1")] == ["moco_rrc__s1", "moco_jc__s1"]


def test_several_gpus_train_under_torchrun():
    argv = [*CL, "train", "demo", "seed=0", "out=/x/runs/a__s0", "resume=auto"]
    one = Stage("train", argv, Path("/x/runs/a__s0/results.json"))
    assert one.command() == argv
    four = Stage("train", argv, Path("/x/runs/a__s0/results.json"), processes=4)
    assert four.command() == [PY, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                              "-m", "contrastlab", *argv[3:]]
    nodes = Stage("train", argv, Path("/x/runs/a__s0/results.json"), processes=8, nodes=2)
    assert nodes.command({"MASTER_ADDR": "n1", "MASTER_PORT": "1234"}) == [
        PY, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "n1:1234", "--rdzv-id", "a__s0", "-m", "contrastlab", *argv[3:]]
    cell = Study.from_dict(GRID, validate=False).cell("base__s3")
    assert cell.stages[0].processes == 2 and cell.stages[0].command()[2] == "torch.distributed.run"


def test_a_finetune_stage_runs_on_the_cells_gpus_and_nodes_as_training_does():
    """Fine-tuning trains the whole network (under torchrun, like training); a linear probe or kNN is one process."""
    evaluate = ["knn", {"kind": "linear", "recipe": "linear/demo_10ep"}, {"kind": "finetune"},
                {"kind": "knn", "overrides": ["monitor.knn_k=10"]}]
    groups = [{"name": "big", "recipe": "demo"},
              {"name": "one", "recipe": "demo", "resources": {"gpus": 1, "nodes": 1}}]
    data = {"name": "spread", "seeds": [0], "evaluate": evaluate, "resources": {"gpus": 4, "nodes": 2},
            "groups": groups}
    study = Study.from_dict(data, dir="/x", validate=False)
    big, one = study.cells()
    assert [s.name for s in big.stages] == ["train", "linear", "finetune", "knn"]
    assert [(s.processes, s.nodes) for s in big.stages] == [(4, 2), (1, 1), (4, 2), (1, 1)]
    finetune = big.stage("finetune").command({"MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert finetune == [PY, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "2",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "n1:1234", "--rdzv-id", "big__s0",
                        "-m", "contrastlab", "eval", "finetune", str(big.run_dir / "checkpoints" / "last.pt"),
                        "--out", str(big.run_dir / "eval_finetune_demo.json"), "--resume", "auto"]
    for name in ("linear", "knn"):
        stage = big.stage(name)
        assert stage.command() == stage.argv and stage.argv[:5] == [*CL, "eval", name]
    assert all((s.processes, s.nodes) == (1, 1) and s.command() == s.argv for s in one.stages)
    assert all((s.processes, s.nodes) == (1, 1) for c in study.cells(smoke=True) for s in c.stages)


def test_dry_run_prints_every_cell_and_its_commands_and_runs_nothing(tmp_path, capsys):
    path = write_study(tmp_path / "grid.yaml", GRID)
    folder = tmp_path / "out"
    assert main(["study", "run", str(path), "--dry-run", "--dir", str(folder)]) == 0
    text = capsys.readouterr().out
    for cell in Study.from_dict(GRID, dir=folder, validate=False).cells():
        block = text.split(f"cell {cell.id} ", 1)[1].split("\ncell ", 1)[0]
        assert f"seed={cell.seed}" in block and f"runs/{cell.id} resume=auto" in block
        assert "gpus" in block and "time 00:10:00" in block
        assert ("eval linear" in block) == (len(cell.stages) == 2)
    assert text.count("\ncell ") == 10 and not folder.exists()


def test_the_demo_study_is_six_groups_by_three_seeds(capsys):
    study = Study.load("demo")
    assert len(study.cells()) == 18 and study.seeds == (0, 1, 2)
    planners = {g.name: next((o for o in g.overrides if o.startswith("views.planner=")), "") for g in study.groups}
    assert planners == {f"{m}_{c}": p for m in ("simclr", "mocov2") for c, p in
                        (("rrc", ""), ("ccrop", "views.planner=contrastive_crop"),
                         ("jointcrop", "views.planner=joint_crop"))}
    assert all(c.outputs["knn"] == c.outputs["train"] and len(c.stages) == 1 for c in study.cells())
    assert main(["study", "list"]) == 0
    assert re.search(r"^demo\s+18 cells", capsys.readouterr().out, re.MULTILINE)


# ------------------------------------------------------------------------------ command-line overrides

EXTRA = ["data.root=/elsewhere/data", "optim.weight_decay=0.0003"]


def test_command_line_overrides_reach_every_train_command_after_the_files_own(tmp_path, capsys):
    path = write_study(tmp_path / "grid.yaml", GRID)
    study = Study.load(path, dir=tmp_path / "grid", overrides=EXTRA)
    plain = {c.id: c for c in Study.from_dict(GRID, dir=tmp_path / "grid", validate=False).cells()}
    assert study.extra_overrides == tuple(EXTRA)
    for cell in study.cells() + study.cells(smoke=True):
        assert cell.overrides == (*plain[cell.id].overrides, *EXTRA)  # the study's, the group's, then these
        train = cell.stage("train").argv
        at = train.index(f"seed={cell.seed}")
        assert train[:4] == [*CL, "train"] and train[at - len(EXTRA):at] == EXTRA
    # the command line: key=value after the study, before or after the flags; --dry-run shows them
    folder = tmp_path / "out"
    assert main(["study", "run", str(path), EXTRA[0], "--dry-run", "--dir", str(folder), EXTRA[1]]) == 0
    text = capsys.readouterr().out
    assert f"command-line overrides of every cell (after the study's and the group's): {' '.join(EXTRA)}" in text
    trains = [line for line in text.splitlines() if " train " in line and "seed=" in line]
    assert len(trains) == 10 and all(f"{' '.join(EXTRA)} seed=" in line for line in trains)
    assert not folder.exists()


@pytest.mark.parametrize("extra, needles", [
    (["data.rot=/data"], ["command line's ['data.rot=/data']", "'data.rot'", "data.root"]),
    (["views.planner=jointcrop"], ["command line's", "jointcrop", "joint_crop"]),
    (["data.root"], ["command-line overrides", "'data.root' is not a key=value override"]),
])
def test_a_bad_command_line_override_is_refused_at_load_naming_the_key(tmp_path, capsys, extra, needles):
    path = write_study(tmp_path / "check.yaml", GOOD)
    with pytest.raises(ConfigError) as info:
        Study.load(path, overrides=extra)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match=re.escape(needles[1])):  # Study.run checks those it is given
        Study.load(path, dir=tmp_path / "s").run(overrides=extra)
    assert main(["study", "run", str(path), *extra, "--dir", str(tmp_path / "cli")]) == 2
    assert needles[1] in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "cli").exists()  # refused before anything ran


def test_command_line_overrides_are_recorded_and_other_ones_are_refused_unless_forced(tmp_path, capsys):
    seen: list[tuple[str, tuple[str, ...]]] = []

    @register_launcher("overrides_test")
    class Recording(Launcher):
        name = "overrides_test"

        def launch(self, study, cells, *, smoke, options):
            seen.extend((c.id, c.overrides) for c in cells)

    # a linear evaluation: its output file is named by the dataset, which the command line's data.name sets
    data = {**GOOD, "seeds": [0, 1], "evaluate": [{"kind": "linear"}]}
    path = write_study(tmp_path / "check.yaml", data)
    folder = tmp_path / "s"
    first = ["data.name=cifar10", "data.root=/elsewhere"]
    run = ["study", "run", str(path), "--dir", str(folder), "--launcher", "overrides_test"]
    try:
        assert main([*run, *first]) == 0
        assert seen == [(f"rrc__s{seed}", ("optim.lr=0.1", *first)) for seed in (0, 1)]
        assert json.loads((folder / "study.json").read_text())["overrides"] == first
        # the cell runner, status and table read them back from the directory
        recorded = load_study_dir(folder)[0]
        assert recorded.extra_overrides == tuple(first)
        assert recorded.cell("rrc__s0").stage("linear").output.name == "eval_linear_cifar10.json"
        run_dir = folder / "runs" / "rrc__s0"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text("{}")
        (run_dir / "eval_linear_cifar10.json").write_text(json.dumps({"top1": 50.0}))
        plain = Study.load(path, dir=folder, validate=False)  # no overrides given
        assert [(s.cell, s.state) for s in plain.status()] == [("rrc__s0", "done"), ("rrc__s1", "pending")]
        capsys.readouterr()
        assert main(["study", "status", str(path), "--dir", str(folder)]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^rrc__s0\s+done", out, re.MULTILINE)
        assert f"with {' '.join(first)}: 1 done, 1 pending" in out
        # the same overrides again: accepted; other ones, or none: a changed study, refused naming the cells
        seen.clear()
        assert main([*run, *first]) == 0 and len(seen) == 2
        for other, now in ((["data.name=cifar10"], "data.name=cifar10"), ([], "none")):
            assert main([*run, *other]) == 2
            err = capsys.readouterr().err
            assert "changed cells (recipe, overrides or evaluations): rrc__s0, rrc__s1" in err
            assert f"the command-line overrides were {' '.join(first)}, now {now}" in err and "--force" in err
        assert json.loads((folder / "study.json").read_text())["overrides"] == first  # refused: nothing changed
        assert (run_dir / "eval_linear_cifar10.json").is_file()
        # --force: the changed cells' runs are moved aside and the new overrides recorded
        assert main([*run, "--force", "data.name=cifar10"]) == 0
        assert not run_dir.exists() and len(list((folder / "runs").glob("rrc__s0.replaced-*"))) == 1
        assert json.loads((folder / "study.json").read_text())["overrides"] == ["data.name=cifar10"]
        assert load_study_dir(folder)[0].extra_overrides == ("data.name=cifar10",)
    finally:
        LAUNCHERS.unregister("overrides_test")


def test_a_cell_trains_with_the_command_line_overrides_after_the_groups_own(tmp_path, capsys):
    """One --smoke cell through the local launcher and the cell runner, a process that reads them from study.json."""
    path = write_study(tmp_path / "check.yaml", GOOD)  # the group sets optim.lr=0.1
    folder = tmp_path / "s"
    assert main(["study", "run", str(path), "optim.lr=0.125", "--smoke", "--dir", str(folder)]) == 0
    config = yaml.safe_load((folder / "runs" / "rrc__s0" / "config.yaml").read_text())
    assert config["optim"]["lr"] == 0.125 and config["seed"] == 0  # the command line's override wins
    capsys.readouterr()
    assert main(["study", "status", str(path), "--dir", str(folder)]) == 0  # without repeating it
    assert capsys.readouterr().out.splitlines()[-1].endswith("(--smoke runs) with optim.lr=0.125: 1 done")


# -------------------------------------------------------------------------------------- local launcher


class FakeProcess:
    """A runner that ends after a few polls, recording the GPUs it was given."""

    log: ClassVar[list[tuple[str, str]]] = []
    live: ClassVar[set[str]] = set()

    def __init__(self, argv, env):
        self.cell = argv[argv.index("run-cell") + 2]
        self.gpus = env.get("CUDA_VISIBLE_DEVICES", "")
        self.polls, self.returncode = 0, None
        FakeProcess.log.append((self.cell, self.gpus))
        assert not (set(self.gpus.split(",")) & FakeProcess.live), "a GPU given to two running cells"
        FakeProcess.live |= set(self.gpus.split(","))

    def poll(self):
        self.polls += 1
        if self.polls > 2 and self.returncode is None:
            self.returncode = 1 if self.cell.startswith("bad") else 0
            FakeProcess.live -= set(self.gpus.split(","))
        return self.returncode


def test_local_launcher_gives_each_running_cell_its_own_gpus(tmp_path, monkeypatch):
    data = {"name": "gpus", "seeds": [0, 1], "resources": {"gpus": 1},
            "groups": [{"name": "one", "recipe": "demo"}, {"name": "two", "recipe": "demo", "resources": {"gpus": 2}},
                       {"name": "bad", "recipe": "demo"}]}
    study = Study.from_dict(data, dir=tmp_path / "gpus", validate=False)
    monkeypatch.setattr(local_launcher, "visible_gpus", lambda: ["0", "1", "2"])
    monkeypatch.setattr(local_launcher.subprocess, "Popen", lambda argv, env: FakeProcess(argv, env))
    monkeypatch.setattr(local_launcher.time, "sleep", lambda s: None)
    FakeProcess.log, FakeProcess.live = [], set()
    failed = local_launcher.LocalLauncher().launch(study, study.cells(), smoke=False, options={"parallel": 3})
    assert failed == 2  # bad__s0, bad__s1
    assert sorted(c for c, _ in FakeProcess.log) == sorted(c.id for c in study.cells())
    assert {c: len(g.split(",")) for c, g in FakeProcess.log} == {c.id: 2 if c.group == "two" else 1
                                                                  for c in study.cells()}
    monkeypatch.setattr(local_launcher, "visible_gpus", lambda: ["0"])
    with pytest.raises(ContrastlabError, match="two__s0 asks for 2 GPU"):
        local_launcher.LocalLauncher().launch(study, study.cells(), smoke=False, options={})
    monkeypatch.setattr(local_launcher, "visible_gpus", list)
    with pytest.raises(ContrastlabError, match="has none; lower resources.gpus"):
        local_launcher.LocalLauncher().launch(study, study.cells(), smoke=False, options={})


def test_launchers_are_a_registry_users_extend(tmp_path):
    assert "local" in LAUNCHERS.names()
    with pytest.raises(ConfigError, match="Did you mean 'local'"):
        LAUNCHERS["locl"]
    seen = []

    @register_launcher("listing_test")
    class Listing(Launcher):
        name = "listing_test"

        def launch(self, study, cells, *, smoke, options):
            seen.extend((c.id, options["parallel"], smoke) for c in cells)

    try:
        study = Study.from_dict(GOOD, dir=tmp_path / "s", validate=False)
        assert study.run("listing_test", smoke=True, parallel=3) == 0
        assert seen == [("rrc__s0", 3, True)] and (tmp_path / "s" / "study.yaml").read_text() == study.text
    finally:
        LAUNCHERS.unregister("listing_test")


def test_status_tells_running_from_interrupted(tmp_path):
    study = Study.from_dict({**GOOD, "seeds": [0, 1, 2, 3]}, dir=tmp_path / "s", validate=False)
    study.prepare()
    study.write_state("rrc__s0", "running", stage="train", log=study.log_path("rrc__s0", "train"))  # this process
    gone = subprocess.Popen([PY, "-c", "pass"])
    gone.wait()
    path = study.state_path("rrc__s1")
    study.write_state("rrc__s1", "running", stage="train")
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": gone.pid, "pid_start": None}))
    study.write_state("rrc__s2", "failed", stage="train", reason="train exited with status 2: boom",
                      log=study.log_path("rrc__s2", "train"))
    states = {s.cell: s for s in study.status()}
    assert [states[f"rrc__s{i}"].state for i in range(4)] == ["running", "interrupted", "failed", "pending"]
    assert states["rrc__s0"].pid == os.getpid() and "boom" in states["rrc__s2"].reason
    assert str(study.log_path("rrc__s2", "train")) in states["rrc__s2"].describe()


def test_table_needs_the_table_module(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "contrastlab.studies.table", None)  # as if it were not installed
    path = write_study(tmp_path / "check.yaml", GOOD)
    assert main(["study", "table", str(path)]) == 2
    assert "contrastlab.studies.table is not installed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- real local runs

TINY = {"name": "tiny", "seeds": [0, 1], "groups": [
    {"name": "rrc", "recipe": "demo"}, {"name": "jc", "recipe": "demo", "overrides": ["views.planner=joint_crop"]}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny study run once with --smoke, two cells at a time: (study file, study directory, exit status)."""
    folder = tmp_path_factory.mktemp("tiny")
    path = write_study(folder / "tiny.yaml", TINY)
    status = main(["study", "run", str(path), "--smoke", "--parallel", "2", "--dir", str(folder / "study")])
    return path, folder / "study", status


def test_a_local_smoke_run_finishes_every_cell(tiny, capsys):
    path, folder, status = tiny
    assert status == 0
    assert main(["study", "status", str(path), "--dir", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [[c, "done"] for c in ("rrc__s0", "jc__s0", "rrc__s1", "jc__s1")]
    assert lines[-1].endswith("(--smoke runs): 4 done")
    states = Study.load(path, dir=folder).status()
    assert [(s.cell, s.state) for s in states] == [("rrc__s0", "done"), ("jc__s0", "done"), ("rrc__s1", "done"),
                                                   ("jc__s1", "done")]
    for seed in (0, 1):
        for group, planner in (("rrc", "random_resized"), ("jc", "joint_crop")):
            run = folder / "runs" / f"{group}__s{seed}"
            results = json.loads((run / "results.json").read_text())
            assert results["steps"] == 2 and 0 <= results["knn_top1"] <= 100  # --smoke: train.max_steps=2
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["seed"] == seed and config["views"]["planner"] == planner
            assert config["out"] == str(run) and config["resume"] == "auto"
            record = json.loads((folder / "cells" / f"{group}__s{seed}.json").read_text())
            assert record["state"] == "done" and record["launcher"] == "local" and record["job"] is None
            log = (folder / "logs" / f"{group}__s{seed}.train.log").read_text()
            assert log.startswith("==== contrastlab study tiny") and '"steps": 2' in log  # the stage's stdout
    assert yaml.safe_load((folder / "study.yaml").read_text()) == TINY
    assert json.loads((folder / "study.json").read_text())["smoke"] is True


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_starts_no_process_and_recomputes_nothing(tiny, monkeypatch):
    path, folder, _ = tiny
    before = _snapshot(folder)

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started for cells that are done")

    with monkeypatch.context() as patch:
        patch.setattr(local_launcher.subprocess, "Popen", no_process)
        assert main(["study", "run", str(path), "--smoke", "--dir", str(folder)]) == 0
    # the runner itself, asked for a done cell, runs no stage and leaves its files alone
    out = subprocess.run([*CL, "study", "run-cell", str(folder), "jc__s1"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "train done already" in out.stdout
    assert _snapshot(folder) == before


def test_a_changed_study_file_is_refused_unless_forced(tiny, tmp_path):
    _, folder, _ = tiny
    copy = tmp_path / "study"
    shutil.copytree(folder, copy)
    changed = json.loads(json.dumps(TINY))
    changed["groups"][0]["overrides"] = ["optim.lr=0.1"]
    with pytest.raises(ContrastlabError, match=r"changed cells \(recipe, overrides or evaluations\): rrc__s0, rrc__s1"):
        Study.from_dict(changed, dir=copy).prepare(smoke=True)
    Study.from_dict(changed, dir=copy).prepare(smoke=True, force=True)
    assert not (copy / "runs" / "rrc__s0").exists() and len(list((copy / "runs").glob("rrc__s0.replaced-*"))) == 1
    assert (copy / "runs" / "jc__s0" / "results.json").is_file()  # unchanged cells keep their runs
    added = {**changed, "seeds": [0, 1, 2]}  # more seeds: taken as they are
    Study.from_dict(added, dir=copy).prepare(smoke=True)
    assert yaml.safe_load((copy / "study.yaml").read_text())["seeds"] == [0, 1, 2]
    Study.from_dict(added, dir=copy).prepare(smoke=False)  # a full run moves the smoke runs aside ...
    aside = next(tmp_path.glob("study.smoke-*"))
    assert (aside / "runs" / "jc__s0" / "results.json").is_file() and not any((copy / "runs").iterdir())
    assert json.loads((copy / "study.json").read_text())["smoke"] is False
    with pytest.raises(ContrastlabError, match="holds full runs"):  # ... and a smoke run never touches full runs
        Study.from_dict(added, dir=copy).prepare(smoke=True)


def _wait(condition, what: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_preempted_then_killed_training_run_resumes_and_a_failing_cell_does_not_stop_it(tmp_path, monkeypatch):
    epochs = 3  # --smoke: 64 images, batch 8 -> 8 steps an epoch
    # held after steps 3 and 10 (tests/pause_at_step.py) until the test has stopped it: no race with a fast machine
    monkeypatch.setenv("PAUSE_STEP", "3,10")
    data = {"name": "long", "seeds": [0], "groups": [
        {"name": "long", "recipe": "demo", "overrides": [f"train.epochs={epochs}", "train.max_steps=0",
                                                         "train.checkpoint_every_steps=2", f"plugins=[{PAUSE_PLUGIN}]",
                                                         "observers=[progress,knn,pause_at_step]"],
         "evaluate": ["knn", {"kind": "linear", "recipe": "linear/demo_10ep"}]},
        # loads (the config is valid) and fails when it runs: the dataset's files are not there
        {"name": "broken", "recipe": "demo", "overrides": ["data.name=cifar10", "data.root=/nonexistent/cifar"]}]}
    study = Study.from_dict(data, dir=tmp_path / "long")
    study.prepare(smoke=True)
    cell = study.cell("long__s0", smoke=True)
    log, paused = study.log_path(cell.id, "train"), cell.run_dir / "paused.rank0.pid"
    runner = subprocess.Popen([*CL, "study", "run-cell", str(study.dir), cell.id])
    _wait(paused.is_file, "the run held at step 3")
    paused.unlink()
    runner.send_signal(signal.SIGTERM)  # what a scheduler sends before it stops a job: passed on to the trainer
    assert runner.wait(timeout=120) == 75
    state = study.read_state(cell.id)
    assert state["state"] == "pending" and "SIGTERM" in state["reason"] and not cell.stages[0].done()

    runner = subprocess.Popen([*CL, "study", "run-cell", str(study.dir), cell.id])
    _wait(paused.is_file, "the resumed run held at step 10")
    trainer = json.loads((cell.run_dir / "run.lock").read_text())["pid"]
    assert trainer != runner.pid and trainer == int(paused.read_text())
    runner.kill()  # the runner dies first (a node lost), then its trainer
    runner.wait()
    os.kill(trainer, signal.SIGKILL)
    from contrastlab.engine.run_lock import pid_alive

    _wait(lambda: not pid_alive(trainer), "the trainer to die", timeout=30)
    status = study.status()[0]
    assert status.state == "interrupted" and status.pid == runner.pid and not cell.stages[0].done()
    (cell.run_dir / "release").touch()

    assert study.run(smoke=True) == 1  # the broken cell
    results = json.loads(cell.stages[0].output.read_text())
    assert results["steps"] == epochs * 8 and results["epochs"] == epochs
    resumed = re.findall(r"resumed from \S+ at epoch (\d+), step (\d+)", log.read_text())
    assert resumed == [("0", "3"), ("1", "8")]  # the checkpoint of the SIGTERM, then epoch 1's (held at step 10)
    linear = json.loads((cell.run_dir / "eval_linear_demo.json").read_text())
    assert 0 <= linear["top1"] <= 100 and linear["epochs"] == 1 and linear["checkpoint"] == str(cell.run_dir / "checkpoints" / "last.pt")
    states = {s.cell: s for s in study.status()}
    assert states["long__s0"].state == "done" and study.read_state(cell.id)["state"] == "done"
    broken = states["broken__s0"]
    assert broken.state == "failed" and broken.stage == "train" and "exited with status 2" in broken.reason
    assert "/nonexistent/cifar" in broken.reason and broken.reason.split(": ", 1)[1] in Path(broken.log).read_text()
    assert broken.log in broken.describe()


def test_a_signal_while_the_stage_starts_is_passed_on_and_the_reason_says_how_it_ended(tmp_path):
    """SIGTERM to the runner just after it starts the stage's process, long before the trainer has imported torch
    and installed its handler: the stage dies of it, the cell is pending, and its reason says how the stage ended
    and that the rerun starts from the last checkpoint if any (here none), not that it exited after checkpointing."""
    study = Study.from_dict({"name": "early", "seeds": [0], "groups": [{"name": "g", "recipe": "demo"}]},
                            dir=tmp_path / "early")
    study.prepare(smoke=True)
    cell = study.cell("g__s0", smoke=True)
    log = study.log_path(cell.id, "train")
    runner = subprocess.Popen([*CL, "study", "run-cell", str(study.dir), cell.id])
    _wait(lambda: log.is_file() and log.read_bytes().count(b"\n") >= 2, "the stage's header in its log")
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=120) == 75
    state = study.read_state(cell.id)
    assert state["state"] == "pending" and state["reason"].startswith("train stopped on SIGTERM (was killed by SIGTERM"), state
    assert "or starts it afresh if there is none" in state["reason"] and not (cell.run_dir / "checkpoints").exists()


def test_a_preemption_signal_that_comes_before_the_stage_process_exists_is_sent_once_it_does(tmp_path):
    """The window between the runner's log header and the stage's process: the signal is recorded, then passed on
    as soon as the process exists, once."""
    from contrastlab.studies.cell_runner import _Signals

    study = Study.from_dict({"name": "w", "seeds": [0], "groups": [{"name": "g", "recipe": "demo"}]}, dir=tmp_path)
    signals = _Signals()
    signals.stage = study.cell("g__s0", smoke=True).stages[0]
    signals._forward(signal.SIGTERM, None)  # the handler, called before the process exists: nothing to send to
    assert signals.preempted == "SIGTERM"
    signals.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        signals.pass_on()
        assert signals.proc.wait(timeout=30) == -signal.SIGTERM
        signals.pass_on()  # nothing left to pass on (the process has ended, and the signal was sent)
    finally:
        signals.proc.kill()
        signals.proc.wait()


# ------------------------------------------------------------------------------------------- README


def readme_study_blocks() -> tuple[str, list[str]]:
    """The shell and Python code blocks of the README's "Reproducing a published table" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reproducing a published table", 1)[1].split("\n## ", 1)[0]
    return section, re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_study_example_runs(tmp_path, monkeypatch, capsys):
    section, blocks = readme_study_blocks()
    assert "contrastlab study run demo" in section and "contrastlab study table demo" in section
    assert len(blocks) == 1
    try:
        import contrastlab.studies.table  # noqa: F401
    except ModuleNotFoundError:  # written beside this module: until it is installed, a stand-in prints the states
        stand_in = types.ModuleType("contrastlab.studies.table")
        stand_in.study_table = lambda study, fmt="markdown", figure=None: "\n".join(
            f"{s.cell} {s.state}" for s in study.status())
        monkeypatch.setitem(sys.modules, "contrastlab.studies.table", stand_in)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 - the README's own example
    out = capsys.readouterr().out
    assert "simclr_rrc__s0" in out and "18 cells" in out
    results = json.loads((tmp_path / "studies" / "demo-smoke" / "runs" / "simclr_rrc__s0" / "results.json").read_text())
    assert results["steps"] == 2


def test_the_readme_points_a_shipped_study_at_the_users_data(tmp_path, capsys):
    section, _ = readme_study_blocks()
    line = next(line for line in section.splitlines() if line.startswith("contrastlab study run") and "data.root=" in line)
    argv = line.split("#", 1)[0].split()[1:]
    assert "--dry-run" in argv
    assert main([*argv, "--dir", str(tmp_path / "s")]) == 0
    root = next(a for a in argv if a.startswith("data.root="))
    trains = [t for t in capsys.readouterr().out.splitlines() if " train " in t and "seed=" in t]
    assert trains and all(f" {root} seed=" in t for t in trains)
    assert not (tmp_path / "s").exists()
