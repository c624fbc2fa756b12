"""contrastlab import: released checkpoints of each upstream project in, contrastlab checkpoints out.

Each test builds a source model in the upstream layout here (torchvision / timm networks with heads named and
ordered as the upstream builders name them, written from the released code's naming; MCL's CIFAR ResNets written
out below), gives every tensor random values (BatchNorm running statistics included, so evaluation-mode outputs
depend on all of them), saves it in the released file format, imports it, and checks that our model gives the
same outputs as the source model on the same input: backbone features, projector / predictor / momentum-encoder
outputs, classifier logits. Tiny inputs (32 px, batch 2) keep ResNet-50 and ViT-S cheap.
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn

from contrastlab import assemble
from contrastlab.cli import main
from contrastlab.config.load import config_from_dict, load_config
from contrastlab.engine.checkpoint import load_checkpoint
from contrastlab.errors import CheckpointError, ConfigError
from contrastlab.importers import IMPORTERS, convert_released, import_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every float tensor of ``module`` random (running variances positive); evaluation mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.1)
    return module.eval()


def _mlp(layers: int, dim_in: int, hidden: int, dim_out: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's / CaCo's ``_build_mlp``: bias-free Linears, BN + ReLU between, optional affine-free last BN."""
    mods: list[nn.Module] = []
    for i in range(layers):
        a, b = (dim_in if i == 0 else hidden), (dim_out if i == layers - 1 else hidden)
        mods.append(nn.Linear(a, b, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*mods)


def _trunk(net: nn.Module) -> nn.Module:
    """A torchvision ResNet up to its pooled features (everything but ``fc``)."""
    return nn.Sequential(*list(net.children())[:-1], nn.Flatten())


def _resnet(arch: str, out: int, cifar_stem: bool = False) -> nn.Module:
    net = getattr(torchvision.models, arch)(num_classes=out)
    if cifar_stem:  # ContrastiveCrop's ResNet(maxpool=False): a 3x3 stride-1 stem, no max-pool
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


def _save(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / name
    torch.save(content, path)
    return path


def _ddp(module: nn.Module) -> dict:
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def _imported(path: Path, source: str, tmp_path: Path, *overrides: str, recipe: str | None = None,
              classifier: Path | None = None):
    out = tmp_path / "imported.pt"
    lines: list[str] = []
    summary = import_checkpoint(path, source, out, recipe=recipe, overrides=list(overrides), classifier=classifier,
                                log=lines.append)
    ckpt = load_checkpoint(out)
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]))
    method = assemble.method(cfg, ckpt["classifier"]["num_classes"] if "classifier" in ckpt else 100)
    method.load_state_dict(ckpt["method"], strict=True)
    return method.eval(), ckpt, summary, lines


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


EVAL_IMAGES = 200  # of the demo's 1,000 test images: every fifth
EVAL_DEMO = ["--data", "demo", "data.root=null", "data.image_size=16", "train.device=cpu", "data.workers=0",
             "linear.crop_fraction=1.0", "data.test_split=test", f"linear.max_test={EVAL_IMAGES}"]


