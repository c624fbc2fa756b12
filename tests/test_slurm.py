"""examples/slurm/train.sbatch through a real SLURM: a single-node cluster on this machine (scripts/local_slurm.sh,
Debian's slurm-wlm), jobs submitted with sbatch, interrupted with scontrol requeue and with the time limit's
SIGUSR1, and failures read back with ``scontrol show job`` (this cluster keeps no accounting for sacct).

Runs are the demo at smoke size (64 images, batch 8, 8 steps an epoch), 30 steps on one CPU process under torchrun
(GPUS_PER_NODE=1, ``--gpus-per-node 0`` on the command line overriding the script's GPU request), checkpointing every
5 steps; each job takes about 15 s, most of it starting Python.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import FINISHED, REPO, SCRIPT, Cluster

TRAIN_SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
STEPS, CHECKPOINT_EVERY, STEPS_PER_EPOCH = 30, 5, 8
RUN = ["--smoke", "data.root=null", "train.epochs=4", f"train.max_steps={STEPS}",
       f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", "monitor.knn_every=0"]
ON_THIS_CLUSTER = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
# held after step 6 (the step-5 checkpoint on disk) until interrupted: tests/pause_at_step.py, PAUSE_STEP=6
PAUSED = [f"plugins=[{REPO / 'tests' / 'pause_at_step.py'}]",
          "observers=[progress,knn,test_accuracy,localiser,plots,pause_at_step]"]


@dataclass
class TrainJob:
    job: str
    out: Path
    log: Path

    def results(self) -> dict:
        return json.loads((self.out / "results.json").read_text())


def submit_train(cluster: Cluster, folder: Path, *overrides: str, **env: str) -> TrainJob:
    """examples/slurm/train.sbatch on one CPU process: the demo at smoke size, then ``overrides``."""
    out, log = folder / "run", folder / "job.out"
    job = cluster.sbatch(*ON_THIS_CLUSTER, f"--output={log}", f"--chdir={REPO}", str(TRAIN_SBATCH), *RUN, *overrides,
                         env=cluster.env(RECIPE="demo", OUT=str(out), GPUS_PER_NODE="1", OMP_NUM_THREADS="1", **env))
    return TrainJob(job, out, log)


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster_session: Cluster, session_folder: Path) -> TrainJob:
    """The run every interrupted one is compared with, trained to the end by one train.sbatch job: once per test
    session, whichever xdist worker needs it first (the others wait for it and read its record)."""
    folder = session_folder / "slurm-uninterrupted"
    folder.mkdir(exist_ok=True)
    record = folder / "job.json"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            fields = json.loads(record.read_text())
            return TrainJob(fields["job"], Path(fields["out"]), Path(fields["log"]))
        cluster = Cluster(slurm_cluster_session.dir)
        run = submit_train(cluster, folder)
        try:
            info = cluster.wait(run.job, log=run.log)
        finally:
            cluster.cancel_submitted()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), run.log.read_text()[-3000:]
        record.write_text(json.dumps({"job": run.job, "out": str(run.out), "log": str(run.log)}))
        return run


def test_start_is_idempotent(slurm: Cluster):
    proc = slurm.run(str(SCRIPT), "start")
    assert "already running" in proc.stdout
    proc = slurm.run(str(SCRIPT), "status")
    assert "running" in proc.stdout, proc.stdout
    assert re.search(r"^local\*\s+up\s+infinite\s+1\s", proc.stdout, re.MULTILINE), proc.stdout  # sinfo's partition


def test_train_sbatch_runs_to_its_results(slurm: Cluster, uninterrupted: TrainJob):
    results, text = uninterrupted.results(), uninterrupted.log.read_text()
    assert results["steps"] == STEPS and results["epochs"] == math.ceil(STEPS / STEPS_PER_EPOCH)
    assert math.isfinite(results["final_loss"]) and math.isfinite(results["last_step_loss"])
    assert f"job {uninterrupted.job} (requeued 0 times)" in text
    assert "global batch 8 on 1 rank(s)" in text  # torchrun started one worker
    assert f"finished: {uninterrupted.out}/results.json" in text
    assert "resumed from" not in text


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "SIGUSR1"])
def test_interrupted_job_continues_to_the_same_loss(slurm: Cluster, uninterrupted: TrainJob, tmp_path: Path,
                                                    interrupt: str):
    """Interrupted after its first checkpoint, the job is requeued and continues to the uninterrupted run's loss.

    ``scontrol requeue`` (as a preemption with PreemptMode=REQUEUE): SLURM sends SIGTERM to every process of the job
    and requeues it; under torchrun SIGTERM stops the workers without a checkpoint, so the run resumes from its last
    periodic or end-of-epoch checkpoint. SIGUSR1 (what ``--signal=USR1@N`` sends the job steps before the time limit;
    ``scancel --signal=USR1`` sends it now): the workers write a checkpoint at the next step and exit 75, and the
    script requeues the job itself. Either way the requeued job waits for a begin time 2 minutes away, which the test
    moves to 2 s from now.
    """
    run = submit_train(slurm, tmp_path, *PAUSED, PAUSE_STEP="6")
    paused = run.out / "paused.rank0.pid"
    slurm.wait(run.job, until=lambda info: paused.is_file() or info["JobState"] in FINISHED, log=run.log)
    assert paused.is_file(), run.log.read_text()[-3000:]
    if interrupt == "scontrol requeue":
        slurm.run("scontrol", "requeue", run.job)
    else:  # the held worker records it and goes on: a checkpoint at step 6
        slurm.run("scancel", "--signal=USR1", run.job)
    # requeued, it waits for a begin time about 2 minutes away (Reason=None at first, for a moment)
    pending = slurm.wait(run.job, until=lambda info: (info["JobState"], info["Reason"]) == ("PENDING", "BeginTime")
                         or info["JobState"] in FINISHED, timeout=60, log=run.log)
    assert (pending["JobState"], pending["Restarts"]) == ("PENDING", "1")
    (run.out / "release").touch()  # the requeued run passes step 6
    # Not "now": slurmd refuses a job whose new credential dates from the second its old one was revoked in (the
    # job fails, "Job credential revoked"), which happens when the script requeues the job itself.
    slurm.run("scontrol", "update", f"JobId={run.job}", "StartTime=now+2")
    info = slurm.wait(run.job, log=run.log)
    text = run.log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]

    assert f"job {run.job} (requeued 1 times)" in text  # --open-mode=append: both attempts in one file
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at epoch \d+, step (\d+)\b", text)]
    if interrupt == "SIGUSR1":
        stopped = re.findall(r"stopped by SIGUSR1 at step (\d+)", text)
        assert [int(s) for s in stopped] == resumed == [6], text[-3000:]  # the checkpoint written on the signal
        assert "checkpoint written: requeueing" in text
    else:  # no checkpoint on SIGTERM under torchrun: the last one, written at step 5
        assert resumed == [CHECKPOINT_EVERY], text[-3000:]
        assert "DUE TO JOB REQUEUE" in text

    results, expected = run.results(), uninterrupted.results()
    assert results["steps"] == expected["steps"] == STEPS
    assert results["final_loss"] == expected["final_loss"]
    assert results["last_step_loss"] == expected["last_step_loss"]


def test_failing_train_job_is_reported_failed_and_not_requeued(slurm: Cluster, tmp_path: Path):
    run = submit_train(slurm, tmp_path, "train.no_such_key=1", MAX_RESTARTS="0")
    info = slurm.wait(run.job, log=run.log)
    text = run.log.read_text()
    assert (info["JobState"], info["Reason"], info["ExitCode"], info["Restarts"]) == \
        ("FAILED", "NonZeroExitCode", "1:0", "0"), text[-3000:]  # torchrun's status, not the worker's
    assert "no_such_key" in text and "without writing a checkpoint: not requeueing" in text
    assert not run.out.joinpath("results.json").exists()
