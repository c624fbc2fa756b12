"""``contrastlab export`` (torchvision / timm / detectron2 weights) and ``contrastlab views`` (planner sheets)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from contrastlab.cli import _load, main
from contrastlab.engine.trainer import train
from contrastlab.errors import ConfigError
from contrastlab.export import detectron2_name, export_backbone
from contrastlab.models import build_backbone

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two smoke steps of the MoCo v3 ImageNet recipe with a ResNet-18 (ImageNet stem, 32 px demo images)."""
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = _load("imagenet/mocov3_r50_100ep", [f"out={out}", "model.arch=resnet18", "method.proj_hidden_dim=32",
                                              "method.proj_out_dim=16", "observers=[progress,knn,test_accuracy,localiser]"], smoke=True)
    train(cfg, "test/export", quiet=True)
    return out / "checkpoints" / "last.pt"


def _our_backbone(checkpoint: Path) -> nn.Module:
    from contrastlab.engine.checkpoint import load_backbone_weights, load_checkpoint

    net, _ = build_backbone("resnet18")
    load_backbone_weights(net, load_checkpoint(checkpoint))
    return net.eval()


def test_torchvision_export_loads_strictly_into_torchvision_resnet(resnet18_checkpoint: Path, tmp_path: Path) -> None:
    import torchvision

    out = tmp_path / "r18.pth"
    assert main(["export", str(resnet18_checkpoint), "--format", "torchvision", "--out", str(out)]) == 0
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reference.eval()(x), _our_backbone(resnet18_checkpoint)(x))


def test_detectron2_export_uses_detectron2_names_and_keeps_every_value(resnet18_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "r18.pkl"
    assert main(["export", str(resnet18_checkpoint), "--format", "detectron2", "--out", str(out)]) == 0
    payload = pickle.loads(out.read_bytes())
    assert payload["__author__"] == "contrastlab" and payload["matching_heuristics"] is True
    model = payload["model"]
    state = _our_backbone(resnet18_checkpoint).state_dict()
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(model) == len(expected)
    for name in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var",
                 "res2.0.conv1.weight", "res2.0.conv2.norm.bias", "res3.0.shortcut.weight",
                 "res3.0.shortcut.norm.running_mean", "res5.1.conv2.weight"):
        assert name in model, name
    for key, value in expected.items():
        assert (model[detectron2_name(key)] == value.numpy()).all()


