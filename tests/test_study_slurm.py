"""The slurm launcher (``contrastlab study run --launcher slurm``) through a real SLURM: the single-node cluster of
scripts/local_slurm.sh (tests/slurm_cluster.py), never a stand-in.

One ``--smoke`` study is submitted once and serves every check: groups ``long`` (with a linear evaluation, so an
evaluation array waits on the train array element by element, and held after step 6 until the test interrupts it)
and ``twin`` (the same training config, not held) x seeds 0, 1,
40 steps each with a checkpoint every 5; and ``broken`` (a dataset whose files are not there; other resources, so
other arrays), also with a linear evaluation. While it runs, ``long__s0`` gets SIGUSR1 (what ``--signal=USR1@N``
sends before the time limit: the run checkpoints, exits 75, and the element requeues itself) and ``long__s1`` is
requeued by ``scontrol requeue`` (a preemption); both must end on exactly the results of their uninterrupted twins.
A requeued element waits about 2 minutes for its begin time, which the test moves to 2 s from now.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from gloo_ranks import free_port
from slurm_cluster import FINISHED, Cluster

from contrastlab.cli import main
from contrastlab.errors import ContrastlabError
from contrastlab.studies.launchers import LAUNCHERS
from contrastlab.studies.launchers.slurm import SlurmLauncher, time_seconds
from contrastlab.studies.study import Study

STEPS, EVERY = 40, 5  # --smoke: 64 images, batch 8 -> 8 steps an epoch
LONG = [f"train.max_steps={STEPS}", "train.epochs=5", f"train.checkpoint_every_steps={EVERY}", "monitor.knn_every=0"]
LINEAR = {"kind": "linear", "recipe": "linear/demo_10ep"}
# long's runs are held after step 6 (the step-5 checkpoint on disk) until the test interrupts them
# (tests/pause_at_step.py, PAUSE_STEP=6): an observer that changes no number of the run
HELD = [f"plugins=[{Path(__file__).with_name('pause_at_step.py')}]",
        "observers=[progress,knn,test_accuracy,localiser,plots,pause_at_step]"]
STUDY = {
    "name": "slurmy", "seeds": [0, 1], "overrides": LONG, "resources": {"cpus": 1, "time": "00:10:00"},
    "groups": [
        {"name": "long", "recipe": "demo", "overrides": HELD, "evaluate": ["knn", LINEAR]},
        {"name": "twin", "recipe": "demo"},
        {"name": "broken", "recipe": "demo", "overrides": ["data.name=cifar10", "data.root=/nonexistent/cifar"],
         "evaluate": ["knn", LINEAR], "resources": {"time": "00:05:00"}},
    ],
}
CELLS = ["long__s0", "twin__s0", "broken__s0", "long__s1", "twin__s1", "broken__s1"]


def write_study(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Submitted:
    """The study after every job ended: its file, directory, jobs.json arrays and the output of the commands."""

    path: Path
    dir: Path
    arrays: list[dict]
    resubmit_output: str
    seconds: float

    def element(self, cell: str, stage: str) -> str:
        """The job array element (``<array job>_<task>``) that ran ``stage`` of ``cell``."""
        for array in self.arrays:
            for task, (name, what) in array["tasks"].items():
                if (name, what) == (cell, stage):
                    return f"{array['job']}_{task}"
        raise KeyError((cell, stage))

    def results(self, cell: str) -> dict:
        return json.loads((self.dir / "runs" / cell / "results.json").read_text())


def _wait_file(path: Path, cluster: Cluster, job: str, timeout: float = 240.0) -> None:
    """Wait for ``path`` while ``job`` has not finished."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        state = cluster.job(job).get("JobState")
        assert state not in FINISHED, f"job {job} ended ({state}) before {path} was written"
        assert time.monotonic() < deadline, f"timed out waiting for {path} (job {job}: {state})"
        time.sleep(0.1)


