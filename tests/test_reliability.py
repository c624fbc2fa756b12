"""Faults and resuming: real process kills, preemption signals, torchrun restarts, non-finite steps.

Every comparison is against an uninterrupted run of the same config in this process: the per-epoch losses
in ``metrics.jsonl`` and the final weights must match exactly (deterministic CPU runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contrastlab.config.load import load_config
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.engine.preemption import EXIT_PREEMPTED
from contrastlab.engine.trainer import NonFiniteLossError, train

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-for-bit comparisons with OMP_NUM_THREADS=1 subprocesses


TINY = [
    "data.subset=48", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
    "model.width=0.25", "train.epochs=2", "monitor.knn_every=0", "monitor.max_bank=32", "monitor.max_test=16",
    "monitor.knn_k=5", "observers=[progress,knn,test_accuracy,localiser]", "train.log_every=1000", "train.deterministic=true",
    "method.proj_hidden_dim=16", "method.proj_out_dim=8",
]  # 48 images, batch 8: 6 steps an epoch, 12 in all


def _tiny(out: Path, *extra: str):
    return load_config("demo", [f"out={out}", *TINY, *extra])


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)  # bit for bit
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["method"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["method"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference")
    train(_tiny(out), quiet=True)
    return out


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "contrastlab", "train", "demo", f"out={out}", *TINY, *extra]


PAUSE_PLUGIN = Path(__file__).with_name("pause_at_step.py")
PAUSED = [f"plugins=[{PAUSE_PLUGIN}]", "observers=[progress,knn,test_accuracy,localiser,pause_at_step]",
          "train.checkpoint_every_steps=2"]  # held after step 3, with the step-2 checkpoint on disk


def _paused_ranks(out: Path, proc: subprocess.Popen, ranks: int = 1, timeout: float = 180.0) -> list[int]:
    """Wait until ``ranks`` processes of the run in ``out`` are held by ``pause_at_step``; their pids, by rank."""
    pids = [out / f"paused.rank{rank}.pid" for rank in range(ranks)]
    end = time.monotonic() + timeout
    while not all(p.is_file() for p in pids):
        if proc.poll() is not None:
            raise AssertionError(f"training ended before it was held at step 3: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < end, "training never reached step 3"
        time.sleep(0.02)
    return [int(p.read_text()) for p in pids]


_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_kill_9_mid_epoch_then_resume_matches_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, *PAUSED), env=_ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        [pid] = _paused_ranks(out, proc)
        assert pid == proc.pid
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["partial"] is not None and ckpt["step"] == 2
    (out / "release").touch()
    train(_tiny(out, "train.checkpoint_every_steps=2", "resume=auto"), quiet=True)
    _assert_same_run(reference, out)


def test_sigterm_checkpoints_at_the_next_step_and_exits_75(reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, *PAUSED), env=_ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _paused_ranks(out, proc)
        proc.send_signal(signal.SIGTERM)  # arrives while step 3's observers run: the checkpoint is of step 3
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "resume=auto" in err and "SIGTERM" in err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["partial"] is not None and ckpt["step"] == 3
    train(_tiny(out, "resume=auto"), quiet=True)
    _assert_same_run(reference, out)


_SIGNALS_AFTER_THE_CONTEXT = """
import os, signal
from contrastlab.engine.preemption import PreemptionSignals

with PreemptionSignals() as signals:  # nothing recorded: the default handlers come back
    pass
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

def own(signum, frame):
    pass

signal.signal(signal.SIGTERM, own)
with PreemptionSignals() as signals:
    os.kill(os.getpid(), signal.SIGUSR1)
    assert signals.requested and signals.signal_name == "SIGUSR1"
