"""Observers as callbacks (issue 17): the hook contract, state in checkpoints, stop requests, the config lists
``observers`` and ``log.to``, the loggers read back from what they wrote, and the trainer given ready objects."""

from __future__ import annotations

import glob
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

import contrastlab
from contrastlab.config.load import load_config
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.engine.trainer import Trainer, train
from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.observers.base import Observer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.subset=32", "data.batch_size=16", "data.workers=0", "data.image_size=16", "train.device=cpu",
        "model.width=0.25", "train.epochs=2", "monitor.knn_every=0", "monitor.max_bank=32", "monitor.max_test=16",
        "monitor.knn_k=5", "train.log_every=1", "method.proj_hidden_dim=16", "method.proj_out_dim=8",
        "observers=[knn]"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Recorder(Observer):
    """Writes down every call, the step losses it saw, and adds an entry to each epoch's record."""

    def __init__(self, stop_at_epoch: int = 0) -> None:
        self.calls: list[tuple] = []
        self.losses: list[float] = []
        self.stop_at_epoch = stop_at_epoch
        self.loaded: dict | None = None

    def on_start(self, run):
        self.calls.append(("start", run.epoch, run.step))

    def on_epoch_start(self, run):
        self.calls.append(("epoch_start", run.epoch, run.step))

    def on_step_end(self, run, step_output):
        self.calls.append(("step", run.epoch, run.step))
        self.losses.append(float(step_output.loss.detach()))

    def on_log(self, run, metrics, step):
        self.calls.append(("log", step, dict(metrics)))

    def on_epoch_end(self, run, record):
        self.calls.append(("epoch_end", run.epoch, run.step, run.last_epoch))
        record["steps_seen"] = len(self.losses)
        if run.epoch == self.stop_at_epoch:
            run.request_stop(ContrastlabError(f"stop asked at epoch {run.epoch}"))

    def on_finish(self, run, results):
        self.calls.append(("finish", run.epoch, run.step))
        results["recorder_steps"] = len(self.losses)

    def state_dict(self):
        return {"losses": list(self.losses)}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.losses = list(state["losses"])


def test_hooks_run_in_order_with_the_step_outputs_and_their_records_reach_the_loggers(tmp_path):
    """2 epochs of 2 steps: the call sequence, the epoch record (mean of the step losses the observer saw, plus
    the entry it added, in metrics.jsonl), ``on_log`` every step, the state in the checkpoint, results."""
    out = tmp_path / "run"
    recorder = Recorder()
    results = train(load_config("demo", [f"out={out}", *TINY]), quiet=True, observers=[recorder])
    kinds = [c[0] for c in recorder.calls]
    assert kinds == ["start", "epoch_start", "step", "log", "step", "log", "epoch_end",
                     "epoch_start", "step", "log", "step", "log", "epoch_end", "finish"]
    assert [c[1:] for c in recorder.calls if c[0] == "step"] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert [c[1:] for c in recorder.calls if c[0] == "epoch_end"] == [(1, 2, False), (2, 4, True)]
    logged = [c for c in recorder.calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2, 3, 4]
    assert [c[2]["train/loss"] for c in logged] == pytest.approx(recorder.losses, rel=1e-6)
    records = _records(out)
    for epoch, record in enumerate(records):
        assert record["loss"] == pytest.approx(sum(recorder.losses[2 * epoch:2 * epoch + 2]) / 2, rel=1e-6)
        assert record["steps_seen"] == 2 * (epoch + 1)
    assert "knn_top1" in records[-1] and results["knn_top1"] == records[-1]["knn_top1"]
    assert results["recorder_steps"] == 4 and results["final_loss"] == records[-1]["loss"]
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["observers"]["Recorder"] == {"losses": recorder.losses}


def test_state_is_restored_on_resume_and_a_stop_request_stops_after_the_checkpoint(tmp_path):
    """A registered observer listed in the config: its state goes into the checkpoint under its name and comes
    back on resume; its stop request ends the run after the epoch's record and checkpoint."""
    out = tmp_path / "run"
    first, second = Recorder(stop_at_epoch=1), Recorder()
    made = iter([first, second])
    contrastlab.register_observer("recorder_for_test", lambda run: next(made))
    try:
        listed = [f"out={out}", *TINY, "observers=[knn,recorder_for_test]"]
        with pytest.raises(ContrastlabError, match="stop asked at epoch 1"):
            train(load_config("demo", listed), quiet=True)
        assert [r["epoch"] for r in _records(out)] == [1]  # the record was logged, and the checkpoint written
        ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
        assert ckpt["epoch"] == 1 and ckpt["observers"]["recorder_for_test"] == {"losses": first.losses}
        train(load_config("demo", [*listed, "resume=auto"]), quiet=True)
    finally:
        contrastlab.OBSERVERS.unregister("recorder_for_test")
    assert second.loaded == {"losses": first.losses}
    assert second.calls[0] == ("start", 1, 2) and len(second.losses) == 4
    assert [r["epoch"] for r in _records(out)] == [1, 2]


