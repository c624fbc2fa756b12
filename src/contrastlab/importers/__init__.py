"""Importers of the upstream projects' released checkpoints (``contrastlab import FILE --from NAME --out X.pt``).

One module per project, each importer class registered by name (:data:`IMPORTERS`, the registry
:data:`contrastlab.registry.IMPORTERS`; :func:`contrastlab.register_importer` adds one); :func:`get_importer` is the
one lookup. :func:`import_checkpoint` does the conversion (:func:`convert_released` in memory, writing nothing); ``docs/importing.md`` lists, per project,
which released files import and how to evaluate them.

Example:
    >>> sorted(IMPORTERS)
    ['barlowtwins', 'caco', 'ccrop', 'dino', 'ft', 'jointcrop', 'mcl', 'mocov3', 'swav', 'vicreg']
"""

from __future__ import annotations

from contrastlab.errors import ConfigError
from contrastlab.importers.barlowtwins import BarlowTwinsImporter
from contrastlab.importers.base import Importer, Released
from contrastlab.importers.caco import CaCoImporter
from contrastlab.importers.ccrop import ContrastiveCropImporter
from contrastlab.importers.convert import Converted, convert_released, import_checkpoint
from contrastlab.importers.dino import DINOImporter
from contrastlab.importers.ft import FeatureTransformImporter
from contrastlab.importers.jointcrop import JointCropImporter
from contrastlab.importers.mcl import MCLImporter
from contrastlab.importers.mocov3 import MoCoV3Importer
from contrastlab.importers.placement import Placement
from contrastlab.importers.swav import SwAVImporter
from contrastlab.importers.vicreg import VICRegImporter
from contrastlab.registry import IMPORTERS

BUILT_IN = (MoCoV3Importer, JointCropImporter, CaCoImporter, ContrastiveCropImporter, FeatureTransformImporter,
            MCLImporter, BarlowTwinsImporter, VICRegImporter, SwAVImporter, DINOImporter)
"""The importers of the five published systems' releases and of the base methods' (each registers itself by its
``name``)."""


def get_importer(name: str) -> Importer:
    """The importer of project ``name``; ConfigError naming the nearest names and every project otherwise."""
    if name not in IMPORTERS:
        error = IMPORTERS.error(name)
        raise ConfigError(f"{error} Projects: " + ", ".join(f"{n} ({IMPORTERS[n].project})" for n in IMPORTERS))
    return IMPORTERS[name]()


__all__ = ["BUILT_IN", "IMPORTERS", "Converted", "Importer", "Placement", "Released", "convert_released", "get_importer",
           "import_checkpoint"]
