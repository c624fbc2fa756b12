"""End-to-end training: every recipe's smoke run, resume continuity, run directory contents, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contrastlab.cli import _load, main
from contrastlab.config.load import config_to_dict, load_config, recipe_names
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.engine.trainer import Trainer, train

torch.set_num_threads(2)


TRAIN_RECIPES = [r for r in recipe_names() if not r.startswith(("linear/", "finetune/"))]


# Numbers that set a rate, not a code path: recipes that differ only in these (MoCo v3 100 vs 300 epochs: lr 0.6
# vs 0.3; step-schedule milestones, which a 2-step run never reaches) run the same code in a 2-step smoke run.
# Every recipe's own values are still loaded and validated.
# Training reads no linear-probe value but linear.crop_fraction (the kNN monitor's views), so the probe's protocol is
# rates only here too.
RATE_ONLY = (("optim", "lr"), ("optim", "weight_decay"), ("optim", "final_lr"), ("optim", "final_lr_ratio"),
             ("optim", "warmup_epochs"), ("optim", "milestones"), ("optim", "gamma"),
             ("train", "ema_momentum"), ("linear", "lr"), ("linear", "schedule"), ("linear", "milestones"),
             ("linear", "scale"),
             ("monitor", "knn_every"), ("train", "checkpoint_every"))  # a 2-step run evaluates and saves at its end


# Sizes, not code paths: these backbones run the code of the first one named, with other depths or widths (the
# same block classes; each architecture's own forward, parameter count and upstream names are tested in
# test_zoo.py, test_models.py and test_import.py). A group of recipes that differ only in these trains the
# smallest member it holds.
SAME_CODE_ARCHS = [("resnet32", "resnet56"), ("wrn_16_2", "wrn_40_2", "wrn_28_4"),
                   ("shufflenetv2_05x", "shufflenetv2_1x"), ("hcgnet_a1", "hcgnet_a2"), ("resnet18", "resnet34"),
                   ("vit_small", "vit_base")]
ARCH_FAMILY = {arch: family[0] for family in SAME_CODE_ARCHS for arch in family}
ARCH_SIZE_ORDER = {arch: i for family in SAME_CODE_ARCHS for i, arch in enumerate(family)}


def _smoke_configuration(recipe: str) -> tuple[str, str]:
    """The resolved config ``--smoke`` runs for ``recipe`` (every key, the method's defaults included, as sorted
    JSON), without its description, run directory, the :data:`RATE_ONLY` values and the size of a
    :data:`SAME_CODE_ARCHS` backbone; and the backbone it names."""
    cfg = _load(recipe, ["out=SMOKE", "observers=[progress,knn,test_accuracy,localiser]"], smoke=True)
    arch = cfg.model.arch
    cfg.description = ""
    for section, key in RATE_ONLY:
        setattr(getattr(cfg, section), key, None)
    cfg.model.arch = ARCH_FAMILY.get(arch, arch)
    return json.dumps(config_to_dict(cfg, method_defaults=True), sort_keys=True, default=repr), arch


SMOKE_GROUPS: dict[str, list[str]] = {}
_SIZE_RANK: dict[str, int] = {}
for _recipe in TRAIN_RECIPES:
    _conf, _arch = _smoke_configuration(_recipe)
    SMOKE_GROUPS.setdefault(_conf, []).append(_recipe)
    _SIZE_RANK[_recipe] = ARCH_SIZE_ORDER.get(_arch, 0)
SMOKE_GROUPS = {conf: sorted(group, key=_SIZE_RANK.get) for conf, group in SMOKE_GROUPS.items()}  # smallest first


def test_every_recipe_has_its_smoke_configuration_run():
    """Recipes whose smoke configurations are identical (e.g. the CIFAR-10 and CIFAR-100 twins, which differ
    only in the dataset that --smoke replaces, up to learning rates and backbone sizes) are the same run: one of
    each group is trained below."""
    assert sorted(r for group in SMOKE_GROUPS.values() for r in group) == sorted(TRAIN_RECIPES)
    for group in SMOKE_GROUPS.values():
        assert len({_smoke_configuration(r)[0] for r in group}) == 1


@pytest.mark.parametrize("recipe", [group[0] for group in SMOKE_GROUPS.values()])
def test_every_recipe_passes_smoke(recipe, tmp_path):
    cfg = _load(recipe, [f"out={tmp_path / 'run'}", "observers=[progress,knn,test_accuracy,localiser]"], smoke=True)
    if cfg.model.arch.startswith("vit"):
        pytest.importorskip("timm")  # the optional [vit] extra (installed by .[dev])
    results = train(cfg, recipe, quiet=True)
    assert results["steps"] == 2
    assert torch.isfinite(torch.tensor(results["final_loss"]))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["recipe"] == recipe


def test_smoke_keeps_the_users_overrides():
    """--smoke shrinks the run, but key=value overrides still win (a smoke run on the GPU, a bigger image)."""
    cfg = _load("cifar10/simclr_r18_500ep", ["observers=[progress,knn,test_accuracy,localiser]", "train.device=cuda", "data.image_size=24"],
                smoke=True)
    assert (cfg.observers, cfg.train.device, cfg.data.image_size) == (["progress", "knn", "test_accuracy", "localiser"],
                                                                      "cuda", 24)
    assert (cfg.data.name, cfg.train.max_steps, cfg.data.batch_size) == ("demo", 2, 8)


def _tiny(tmp_path, *extra):
    return load_config("demo", [
        f"out={tmp_path}", "data.batch_size=16", "data.workers=0", "data.image_size=16", "train.device=cpu",
        "model.width=0.25", "train.epochs=3", "train.max_steps=0", "monitor.knn_every=0", "monitor.max_bank=64",
        "monitor.max_test=32", "monitor.knn_k=5", "train.log_every=1000",
        "method.proj_hidden_dim=32", "method.proj_out_dim=16", *extra,
    ])


class _Subset:
    """Shrinks the demo set so an epoch is a handful of steps."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        import contrastlab.assemble as asm

        self._orig = asm.dataset
        n = self.n

        def small(cfg, split):
            from contrastlab.data.subsets import IndexedSubset

            return IndexedSubset(self._orig(cfg, split), range(n))

        asm.dataset = small
        return self

    def __exit__(self, *exc):
        import contrastlab.assemble as asm

        asm.dataset = self._orig