def _requeued_now(cluster: Cluster, job: str) -> dict[str, str]:
    """Wait for a requeued element to wait for its begin time, then let it start in 2 s (not `now`: see
    test_slurm.py); its info as it left the begin-time wait."""
    info = cluster.wait(job, until=lambda i: (i["JobState"], i["Reason"]) == ("PENDING", "BeginTime")
                        or i["JobState"] in FINISHED, timeout=120)
    assert info["JobState"] == "PENDING", info
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now+2")
    return info


def _wait_all(cluster: Cluster, jobs: list[str], timeout: float = 420.0) -> None:
    """Poll squeue until none of ``jobs`` (array job ids) has an element pending or running."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.run("squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T %r", check=False)
        if out.returncode == 0 and not out.stdout.strip():
            return
        assert time.monotonic() < deadline, f"jobs still queued after {timeout:.0f} s:\n{out.stdout}{out.stderr}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def submitted(slurm_cluster_session: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    cluster = Cluster(slurm_cluster_session.dir)
    folder = tmp_path_factory.mktemp("slurm-study")
    path = write_study(folder / "slurmy.yaml", STUDY)
    study_dir = folder / "study"
    with pytest.MonkeyPatch.context() as patch:
        env = cluster.env(OMP_NUM_THREADS="1", PAUSE_STEP="6")  # sbatch passes this environment on to the jobs
        for key in ("SLURM_CONF", "PYTHONPATH", "PATH", "OMP_NUM_THREADS", "PAUSE_STEP"):
            patch.setenv(key, env[key])
        start = time.monotonic()
        try:
            assert main(["study", "run", str(path), "--launcher", "slurm", "--smoke", "--dir", str(study_dir)]) == 0
            records = sorted((study_dir / "slurm").glob("*/jobs.json"))
            assert len(records) == 1
            arrays = json.loads(records[0].read_text())
            cluster.submitted += [a["job"] for a in arrays]
            run = Submitted(path, study_dir, arrays, "", 0.0)
            again = io.StringIO()  # again while they are queued: nothing is submitted twice
            with contextlib.redirect_stdout(again):
                assert main(["study", "run", str(path), "--launcher", "slurm", "--smoke", "--dir", str(study_dir)]) == 0
            run.resubmit_output = again.getvalue()

            first = run.element("long__s0", "train")
            _wait_file(study_dir / "runs" / "long__s0" / "paused.rank0.pid", cluster, first)
            # to the element's step, as --signal=USR1@N does (`scancel --signal=USR1 A_i` is refused by SLURM 22.05,
            # "Job can not be altered now", and retried, while other elements of the array are pending)
            cluster.run("scancel", "--signal=USR1", f"{first}.0")
            second = run.element("long__s1", "train")
            _wait_file(study_dir / "runs" / "long__s1" / "paused.rank0.pid", cluster, second)
            cluster.run("scontrol", "requeue", second)
            for cell, element in (("long__s0", first), ("long__s1", second)):
                (study_dir / "runs" / cell / "release").touch()  # the requeued run passes step 6
                _requeued_now(cluster, element)
            _wait_all(cluster, [a["job"] for a in arrays])
            run.seconds = time.monotonic() - start
            yield run
        finally:
            cluster.cancel_submitted()


def test_the_study_runs_to_its_table(submitted: Submitted, capsys: pytest.CaptureFixture):
    assert main(["study", "status", str(submitted.path), "--dir", str(submitted.dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        [cell, "failed" if cell.startswith("broken") else "done"] for cell in CELLS], "\n".join(lines)
    assert lines[-1].endswith("(--smoke runs): 4 done, 2 failed")
    for cell in ("long__s0", "twin__s0", "long__s1", "twin__s1"):
        record = json.loads((submitted.dir / "cells" / f"{cell}.json").read_text())
        last = "linear" if cell.startswith("long") else "train"
        assert (record["state"], record["launcher"], record["job"]) == ("done", "slurm", submitted.element(cell, last))
        results = submitted.results(cell)
        assert results["steps"] == STEPS and 0 <= results["knn_top1"] <= 100
        config = yaml.safe_load((submitted.dir / "runs" / cell / "config.yaml").read_text())
        assert config["seed"] == int(cell[-1]) and config["train"]["checkpoint_every_steps"] == EVERY
    for cell in ("long__s0", "long__s1"):
        linear = json.loads((submitted.dir / "runs" / cell / "eval_linear_demo.json").read_text())
        assert 0 <= linear["top1"] <= 100 and linear["epochs"] == 1

    assert main(["study", "table", str(submitted.path), "--dir", str(submitted.dir), "--format", "csv"]) == 0
    table = capsys.readouterr().out
    rows = {row["group"]: row for row in csv.DictReader(io.StringIO(table))}
    assert list(rows) == ["long", "twin", "broken"], table
    assert [(rows[g]["status"], rows[g]["knn_top1_n"]) for g in rows] == [("2/2 done", "2"), ("2/2 done", "2"),
                                                                            ("0/2 done, 2 failed", "0")], table
    assert rows["long"]["linear_top1_n"] == "2"
    print(f"\nslurm study: {submitted.seconds:.0f} s from submission to the last job's end", flush=True)


def test_nothing_is_submitted_twice(submitted: Submitted, capsys: pytest.CaptureFixture):
    text = submitted.resubmit_output
    assert all(f"{cell}: queued already as job" in text or f"{cell}: its runner runs" in text for cell in CELLS), text
    assert "nothing to submit" in text and "submitted job array" not in text
    assert main(["study", "run", str(submitted.path), "--launcher", "slurm", "--smoke", "--dir",
                 str(submitted.dir), "--cells", "long__*"]) == 0  # done cells: nothing, not even a folder
    assert "nothing to submit (2 of 2 cells done)" in capsys.readouterr().out
    assert len(list((submitted.dir / "slurm").iterdir())) == 1


def test_requeued_cells_continue_to_their_twins_results(submitted: Submitted, slurm: Cluster):
    for seed, interrupt in ((0, "SIGUSR1"), (1, "scontrol requeue")):
        cell, element = f"long__s{seed}", submitted.element(f"long__s{seed}", "train")
        info = slurm.job(element)
        out = Path(info["StdOut"]).read_text()
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), out
        assert f"job {element} (requeued 0 times)" in out and f"job {element} (requeued 1 times)" in out
        log = (submitted.dir / "logs" / f"{cell}.train.log").read_text()
        resumed = [int(s) for s in re.findall(r"resumed from \S+ at epoch \d+, step (\d+)\b", log)]
        assert len(resumed) == 1 and 0 < resumed[0] < STEPS, log[-3000:]
        if interrupt == "SIGUSR1":  # the run checkpointed on the signal, and the element requeued itself
            assert [int(s) for s in re.findall(r"stopped by SIGUSR1 at step (\d+)", log)] == resumed
            assert f"stopped after a checkpoint (status 75): requeueing {element}" in out
        else:  # SLURM requeued it: SIGTERM to every process; resumed from the newest checkpoint
            assert "DUE TO JOB REQUEUE" in out
            assert "requeueing" not in out
        results, twin = submitted.results(cell), submitted.results(f"twin__s{seed}")
        ignore = {"out", "wall_seconds"}
        assert {k: v for k, v in results.items() if k not in ignore} == {k: v for k, v in twin.items() if k not in ignore}
        # the evaluation waited for the requeued element's final completion
        linear = slurm.job(submitted.element(cell, "linear"))
        assert linear["JobState"] == "COMPLETED" and linear["StartTime"] >= info["EndTime"]
    for cell in ("twin__s0", "twin__s1"):  # only the interrupted elements were requeued, not their arrays
        assert slurm.job(submitted.element(cell, "train"))["Restarts"] == "0"


def test_a_failing_cell_is_reported_and_its_evaluation_cancelled(submitted: Submitted, slurm: Cluster):
    study = Study.load(submitted.path, dir=submitted.dir, validate=False)
    states = {s.cell: s for s in study.status()}
    for cell in ("broken__s0", "broken__s1"):
        status = states[cell]
        assert (status.state, status.stage) == ("failed", "train") and "/nonexistent/cifar" in status.reason
        assert status.log == str(submitted.dir / "logs" / f"{cell}.train.log") and status.log in status.describe()
        train = slurm.job(submitted.element(cell, "train"))
        assert (train["JobState"], train["ExitCode"], train["Restarts"]) == ("FAILED", "1:0", "0")
        linear = slurm.job(submitted.element(cell, "linear"))
        assert (linear["JobState"], linear["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
        assert not (submitted.dir / "logs" / f"{cell}.linear.log").exists()
    trains = {a["job"] for a in submitted.arrays if a["array"].startswith("train")}
    assert len(trains) == 2  # broken's other time limit: an array of its own


def test_the_shipped_demo_study_runs_to_its_table(slurm: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture):
    """The demo study as shipped, two of its groups x seeds 0 and 1 (--cells), submitted with --smoke and tabled."""
    env = slurm.env(OMP_NUM_THREADS="1")
    for key in ("SLURM_CONF", "PYTHONPATH", "PATH", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    folder = tmp_path / "demo"
    cells = "simclr_[rj]*__s[01]"  # simclr_rrc and simclr_jointcrop, seeds 0 and 1
    try:
        assert main(["study", "run", "demo", "--launcher", "slurm", "--smoke", "--dir", str(folder), "--cells", cells,
                     "--cpus-per-task", "1", "--time", "00:05:00"]) == 0
        arrays = json.loads(next((folder / "slurm").glob("*/jobs.json")).read_text())
        slurm.submitted += [a["job"] for a in arrays]
        assert [sorted(name for name, _ in a["tasks"].values()) for a in arrays] == [
            ["simclr_jointcrop__s0", "simclr_jointcrop__s1", "simclr_rrc__s0", "simclr_rrc__s1"]]
        _wait_all(slurm, [a["job"] for a in arrays], timeout=300)
    finally:
        slurm.cancel_submitted()
    capsys.readouterr()
    assert main(["study", "table", "demo", "--dir", str(folder), "--format", "csv"]) == 0
    rows = {row["group"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert list(rows) == ["simclr_rrc", "simclr_ccrop", "simclr_jointcrop", "mocov2_rrc", "mocov2_ccrop",
                          "mocov2_jointcrop"], rows
    for group in ("simclr_rrc", "simclr_jointcrop"):
        assert (rows[group]["status"], rows[group]["knn_top1_n"]) == ("2/3 done, 1 pending", "2"), rows[group]
        for seed in (0, 1):
            results = json.loads((folder / "runs" / f"{group}__s{seed}" / "results.json").read_text())
            assert results["steps"] == 2 and 0 <= results["knn_top1"] <= 100
        values = [json.loads((folder / "runs" / f"{group}__s{s}" / "results.json").read_text())["knn_top1"]
                  for s in (0, 1)]
        assert float(rows[group]["knn_top1_mean"]) == pytest.approx(sum(values) / 2)
    assert rows["mocov2_rrc"]["status"] == "0/3 done, 3 pending" and rows["mocov2_rrc"]["knn_top1_n"] in ("", "0")


# ------------------------------------------------------------------------------------------ no cluster needed


def test_dry_run_prints_the_scripts_and_sbatch_commands(tmp_path: Path, capsys: pytest.CaptureFixture):
    data = {**STUDY, "resources": {"cpus": 4, "time": "02:00:00", "gpus": 1, "partition": "gpu"}}
    path = write_study(tmp_path / "slurmy.yaml", data)
    folder = tmp_path / "study"
    assert main(["study", "run", str(path), "--launcher", "slurm", "--dry-run", "--dir", str(folder),
                 "--account", "lab", "--gpus-per-node", "4", "--nodes", "2", "--sbatch-option=--qos=high"]) == 0
    text = capsys.readouterr().out
    assert not folder.exists()  # nothing written, nothing submitted
    train = text.split("train-1.sbatch:\n", 1)[1].split("\nlinear-1", 1)[0]
    for line in ("#SBATCH --array=0,1,2,3", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=02:00:00",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "CELLS=([0]=long__s0 [1]=twin__s0 [2]=long__s1 [3]=twin__s1)", "export MASTER_ADDR=",
                 "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=4", 'scontrol requeue "$SELF"',
                 '--launcher slurm --stage "$STAGE" --gpus 4 --nodes 2'):
        assert line in train, line
    assert "--kill-on-invalid-dep" not in train
    linear = text.split("linear-1.sbatch:\n", 1)[1].split("\ntrain-2", 1)[0]
    for line in ("#SBATCH --array=0,2", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=1", "#SBATCH --kill-on-invalid-dep=yes",
                 "CELLS=([0]=long__s0 [2]=long__s1)", "STAGES=([0]=linear [2]=linear)"):
        assert line in linear, line
    assert "MASTER_ADDR" not in linear and "--gpus 4" not in linear
    assert "sbatch --parsable --qos=high '--dependency=aftercorr:<job of train-1>'" in text
    # the cells' own commands follow the command line's layout: torchrun, 4 processes on each of 2 nodes
    assert "--nproc-per-node 4 --nnodes 2 --rdzv-backend c10d" in text
    assert "#SBATCH --time=00:05:00" in text.split("train-2.sbatch:\n", 1)[1]


def test_sbatch_scripts_are_valid_bash(tmp_path: Path):
    study = Study.from_dict({**STUDY, "resources": {"nodes": 2, "gpus": 2}}, dir=tmp_path / "s", validate=False)
    launcher = SlurmLauncher()
    options = {"max_requeues": 3}
    for array in launcher.plan(study, study.cells(), smoke=False, options=options):
        script = tmp_path / f"{array.name}.sbatch"
        script.write_text(launcher.script(study, array, tmp_path, smoke=False, options=options))
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_resources_and_time_limits_are_checked(tmp_path: Path):
    assert [time_seconds(t) for t in ("30", "30:15", "04:00:00", "2-00", "1-02:03", "1-00:00:05")] == [
        1800, 1815, 14400, 172800, 93780, 86405]
    with pytest.raises(ContrastlabError, match="HH:MM:SS"):
        time_seconds("four hours")
    study = Study.from_dict({**STUDY, "resources": {"time": "1h"}}, dir=tmp_path / "s", validate=False)
    with pytest.raises(ContrastlabError, match=r"time limit '1h'.*resources.time in the study file, or --time"):
        LAUNCHERS["slurm"]().describe(study, study.cells(), smoke=False, options={})
    with pytest.raises(ContrastlabError, match="signal-before 900"):
        LAUNCHERS["slurm"]().describe(study, study.cells(), smoke=False, options={"time": "00:10:00",
                                                                                   "signal_before": 900})


def test_a_cell_on_two_nodes_runs_one_runner_a_node(tmp_path: Path):
    """What the script's ``srun --nodes=2 --ntasks-per-node=1`` starts, on one machine: two runners (SLURM_PROCID 0
    and 1) whose torchrun agents meet at MASTER_ADDR:MASTER_PORT; node 0 reports the cell, node 1 logs beside it."""
    data = {"name": "two", "seeds": [0], "evaluate": [], "resources": {"gpus": 1, "nodes": 2},
            "groups": [{"name": "tr", "recipe": "demo", "overrides": [
                "data.subset=32", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
                "train.max_steps=3", "train.epochs=1", "monitor.knn_every=0", "observers=[progress]",
                "train.precision=fp32"]}]}
    study = Study.from_dict(data, dir=tmp_path / "two")
    study.prepare()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_JOB_ID": "7", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "contrastlab", "study", "run-cell", str(study.dir), "tr__s0", "--stage", "train"]
    runners = [subprocess.Popen(argv, env={**env, "SLURM_PROCID": str(rank)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [r.communicate(timeout=300)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    node0, node1 = (study.dir / "logs" / name for name in ("tr__s0.train.log", "tr__s0.train.node1.log"))
    assert "global batch 8 on 2 rank(s)" in node0.read_text() + node1.read_text()  # rank 0 on either node (c10d)
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in node1.read_text()
    assert "train on node 1" in outputs[1] and "train done" in outputs[0]
    assert json.loads(study.state_path("tr__s0").read_text())["state"] == "done"
    assert json.loads((study.dir / "runs" / "tr__s0" / "results.json").read_text())["steps"] == 3
