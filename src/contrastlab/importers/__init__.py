"""Importers of the upstream projects' released checkpoints (``contrastlab import FILE --from NAME --out X.pt``).

One module per project; :data:`IMPORTERS` maps each ``--from`` name to its importer, and :func:`get_importer`
is the one lookup. :func:`import_checkpoint` does the conversion; ``docs/importing.md`` lists, per project,
which released files import and how to evaluate them.

Example:
    >>> sorted(IMPORTERS)
    ['caco', 'ccrop', 'ft', 'jointcrop', 'mcl', 'mocov3']
"""

from __future__ import annotations

import difflib

from contrastlab.errors import ConfigError
from contrastlab.importers.base import Importer, Released
from contrastlab.importers.caco import CaCoImporter
from contrastlab.importers.ccrop import ContrastiveCropImporter
from contrastlab.importers.convert import import_checkpoint
from contrastlab.importers.ft import FeatureTransformImporter
from contrastlab.importers.jointcrop import JointCropImporter
from contrastlab.importers.mcl import MCLImporter
from contrastlab.importers.mocov3 import MoCoV3Importer
from contrastlab.importers.placement import Placement

IMPORTERS: dict[str, type[Importer]] = {cls.name: cls for cls in (
    MoCoV3Importer, JointCropImporter, CaCoImporter, ContrastiveCropImporter, FeatureTransformImporter, MCLImporter)}
"""``--from`` name -> importer class."""


def get_importer(name: str) -> Importer:
    """The importer of project ``name``; ConfigError listing the valid names (and the closest) otherwise."""
    if name not in IMPORTERS:
        close = difflib.get_close_matches(str(name), list(IMPORTERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--from {name!r} is not a known project{hint}; valid: "
                          + ", ".join(f"{n} ({cls.project})" for n, cls in IMPORTERS.items()))
    return IMPORTERS[name]()


__all__ = ["IMPORTERS", "Importer", "Placement", "Released", "get_importer", "import_checkpoint"]
