"""The localiser: a box per training image from the encoder's own last feature map.

ContrastiveCrop (Peng, Wang, Zhu, You, "Crafting Better Contrastive Views for Siamese Representation
Learning", CVPR 2022, section 3.2, "semantic-aware localization"): run the online backbone on every
training image under the test-time transform (no augmentation, BatchNorm in eval mode), take its last
feature map, sum it over channels, min-max normalise it per image, upsample it bilinearly to the input size,
and keep the tight box around every pixel above a threshold ``k`` (0.1 in all released configs). Upstream's
``update_box`` in ``DDP_*_ccrop.py`` does this; the differences here:

- the far edge is exclusive: a box ending at pixel row ``r`` ends at ``(r + 1) / H`` (upstream divides the
  last index by ``H``, so even a box covering the whole image was one pixel short at the bottom and right;
  ``edges="released"`` reproduces it, for the released placement of
  :func:`~contrastlab.views.planners.contrastive_crop.place_crop_released`);
- a constant heatmap (a dead or collapsed network) gives the whole image. Upstream divides ``0 / 0``,
  every pixel becomes NaN, none passes the threshold and indexing the empty selection raises;
- under DDP each rank localises its own shard and the ``(index, box)`` pairs are gathered and scattered
  into the table by index, so the result never depends on how a sampler pads or orders the shards, and
  every rank ends with the same ``[N, 4]`` table (upstream interleaves per-rank results and relies on
  ``DistributedSampler``'s padding order).

``kind="mean_similarity"`` is a second, more semantic heatmap for SemanticCrop (PRCV 2023; our
reconstruction, see :mod:`contrastlab.views.planners.semantic_crop`): the cosine similarity of each location's
feature vector to the image's mean (globally pooled) feature, i.e. how much each location looks like what
the pooled representation encodes.

The images fed to :func:`localise` must show the *whole* image
(``eval_view_dataset(..., crop_fraction=None)``: resize, no crop, as upstream's ``imagenet_eval_boxes``),
since the boxes are stored relative to it.

Example:
    >>> from contrastlab.models import build_backbone
    >>> net, _ = build_backbone("resnet20", width=0.25)
    >>> fmap = last_feature_map(net)(torch.randn(2, 3, 32, 32))
    >>> boxes_from_heatmaps(heatmap(fmap), input_size=32, threshold=0.1).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from contrastlab.engine.distributed import gather_no_grad, get_rank, get_world_size, is_initialized
from contrastlab.errors import ConfigError
from contrastlab.models.staged import run_stages, stage_names

HEATMAPS: tuple[str, ...] = ("channel_sum", "mean_similarity")
"""Heatmap kinds: ContrastiveCrop's channel sum, and the cosine similarity to the pooled feature."""

POOL_STAGE = "pool"
"""Name of the global-pooling stage every staged backbone ends with (:mod:`contrastlab.models.staged`)."""

_CONSTANT_TOLERANCE = 1e-6  # a map whose range is below this fraction of its magnitude is constant


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (0.0 <= threshold < 1.0):
        raise ConfigError(
            f"the localiser threshold applies to a [0, 1] heatmap and must be in [0, 1), got {threshold}"
        )
    return threshold