def test_observer_and_logger_names_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"unknown observers 'plot'.*Did you mean 'plots'"):
        load_config("demo", ["observers=[knn,plot]"])
    with pytest.raises(ConfigError, match=r"unknown log.to 'tensorbord'.*Did you mean 'tensorboard'"):
        load_config("demo", ["log.to=[tensorbord]"])
    with pytest.raises(ConfigError, match=r"observers lists 'knn' more than once"):
        load_config("demo", ["observers=[knn,progress,knn]"])
    with pytest.raises(ConfigError, match="add score_statistics to the list `observers`"):
        load_config("demo", ["monitor.score_stats=true"])
    cfg = load_config("cifar10/mocov2_ft_r18_500ep")
    assert "score_statistics" in cfg.observers and "localiser" in cfg.observers


def test_a_crop_law_with_a_box_store_needs_the_localiser(tmp_path):
    cfg = load_config("demo", [f"out={tmp_path}", *TINY, "views.planner=contrastive_crop", "observers=[knn]"])
    with pytest.raises(ConfigError, match="only the localiser observer refreshes; add 'localiser' to the config list"):
        Trainer(cfg, quiet=True)


def test_a_missing_logger_package_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "contrastlab\[wandb\]"'):
        Trainer(load_config("demo", [f"out={tmp_path}", *TINY, "log.to=[jsonl,wandb]"]), quiet=True)


def _wandb_history(out: Path) -> dict[int, dict]:
    """The history rows of an offline wandb run, read from its ``.wandb`` file: a LevelDB-format log (7-byte
    file header, then records of 32 KiB blocks: crc32 u32, length u16, type u8 full/first/middle/last) of
    ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, rows = 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.setdefault(record.history.step.num, {}).update(items)
    return rows


def test_wandb_offline_mlflow_file_store_and_tensorboard_hold_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    """The loggers for real: wandb offline, MLflow's local file store (read with its client), TensorBoard's event
    files (read with its event reader), each compared with metrics.jsonl and the per-step losses."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    recorder = Recorder()
    train(load_config("demo", [f"out={out}", *TINY, "log.to=[jsonl,tensorboard,wandb,mlflow]",
                               "log.project=observers_test", "log.run_name=tiny"]), quiet=True, observers=[recorder])
    records = _records(out)
    assert len(records) == 2 and len(recorder.losses) == 4

    history = _wandb_history(out)
    for record in records:  # an epoch's scalars at the epoch's last step (wandb has one step axis)
        row = history[record["step"]]
        assert row["epoch/loss"] == pytest.approx(record["loss"], rel=1e-9)
        assert row["epoch/lr"] == pytest.approx(record["lr"], rel=1e-9)
        assert row["parts/nt_xent"] == pytest.approx(record["parts"]["nt_xent"], rel=1e-9)
    assert history[4]["epoch/knn_top1"] == pytest.approx(records[-1]["knn_top1"], rel=1e-9)
    assert [history[s]["train/loss"] for s in (1, 2, 3, 4)] == pytest.approx(recorder.losses, rel=1e-6)

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("observers_test").experiment_id])
    assert mlrun.info.run_name == "tiny" and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["optim.lr"] == "0.5" and mlrun.data.params["observers"] == "['knn']"
    epoch_loss = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "epoch/loss")}
    assert epoch_loss == pytest.approx({r["epoch"]: r["loss"] for r in records}, rel=1e-9)
    train_loss = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "train/loss"))
    assert [s for s, _ in train_loss] == [1, 2, 3, 4]
    assert [v for _, v in train_loss] == pytest.approx(recorder.losses, rel=1e-6)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/loss")] == [r["epoch"] for r in records]
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(recorder.losses, rel=1e-6)