def test_resume_continues_the_same_loss_sequence(tmp_path):
    with _Subset(64):
        full = train(_tiny(tmp_path / "full"), quiet=True)
        losses_full = [r["loss"] for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())]
        # an interrupted run: stop after the first epoch, then resume=auto to the end
        train(_tiny(tmp_path / "part", "train.epochs=1"), quiet=True)
        cfg = _tiny(tmp_path / "part", "resume=auto")
        resumed = train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == pytest.approx(losses_full, rel=1e-5, abs=1e-6)
    assert resumed["steps"] == full["steps"] == 3 * 4
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["method"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_keep_last_checkpoints_and_resume_past_a_damaged_last_pt(tmp_path):
    with _Subset(32):
        train(_tiny(tmp_path, "train.epochs=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"), quiet=True)
        folder = tmp_path / "checkpoints"
        assert sorted(p.name for p in folder.glob("*.pt")) == ["epoch_0003.pt", "epoch_0004.pt", "last.pt"]
        data = bytearray((folder / "last.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "last.pt").write_bytes(bytes(data))
        resumed = train(_tiny(tmp_path, "train.epochs=5", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                              "resume=auto"), quiet=True)
    assert resumed["epochs"] == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]  # continued from epoch_0004.pt, nothing duplicated


def test_run_directory_contents(tmp_path):
    with _Subset(64):
        train(_tiny(tmp_path, "train.epochs=2", "monitor.knn_every=1"), quiet=True)
    for name in ["config.yaml", "run.json", "metrics.jsonl", "results.json", "checkpoints/last.pt", "plots/loss.png",
                 "plots/knn_top1.png"]:
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "loss", "lr", "img_per_s", "knn_top1"} <= set(r)
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    # the saved config re-runs as a recipe
    assert load_config(str(tmp_path / "config.yaml")).train.epochs == 2


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    with _Subset(32):
        train(_tiny(tmp_path, "train.epochs=1"), quiet=True)
    code = main(["train", "demo", f"out={tmp_path}", "train.epochs=1"])
    assert code == 2
    assert "resume=auto" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["train", "demo", "optim.lrr=1"], "optim.lr"),
    (["train", "cifar10/simclr_r18_500ep", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["eval", "knn", "/nonexistent/last.pt"], "/nonexistent/last.pt"),
    (["train", "no/such_recipe"], "unknown recipe"),
])
def test_cli_errors_are_clear(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("contrastlab: error:") and needle in err
    assert "Traceback" not in err


def test_cli_eval_knn_and_linear(tmp_path, capsys):
    with _Subset(64):
        train(_tiny(tmp_path / "run", "train.epochs=1"), quiet=True)
        ck = str(tmp_path / "run" / "checkpoints" / "last.pt")
        assert main(["eval", "knn", ck, "monitor.knn_k=5"]) == 0
        knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 0 <= knn["knn_top1"] <= 100 and knn["knn_k"] == 5
        assert main(["eval", "linear", ck, "linear.epochs=2", "linear.batch_size=16"]) == 0
        lin = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert lin["backbone_unchanged"] is True and lin["reported_epoch"] == 2 and lin["views"] == "cpu-workers"
        assert main(["eval", "knn", ck, "monitor.knn_k=5", "data.pipeline=gpu"]) == 0  # views rendered in batches
        on_device = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert on_device["knn_views"] == "device" and on_device["knn_top1"] == pytest.approx(knn["knn_top1"], abs=2.0)
        # a linear-probe recipe replaces the protocol; overrides still win
        assert main(["eval", "linear", ck, "--recipe", "linear/cifar_r18_100ep", "linear.epochs=1",
                     "linear.batch_size=16", "linear.max_train=40", "linear.max_test=20",
                     "--out", str(tmp_path / "lin.json")]) == 0
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert lin["lr"] == 10.0 and lin["schedule"] == "step" and lin["epochs"] == 1 and lin["augment"] is True
    assert (lin["train_size"], lin["test_size"]) == (40, 20)  # linear.max_train / max_test: what study --smoke sets
    correct = lin["top1"] * 20 / 100  # a count of the 20 test images
    assert abs(correct - round(correct)) < 1e-4
    assert main(["train", "linear/cifar_r18_100ep"]) == 2
    assert "eval linear" in capsys.readouterr().err
    assert (tmp_path / "run" / "eval_linear_demo.json").is_file()


def test_cli_recipes_lists_all(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(recipe_names())
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_torchrun_two_gloo_ranks_train_a_recipe(tmp_path):
    """`torchrun --nproc-per-node 2 -m contrastlab train` runs DDP on CPU (gloo): MoCo's shuffle-BN and queue gather,
    with views from the batched renderer, each rank rendering its own batches (the torchrun restart test in
    test_reliability.py runs the DataLoader-worker path under torchrun)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "contrastlab", "train", "cifar10/mocov2_r18_500ep", "--smoke", f"out={tmp_path}",
           "observers=[progress,knn,test_accuracy,localiser]", "method.queue_size=64", "data.pipeline=gpu"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # and only rank 0 logs: one epoch,
    assert len(list((tmp_path / "tensorboard").glob("events*"))) == 1  # one line, one event file
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["derived"]["world_size"] == 2 and run["derived"]["per_rank_batch_size"] == 4
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["method"]
    assert state["queue.queue"].shape[0] == 64
    assert int(state["queue.ptr"]) == 2 * 8  # 2 steps, keys of the global batch (2 ranks x 4) gathered


def test_contrastive_crop_localises_on_schedule_and_resumes_its_boxes(tmp_path):
    extra = ["data.subset=32", "views.planner=contrastive_crop", "views.box_warmup_epochs=1",
             "views.box_update_every=1", "views.box_threshold=0.5", "train.epochs=3"]
    train(_tiny(tmp_path / "full", *extra), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert ["box_mean_area" in r for r in records] == [True, True, False]  # after epochs 1 and 2, not the last
    assert all(0.0 < r["box_mean_area"] < 1.0 for r in records[:2])  # threshold 0.5: boxes smaller than images
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    boxes = ckpt["observers"]["localiser"]
    assert boxes["boxes"].shape == (32, 4) and bool(boxes["enabled"])
    # an interrupted run resumes with the stored boxes: same losses as the uninterrupted one
    train(_tiny(tmp_path / "part", *extra, "train.max_steps=4"), quiet=True)
    saved = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["observers"]["localiser"]["boxes"]
    trainer = Trainer(_tiny(tmp_path / "part", *extra, "resume=auto"), quiet=True)
    store = trainer.observers["localiser"].store
    assert torch.equal(store.table, saved) and store.enabled
    trainer.run()
    part = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in part] == [1, 2, 3]


def test_feature_transform_with_score_statistics_and_the_plot_command(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config("demo", [
        f"out={out}", "data.subset=32", "data.batch_size=8", "data.workers=0", "data.image_size=16",
        "train.device=cpu", "model.width=0.25", "train.epochs=2", "monitor.knn_every=0", "monitor.max_bank=16",
        "monitor.max_test=16", "monitor.knn_k=5", "observers=[progress,knn,test_accuracy,score_statistics,localiser]",
        "method.name=moco", "method.proj_hidden_dim=16", "method.proj_out_dim=8", "method.queue_size=32",
        "method.feature_transform={}",
    ])
    train(cfg, quiet=True)
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["epoch_0001.rank0.npz", "epoch_0002.rank0.npz"]
    assert main(["plot", "scores", str(out), "--label", "MoCo+FT", "--out", str(tmp_path / "figs")]) == 0
    written = capsys.readouterr().out.split()
    assert any(p.endswith(".png") for p in written) and any(p.endswith(".pdf") for p in written)
    assert all((tmp_path / "figs" / Path(p).name).stat().st_size > 0 for p in written)
    assert main(["plot", "scores", str(tmp_path)]) == 2  # no scores/: a clear error, not a traceback
