"""Opening a checkpoint never runs code from it (issue 23, part 1).

A checkpoint written by contrastlab, then given an extra entry whose unpickling runs a shell command (what a
tampered file from a shared folder or a download link can hold), is opened by every command that takes a
checkpoint: each refuses it with a message naming the file and the ``--trust-pickle`` opt-in, and the command never
runs (its marker file never appears). CIFAR's dataset pickles are read as plain data the same way.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrastlab.cli import main
from contrastlab.config.load import load_config
from contrastlab.engine.checkpoint import atomic_save, load_checkpoint
from contrastlab.engine.trainer import train
from contrastlab.errors import CheckpointError
from contrastlab.safe_load import load_plain_pickle, plain_tree

TINY = ["data.subset=32", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
        "model.width=0.25", "train.epochs=1", "train.max_steps=2", "monitor.knn_every=0", "monitor.max_bank=32",
        "monitor.max_test=16", "monitor.knn_k=5", "observers=[progress,knn,test_accuracy,localiser]",
        "method.proj_hidden_dim=16", "method.proj_out_dim=8", "linear.epochs=1", "linear.batch_size=16"]


class RunsCommand:
    """Unpickling this runs ``command`` in a shell, as a tampered checkpoint could."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-step demo run."""
    out = tmp_path_factory.mktemp("safety") / "run"
    train(load_config("demo", [f"out={out}", *TINY]), "demo", quiet=True)
    return out


def _tampered(run: Path, folder: Path, marker: Path, with_checksum: bool = True) -> Path:
    """A copy of the run's checkpoint with an entry that would create ``marker`` when unpickled (and, as a careful
    attacker would, a matching ``.sha256`` beside it)."""
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["note"] = RunsCommand(f"touch {marker}")
    path = folder / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    if with_checksum:
        Path(f"{path}.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  last.pt\n")
    return path


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


COMMANDS = {
    "eval knn": lambda ckpt, tmp: ["eval", "knn", str(ckpt), *TINY[:5]],
    "eval linear": lambda ckpt, tmp: ["eval", "linear", str(ckpt), *TINY[:5]],
    "export": lambda ckpt, tmp: ["export", str(ckpt), "--format", "torchvision", "--out", str(tmp / "w.pth")],
    "views --checkpoint": lambda ckpt, tmp: ["views", "demo", "--images", str(_images(tmp / "images")), "--out",
                                             str(tmp / "v.png"), "--checkpoint", str(ckpt)],
    "train resume=FILE": lambda ckpt, tmp: ["train", "demo", f"out={tmp / 'resumed'}", f"resume={ckpt}", *TINY],
    "train resume=auto": lambda ckpt, tmp: ["train", "demo", f"out={ckpt.parent.parent}", "resume=auto", *TINY],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_command_runs_code_from_a_tampered_checkpoint(command, run, tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = _tampered(run, tmp_path / "shared", marker)
    assert main(COMMANDS[command](ckpt, tmp_path)) == 2
    out, err = capsys.readouterr()
    assert not marker.exists()
    assert str(ckpt) in err and "posix.system" in err and "--trust-pickle" in err
    assert "knn_top1" not in out  # nothing evaluated, nothing printed as if it had been
    if command == "train resume=auto":  # the run folder's only checkpoint was refused: said so, not resumed
        assert "skipping" in err and "every checkpoint" in err


@pytest.mark.skipif(not __import__("importlib").util.find_spec("timm"), reason="eval finetune needs timm")
def test_eval_finetune_resume_refuses_a_tampered_finetuning_checkpoint(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    tampered = _tampered(run, tmp_path / "ft", marker, with_checksum=False)
    small = ["finetune.drop_path=0", "data.subset=16", "monitor.max_test=16", "finetune.batch_size=8",
             "finetune.precision=fp32", "finetune.warmup_epochs=1", "finetune.epochs=1", "data.workers=0",
             "train.device=cpu", "data.image_size=16"]
    code = main(["eval", "finetune", str(run / "checkpoints" / "last.pt"), "--recipe", "finetune/mocov3_vit_s_300ep",
                 "--resume", str(tampered), *small])
    assert code == 2 and not marker.exists()
    assert "--trust-pickle" in capsys.readouterr().err


def test_load_checkpoint_refuses_it_and_trust_pickle_opens_a_trusted_one(run, tmp_path):
    marker = tmp_path / "marker"
    path = _tampered(run, tmp_path / "a", marker, with_checksum=False)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    assert not marker.exists()
    # a file holding a harmless foreign object (an upstream `args` Namespace): the opt-in opens it, on the CLI too
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ckpt["args"] = Namespace(lr=0.1)
    trusted = tmp_path / "b" / "checkpoints" / "last.pt"
    trusted.parent.mkdir(parents=True)
    torch.save(ckpt, trusted)
    assert load_checkpoint(trusted, trust_pickle=True)["args"].lr == 0.1
    assert main(["eval", "knn", str(trusted), *TINY[:5]]) == 2
    assert main(["eval", "knn", str(trusted), "--trust-pickle", *TINY[:5]]) == 0


def test_checkpoints_hold_plain_data_only_and_older_ones_still_open(run, tmp_path):
    path = run / "checkpoints" / "last.pt"
    torch.load(path, weights_only=True)  # torch's own weights-only reader, with nothing allowed beyond it
    # contrastlab <= 0.x kept numpy's random state as a numpy array: such a checkpoint opens without the opt-in
    ckpt = torch.load(path, weights_only=True)
    ckpt["rng"]["numpy"] = np.random.get_state()
    older = tmp_path / "old" / "checkpoints" / "last.pt"
    older.parent.mkdir(parents=True)
    torch.save(ckpt, older)
    assert load_checkpoint(older)["rng"]["numpy"][1].dtype == np.uint32
    cfg = load_config("demo", [f"out={tmp_path / 'continued'}", f"resume={older}", *TINY[:-2], "train.max_steps=3"])
    assert train(cfg, "demo", quiet=True)["steps"] == 3


def test_a_checkpoint_entry_that_is_not_plain_data_is_refused_when_saving(tmp_path):
    assert plain_tree({"a": [np.float64(0.5), (np.int64(3), "x")]}) == {"a": [0.5, (3, "x")]}
    with pytest.raises(CheckpointError, match=r"\['observers'\]\['mine'\]\['table'\] holds a numpy.ndarray.*tolist"):
        atomic_save({"observers": {"mine": {"table": np.zeros(3)}}}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_cifar_pickles_are_read_as_plain_data(tmp_path):
    plain = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], b"names": [b"cat"]}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        loaded = load_plain_pickle(pickle.dumps(plain, protocol=protocol), encoding="bytes")
        assert np.array_equal(loaded[b"data"], plain[b"data"]) and loaded[b"labels"] == [1, 2]
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": RunsCommand(f"touch {marker}")}))
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    code = main(["train", "cifar10/simclr_r18_500ep", f"data.root={tmp_path}", f"out={tmp_path / 'r'}",
                 "train.device=cpu", "data.workers=0"])
    assert code == 2 and not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        load_plain_pickle((folder / "batches.meta").read_bytes())
