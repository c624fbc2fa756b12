"""One run directory, one trainer (engine.run_lock): two real processes, a holder killed by SIGKILL, a holder on
another host whose heartbeat stopped, and the trainer's use of the lock (rank 0 takes it, releases it at the end)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastlab.config.load import load_config
from contrastlab.engine.run_lock import LOCK_NAME, RunLock, RunLockedError, read_lock
from contrastlab.engine.trainer import train

HOLDER = """
import sys, time
from contrastlab.engine.run_lock import RunLock
lock = RunLock(sys.argv[1], timeout=float(sys.argv[2]), command="the holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _start_holder(folder: Path, timeout: float = 300.0) -> subprocess.Popen:
    """A second process that takes the lock of ``folder`` and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(timeout)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_trainer_fails_at_once_naming_the_live_holder_and_takes_over_after_sigkill(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        info = read_lock(tmp_path / LOCK_NAME)
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert info["command"] == "the holder" and info["started_at"]
        cfg = load_config("demo", [f"out={tmp_path}", "train.device=cpu", "data.workers=0"])
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as caught:
            train(cfg, quiet=True)
        assert time.monotonic() - t0 < 5  # at once: before the dataset and the model are built
        message = str(caught.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "resume=auto" in message and "out=DIR" in message and str(tmp_path / LOCK_NAME) in message
        assert not (tmp_path / "metrics.jsonl").exists() and read_lock(tmp_path / LOCK_NAME)["pid"] == holder.pid
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    lines: list[str] = []
    with RunLock(tmp_path, log=lines.append) as lock:  # the holder died without releasing: taken over
        assert read_lock(lock.path)["pid"] == os.getpid()
        assert lock.taken_over["pid"] == holder.pid
    assert len(lines) == 1 and f"process {holder.pid} no longer exists" in lines[0]
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_a_zombie_holder_counts_as_gone(tmp_path):
    """A holder killed but not yet reaped by its parent (a zombie) is dead: its pid still exists."""
    holder = _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        with RunLock(tmp_path, log=lambda s: None) as lock:
            assert lock.taken_over["pid"] == holder.pid
    finally:
        holder.wait(timeout=30)


def _foreign_lock(folder: Path, heartbeat_age: float) -> dict:
    info = {"host": "another-node", "pid": 1, "pid_start": None, "started_at": "2026-01-01 00:00:00 +0000",
            "started": time.time() - 3600, "command": "", "token": "theirs", "heartbeat": time.time() - heartbeat_age}
    (folder / LOCK_NAME).write_text(json.dumps(info))
    return info


def test_a_holder_on_another_host_is_taken_over_only_when_its_heartbeat_is_older_than_the_timeout(tmp_path):
    _foreign_lock(tmp_path, heartbeat_age=50)
    with pytest.raises(RunLockedError, match="pid 1 on host another-node.*last heartbeat 50 s ago"):
        RunLock(tmp_path, timeout=60).acquire()
    assert read_lock(tmp_path / LOCK_NAME)["token"] == "theirs"  # untouched
    lines: list[str] = []
    with RunLock(tmp_path, timeout=40, log=lines.append) as lock:
        assert read_lock(tmp_path / LOCK_NAME)["token"] == lock.token
    assert "heartbeat stopped 50 s ago, more than train.lock_timeout=40 s" in lines[0]
    # through the config key
    _foreign_lock(tmp_path, heartbeat_age=50)
    cfg = load_config("demo", [f"out={tmp_path}", "train.device=cpu", "train.lock_timeout=60"])
    with pytest.raises(RunLockedError, match="another-node"):
        train(cfg, quiet=True)


def test_the_holder_refreshes_its_heartbeat_and_never_deletes_a_lock_taken_from_it(tmp_path):
    lock = RunLock(tmp_path, timeout=0.5).acquire()  # heartbeat every 0.1 s
    first = read_lock(lock.path)["heartbeat"]
    deadline = time.monotonic() + 10
    while read_lock(lock.path)["heartbeat"] == first:
        assert time.monotonic() < deadline, "the heartbeat was not refreshed"
        time.sleep(0.05)
    assert lock.held
    # another host's trainer takes the lock over (as if ours had hung); our release must leave its file alone
    _foreign_lock(tmp_path, heartbeat_age=0)
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME)["token"] == "theirs" and not lock.held


@pytest.mark.parametrize("content", [b"{not json", b"\x00garbage", b"\xff\xfe not text"])
def test_an_unreadable_lock_file_is_refused_while_recent(tmp_path, content):
    """A lock file that is not a contrastlab lock (just written) is refused with what it is, its age and what to
    do, not as a holder "pid ? on host ?" (nor a UnicodeDecodeError); once older than the timeout it is taken over."""
    (tmp_path / LOCK_NAME).write_bytes(content)
    with pytest.raises(RunLockedError) as caught:
        RunLock(tmp_path, timeout=60).acquire()
    message = str(caught.value)
    assert "is not a contrastlab run lock" in message and "pid ?" not in message
    assert f"{tmp_path / LOCK_NAME} is unreadable" in message and repr(content[:24]) in message
    age = float(message.split("was written ")[1].split(" s ago")[0])
    assert 0 <= age <= time.time() - (tmp_path / LOCK_NAME).stat().st_mtime + 1
    assert f"delete {tmp_path / LOCK_NAME} and run again" in message and "train.lock_timeout=60 s" in message
    assert (tmp_path / LOCK_NAME).read_bytes() == content  # untouched
    old = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lines: list[str] = []
    RunLock(tmp_path, timeout=60, log=lines.append).acquire().release()
    assert "unreadable" in lines[0]


def test_the_trainer_holds_the_lock_while_it_runs_and_releases_it_when_it_ends_or_fails(tmp_path, monkeypatch):
    from contrastlab.observers import metrics_log

    seen = []
    write = metrics_log.MetricsLog.write

    def write_and_look(self, record):
        seen.append(read_lock(tmp_path / "run" / LOCK_NAME))
        write(self, record)

    monkeypatch.setattr(metrics_log.MetricsLog, "write", write_and_look)
    tiny = ["data.subset=16", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
            "model.width=0.25", "train.epochs=1", "monitor.knn_every=0", "monitor.max_bank=16", "monitor.max_test=8",
            "monitor.knn_k=3", "observers=[knn]", "method.proj_hidden_dim=8", "method.proj_out_dim=8"]
    train(load_config("demo", [f"out={tmp_path / 'run'}", *tiny]), quiet=True)
    assert seen and seen[0]["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    # a failure after the lock was taken (here: a missing dataset) releases it too
    with pytest.raises(Exception, match="cifar-10"):
        train(load_config("demo", [f"out={tmp_path / 'failed'}", *tiny, "data.name=cifar10",
                                   f"data.root={tmp_path / 'nothing'}"]), quiet=True)
    assert (tmp_path / "failed").is_dir() and not (tmp_path / "failed" / LOCK_NAME).exists()
