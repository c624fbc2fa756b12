"""Recipes named after a published row train what produced it: each setting checked through the resolved config.

The expected values are read from the upstream commands and configs cited in each test (moco-v3 CONFIG.md,
ContrastiveCrop ``configs/``, FT's ``main_linear.py`` and README, MCL's scripts, DeiT's ``main.py``), never
from the recipes themselves.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import yaml

from contrastlab.config.derived import derive
from contrastlab.config.load import load_config, recipe_names, recipe_path
from contrastlab.engine.schedules import epoch_learning_rate
from contrastlab.errors import ConfigError
from contrastlab.eval.linear import _epoch_lr
from contrastlab.objectives import logit_distillation

EPOCHS_IN_NAME = re.compile(r"_(\d+)ep(?:_|$)")


@functools.cache
def _resolved(recipe: str):
    """``load_config(recipe)``, once per recipe (the tests read it, never change it)."""
    return load_config(recipe)


def _epochs(recipe: str) -> int:
    """The epochs a recipe resolves to: pre-training, or the protocol of a linear-probe or fine-tuning recipe."""
    cfg = _resolved(recipe)
    if recipe.startswith("linear/"):
        return cfg.linear.epochs
    if recipe.startswith("finetune/"):
        return cfg.finetune.epochs
    return cfg.train.epochs


def test_every_recipe_named_n_epochs_resolves_to_n_epochs() -> None:
    """``<...>_<N>ep[_...]`` in a recipe's name is a promise (the MoCo v3 ViT recipes once inherited 100 of 300)."""
    named = {name: int(m.group(1)) for name in recipe_names()
             if (m := EPOCHS_IN_NAME.search(name.rsplit("/", 1)[-1]))}
    assert len(named) > 100
    resolved = {name: _epochs(name) for name in named}
    wrong = {name: (n, resolved[name]) for name, n in named.items() if resolved[name] != n}
    assert not wrong, f"recipe: (epochs in the name, epochs resolved): {wrong}"


def _chain_text(recipe: str) -> str:
    """The text of a recipe file and of every file it inherits from."""
    texts, name = [], recipe
    while name:
        path = recipe_path(name)
        texts.append(path.read_text())
        name = (yaml.safe_load(path.read_text()) or {}).get("base")
    return "\n".join(texts)


# ContrastiveCrop (xyupeng/ContrastiveCrop) rows: configs/small/{cifar10,cifar100}/{moco,simclr,byol,simsiam}_{rcrop,
# ccrop}.py, moco_simccrop.py, configs/small/{stl10,tiny200}/simclr_{rcrop,ccrop}.py; configs/IN1K, IN200 mocov{1,2}.
CCROP_SMALL = ([f"{d}/{m}_{c}r18_500ep" for d in ("cifar10", "cifar100") for m in ("simclr", "mocov2", "byol", "simsiam")
                for c in ("", "ccrop_")] + [f"{d}/mocov2_simccrop_r18_500ep" for d in ("cifar10", "cifar100")]
               + [f"{d}/simclr_{c}r18_500ep" for d in ("stl10", "tiny_imagenet") for c in ("", "ccrop_")])
CCROP_IMAGENET = [f"{d}/mocov{v}_{c}r50_100ep" for d in ("imagenet", "imagenet200") for v in (1, 2) for c in ("", "ccrop_")]


def _ccrop_lr(cfg_type: str, lr: float, epoch: int, epochs: int, decay_rate: float, decay_steps=()) -> float:
    """ContrastiveCrop utils/util.py ``_get_lr`` at the 1-based ``epoch`` (start_step 1, no warm-up)."""
    if cfg_type == "Cosine":
        eta_min = lr * decay_rate
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
    return lr * decay_rate ** sum(epoch > s for s in decay_steps)  # MultiStep