def _stored_classifier_top1(ckpt_path: Path, network, capsys) -> tuple[float, float]:
    """``eval linear --stored-classifier`` on the demo test split, and the top-1 of the upstream ``network`` (images ->
    logits) on the same evaluation views."""
    capsys.readouterr()
    assert main(["eval", "linear", str(ckpt_path), "--stored-classifier", *EVAL_DEMO]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = config_from_dict(yaml.safe_load(load_checkpoint(ckpt_path)["config"]))
    cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.linear.crop_fraction = "demo", None, 16, 1.0
    test = assemble.evaluation_views(cfg, assemble.dataset(cfg, "test"))
    items = [test[i] for i in range(0, len(test), len(test) // EVAL_IMAGES)]  # what linear.max_test keeps
    assert result["test_size"] == len(items) == EVAL_IMAGES
    with torch.no_grad():
        images, labels = torch.stack([t[0][0] for t in items]), torch.tensor([t[1] for t in items])
        expected = (network(images).argmax(1) == labels).float().mean().item() * 100
    return result["top1"], expected


# ----------------------------------------------------------------------------------------------- MoCo v3


class _MoCoV3(nn.Module):
    """moco-v3's builder.MoCo_ResNet / MoCo_ViT: base_encoder / momentum_encoder with the projector as fc / head."""

    def __init__(self, make, head: str, dim: int, hidden: int = 32, out: int = 16) -> None:
        super().__init__()
        vit = head == "head"
        self.base_encoder, self.momentum_encoder = make(), make()
        for enc in (self.base_encoder, self.momentum_encoder):
            setattr(enc, head, _mlp(3 if vit else 2, dim, hidden, out))
        self.predictor = _mlp(2, out, hidden, out, last_bn=vit)


MOCOV3_HEADS = ["method.proj_hidden_dim=32", "method.proj_out_dim=16"]


def _vit_small(img_size: int, num_classes: int = 1000) -> nn.Module:
    """timm's ViT-S/16 as MoCo v3's ``vit_small`` builds it (12 blocks of width 384, 12 heads, LayerNorm eps 1e-6)."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    return timm_vit.VisionTransformer(img_size=img_size, patch_size=16, embed_dim=384, depth=12, num_heads=12,
                                      mlp_ratio=4, qkv_bias=True, num_classes=num_classes,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6))


def test_mocov3_resnet50_pretraining_file(tmp_path):
    up = _randomise(_MoCoV3(partial(torchvision.models.resnet50, zero_init_residual=True), "fc", 2048), 0)
    path = _save(tmp_path, "r-50-100ep.pth.tar", {"epoch": 100, "arch": "resnet50", "state_dict": _ddp(up),
                                                  "optimizer": {"state": {}, "param_groups": []}, "scaler": {}})
    method, ckpt, summary, lines = _imported(path, "mocov3", tmp_path, *MOCOV3_HEADS)
    assert summary["recipe"] == "imagenet/mocov3_r50_100ep" and ckpt["epoch"] == 100 and ckpt["step"] is None
    with torch.no_grad():
        _close(method.backbone(X), _trunk(up.base_encoder)(X))
        z = up.base_encoder(X)
        _close(method.projector(method.backbone(X)), z)
        _close(method.predictor(method.projector(method.backbone(X))), up.predictor(z))
        _close(method.key_encoder(X), up.momentum_encoder(X))
    assert any("'optimizer': not carried over" in line for line in lines)
    assert ckpt["imported"]["project"] == "facebookresearch/moco-v3" and ckpt["imported"]["placed"] == summary["placed"]


def test_mocov3_vit_small_pretraining_file(tmp_path):
    up = _randomise(_MoCoV3(partial(_vit_small, 32), "head", 384), 1)
    path = _save(tmp_path, "vit-s-300ep.pth.tar", {"epoch": 300, "arch": "vit_small", "state_dict": _ddp(up)})
    method, _, summary, _ = _imported(path, "mocov3", tmp_path, *MOCOV3_HEADS, "data.image_size=32")
    assert summary["recipe"] == "imagenet/mocov3_vit_s_300ep" and method.head == "vit"
    with torch.no_grad():
        up_features = up.base_encoder.forward_head(up.base_encoder.forward_features(X), pre_logits=True)
        _close(method.backbone(X), up_features)
        _close(method.predictor(method.projector(method.backbone(X))), up.predictor(up.base_encoder(X)))
        _close(method.key_encoder(X), up.momentum_encoder(X))

    # `eval finetune` on the imported checkpoint (issue 19): at learning rate 0 the fine-tuned backbone it writes is
    # the upstream base encoder, so it started from the imported weights
    tiny = ["--data", "demo", "data.root=null", "data.image_size=32", "train.device=cpu", "data.workers=0",
            "data.subset=8", "data.test_split=test", "monitor.max_test=8", "finetune.batch_size=8", "finetune.precision=fp32",
            "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.schedule=cosine", "finetune.lr=0",
            "finetune.min_lr=0", "finetune.warmup_lr=0", "finetune.drop_path=0", "finetune.ema_decay=0",
            "finetune.repeated_aug=1"]
    assert main(["eval", "finetune", str(tmp_path / "imported.pt"), "--recipe", "finetune/mocov3_vit_s_300ep", *tiny,
                 "--out", str(tmp_path / "ft.json")]) == 0
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")["model"]
    for key, value in up.base_encoder.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(tuned[f"backbone.{key}"], value), key


def test_linear_probe_file_keeps_its_classifier_and_eval_reports_its_accuracy(tmp_path, capsys):
    """A main_lincls.py file (backbone + fc): the classifier is stored, and `eval linear --stored-classifier`
    reports the accuracy that the upstream network itself gets on the same evaluation views."""
    up = _randomise(torchvision.models.resnet18(num_classes=10), 2)  # main_lincls.py builds any torchvision arch
    path = _save(tmp_path, "linear.pth.tar", {"epoch": 90, "arch": "resnet18", "state_dict": _ddp(up),
                                              "best_acc1": torch.tensor(12.5), "optimizer": {}})
    out = tmp_path / "lin.pt"
    assert main(["import", str(path), "--from", "mocov3", "--out", str(out), *MOCOV3_HEADS]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["classifier"]["num_classes"] == 10 and ckpt["imported"]["info"]["best_acc1"] == 12.5
    assert ckpt["imported"]["initial"]  # heads and momentum encoder are not in a linear file: said so
    capsys.readouterr()
    overrides = ["--data", "demo", "data.root=null", "data.image_size=16", "train.device=cpu", "data.workers=0",
                 "linear.crop_fraction=1.0", "data.test_split=test"]
    assert main(["eval", "linear", str(out), "--stored-classifier", *overrides]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]))
    cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.linear.crop_fraction = "demo", None, 16, 1.0
    test = assemble.evaluation_views(cfg, assemble.dataset(cfg, "test"))
    with torch.no_grad():
        images = torch.stack([test[i][0][0] for i in range(len(test))])
        labels = torch.tensor([test[i][1] for i in range(len(test))])
        expected = (up(images).argmax(1) == labels).float().mean().item() * 100
    assert result["top1"] == pytest.approx(expected, abs=1e-6) and result["test_size"] == 1000
    # `contrastlab export` reads it unchanged: the torchvision file loads strictly and gives the upstream features
    assert main(["export", str(out), "--format", "torchvision", "--out", str(tmp_path / "r18.pth")]) == 0
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.load_state_dict(torch.load(tmp_path / "r18.pth"), strict=True)
    with torch.no_grad():
        _close(net.eval()(X), _trunk(up)(X))


# ------------------------------------------------------------------------------------------------- CaCo


CACO_HEADS = ["method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.memory_size=64"]


def _caco() -> tuple[nn.Module, dict]:
    """CaCo's model (encoder_q / encoder_k, fc = the 3-layer projector without last BN) and its Memory_Bank."""
    up = nn.Module()
    up.encoder_q, up.encoder_k = torchvision.models.resnet18(), torchvision.models.resnet18()
    for enc in (up.encoder_q, up.encoder_k):
        enc.fc = _mlp(3, 512, 32, 16, last_bn=False)
    _randomise(up, 3)
    return up, {"W": torch.randn(16, 64), "v": torch.randn(16, 64)}


def test_caco_pretraining_file_with_its_memory(tmp_path):
    up, bank = _caco()
    path = _save(tmp_path, "checkpoint_best.pth.tar", {"epoch": 200, "arch": "resnet18", "best_acc": 0.0,
                                                      "knn_acc": 33.0, "state_dict": _ddp(up), "optimizer": {},
                                                      "Memory_Bank": bank})
    method, ckpt, summary, _ = _imported(path, "caco", tmp_path, *CACO_HEADS)
    assert summary["recipe"] == "imagenet/caco_r50_200ep_bs1024" and ckpt["imported"]["info"]["knn_acc"] == 33.0
    with torch.no_grad():
        _close(method.projector(method.backbone(X)), up.encoder_q(X))
        _close(method.key_encoder(X), up.encoder_k(X))
    assert torch.equal(method.memory.weight, bank["W"]) and torch.equal(method.memory.velocity, bank["v"])
    assert int(method.memory_written) == 64 and not method.warming_up  # a trained memory: no warm start due


# ------------------------------------------------------------------------------------------- Barlow Twins


def _barlow() -> nn.Module:
    """main.py's BarlowTwins: backbone (torchvision ResNet, fc = Identity), projector (bias-free Linear-BN-ReLU x 2,
    Linear), bn (BatchNorm1d without affine parameters: its running statistics are in the state dict)."""
    up = nn.Module()
    up.backbone = torchvision.models.resnet18()
    up.backbone.fc = nn.Identity()
    up.projector = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
                                 nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
                                 nn.Linear(32, 16, bias=False))
    up.bn = nn.BatchNorm1d(16, affine=False)
    return _randomise(up, 30)


BARLOW_HEADS = ["method.proj_hidden_dim=32", "method.proj_out_dim=16"]


def _barlow_probe_file() -> tuple[nn.Module, dict]:
    """evaluate.py's checkpoint.pth: the DDP ResNet with its fc under 'model', best_acc an argparse.Namespace."""
    import argparse

    net = _r18_probe(31)
    return net, {"epoch": 100, "best_acc": argparse.Namespace(top1=71.5, top5=90.0), "model": _ddp(net),
                 "optimizer": {}, "scheduler": {}}


def test_barlowtwins_main_py_checkpoint_backbone_and_probe_files(tmp_path):
    up = _barlow()
    path = _save(tmp_path, "checkpoint.pth", {"epoch": 1000, "model": _ddp(up), "optimizer": {}})
    method, ckpt, summary, lines = _imported(path, "barlowtwins", tmp_path, *BARLOW_HEADS)
    assert summary["recipe"] == "imagenet/barlow_twins_r50_1000ep" and ckpt["epoch"] == 1000
    with torch.no_grad():
        _close(method.projector(method.backbone(X)), up.projector(up.backbone(X)))
    assert any("bn.*" in line and "never reads" in line for line in lines)  # the loss BN's statistics, said
    short = convert_released({"epoch": 300, "model": _ddp(up), "optimizer": {}}, "checkpoint.pth", "barlowtwins",
                             overrides=BARLOW_HEADS, log=lambda s: None)
    assert short.summary["recipe"] == "imagenet/barlow_twins_r50_300ep"

    backbone = _save(tmp_path, "resnet50.pth", up.backbone.state_dict())
    method, ckpt, summary, _ = _imported(backbone, "barlowtwins", tmp_path, *BARLOW_HEADS)
    assert ckpt["imported"]["kind"] == "backbone" and summary["recipe"] == "imagenet/barlow_twins_r50_1000ep"
    with torch.no_grad():
        _close(method.backbone(X), up.backbone(X))

    net, raw = _barlow_probe_file()
    probe = _save(tmp_path, "lincls.pth", raw)
    with pytest.raises(CheckpointError):  # best_acc is a Namespace: a pickled object
        import_checkpoint(probe, "barlowtwins", tmp_path / "x.pt", log=lambda s: None)
    out = tmp_path / "lin.pt"
    import_checkpoint(probe, "barlowtwins", out, overrides=BARLOW_HEADS, allow_pickle=True, log=lambda s: None)
    ckpt = load_checkpoint(out)
    assert torch.equal(ckpt["classifier"]["weight"], net.fc.weight) and ckpt["classifier"]["num_classes"] == 10


# -------------------------------------------------------------------------------------- ContrastiveCrop

CCROP = ["method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.pred_hidden_dim=8", "data.image_size=32"]


SIMSIAM = [*CCROP[:2], "method.proj_hidden_dim=32", "method.pred_hidden_dim=8"]


def _ccrop_byol() -> nn.Module:
    """DDP_byol_ccrop.py's model: encoder_q / encoder_k with fc = Linear (bias) - BN - ReLU - Linear, a predictor."""
    byol = nn.Module()
    byol.encoder_q, byol.encoder_k = _resnet("resnet18", 32, True), _resnet("resnet18", 32, True)
    for enc in (byol.encoder_q, byol.encoder_k):
        enc.fc = nn.Sequential(enc.fc, nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32, 16))
    byol.predictor = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 16))
    return _randomise(byol, 4)