def test_trainer_takes_a_method_and_a_view_dataset_built_in_python(tmp_path):
    """The notebook path: a backbone, a method and a dataset with views built by hand; train 4 steps; the kNN
    accuracy reported is that of the trained method's backbone, recomputed here from features extracted by hand."""
    from contrastlab.data.subsets import IndexedSubset
    from contrastlab.eval.knn import knn_accuracy
    from contrastlab.methods import SimCLR
    from contrastlab.views import RandomResizedCropPlanner, eval_view_dataset

    mean, std = contrastlab.DATASETS.info("demo")["normalization"]
    train_images = IndexedSubset(contrastlab.build_dataset("demo", None, "train"), range(32))
    test_images = IndexedSubset(contrastlab.build_dataset("demo", None, "test"), range(16))
    views = contrastlab.ViewDataset(train_images, RandomResizedCropPlanner(num_views=2, scale=(0.2, 1.0)), [16, 16],
                                    [contrastlab.make_photometric("small", v, mean, std) for v in range(2)], seed=0)

    def simclr():
        torch.manual_seed(0)
        backbone, dim = contrastlab.build_backbone("resnet20", width=0.25)
        return SimCLR(backbone, dim, proj_hidden_dim=16, proj_out_dim=8)

    method = simclr()
    backbone = method.backbone
    before = [p.detach().clone() for p in backbone.parameters()]
    cfg = load_config("demo", [f"out={tmp_path / 'views'}", *TINY, "train.max_steps=4", "data.batch_size=8",
                               "views.photometric=small", "views.scale=[0.9,1.0]"])  # scale: not the objects' 0.2
    results = train(cfg, quiet=True, method=method, dataset=views, test_dataset=test_images)
    assert results["steps"] == 4 and results["epochs"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))  # the given method trained
    assert json.loads((tmp_path / "views" / "run.json").read_text())["objects"] == {
        "method": "contrastlab.methods.simclr.SimCLR", "dataset": "contrastlab.views.dataset.ViewDataset",
        "test_dataset": "contrastlab.data.subsets.IndexedSubset"}
    # the same views from a raw dataset and a planner object (the config's size, recipe and seed): the same run
    cfg.out = str(tmp_path / "planner")
    again = train(cfg, quiet=True, method=simclr(), dataset=train_images, test_dataset=test_images,
                  planner=RandomResizedCropPlanner(num_views=2, scale=(0.2, 1.0)))
    assert (again["final_loss"], again["knn_top1"]) == (results["final_loss"], results["knn_top1"])

    backbone.eval()
    with torch.no_grad():
        def features(images):
            evaluation = eval_view_dataset(images, 16, mean, std)
            pairs = [evaluation[i] for i in range(len(evaluation))]
            return backbone(torch.stack([v[0] for v, _, _ in pairs])), torch.tensor([y for _, y, _ in pairs])

        bank, bank_labels = features(train_images)
        test, test_labels = features(test_images)
    expected = knn_accuracy(test, test_labels, bank, bank_labels, 10, k=5, temperature=cfg.monitor.knn_temperature)
    assert results["knn_top1"] == pytest.approx(expected, abs=1e-9)
    assert results["knn_test_size"] == 16 and results["knn_bank_size"] == 32
    assert not math.isnan(results["final_loss"])


def test_the_knn_curve_carries_the_random_init_accuracy_of_results_json_as_a_reference_line(tmp_path):
    """The demo's kNN plot: the per-epoch curve plus a dashed line at ``knn_top1_random_init``."""
    from contrastlab.cli import main
    from contrastlab.viz.curves import curve_figure, references_from_results

    records = [{"epoch": e, "step": 10 * e, "loss": 5.0 - 0.1 * e, "knn_top1": 60.0 + e} for e in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert references_from_results(tmp_path) == {}  # no results.json: no reference
    (tmp_path / "results.json").write_text(json.dumps({"knn_top1": 68.0, "knn_top1_random_init": 56.8}))
    references = references_from_results(tmp_path)
    assert references == {"knn_top1": {"random init (same architecture)": 56.8}}

    fig = curve_figure(records, "knn_top1", references["knn_top1"])
    curve, reference = fig.axes[0].lines
    assert list(curve.get_xdata()) == list(range(1, 9)) and list(curve.get_ydata()) == [60.0 + e for e in range(1, 9)]
    assert list(reference.get_ydata()) == [56.8, 56.8] and reference.get_linestyle() == "--"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["training",
                                                                            "random init (same architecture): 56.8"]
    assert len(curve_figure(records, "loss").axes[0].lines) == 1  # other curves carry no reference

    assert main(["plot", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["knn_top1.png", "loss.png"]