def _our_epoch_lrs(cfg) -> list[float]:
    """The rate of each epoch as the trainer computes it with ``train.schedule_unit=epoch``."""
    assert cfg.train.schedule_unit == "epoch"
    d = derive(cfg, world_size=1, dataset_len=100_000)
    return [epoch_learning_rate(e, base_lr=d.lr, total_epochs=cfg.train.epochs, warmup_epochs=cfg.optim.warmup_epochs,
                                schedule=cfg.optim.schedule, final_lr=d.final_lr,
                                milestones=tuple(cfg.optim.milestones), gamma=cfg.optim.gamma)
            for e in range(cfg.train.epochs)]


def test_contrastive_crop_small_recipes_decay_to_a_tenth_once_per_epoch() -> None:
    """Cosine with decay_rate 0.1 stepped once per epoch (issue 18, item 2); nothing else is stepped per epoch
    (the released MoCo and BYOL momenta are constant); SyncBN where the released script converts to it (item 4)."""
    for name in CCROP_SMALL:
        cfg = load_config(name)
        expected = [_ccrop_lr("Cosine", 0.5, e, 500, 0.1) for e in range(1, 501)]
        assert _our_epoch_lrs(cfg) == pytest.approx(expected, rel=1e-12), name
        assert cfg.train.ema_schedule == "constant", name
        moco = cfg.method.name == "moco"
        assert cfg.model.sync_bn is (not moco), name  # DDP_{simclr,byol,simsiam}_ccrop.py: convert_sync_batchnorm
        assert cfg.method.params.get("shuffle_bn", False) is moco, name  # DDP_moco_ccrop.py: shuffle BN instead
    cfg = load_config(CCROP_SMALL[0], ["optim.lr=1.0"])  # the floor follows an lr override
    assert _our_epoch_lrs(cfg)[-1] == pytest.approx(_ccrop_lr("Cosine", 1.0, 500, 500, 0.1))
    with pytest.raises(ConfigError, match="final_lr_ratio"):
        derive(load_config(CCROP_SMALL[0], ["optim.final_lr=0.01"]), world_size=1, dataset_len=1000)


def test_contrastive_crop_imagenet_recipes_keep_the_released_schedules() -> None:
    """MoCo v2: cosine to 0 per epoch; MoCo v1: MultiStep [60, 80] with decay_rate 0, i.e. lr 0 from epoch 61
    (issue 18, item 9: the published MoCo v1 rows were trained so)."""
    for name in CCROP_IMAGENET:
        cfg = load_config(name)
        if "mocov1" in name:
            expected = [_ccrop_lr("MultiStep", 0.03, e, 100, 0.0, (60, 80)) for e in range(1, 101)]
            assert expected[59] == 0.03 and expected[60] == 0.0
        else:
            expected = [_ccrop_lr("Cosine", 0.03, e, 100, 0.0) for e in range(1, 101)]
        assert _our_epoch_lrs(cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15), name
        assert cfg.train.ema_schedule == "constant" and cfg.train.ema_momentum == 0.999, name


FT_ROWS = {"imagenet/mocov2_ft_r50_200ep": "linear/ft_imagenet_r50_100ep",
           "imagenet/mocov1_ft_r50_200ep": "linear/ft_imagenet_r50_100ep",
           "imagenet100/mocov1_ft_r50_200ep": "linear/ft_imagenet100_r50_60ep",
           "imagenet100/mocov2_ft_r50_200ep": "linear/ft_imagenet100_r50_60ep"}


def _ft_linear_lr(epoch: int, decay_epochs=(60, 80)) -> float:
    """FT learning/base_trainer.py adjust_learning_rate (no --cosine) at the 1-based ``epoch``, lr 30."""
    return 30.0 * 0.1 ** sum(epoch > e for e in decay_epochs)