def _ccrop_simsiam() -> nn.Module:
    """DDP_simsiam_ccrop.py's model: encoder with the 3-layer projector (last Linear biased), a predictor."""
    siam = nn.Module()
    siam.encoder = _resnet("resnet18", 16, True)
    siam.encoder.fc = nn.Sequential(nn.Linear(512, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
                                    nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
                                    nn.Linear(32, 16), nn.BatchNorm1d(16, affine=False))
    siam.predictor = nn.Sequential(nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
                                   nn.Linear(8, 16))
    return _randomise(siam, 5)


def _ccrop_moco() -> nn.Module:
    """DDP_moco_ccrop.py's MoCo v2 model: encoder_q / encoder_k with fc = Linear-ReLU-Linear, queue [dim, K]."""
    moco = nn.Module()
    moco.encoder_q, moco.encoder_k = _resnet("resnet18", 16, True), _resnet("resnet18", 16, True)
    for enc in (moco.encoder_q, moco.encoder_k):
        enc.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), enc.fc)
    moco.register_buffer("queue", nn.functional.normalize(torch.randn(16, 64), dim=0))
    moco.register_buffer("queue_ptr", torch.tensor([24]))
    return _randomise(moco, 6)


def test_ccrop_byol_and_simsiam_heads_with_biases_before_batchnorm(tmp_path):
    """BYOL's and SimSiam's released heads put a biased Linear before a BatchNorm; ours are bias-free there: the
    bias is folded into the running mean, and every output matches."""
    byol = _ccrop_byol()
    path = _save(tmp_path, "last.pth", {"optimizer_state": {}, "byol_state": _ddp(byol), "boxes": torch.rand(4, 4),
                                        "epoch": 500})
    method, _, summary, _ = _imported(path, "ccrop", tmp_path, *CCROP)
    assert summary["recipe"] == "cifar10/byol_ccrop_r18_500ep"
    with torch.no_grad():
        z = byol.encoder_q(X)
        _close(method.projector(method.backbone(X)), z)
        _close(method.predictor(method.projector(method.backbone(X))), byol.predictor(z))
        _close(method.target_encoder(X), byol.encoder_k(X))

    siam = _ccrop_simsiam()
    path = _save(tmp_path, "siam.pth", {"optimizer_state": {}, "simsiam_state": _ddp(siam), "boxes": torch.rand(4, 4),
                                        "epoch": 500})
    method, _, _, _ = _imported(path, "ccrop", tmp_path, *SIMSIAM)
    with torch.no_grad():
        _close(method.projector(method.backbone(X)), siam.encoder(X))
        _close(method.predictor(method.projector(method.backbone(X))), siam.predictor(siam.encoder(X)))


def test_ccrop_moco_file_with_queue_and_boxes_resumes_training(tmp_path):
    """A MoCo v2 file of DDP_moco_ccrop.py (mlp head without BN, queue [dim, K], boxes as (h0, w0, h1, w1)),
    imported and trained on from its epoch with `train ... resume=FILE`."""
    from contrastlab.cli import smoke_overrides
    from contrastlab.engine.trainer import train

    moco = _ccrop_moco()
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9]]).repeat(16, 1)  # (h_min, w_min, h_max, w_max)
    path = _save(tmp_path, "epoch_1.pth", {"optimizer_state": {}, "moco_state": _ddp(moco), "boxes": boxes,
                                           "epoch": 1})
    overrides = ["method.proj_out_dim=16", "method.queue_size=64", "views.box_warmup_epochs=1"]
    method, ckpt, summary, _ = _imported(path, "ccrop", tmp_path, *overrides)
    assert summary["recipe"] == "cifar10/mocov2_ccrop_r18_500ep" and "method.proj_hidden_bn=false" in ckpt["imported"]["overrides"]
    with torch.no_grad():
        _close(method.projector(method.backbone(X)), moco.encoder_q(X))
        _close(method.key_encoder(X), moco.encoder_k(X))
    assert torch.equal(method.queue.queue, moco.queue.t()) and int(method.queue.ptr) == 24
    boxes = ckpt["observers"]["localiser"]
    assert torch.equal(boxes["boxes"][0], torch.tensor([0.2, 0.1, 0.9, 0.7])) and boxes["enabled"]

    cfg = load_config("cifar10/mocov2_ccrop_r18_500ep", [*overrides, "method.proj_hidden_bn=false"])
    run = tmp_path / "run"
    cfg = load_config("cifar10/mocov2_ccrop_r18_500ep",
                      [*smoke_overrides(cfg), *overrides, "method.proj_hidden_bn=false", "data.subset=16", "data.epoch_length=0",
                       "train.max_steps=0", "train.epochs=2", "observers=[knn,localiser]", f"out={run}",
                       f"resume={tmp_path / 'imported.pt'}"])
    results = train(cfg, quiet=True)
    assert results["epochs"] == 2 and results["steps"] == 4  # epoch 1 came from the file: one more epoch of 2 steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [2]


# --------------------------------------------------------------------------------------------------- FT


class _RGBSingleHead(nn.Module):
    """PyContrast's model: encoder (ResNet without fc) + head (+ a parameter-free L2)."""

    def __init__(self, mlp: bool) -> None:
        super().__init__()
        self.encoder = _trunk(torchvision.models.resnet18())
        self.head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 16)) if mlp \
            else nn.Sequential(nn.Linear(512, 16))

    def named_state(self):
        # PyContrast's ResNet has no Flatten module: its keys are those of the torchvision trunk's children
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
        state = {}
        for k, v in self.state_dict().items():
            parts = k.split(".")
            if parts[0] == "encoder":
                parts[1] = names[int(parts[1])]
            state[".".join(parts)] = v
        return state


FT_PYCONTRAST = ["model.arch=resnet18", "method.proj_hidden_dim=512", "method.proj_out_dim=16", "method.queue_size=64"]


def _pycontrast() -> tuple[_RGBSingleHead, _RGBSingleHead, torch.Tensor, dict]:
    """FT's "+FT" model, its momentum copy and memory, and the file PyContrast saves."""
    model, ema = _randomise(_RGBSingleHead(True), 7), _randomise(_RGBSingleHead(True), 8)
    memory = nn.functional.normalize(torch.randn(64, 16), dim=1)
    raw = {"model": {f"module.{k}": v for k, v in model.named_state().items()}, "model_ema": ema.named_state(),
           "contrast": {"memory": memory}, "optimizer": {}, "epoch": 200}
    return model, ema, memory, raw


def _ft_linear() -> tuple[nn.Linear, dict]:
    """FT's main_linear.py file: only the classifier (DDP-wrapped)."""
    linear = _randomise(nn.Linear(512, 10), 23)
    return linear, {"epoch": 100, "optimizer": {}, "classifier": {f"module.{k}": v for k, v in linear.state_dict().items()}}


def _moco_v1() -> nn.Module:
    """facebookresearch/moco's MoCo v1 model (fc = one Linear), queue [dim, K]."""
    v1 = nn.Module()
    v1.encoder_q, v1.encoder_k = torchvision.models.resnet18(num_classes=16), torchvision.models.resnet18(num_classes=16)
    v1.register_buffer("queue", torch.randn(16, 64))
    v1.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    return _randomise(v1, 9)


def test_ft_pycontrast_file_with_its_classifier_file_and_moco_v1_file(tmp_path, capsys):
    model, ema, memory, raw = _pycontrast()
    path = _save(tmp_path, "current.pth", raw)
    # FT's main_linear.py saves only the classifier (DDP-wrapped): imported beside the pre-training file
    linear, linear_raw = _ft_linear()
    probe = _save(tmp_path, "ckpt_epoch_100.pth", linear_raw)
    with pytest.raises(CheckpointError, match="--classifier"):
        import_checkpoint(probe, "ft", tmp_path / "x.pt", log=lambda s: None)
    out = tmp_path / "ft.pt"
    assert main(["import", str(path), "--from", "ft", "--classifier", str(probe), "--out", str(out), *FT_PYCONTRAST]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["classifier"]["num_classes"] == 10 and ckpt["imported"]["classifier_file"]["epoch"] == 100
    model.eval()
    top1, expected = _stored_classifier_top1(out, lambda x: linear(model.encoder(x)), capsys)
    assert top1 == pytest.approx(expected, abs=1e-6)
    method = assemble.method(config_from_dict(yaml.safe_load(ckpt["config"])), 10)
    method.load_state_dict(ckpt["method"], strict=True)
    method.eval()
    assert ckpt["recipe"] == "imagenet/mocov2_ft_r50_200ep" and method.feature_transform is not None
    with torch.no_grad():
        _close(method.projector(method.backbone(X)), model.head(model.encoder(X)))
        _close(method.key_encoder(X), ema.head(ema.encoder(X)))
    assert torch.equal(method.queue.queue, memory) and int(method.queue.ptr) == 0

    # facebookresearch/moco's MoCo v1 file (fc = one Linear), the baseline FT's table links
    v1 = _moco_v1()
    path = _save(tmp_path, "moco_v1_200ep_pretrain.pth.tar", {"epoch": 200, "arch": "resnet18",
                                                              "state_dict": _ddp(v1), "optimizer": {}})
    method, _, summary, _ = _imported(path, "ft", tmp_path, "method.queue_size=64", "method.proj_out_dim=16")
    assert summary["recipe"] == "imagenet/mocov1_r50_200ep"
    with torch.no_grad():
        _close(method.projector(method.backbone(X)), v1.encoder_q(X))


# -------------------------------------------------------------------------------------------------- MCL


class _Block(nn.Module):
    """MCL's CIFAR BasicBlock (torchvision's shape: conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def _stage(cin: int, cout: int, stride: int, blocks: int = 5) -> nn.Sequential:
    return nn.Sequential(_Block(cin, cout, stride), *[_Block(cout, cout, 1) for _ in range(blocks - 1)])


class _ResNet32(nn.Module):
    """MCL's models/resnet.py ResNet (resnet32: 3 stages of 5 blocks) with its ``classifier``."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = _stage(16, 16, 1), _stage(16, 32, 2), _stage(32, 64, 2)
        self.classifier = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x))))))
        return self.classifier(x.mean((2, 3)))


