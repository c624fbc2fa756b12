"""JointCrop (Zhang et al., AAAI 2025; btzyd/JointCrop): MoCo v3 with a joint crop of the two views.

``main_jointcrop.py`` is MoCo v3's ``main_moco.py`` with the crop swapped, and saves the same dictionary
(``epoch``, ``arch``, ``state_dict``, ``optimizer``, ``scaler``; ``checkpoint_NNNN.pth.tar`` every 10 epochs and
at the last); its ``main_lincls.py`` saves MoCo v3's linear-probe dictionary. The model is MoCo v3's (its extra
builder arguments ``lam`` and ``q`` hold no weights), so the layouts and their placement are those of
:mod:`contrastlab.importers.mocov3`; only the recipe differs: ``imagenet/mocov3_jointcrop_r50_{100,300}ep``.
"""

from __future__ import annotations

from typing import ClassVar

from contrastlab.importers.mocov3 import MoCoV3Importer
from contrastlab.registry import register_importer


@register_importer()
class JointCropImporter(MoCoV3Importer):
    """btzyd/JointCrop ``.pth.tar`` files: MoCo v3's layouts, JointCrop's recipes."""

    name = "jointcrop"
    project = "btzyd/JointCrop"
    resnet_recipes: ClassVar[dict[int, str]] = {100: "imagenet/mocov3_jointcrop_r50_100ep",
                                                300: "imagenet/mocov3_jointcrop_r50_300ep"}
    # the release trains ResNet-50 only; a ViT file (its vits.py is MoCo v3's) gets MoCo v3's ViT recipes
