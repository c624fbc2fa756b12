"""The view layer: planners (crop laws) decide crop boxes, the renderer crops and resizes, recipes augment per view.

Crops are boxes (``docs/architecture.md``): every crop strategy only plans boxes and rendering is shared.

Example:
    >>> from contrastlab.views import ViewDataset, make_photometric, make_planner
    >>> planner = make_planner("random_resized", num_views=2, scale=(0.2, 1.0))
    >>> recipes = [make_photometric("small", v, (0.5,) * 3, (0.25,) * 3) for v in range(2)]
    >>> views = ViewDataset(images, planner, sizes=[32, 32], photometrics=recipes)  # doctest: +SKIP
"""

from contrastlab.views.boxes import (
    Box,
    box_area,
    box_from_pixels,
    box_to_pixels,
    clip_box,
    validate_box,
    whole_image_box,
)
from contrastlab.views.dataset import ViewDataset, eval_view_dataset
from contrastlab.views.photometric import PHOTOMETRICS, PhotometricRecipe, blur_kernel_size, make_photometric
from contrastlab.views.planners import (
    PLANNERS,
    CenterCropPlanner,
    ContrastiveCropPlanner,
    FixedBoxPlanner,
    JointCropPlanner,
    MultiCropPlanner,
    PaddedCropPlanner,
    Planner,
    PlannerContext,
    RandomResizedCropPlanner,
    SemanticCropPlanner,
    SimCCropPlanner,
    make_planner,
    sample_resized_crop,
)
from contrastlab.views.planners.joint_crop import (
    AreaPair,
    AreaRatioStatistics,
    area_ratio_statistics,
    log_area_ratio_bound,
    sample_area_pair,
)
from contrastlab.views.render import render_box
from contrastlab.views.seeding import seed_worker

__all__ = [
    "PHOTOMETRICS",
    "PLANNERS",
    "AreaPair",
    "AreaRatioStatistics",
    "Box",
    "CenterCropPlanner",
    "ContrastiveCropPlanner",
    "FixedBoxPlanner",
    "JointCropPlanner",
    "MultiCropPlanner",
    "PaddedCropPlanner",
    "PhotometricRecipe",
    "Planner",
    "PlannerContext",
    "RandomResizedCropPlanner",
    "SemanticCropPlanner",
    "SimCCropPlanner",
    "ViewDataset",
    "area_ratio_statistics",
    "blur_kernel_size",
    "box_area",
    "box_from_pixels",
    "box_to_pixels",
    "clip_box",
    "eval_view_dataset",
    "log_area_ratio_bound",
    "make_photometric",
    "make_planner",
    "render_box",
    "sample_area_pair",
    "sample_resized_crop",
    "seed_worker",
    "validate_box",
    "whole_image_box",
]