class _ResNet32Shared(nn.Module):
    """MCL's ResNet_b: a shared conv1 / bn1 / layer1, then layer2_i, layer3_i, classifier_i per peer."""

    def __init__(self, classes: int, peers: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.layer1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), _stage(16, 16, 1)
        self.peers = peers
        for i in range(peers):
            setattr(self, f"layer2_{i}", _stage(16, 32, 2))
            setattr(self, f"layer3_{i}", _stage(32, 64, 2))
            setattr(self, f"classifier_{i}", nn.Linear(64, classes))

    def forward(self, x):
        trunk = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return [getattr(self, f"classifier_{i}")(getattr(self, f"layer3_{i}")(getattr(self, f"layer2_{i}")(trunk))
                                                 .mean((2, 3))) for i in range(self.peers)]


def test_mcl_cifar_cohorts_independent_and_on_a_shared_trunk(tmp_path, capsys):
    independent = nn.Module()
    independent.module_list = nn.ModuleList([_ResNet32(100), _ResNet32(100)])
    _randomise(independent, 10)
    path = _save(tmp_path, "resnet32.pth.tar", {"net": independent.state_dict(), "acc": 70.0, "epoch": 299,
                                                "optimizer": {}})
    method, ckpt, summary, lines = _imported(path, "mcl", tmp_path)
    assert summary["recipe"] == "cifar100/mcl_x2_r32_300ep" and ckpt["epoch"] == 300
    with torch.no_grad():
        scores = method.predict(X)
        for i in range(2):
            _close(scores[f"peer{i}"], independent.module_list[i](X))
    assert any("projection heads" in line for line in lines)

    shared = _randomise(_ResNet32Shared(100, 4), 11)
    path = _save(tmp_path, "resnet32_b.pth.tar", {"net": shared.state_dict(), "acc": 71.0, "epoch": 299})
    out = tmp_path / "x4.pt"
    assert main(["import", str(path), "--from", "mcl", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]))
    assert cfg.model.peers == 4 and cfg.model.shared_until == "upstream"
    method = assemble.method(cfg, 100)
    method.load_state_dict(ckpt["method"])
    with torch.no_grad():
        expected = shared.eval()(X)
        scores = method.eval().predict(X)
        for i in range(4):
            _close(scores[f"peer{i}"], expected[i])


# ------------------------------------------------------------------------------------------------- errors


def test_an_unknown_key_is_named_and_nothing_is_written(tmp_path):
    up = _randomise(_MoCoV3(partial(torchvision.models.resnet18, zero_init_residual=True), "fc", 512), 12)
    state = {**_ddp(up), "module.base_encoder.extra_head.weight": torch.zeros(3)}
    path = _save(tmp_path, "odd.pth.tar", {"epoch": 100, "arch": "resnet18", "state_dict": state})
    with pytest.raises(CheckpointError, match="'base_encoder.extra_head.weight'") as caught:
        import_checkpoint(path, "mocov3", tmp_path / "x.pt", overrides=MOCOV3_HEADS, log=lambda s: None)
    assert "cannot be placed" in str(caught.value) and not (tmp_path / "x.pt").exists()
    # a file of another project names what it found
    with pytest.raises(CheckpointError, match="encoder_q"):
        import_checkpoint(path, "caco", tmp_path / "x.pt", log=lambda s: None)


def test_a_wrong_from_lists_the_valid_projects(tmp_path, capsys):
    with pytest.raises(ConfigError, match="Did you mean 'mocov3'") as caught:
        import_checkpoint(tmp_path / "any.pth", "mocov4", tmp_path / "x.pt")
    assert all(name in str(caught.value) for name in IMPORTERS)
    assert main(["import", str(tmp_path / "any.pth"), "--from", "simclr", "--out", str(tmp_path / "x.pt")]) == 2
    assert "mocov3 (facebookresearch/moco-v3)" in capsys.readouterr().err


def test_every_recipe_an_importer_picks_exists():
    from contrastlab.config.load import recipe_names
    from contrastlab.importers import barlowtwins, caco, ccrop, jointcrop, mocov3, vicreg

    picks = [*mocov3.MoCoV3Importer.resnet_recipes.values(), *mocov3.MoCoV3Importer.vit_recipes.values(),
             *jointcrop.JointCropImporter.resnet_recipes.values(), *caco.RECIPES.values(), *barlowtwins.RECIPES.values(),
             *ccrop.LINEAR_RECIPES.values(), "imagenet/mocov1_ccrop_r50_100ep", "imagenet/mocov2_ccrop_r50_100ep",
             *(f"cifar10/{m}_ccrop_r18_500ep" for m in ("mocov2", "simclr", "byol", "simsiam")),
             *(f"imagenet/mocov{v}{ft}_r50_200ep" for v in (1, 2) for ft in ("", "_ft")),
             *(f"cifar100/mcl_x{m}_{a}_300ep" for m in (2, 4) for a in ("r32", "r56", "r110")),
             *(f"imagenet/mcl_x{m}_{a}_90ep" for m in (2, 4) for a in ("r18", "r34")),
             "imagenet/moco_mcl_x2_r18_200ep", vicreg.RECIPE]
    assert sorted(set(picks) - set(recipe_names())) == []
    assert mocov3.recipe_for_epochs(jointcrop.JointCropImporter.resnet_recipes, 250).endswith("_300ep")
    assert mocov3.recipe_for_epochs(mocov3.MoCoV3Importer.resnet_recipes, None).endswith("_100ep")
    from contrastlab.importers.base import Released
    from contrastlab.importers.mcl import RECIPE_NAMES, MCLImporter

    for arch in RECIPE_NAMES:  # every architecture gets a recipe that exists (its own, or its dataset's ResNet one)
        for peers, layout in ((2, "independent"), (3, "shared"), (4, "shared")):
            info = {"peers": peers, "imagenet": arch in ("resnet18", "resnet34")}
            assert MCLImporter().default_recipe(Released(Path("x"), {}, {}, "supervised", layout, None, arch,
                                                         info)) in recipe_names()


# ----------------------------------------------------------------------------------------------- VICReg


