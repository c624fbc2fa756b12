"""A run directory loses nothing and mixes nothing (issue 23, part 2): overwriting starts from an empty directory,
retention counts only the run's own checkpoints, a folder that is not a run is never written over silently, an
evaluation's result is printed before it is written, and a checkpoint verifies itself without its ``.sha256``."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from contrastlab.cli import main
from contrastlab.config.load import load_config
from contrastlab.engine.checkpoint import checksum_path, load_checkpoint
from contrastlab.engine.trainer import train
from contrastlab.errors import CheckpointError, ConfigError

TINY = ["data.subset=24", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
        "model.width=0.25", "monitor.knn_every=0", "monitor.max_bank=24", "monitor.max_test=16", "monitor.knn_k=5",
        "observers=[progress,knn,test_accuracy,localiser]", "method.proj_hidden_dim=16", "method.proj_out_dim=8",
        "train.checkpoint_every=1"]  # 3 steps an epoch, a numbered checkpoint every epoch


def _train(out: Path, *extra: str) -> dict:
    return train(load_config("demo", [f"out={out}", *TINY, *extra]), "demo", quiet=True)


def _epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_starts_from_an_empty_directory_and_resume_never_finds_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "train.epochs=3")
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch_*.pt")) == [f"epoch_000{i}.pt" for i in (1, 2, 3)]
    _train(out, "train.epochs=1", "overwrite=true")
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch_*.pt")) == ["epoch_0001.pt"]
    assert _epochs_logged(out) == [1]  # only the new run's record
    # last.pt damaged: resume=auto falls back to the NEW run's epoch 1, not to the old run's epoch 3
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    result = _train(out, "train.epochs=2", "resume=auto")
    assert result["epochs"] == 2 and _epochs_logged(out) == [1, 2]


def test_retention_deletes_only_the_runs_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.epochs=1", "train.keep_checkpoints=2")
    foreign = out / "checkpoints" / "epoch_0000.pt"  # a file the run did not write (copied in by hand)
    shutil.copy(out / "checkpoints" / "epoch_0001.pt", foreign)
    _train(out, "train.epochs=4", "train.keep_checkpoints=2", "resume=auto")
    kept = sorted(p.name for p in (out / "checkpoints").glob("epoch_*.pt"))
    assert kept == ["epoch_0000.pt", "epoch_0003.pt", "epoch_0004.pt"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["numbered"] == ["epoch_0003.pt", "epoch_0004.pt"]


def test_a_folder_that_is_not_a_run_is_refused_then_moved_aside_with_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    own = {"config.yaml": "lr: 3\n", "results.json": '{"acc": 91.2}', "run.json": '{"note": "my own"}'}
    for name, text in own.items():
        (out / name).write_text(text)
    with pytest.raises(ConfigError, match=r"not empty \(config.yaml, results.json, run.json\).*overwrite=true"):
        _train(out, "train.epochs=1")
    assert {p.name: p.read_text() for p in out.iterdir()} == own  # untouched
    _train(out, "train.epochs=1", "overwrite=true")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert len(aside) == 1 and {p.name: p.read_text() for p in aside[0].iterdir()} == own
    assert json.loads((out / "run.json").read_text())["recipe"] == "demo"


def test_a_run_that_left_no_checkpoint_is_not_mixed_into_a_new_one(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.epochs=1")
    shutil.rmtree(out / "checkpoints")  # as if it had stopped before its first checkpoint
    with pytest.raises(ConfigError, match="wrote no checkpoint"):
        _train(out, "train.epochs=1")
    _train(out, "train.epochs=1", "resume=auto")  # nothing to resume: starts afresh, the old record gone
    assert _epochs_logged(out) == [1]


def test_eval_prints_its_result_before_writing_it_and_says_where_it_could_not(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "train.epochs=1")
    (out / "eval_knn_demo.json").mkdir()  # the result file cannot be written there (as in a read-only folder)
    capsys.readouterr()
    assert main(["eval", "knn", str(out / "checkpoints" / "last.pt"), *TINY[:5]]) == 2
    printed, err = capsys.readouterr()
    assert json.loads(printed)["knn_top1"] >= 0
    assert f"could not write the result to {out / 'eval_knn_demo.json'}" in err and "--out" in err


def test_eval_of_a_checkpoint_outside_a_run_directory_writes_beside_it_under_its_own_name(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "train.epochs=1")
    shared = tmp_path / "shared" / "models"
    shared.mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "last.pt", shared / "mine.pt")
    unrelated = tmp_path / "shared" / "eval_knn_demo.json"
    unrelated.write_text("someone else's result")
    assert main(["eval", "knn", str(shared / "mine.pt"), *TINY[:5]]) == 0
    assert unrelated.read_text() == "someone else's result"
    assert json.loads((shared / "mine.eval_knn_demo.json").read_text())["checkpoint"] == str(shared / "mine.pt")
    assert main(["eval", "knn", str(out / "checkpoints" / "epoch_0001.pt"), *TINY[:5]]) == 0
    assert (out / "eval_knn_demo_epoch_0001.json").is_file() and not (out / "eval_knn_demo.json").exists()


def test_a_checkpoint_damaged_in_a_copy_without_its_checksum_file_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "train.epochs=1")
    copy = tmp_path / "copy.pt"
    shutil.copy(out / "checkpoints" / "last.pt", copy)
    assert not checksum_path(copy).exists()
    load_checkpoint(copy)  # intact
    with zipfile.ZipFile(copy) as archive:  # a byte flipped inside a weight tensor's stored bytes
        member = max(archive.infolist(), key=lambda info: info.file_size if "/data/" in info.filename else 0)
        archive.fp.seek(member.header_offset + 26)
        name_length, extra_length = (int.from_bytes(archive.fp.read(2), "little") for _ in range(2))
    start = member.header_offset + 30 + name_length + extra_length
    data = bytearray(copy.read_bytes())
    data[start + member.file_size // 2] ^= 0x40
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{member.filename} does not match the CRC-32"):
        load_checkpoint(copy)
    assert main(["eval", "knn", str(copy), *TINY[:5]]) == 2
    assert "knn_top1" not in capsys.readouterr().out


def test_a_crash_between_the_checksum_and_the_checkpoint_leaves_a_checkpoint_that_matches(tmp_path, monkeypatch):
    import hashlib
    import os

    from contrastlab.engine import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 1, "w": [1.0]}, path)
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    real_replace = os.replace

    def die_before_the_checkpoint_is_renamed(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt  # the process is gone here (kill -9): the checksum file is already replaced
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", die_before_the_checkpoint_is_renamed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 2, "w": [2.0]}, path)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert checkpoint.recorded_digests(path)[1] == first  # the new file's digest first, then the one it replaces
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint, intact and accepted
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 3, "w": [3.0]}, path)
    assert load_checkpoint(path)["epoch"] == 3
    path.write_bytes(path.read_bytes()[:-10] + bytes(10))  # and a damaged file is still refused
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(path)
