"""The batched renderer against torchvision's functional ops (fixed parameters) and the CPU recipe's laws."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from contrastlab.views import gpu_render as gr
from contrastlab.views.boxes import box_to_pixels
from contrastlab.views.photometric import make_photometric
from contrastlab.views.render import render_box

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _random_boxes(n: int, width: int, height: int, g: torch.Generator, integer: bool = True) -> torch.Tensor:
    x0 = torch.rand(n, generator=g) * (width - 1)
    y0 = torch.rand(n, generator=g) * (height - 1)
    x1 = x0 + 1 + torch.rand(n, generator=g) * (width - 1 - x0)
    y1 = y0 + 1 + torch.rand(n, generator=g) * (height - 1 - y0)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return boxes.floor() if integer else boxes


@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (64, 48, 16), (20, 30, 40)])
def test_render_crops_equals_torchvision_resized_crop(height: int, width: int, size: int) -> None:
    g = torch.Generator().manual_seed(size)
    images = torch.rand(12, 3, height, width, generator=g)
    boxes = _random_boxes(12, width, height, g, integer=False)
    flip = torch.arange(12) % 3 == 0
    out = gr.render_crops(images, boxes, size, flip)
    for b in range(12):
        top, left, h, w = box_to_pixels(tuple(boxes[b].tolist()))
        expected = TF.resized_crop(images[b], top, left, h, w, [size, size], antialias=True)
        if flip[b]:
            expected = TF.hflip(expected)
        torch.testing.assert_close(out[b], expected, atol=2e-6, rtol=0)


def test_render_crops_matches_the_cpu_renderer_within_one_level() -> None:
    """The CPU path resizes uint8 PIL images in fixed point: at most one grey level apart."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (8, 3, 40, 36), generator=g, dtype=torch.uint8)
    boxes = _random_boxes(8, 36, 40, g)
    out = gr.render_crops(images, boxes, 24)
    for b in range(8):
        pil = Image.fromarray(images[b].permute(1, 2, 0).numpy())
        expected = torch.from_numpy(np.array(render_box(pil, tuple(boxes[b].tolist()), 24))).permute(2, 0, 1)
        assert (out[b] * 255 - expected.float()).abs().max() <= 1.0 + 1e-3


def test_padded_boxes_read_zeros_outside_the_image() -> None:
    g = torch.Generator().manual_seed(4)
    images = torch.rand(6, 3, 16, 16, generator=g)
    shifts = torch.tensor([[-4, -4], [4, 4], [-3, 2], [0, 0], [4, -4], [1, -2]], dtype=torch.float32)
    boxes = torch.cat([shifts, shifts + 16], 1)
    for size in (16, 12):
        out = gr.render_crops(images, boxes, size, pad=4)
        for b in range(6):
            left, top = int(shifts[b, 0]), int(shifts[b, 1])
            crop = TF.crop(images[b], top, left, 16, 16)  # torchvision pads with zeros outside
            expected = crop if size == 16 else TF.resize(crop, [size, size], antialias=True)
            torch.testing.assert_close(out[b], expected, atol=2e-6, rtol=0)