class _VICRegResNet50(torchvision.models.ResNet):
    """facebookresearch/vicreg resnet.py's resnet50: torchvision's names, no fc, a ConstantPad2d(1) before a first
    convolution of padding 2, zero-initialised last BatchNorms of the residual branches."""

    def __init__(self) -> None:
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], zero_init_residual=True)
        del self.fc
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1.padding = (2, 2)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class _VICReg(nn.Module):
    """main_vicreg.py's VICReg: backbone and Projector (Linear with bias, BN, ReLU per hidden layer; last Linear
    without bias)."""

    def __init__(self, hidden: int = 32, out: int = 16) -> None:
        super().__init__()
        self.backbone = _VICRegResNet50()
        self.projector = nn.Sequential(nn.Linear(2048, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
                                       nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
                                       nn.Linear(hidden, out, bias=False))


VICREG_HEADS = ["method.proj_hidden_dim=32", "method.proj_out_dim=16"]


def _vicreg_case():
    return {"epoch": 1000, "model": _ddp(_randomise(_VICReg(), 30)), "optimizer": {}}, VICREG_HEADS, None


def test_vicreg_full_checkpoint_and_backbone_file(tmp_path):
    """resnet50_fullckpt.pth (the training checkpoint) and resnet50.pth (the backbone's state dict): the same
    backbone features, and the same expander outputs with the hidden biases folded into the BatchNorms, in
    evaluation and in training mode."""
    up = _randomise(_VICReg(), 31)
    path = _save(tmp_path, "resnet50_fullckpt.pth", {"epoch": 1000, "model": _ddp(up),
                                                     "optimizer": {"state": {}, "param_groups": []}})
    method, ckpt, summary, lines = _imported(path, "vicreg", tmp_path, *VICREG_HEADS)
    assert summary["recipe"] == "imagenet/vicreg_r50_1000ep" and ckpt["epoch"] == 1000
    assert any("'optimizer': not carried over" in line for line in lines)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(method.backbone(x), up.backbone(x))
        _close(method.projector(method.backbone(x)), up.projector(up.backbone(x)))
        method.projector.double().train(), up.projector.double().train()  # float64: BN on 4 rows amplifies rounding
        feats = up.backbone(x).double()
        torch.testing.assert_close(method.projector(feats), up.projector(feats), rtol=1e-9, atol=1e-9)

    path = _save(tmp_path, "resnet50.pth", up.backbone.state_dict())
    method, ckpt, summary, _ = _imported(path, "vicreg", tmp_path, *VICREG_HEADS)
    assert (ckpt["imported"]["kind"], ckpt["epoch"]) == ("backbone", 1000)  # no epoch in the file: the recipe's
    with torch.no_grad():
        _close(method.backbone(X), up.eval().backbone(X))
    assert list(ckpt["imported"]["initial"].values()) == [len([k for k in ckpt["method"] if k.startswith("projector.")])]


# ----------------------------------------------------------- MCL's WRN, ShuffleNetV2 and HCGNet cohorts
# Written from winycg/MCL models/wrn.py, shufflenetv2.py and hcgnet.py: the modules under their released names, the
# forward passes as released (WRN's shortcut on the pre-activated input, ShuffleNetV2's numbered conv/bn of a unit,
# HCGNet's gates with sum-pooling as global_pool * H * W).


class _Chain(nn.Module):
    """Modules registered under the released names and run in order, with functions (ReLU, pooling) between."""

    def __init__(self, *steps) -> None:
        super().__init__()
        self.steps = [s[0] if isinstance(s, tuple) else s for s in steps]
        for s in steps:
            if isinstance(s, tuple):
                self.add_module(*s)

    def forward(self, x):
        for s in self.steps:
            x = getattr(self, s)(x) if isinstance(s, str) else s(x)
        return x


def _bn_conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> dict:
    return {"bn": nn.BatchNorm2d(cout), "conv": nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), groups=groups,
                                                           dilation=dilation, bias=False)}


class _WRNBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return out + (x if self.convShortcut is None else self.convShortcut(a))


def _wrn_group(n: int, cin: int, cout: int, stride: int) -> nn.Module:
    return _Chain(("layer", nn.Sequential(*[_WRNBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                             for i in range(n)])))


def _shuffle(x):
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's DownBlock (conv1-5 / bn1-5) or BasicBlock (conv1-3 / bn1-3 on the second half)."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        mid = cout // 2
        shapes = ([(cin, cin, 3, 2, cin), (cin, mid, 1, 1, 1), (cin, mid, 1, 1, 1), (mid, mid, 3, 2, mid),
                   (mid, mid, 1, 1, 1)] if down else [(mid, mid, 1, 1, 1), (mid, mid, 3, 1, mid), (mid, mid, 1, 1, 1)])
        for k, (a, b, size, stride, groups) in enumerate(shapes, 1):
            setattr(self, f"conv{k}", nn.Conv2d(a, b, size, stride, size // 2, groups=groups, bias=False))
            setattr(self, f"bn{k}", nn.BatchNorm2d(b))
        self.down = down

    def forward(self, x):
        f = {k: (lambda t, k=k: getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(t))) for k in range(1, 6)}
        if self.down:
            left = torch.relu(f[2](f[1](x)))
            right = torch.relu(f[5](f[4](torch.relu(f[3](x)))))
            return _shuffle(torch.cat([left, right], 1))
        keep, rest = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
        return _shuffle(torch.cat([keep, torch.relu(f[3](f[2](torch.relu(f[1](rest)))))], 1))


def _shuffle_stage(cin: int, cout: int, units: int) -> nn.Sequential:
    return nn.Sequential(_ShuffleUnit(cin, cout, True), *[_ShuffleUnit(cout, cout, False) for _ in range(units)])


class _BasicConv(nn.Module):  # HCGNet's BasicConv: norm, relu, conv
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation=dilation, groups=groups, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.norm(x)))


