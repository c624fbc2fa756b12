"""The GPU-resident pipeline (run on CPU tensors): device store, loader, JPEG batches, trainer switch, bench."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg, encode_jpeg

from contrastlab import assemble
from contrastlab.config.load import load_config
from contrastlab.data import build_dataset
from contrastlab.data.device_images import DeviceImages, fits_on_device, load_images
from contrastlab.data.device_loader import DeviceViewLoader
from contrastlab.data.jpeg import decode_batch
from contrastlab.data.subsets import IndexedSubset
from contrastlab.errors import ConfigError, DatasetError
from contrastlab.views import ViewDataset, make_photometric, make_planner
from contrastlab.views.batch_views import BatchViews

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def demo_test():
    return build_dataset("demo", None, "test")


class _PILImages(torch.utils.data.Dataset):
    """A dataset that only hands out PIL images (no array to copy): the decoding path."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.images, self.targets, self.name = images, list(range(len(images))), "pil"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i], i


def test_device_store_holds_the_dataset_pixels(demo_test) -> None:
    store = DeviceImages.from_dataset(demo_test, torch.device("cpu"))
    assert store.images.shape == (1000, 1, 28, 28) and store.images.dtype == torch.uint8
    for i in (0, 17, 999):
        image, label, _ = demo_test[i]
        assert np.array_equal(np.asarray(image)[..., 0], store.images[i, 0].numpy()) and store.targets[i] == label
    subset = IndexedSubset(demo_test, [5, 3, 900])
    assert torch.equal(load_images(subset), store.images[[5, 3, 900]])
    pil = _PILImages([demo_test[i][0] for i in (5, 3, 900)])
    assert torch.equal(load_images(pil), store.images[[5, 3, 900]].expand(-1, 3, -1, -1))


def test_device_store_rejects_images_of_different_sizes() -> None:
    pil = _PILImages([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))])
    with pytest.raises(DatasetError, match=r"image 1 .* 9x8 .*data.pipeline=cpu"):
        load_images(pil)


def test_auto_keeps_the_cpu_pipeline_off_gpus(demo_test) -> None:
    fits, why = fits_on_device(demo_test, torch.device("cpu"))
    assert not fits and "not a GPU" in why


def _views(planner="random_resized", photometric="simclr", sizes=(28, 28)) -> BatchViews:
    return BatchViews(make_planner(planner), list(sizes),
                      [make_photometric(photometric, v, MEAN, STD) for v in range(len(sizes))])


def test_loader_yields_labels_and_indices_and_resumes_at_any_batch(demo_test) -> None:
    store = DeviceImages.from_dataset(demo_test, torch.device("cpu"))
    loader = DeviceViewLoader(store, _views(), seed=3)
    batches = [[4 * k + j for j in range(4)] for k in range(5)]
    full = list(loader(batches, epoch=2))
    for (views, labels, index), rows in zip(full, batches):
        assert index.tolist() == rows and labels.tolist() == [demo_test.targets[r] for r in rows]
        assert [tuple(v.shape) for v in views] == [(4, 3, 28, 28)] * 2
    resumed = list(loader(batches[3:], epoch=2, start=3))
    for (a, _, _), (b, _, _) in zip(full[3:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = next(iter(loader(batches, epoch=3)))[0]
    assert not torch.equal(other_epoch[0], full[0][0][0])


def test_gpu_and_cpu_views_have_the_same_pixel_statistics(demo_test) -> None:
    """Independent check of the whole path: per-view mean and spread of the two pipelines' views (KS)."""
    planner = make_planner("random_resized", scale=(0.2, 1.0))
    recipes = [make_photometric("simclr", v, MEAN, STD) for v in range(2)]
    cpu = ViewDataset(demo_test, planner, [28, 28], recipes, seed=0)
    n = 600
    cpu_views = torch.stack([cpu[i][0][0] for i in range(n)])
    gpu = BatchViews(planner, [28, 28], recipes)
    store = DeviceImages.from_dataset(demo_test, torch.device("cpu"))
    index = torch.arange(n)
    gpu_views = gpu(store.images[index], index, torch.Generator().manual_seed(1))[0]
    critical = 1.95 * math.sqrt(2 / n)  # two-sample KS, false alarm ~0.001
    for stat in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3)), lambda v: (v[:, 0] - v[:, 2]).abs()
                 .mean(dim=(1, 2))):
        a, b = np.sort(stat(cpu_views).numpy()), np.sort(stat(gpu_views).numpy())
        grid = np.concatenate([a, b])
        ks = np.max(np.abs(np.searchsorted(a, grid, side="right") / n - np.searchsorted(b, grid, side="right") / n))
        assert ks < critical


