"""ContrastiveCrop's released crop placement (``views.ccrop_placement=released``) and box edges.

The reference below is written from issue 18's description of the released sampler, not from the planner: crop
sizes as torchvision's RandomResizedCrop draws them; on each axis the interval of allowed corners, each end
``int(box edge in pixels) - crop // 2`` clamped into the image on its own; the corner at ``low + int((high - low)
u)`` with ``u ~ Beta(alpha, alpha)`` below 1 (numpy's sampler). The per-image and batched planners must draw the
same law (two-sample KS), the centred placement must not (the test can tell them apart), and with a whole-image box
at alpha 0.1 about 45% of the smaller crops touch the top border and none the bottom one.

Upstream's arithmetic exactly (issue 23): its fraction is a float32 ``Beta.sample()`` and ``(high - low) * u`` a float32
product before ``int()``; the reference here computes that with numpy's float32. A box one row or column wide
(upstream's ``last index / size`` edges of a single row or column) is kept, and the crop's corner on that axis is the
interval's one end, ``low``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from contrastlab.config.load import load_config
from contrastlab.views.box_store import BoxStore
from contrastlab.views.localiser import boxes_from_heatmaps, localise
from contrastlab.views.planners.contrastive_crop import (
    ContrastiveCropPlanner,
    place_crop_released,
    place_released_batch,
)

KS_CRITICAL = 1.95  # P(sqrt(nm / (n + m)) D > 1.95) ~ 0.001 under the null
DRAWS = 3000  # images; two views each


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS statistic with ties (both empirical CDFs at every data point)."""
    a, b = np.sort(a.astype(np.float64)), np.sort(b.astype(np.float64))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                               - np.searchsorted(b, grid, side="right") / len(b))))


def _critical(n: int, m: int) -> float:
    return KS_CRITICAL * math.sqrt((n + m) / (n * m))