class _HCGUnit(nn.Module):
    """HCGNet's _SMG (dense: concatenated to its input) or _Transition, with the released gate."""

    def __init__(self, cin: int, cout: int, transition: bool) -> None:
        super().__init__()
        forget = reduction = 4 if transition else 2
        if transition:
            mid = cin - (cin - cout) // 2
            self.conv1_1x1, self.conv2_3x3 = _BasicConv(cin, mid, 1), _BasicConv(mid, cout, 3, stride=2)
        else:
            self.conv1_1x1, self.conv2_3x3 = _BasicConv(cin, 4 * cout, 1), _BasicConv(4 * cout, cout, 3, groups=4)
        c = cout
        self.conv_3x3, self.conv_5x5 = _BasicConv(c, c, 3, groups=c), _BasicConv(c, c, 3, groups=c, dilation=2)
        self.global_context3x3, self.global_context5x5 = nn.Conv2d(c, 1, 1), nn.Conv2d(c, 1, 1)
        self.fcall, self.bn_attention = nn.Conv2d(2 * c, 2 * c // reduction, 1), nn.BatchNorm1d(2 * c // reduction)
        self.fc3x3, self.fc5x5 = nn.Conv2d(2 * c // reduction, c, 1), nn.Conv2d(2 * c // reduction, c, 1)
        self.global_forget_context, self.bn_forget = nn.Conv2d(c, 1, 1), nn.BatchNorm1d(c // forget)
        self.fc1, self.fc2 = nn.Conv2d(c, c // forget, 1), nn.Conv2d(c // forget, c, 1)
        self.transition = transition

    def forward(self, x):
        dense = x
        x = self.conv2_3x3(self.conv1_1x1(x))
        b, c, h, w = x.shape

        def pool(t, scorer):
            weights = torch.softmax(scorer(t).flatten(1), 1).reshape(b, 1, h, w)
            return nn.functional.adaptive_avg_pool2d(t * weights, 1) * h * w

        keep = torch.sigmoid(self.fc2(torch.tanh(self.bn_forget(self.fc1(pool(x, self.global_forget_context))
                                                                .flatten(1)))[:, :, None, None]))
        x3, x5 = pool(self.conv_3x3(x), self.global_context3x3), pool(self.conv_5x5(x), self.global_context5x5)
        att = torch.tanh(self.bn_attention(self.fcall(torch.cat([x3, x5], 1)).flatten(1)))[:, :, None, None]
        weights = torch.softmax(torch.stack([self.fc3x3(att).flatten(1), self.fc5x5(att).flatten(1)], 1), 1)
        out = x * keep + weights[:, 0].reshape(b, c, 1, 1) * x3 + weights[:, 1].reshape(b, c, 1, 1) * x5
        return out if self.transition else torch.cat([dense, out], 1)


def _hybrid(cin: int, growth: int, count: int = 8) -> nn.Sequential:
    from collections import OrderedDict
    return nn.Sequential(OrderedDict((f"SMG{i + 1}", _HCGUnit(cin + growth * i, growth, False)) for i in range(count)))


def _pool(x):
    return torch.relu(x).mean((2, 3))


def _upstream_mcl(arch: str, peers: int, classes: int = 100) -> nn.Module:
    """MCL's ``<Net>_n`` (independent networks in ``module_list``) or ``<Net>_b`` (branches on a shared trunk)."""
    from collections import OrderedDict
    if arch == "resnet18":  # models/resnet_imagenet.py: torchvision's names; ResNet_b shares conv1 through layer2
        net = torchvision.models.resnet18(num_classes=classes)
        trunk = [(n, lambda n=n: getattr(net, n)) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")]
        branch = [("layer3", lambda: copy.deepcopy(net.layer3)), ("layer4", lambda: copy.deepcopy(net.layer4)),
                  _pool, ("fc", lambda: copy.deepcopy(net.fc))]
        shared_names = {"fc": "classifier_"}
    elif arch.startswith("wrn"):
        depth, k = (int(v) for v in arch.split("_")[1:])
        n, w = (depth - 4) // 6, (16 * k, 32 * k, 64 * k)
        trunk = [("conv1", lambda: nn.Conv2d(3, 16, 3, 1, 1, bias=False)), ("block1", lambda: _wrn_group(n, 16, w[0], 1))]
        branch = [("block2", lambda: _wrn_group(n, w[0], w[1], 2)), ("block3", lambda: _wrn_group(n, w[1], w[2], 2)),
                  ("bn1", lambda: nn.BatchNorm2d(w[2])), _pool, ("fc", lambda: nn.Linear(w[2], classes))]
        shared_names = {"bn1": "bn_", "fc": "classifier_"}
    elif arch.startswith("shufflenet"):
        w = (48, 96, 192) if arch.endswith("05x") else (116, 232, 464)
        trunk = [("conv1", lambda: nn.Conv2d(3, 24, 3, 1, 1, bias=False)), ("bn1", lambda: nn.BatchNorm2d(24)),
                 torch.relu, ("layer1", lambda: _shuffle_stage(24, w[0], 3))]
        branch = [("layer2", lambda: _shuffle_stage(w[0], w[1], 7)), ("layer3", lambda: _shuffle_stage(w[1], w[2], 3)),
                  ("conv2", lambda: nn.Conv2d(w[2], 1024, 1, bias=False)), ("bn2", lambda: nn.BatchNorm2d(1024)),
                  _pool, ("linear", lambda: nn.Linear(1024, classes))]
        shared_names = {"conv2": "conv2_", "bn2": "bn2_", "linear": "classifier_"}
    else:  # HCGNet: growth rates, 8 SMG modules per hybrid block, transitions halving the channels
        g = (12, 24, 36) if arch.endswith("a1") else (24, 36, 64)
        c1 = (2 * g[0] + 8 * g[0]) // 2
        c2 = (c1 + 8 * g[1]) // 2
        c3 = c2 + 8 * g[2]
        stem = [("conv0", lambda: nn.Conv2d(3, 2 * g[0], 3, 1, 1, bias=False)),
                ("HybridBlock1", lambda: _hybrid(2 * g[0], g[0])), ("Transition1", lambda: _HCGUnit(10 * g[0], c1, True))]
        later = [("HybridBlock2", lambda: _hybrid(c1, g[1])), ("Transition2", lambda: _HCGUnit(c1 + 8 * g[1], c2, True)),
                 ("HybridBlock3", lambda: _hybrid(c2, g[2])), ("norm5", lambda: nn.BatchNorm2d(c3))]
        if peers == 2:  # the single network holds every layer in one Sequential, ``features``
            trunk = [("features", lambda: nn.Sequential(OrderedDict((n, f()) for n, f in stem + later)))]
            branch = [_pool, ("classifier", lambda: nn.Linear(c3, classes))]
        else:
            trunk = [("features", lambda: nn.Sequential(OrderedDict((n, f()) for n, f in stem)))]
            branch = [*later, _pool, ("linear", lambda: nn.Linear(c3, classes))]
        shared_names = {"HybridBlock2": "layer2_HybridBlock", "Transition2": "layer2_Transition",
                        "HybridBlock3": "layer3_HybridBlock", "norm5": "norm5_", "linear": "linear_"}

    def made(steps, suffix=None):
        return [s if not isinstance(s, tuple) else
                (s[0] if suffix is None else f"{shared_names.get(s[0], s[0] + '_')}{suffix}", s[1]()) for s in steps]

    if peers == 2:  # (copies of one network: _randomise gives every tensor its own values, and copying is quicker)
        cohort = nn.Module()
        net = _Chain(*made(trunk), *made(branch))
        cohort.module_list = nn.ModuleList([net, copy.deepcopy(net)])
        cohort.forward = lambda x: [net(x) for net in cohort.module_list]
        return _randomise(cohort, 20)
    up = _Chain(*made(trunk))
    first = _Chain(*made(branch, 0))
    branches = [first]
    for i in range(1, peers):  # the same modules under the names of branch i
        branches.append(_Chain(*[s if not isinstance(s, str) else (s[:-1] + str(i), copy.deepcopy(getattr(first, s)))
                                 for s in first.steps]))
    for b in branches:
        for name, module in b.named_children():
            up.add_module(name, module)
    trunk_forward = up.forward
    up.forward = lambda x: [b(trunk_forward(x)) for b in branches]
    return _randomise(up, 21)


@pytest.mark.parametrize("arch,peers", [("resnet18", 4), ("resnet18", 2), ("wrn_16_2", 4), ("wrn_40_2", 2), ("wrn_28_4", 2), ("shufflenetv2_05x", 4),
                                        ("shufflenetv2_1x", 2), ("hcgnet_a1", 4), ("hcgnet_a2", 2)])
def test_mcl_cohorts_of_every_zoo_architecture(tmp_path, arch, peers):
    """Each family's independent (2 peers) and shared-trunk (4) layout: every peer's logits equal upstream's (and
    the ImageNet ResNets' shared trunk, which ends after layer2)."""
    up = _upstream_mcl(arch, peers)
    raw = {"net": up.state_dict(), "acc": 1.0, "epoch": 9, "optimizer": {}}
    if arch == "wrn_16_2":  # through a file once; the others converted in memory (reading thousands of tensors is slow)
        method, ckpt, _, _ = _imported(_save(tmp_path, f"{arch}.pth.tar", raw), "mcl", tmp_path)
    else:
        converted = convert_released(raw, f"{arch}.pth.tar", "mcl", log=lambda s: None)
        method, ckpt = converted.method.eval(), converted.checkpoint
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]))
    assert (cfg.model.arch, cfg.model.peers, ckpt["epoch"]) == (arch, peers, 10)
    assert cfg.model.shared_until == (None if peers == 2 else "upstream")
    with torch.no_grad():
        expected, scores = up(X), method.predict(X)
        for i in range(peers):
            _close(scores[f"peer{i}"], expected[i])


MOCO_MCL = ["method.proj_out_dim=16", "method.queue_size=64"]


def _moco_mcl() -> nn.Module:
    """moco/builder_mcl.py's model: encoder_q_<i> / encoder_k_<i> (ResNet-18, fc = the projection), queue [M, dim, K]."""
    up, net = nn.Module(), torchvision.models.resnet18(num_classes=16)
    for i in range(2):
        setattr(up, f"encoder_q_{i}", copy.deepcopy(net))
        setattr(up, f"encoder_k_{i}", copy.deepcopy(net))
    up.register_buffer("queue", nn.functional.normalize(torch.randn(2, 16, 64), dim=1))
    up.register_buffer("queue_ptr", torch.tensor([32, 32]))
    return _randomise(up, 22)


def test_moco_mcl_file_per_peer_encoders_and_queues(tmp_path):
    """main_moco_mcl.py (moco/builder_mcl.py): encoder_q_<i> / encoder_k_<i> (ResNet-18, fc = the projection),
    queue [M, dim, K], queue_ptr [M]: every peer's features, projections, keys and queue match."""
    up = _moco_mcl()
    raw = {"epoch": 120, "arch": "resnet18", "state_dict": _ddp(up), "optimizer": {}}
    converted = convert_released(raw, "checkpoint_0119.pth.tar", "mcl", overrides=MOCO_MCL, log=lambda s: None)
    method, ckpt = converted.method.eval(), converted.checkpoint
    assert converted.summary["recipe"] == "imagenet/moco_mcl_x2_r18_200ep" and ckpt["epoch"] == 120
    with torch.no_grad():
        features, keys = method.cohort(X), method.key_encoder(X)
        for i in range(2):
            q, k = getattr(up, f"encoder_q_{i}"), getattr(up, f"encoder_k_{i}")
            _close(features[i], _trunk(q)(X))
            _close(method.projectors[i](features[i]), q(X))
            _close(keys[i], nn.functional.normalize(k(X), dim=1))
            assert torch.equal(method.queues[i].queue, up.queue[i].t()) and int(method.queues[i].ptr) == 32
    _close(method.backbone(X), _trunk(up.encoder_q_0)(X))
    # --mlp registered an MLP under a dotted name beside fc and never ran it: refused, naming a key
    raw["state_dict"]["module.encoder_q_0.fc.0.weight"] = torch.zeros(512, 512)
    with pytest.raises(CheckpointError, match=r"--mlp \('encoder_q_0.fc.0.weight'"):
        convert_released(raw, "mlp.pth.tar", "mcl", log=lambda s: None)


def test_mocov3_deit_format_files_fine_tuned_and_converted():
    """DeiT's fine-tuned ViT (``model`` with its classification head, ``model_ema``, optimizer, scheduler, ``epoch``,
    ``args``): the backbone gives the upstream features and its head, the stored classifier, the fine-tuned network's
    own top-1 (what `eval linear --stored-classifier` reports). convert_to_deit.py's file (the ViT without head):
    recognised as a backbone."""
    from contrastlab.eval.linear import classifier_accuracy
    from contrastlab.importers.mocov3 import MoCoV3Importer

    up = _randomise(_vit_small(16, 10), 24)
    raw = {"model": up.state_dict(), "model_ema": up.state_dict(), "optimizer": {}, "lr_scheduler": {}, "scaler": {},
           "epoch": 99, "args": "Namespace()"}
    converted = convert_released(raw, "checkpoint.pth", "mocov3", overrides=["data.image_size=16"], log=lambda s: None)
    ckpt, backbone = converted.checkpoint, converted.method.eval().backbone
    assert ckpt["recipe"] == "imagenet/mocov3_vit_s_300ep" and ckpt["imported"]["upstream_epoch"] == 100
    assert "not carried over" in ckpt["imported"]["entries"]["model_ema"]
    x = X[:, :, :16, :16]
    with torch.no_grad():
        _close(backbone(x), up.forward_head(up.forward_features(x), pre_logits=True))
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]))
    cfg.data.name, cfg.data.root, cfg.linear.crop_fraction = "demo", None, 1.0
    test = assemble.evaluation_views(cfg, assemble.dataset(cfg, "test"))
    test = torch.utils.data.Subset(test, range(200))
    top1 = classifier_accuracy(backbone, ckpt["classifier"]["weight"], ckpt["classifier"]["bias"], test)["top1"]
    with torch.no_grad():
        images, labels = torch.stack([t[0][0] for t in test]), torch.tensor([t[1] for t in test])
        assert top1 == pytest.approx((up(images).argmax(1) == labels).float().mean().item() * 100, abs=1e-6)

    released = MoCoV3Importer().recognise({"model": {k: v for k, v in raw["model"].items() if not k.startswith("head.")}},
                                          Path("vit-s-300ep-deit.pth"))
    assert (released.kind, released.arch, MoCoV3Importer().classifier(released)) == ("backbone", "vit_small", None)


