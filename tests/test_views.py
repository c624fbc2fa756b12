"""Tests of the view layer against independent computations: torchvision's own samplers and transforms
under the same RNG state, explicit pixel formulas, and brute-force statistics."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from contrastlab.errors import ConfigError
from contrastlab.views import (
    PHOTOMETRICS,
    PLANNERS,
    CenterCropPlanner,
    FixedBoxPlanner,
    MultiCropPlanner,
    PaddedCropPlanner,
    Planner,
    PlannerContext,
    RandomResizedCropPlanner,
    ViewDataset,
    box_area,
    box_from_pixels,
    box_to_pixels,
    clip_box,
    eval_view_dataset,
    make_photometric,
    make_planner,
    render_box,
    seed_worker,
    validate_box,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), mode="RGB")


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Random blobs: a textured but not white-noise image, so jitter and blur act realistically."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    return Image.fromarray(small, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)


class TinyImages:
    """Stand-in for a contrastlab dataset: (PIL RGB image, label, index)."""

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        self.images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, int]:
        return self.images[i], i % 3, i


def tv_params(width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's sampler on an image of the given size (empty tensors draw no random numbers)."""
    return T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))


# ---------------------------------------------------------------------------------------------- planners

SHAPES = [(32, 32), (64, 48), (48, 64), (500, 375), (7, 9), (1000, 12), (12, 1000), (300, 40), (1, 1)]
SCALES = [(0.08, 1.0), (0.2, 1.0), (0.9, 1.0), (0.05, 0.14)]
RATIOS = [(3 / 4, 4 / 3), (0.5, 2.0), (1.0, 1.0)]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_resized_matches_torchvision_get_params(scale, ratio):
    planner = RandomResizedCropPlanner(num_views=4, scale=scale, ratio=ratio)
    for seed in range(6):
        for width, height in SHAPES:
            torch.manual_seed(seed)
            expected = [tv_params(width, height, scale, ratio) for _ in range(4)]
            after_tv = torch.rand(1)
            torch.manual_seed(seed)
            boxes = planner.plan(seed, width, height)
            assert [box_to_pixels(b) for b in boxes] == expected
            # Same number of draws as torchvision: the global stream continues identically.
            assert torch.equal(torch.rand(1), after_tv)
            # An explicit generator with the same seed gives the same boxes.
            assert planner.plan(seed, width, height, torch.Generator().manual_seed(seed)) == boxes


def test_explicit_generator_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    RandomResizedCropPlanner(num_views=8).plan(0, 100, 80, torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3), expected)


def test_random_resized_fallback_is_central_crop():
    # Every attempt fails on these strips: the smallest crop (0.08 * area, ratio <= 4/3) is taller than
    # 12 px. The fallback clamps the aspect ratio into [3/4, 4/3] and centres the crop, computed by hand.
    planner = RandomResizedCropPlanner(num_views=3)
    for seed in range(5):
        torch.manual_seed(seed)
        assert planner.plan(0, 1000, 12) == [(492.0, 0.0, 508.0, 12.0)] * 3  # w = 12 * 4/3 = 16
        assert planner.plan(0, 12, 1000) == [(0.0, 492.0, 12.0, 508.0)] * 3  # h = 12 / (3/4) = 16


def test_random_resized_box_invariants():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    planner = RandomResizedCropPlanner(num_views=8, scale=scale, ratio=ratio)
    gen = torch.Generator().manual_seed(0)
    for width, height in [(32, 32), (96, 96), (500, 375), (375, 500), (224, 150)]:
        area = width * height
        fractions = []
        for _ in range(150):
            for box in planner.plan(0, width, height, gen):
                validate_box(box, width, height)
                assert all(float(v).is_integer() for v in box)
                w, h = box[2] - box[0], box[3] - box[1]
                # w and h are the rounded sqrt(A*r), sqrt(A/r): some (w', h') within 0.5 px of them
                # must have area fraction in scale and aspect ratio in ratio.
                assert (w + 0.5) * (h + 0.5) >= scale[0] * area
                assert (w - 0.5) * (h - 0.5) <= scale[1] * area
                assert (w + 0.5) / max(h - 0.5, 1e-9) >= ratio[0]
                assert (w - 0.5) / (h + 0.5) <= ratio[1]
                fractions.append(box_area(box) / area)
        # Large crops must be reachable and small crops common: a brute-force look at the spread.
        assert min(fractions) < 0.15 and max(fractions) > 0.85