assert signal.getsignal(signal.SIGTERM) is own  # a handler of the caller's comes back
assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # a default one does not: the process is stopping
os.kill(os.getpid(), signal.SIGUSR1)  # a second copy, as SLURM and a study's cell runner both send it
print("still here")
"""


def test_a_second_copy_of_the_preemption_signal_does_not_end_the_process_before_it_reports():
    """After a recorded preemption signal, the trainer's handlers go, but a signal whose handler was the default is
    ignored instead of ending the process: the copy SLURM sends to every process of the step, and the one the
    study's cell runner passes on, must not kill the trainer between its checkpoint and its exit status 75."""
    done = subprocess.run([sys.executable, "-c", _SIGNALS_AFTER_THE_CONTEXT], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "still here"


def test_views_do_not_depend_on_the_number_of_workers(reference, tmp_path):
    train(_tiny(tmp_path, "data.workers=2"), quiet=True)
    _assert_same_run(reference, tmp_path)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc; torchrun's workers are its children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return sorted(found)


def test_torchrun_restart_after_a_killed_rank_finishes_the_run(tmp_path):
    """torchrun --max-restarts 1: kill one of 2 gloo ranks mid-run; the job restarts from its checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--master-port", "29531", "-m", "contrastlab", "train", "demo", f"out={out}", *TINY, *PAUSED]
    proc = subprocess.Popen(cmd, env=_ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = _paused_ranks(out, proc, ranks=2)
        assert sorted(workers) == _children(proc.pid)  # torchrun's own workers, one per rank
        assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
        os.kill(workers[1], signal.SIGKILL)
        (out / "release").touch()  # rank 0 goes on to step 4 and finds its peer gone; the restart passes step 3
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from its last checkpoint" in err and "at epoch 0, step 2" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 12  # global batch 8: 6 steps an epoch


def _with_nan_steps(monkeypatch, bad_calls: set[int]) -> None:
    """Make the method's loss NaN on the given forward calls (1-based)."""
    from contrastlab import assemble

    build = assemble.method

    def method_with_nans(*args, **kwargs):
        method = build(*args, **kwargs)
        forward, calls = method.forward, [0]

        def nan_forward(*a, **k):
            out = forward(*a, **k)
            calls[0] += 1
            if calls[0] in bad_calls:
                out.loss = out.loss * float("nan")
            return out

        method.forward = nan_forward
        return method

    monkeypatch.setattr(assemble, "method", method_with_nans)


def test_non_finite_loss_stops_with_the_step_and_learning_rate(tmp_path, monkeypatch):
    _with_nan_steps(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(epoch 1\).*learning rate"):
        train(_tiny(tmp_path), quiet=True)


def test_non_finite_loss_can_be_skipped_and_counted(tmp_path, monkeypatch):
    _with_nan_steps(monkeypatch, {3})
    results = train(_tiny(tmp_path, "train.nonfinite=skip"), quiet=True)
    assert results["skipped_steps"] == 1 and results["steps"] == 12
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 0]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    _with_nan_steps(monkeypatch, {3, 5})
    with pytest.raises(NonFiniteLossError, match="1 steps skipped already"):
        train(_tiny(tmp_path / "again", "train.nonfinite=skip", "train.max_skipped_steps=1"), quiet=True)


class _Killed(Exception):
    pass


def _interrupt_then_resume(tmp_path: Path, monkeypatch, extra: list[str]) -> None:
    """Train ``tmp_path/full`` uninterrupted; train ``tmp_path/part`` until its first mid-epoch checkpoint is
    written (then it dies), and resume it with ``resume=auto``."""
    from contrastlab.engine import trainer as trainer_module

    train(_tiny(tmp_path / "full", *extra), quiet=True)
    save = trainer_module.atomic_save

    def save_then_die(obj, path):
        save(obj, path)
        if obj.get("partial"):
            raise _Killed

    monkeypatch.setattr(trainer_module, "atomic_save", save_then_die)
    with pytest.raises(_Killed):
        train(_tiny(tmp_path / "part", *extra), quiet=True)
    monkeypatch.setattr(trainer_module, "atomic_save", save)
    train(_tiny(tmp_path / "part", *extra, "resume=auto"), quiet=True)


def test_mid_epoch_resume_continues_feature_transform_and_score_statistics(tmp_path, monkeypatch):
    """FT's random stream and the epoch's recorded score statistics are part of a mid-epoch checkpoint."""
    import numpy as np

    from contrastlab.observers.score_statistics import read_score_file

    extra = ["method.name=moco", "method.queue_size=32", "method.feature_transform={}", "observers=[progress,knn,test_accuracy,score_statistics,localiser]",
             "train.checkpoint_every_steps=4"]
    _interrupt_then_resume(tmp_path, monkeypatch, extra)
    _assert_same_run(tmp_path / "full", tmp_path / "part")
    for epoch in (1, 2):
        name = f"epoch_{epoch:04d}.rank0.npz"
        a = read_score_file(tmp_path / "full" / "scores" / name)
        b = read_score_file(tmp_path / "part" / "scores" / name)
        for key in ("steps", "summary", "hist_pos", "hist_neg"):
            np.testing.assert_array_equal(a[key], b[key])


def test_gpu_pipeline_resumes_mid_epoch_exactly_like_the_uninterrupted_run(tmp_path, monkeypatch):
    """data.pipeline=gpu (here on CPU tensors): each batch's draws are seeded by its place in the epoch."""
    _interrupt_then_resume(tmp_path, monkeypatch,
                           ["data.pipeline=gpu", "views.photometric=simclr", "train.checkpoint_every_steps=4"])
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def test_wall_time_grows_each_epoch_and_is_summed_over_resumed_processes(tmp_path, monkeypatch):
    """``wall_seconds`` (metrics.jsonl, results.json): the killed process's seconds, carried by its mid-epoch
    checkpoint, plus the resuming process's own (timed here around the call)."""
    from contrastlab.engine import trainer as trainer_module

    save, written = trainer_module.atomic_save, []

    def save_then_die(obj, path):
        save(obj, path)
        if obj.get("partial"):
            written.append(obj["wall_seconds"])
            raise _Killed

    monkeypatch.setattr(trainer_module, "atomic_save", save_then_die)
    with pytest.raises(_Killed):
        train(_tiny(tmp_path, "train.checkpoint_every_steps=4"), quiet=True)
    monkeypatch.setattr(trainer_module, "atomic_save", save)
    t0 = time.perf_counter()
    train(_tiny(tmp_path, "train.checkpoint_every_steps=4", "resume=auto"), quiet=True)
    resumed = time.perf_counter() - t0
    walls = [json.loads(line)["wall_seconds"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    total = json.loads((tmp_path / "results.json").read_text())["wall_seconds"]
    assert written[0] > 0 and walls == sorted(walls) and walls[-1] <= total
    assert 0.5 * resumed < total - written[0] <= resumed


def test_deferred_finite_check_stops_within_its_window(tmp_path, monkeypatch):
    _with_nan_steps(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError, match="between step 1 and step 4"):
        train(_tiny(tmp_path, "train.finite_check_every=4"), quiet=True)


def test_a_deterministic_run_leaves_the_process_setting_as_it_found_it(reference):
    """The reference run used train.deterministic=true; afterwards the process is back to its own setting."""
    assert not torch.are_deterministic_algorithms_enabled()
