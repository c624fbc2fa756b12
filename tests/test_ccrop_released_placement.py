"""ContrastiveCrop's released crop placement (``views.ccrop_placement=released``) and box edges.

The reference below is written from issue 18's description of the released sampler, not from the planner: crop
sizes as torchvision's RandomResizedCrop draws them; on each axis the interval of allowed corners, each end
``int(box edge in pixels) - crop // 2`` clamped into the image on its own; the corner at ``low + int((high - low)
u)`` with ``u ~ Beta(alpha, alpha)`` below 1 (numpy's sampler). The per-image and batched planners must draw the
same law (two-sample KS), the centred placement must not (the test can tell them apart), and with a whole-image box
at alpha 0.1 about 45% of the smaller crops touch the top border and none the bottom one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from contrastlab.config.load import load_config
from contrastlab.views.box_store import BoxStore
from contrastlab.views.localiser import boxes_from_heatmaps
from contrastlab.views.planners.contrastive_crop import ContrastiveCropPlanner

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