def test_detectron2_export_loads_into_detectron2_and_gives_the_same_features(resnet18_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    """The real target: detectron2's ResNet built from its config, loaded by its ``DetectionCheckpointer``
    (name matching heuristics on), computes our backbone's ``res5`` features. Skipped where detectron2 is not
    installed (CI: it has no wheel on PyPI)."""
    pytest.importorskip("detectron2.modeling")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from contrastlab.engine.checkpoint import backbone_state, load_checkpoint

    export_backbone(backbone_state(load_checkpoint(resnet18_checkpoint)), "resnet18", "detectron2", tmp_path / "r18.pkl")
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # frozen running statistics, like our backbone in eval mode
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    DetectionCheckpointer(theirs).load(str(tmp_path / "r18.pkl"))
    ours = _our_backbone(resnet18_checkpoint)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.layer4(ours.layer3(ours.layer2(ours.layer1(ours.maxpool(ours.relu(ours.bn1(ours.conv1(x))))))))
        torch.testing.assert_close(theirs(x)["res5"], expected, atol=1e-4, rtol=1e-4)


def test_detectron2_names_of_a_bottleneck_block() -> None:
    assert detectron2_name("layer4.2.bn3.weight") == "res5.2.conv3.norm.weight"
    assert detectron2_name("layer1.0.downsample.1.running_mean") == "res2.0.shortcut.norm.running_mean"
    assert detectron2_name("bn1.bias") == "stem.conv1.norm.bias"


def test_timm_export_of_a_mocov3_vit(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    vit, _ = build_backbone("vit_small", img_size=32)
    summary = export_backbone(vit.state_dict(), "vit_small", "timm", tmp_path / "vit.pth")
    assert "vit_small_patch16_224" in summary["loads_into"]
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, num_heads=12)
    reference.load_state_dict(torch.load(tmp_path / "vit.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reference.eval()(x), vit.eval()(x))


def test_export_refuses_formats_the_backbone_cannot_load_into(tmp_path: Path) -> None:
    net, _ = build_backbone("resnet18")
    with pytest.raises(ConfigError, match="--format torchvision"):
        export_backbone(net.state_dict(), "resnet18", "timm", tmp_path / "x.pth")
    with pytest.raises(ConfigError, match="CIFAR stem"):
        export_backbone(net.state_dict(), "resnet18", "torchvision", tmp_path / "x.pth", cifar_stem=True)
    with pytest.raises(ConfigError, match="torchvision ResNets"):
        export_backbone(net.state_dict(), "resnet20", "detectron2", tmp_path / "x.pkl")
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.pkl").exists()


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(48 + 8 * i, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def test_views_draws_a_sheet_for_joint_crop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _images(tmp_path / "imgs", 3)
    out = tmp_path / "sheet.png"
    code = main(["views", "cifar10/mocov2_jointcrop_r18_500ep", "--images", str(folder), "--out", str(out),
                 "--count", "2"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.width > sheet.height  # 2 rows of source + 2 views


def test_views_names_a_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["views", "demo", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert code == 2 and "holds no image files" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_views_with_a_checkpoint_localises_each_image_and_crops_around_its_box(
    resnet18_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--checkpoint``: the heatmap boxes equal the training localiser's on the same images, the ContrastiveCrop
    planner samples around them (each crop centred in its box unless pushed into the image), and the sheet
    gains a heatmap column."""
    from contrastlab import assemble
    from contrastlab.views import eval_view_dataset
    from contrastlab.views.localiser import last_feature_map, localise
    from contrastlab.viz.view_sheet import ImageList, localise_images

    folder = _images(tmp_path / "imgs", 3)
    recipe, overrides = "imagenet/mocov2_ccrop_r50_100ep", ["model.arch=resnet18", "data.image_size=128"]
    cfg = _load(recipe, overrides, smoke=False)
    images = ImageList(folder)
    mean, std = assemble.normalization(cfg)
    net = _our_backbone(resnet18_checkpoint)
    found = localise_images(net, images, 128, mean, std, threshold=0.5)  # a 4 x 4 feature map
    reference = localise(last_feature_map(net), eval_view_dataset(images, 128, mean, std, crop_fraction=None), 0.5)
    assert torch.equal(found.boxes, reference)
    assert found.heatmaps.shape == (3, 128, 128) and 0.0 <= float(found.heatmaps.amin()) < float(found.heatmaps.amax()) <= 1.0
    assert (found.boxes[:, 2:] - found.boxes[:, :2]).prod(1).lt(1.0).any()  # a real box, not all whole images

    views = assemble.training_views(cfg, images)
    views.planner.store.fill(found.boxes)
    views.planner.store.set_enabled(True)
    for index in range(len(images)):
        width, height = images[index][0].size
        bx0, by0, bx1, by1 = views.planner.store.box(index, width, height)
        for _ in range(20):
            for x0, y0, x1, y1 in views.planner.plan(index, width, height):
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                assert bx0 - 1e-6 <= cx <= bx1 + 1e-6 or x0 == 0 or x1 == width
                assert by0 - 1e-6 <= cy <= by1 + 1e-6 or y0 == 0 or y1 == height

    plain, located = tmp_path / "plain.png", tmp_path / "located.png"
    assert main(["views", recipe, *overrides, "--images", str(folder), "--out", str(plain), "--count", "2"]) == 0
    assert main(["views", recipe, *overrides, "views.box_threshold=0.5", "--images", str(folder), "--out",
                 str(located), "--count", "2", "--checkpoint", str(resnet18_checkpoint)]) == 0
    assert capsys.readouterr().out.split() == [str(plain), str(located)]
    with Image.open(plain) as a, Image.open(located) as b:
        assert b.width > a.width and b.height == a.height  # one more column: the heatmap


def test_views_names_a_checkpoint_that_does_not_fit_the_recipe(resnet18_checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = _images(tmp_path / "imgs", 1)
    code = main(["views", "imagenet/mocov2_ccrop_r50_100ep", "--images", str(folder), "--out", str(tmp_path / "x.png"),
                 "--checkpoint", str(resnet18_checkpoint)])
    assert code == 2 and "backbone weights do not match" in capsys.readouterr().err