def test_feature_transformation_rows_use_fts_linear_probe() -> None:
    """FT's main_linear.py: RandomResizedCrop scale (0.2, 1) (--crop), lr 30, wd 0; IN-1K 100 epochs with x0.1
    after 60 and 80; IN-100 its defaults, 60 epochs, so the decay never fires (issue 18, item 3)."""
    for pretrain, probe in FT_ROWS.items():
        ours, protocol = load_config(pretrain).linear, load_config(probe).linear
        assert ours == protocol, pretrain
        assert (ours.scale, ours.weight_decay, ours.momentum, ours.crop_fraction) == ([0.2, 1.0], 0.0, 0.9, 0.875)
        epochs = 60 if pretrain.startswith("imagenet100/") else 100
        assert ours.epochs == epochs
        assert [_epoch_lr(ours, e) for e in range(epochs)] == pytest.approx(
            [_ft_linear_lr(e) for e in range(1, epochs + 1)])
    # FT's pre-training cosine (PyContrast): once per epoch, down to 0.001 x the peak
    for name in ("imagenet/mocov2_ft_r50_200ep", "imagenet100/mocov2_ft_r50_200ep"):
        lrs = _our_epoch_lrs(load_config(name))
        assert lrs[0] == pytest.approx(0.03) and lrs[-1] > 0.03 * 1e-3 and lrs[-1] == pytest.approx(
            0.03e-3 + (0.03 - 0.03e-3) * (1 + math.cos(math.pi * 199 / 200)) / 2)


def test_bf16_recipes_say_so_where_the_release_trained_in_fp32() -> None:
    """Every recipe that trains in bf16 states it as a difference from the release in its own file or a base it
    inherits (issue 18, item 5)."""
    for name in recipe_names():
        if _resolved(name).train.precision == "bf16":
            text = _chain_text(name)
            assert re.search(r"^#.*\bbf16\b", text, re.MULTILINE), f"{name}: no comment on bf16"


KD_RECIPES = {  # recipe -> (peers distilled, teacher detached) in the released script
    **{f"cifar100/mcl_x4_kd_{a}_300ep": ((3,), True)  # main_cifar.py: only logits[-1] when --number-net 4
       for a in ("wrn16_2", "wrn40_2", "wrn28_4", "shufflev2_1x", "hcgnet_a2")},
    "imagenet/mcl_x4_kd_r18_90ep": ((3,), False),  # main_imagenet.py: logits[-1], teacher not detached
}


def test_mcl_kd_recipes_distil_as_released() -> None:
    """Which peers receive a logit-distillation gradient, against a hand-written KL (issue 18, item 8)."""
    temperature = 3.0
    for name, (students, detached) in KD_RECIPES.items():
        cfg = load_config(name)
        params = cfg.method.params
        assert params["logit_distill"] and cfg.model.peers == 4
        g = torch.Generator().manual_seed(0)
        logits = [torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
        out = logit_distillation(logits, temperature=temperature, targets=params["distill_targets"],
                                 detach_teacher=params.get("distill_detach_teacher", True))
        grads = torch.autograd.grad(out.loss, logits)
        # the released loss: T^2 * KL(softmax(e / T) || softmax(z / T)), batch mean, e the ensemble mean
        twins = [z.detach().clone().requires_grad_(True) for z in logits]
        teacher = sum(twins) / 4
        if detached:
            teacher = teacher.detach()
        p = torch.softmax(teacher / temperature, dim=1)
        expected = sum((p * (p.log() - torch.log_softmax(twins[s] / temperature, dim=1))).sum(1).mean()
                       * temperature ** 2 for s in students)
        expected_grads = torch.autograd.grad(expected, twins, allow_unused=True)
        for peer in range(4):
            want = expected_grads[peer] if expected_grads[peer] is not None else torch.zeros_like(logits[peer])
            torch.testing.assert_close(grads[peer], want)
            assert bool(grads[peer].abs().sum() > 0) == (peer in students or not detached), (name, peer)


def test_byol_rows_start_the_target_from_its_own_initialisation() -> None:
    """ContrastiveCrop's BYOL builds the target with a second build_model call and never copies the online weights
    (issue 18, item 9); the library default copies them (BYOL's algorithm 1)."""
    from contrastlab import assemble
    from contrastlab.methods import BYOL

    for name in ("cifar10/byol_r18_500ep", "cifar100/byol_ccrop_r18_500ep"):
        assert load_config(name).method.params["target_init"] == "independent", name
    pairs = {}
    for init in ("independent", "copy"):
        torch.manual_seed(0)
        method = assemble.method(load_config("cifar10/byol_r18_500ep", [f"method.target_init={init}"]), 10)
        online = list(method.backbone.parameters()) + list(method.projector.parameters())
        target = list(method.target_encoder.parameters())
        assert [p.shape for p in online] == [p.shape for p in target] and not any(p.requires_grad for p in target)
        pairs[init] = (online, target)
    online, target = pairs["copy"]
    assert all(torch.equal(o, t) for o, t in zip(online, target))
    online, target = pairs["independent"]
    drawn = [(o, t) for o, t in zip(online, target) if o.ndim > 1]  # random draws; BN weights start at 1 in both
    assert drawn and not any(torch.equal(o, t) for o, t in drawn)
    # the same law: torchvision's kaiming_normal(fan_out) for the 3x3 convolutions of the first stage
    conv_o, conv_t = online[3], target[3]
    assert conv_o.shape == (64, 64, 3, 3)
    for w in (conv_o, conv_t):
        assert float(w.detach().std()) == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.05)
    with pytest.raises(ConfigError, match="backbone_factory"):
        BYOL(torch.nn.Linear(4, 4), 4, 8, 4, 8, target_init="independent")
    with pytest.raises(ConfigError, match="target_init"):
        BYOL(torch.nn.Linear(4, 4), 4, 8, 4, 8, target_init="random")