def normalise_heatmaps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of ``[B, h, w]`` to ``[0, 1]``.

    A map that is constant (its range below ``1e-6`` of its magnitude, or exactly zero) or holds a
    non-finite value becomes all ones, so every pixel passes any threshold below 1: the whole image.
    """
    if maps.dim() != 3:
        raise ValueError(f"heatmaps must have shape [B, h, w], got {tuple(maps.shape)}")
    maps = maps.float()
    flat = maps.flatten(1)
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    low, high = safe.min(1, keepdim=True).values, safe.max(1, keepdim=True).values
    span = high - low
    scale = torch.maximum(low.abs(), high.abs())
    constant = (span <= _CONSTANT_TOLERANCE * scale).squeeze(1) | ~finite
    out = (safe - low) / torch.where(span > 0, span, torch.ones_like(span))
    out[constant] = 1.0
    return out.view_as(maps)


def heatmap(feature_map: torch.Tensor, kind: str = "channel_sum") -> torch.Tensor:
    """Per-image heatmap ``[B, h, w]`` in ``[0, 1]`` from a feature map ``[B, C, h, w]``.

    Args:
        feature_map: The backbone's last feature map (before global pooling).
        kind: ``"channel_sum"``: the sum over channels (ContrastiveCrop, CVPR 2022, eq. 1).
            ``"mean_similarity"``: the cosine similarity of each location's ``C``-vector to the image's
            mean feature over all locations (SemanticCrop reconstruction); a zero vector scores 0.

    Returns:
        The map min-max normalised per image (:func:`normalise_heatmaps`; constant maps become ones).

    Raises:
        ConfigError: Unknown ``kind``.

    Example:
        >>> fmap = torch.zeros(1, 4, 6, 6)
        >>> fmap[:, :, 1:3, 2:5] = 1.0
        >>> heatmap(fmap)[0, 1:3, 2:5].tolist() == [[1.0] * 3] * 2
        True
    """
    if kind not in HEATMAPS:
        raise ConfigError(f"unknown heatmap kind {kind!r}; valid kinds: {list(HEATMAPS)}")
    if feature_map.dim() != 4:
        raise ValueError(f"a feature map has shape [B, C, h, w], got {tuple(feature_map.shape)}")
    fmap = feature_map.float()
    if kind == "channel_sum":
        raw = fmap.sum(1)
    else:
        pooled = fmap.mean((2, 3), keepdim=True).expand_as(fmap)
        raw = F.cosine_similarity(fmap, pooled, dim=1, eps=1e-12)
    return normalise_heatmaps(raw)


def _as_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = (int(v) for v in input_size)
    return height, width


BOX_EDGES = ("exclusive", "released")
"""Far box edges: ``(last + 1) / size`` (exclusive, default) or upstream's ``last / size``."""