def test_color_jitter_equals_torchvision_ops_in_the_drawn_order() -> None:
    g = torch.Generator().manual_seed(5)
    images = torch.rand(24, 3, 8, 8, generator=g)
    order = torch.tensor(list(itertools.permutations(range(4))))  # every order once
    factors = torch.stack([0.6 + 0.8 * torch.rand(24, generator=g), 0.6 + 0.8 * torch.rand(24, generator=g),
                           0.6 + 0.8 * torch.rand(24, generator=g), 0.2 * torch.rand(24, generator=g) - 0.1], 1)
    out = gr.color_jitter(images, order, factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for b in range(24):
        expected = images[b]
        for op in order[b].tolist():
            expected = ops[op](expected, float(factors[b, op]))
        torch.testing.assert_close(out[b], expected, atol=2e-5, rtol=0)


def test_hsv_round_trip_and_hue_shift_on_edge_colours() -> None:
    """Greys, saturated primaries and ties between channels, against torchvision's adjust_hue."""
    colours = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
                            [1, 0, 1], [0.5, 0.5, 0.2], [0.2, 0.5, 0.5], [0.3, 0.1, 0.3], [0.9, 0.2, 0.4]])
    x = colours.T.reshape(1, 3, 3, 4).repeat(5, 1, 1, 1)
    shifts = torch.tensor([0.0, 0.1, -0.1, 0.5, -0.45])
    out = gr.adjust_hue(x, shifts)
    for b in range(5):
        torch.testing.assert_close(out[b], TF.adjust_hue(x[b], float(shifts[b])), atol=2e-6, rtol=0)
    torch.testing.assert_close(gr.hsv_to_rgb(*gr.rgb_to_hsv(x)), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size,kernel", [(32, 3), (24, 5), (64, 7)])
def test_gaussian_blur_equals_torchvision(size: int, kernel: int) -> None:
    g = torch.Generator().manual_seed(size)
    images = torch.rand(5, 3, size, size, generator=g)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    apply = torch.tensor([True, True, False, True, True])
    out = gr.gaussian_blur(images, sigma, kernel, apply)
    for b in range(5):
        expected = TF.gaussian_blur(images[b], [kernel, kernel], [float(sigma[b])] * 2) if apply[b] else images[b]
        torch.testing.assert_close(out[b], expected, atol=2e-6, rtol=0)


def test_grayscale_solarize_and_normalise_equal_torchvision() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 3, 6, 6, generator=g)
    apply = torch.tensor([True, False, True, False])
    gray = gr.to_grayscale(x, apply)
    sol = gr.solarize(x, 128 / 255, apply)
    for b in range(4):
        torch.testing.assert_close(gray[b], TF.rgb_to_grayscale(x[b], 3) if apply[b] else x[b], atol=1e-7, rtol=0)
        torch.testing.assert_close(sol[b], TF.solarize(x[b], 128 / 255) if apply[b] else x[b], atol=0, rtol=0)
    recipe = make_photometric("none", 0, MEAN, STD)
    draw = gr.draw_photometric(recipe, 4, torch.Generator().manual_seed(0))
    out = gr.apply_photometric(x, recipe, draw)
    for b in range(4):
        torch.testing.assert_close(out[b], TF.normalize(x[b], list(MEAN), list(STD)), atol=1e-6, rtol=0)


def test_a_whole_recipe_with_fixed_draws_equals_the_torchvision_composition() -> None:
    """BYOL's second view: jitter, grayscale, blur, solarise, flip, normalise, each sample its own draw."""
    recipe = make_photometric("byol", 1, MEAN, STD, blur_prob=0.5, solarize_prob=0.5)
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    draw = gr.draw_photometric(recipe, 64, torch.Generator().manual_seed(8))
    boxes = torch.tensor([[2.0, 3.0, 30.0, 25.0]]).repeat(64, 1)
    out = gr.apply_photometric(gr.render_crops(images, boxes, 32, draw.flip), recipe, draw)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    kernel = 3
    for b in range(64):
        x = TF.resized_crop(images[b], 3, 2, 22, 28, [32, 32], antialias=True)
        if draw.jitter[b]:
            for op in draw.order[b].tolist():
                x = ops[op](x, float(draw.factors[b, op]))
        if draw.gray[b]:
            x = TF.rgb_to_grayscale(x, 3)
        if draw.blur[b]:
            x = TF.gaussian_blur(x, [kernel, kernel], [float(draw.sigma[b])] * 2)
        if draw.solarize[b]:
            x = TF.solarize(x, 128 / 255)
        if draw.flip[b]:
            x = TF.hflip(x)
        torch.testing.assert_close(out[b], TF.normalize(x, list(MEAN), list(STD)), atol=5e-5, rtol=0)