def _released_reference(width: int, height: int, box: tuple[float, float, float, float], alpha: float,
                        n: int, seed: int) -> np.ndarray:
    """``[n, 4]`` boxes ``(x0, y0, x1, y1)`` drawn as the issue describes the released sampler (box normalised)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image = torch.empty(1, height, width)
    out = []
    for _ in range(n):
        _, _, h, w = RandomResizedCrop.get_params(image, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
        corners = []
        for side, crop, near, far in ((height, h, box[1], box[3]), (width, w, box[0], box[2])):
            low = min(max(int(side * near) - crop // 2, 0), side - crop)
            high = min(max(int(side * far) - crop // 2, 0), side - crop)
            u = min(rng.beta(alpha, alpha), np.nextafter(1.0, 0.0))
            corners.append(low + int((high - low) * u))
        top, left = corners
        out.append((left, top, left + w, top + h))
    return np.asarray(out, dtype=np.float64)


def _per_image(planner: ContrastiveCropPlanner, width: int, height: int, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return np.asarray([b for _ in range(n // 2) for b in planner.plan(0, width, height, g)], dtype=np.float64)


def _batched(planner: ContrastiveCropPlanner, width: int, height: int, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    boxes = planner.plan_batch(torch.zeros(n // 2, dtype=torch.long), width, height, g)
    return boxes.reshape(-1, 4).double().numpy()


CASES = [  # (width, height, normalised box x0, y0, x1, y1, alpha)
    (32, 32, (0.0, 0.0, 1.0, 1.0), 0.1),
    (40, 30, (0.5, 0.1, 0.9, 0.6), 0.6),
]


@pytest.mark.parametrize("width,height,box,alpha", CASES)
def test_released_placement_follows_the_described_sampler(width, height, box, alpha) -> None:
    store = BoxStore(1)
    store.update([0], torch.tensor([box]))
    reference = _released_reference(width, height, box, alpha, 2 * DRAWS, seed=1)
    released = ContrastiveCropPlanner(store, alpha=alpha, placement="released")
    centred = ContrastiveCropPlanner(store, alpha=alpha)
    critical = _critical(len(reference), 2 * DRAWS)
    for name, boxes in (("per-image", _per_image(released, width, height, 2 * DRAWS, 2)),
                        ("batched", _batched(released, width, height, 2 * DRAWS, 3))):
        assert np.all(boxes == np.round(boxes)), name  # whole pixels, as upstream's integer corners
        for column, what in ((0, "left"), (1, "top"), (2, "right"), (3, "bottom")):
            assert _ks(boxes[:, column], reference[:, column]) < critical, (name, what)
    centre = _per_image(centred, width, height, 2 * DRAWS, 4)
    assert max(_ks(centre[:, c], reference[:, c]) for c in range(4)) > critical  # the test tells them apart


def test_whole_image_box_crops_lean_to_the_top_left() -> None:
    """At alpha 0.1 with the whole-image box, about 45% of the smaller crops touch the top border, none the
    bottom one (issue 18 measured 45% / 0% with upstream's sampler); the same on the columns."""
    planner = ContrastiveCropPlanner(BoxStore(1), alpha=0.1, placement="released")
    for boxes in (_per_image(planner, 32, 32, 2 * DRAWS, 5), _batched(planner, 32, 32, 2 * DRAWS, 6)):
        tall = boxes[boxes[:, 3] - boxes[:, 1] < 32]
        wide = boxes[boxes[:, 2] - boxes[:, 0] < 32]
        assert np.mean(tall[:, 1] == 0) == pytest.approx(0.45, abs=0.04)
        assert np.mean(wide[:, 0] == 0) == pytest.approx(0.45, abs=0.04)
        assert not np.any(tall[:, 3] == 32) and not np.any(wide[:, 2] == 32)


def test_released_box_edges_are_last_index_over_size() -> None:
    """upstream update_box: first index / size and last index / size (the exclusive far edge is one pixel more)."""
    maps = torch.zeros(1, 8, 8)
    maps[0, 2:5, 1:7] = 1.0  # rows 2..4, columns 1..6
    exclusive = boxes_from_heatmaps(maps, 8, threshold=0.5)[0].tolist()
    released = boxes_from_heatmaps(maps, 8, threshold=0.5, edges="released")[0].tolist()
    assert exclusive == pytest.approx([1 / 8, 2 / 8, 7 / 8, 5 / 8])
    assert released == pytest.approx([1 / 8, 2 / 8, 6 / 8, 4 / 8])


def test_contrastive_crop_rows_use_the_released_placement() -> None:
    from contrastlab import assemble

    for name in ("cifar10/simclr_ccrop_r18_500ep", "cifar100/mocov2_simccrop_r18_500ep",
                 "imagenet/mocov1_ccrop_r50_100ep", "tiny_imagenet/simclr_ccrop_r18_500ep"):
        assert load_config(name).views.params["ccrop_placement"] == "released", name
    cfg = load_config("cifar10/byol_ccrop_r18_500ep", ["data.name=demo", "data.root=null"])
    planner = assemble.training_views(cfg, assemble.dataset(cfg, "train")).planner
    assert planner.placement == "released" and planner.localisation.edges == "released"
    with pytest.raises(Exception, match="placement"):
        ContrastiveCropPlanner(BoxStore(1), placement="corner")


# ------------------------------------------------------------------------- upstream's float32 arithmetic

_BELOW_ONE_F32 = np.nextafter(np.float32(1.0), np.float32(0.0))


def _float32_corner(low: int, high: int, fraction: float) -> int:
    """``low + int((high - low) * u)`` as upstream computes it: ``u`` a float32 below 1, the product in float32."""
    u = min(np.float32(fraction), _BELOW_ONE_F32)
    product = np.float32(high - low) * u
    assert product.dtype == np.float32
    return low + int(product)


def _fractions() -> list[float]:
    """Fractions near ``k / n`` (where a float64 product lands just below a whole number): the float32 nearest to
    it, its two float32 neighbours, and float64 values a hair either side (which upstream's sampler cannot return:
    they are rounded to float32 first)."""
    out = []
    for n in range(1, 33):
        for k in range(n + 1):
            f32 = np.float32(k / n)
            out += [float(f32), float(np.nextafter(f32, np.float32(0.0))), float(np.nextafter(f32, np.float32(2.0))),
                    k / n - 1e-12, k / n + 1e-12]
    return sorted({min(max(f, 0.0), 1.0) for f in out})


def test_released_corner_is_a_float32_product_then_truncated() -> None:
    """On each axis the corner is ``low + int((high - low) * u)`` in float32 (a brute force over spans 0..32 and
    fractions near every ``k / n``), per image and batched; 0.833333313 over a range of 6 gives 5, as upstream (a
    float64 product gives 4)."""
    side, crop = 64, 2  # box edges e0 = 1, e1 = span + 1: the interval of corners is [0, span]
    fractions = _fractions()
    float64_differs = 0
    rows, expected = [], []
    for span in range(33):
        box = (1.0, 1.0, span + 1.0, span + 1.0)
        for f in fractions:
            left, top = _float32_corner(0, span, f), _float32_corner(0, span, 1.0 - f)
            float64_differs += left != int(span * min(f, float(_BELOW_ONE_F32)))
            got = place_crop_released(side, side, crop, crop, box, fx=f, fy=1.0 - f)
            assert got == (left, top, left + crop, top + crop), (span, f)
            rows.append((box, f))
            expected.append((left, top))
    assert float64_differs > 0  # the brute force meets the fractions where the float64 product is one short

    n = len(rows)
    box = torch.tensor([b for b, _ in rows], dtype=torch.float64)
    fx = torch.tensor([f for _, f in rows], dtype=torch.float64)[:, None]
    sizes = torch.full((n, 1), float(crop), dtype=torch.float64)
    sides = torch.full((n,), float(side))
    batched = place_released_batch(sizes, sizes, fx, 1.0 - fx, box, sides, sides)[:, 0]
    assert batched[:, :2].tolist() == [[float(x), float(y)] for x, y in expected]

    # the example: 0.833333313 (the float32 nearest to 5/6) over a range of 6
    f = float(np.float32(5 / 6))
    assert abs(f - 0.833333313) < 1e-9 and int(6 * f) == 4
    pixels = (0.0, 0.0, 11.0, 11.0)  # a 10-pixel crop: ends int(0) - 5 -> 0 and int(11) - 5 = 6
    assert place_crop_released(32, 32, 10, 10, pixels, fx=f, fy=f) == (5.0, 5.0, 15.0, 15.0)
    ten = torch.full((1, 1), 10.0, dtype=torch.float64)
    one = torch.full((1, 1), f, dtype=torch.float64)
    got = place_released_batch(ten, ten, one, one, torch.tensor([pixels], dtype=torch.float64),
                               torch.tensor([32.0]), torch.tensor([32.0]))
    assert got[0, 0].tolist() == [5.0, 5.0, 15.0, 15.0]


# --------------------------------------------------------------- a box one row or column wide (released edges)


class _IndexedImages(torch.utils.data.Dataset):
    """Two 32x32 images whose pixels hold their index, yielded as ``(views, label, index)``."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return [torch.full((3, 32, 32), float(i))], 0, i


def _single_line_maps(images: torch.Tensor) -> torch.Tensor:
    """Feature maps at the input size: image 0 hot on column 20 (rows 5..12), image 1 on row 9 (columns 3..25)."""
    fmap = torch.zeros(images.shape[0], 4, 32, 32)
    for b, i in enumerate(images[:, 0, 0, 0].long().tolist()):
        if i == 0:
            fmap[b, :, 5:13, 20] = 1.0
        else:
            fmap[b, :, 9, 3:26] = 1.0
    return fmap


def _released_interval(side: int, crop: int, near: float, far: float) -> tuple[int, int]:
    """Upstream's corner interval: each end ``int(side * edge) - crop // 2`` clamped into ``[0, side - crop]``."""
    def end(edge: float) -> int:
        return min(max(int(side * edge) - crop // 2, 0), side - crop)
    return end(near), end(far)


def test_a_box_one_column_wide_keeps_training_as_released() -> None:
    """The released edges of a single hot column (row) give x0 == x1 (y0 == y1); the store keeps the box (and a
    resume restores it), and the released placement puts every crop's corner on that axis at the interval's one
    end, per image and batched; on the other axis it lies in [low, high). The centred placement centres the crop
    on the line (clamped into the image)."""
    table = localise(_single_line_maps, _IndexedImages(), threshold=0.1, edges="released")
    normalised = [[20 / 32, 5 / 32, 20 / 32, 12 / 32], [3 / 32, 9 / 32, 25 / 32, 9 / 32]]  # first, last index / 32
    assert table.tolist() == normalised
    store = BoxStore(2)
    store.fill(table)
    resumed = BoxStore(2)
    resumed.load_state_dict(store.state_dict())
    assert resumed.table.tolist() == normalised

    released = ContrastiveCropPlanner(store, alpha=0.1, placement="released")
    g = torch.Generator().manual_seed(7)
    per_image = [(i, box) for _ in range(200) for i in (0, 1) for box in released.plan(i, 32, 32, g)]
    index = torch.tensor([0, 1] * 200)
    batch = released.plan_batch(index, 32, 32, torch.Generator().manual_seed(8))
    batched = [(int(i), tuple(box)) for i, views in zip(index, batch.double().tolist()) for box in views]
    for i, (x0, y0, x1, y1) in per_image + batched:
        w, h = int(x1 - x0), int(y1 - y0)
        bx0, by0, bx1, by1 = normalised[i]
        for corner, (low, high) in ((x0, _released_interval(32, w, bx0, bx1)), (y0, _released_interval(32, h, by0, by1))):
            assert corner == low if high == low else low <= corner < high, (i, (x0, y0, x1, y1))
    lines = [(x0, _released_interval(32, int(x1 - x0), 20 / 32, 20 / 32)[0]) for i, (x0, _, x1, _) in per_image + batched
             if i == 0]
    assert all(x0 == low for x0, low in lines)

    centred = ContrastiveCropPlanner(store, alpha=0.1)
    g = torch.Generator().manual_seed(9)
    for x0, y0, x1, y1 in (box for _ in range(100) for box in centred.plan(0, 32, 32, g)):
        assert x0 == min(max(20.0 - (x1 - x0) / 2, 0.0), 32.0 - (x1 - x0))
    batch = centred.plan_batch(torch.zeros(100, dtype=torch.long), 32, 32, torch.Generator().manual_seed(10))
    for x0, y0, x1, y1 in batch.reshape(-1, 4).double().tolist():
        assert x0 == np.floor(min(max(20.0 - (x1 - x0) / 2, 0.0), 32.0 - (x1 - x0)) + 0.5)