def test_jpeg_batches_decode_into_a_zero_canvas_and_render_inside_each_image(capsys) -> None:
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((20, 30), (32, 16), (8, 8))]
    blobs = [encode_jpeg(im) for im in images]
    canvas, sizes = decode_batch(blobs, torch.device("cpu"))
    assert sizes.tolist() == [[20, 30], [32, 16], [8, 8]] and canvas.shape == (3, 3, 32, 30)
    for b, blob in enumerate(blobs):
        h, w = sizes[b].tolist()
        assert torch.equal(canvas[b, :, :h, :w], decode_jpeg(blob))
        assert canvas[b, :, h:].sum() == 0 and canvas[b, :, :, w:].sum() == 0
    decode_batch(blobs, torch.device("cpu"))
    assert capsys.readouterr().err.count("no GPU JPEG decoder") <= 1
    # views of black images on a white canvas stay black: every box lies inside its own image
    canvas = torch.full((3, 3, 40, 40), 255, dtype=torch.uint8)
    for b, (h, w) in enumerate(sizes.tolist()):
        canvas[b, :, :h, :w] = 0
    views = BatchViews(make_planner("random_resized", num_views=2, scale=(0.05, 1.0)), [16, 16],
                       [make_photometric("none", v, (0.0,) * 3, (1.0,) * 3) for v in range(2)])
    for seed in range(5):
        out = views(canvas, torch.arange(3), torch.Generator().manual_seed(seed), image_sizes=sizes)
        assert all(float(v.abs().max()) == 0.0 for v in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_jpeg_files_decode_on_cuda_like_the_cpu_decoder(monkeypatch) -> None:
    """On a GPU, JPEGs go through nvJPEG (no silent CPU fallback) and match libjpeg's pixels up to IDCT and
    chroma-upsampling rounding."""
    from contrastlab.bench import synthetic_images
    from contrastlab.data import jpeg

    images = [torch.from_numpy(synthetic_images(1, h, w, seed=k)[0]).permute(2, 0, 1).contiguous()
              for k, (h, w) in enumerate(((48, 64), (64, 48), (33, 57)))]
    blobs = [encode_jpeg(im, quality=90) for im in images]
    reference = [decode_jpeg(blob) for blob in blobs]
    monkeypatch.setattr(jpeg, "decode_image", lambda *a, **k: pytest.fail("JPEGs fell back to the CPU decoder"))
    decoded = jpeg.decode_images(blobs, torch.device("cuda"))
    for image, expected in zip(decoded, reference, strict=True):
        assert image.device.type == "cuda" and image.shape == expected.shape and image.dtype == torch.uint8
        diff = (image.cpu().int() - expected.int()).abs()
        assert diff.float().mean() < 1.5 and diff.max() <= 16


def test_pipeline_key_is_validated(tmp_path) -> None:
    from contrastlab.engine.trainer import train

    with pytest.raises(ConfigError, match="data.pipeline must be one of auto, gpu, cpu"):
        train(load_config("demo", [f"out={tmp_path}", "data.pipeline=tpu", "train.device=cpu"]), quiet=True)
    with pytest.raises(ConfigError, match="finite_check_every=1"):
        train(load_config("demo", [f"out={tmp_path}", "train.finite_check_every=5", "train.nonfinite=skip",
                                   "train.device=cpu"]), quiet=True)


def test_bench_measures_every_part_and_writes_consistent_ratios(tmp_path) -> None:
    from contrastlab.bench import run_benchmark, write_json

    cfg = load_config("demo", ["data.batch_size=8", "data.image_size=16", "model.width=0.25", "train.device=cpu",
                               "method.proj_hidden_dim=16", "method.proj_out_dim=8"])
    lines: list[str] = []
    summary = run_benchmark(cfg, images=32, steps=2, warmup=1, workers=0, log=lines.append)
    write_json(summary, tmp_path / "bench.json")
    loaded = json.loads((tmp_path / "bench.json").read_text())
    r = loaded["results"]
    assert set(r) == {"model", "gpu", "cpu", "render", "cpu_render"}
    for m in r.values():
        assert m["img_per_s"] == pytest.approx(m["steps"] * 8 / m["seconds"])
    assert loaded["gpu_over_model"] == pytest.approx(r["gpu"]["img_per_s"] / r["model"]["img_per_s"])
    assert loaded["gpu_over_cpu"] == pytest.approx(r["gpu"]["img_per_s"] / r["cpu"]["img_per_s"])
    assert loaded["render_over_cpu_render"] == pytest.approx(r["render"]["img_per_s"] / r["cpu_render"]["img_per_s"])
    assert any(line.startswith("gpu / cpu") for line in lines)
    jpeg = run_benchmark(cfg, shape="imagenet", images=16, steps=1, warmup=1, jpeg=True, parts=("render",),
                         log=lines.append)
    assert jpeg["results"]["render"]["name"] == "render+jpeg"
    evaluation = run_benchmark(cfg, images=32, steps=2, warmup=1, workers=0, parts=("eval", "cpu_eval"),
                               log=lines.append)
    e = evaluation["results"]
    assert evaluation["eval_over_cpu_eval"] == pytest.approx(e["eval"]["img_per_s"] / e["cpu_eval"]["img_per_s"])
    assert any(line.startswith("eval / cpu eval") for line in lines)
    cfg.data.batch_size, cfg.views.photometric = 16, "none"  # test_compiled_views_train_as_the_eager_views_do's
    compiled = run_benchmark(cfg, images=32, steps=2, warmup=1, parts=("render", "compiled_render"), log=lines.append)
    c = compiled["results"]
    assert (c["render"]["name"], c["compiled_render"]["name"]) == ("render", "render compiled")
    assert compiled["compiled_render_over_render"] == pytest.approx(c["compiled_render"]["img_per_s"] /
                                                                   c["render"]["img_per_s"])
    assert any(line.startswith("compiled / eager") for line in lines)


def test_demo_trains_through_the_gpu_pipeline_with_a_compiled_step(tmp_path) -> None:
    """data.pipeline=gpu on CPU tensors and train.compile=eager (Dynamo tracing of the method's forward)."""
    from contrastlab.engine.trainer import train

    cfg = load_config("demo", [f"out={tmp_path}", "data.pipeline=gpu", "train.compile=eager", "data.subset=64",
                               "data.batch_size=16", "data.image_size=16", "model.width=0.25", "train.device=cpu",
                               "train.epochs=1", "monitor.max_bank=32", "monitor.max_test=16", "monitor.knn_k=5",
                               "observers=[progress,knn,test_accuracy,localiser]", "method.proj_hidden_dim=16", "method.proj_out_dim=8",
                               "train.finite_check_every=2"])
    results = train(cfg, quiet=True)
    assert results["steps"] == 4 and math.isfinite(results["knn_top1"]) and results["knn_views"] == "device"
    assert json.loads((tmp_path / "run.json").read_text())["input_pipeline"] == "gpu-resident"
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["loss"]) and record["loss"] > 0


