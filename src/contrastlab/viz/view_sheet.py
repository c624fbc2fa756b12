"""``contrastlab views``: draw what a recipe's view planner does to real images.

For each image: the source with every planned box outlined (one colour per view, numbered), then each
rendered view after its photometric recipe, as the training loader would produce them. Works for every
planner. Without an encoder the crop strategies with a box store (ContrastiveCrop, SemanticCrop) show their
warm-up behaviour (plain random crops); with a trained backbone (``contrastlab views --checkpoint``),
:func:`localise_images` gives each image its heatmap and box as the training localiser would, the planner
samples around those boxes, and the sheet adds a heatmap column with the box (dashed white on the source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from contrastlab.data.base import to_rgb
from contrastlab.data.imagefolder import IMAGE_EXTENSIONS
from contrastlab.errors import DatasetError

__all__ = ["ImageList", "Localised", "draw_view_sheet", "localise_images"]

COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


class ImageList:
    """The image files of one folder (not recursive), sorted, as ``(PIL image, 0, index)`` items."""

    def __init__(self, folder: str | Path, limit: int = 0) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DatasetError(f"--images {folder} is not a folder; pass a folder of image files "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(f"--images {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.files = files[:limit] if limit > 0 else files
        self.classes = ["image"]
        self.targets = [0] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int, int]:
        try:
            with Image.open(self.files[i]) as image:
                return to_rgb(image), 0, i
        except OSError as exc:
            raise DatasetError(f"cannot read image {self.files[i]}: {exc}") from exc


@dataclass(frozen=True)
class Localised:
    """The localiser's output for the images of a sheet: heatmaps ``[N, S, S]`` in [0, 1] (upsampled to the
    input size ``S``) and normalised boxes ``[N, 4]`` ``(x0, y0, x1, y1)``."""

    heatmaps: torch.Tensor
    boxes: torch.Tensor


@torch.no_grad()
def localise_images(backbone: torch.nn.Module, images: ImageList, size: int, mean: Sequence[float],
                    std: Sequence[float], kind: str = "channel_sum", threshold: float = 0.1) -> Localised:
    """Heatmap and box of every image, as the training localiser computes them (the whole image resized to
    ``size``, eval mode; :mod:`contrastlab.views.localiser`)."""
    import torch.nn.functional as F

    from contrastlab.views import eval_view_dataset
    from contrastlab.views.localiser import boxes_from_heatmaps, heatmap, last_feature_map

    whole = eval_view_dataset(images, size, mean, std, crop_fraction=None)
    batch = torch.stack([whole[i][0][0] for i in range(len(whole))])
    training = backbone.training
    backbone.eval()
    try:
        maps = heatmap(last_feature_map(backbone)(batch), kind)
    finally:
        backbone.train(training)
    boxes = boxes_from_heatmaps(maps, size, threshold)
    upsampled = F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return Localised(heatmaps=upsampled, boxes=boxes)


def _to_image(view: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Any:
    """A normalised ``[3, S, S]`` view back to an ``[S, S, 3]`` array in [0, 1] for display."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (view * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def draw_view_sheet(views_dataset: Any, images: ImageList, mean: Sequence[float], std: Sequence[float],
                    out: str | Path, title: str = "", localised: Localised | None = None) -> Path:
    """One row per image: the source with the planned boxes, then each rendered view. Returns ``out``.

    ``views_dataset`` is a :class:`~contrastlab.views.ViewDataset` over ``images`` built with
    ``return_boxes=True``. With ``localised`` a heatmap column follows the source, and each image's box is
    drawn dashed in white on both.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = len(images)
    num_views = views_dataset.planner.num_views
    first_view = 2 if localised is not None else 1
    fig, axes = plt.subplots(rows, first_view + num_views, figsize=(2.2 * (first_view + num_views), 2.3 * rows),
                             dpi=100, squeeze=False)
    for row in range(rows):
        image = images[row][0]
        views, _, _, boxes = views_dataset[row]
        ax = axes[row][0]
        ax.imshow(image)
        ax.set_title(images.files[row].name, fontsize=7)
        for v, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            colour = COLOURS[v % len(COLOURS)]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
            ax.text(x0 + 2, y0 + 2, str(v), color=colour, fontsize=8, va="top", ha="left")
        if localised is not None:
            bx0, by0, bx1, by1 = localised.boxes[row].tolist()
            heat = axes[row][1]
            heat.imshow(image.resize(localised.heatmaps.shape[1:][::-1]))
            heat.imshow(localised.heatmaps[row].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            heat.set_title(f"heatmap, box area {(bx1 - bx0) * (by1 - by0):.2f}", fontsize=7)
            for target, (w, h) in ((ax, image.size), (heat, localised.heatmaps.shape[1:][::-1])):
                target.add_patch(Rectangle((bx0 * w, by0 * h), (bx1 - bx0) * w, (by1 - by0) * h, fill=False,
                                           edgecolor="white", linestyle="--", linewidth=1.5))
        for v, view in enumerate(views):
            ax = axes[row][first_view + v]
            ax.imshow(_to_image(view, mean, std))
            area = (boxes[v, 2] - boxes[v, 0]) * (boxes[v, 3] - boxes[v, 1]) / (image.width * image.height)
            ax.set_title(f"view {v}: area {float(area):.2f}", fontsize=7, color=COLOURS[v % len(COLOURS)])
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