def boxes_from_heatmaps(
    heatmaps: torch.Tensor, input_size: int | Sequence[int], threshold: float = 0.1, edges: str = "exclusive"
) -> torch.Tensor:
    """Tight normalised boxes ``[B, 4]`` ``(x0, y0, x1, y1)`` around the pixels above ``threshold``.

    Each map is min-max normalised (again: idempotent on :func:`heatmap`'s output), upsampled bilinearly
    (``align_corners=False``) to ``input_size``, and thresholded strictly (``> threshold``, as upstream). The
    box spans the first to the last row and column holding such a pixel, edges exclusive: a pixel ``(r, c)``
    covers ``[c / W, (c + 1) / W) x [r / H, (r + 1) / H)``. A map with no pixel above the threshold, or a
    constant map, gives the whole image ``(0, 0, 1, 1)``.

    Args:
        heatmaps: ``[B, h, w]``.
        input_size: ``H`` or ``(H, W)`` of the images the maps came from.
        threshold: ``k`` in ``[0, 1)``; 0.1 in every released ContrastiveCrop config.
        edges: ``exclusive`` or ``released``: the far edges ``last / size`` of upstream's ``update_box``
            (one pixel short of the last pixel above the threshold; a single row or column above it gives a
            zero-height or zero-width box, ``y0 == y1`` or ``x0 == x1``, which upstream trains on and
            :class:`~contrastlab.views.box_store.BoxStore` keeps).

    Raises:
        ConfigError: ``threshold`` outside ``[0, 1)``, or unknown ``edges``.

    Example:
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, 1, 2] = 1.0
        >>> boxes_from_heatmaps(maps, input_size=4, threshold=0.5).tolist()
        [[0.5, 0.25, 0.75, 0.5]]
    """
    threshold = _check_threshold(threshold)
    if edges not in BOX_EDGES:
        raise ConfigError(f"box edges must be one of {', '.join(BOX_EDGES)}, got {edges!r}")
    far_offset = 1 if edges == "exclusive" else 0
    height, width = _as_size(input_size)
    maps = normalise_heatmaps(heatmaps)
    up = F.interpolate(maps.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    mask = up > threshold
    rows, cols = mask.any(2), mask.any(1)  # [B, H], [B, W]
    empty = ~rows.any(1)

    def span(hit: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = hit.float().argmax(1)
        last = n - 1 - hit.flip(1).float().argmax(1)
        return first.float() / n, (last + far_offset).float() / n

    x0, x1 = span(cols, width)
    y0, y1 = span(rows, height)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    boxes[empty] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    return boxes


class LastFeatureMap(nn.Module):
    """Runs a staged backbone up to, not including, its global-pooling stage: images -> ``[B, C, h, w]``.

    Works for every backbone of the zoo (:mod:`contrastlab.models.staged`): torchvision ResNets (everything
    before ``avgpool``, i.e. after ``layer4``), the CIFAR ResNets (after ``layer3``), WideResNets,
    ShuffleNetV2 and HCGNet (after their final norm/conv stage). The backbone is held, not copied.

    Args:
        backbone: A staged backbone, or a ``DistributedDataParallel`` wrapping one.

    Raises:
        ConfigError: The backbone declares no stages or has no ``"pool"`` stage.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        net = backbone.module if isinstance(backbone, nn.parallel.DistributedDataParallel) else backbone
        names = stage_names(net)  # raises ConfigError for a backbone without stages
        if POOL_STAGE not in names:
            raise ConfigError(
                f"{type(net).__name__} has no {POOL_STAGE!r} stage (stages: {names}); pass a callable "
                "that returns the last feature map [B, C, h, w] to localise instead"
            )
        self.net = net
        self.stop = names.index(POOL_STAGE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> the last feature map ``[B, C, h, w]``."""
        return run_stages(self.net, images, 0, self.stop)


def last_feature_map(backbone: nn.Module) -> LastFeatureMap:
    """The feature extractor for :func:`localise`: ``backbone`` without its pooling stage.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, _ = build_backbone("resnet20", width=0.25)
        >>> last_feature_map(net)(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 16, 8, 8])
    """
    return LastFeatureMap(backbone)


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, indices)`` of a ``(views, label, index)`` batch."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 3:
        raise ValueError(
            "localise needs batches (images, label, index) carrying each sample's dataset index, as "
            "ViewDataset / eval_view_dataset yield them"
        )
    images, index = batch[0], batch[2]
    if isinstance(images, (list, tuple)):
        if len(images) != 1:
            raise ValueError(f"localise needs one (test-time) view per sample, got {len(images)} views")
        images = images[0]
    return images, torch.as_tensor(index, dtype=torch.long).reshape(-1)


def _gather_pairs(
    indices: torch.Tensor, boxes: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``(index, box)`` pairs, on every rank (shards of unequal size padded with index -1)."""
    count = torch.tensor([indices.numel()], dtype=torch.long, device=device)
    longest = int(gather_no_grad(count).max())
    pad = longest - indices.numel()
    padded_idx = torch.cat([indices, indices.new_full((pad,), -1)]).to(device)
    padded_boxes = torch.cat([boxes, boxes.new_zeros(pad, 4)]).to(device)
    all_idx, all_boxes = gather_no_grad(padded_idx).cpu(), gather_no_grad(padded_boxes).cpu()
    keep = all_idx >= 0
    return all_idx[keep], all_boxes[keep]


def _scatter(indices: torch.Tensor, boxes: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``[N, 4]`` table from ``(index, box)`` pairs; for a repeated index the first pair wins."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        raise ValueError(
            f"sample indices must lie in [0, {num_samples}), got {int(indices.min())}..{int(indices.max())}; "
            "the box store and the localised dataset must index the same samples"
        )
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    table = torch.full((num_samples, 4), float("nan"))
    table[sorted_idx[first]] = boxes[order][first].float()
    missing = torch.isnan(table[:, 0])
    if bool(missing.any()):
        raise RuntimeError(
            f"{int(missing.sum())} of {num_samples} samples were not localised (first: "
            f"{int(missing.nonzero()[0])}); the loaders of all ranks together must cover the whole dataset"
        )
    return table


@torch.no_grad()
def localise(
    feature_extractor: Callable[[torch.Tensor], torch.Tensor],
    data: Dataset | Iterable,
    threshold: float = 0.1,
    device: torch.device | str | None = None,
    *,
    kind: str = "channel_sum",
    num_samples: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    distributed: bool | None = None,
    edges: str = "exclusive",
) -> torch.Tensor:
    """Localise every sample: the ``[N, 4]`` table of normalised boxes, in dataset-index order.

    ContrastiveCrop's box update (CVPR 2022, section 3.2). Modules are switched to eval mode for the pass
    and restored afterwards, module by module. Under DDP call it on every rank (it is collective): each rank
    localises a shard, the ``(index, box)`` pairs are gathered, and every rank returns the same table.

    Args:
        feature_extractor: Images ``[B, 3, H, W]`` -> last feature map ``[B, C, h, w]``; usually
            ``last_feature_map(method.backbone)`` (the online encoder, as upstream).
        data: A dataset yielding ``(views, label, index)`` with one test-time view showing the whole image
            (``eval_view_dataset(train_set, size, mean, std, crop_fraction=None)``): under DDP it is split
            into strided shards (rank ``r`` takes ``r, r + W, ...``, no padding). Or a loader (a ``DataLoader``,
            a :class:`~contrastlab.data.device_loader.DeviceEvalLoader`) that already yields this rank's share
            (e.g. with ``DistributedSampler(shuffle=False)``; padded duplicates are harmless); together the
            ranks' loaders must cover every index.
        threshold: ``k`` in ``[0, 1)`` applied to the normalised, upsampled heatmap.
        device: Where the network runs (and the gathers: CUDA for NCCL); CPU by default.
        kind: Heatmap kind, one of :data:`HEATMAPS`.
        num_samples: ``N``, the number of rows; ``len`` of the dataset by default.
        batch_size: Batch size when ``data`` is a dataset.
        num_workers: DataLoader workers when ``data`` is a dataset.
        distributed: Shard and gather across ranks; ``None``: when a process group with several ranks exists.
        edges: Far box edges, :data:`BOX_EDGES` (``released``: upstream's ``last / size``).

    Returns:
        A float32 CPU tensor ``[N, 4]``, row ``i`` the box ``(x0, y0, x1, y1)`` of the sample with index
        ``i``; pass it to :meth:`BoxStore.fill`.

    Raises:
        ConfigError: Bad threshold or kind.
        ValueError: Batches without indices, or indices outside ``[0, N)``.
        RuntimeError: Some index was never seen.

    Example:
        >>> table = localise(last_feature_map(method.backbone), eval_set, threshold=0.1,  # doctest: +SKIP
        ...                  device="cuda")
        >>> store.fill(table)  # doctest: +SKIP
    """
    threshold = _check_threshold(threshold)
    if kind not in HEATMAPS:
        raise ConfigError(f"unknown heatmap kind {kind!r}; valid kinds: {list(HEATMAPS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    multi = is_initialized() and get_world_size() > 1
    if distributed is None:
        distributed = multi
    elif distributed and not multi:
        raise ValueError("localise(distributed=True) needs an initialised process group with several ranks")

    if not isinstance(data, Dataset):  # a loader
        loader = data
        total = num_samples if num_samples is not None else len(loader.dataset)  # type: ignore[arg-type]
    else:
        size = len(data)  # type: ignore[arg-type]
        total = num_samples if num_samples is not None else size
        shard = range(get_rank(), size, get_world_size()) if distributed else range(size)
        loader = DataLoader(
            Subset(data, list(shard)), batch_size=batch_size, shuffle=False, num_workers=num_workers
        )

    modules = list(feature_extractor.modules()) if isinstance(feature_extractor, nn.Module) else []
    modes = [m.training for m in modules]
    if isinstance(feature_extractor, nn.Module):
        feature_extractor.eval()
    try:
        seen_idx, seen_boxes = [], []
        for batch in loader:
            images, index = _unpack(batch)
            fmap = feature_extractor(images.to(device, non_blocking=True))
            boxes = boxes_from_heatmaps(heatmap(fmap, kind), images.shape[-2:], threshold, edges)
            seen_idx.append(index)
            seen_boxes.append(boxes.cpu())
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
    indices = torch.cat(seen_idx) if seen_idx else torch.empty(0, dtype=torch.long)
    boxes = torch.cat(seen_boxes) if seen_boxes else torch.empty(0, 4)
    if distributed:
        indices, boxes = _gather_pairs(indices, boxes, device)
    return _scatter(indices, boxes, total)