def _binomial_ok(hits: torch.Tensor, p: float) -> bool:
    n = hits.numel()
    return abs(float(hits.float().sum()) - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def _ks_uniform(x: torch.Tensor, low: float, high: float) -> float:
    s = np.sort(((x.double() - low) / (high - low)).numpy())
    n = len(s)
    return float(max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n)))


@pytest.mark.parametrize("name,view", [("simclr", 0), ("byol", 0), ("byol", 1), ("mocov1", 0)])
def test_drawn_parameters_follow_the_recipe_laws(name: str, view: int) -> None:
    recipe = make_photometric(name, view, MEAN, STD)
    n = 20000
    draw = gr.draw_photometric(recipe, n, torch.Generator().manual_seed(11))
    for coin, p in ((draw.jitter, recipe.jitter_prob), (draw.gray, recipe.grayscale_prob),
                    (draw.blur, recipe.blur_prob), (draw.solarize, recipe.solarize_prob),
                    (draw.flip, recipe.flip_prob)):
        assert _binomial_ok(coin, p)
    critical = 1.95 / math.sqrt(n)  # KS at a false-alarm rate of about 0.001
    jittered = draw.factors[draw.jitter]
    for k, strength in enumerate(recipe.jitter):
        low, high = (max(0.0, 1 - strength), 1 + strength) if k < 3 else (-strength, strength)
        assert _ks_uniform(jittered[:, k], low, high) < 1.95 / math.sqrt(len(jittered))
    assert (draw.factors[~draw.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    assert _ks_uniform(draw.sigma, *recipe.blur_sigma) < critical
    counts = torch.zeros(24)
    index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    for row in draw.order.tolist():
        counts[index[tuple(row)]] += 1
    chi2 = float(((counts - n / 24) ** 2 / (n / 24)).sum())
    assert chi2 < 60.0  # 23 degrees of freedom: P(chi2 > 60) ~ 4e-5


def test_uint8_single_channel_images_render_as_rgb_views() -> None:
    g = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=g, dtype=torch.uint8)
    recipes = [make_photometric("none", v, MEAN, STD, flip_prob=0.0) for v in range(2)]
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0]]).expand(4, 2, 4)
    views = gr.render_views(images, boxes, [28, 14], recipes, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 28, 28), (4, 3, 14, 14)]
    expected = (images.float() / 255).expand(-1, 3, -1, -1)
    torch.testing.assert_close(views[0], TF.normalize(expected, list(MEAN), list(STD)), atol=1e-5, rtol=0)


FORBIDDEN_CALLS = {"item", "tolist", "cpu", "numpy", "nonzero", "synchronize"}


@pytest.mark.parametrize("module", ["views/gpu_render.py", "views/batch_views.py"])
def test_renderer_never_reads_device_values_back(module: str) -> None:
    """Code-level check (CI has no GPU): no call that copies a device value to the host."""
    import contrastlab

    source = (Path(contrastlab.__file__).parent / module).read_text()
    bad = [f"line {node.lineno}: .{node.func.attr}()" for node in ast.walk(ast.parse(source))
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_CALLS]
    assert not bad, bad


def test_renderer_runs_every_recipe_without_reading_device_values(monkeypatch) -> None:
    """Runtime check: every recipe and planner kind through BatchViews, with syncing tensor calls trapped."""
    from sync_guard import forbid_host_sync

    from contrastlab.views import batch_views, make_planner
    from contrastlab.views.batch_views import BatchViews
    from contrastlab.views.box_store import BoxStore
    from contrastlab.views.joint_blur import JointBlur
    from contrastlab.views.planners.contrastive_crop import ContrastiveCropPlanner

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    cases = [(make_planner("random_resized"), name, None, None) for name in ("simclr", "byol", "mocov1", "eval")]
    cases += [(make_planner("padded_crop", num_views=2), "small", None, None),
              (ContrastiveCropPlanner(BoxStore(16)), "mocov2", None, None),
              (make_planner("joint_crop"), "byol", JointBlur(mode="either"), make_planner("random_resized"))]
    built = [BatchViews(planner, [32] * 2, [make_photometric(name, v, MEAN, STD) for v in range(2)], blur, other)
             for planner, name, blur, other in cases]
    forbid_host_sync(monkeypatch, gr.__file__, batch_views.__file__)
    for views in built:
        out = views(images, torch.arange(16), torch.Generator().manual_seed(0))
        assert [tuple(v.shape) for v in out] == [(16, 3, 32, 32)] * 2