def test_random_resized_positions_cover_image():
    # Brute-force statistic: the crop's left edge is uniform over its feasible range, so over many draws
    # of a fixed-size crop the mean normalised offset is about 1/2.
    planner = RandomResizedCropPlanner(num_views=1, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    gen = torch.Generator().manual_seed(1)
    offsets = []
    for _ in range(2000):
        ((x0, y0, x1, y1),) = planner.plan(0, 200, 200, gen)
        assert (x1 - x0, y1 - y0) == (100.0, 100.0)
        offsets.append((x0 / 100.0, y0 / 100.0))
    mean = np.mean(offsets, axis=0)
    assert np.all(np.abs(mean - 0.5) < 0.03)


def test_multicrop_counts_order_and_scales():
    planner = MultiCropPlanner(num_large=2, num_small=6)
    assert planner.num_views == 8
    gen = torch.Generator().manual_seed(0)
    width, height = 640, 480
    area = width * height
    for _ in range(100):
        boxes = planner.plan(0, width, height, gen)
        assert len(boxes) == 8
        for k, box in enumerate(boxes):
            validate_box(box, width, height)
            w, h = box[2] - box[0], box[3] - box[1]
            lo, hi = (0.14, 1.0) if k < 2 else (0.05, 0.14)
            assert (w + 0.5) * (h + 0.5) >= lo * area and (w - 0.5) * (h - 0.5) <= hi * area


def test_multicrop_matches_torchvision_sequence():
    planner = MultiCropPlanner(num_large=2, num_small=3, large_scale=(0.3, 1.0), small_scale=(0.05, 0.2))
    ratio = (3 / 4, 4 / 3)
    for seed in range(10):
        torch.manual_seed(seed)
        expected = [tv_params(200, 150, (0.3, 1.0), ratio) for _ in range(2)]
        expected += [tv_params(200, 150, (0.05, 0.2), ratio) for _ in range(3)]
        torch.manual_seed(seed)
        assert [box_to_pixels(b) for b in planner.plan(seed, 200, 150)] == expected


def test_fixed_and_center_planners():
    assert FixedBoxPlanner().plan(0, 40, 30) == [(0.0, 0.0, 40.0, 30.0)]
    assert FixedBoxPlanner((5, 5, 100, 20), num_views=2).plan(0, 40, 30) == [(5.0, 5.0, 40.0, 20.0)] * 2
    with pytest.raises(ValueError):
        FixedBoxPlanner((50, 50, 60, 60)).plan(0, 40, 30)
    with pytest.raises(ConfigError):
        FixedBoxPlanner((10, 10, 5, 20))
    for width, height in [(320, 240), (240, 320), (33, 32), (32, 32), (257, 100)]:
        img = random_image(width, height, seed=width)
        for fraction in (0.875, 1.0, 0.5):
            (box,) = CenterCropPlanner(fraction).plan(0, width, height)
            side = round(fraction * min(width, height))
            assert box[2] - box[0] == side and box[3] - box[1] == side
            top, left, h, w = box_to_pixels(box)
            crop = np.asarray(img.crop((left, top, left + w, top + h)))
            np.testing.assert_array_equal(crop, np.asarray(TF.center_crop(img, [side, side])))


def test_padded_crop_equals_torchvision_random_crop_with_padding():
    planner = PaddedCropPlanner(padding=4)
    for seed in range(20):
        img = random_image(32, 32, seed)
        torch.manual_seed(seed)
        expected = T.RandomCrop(32, padding=4)(img)
        torch.manual_seed(seed)
        (box,) = planner.plan(0, 32, 32)
        assert box[2] - box[0] == 32 and -4 <= box[0] <= 4 and -4 <= box[1] <= 4
        assert np.array_equal(np.asarray(render_box(img, box, 32)), np.asarray(expected)), seed
    data = TinyImages([(32, 32)] * 3)
    views, _, _ = ViewDataset(data, PaddedCropPlanner(padding=4, num_views=2), [32, 32],
                              [make_photometric("none", v, MEAN, STD) for v in range(2)])[0]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2
    g = torch.Generator().manual_seed(0)
    offsets = {tuple(int(c) for c in planner.plan(0, 32, 32, g)[0][:2]) for _ in range(2000)}
    assert offsets == {(x, y) for x in range(-4, 5) for y in range(-4, 5)}  # all 81 shifts occur


def test_planners_are_picklable_and_satisfy_protocol():
    for name in PLANNERS:
        cls = PLANNERS[name]
        planner = cls.from_settings(cls.Settings(), PlannerContext(image_size=32, num_images=10))
        assert isinstance(planner, Planner) and len(planner.view_sizes(32)) == planner.num_views
        clone = pickle.loads(pickle.dumps(planner))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert clone.plan(7, 90, 60, g1) == planner.plan(7, 90, 60, g2)


def test_make_planner_errors():
    assert make_planner("random_resized", num_views=3, scale=[0.2, 1.0]).scale == (0.2, 1.0)
    with pytest.raises(ConfigError, match="random_resized"):
        make_planner("random_resize")
    with pytest.raises(ConfigError, match="scale"):
        make_planner("random_resized", scales=(0.2, 1.0))
    with pytest.raises(ConfigError):
        make_planner("random_resized", scale=(0.5, 0.2))
    with pytest.raises(ConfigError):
        make_planner("multicrop", num_large=0)
    with pytest.raises(ConfigError):
        make_planner("center", crop_fraction=1.5)


# ------------------------------------------------------------------------------------------------- boxes


def test_box_helpers():
    assert box_area((1.0, 2.0, 4.0, 6.0)) == 12.0
    for params in [(0, 0, 1, 1), (3, 7, 10, 20), (99, 0, 1, 50)]:
        assert box_to_pixels(box_from_pixels(*params)) == params
    assert box_to_pixels((2.4, 3.6, 10.5, 8.49)) == (4, 2, 4, 9)  # top 4, left 2, bottom 8, right 11
    assert clip_box((-5, 3, 50, 70), 40, 30) == (0.0, 3.0, 40.0, 30.0)
    with pytest.raises(ValueError):
        validate_box((0, 0, 0, 5))
    with pytest.raises(ValueError):
        validate_box((0, 0, 41, 5), width=40, height=30)
    with pytest.raises(ValueError):
        validate_box((0, 0, float("nan"), 5))


# ------------------------------------------------------------------------------------------------ render


def test_render_box_equals_torchvision_resized_crop():
    gen = torch.Generator().manual_seed(0)
    planner = RandomResizedCropPlanner(num_views=6)
    for width, height, size in [(32, 32, 32), (64, 48, 24), (300, 200, 96), (17, 90, 40), (10, 10, 64)]:
        img = random_image(width, height, seed=size)
        boxes = planner.plan(0, width, height, gen) + [(0.0, 0.0, float(width), float(height))]
        for box in boxes:
            top, left, h, w = box_to_pixels(box)
            expected = TF.resized_crop(
                img, top, left, h, w, [size, size], T.InterpolationMode.BILINEAR, antialias=True
            )
            out = render_box(img, box, size)
            assert out.size == (size, size)
            np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_render_box_snaps_fractional_boxes():
    img = random_image(50, 40, seed=1)
    a = render_box(img, (3.4, 5.5, 30.2, 33.6), 20)
    b = TF.resized_crop(img, 6, 3, 28, 27, [20, 20], T.InterpolationMode.BILINEAR, antialias=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------- photometric


def normalise_by_hand(img: Image.Image) -> np.ndarray:
    x = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0
    return (x - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]


def test_eval_recipe_is_plain_normalisation():
    recipe = make_photometric("eval", 0, MEAN, STD)
    for seed in range(5):
        img = random_image(24, 24, seed)
        out = recipe(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), normalise_by_hand(img), atol=1e-5)


def test_none_recipe_flips_half_the_time():
    recipe = make_photometric("none", 0, MEAN, STD)
    img = random_image(16, 16, 0)
    plain, flipped = normalise_by_hand(img), normalise_by_hand(img.transpose(Image.FLIP_LEFT_RIGHT))
    torch.manual_seed(0)
    n_flip = 0
    for _ in range(400):
        out = recipe(img).numpy()
        if np.allclose(out, flipped, atol=1e-5):
            n_flip += 1
        else:
            np.testing.assert_allclose(out, plain, atol=1e-5)
    assert 0.42 < n_flip / 400 < 0.58


def torchvision_pipeline(name: str, view: int, size: int) -> T.Compose:
    """The recipe written independently as a torchvision v1 Compose, from the published settings."""
    simclr_jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    kernel = 2 * (int(0.1 * size) // 2) + 1
    kernel = max(kernel, 3)
    stages: list = []
    if name in ("simclr", "mocov2"):
        stages = [
            simclr_jitter,
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(kernel, (0.1, 2.0))], p=0.5),
        ]
    elif name == "small":
        stages = [simclr_jitter, T.RandomGrayscale(0.2)]
    elif name == "swav":  # facebookresearch/swav src/multicropdataset.py: get_color_distortion(s=1.0) + blur
        stages = [
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(kernel, (0.1, 2.0))], p=0.5),
        ]
    elif name == "mocov1":  # MoCo v1 greys before jittering; RandomApply(p=1) draws the coin ours draws
        stages = [T.RandomGrayscale(0.2), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.4)], p=1.0)]
    elif name == "byol":
        stages = [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(kernel, (0.1, 2.0))], p=1.0 if view == 0 else 0.1),
        ]
        if view >= 1:
            stages.append(T.RandomSolarize(128, p=0.2))
    elif name == "dino":  # DataAugmentationDINO: global_transfo1 / global_transfo2 / local_transfo
        blur = {0: 1.0, 1: 0.1}.get(view, 0.5)
        stages = [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([T.GaussianBlur(kernel, (0.1, 2.0))], p=blur),
        ]
        if view == 1:
            stages.append(T.RandomSolarize(128, p=0.2))
    elif name == "byol_small":  # solo-learn's cifar asymmetric.yaml: no blur, solarisation 0.2 on the second view
        stages = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
        if view >= 1:
            stages.append(T.RandomSolarize(128, p=0.2))
    elif name == "vicreg_cifar":  # solo-learn scripts/pretrain/cifar/vicreg.yaml, both views
        stages = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                  T.RandomSolarize(128, p=0.1)]
    if name != "eval":
        stages.append(T.RandomHorizontalFlip(0.5))
    return T.Compose([*stages, T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.mark.parametrize("name", sorted(PHOTOMETRICS))
def test_recipes_reproduce_torchvision_compose(name):
    for view in (0, 1, 2) if name in ("byol", "dino", "byol_small") else (0, 1):
        for size in (32, 48):
            recipe = make_photometric(name, view, MEAN, STD)
            reference = torchvision_pipeline(name, view, size)
            for seed in range(8):
                img = smooth_image(size, size, seed)
                torch.manual_seed(seed)
                expected = reference(img)
                torch.manual_seed(seed)
                out = recipe(img)
                assert torch.equal(out, expected), (name, view, size, seed)
                g = torch.Generator().manual_seed(seed)
                assert torch.equal(recipe(img, generator=g), expected)


def change_rate(recipe, img: Image.Image, n: int) -> float:
    """Fraction of ``n`` draws whose output differs from the plain normalised image."""
    reference = normalise_by_hand(img)
    torch.manual_seed(0)
    return sum(not np.allclose(recipe(img).numpy(), reference, atol=1e-5) for _ in range(n)) / n


@pytest.mark.parametrize(
    ("view", "n", "low", "high"), [(0, 60, 1.0, 1.0), (1, 300, 0.05, 0.16), (3, 300, 0.05, 0.16)]
)
def test_byol_blur_probability_per_view(view, n, low, high):
    # Jitter, grayscale, solarisation and flip off; sigma >= 1 so every blur visibly changes the image.
    recipe = make_photometric(
        "byol",
        view,
        MEAN,
        STD,
        jitter_prob=0.0,
        grayscale_prob=0.0,
        solarize_prob=0.0,
        flip_prob=0.0,
        blur_sigma=(1.0, 2.0),
    )
    assert low <= change_rate(recipe, random_image(24, 24, 0), n) <= high


@pytest.mark.parametrize(("view", "low", "high"), [(0, 0.0, 0.0), (1, 0.12, 0.28), (2, 0.12, 0.28)])
def test_byol_solarize_probability_per_view(view, low, high):
    recipe = make_photometric(
        "byol", view, MEAN, STD, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.0
    )
    rate = change_rate(recipe, random_image(24, 24, 1), 300)
    assert low <= rate <= high


def test_solarize_pixel_formula():
    recipe = make_photometric(
        "byol",
        1,
        MEAN,
        STD,
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        flip_prob=0.0,
        solarize_prob=1.0,
    )
    img = random_image(20, 20, 2)
    x = np.asarray(img)
    solarised = Image.fromarray(np.where(x >= 128, 255 - x, x).astype(np.uint8))
    np.testing.assert_allclose(recipe(img).numpy(), normalise_by_hand(solarised), atol=1e-5)


def test_jitter_and_grayscale_probabilities():
    # Grayscale alone: output channels equal (ITU-R 601 luma) in ~20% of draws.
    recipe = make_photometric("small", 0, (0.5,) * 3, (0.5,) * 3, jitter_prob=0.0, flip_prob=0.0)
    img = random_image(16, 16, 3)
    torch.manual_seed(0)
    gray = 0
    for _ in range(500):
        out = recipe(img)
        gray += bool(torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]))
    assert 0.14 < gray / 500 < 0.26
    # Jitter strength override scales the published strengths; 0 switches jitter off entirely.
    assert make_photometric("byol", 0, MEAN, STD, jitter_strength=0.5).jitter == (0.2, 0.2, 0.1, 0.05)
    off = make_photometric(
        "simclr", 0, MEAN, STD, jitter_strength=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.0
    )
    np.testing.assert_allclose(off(img).numpy(), normalise_by_hand(img), atol=1e-5)


