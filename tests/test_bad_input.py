"""Bad input gives a clear error, never a traceback from deep inside: property-based tests (hypothesis).

Random overrides of real config keys (wrong types, out-of-range numbers, empty strings, misspelled keys)
and random damage to dataset files in their real upstream formats: every run either works or stops with
a :class:`~contrastlab.errors.ContrastlabError` (exit status 2, one message), whatever the input.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contrastlab.cli import main
from contrastlab.config.load import load_config, valid_keys
from contrastlab.data import build_dataset
from contrastlab.engine.trainer import train
from contrastlab.errors import CheckpointError, ConfigError, DatasetError
from contrastlab.views import eval_view_dataset

torch.set_num_threads(1)

FAST = ["observers=[progress,knn,test_accuracy,localiser]", "monitor.max_bank=16", "monitor.max_test=8", "data.subset=32", "monitor.knn_k=3"]

VALUES = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([0.0, -1.0, 1e-9, 0.5, 1e9, float("nan")]),
    st.sampled_from(["", "x", "auto", "none", "[1, 2]", "[]", "{}", "null", "true"]),
    st.booleans(),
)
KEYS = [k for k in valid_keys("simclr") if not k.startswith(("out", "resume", "overwrite", "data.root",
                                                                  "train.device", "data.workers"))]


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    return str(value)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_override_trains_or_stops_with_a_clear_error(tmp_path_factory, key, value):
    out = tmp_path_factory.mktemp("fuzz")
    code = main(["train", "demo", "--smoke", f"out={out}", *FAST, f"{key}={_yaml(value)}"])
    assert code in (0, 2)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), cut=st.integers(min_value=1, max_value=4))
def test_a_misspelled_key_is_named_with_the_nearest_valid_ones(key, cut, capsys):
    capsys.readouterr()
    wrong = key[:-cut] + ("q" if key.endswith("x") else "x") * cut  # never the key itself (finetune.cutmix)
    assert main(["train", "demo", "--show", f"{wrong}=1"]) == 2
    err = capsys.readouterr().err
    assert f"unknown config key {wrong!r}" in err and "contrastlab train RECIPE --show" in err


# --- damaged files ------------------------------------------------------------------------------------------

def _damage(data: bytes, mode: str, where: int) -> bytes:
    where = where % max(1, len(data))
    if mode == "truncate":
        return data[:where]
    if mode == "flip":
        out = bytearray(data)
        out[where] ^= 0xFF
        return bytes(out)
    return data[:where] + b"garbage" * 3 + data[where:]


def _read_all(dataset) -> None:
    """Build the evaluation views of every sample: decoding errors surface here."""
    views = eval_view_dataset(dataset, 8, (0.5,) * 3, (0.25,) * 3)
    for i in range(len(views)):
        views[i]


DAMAGE = st.sampled_from(["truncate", "flip", "insert"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=DAMAGE, where=st.integers(min_value=0, max_value=10**6))
def test_damaged_cifar_pickles_give_a_dataset_error(tmp_path_factory, mode, where):
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 4, 5],
             b"batch_label": b"x", b"filenames": [b"a"] * 6}
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    target = folder / "data_batch_3"
    target.write_bytes(_damage(target.read_bytes(), mode, where))
    try:
        _read_all(build_dataset("cifar10", root, "train"))
    except DatasetError as exc:
        assert "data_batch_3" in str(exc) or "cifar" in str(exc).lower()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=DAMAGE, where=st.integers(min_value=0, max_value=10**6), fmt=st.sampled_from(["JPEG", "PNG"]))
def test_damaged_image_files_fail_naming_the_file_or_are_skipped(tmp_path_factory, mode, where, fmt):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    paths = []
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            path = root / "train" / cls / f"{i}.{fmt.lower()}"
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path, format=fmt)
            paths.append(path)
    bad = paths[4]
    bad.write_bytes(_damage(bad.read_bytes(), mode, where))
    dataset = build_dataset("imagefolder", root, "train")
    try:
        _read_all(dataset)
        damaged_yet_readable = True
    except DatasetError as exc:
        assert str(bad) in str(exc) and "data.bad_images=skip" in str(exc)
        damaged_yet_readable = False
    log = root / "skipped.txt"
    dataset.set_bad_images("skip", log)
    _read_all(dataset)  # never raises: the unreadable file is replaced by the next one
    skipped = log.read_text().splitlines() if log.is_file() else []
    assert all(line.startswith(str(bad)) for line in skipped)
    assert damaged_yet_readable == (not skipped)


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])  # gpu: files decoded per batch by the renderer's device
def test_skip_mode_counts_bad_images_in_the_metrics(tmp_path, pipeline):
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        (tmp_path / "data" / "val" / cls).mkdir(parents=True)
        for i in range(8):
            for split in ("train", "val"):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "3.png").write_bytes(b"not an image")
    args = ["train", "demo", f"out={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
            "data.test_split=val", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.epochs=1",
            "train.device=cpu", "model.width=0.25", "observers=[progress,knn,test_accuracy,localiser]", "monitor.knn_k=3", f"data.pipeline={pipeline}"]
    assert main(args) == 2  # fail (the default) names the file
    assert main([*args, "overwrite=true", "data.bad_images=skip"]) == 0
    import json

    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_images_total"] >= 1
    assert "3.png" in (tmp_path / "run" / "bad_images.txt").read_text()


@pytest.mark.parametrize("layout", ["empty_class", "class_list_mismatch"])
def test_folder_layout_errors(tmp_path, layout):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train" / "b").mkdir()
    kwargs = {}
    if layout == "class_list_mismatch":
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / "b" / "0.png")
        (tmp_path / "classes.txt").write_text("a\nc\n")
        kwargs["class_list"] = tmp_path / "classes.txt"
    with pytest.raises(DatasetError) as exc:
        build_dataset("imagefolder", tmp_path, "train", **kwargs)
    assert ("'b' has no images" if layout == "empty_class" else "'c'") in str(exc.value)
    assert Path(tmp_path).name in str(exc.value)


def test_a_model_too_big_for_memory_is_a_clear_error(tmp_path, capsys):
    """model.width beyond its range is refused; within it, a model the machine cannot hold (here: 768 MB of address
    space beyond what the subprocess has mapped once the trainer is imported, a real allocation failure: the
    ResNet-20 at width 64 needs 4.4 GB, and one of its second stage's 151 MB layers is refused) stops with the model
    settings named, exit code 2."""
    assert main(["train", "demo", "--show", "model.width=65"]) == 2
    assert "model.width must be in (0, 64]" in capsys.readouterr().err
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_AS"):
        pytest.skip("needs an address-space limit")
    script = ("import resource, sys\n"
              "import contrastlab.engine.trainer\n"
              "from contrastlab.cli import main\n"
              "mapped = next(int(line.split()[1]) << 10 for line in open('/proc/self/status') if line.startswith('VmSize:'))\n"
              "resource.setrlimit(resource.RLIMIT_AS, (mapped + (768 << 20), mapped + (768 << 20)))\n"
              f"sys.exit(main(['train', 'demo', '--smoke', 'out={tmp_path / 'run'}', 'model.width=64', "
              "'observers=[progress,knn,test_accuracy,localiser]']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "building the model ran out of memory on cpu" in done.stderr
    assert "model.arch=resnet20, model.width=64.0" in done.stderr


SMALL = ["data.subset=24", "data.batch_size=8", "data.workers=0", "data.image_size=16", "train.device=cpu",
         "model.width=0.25", "train.epochs=1", "monitor.knn_every=0", "observers=[]", "method.proj_hidden_dim=16",
         "method.proj_out_dim=8"]  # 3 steps


def _small(out: Path, *extra: str):
    return load_config("demo", [f"out={out}", *SMALL, *extra])


def test_a_batch_without_negatives_or_too_small_for_batchnorm_is_refused_naming_the_minimum(tmp_path):
    """data.batch_size=1 trained SimCLR at loss 0 (no negatives) and stopped MoCo with a raw BatchNorm error: each
    method says what it needs per rank (Method.batch_size_needed); MoCo without BatchNorm, its negatives in the
    queue, trains on 1 image a step."""
    with pytest.raises(ConfigError) as caught:
        train(_small(tmp_path / "simclr", "data.batch_size=1"), quiet=True)
    message = str(caught.value)
    assert "data.batch_size=1 gives 1 image(s) per rank on 1 rank(s)" in message and "'simclr' needs at least 2" in message
    assert "negatives" in message and "data.batch_size=2 or more" in message
    with pytest.raises(ConfigError, match="'moco' needs at least 2 per rank: its BatchNorm1d layers"):
        train(_small(tmp_path / "moco", "data.batch_size=1", "method.name=moco", "method.queue_size=16"), quiet=True)
    results = train(_small(tmp_path / "moco_no_bn", "data.batch_size=1", "method.name=moco", "method.queue_size=16",
                           "method.proj_hidden_bn=false", "train.max_steps=2"), quiet=True)
    assert results["steps"] == 2 and results["final_loss"] > 0


@pytest.mark.parametrize("change", ["model.width=0.5", "optim.name=adamw"])
def test_resuming_with_another_model_or_optimizer_names_the_keys_that_differ(tmp_path, change):
    """A raw `size mismatch` (model.width) or `KeyError: 'step'` (optim.name) before: now a CheckpointError naming
    the key with the checkpoint's value and this run's, and how to start afresh."""
    train(_small(tmp_path), quiet=True)
    key, value = change.split("=")
    before = {"model.width": "0.25", "optim.name": "sgd"}[key]
    with pytest.raises(CheckpointError) as caught:
        train(_small(tmp_path, "resume=auto", "train.epochs=2", change), quiet=True)
    message = str(caught.value)
    assert f"{key} ({before} in the checkpoint, {value} now)" in message
    assert str(tmp_path / "checkpoints" / "last.pt") in message and "overwrite=true" in message
    assert train(_small(tmp_path, "resume=auto", "train.epochs=2"), quiet=True)["epochs"] == 2  # unchanged: resumes


def test_an_image_size_beyond_the_free_memory_is_refused_with_what_it_needs(tmp_path, monkeypatch):
    """data.image_size=20000: the views of one step alone (8 images x 2 views x 3 x 20000 x 20000 float32) are
    refused before anything is allocated, with the size asked and the memory it needs."""
    from contrastlab.engine import device

    monkeypatch.setattr(device, "free_memory", lambda where: 16 << 30)
    with pytest.raises(ConfigError) as caught:
        train(_small(tmp_path, "data.image_size=20000"), quiet=True)
    message = str(caught.value)
    need = 8 * 2 * 3 * 20000 * 20000 * 4 / 2**30
    assert "data.image_size=20000" in message and f"need {need:.1f} GiB" in message and "16.0 GiB free" in message
    assert "Lower data.image_size" in message


def test_running_out_of_memory_while_training_names_the_image_size_and_batch(tmp_path):
    """Where the free memory is unknown (or misjudged), the allocation that fails inside a step (here under a 6 GB
    address-space limit, a real failure) stops the run with the image size and the batch named, exit status 2."""
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_AS"):
        pytest.skip("needs an address-space limit")
    args = ["train", "demo", f"out={tmp_path / 'run'}", *SMALL, "data.image_size=20000"]
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
              "import contrastlab.engine.device as device\n"
              "device.free_memory = lambda where: None\n"
              "from contrastlab.cli import main\n"
              f"sys.exit(main({args!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "training ran out of memory on cpu" in done.stderr
    assert "8 image(s) x 2 views of 20000x20000 px per rank" in done.stderr
    assert "data.image_size=20000" in done.stderr and "lower data.image_size or data.batch_size" in done.stderr


def test_output_piped_into_head_ends_quietly():
    """`contrastlab recipes | head -1`: the reader goes away after one line; no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "contrastlab", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.read(40)
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and first and "Traceback" not in err and "BrokenPipe" not in err, err
