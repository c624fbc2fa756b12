"""``BatchViews``: the batched counterpart of :class:`~contrastlab.views.dataset.ViewDataset` (plan, render, recipe).

The same planner, view sizes, photometric recipes and JointBlur as the CPU dataset of views, applied to a whole
batch of images already on the device: boxes from the planner's batched law (``plan_batch``), pixels
from :func:`~contrastlab.views.gpu_render.render_views`. Every random draw comes from the generator passed in, on
the images' device, so a run is reproducible from its seed; the draws follow the CPU path's laws but are not the
same numbers.

Example:
    >>> from contrastlab.views import make_photometric, make_planner
    >>> views = BatchViews(make_planner("random_resized"), [16, 16],
    ...                    [make_photometric("small", v, (0.5,) * 3, (0.25,) * 3) for v in range(2)])
    >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    >>> [v.shape for v in views(images, torch.arange(8), torch.Generator().manual_seed(0))]
    [torch.Size([8, 3, 16, 16]), torch.Size([8, 3, 16, 16])]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from contrastlab.errors import ConfigError
from contrastlab.views.box_store import BoxStore
from contrastlab.views.dataset import ViewDataset
from contrastlab.views.gpu_render import compiled_render_view, render_views
from contrastlab.views.joint_blur import JointBlur
from contrastlab.views.photometric import PhotometricRecipe
from contrastlab.views.planners.base import Planner


class BatchViews:
    """Render every view of a batch on its device (see the module docstring).

    Args:
        planner: Any :class:`~contrastlab.views.planners.base.Planner` (boxes planned in a batch).
        sizes: Side of each view.
        photometrics: :class:`~contrastlab.views.photometric.PhotometricRecipe` of each view.
        joint_blur: JointBlur of the first two views, or None.
        independent_planner: The planner of JointBlur's pairs in ``either`` mode.
        compile: Render each view through ``torch.compile`` (:func:`~contrastlab.views.gpu_render.
            compiled_render_view`, ``data.compile_views``); if compiling fails, the views are rendered eagerly
            from then on, ``compile_error`` says why and ``log`` (a warning by default) is told.
    """

    def __init__(self, planner: Planner, sizes: Sequence[int], photometrics: Sequence[PhotometricRecipe],
                 joint_blur: JointBlur | None = None, independent_planner: Planner | None = None,
                 compile: bool = False) -> None:
        if len(sizes) != planner.num_views or len(photometrics) != planner.num_views:
            raise ConfigError(f"the planner makes {planner.num_views} views but {len(sizes)} sizes and "
                              f"{len(photometrics)} photometric recipes were given")
        for recipe in photometrics:
            if not isinstance(recipe, PhotometricRecipe):
                raise ConfigError(f"the batched renderer runs PhotometricRecipe objects, got {type(recipe).__name__}")
        self.planner = planner
        self.sizes = list(sizes)
        self.photometrics = list(photometrics)
        self.joint_blur = joint_blur
        self.independent_planner = independent_planner
        self.pad = int(getattr(planner, "padding", 0)) if getattr(planner, "pads", False) else 0
        self._table: torch.Tensor | None = None
        self.compile = compile
        self.compile_error: str | None = None
        self.log: Callable[[str], None] = lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3)

    @classmethod
    def from_view_dataset(cls, dataset: ViewDataset, compile: bool = False) -> BatchViews:
        """The batched renderer of the CPU ``ViewDataset`` ``dataset`` (same planner, sizes, recipes, JointBlur)."""
        return cls(dataset.planner, dataset.sizes, dataset.photometrics, dataset.joint_blur,
                   dataset.independent_planner, compile=compile)

    @property
    def store(self) -> BoxStore | None:
        """The planner's per-image box table (ContrastiveCrop / SemanticCrop), if any."""
        store = getattr(self.planner, "store", None)
        return store if isinstance(store, BoxStore) else None

    def refresh(self, device: torch.device) -> None:
        """Copy the box store's table to ``device`` (call after the localiser updated it: once per epoch)."""
        store = self.store
        self._table = None if store is None else store.table.to(device, non_blocking=True)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, generator: torch.Generator,
                 image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Views ``[B, 3, S_v, S_v]`` of ``images [B, C, H, W]`` (uint8) whose dataset indices are ``index [B]``.

        ``image_sizes [B, 2]`` (height, width) gives each image's own size when they were padded into one canvas
        (:func:`~contrastlab.data.jpeg.decode_batch`); None means every image fills the canvas.
        """
        if image_sizes is None:
            height, width = images.shape[-2:]
        else:
            height, width = image_sizes[:, 0], image_sizes[:, 1]
        if self.store is not None and (self._table is None or self._table.device != images.device):
            self.refresh(images.device)
        boxes = self.planner.plan_batch(index, width, height, generator, store_table=self._table)
        sigmas = use_joint = None
        if self.joint_blur is not None:
            use_joint, sigmas = self.joint_blur.sample_batch(images.shape[0], generator)
            if self.joint_blur.mode == "either":
                other = self.independent_planner.plan_batch(index, width, height, generator)
                boxes = torch.where(use_joint[:, None, None], other, boxes)
        if self.compile:
            state = generator.get_state()  # host-side (seed, offset): no device read
            try:
                return render_views(images, boxes, self.sizes, self.photometrics, generator, sigmas, use_joint,
                                    self.pad, render=compiled_render_view())
            except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported backend: the eager renderer is exact too
                self.compile, self.compile_error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                generator.set_state(state)  # the eager render draws what the failed attempt drew
                self.log(f"data.compile_views: compiling the views failed ({self.compile_error}); rendering them "
                         "eagerly")
        return render_views(images, boxes, self.sizes, self.photometrics, generator, sigmas, use_joint, self.pad)