def test_compiled_views_train_as_the_eager_views_do(tmp_path) -> None:
    """data.compile_views=true: the same run, the same losses as the eager renderer, and run.json says the views
    were compiled. (Crop and resize only, a quick compilation: test_gpu_render compares every photometric stage.)"""
    from contrastlab.engine.trainer import Trainer

    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        trainer = Trainer(load_config("demo", [*_tiny_run(out), "data.pipeline=gpu", "views.photometric=none",
                                               f"data.compile_views={str(compiled).lower()}"]), "demo", quiet=True)
        trainer.run()
        assert trainer.device_views.views.compile is compiled and trainer.device_views.views.compile_error is None
        assert json.loads((out / "run.json").read_text())["views_compiled"] is compiled
        losses[compiled] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def _image_tree(root, sizes, bad: bool = False) -> None:
    """root/train/<class>/ JPEG and PNG files of different sizes (and optionally one corrupt JPEG)."""
    g = np.random.default_rng(0)
    for k, (w, h) in enumerate(sizes):
        folder = root / "train" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.{'png' if k == 1 else 'jpg'}")
    if bad:
        (root / "train" / "c0" / "zz_bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def test_file_loader_decodes_batches_of_files_of_any_size(tmp_path) -> None:
    from contrastlab.data.device_loader import FileViewLoader

    _image_tree(tmp_path, [(40, 30), (24, 36), (50, 50), (33, 21)])
    data = build_dataset("imagefolder", tmp_path, "train")
    views = BatchViews(make_planner("random_resized"), [16, 16],
                       [make_photometric("none", v, (0.0,) * 3, (1.0,) * 3, flip_prob=0.0) for v in range(2)])
    loader = FileViewLoader(data, views, torch.device("cpu"), seed=0, workers=0)
    out = list(loader([[0, 1], [2, 3]], epoch=0))
    assert [b[2].tolist() for b in out] == [[0, 1], [2, 3]]
    assert [b[1].tolist() for b in out] == [[data.targets[0], data.targets[1]], [data.targets[2], data.targets[3]]]
    # a fixed whole-image box renders the file resized, as the CPU renderer does (within a grey level)
    whole = BatchViews(make_planner("fixed"), [16], [make_photometric("eval", 0, (0.0,) * 3, (1.0,) * 3)])
    (view,), _, _ = next(iter(FileViewLoader(data, whole, torch.device("cpu"), seed=0, workers=0)([[1, 2]], 0)))
    for b, i in enumerate((1, 2)):
        expected = np.asarray(data[i][0].resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)
        assert np.abs(view[b].permute(1, 2, 0).numpy() * 255 - expected).max() <= 1.0 + 1e-3


def test_file_loader_names_a_corrupt_file_or_skips_it(tmp_path) -> None:
    from contrastlab.data.device_loader import FileViewLoader

    _image_tree(tmp_path, [(20, 20), (20, 20), (20, 20)], bad=True)
    data = build_dataset("imagefolder", tmp_path, "train")
    bad = next(i for i, p in enumerate(data.paths) if p.name == "zz_bad.jpg")
    views = _views(sizes=(16, 16))
    with pytest.raises(DatasetError, match="zz_bad.jpg.*data.bad_images=skip"):
        list(FileViewLoader(data, views, torch.device("cpu"), seed=0, workers=0)([[0, bad]], 0))
    log = tmp_path / "bad.txt"
    data.set_bad_images("skip", log)  # the dataset's policy (data.bad_images) is the loader's
    loader = FileViewLoader(IndexedSubset(data, range(len(data))), views, torch.device("cpu"), seed=0, workers=0)
    _, labels, index = next(iter(loader([[bad, 0]], 0)))
    assert index.tolist() == [0, 0] and labels.tolist() == [data.targets[0]] * 2
    assert "zz_bad.jpg" in log.read_text()


def test_trainer_runs_an_image_folder_through_the_gpu_pipeline(tmp_path) -> None:
    from contrastlab.engine.trainer import train

    _image_tree(tmp_path / "data", [(40 + k, 30 + 2 * k) for k in range(16)])
    cfg = load_config("demo", [f"out={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
                               "data.test_split=train", "data.pipeline=gpu", "data.batch_size=8",
                               "data.image_size=16", "data.workers=0", "model.width=0.25", "train.device=cpu",
                               "train.epochs=1", "monitor.knn_k=3", "observers=[progress,knn,test_accuracy,localiser]",
                               "method.proj_hidden_dim=16", "method.proj_out_dim=8"])
    results = train(cfg, quiet=True)
    assert results["steps"] == 2 and math.isfinite(results["final_loss"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["input_pipeline"] == "gpu-files"
    assert results["knn_views"] == "device"  # the monitor decodes its files per batch too
    cfg.out, cfg.train.epochs = str(tmp_path / "ccrop"), 2  # the localiser reads the files the same way
    cfg.views.planner, cfg.views.box_warmup_epochs, cfg.views.box_update_every = "contrastive_crop", 1, 1
    train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "ccrop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "box_mean_area" in r] == [1]
    assert 0.0 < records[0]["box_mean_area"] <= 1.0


def test_evaluation_views_of_image_files_are_decoded_per_batch_like_the_cpu_views(tmp_path) -> None:
    """Image files of various sizes: read by workers, decoded and rendered per batch; same rows and labels as the
    CPU DataLoader through a subset, pixels within the renderer's tolerance (docs/gpu_pipeline.md)."""
    from torch.utils.data import DataLoader, Subset

    from contrastlab.data.device_loader import DeviceEvalLoader
    from contrastlab.views import eval_view_dataset

    _image_tree(tmp_path, [(40 + 3 * k, 30 + 2 * k) for k in range(7)])
    data = build_dataset("imagefolder", tmp_path, "train")
    views = Subset(eval_view_dataset(data, 16, MEAN, STD, crop_fraction=0.875), [6, 1, 3, 0, 5])
    loader = DeviceEvalLoader(views, torch.device("cpu"), batch_size=2)
    assert loader._files is not None and len(loader) == 3
    for (cpu_views, cpu_labels, cpu_index), (view, labels, index) in zip(DataLoader(views, batch_size=2), loader,
                                                                         strict=True):
        assert torch.equal(index, cpu_index) and torch.equal(labels, cpu_labels)
        assert (view - cpu_views[0]).abs().max() * STD[0] <= 2e-2
    # the linear probe's augmented views come from the files decoded per batch as well (a ragged last batch)
    from contrastlab.config.schema import LinearConfig
    from contrastlab.eval.linear import linear_probe

    augmented = ViewDataset(data, make_planner("random_resized", num_views=1), [16],
                            [make_photometric("none", 0, MEAN, STD)])
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    result = linear_probe(backbone, 4, 2, augmented, views, LinearConfig(epochs=2, batch_size=3, augment=True),
                          on_device=True, log=lambda s: None)
    assert result["views"] == "device" and result["train_size"] == 7 and result["backbone_unchanged"]


SHORT_DEMO = ["data.subset=2000", "train.epochs=4", "model.width=0.25", "monitor.knn_every=0",
              "observers=[progress,knn,test_accuracy,localiser]", "train.device=cpu", "data.workers=0"]


def test_demo_trains_alike_through_either_pipeline(tmp_path) -> None:
    """A shortened demo (2,000 images, 4 epochs, the ResNet-20 at quarter width, seed 0) through data.pipeline=cpu
    and data.pipeline=gpu.

    Same batches, same initial weights, views from the two renderers. Measured on the 2-core CPU, seeds 0 / 1 / 2:
    kNN top-1 cpu 63.4 / 65.7 / 63.5, gpu 64.3 / 61.2 / 64.2; last-epoch loss cpu 5.343 / 5.345 / 5.373, gpu
    5.323 / 5.402 / 5.342 (at the demo's half width, which took twice as long: kNN cpu 61.6 / 59.0 / 64.4, gpu
    60.8 / 63.3 / 61.5, loss cpu 5.318 / 5.372 / 5.310, gpu 5.234 / 5.345 / 5.230). The bands below hold all of
    them (the first epoch's mean loss was 5.99 at seed 0, cpu); a renderer that made views too easy, too hard or
    unrelated to the image moves the loss well outside them. The full demo over seeds 0, 1, 2 (both pipelines reach
    the same kNN band) is benchmarks/pipeline_parity_demo.py, reported in docs/gpu_pipeline.md.
    """
    from contrastlab.engine.trainer import train

    knn, loss = {}, {}
    for pipeline in ("cpu", "gpu"):
        cfg = load_config("demo", [f"out={tmp_path / pipeline}", f"data.pipeline={pipeline}", *SHORT_DEMO])
        results = train(cfg, quiet=True)
        knn[pipeline] = results["knn_top1"]
        loss[pipeline] = json.loads((tmp_path / pipeline / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert abs(knn["gpu"] - knn["cpu"]) <= 6.0, knn
    assert abs(loss["gpu"] - loss["cpu"]) <= 0.15, loss
    assert max(loss.values()) < 5.45 and min(knn.values()) > 50.0, (loss, knn)  # both trained


def test_every_recipe_renders_its_views_through_the_gpu_path(demo_test) -> None:
    """Each recipe's planner, sizes, recipes and JointBlur as BatchViews (at its smoke resolution): shapes as the
    CPU dataset of views, finite values, and the same normalisation range."""
    from contrastlab.cli import _load
    from contrastlab.config.load import recipe_names
    from contrastlab.data.subsets import IndexedSubset

    base = IndexedSubset(demo_test, list(range(16)))
    store = DeviceImages.from_dataset(base, torch.device("cpu"))
    seen = set()
    for recipe in (r for r in recipe_names() if not r.startswith("linear/")):
        cfg = _load(recipe, ["out=unused"], smoke=True)
        cpu_views = assemble.training_views(cfg, base)
        key = (repr(cpu_views.planner), tuple(cpu_views.sizes), tuple(map(repr, cpu_views.photometrics)),
               repr(cpu_views.joint_blur))
        if key in seen:
            continue
        seen.add(key)
        views = BatchViews.from_view_dataset(cpu_views)(store.images, torch.arange(16), torch.Generator().manual_seed(0))
        expected = [tuple(v.shape) for v in cpu_views[0][0]]
        assert [tuple(v.shape[1:]) for v in views] == expected, recipe
        assert all(torch.isfinite(v).all() for v in views), recipe
        mean, std = assemble.normalization(cfg)
        low, high = (0 - max(mean)) / min(std), (1 - min(mean)) / min(std)
        assert all(v.min() >= low - 1e-4 and v.max() <= high + 1e-4 for v in views), recipe
    assert len(seen) > 10


def test_auto_falls_back_to_cpu_workers_when_the_gpu_path_fails(tmp_path, monkeypatch, capsys) -> None:
    """auto on a (pretended) GPU: a renderer that raises in the trial batch leaves the run on CPU workers."""
    from contrastlab.engine import inputs
    from contrastlab.engine import trainer as trainer_module
    from contrastlab.views import batch_views

    monkeypatch.setattr(inputs, "fits_on_device", lambda base, device: (True, "pretend"))

    def broken(self, *args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(batch_views.BatchViews, "__call__", broken)
    trainer_module.train(load_config("demo", _tiny_run(tmp_path)))
    assert "failed a trial batch (RuntimeError: no kernel image is available)" in capsys.readouterr().err
    assert json.loads((tmp_path / "run.json").read_text())["input_pipeline"] == "cpu-workers"
    with pytest.raises(RuntimeError, match="no kernel image"):
        trainer_module.train(load_config("demo", [*_tiny_run(tmp_path / "gpu"), "data.pipeline=gpu"]))


def _tiny_run(out) -> list[str]:
    return [f"out={out}", "data.subset=32", "data.batch_size=16", "data.image_size=16", "model.width=0.25",
            "train.device=cpu", "train.epochs=1", "monitor.knn_every=0", "monitor.max_bank=16", "monitor.max_test=16",
            "monitor.knn_k=3", "observers=[progress,knn,test_accuracy,localiser]", "method.proj_hidden_dim=16", "method.proj_out_dim=8",
            "data.workers=0"]


@pytest.mark.parametrize("recipe", ["cifar10/mocov2_r18_500ep", "cifar10/caco_r18_500ep", "imagenet/mocov3_r50_100ep",
                                    "cifar100/mcl_x2_r32_300ep"])
def test_training_steps_never_wait_for_the_device(recipe, tmp_path, monkeypatch) -> None:
    """With train.finite_check_every > 1 a training step (forward, backward, optimiser, EMA, queue or memory
    update) makes no call that reads a device value to the host from any contrastlab module (the warm start of
    CaCo's memory may; it is excluded)."""
    from pathlib import Path

    from sync_guard import forbid_host_sync

    import contrastlab
    from contrastlab.cli import _load
    from contrastlab.engine import trainer as trainer_module

    files = [str(p) for p in Path(contrastlab.__file__).parent.rglob("*.py")]
    step, after = trainer_module.Trainer._train_step, None
    guarded_steps = []

    def guarded_step(self, views, labels, index, lr, where):
        nonlocal after
        if where.startswith("warm-start"):
            return step(self, views, labels, index, lr, where)
        if after is None:  # the EMA / memory step after the optimiser, guarded too
            after = self.method.after_optimizer_step

            def guarded_after(momentum):
                with monkeypatch.context() as m:
                    forbid_host_sync(m, *files)
                    return after(momentum)

            self.method.after_optimizer_step = guarded_after
        with monkeypatch.context() as m:
            forbid_host_sync(m, *files)
            result = step(self, views, labels, index, lr, where)
        guarded_steps.append(where)
        return result

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", guarded_step)
    cfg = _load(recipe, [f"out={tmp_path}", "train.finite_check_every=2", "data.pipeline=gpu",
                         "observers=[progress,knn,test_accuracy,localiser]"], smoke=True)
    trainer_module.train(cfg, quiet=True)
    assert len(guarded_steps) == 2


def test_tiny_imagenet_files_are_decoded_once_onto_the_device(tmp_path, monkeypatch) -> None:
    """A dataset of files with a declared size (Tiny-ImageNet, 64x64) is held on the device, decoded in chunks."""
    from test_data import _write_tiny

    from contrastlab.data import device_images
    from contrastlab.data.device_images import image_shape

    _write_tiny(tmp_path)
    data = build_dataset("tiny_imagenet", tmp_path, "train")
    assert image_shape(data) == (3, 64, 64)
    monkeypatch.setattr(device_images, "DECODE_CHUNK", 4)  # several chunks
    store = DeviceImages.from_dataset(data, torch.device("cpu"))
    assert store.images.shape == (len(data), 3, 64, 64) and store.targets.tolist() == data.targets
    for i in range(len(data)):  # the same decoder as the CPU path's PIL, within a grey level
        expected = torch.from_numpy(np.array(data[i][0])).permute(2, 0, 1).int()
        assert (store.images[i].int() - expected).abs().max() <= 1
    Image.new("RGB", (32, 64)).save(data.paths[3], "JPEG")
    with pytest.raises(DatasetError, match=rf"{data.paths[3].name} is 32x64, not the 64x64"):
        DeviceImages.from_dataset(data, torch.device("cpu"))


@pytest.mark.parametrize("size, crop_fraction, tolerance", [(28, 1.0, 1e-5), (20, 0.875, 2e-2), (24, None, 2e-2)])
def test_evaluation_views_rendered_on_the_device_match_the_cpu_views(demo_test, size, crop_fraction,
                                                                     tolerance) -> None:
    """Same rows, labels and indices as the CPU DataLoader through nested subsets; pixels equal where no resize
    happens (28 px demo images at 28) and within the renderer's stated tolerance (docs/gpu_pipeline.md) otherwise."""
    from torch.utils.data import DataLoader, Subset

    from contrastlab.data.device_loader import DeviceEvalLoader
    from contrastlab.views import eval_view_dataset

    views = eval_view_dataset(demo_test, size, MEAN, STD, crop_fraction=crop_fraction)
    nested = Subset(Subset(views, list(range(999, 0, -3))), [4, 0, 7, 100, 3, 55, 9])
    cpu = list(DataLoader(nested, batch_size=3, shuffle=False))
    gpu = DeviceEvalLoader(nested, torch.device("cpu"), batch_size=3)
    assert len(gpu) == len(cpu) == 3
    for (cpu_views, cpu_labels, cpu_index), (view, labels, index) in zip(cpu, gpu, strict=True):
        assert torch.equal(index, cpu_index) and torch.equal(labels, cpu_labels)
        assert index.tolist()[0] in {999 - 3 * 4, 999 - 3 * 100, 999 - 3 * 9}
        assert view.shape == cpu_views[0].shape == (len(index), 3, size, size)
        assert (view - cpu_views[0]).abs().max() * STD[0] <= tolerance  # on the 0..1 pixel scale
    store = DeviceImages.from_dataset(demo_test, torch.device("cpu"))  # the training store: gathered, not copied
    shared = DeviceEvalLoader(nested, torch.device("cpu"), batch_size=3, store=store)
    for (a, _, _), (b, _, _) in zip(gpu, shared, strict=True):
        assert torch.equal(a, b)
    assert shared._store is store


def test_monitors_on_the_device_agree_with_the_cpu_monitors(demo_test) -> None:
    """kNN top-1 and classifier accuracy with views rendered (and neighbours voted) on the device equal the
    CPU-worker monitors' numbers for the same backbone."""
    from contrastlab.observers.classification_monitor import ClassificationMonitor
    from contrastlab.observers.knn_monitor import KNNMonitor
    from contrastlab.views import eval_view_dataset

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    bank = eval_view_dataset(demo_test, 28, MEAN, STD)
    test = eval_view_dataset(IndexedSubset(demo_test, list(range(500, 1000))), 28, MEAN, STD)
    knn = {flag: KNNMonitor(bank, test, 10, k=10, batch_size=128, max_bank=400, max_test=300, on_device=flag)
           for flag in (False, True)}
    first = knn[True].evaluate(backbone)
    assert first == pytest.approx(knn[False].evaluate(backbone), abs=0.34)  # one vote of 300 at most
    assert knn[True].evaluate(backbone) == first and knn[True].describe()["knn_views"] == "device"
    assert knn[False].describe()["knn_bank_size"] == knn[True].describe()["knn_bank_size"] == 400

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.fc = backbone, torch.nn.Linear(8, 10)

        def predict(self, x):
            return {"peer0": self.fc(self.backbone(x)), "peer1": -self.fc(self.backbone(x))}

    heads = Heads()
    scores = {flag: ClassificationMonitor(knn[flag].test_loader).evaluate(heads) for flag in (False, True)}
    assert scores[True] == pytest.approx(scores[False], abs=0.34)  # one image of 300 at most
    assert set(scores[True]) == {"peer0", "peer1", "peer_mean", "peer_best"}


def test_localiser_reads_the_training_store(demo_test) -> None:
    """ContrastiveCrop boxes from views rendered on the device equal the boxes from the CPU views."""
    from contrastlab.data.device_loader import DeviceEvalLoader
    from contrastlab.views import eval_view_dataset
    from contrastlab.views.localiser import localise

    def fmap(x: torch.Tensor) -> torch.Tensor:  # the image as its own feature map: boxes around the garment
        return torch.nn.functional.avg_pool2d(x, 4)

    images = eval_view_dataset(demo_test, 28, MEAN, STD, crop_fraction=None)
    store = DeviceImages.from_dataset(demo_test, torch.device("cpu"))
    on_device = localise(fmap, DeviceEvalLoader(images, torch.device("cpu"), 128, store), 0.3,
                         num_samples=len(images))
    assert torch.allclose(on_device, localise(fmap, images, 0.3, batch_size=128), atol=1e-6)
    assert (on_device[:, 2:] - on_device[:, :2]).prod(1).mean() < 0.99  # real boxes, not all whole images


def test_linear_probe_with_views_rendered_on_the_device(demo_test) -> None:
    """Precomputed features: the same probe as the CPU path (same features up to float rounding, same shuffles).
    Augmented views rendered on the device: trains to the CPU path's accuracy band (different random crops)."""
    from contrastlab.config.schema import LinearConfig
    from contrastlab.eval.linear import linear_probe
    from contrastlab.views import eval_view_dataset

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    train = IndexedSubset(demo_test, list(range(0, 1000, 2)))
    test = eval_view_dataset(IndexedSubset(demo_test, list(range(1, 1000, 4))), 28, MEAN, STD)
    plain = eval_view_dataset(train, 28, MEAN, STD)
    augmented = ViewDataset(train, make_planner("random_resized", num_views=1, scale=(0.5, 1.0)), [28],
                            [make_photometric("none", 0, MEAN, STD)])
    results = {}
    for name, train_set, augment, seeds in (("plain", plain, False, (3,)), ("augmented", augmented, True, (3, 4))):
        cfg = LinearConfig(epochs=6, batch_size=64, lr=0.5, augment=augment, schedule="cosine")
        for on_device in (False, True):
            for seed in seeds:
                results[name, on_device, seed] = linear_probe(backbone, 64, 10, train_set, test, cfg, seed=seed,
                                                              on_device=on_device, log=lambda s: None)
    assert results["plain", True, 3]["top1"] == pytest.approx(results["plain", False, 3]["top1"], abs=0.8)  # 2/250
    assert results["plain", True, 3]["views"] == "device" and results["plain", True, 3]["backbone_unchanged"]
    # augmented, mean of two probe seeds; measured (backbone seeds 0-4): single probes of one path spread up to
    # 6 points, the two paths' means differed by at most 2.2
    mean = {d: sum(results["augmented", d, s]["top1"] for s in (3, 4)) / 2 for d in (False, True)}
    assert abs(mean[True] - mean[False]) <= 5.0, mean
    assert min(r["top1"] for r in results.values()) > 30.0  # all learned (chance: 10%)


def test_auto_tries_a_batch_of_image_files_too_and_falls_back_with_the_reason(tmp_path, monkeypatch, capsys) -> None:
    """On a GPU, auto renders image folders batch by batch on the device; it tries a batch first (as for arrays), and
    a failure leaves the run on CPU workers with the reason logged."""
    from contrastlab.data import device_images
    from contrastlab.engine import inputs
    from contrastlab.engine import trainer as trainer_module
    from contrastlab.views import batch_views

    _image_tree(tmp_path / "data", [(40 + k, 30 + 2 * k) for k in range(16)])
    folder = build_dataset("imagefolder", tmp_path / "data", "train")
    fits, why = device_images.fits_on_device(folder, torch.device("cpu"))
    assert not fits and "not a GPU" in why
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**34, 2**34))  # a pretended GPU's memory
    fits, why = device_images.fits_on_device(folder, torch.device("cuda", 0))
    assert fits and "decoded batch by batch" in why
    monkeypatch.setattr(inputs, "fits_on_device", lambda base, device: (True, "pretend"))

    def broken(self, *args, **kwargs):
        raise RuntimeError("nvjpeg is not available")

    monkeypatch.setattr(batch_views.BatchViews, "__call__", broken)
    run = [f"out={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.test_split=train",
           "data.batch_size=8", "data.image_size=16", "data.workers=0", "model.width=0.25", "train.device=cpu",
           "train.epochs=1", "monitor.knn_k=3", "observers=[knn]", "method.proj_hidden_dim=16",
           "method.proj_out_dim=8"]
    trainer_module.train(load_config("demo", run))
    assert "failed a trial batch (RuntimeError: nvjpeg is not available)" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["input_pipeline"] == "cpu-workers"