PUBLISHED = {
    # (recipe, view): (jitter, jitter_prob, grayscale_prob, blur_prob, solarize_prob, flip_prob)
    ("simclr", 0): ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.0, 0.5),
    ("mocov2", 1): ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.0, 0.5),
    ("byol", 0): ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0, 0.5),
    ("byol", 1): ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2, 0.5),
    ("byol", 5): ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2, 0.5),
    ("small", 0): ((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.0, 0.0, 0.5),
    ("none", 0): ((0.0, 0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 0.0, 0.5),
    ("eval", 0): ((0.0, 0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize(("key", "settings"), PUBLISHED.items())
def test_recipe_settings_are_the_published_ones(key, settings):
    r = make_photometric(*key, MEAN, STD)
    assert (r.jitter, r.jitter_prob, r.grayscale_prob, r.blur_prob, r.solarize_prob, r.flip_prob) == settings
    assert r.blur_sigma == (0.1, 2.0) and r.solarize_threshold == 128


def test_blur_kernel_is_about_ten_percent_and_odd():
    from contrastlab.views import blur_kernel_size

    assert [blur_kernel_size(s) for s in (32, 96, 224)] == [3, 9, 23]


def test_photometric_errors_and_pickling():
    with pytest.raises(ConfigError, match="simclr"):
        make_photometric("simclrr", 0, MEAN, STD)
    with pytest.raises(ConfigError, match="blur_prob"):
        make_photometric("simclr", 0, MEAN, STD, blur_probability=0.3)
    with pytest.raises(ConfigError):
        make_photometric("simclr", 0, MEAN, STD, blur_prob=1.5)
    with pytest.raises(ConfigError):
        make_photometric("simclr", 0, MEAN, (0.2, 0.0, 0.2))
    recipe = make_photometric("byol", 1, MEAN, STD)
    clone = pickle.loads(pickle.dumps(recipe))
    img = smooth_image(32, 32, 0)
    torch.manual_seed(4)
    a = recipe(img)
    torch.manual_seed(4)
    assert torch.equal(clone(img), a)


# --------------------------------------------------------------------------------------------- datasets


def two_view_dataset(return_boxes: bool = False) -> ViewDataset:
    data = TinyImages([(40, 30), (32, 32), (50, 70), (64, 64)])
    recipes = [make_photometric("byol", v, MEAN, STD) for v in range(2)]
    return ViewDataset(data, RandomResizedCropPlanner(), [24, 16], recipes, return_boxes=return_boxes)


def test_view_dataset_shapes_and_reproducibility():
    ds = two_view_dataset()
    assert len(ds) == 4
    torch.manual_seed(0)
    views, label, index = ds[2]
    assert [v.shape for v in views] == [(3, 24, 24), (3, 16, 16)]
    assert (label, index) == (2, 2)
    torch.manual_seed(0)
    again, _, _ = ds[2]
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    torch.manual_seed(1)
    other, _, _ = ds[2]
    assert not torch.equal(other[0], views[0])


def test_view_dataset_boxes_and_pixels():
    # With the "eval" recipe each view is exactly the normalised resized crop of its returned box.
    data = TinyImages([(40, 30), (70, 50)])
    ds = ViewDataset(
        data,
        MultiCropPlanner(num_large=1, num_small=2),
        [20, 8, 8],
        [make_photometric("eval", v, MEAN, STD) for v in range(3)],
        return_boxes=True,
    )
    torch.manual_seed(0)
    views, _, index, boxes = ds[1]
    assert boxes.shape == (3, 4) and boxes.dtype == torch.float32 and index == 1
    image = data.images[1]
    for view, box, size in zip(views, boxes.tolist(), [20, 8, 8]):
        validate_box(box, *image.size)
        top, left, h, w = box_to_pixels(box)
        crop = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        np.testing.assert_allclose(view.numpy(), normalise_by_hand(crop), atol=1e-5)
    # The boxes are the planner's draws from the same RNG state.
    torch.manual_seed(0)
    assert MultiCropPlanner(num_large=1, num_small=2).plan(1, 70, 50) == [tuple(b) for b in boxes.tolist()]


def test_view_dataset_length_mismatch():
    data = TinyImages([(32, 32)])
    recipe = make_photometric("none", 0, MEAN, STD)
    with pytest.raises(ConfigError):
        ViewDataset(data, RandomResizedCropPlanner(num_views=2), [32], [recipe, recipe])
    with pytest.raises(ConfigError):
        ViewDataset(data, RandomResizedCropPlanner(num_views=2), [32, 32], [recipe])
    with pytest.raises(ConfigError):
        ViewDataset(data, MultiCropPlanner(num_large=2, num_small=1), [32, 32], [recipe, recipe])
    with pytest.raises(ConfigError):
        ViewDataset(data, RandomResizedCropPlanner(num_views=1), [0], [recipe])


def test_eval_view_dataset():
    data = TinyImages([(80, 60), (60, 80)])
    ds = eval_view_dataset(data, 28, MEAN, STD, crop_fraction=0.875)
    for i in range(2):
        (view,), label, index = ds[i]
        image = data.images[i]
        side = round(0.875 * 60)
        centre = TF.center_crop(image, [side, side]).resize((28, 28), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(view.numpy(), normalise_by_hand(centre), atol=1e-5)
        assert (label, index) == (i % 3, i)
    (whole,), _, _ = eval_view_dataset(data, 28, MEAN, STD, crop_fraction=None)[0]
    squashed = data.images[0].resize((28, 28), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(whole.numpy(), normalise_by_hand(squashed), atol=1e-5)


class RandomnessProbe(torch.utils.data.Dataset):
    """Reports the worker's seed and one draw from python, numpy and torch."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, float, float, float]:
        return torch.initial_seed() % 2**32, random.random(), float(np.random.rand()), torch.rand(1).item()


def test_seed_worker_makes_loading_reproducible():
    def run(seed: int) -> list[tuple[int, float, float, float]]:
        loader = torch.utils.data.DataLoader(
            RandomnessProbe(),
            batch_size=None,
            num_workers=2,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),
        )
        return [(int(s), float(a), float(b), float(c)) for s, a, b, c in loader]

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for seed, py, npy, _ in first:
        by_worker.setdefault(seed, []).append((py, npy))
    assert len(by_worker) == 2  # two workers, two different seeds
    # Replay: each worker's python and numpy streams start from its torch seed, as seed_worker says.
    for seed, draws in by_worker.items():
        py_rng, np_rng = random.Random(seed), np.random.RandomState(seed)
        assert draws == [(py_rng.random(), float(np_rng.rand())) for _ in draws]