@pytest.mark.parametrize("depth", [50, 18, 34])
def test_supervised_resnet_recipes_are_the_pytorch_imagenet_example(depth: int) -> None:
    """FT's supervised row (76.1) is torchvision's ResNet-50, MCL's ImageNet baselines (69.76, 73.30) torchvision's
    ResNet-18 / 34: pytorch/examples imagenet/main.py, lr 0.1 x0.1 every 30 epochs (adjust_learning_rate once per
    epoch), batch 256, wd 1e-4, RandomResizedCrop(224) + flip, fp32."""
    cfg = load_config(f"imagenet/supervised_r{depth}_90ep")
    assert (cfg.method.name, cfg.model.arch, cfg.model.cifar_stem, cfg.train.precision) == (
        "supervised", f"resnet{depth}", False, "fp32")
    assert (cfg.data.batch_size, cfg.data.image_size, cfg.views.params["num_views"],
            cfg.views.params["scale"]) == (256, 224, 1, [0.08, 1.0])
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov) == ("sgd", 0.9, 1e-4, False)
    assert _our_epoch_lrs(cfg) == pytest.approx([0.1 * 0.1 ** (epoch // 30) for epoch in range(90)])
    assert cfg.linear.crop_fraction == 0.875  # evaluation views: resize 256, centre crop 224


def test_released_heads_have_no_hidden_batchnorm() -> None:
    """ContrastiveCrop's MoCo and SimCLR heads, MoCo v2's --mlp head and FT's PyContrast mlp head are Linear-ReLU-Linear
    with biases: every MoCo v2 / SimCLR recipe reproducing their rows builds that head (our demo keeps the default)."""
    from contrastlab import assemble

    rows = ["cifar10/mocov2_r18_500ep", "cifar100/simclr_ccrop_r18_500ep", "stl10/simclr_r18_500ep",
            "tiny_imagenet/simclr_ccrop_r18_500ep", "imagenet/mocov2_r50_200ep", "imagenet/mocov2_ft_r50_200ep",
            "imagenet100/mocov2_scores_m09_r50_200ep", "imagenet200/mocov2_ccrop_r50_100ep", "cifar10/mocov2_simccrop_r18_500ep"]
    for name in rows:
        assert load_config(name).method.params["proj_hidden_bn"] is False, name
    cfg = load_config("cifar10/simclr_r18_500ep", ["model.arch=resnet20", "model.width=0.25", "model.cifar_stem=false"])
    head = assemble.method(cfg, 10).projector
    layers = [type(m).__name__ for m in head]
    assert layers == ["Linear", "ReLU", "Linear"] and head[0].bias is not None and head[2].bias is not None
    assert "proj_hidden_bn" not in load_config("demo").method.params
