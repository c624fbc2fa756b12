"""``contrastlab bench``: training throughput of a recipe fed three ways, measured side by side in one run.

For one recipe, on synthetic data of a chosen shape, on one device:

- **model**: the training step alone (forward, backward, optimiser, EMA) on views made once and kept on the device;
  the ceiling any input pipeline can reach;
- **gpu**: the GPU pipeline: the dataset held on the device (uint8), batches gathered and rendered there by the
  batched renderer (:class:`~contrastlab.data.device_loader.DeviceViewLoader`); with ``--jpeg`` the images are
  JPEG files' bytes instead, decoded per batch on the device (:mod:`contrastlab.data.jpeg`);
- **cpu**: a plain torchvision pipeline, as the published codebases feed it: PIL images, ``RandomResizedCrop``,
  flip, ``ColorJitter`` (p 0.8), ``RandomGrayscale`` (0.2), blur if the recipe blurs, ``ToTensor``,
  ``Normalize``, two views, in ``--workers`` DataLoader workers with pinned memory;
- **render**: the batched renderer alone (plan, crop, resize, photometric ops of every view), no model; it and
  **gpu** render eagerly unless the recipe sets ``data.compile_views=true``;
- **compiled_render** (on request): the renderer alone with every view through ``torch.compile``
  (``data.compile_views``), compiled during the warm-up; with **render** it prints the ratio of the two;
- **cpu_render**: the torchvision pipeline alone (workers, collation, pinned copies), no model;
- **eval** / **cpu_eval** (on request): the kNN monitor's feature pass, the backbone in eval mode on one
  deterministic evaluation view per image, the views rendered from the device store
  (:class:`~contrastlab.data.device_loader.DeviceEvalLoader`) or by ``--workers`` CPU workers.

It prints images per second, the ratios gpu/model and gpu/cpu, and peak device memory, and writes a JSON file.
Numbers are only comparable within one run on one machine; the JSON names the device.

Example:
    contrastlab bench cifar10/mocov2_r18_500ep method.symmetric=true --shape cifar --workers 16 --out bench.json
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from contrastlab import __version__, assemble
from contrastlab.config.derived import derive
from contrastlab.config.schema import Config
from contrastlab.data.base import ArrayDataset
from contrastlab.data.device_images import DeviceImages
from contrastlab.data.device_loader import DeviceEvalLoader, DeviceViewLoader, batch_seed, evaluation_loader
from contrastlab.data.jpeg import decode_batch
from contrastlab.engine.device import PRECISIONS, compile_model, select_device
from contrastlab.engine.optim import build_optimizer
from contrastlab.views.batch_views import BatchViews
from contrastlab.views.photometric import blur_kernel_size

PARTS = ("model", "gpu", "cpu", "render", "cpu_render", "eval", "cpu_eval", "compiled_render")
"""Every measurable part (see the module docstring); the first five run by default."""

SHAPES = {"cifar": (32, 32), "imagenet": (256, 320)}
"""Source image (height, width) of the synthetic data of each ``--shape`` (the views take the recipe's size)."""


@dataclass
class Measurement:
    """One fed configuration: images per second over the timed steps and the peak device memory."""

    name: str
    img_per_s: float
    steps: int
    seconds: float
    peak_memory_mib: float | None


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth random RGB images ``[n, H, W, 3]`` uint8 (blocky noise, upsampled: JPEG-compressible)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, height // 8), max(2, width // 8), generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class SyntheticImages(ArrayDataset):
    """An :class:`~contrastlab.data.base.ArrayDataset` over given images, ten classes in turn."""

    def __init__(self, data: np.ndarray, name: str = "synthetic") -> None:
        self.data = data
        self.targets = [i % 10 for i in range(len(data))]
        self.classes = [str(c) for c in range(10)]
        self.name, self.split = name, "train"


class TorchvisionTwoViews(Dataset):
    """The baseline CPU pipeline: a torchvision ``Compose`` applied twice to each PIL image."""

    def __init__(self, images: ArrayDataset, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, label, index = self.images[i]
        return [self.transform(image), self.transform(image)], label, index


def torchvision_transform(cfg: Config) -> T.Compose:
    """The recipe's first view as the torchvision transforms the published codebases use."""
    recipe = assemble.training_views(cfg, SyntheticImages(synthetic_images(1, 8, 8))).photometrics[0]
    size = assemble.image_size(cfg)
    params = cfg.views.params  # the baseline crops as torchvision's RandomResizedCrop (every planner's sizes do)
    steps: list = [T.RandomResizedCrop(size, scale=tuple(params.get("scale", (0.08, 1.0))),
                                       ratio=tuple(params.get("ratio", (3 / 4, 4 / 3))))]
    if recipe.jitter_prob > 0 and any(recipe.jitter):
        steps.append(T.RandomApply([T.ColorJitter(*recipe.jitter)], p=recipe.jitter_prob))
    if recipe.grayscale_prob > 0:
        steps.append(T.RandomGrayscale(recipe.grayscale_prob))
    if recipe.blur_prob > 0:
        k = blur_kernel_size(size, recipe.blur_kernel_fraction)
        steps.append(T.RandomApply([T.GaussianBlur(k, recipe.blur_sigma)], p=recipe.blur_prob))
    steps += [T.RandomHorizontalFlip(recipe.flip_prob), T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class TrainStep:
    """The recipe's training step (forward, backward, optimiser, EMA) with its precision and memory format."""

    def __init__(self, cfg: Config, device: torch.device, compile_step: bool = False) -> None:
        torch.manual_seed(cfg.seed)
        self.method = assemble.method(cfg, 10).to(device)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        if cfg.model.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        d = derive(cfg, 1, cfg.data.batch_size * 4)
        self.optimizer = build_optimizer(self.method.param_groups(), cfg.optim, d.lr)
        self.amp = PRECISIONS[cfg.train.precision]
        self.device, self.ema = device, cfg.train.ema_momentum
        self.forward = compile_model(self.method, "default") if compile_step else self.method

    def __call__(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
        labels, index = labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            loss = self.forward(views, labels, index).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_optimizer_step(self.ema)
        return loss.detach()


class FeaturePass:
    """The kNN monitor's feature pass: the backbone in eval mode, no gradient, the recipe's precision."""

    def __init__(self, cfg: Config, device: torch.device, backbone: torch.nn.Module | None = None) -> None:
        if backbone is None:
            torch.manual_seed(cfg.seed)
            backbone = assemble.backbone(cfg)[0].to(device)
        self.backbone, self.device, self.amp = backbone, device, PRECISIONS[cfg.train.precision]

    @torch.no_grad()
    def __call__(self, views: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> None:
        view = views[0] if isinstance(views, (list, tuple)) else views
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            self.backbone(view.to(self.device, non_blocking=True))
        self.backbone.train(was_training)


def _repeat(loader: Iterable) -> Iterable:
    """``loader``'s batches over and over."""
    while True:
        yield from loader


def time_loop(name: str, batches: Iterable, step: Callable | None, batch_size: int, steps: int, warmup: int,
              device: torch.device) -> Measurement:
    """Run ``warmup`` then ``steps`` items of ``batches`` through ``step`` (None: only draw them); images per second."""
    iterator = iter(batches)
    for _ in range(warmup):
        item = next(iterator)
        if step is not None:
            step(*item)
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        item = next(iterator)
        if step is not None:
            step(*item)
    _sync(device)
    seconds = time.perf_counter() - start
    return Measurement(name, steps * batch_size / seconds, steps, seconds, _peak_mib(device))


def _random_batches(n: int, batch: int, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (batch,), generator=g).tolist() for _ in range(count)]


def _jpeg_batches(blobs: list[torch.Tensor], targets: torch.Tensor, views: BatchViews, batches: list[list[int]],
                  seed: int, device: torch.device):
    """The GPU pipeline on JPEG files: decode each batch on the device, then render (as an ImageFolder run would)."""
    generator = torch.Generator(device=device)
    for k, rows in enumerate(batches):
        canvas, sizes = decode_batch([blobs[i] for i in rows], device)
        index = torch.tensor(rows, device=device)
        generator.manual_seed(batch_seed(seed, 0, 0, k))
        yield views(canvas, index, generator, image_sizes=sizes), targets[index], index


def run_benchmark(cfg: Config, shape: str = "cifar", images: int = 0, steps: int = 20, warmup: int = 3,
                  workers: int = 4, jpeg: bool = False, compile_step: bool = False,
                  parts: Iterable[str] = ("model", "gpu", "cpu", "render", "cpu_render"), log: Callable = print) -> dict:
    """Measure ``parts`` for ``cfg`` (see the module docstring); returns the JSON-ready result."""
    device = select_device(cfg.train.device)
    batch = cfg.data.batch_size
    height, width = SHAPES[shape]
    n = images or min(max(4 * batch, 1024), 50_000)
    data = SyntheticImages(synthetic_images(n, height, width, cfg.seed))
    training_views = assemble.training_views(cfg, data)
    views = BatchViews.from_view_dataset(training_views, compile=cfg.data.compile_views)
    store = DeviceImages.from_dataset(data, device)
    count = warmup + steps
    blobs = None
    if jpeg:
        blobs = [torchvision.io.encode_jpeg(torch.from_numpy(im).permute(2, 0, 1).contiguous(), quality=90)
                 for im in data.data]
    parts = list(parts)
    step = TrainStep(cfg, device, compile_step) if {"model", "gpu", "cpu"} & set(parts) else None
    results: dict[str, Measurement] = {}

    def gpu_batches(views: BatchViews = views):
        batches = _random_batches(n, batch, count, cfg.seed)
        if blobs is not None:
            return _jpeg_batches(blobs, store.targets, views, batches, cfg.seed, device)
        return DeviceViewLoader(store, views, cfg.seed)(batches, epoch=0)

    if "model" in parts:
        fixed = next(iter(gpu_batches()))
        results["model"] = time_loop("model", iter(lambda: fixed, None), step, batch, steps, warmup, device)
    if "gpu" in parts:
        results["gpu"] = time_loop("gpu" + ("+jpeg" if jpeg else ""), gpu_batches(), step, batch, steps, warmup,
                                   device)
    render = "render+jpeg" if jpeg else "render"
    if "render" in parts:
        results["render"] = time_loop(render + (" compiled" if views.compile else ""), gpu_batches(), None, batch,
                                      steps, warmup, device)
    if "compiled_render" in parts:
        compiled = BatchViews.from_view_dataset(training_views, compile=True)
        results["compiled_render"] = time_loop(render + " compiled", gpu_batches(compiled), None, batch, steps,
                                               warmup, device)
        if compiled.compile_error:
            log(f"compiled_render ran eagerly: {compiled.compile_error}")
    if "cpu" in parts or "cpu_render" in parts:
        baseline = TorchvisionTwoViews(data, torchvision_transform(cfg))
        cpu_loader = DataLoader(baseline, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                generator=torch.Generator().manual_seed(cfg.seed))

        def endless():
            while True:
                yield from cpu_loader

        if "cpu" in parts:
            results["cpu"] = time_loop(f"cpu ({workers} workers)", endless(), step, batch, steps, warmup, device)
        if "cpu_render" in parts:
            results["cpu_render"] = time_loop(f"cpu render ({workers} w)", endless(), None, batch, steps, warmup,
                                              device)
    if "eval" in parts or "cpu_eval" in parts:
        features = FeaturePass(cfg, device, step.method.backbone if step is not None else None)
        eval_set = assemble.evaluation_views(cfg, data)
        if "eval" in parts:
            results["eval"] = time_loop("eval views (gpu)", _repeat(DeviceEvalLoader(eval_set, device, batch, store)),
                                        features, batch, steps, warmup, device)
        if "cpu_eval" in parts:
            cpu_eval = evaluation_loader(eval_set, batch_size=batch, workers=workers, device=device)
            results["cpu_eval"] = time_loop(f"eval views ({workers} w)", _repeat(cpu_eval), features, batch, steps,
                                            warmup, device)
    summary = {
        "recipe_description": cfg.description, "shape": shape, "source_size": [height, width],
        "view_size": assemble.image_size(cfg), "batch_size": batch, "images": n, "steps": steps, "warmup": warmup,
        "workers": workers, "jpeg": jpeg, "compile": compile_step, "compile_views": views.compile,
        "precision": cfg.train.precision,
        "channels_last": cfg.model.channels_last, "device": _device_name(device),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "contrastlab": __version__,
        "results": {k: asdict(v) for k, v in results.items()},
    }
    if "gpu" in results and "model" in results:
        summary["gpu_over_model"] = results["gpu"].img_per_s / results["model"].img_per_s
    if "gpu" in results and "cpu" in results:
        summary["gpu_over_cpu"] = results["gpu"].img_per_s / results["cpu"].img_per_s
    if "render" in results and "cpu_render" in results:
        summary["render_over_cpu_render"] = results["render"].img_per_s / results["cpu_render"].img_per_s
    if "compiled_render" in results and "render" in results:
        summary["compiled_render_over_render"] = results["compiled_render"].img_per_s / results["render"].img_per_s
    if "eval" in results and "cpu_eval" in results:
        summary["eval_over_cpu_eval"] = results["eval"].img_per_s / results["cpu_eval"].img_per_s
    if "gpu" in results:
        summary["epoch_50k_seconds"] = 50_000 / results["gpu"].img_per_s
    for line in format_table(summary):
        log(line)
    return summary


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(summary: dict) -> list[str]:
    """The printed table: one line per measurement, then the ratios."""
    setting = (f"device {summary['device']}, batch {summary['batch_size']}, source {summary['source_size'][0]}x"
               f"{summary['source_size'][1]} -> views {summary['view_size']} px, {summary['precision']}, "
               f"{summary['steps']} timed steps")
    lines = [summary["recipe_description"], setting, f"{'fed by':<22}{'img/s':>12}{'peak MiB':>12}"]
    for m in summary["results"].values():
        peak = "-" if m["peak_memory_mib"] is None else f"{m['peak_memory_mib']:.0f}"
        lines.append(f"{m['name']:<22}{m['img_per_s']:>12,.0f}{peak:>12}")
    for key, label in (("gpu_over_model", "gpu / model"), ("gpu_over_cpu", "gpu / cpu"),
                       ("render_over_cpu_render", "render / cpu render"),
                       ("compiled_render_over_render", "compiled / eager"), ("eval_over_cpu_eval", "eval / cpu eval")):
        if key in summary:
            lines.append(f"{label:<22}{summary[key]:>12.2f}")
    if "epoch_50k_seconds" in summary:
        lines.append(f"{'50k-image epoch (gpu)':<22}{summary['epoch_50k_seconds']:>11.1f}s")
    return lines


def write_json(summary: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