def _all_stages_recipe():
    """BYOL's second view with every stage firing half the time (jitter incl. hue, grayscale, blur, solarize, flip)."""
    return make_photometric("byol", 1, MEAN, STD, blur_prob=0.5, solarize_prob=0.5, grayscale_prob=0.5)


def test_compiled_views_render_the_pixels_of_the_eager_renderer() -> None:
    """data.compile_views: the same draws through torch.compile give the eager renderer's pixels (float rounding)."""
    from torch._dynamo.utils import counters

    from contrastlab.views import make_planner
    from contrastlab.views.batch_views import BatchViews

    recipe = _all_stages_recipe()
    images = torch.randint(0, 256, (64, 3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    eager = BatchViews(make_planner("random_resized"), [24, 24], [recipe, recipe])
    compiled = BatchViews(make_planner("random_resized"), [24, 24], [recipe, recipe], compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for seed in (3, 4):  # the second batch reuses the compiled code
        expected = eager(images, torch.arange(64), torch.Generator().manual_seed(seed))
        got = compiled(images, torch.arange(64), torch.Generator().manual_seed(seed))
        for a, b in zip(expected, got):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert compiled.compile and compiled.compile_error is None
    assert counters["stats"]["unique_graphs"] > graphs  # it did go through Dynamo


_COMPILE_WITHOUT_A_COMPILER = """
import torch
from contrastlab.views import make_photometric, make_planner
from contrastlab.views.batch_views import BatchViews
recipe = make_photometric("none", 0, (0.5,) * 3, (0.25,) * 3)
images = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
messages = []
views = BatchViews(make_planner("random_resized", num_views=1), [16], [recipe], compile=True)
views.log = messages.append
got = views(images, torch.arange(8), torch.Generator().manual_seed(0))[0]
expected = BatchViews(make_planner("random_resized", num_views=1), [16], [recipe])(images, torch.arange(8),
                                                                         torch.Generator().manual_seed(0))[0]
assert torch.equal(got, expected) and not views.compile, views.compile_error
print(messages[0])
"""


def test_views_are_rendered_eagerly_when_compiling_them_fails(tmp_path) -> None:
    """A machine without a C++ compiler (inductor's CXX points nowhere, fresh cache): the batch is rendered eagerly,
    the same pixels, and the failure is reported once."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-c", _COMPILE_WITHOUT_A_COMPILER], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("data.compile_views: compiling the views failed (")
    assert done.stdout.rstrip().endswith("rendering them eagerly")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect synchronisations")
@pytest.mark.parametrize("compiled", [False, True])
def test_renderer_runs_without_synchronising_on_cuda(compiled: bool) -> None:
    recipes = [make_photometric("byol", v, MEAN, STD) for v in range(2)]
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    boxes = torch.tensor([[1.0, 2.0, 30.0, 31.0]], device="cuda").expand(64, 2, 4)
    render = gr.compiled_render_view() if compiled else gr.render_view
    gr.render_views(images, boxes, [32, 32], recipes, g, render=render)  # warm the caches (and compile)
    torch.cuda.set_sync_debug_mode("error")
    try:
        gr.render_views(images, boxes, [32, 32], recipes, g, render=render)
    finally:
        torch.cuda.set_sync_debug_mode("default")