# ------------------------------------------------------- the import record and the written checkpoint agree
# A file of every layout each registered importer reads, built with the builders above. convert_released holds the
# record to the checkpoint (contrastlab.importers.convert.check_record); the test checks the same independently: the
# classifier the record says it stored is the upstream network's own.


SMALL_QUEUE = ["method.proj_out_dim=16", "method.queue_size=64"]


def _lincls(net: nn.Module, arch: str) -> dict:
    """A ``main_lincls.py`` file (facebookresearch/moco, moco-v3, JointCrop; CaCo's ``linear.py``): the DDP network
    with its classifier under ``state_dict``."""
    return {"epoch": 90, "arch": arch, "state_dict": _ddp(net), "best_acc1": torch.tensor(12.5), "optimizer": {}}


def _head(net: nn.Module, name: str = "fc") -> dict:
    return {"weight": getattr(net, name).weight.detach(), "bias": getattr(net, name).bias.detach()}


def _r18_probe(seed: int) -> nn.Module:
    return _randomise(torchvision.models.resnet18(num_classes=10), seed)


def _mocov3_resnet_case():
    up = _randomise(_MoCoV3(partial(torchvision.models.resnet18, zero_init_residual=True), "fc", 512), 12)
    return {"epoch": 100, "arch": "resnet18", "state_dict": _ddp(up), "optimizer": {}, "scaler": {}}, MOCOV3_HEADS, None


def _mocov3_vit_case():
    up = _randomise(_MoCoV3(partial(_vit_small, 16), "head", 384), 1)
    return {"epoch": 300, "arch": "vit_small", "state_dict": _ddp(up)}, [*MOCOV3_HEADS, "data.image_size=16"], None


def _resnet_lincls_case():
    net = _r18_probe(2)
    return _lincls(net, "resnet18"), MOCOV3_HEADS, _head(net)


def _vit_lincls_case():
    net = _randomise(_vit_small(16, 10), 24)
    return _lincls(net, "vit_small"), ["data.image_size=16"], _head(net, "head")


def _deit_case(tuned: bool):
    net = _randomise(_vit_small(16, 10), 24)
    state = net.state_dict() if tuned else {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    raw = {"model": state, "optimizer": {}, "epoch": 99, **({"model_ema": state, "args": "Namespace()"} if tuned else {})}
    return raw, ["data.image_size=16"], _head(net, "head") if tuned else None


def _caco_case():
    up, bank = _caco()
    return ({"epoch": 200, "arch": "resnet18", "state_dict": _ddp(up), "optimizer": {}, "Memory_Bank": bank}, CACO_HEADS,
            None)


def _caco_lincls_case():
    net = _r18_probe(25)
    return _lincls(net, "resnet18"), CACO_HEADS, _head(net)


def _ccrop_simclr_case():
    net = _resnet("resnet18", 16, True)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), net.fc)
    raw = {"optimizer_state": {}, "simclr_state": _ddp(_randomise(net, 26)), "boxes": torch.rand(4, 4), "epoch": 500}
    return raw, ["method.proj_hidden_dim=512", "method.proj_out_dim=16"], None


def _ccrop_linear_file(arch: str, classes: int, seed: int) -> tuple[nn.Module, dict]:
    """``DDP_linear.py``'s ``best_<cfg>.pth``: its ResNet (CIFAR stem for ResNet-18) with the trained fc."""
    net = _randomise(_resnet(arch, classes, cifar_stem=arch == "resnet18"), seed)
    return net, {"model_state": _ddp(net), "optimizer_state": {}, "acc": 91.5, "epoch": 99}


def _ccrop_linear_case():
    net, raw = _ccrop_linear_file("resnet18", 10, 27)
    return raw, [], _head(net)


def _pycontrast_case(with_probe: bool):
    _, _, _, raw = _pycontrast()
    if not with_probe:
        return raw, FT_PYCONTRAST, None
    linear, probe = _ft_linear()
    return raw, FT_PYCONTRAST, {"weight": linear.weight.detach(), "bias": linear.bias.detach()}, (probe, "ckpt_epoch_100.pth")


def _mcl_independent_case():
    independent = nn.Module()
    independent.module_list = nn.ModuleList([_ResNet32(100), _ResNet32(100)])
    return {"net": _randomise(independent, 10).state_dict(), "acc": 70.0, "epoch": 299, "optimizer": {}}, [], None


def _swav_model() -> nn.Module:
    """facebookresearch/swav src/resnet50.py's model at small widths: the ResNet's layers at the top level (no fc),
    projection_head = Linear (with bias) - BatchNorm1d - ReLU - Linear, prototypes = Linear without bias."""
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.projection_head = nn.Sequential(nn.Linear(512, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32, 16))
    net.prototypes = nn.Linear(16, 10, bias=False)
    return _randomise(net, 28)


SWAV = ["model.arch=resnet18", "method.proj_hidden_dim=32", "method.proj_out_dim=16", "method.num_prototypes=10"]


def _swav_case(with_probe: bool):
    if not with_probe:  # the model zoo's file: the DDP state dict itself
        return _ddp(_swav_model()), SWAV, None
    linear = _randomise(nn.Linear(512, 10), 29)  # eval_linear.py's RegLog.linear, DDP-wrapped
    probe = {"epoch": 100, "state_dict": {"module.linear.weight": linear.weight.detach(),
                                          "module.linear.bias": linear.bias.detach()},
             "optimizer": {}, "scheduler": {}, "best_acc": 75.3}
    raw = {"epoch": 800, "state_dict": _ddp(_swav_model()), "optimizer": {}, "amp": {}}
    return raw, SWAV, {"weight": linear.weight.detach(), "bias": linear.bias.detach()}, (probe, "eval_linear.pth.tar")
def _dino_file(full: bool) -> dict:
    from test_dino import upstream_dino_checkpoint

    return upstream_dino_checkpoint(32, full)[0]


