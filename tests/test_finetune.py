"""End-to-end fine-tuning (``contrastlab eval finetune``): schedules against their formulas and against timm's
scheduler driven as DeiT drives it, the trainable and weight-decayed parameter sets of a MoCo v3 ViT, and a CLI run
on the embedded data with resume."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from contrastlab.cli import main
from contrastlab.config.load import dump_config, load_config
from contrastlab.config.schema import FinetuneConfig
from contrastlab.engine.checkpoint import FORMAT, VERSION, atomic_save, load_checkpoint
from contrastlab.eval.finetune import FinetuneClassifier, finetune_learning_rate, finetune_param_groups

torch.set_num_threads(2)

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="fine-tuning needs timm ([vit])")


def test_cosine_schedule_is_a_per_step_warmup_then_cosine() -> None:
    cfg = FinetuneConfig(epochs=6, warmup_epochs=2, lr=1e-3, batch_size=1024, base_batch_size=512,
                         warmup_lr=1e-6, min_lr=1e-5, schedule="cosine")
    steps_per_epoch, peak = 5, 2e-3
    warm, total = 10, 30
    for step in range(total):
        if step < warm:
            expected = 1e-6 + (peak - 1e-6) * step / warm
        else:
            expected = 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert finetune_learning_rate(cfg, step, steps_per_epoch) == pytest.approx(expected, rel=1e-12)


@needs_timm
def test_deit_schedule_is_timms_cosine_scheduler_stepped_after_each_epoch() -> None:
    """DeiT main.py: CosineLRScheduler(t_initial=epochs, lr_min, warmup_lr_init, warmup_t) built on the optimiser,
    train_one_epoch at the optimiser's rate, then lr_scheduler.step(epoch)."""
    from timm.scheduler import CosineLRScheduler

    cfg = load_config("finetune/mocov3_vit_b_150ep").finetune
    assert cfg.schedule == "deit"
    peak = 5e-4 * 1024 / 512
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5)
    steps_per_epoch = 3
    for epoch in range(cfg.epochs):
        released = optimizer.param_groups[0]["lr"]
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            assert finetune_learning_rate(cfg, step, steps_per_epoch) == pytest.approx(released, rel=1e-12)
        scheduler.step(epoch)


@needs_timm
def test_every_parameter_of_a_mocov3_vit_trains_and_decay_skips_vectors_pos_embed_and_cls_token() -> None:
    from contrastlab.models.vit import build_vit

    vit, dim = build_vit("vit_small", img_size=16, stop_grad_conv1=True, drop_path_rate=0.1)
    assert not vit.patch_embed.proj.weight.requires_grad and not vit.pos_embed.requires_grad  # as pre-trained
    model = FinetuneClassifier(vit, dim, 5)
    decay, no_decay = finetune_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(p.requires_grad for p in model.parameters())  # the patch projection and pos_embed train too
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    # per block: qkv, attention projection, fc1, fc2 weights; plus the patch projection and the head
    expected = {f"backbone.blocks.{i}.{w}.weight" for i in range(12) for w in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                              "mlp.fc2")}
    assert decayed == expected | {"backbone.patch_embed.proj.weight", "head.weight"}
    assert {"backbone.pos_embed", "backbone.cls_token", "head.bias", "backbone.norm.weight"} <= {
        names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # stochastic depth rises linearly from 0 in the first block to 0.1 in the last (timm's drop_path_rate)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    assert float(model.head.bias.detach().abs().max()) == 0 and 0 < float(model.head.weight.detach().std()) < 0.03


def _pretrained_checkpoint(folder) -> str:
    """A pre-training checkpoint of the demo recipe's backbone (a half-width CIFAR ResNet-20), as `train` writes."""
    from contrastlab import assemble

    cfg = load_config("demo", ["data.workers=0", "train.device=cpu", "data.image_size=16"])
    torch.manual_seed(0)
    net, _ = assemble.backbone(cfg)
    path = folder / "checkpoints" / "last.pt"
    atomic_save({"format": FORMAT, "version": VERSION, "config": dump_config(cfg), "epoch": 3, "step": 9,
                 "method": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, path)
    return str(path)


@needs_timm
def test_eval_finetune_trains_end_to_end_and_resumes(tmp_path, capsys) -> None:
    ckpt = _pretrained_checkpoint(tmp_path)
    small = ["finetune.drop_path=0", "data.subset=16", "monitor.max_test=16", "finetune.batch_size=8",
             "finetune.precision=fp32", "finetune.warmup_epochs=1", "finetune.epochs=1"]
    assert main(["eval", "finetune", ckpt, "--recipe", "finetune/mocov3_vit_s_300ep", *small]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["schedule"] == "deit" and 0 <= result["finetune_top1"] <= 100
    assert "finetune_ema_top1" in result and result["epoch"] == 3
    folder = tmp_path / "eval_finetune_demo"
    state = load_checkpoint(folder / "checkpoints" / "last.pt")
    pretrained = load_checkpoint(ckpt)["method"]
    changed = [k for k, v in state["model"].items() if k.startswith("backbone.") and v.dtype.is_floating_point
               and not torch.equal(v, pretrained[k])]
    assert any("conv" in k for k in changed)  # the backbone itself was trained, not only the head
    # one more epoch from the saved one: the step count and the metrics continue
    assert main(["eval", "finetune", ckpt, "--recipe", "finetune/mocov3_vit_s_300ep", *small[:-1], "finetune.epochs=2",
                 "--resume", "auto"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4
    epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert main(["train", "finetune/mocov3_vit_s_300ep"]) == 2
    assert "eval finetune" in capsys.readouterr().err


@needs_timm
def test_a_tiny_vit_fine_tunes_every_parameter_through_the_library(tmp_path) -> None:
    """The library path with ready objects: a 2-block ViT at 16 px, one epoch of 2 steps with the recipe's
    augmentations, mixup/cutmix and EMA; the position embedding and the patch projection move too."""
    from timm.models.vision_transformer import VisionTransformer

    from contrastlab.data import build_dataset
    from contrastlab.data.stats import NORMALIZATION
    from contrastlab.data.subsets import IndexedSubset
    from contrastlab.eval.finetune import TransformedDataset, finetune, finetune_transforms

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, num_classes=0, embed_dim=32, depth=2, num_heads=2,
                            drop_path_rate=0.1)
    vit.pos_embed.requires_grad_(False)  # frozen in pre-training, as MoCo v3's
    model = FinetuneClassifier(vit, 32, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_config("finetune/mocov3_vit_s_300ep", ["finetune.epochs=1", "finetune.batch_size=8",
                                                      "finetune.precision=fp32", "finetune.warmup_epochs=0",
                                                      "finetune.schedule=cosine", "finetune.lr=0.01"]).finetune
    train_tf, test_tf = finetune_transforms(cfg, 16, *NORMALIZATION["demo"])
    train = IndexedSubset(build_dataset("demo", None, "train"), range(16))
    test = IndexedSubset(build_dataset("demo", None, "test"), range(8))
    result = finetune(model, TransformedDataset(train, train_tf), TransformedDataset(test, test_tf), cfg,
                      tmp_path / "ft", workers=0, log=lambda s: None)
    assert result["steps"] == 2 and 0 <= result["finetune_top1"] <= 100 and "finetune_ema_top1" in result
    after = model.state_dict()
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.patch_embed.proj.weight", "head.weight"):
        assert not torch.equal(before[name], after[name]), name