LAYOUT_CASES = {  # importer/description -> (kind, layout) recognised, and the builder of (raw, overrides, classifier)
    "mocov3/resnet pre-training": ("pretrain", "resnet", _mocov3_resnet_case),
    "mocov3/vit pre-training": ("pretrain", "vit", _mocov3_vit_case),
    "mocov3/resnet main_lincls": ("linear", "resnet", _resnet_lincls_case),
    "mocov3/vit main_lincls": ("linear", "vit", _vit_lincls_case),
    "mocov3/deit fine-tuned": ("linear", "deit", partial(_deit_case, True)),
    "mocov3/deit backbone": ("backbone", "deit", partial(_deit_case, False)),
    "jointcrop/resnet pre-training": ("pretrain", "resnet", _mocov3_resnet_case),
    "jointcrop/resnet main_lincls": ("linear", "resnet", _resnet_lincls_case),
    "barlowtwins/main.py": ("pretrain", "main.py", lambda: ({"epoch": 1000, "model": _ddp(_barlow()), "optimizer": {}},
                                                            BARLOW_HEADS, None)),
    "barlowtwins/resnet50.pth": ("backbone", "resnet50.pth", lambda: (_barlow().backbone.state_dict(), BARLOW_HEADS,
                                                                      None)),
    "barlowtwins/evaluate.py": ("linear", "evaluate.py", lambda: (_barlow_probe_file()[1], BARLOW_HEADS,
                                                                  _head(_barlow_probe_file()[0]))),
    "caco/pre-training": ("pretrain", "resnet", _caco_case),
    "caco/linear.py": ("linear", "resnet", _caco_lincls_case),
    "ccrop/moco": ("pretrain", "moco", lambda: ({"optimizer_state": {}, "moco_state": _ddp(_ccrop_moco()),
                                                 "boxes": torch.rand(16, 4), "epoch": 1}, SMALL_QUEUE, None)),
    "ccrop/simclr": ("pretrain", "simclr", _ccrop_simclr_case),
    "ccrop/byol": ("pretrain", "byol", lambda: ({"optimizer_state": {}, "byol_state": _ddp(_ccrop_byol()),
                                                 "boxes": torch.rand(4, 4), "epoch": 500}, CCROP, None)),
    "ccrop/simsiam": ("pretrain", "simsiam", lambda: ({"optimizer_state": {}, "simsiam_state": _ddp(_ccrop_simsiam()),
                                                       "boxes": torch.rand(4, 4), "epoch": 500}, SIMSIAM, None)),
    "ccrop/DDP_linear": ("linear", "linear", _ccrop_linear_case),
    "ft/pycontrast": ("pretrain", "pycontrast", partial(_pycontrast_case, False)),
    "ft/pycontrast with --classifier": ("pretrain", "pycontrast", partial(_pycontrast_case, True)),
    "ft/moco pre-training": ("pretrain", "moco", lambda: ({"epoch": 200, "arch": "resnet18", "state_dict": _ddp(_moco_v1()),
                                                           "optimizer": {}}, SMALL_QUEUE, None)),
    "ft/moco main_lincls": ("linear", "moco", _resnet_lincls_case),
    "mcl/independent": ("supervised", "independent", _mcl_independent_case),
    "mcl/shared": ("supervised", "shared", lambda: ({"net": _randomise(_ResNet32Shared(100, 4), 11).state_dict(),
                                                     "acc": 71.0, "epoch": 299}, [], None)),
    "vicreg/full checkpoint": ("pretrain", "full", _vicreg_case),
    "vicreg/backbone": ("backbone", "backbone", lambda: (_randomise(_VICRegResNet50(), 32).state_dict(), VICREG_HEADS,
                                                         None)),
    "mcl/moco_mcl": ("pretrain", "moco_mcl", lambda: ({"epoch": 120, "arch": "resnet18", "state_dict": _ddp(_moco_mcl()),
                                                       "optimizer": {}}, MOCO_MCL, None)),
    "swav/model zoo": ("pretrain", "resnet", partial(_swav_case, False)),
    "swav/main_swav.py with --classifier": ("pretrain", "resnet", partial(_swav_case, True)),
    "dino/main_dino.py": ("pretrain", "vit", lambda: (_dino_file(True), ["data.image_size=16"], None)),
    "dino/backbone only": ("backbone", "vit", lambda: (_dino_file(False), ["data.image_size=16"], None)),
}


def test_every_registered_importer_has_its_layouts_checked():
    assert sorted({case.split("/")[0] for case in LAYOUT_CASES}) == sorted(IMPORTERS)


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_the_record_and_the_checkpoint_agree_for_every_layout(case):
    """Each layout converts (check_record passes inside convert_released); what the record says went to the classifier
    is the checkpoint's classifier, equal to the upstream network's own, and every key of the method state was either
    placed from the file or kept initial, as the record counts them."""
    source = case.split("/")[0]
    kind, layout, build = LAYOUT_CASES[case]
    raw, overrides, expected, *probe = build()
    converted = convert_released(raw, f"{layout}.pth", source, overrides=overrides, log=lambda s: None,
                                 classifier=probe[0] if probe else None)
    ckpt, record = converted.checkpoint, converted.checkpoint["imported"]
    assert (record["kind"], record["layout"]) == (kind, layout)
    assert record["placed"] + sum(record["initial"].values()) == len(ckpt["method"])
    if expected is None:
        assert "classifier" not in ckpt and not record["elsewhere"]
        return
    assert torch.equal(ckpt["classifier"]["weight"], expected["weight"])
    assert torch.equal(ckpt["classifier"]["bias"], expected["bias"])
    assert ckpt["classifier"]["num_classes"] == expected["weight"].shape[0]
    if probe:  # --classifier FILE: the record names the file; nothing of the pre-training file went elsewhere
        assert record["classifier_file"]["file"] == probe[0][1] and not record["elsewhere"]
    else:
        assert sorted(record["elsewhere"].values()) == ["classifier", "classifier"]


def test_a_record_that_disagrees_with_the_checkpoint_is_a_bug_and_nothing_is_converted(monkeypatch):
    """check_record raises where the importer drops what the record places: a linear file's classifier not written,
    or a key of the method state missing from the checkpoint."""
    from contrastlab.importers.caco import CaCoImporter

    raw, overrides, _ = _caco_lincls_case()
    monkeypatch.setattr(CaCoImporter, "classifier", lambda self, released: None)
    with pytest.raises(RuntimeError, match=r"disagree on 2 key\(s\): 'fc.weight -> classifier', 'fc.bias -> classifier'"):
        convert_released(raw, "linear.pth", "caco", overrides=overrides, log=lambda s: None)
    monkeypatch.undo()

    raw, overrides, _ = _caco_case()
    monkeypatch.setattr(CaCoImporter, "extras", lambda self, released, cfg: {"method": {}})  # an extra that clobbers
    with pytest.raises(RuntimeError, match=r"'projector.0.weight'.*bug in the maple-research-lab/CaCo importer"):
        convert_released(raw, "checkpoint_0200.pth.tar", "caco", overrides=overrides, log=lambda s: None)


@pytest.mark.parametrize("source,arch,classes,layout", [
    ("ccrop", "resnet18", 10, "DDP_linear.py, CIFAR-10 ResNet-18"),
    ("ccrop", "resnet50", 1000, "DDP_linear.py, ImageNet ResNet-50"),
    ("ft", "resnet50", 1000, "facebookresearch/moco main_lincls.py, ResNet-50"),
])
def test_released_linear_probe_files_keep_their_classifier_for_eval(tmp_path, capsys, source, arch, classes, layout):
    """ContrastiveCrop's DDP_linear.py files and the MoCo main_lincls.py files FT compares with: the import stores the
    file's fc, and `eval linear --stored-classifier` reports the accuracy of the upstream network itself (its fc on
    its own features) on the same evaluation views."""
    if source == "ccrop":
        net, raw = _ccrop_linear_file(arch, classes, 28)
    else:
        net = _randomise(torchvision.models.resnet50(), 29)
        raw = {**_lincls(net, "resnet50"), "epoch": 100}
    path = _save(tmp_path, "best_linear.pth", raw)
    out = tmp_path / "lin.pt"
    assert main(["import", str(path), "--from", source, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert torch.equal(ckpt["classifier"]["weight"], net.fc.weight) and torch.equal(ckpt["classifier"]["bias"], net.fc.bias)
    assert ckpt["classifier"]["num_classes"] == classes and ckpt["imported"]["kind"] == "linear"
    top1, expected = _stored_classifier_top1(out, net, capsys)
    assert top1 == pytest.approx(expected, abs=1e-6), layout
