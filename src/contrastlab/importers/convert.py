"""``contrastlab import``: a released checkpoint of an upstream project in, a contrastlab checkpoint out.

:func:`import_checkpoint` reads the file, lets the project's importer recognise it and choose the recipe,
builds our method from that recipe (plus the overrides the file implies, then the user's), places every
tensor (:class:`~contrastlab.importers.placement.Placement`), loads the result with ``strict=True`` and
writes a normal checkpoint (:mod:`contrastlab.engine.checkpoint`): ``contrastlab eval knn|linear``, ``views
--checkpoint``, ``export`` and ``train ... resume=FILE`` read it as they read their own.

What the written checkpoint holds besides the usual entries:

- ``imported``: where it came from (project, file, kind, layout, upstream epoch and metadata), the overrides,
  and the account of the conversion: how many tensors were placed (and which went elsewhere: the classifier),
  which of our keys kept their initial value and why, and what happened to each other top-level entry (the
  optimizer state, not carried over, and so on);
- ``classifier`` (linear-probe files): ``{"weight": [C, D], "bias": [C], "num_classes": C, "source": ...}``, the
  released classifier on the backbone's features; ``contrastlab eval linear --stored-classifier`` reports its
  test accuracy without training one;
- ``step`` is None (upstream counts epochs; the trainer derives the step from ``epoch`` on resume), and the
  optimizer state is that of a fresh optimizer of the recipe (upstream's is not carried over).

Before anything is written, :func:`check_record` holds the record to the checkpoint: every key the record places in
the method state is in ``method`` with the value placed, and every upstream key it places elsewhere (``fc.weight``
-> ``classifier``) is in that entry; a disagreement is a bug in the importer (RuntimeError), never a silent gap.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import LINEAR, read_released
from contrastlab.importers.placement import Placement, _listed
from contrastlab.models.vit_features import probe_feature_dim


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Converted:
    """A released file converted in memory (:func:`convert_released`).

    Attributes:
        method: our method with the file's weights loaded (``strict=True``), in training mode.
        checkpoint: the contrastlab checkpoint dictionary :func:`import_checkpoint` writes.
        summary: what :func:`import_checkpoint` returns (recipe, kind, epoch, counts), without ``out``.
    """

    method: Any
    checkpoint: dict[str, Any]
    summary: dict[str, Any]


def import_checkpoint(path: str | os.PathLike, source: str, out: str | os.PathLike, *, recipe: str | None = None,
                      overrides: list[str] | tuple[str, ...] = (), allow_pickle: bool = False,
                      classifier: str | os.PathLike | None = None, log=_stderr) -> dict[str, Any]:
    """Convert the released file ``path`` of project ``source`` into a contrastlab checkpoint at ``out``.

    Args:
        path: the released file (``.pth.tar`` / ``.pth``).
        source: the project, a key of :data:`contrastlab.importers.IMPORTERS` (``--from``).
        out: the checkpoint to write (atomically, with its ``.sha256``).
        recipe: the recipe to build our model from (default: the importer's choice for the file).
        overrides: ``key=value`` overrides applied after those the file implies.
        allow_pickle: load files holding arbitrary Python objects (may run code from the file).
        classifier: a linear-probe file holding only a classifier trained on this file's backbone (FT's
            ``main_linear.py``), stored as the checkpoint's ``classifier``.
        log: where the account of the conversion goes.

    Returns:
        A summary: the recipe, kind, epoch, counts of placed / initialised tensors, ``out``.

    Raises:
        CheckpointError: the file is not a layout of that project, a key cannot be placed, or a shape differs.
        ConfigError: an unknown project (listing the valid ones), recipe or override.
    """
    from contrastlab.engine.checkpoint import atomic_save
    from contrastlab.importers import get_importer

    get_importer(source)  # an unknown project is named before the file is read
    path = Path(path)
    probe = None if classifier is None else (read_released(classifier, allow_pickle), Path(classifier))
    converted = convert_released(read_released(path, allow_pickle), path, source, recipe=recipe, overrides=overrides,
                                 classifier=probe, log=log)
    out = Path(out)
    atomic_save(converted.checkpoint, out)
    log(f"import: wrote {out}")
    return {"out": str(out), **converted.summary}


def convert_released(raw: dict[str, Any], path: str | os.PathLike, source: str, *, recipe: str | None = None,
                     overrides: list[str] | tuple[str, ...] = (),
                     classifier: tuple[dict[str, Any], str | os.PathLike] | None = None, log=_stderr) -> Converted:
    """Convert the dictionary ``raw`` loaded from the released file ``path`` (named in messages and the record),
    writing nothing: :func:`import_checkpoint` without the reading and the writing (``classifier``: the loaded
    classifier-only probe file and its path).

    Raises:
        CheckpointError / ConfigError: as :func:`import_checkpoint`.
    """
    from contrastlab import assemble
    from contrastlab.config.load import dump_config, load_config
    from contrastlab.engine.checkpoint import FORMAT, VERSION
    from contrastlab.engine.optim import build_optimizer
    from contrastlab.importers import get_importer

    importer = get_importer(source)
    path = Path(path)
    released = importer.recognise(raw, path)
    for name, what in (("epoch", "used as the checkpoint's epoch (epochs completed)"), ("arch", "used as model.arch")):
        if name in released.other and (name == "arch" or released.kind != LINEAR):
            released.other[name] = what
    if classifier is not None and importer.classifier(released) is not None:
        raise CheckpointError(f"{path} holds its own classifier; --classifier {classifier[1]} is for pre-training "
                              "files only")
    chosen = recipe or importer.default_recipe(released)
    implied = importer.overrides(released)
    cfg = load_config(chosen, [*implied, *overrides])
    log(f"import: {path} is a {importer.project} {released.kind} file (layout {released.layout}, arch "
        f"{released.arch}, epoch {released.epoch}); recipe {chosen}" + (f" with {' '.join(implied)}" if implied else ""))
    torch.manual_seed(cfg.seed)
    method = assemble.method(cfg, importer.num_classes(released), None)
    placement = Placement(released.state, method.state_dict(), where=str(path))
    importer.place(released, placement)
    try:
        method.load_state_dict(placement.finish(), strict=True)
    except RuntimeError as exc:  # a mismatch the placement did not catch: report it, write nothing
        raise CheckpointError(f"{path}: the placed weights do not load into the model of {chosen}: {exc}") from exc

    epoch = released.epoch
    if released.kind == LINEAR or epoch is None:
        epoch = cfg.train.epochs
        log(f"import: the file records no pre-training epoch; the checkpoint says epoch {epoch} (the recipe's length)")
    summary = placement.summary()
    ckpt: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "config": dump_config(cfg), "recipe": chosen, "epoch": epoch,
        "step": None, "method": method.state_dict(),
        "optimizer": build_optimizer(method.param_groups(), cfg.optim, cfg.optim.lr).state_dict(), "scaler": {},
        "skipped_total": 0, "partial": None,
        "imported": {"from": source, "project": importer.project, "file": str(path), "kind": released.kind,
                     "layout": released.layout, "arch": released.arch, "upstream_epoch": released.epoch,
                     "info": released.info, "overrides": [*implied, *overrides], "entries": released.other,
                     **summary},
    }
    stored = importer.classifier(released)
    source_of = f"{path} ({importer.project} linear probe)"
    if classifier is not None:
        stored, probe_info = importer.classifier_file(classifier[0], Path(classifier[1]))
        dim = int(stored["weight"].shape[-1])
        wanted = probe_feature_dim(method.feature_dim, cfg.linear)
        if stored["weight"].ndim != 2 or dim != wanted:
            blocks = (f" (linear.n_last_blocks={cfg.linear.n_last_blocks}, linear.avgpool_patch_tokens="
                      f"{str(cfg.linear.avgpool_patch_tokens).lower()})") if wanted != method.feature_dim else ""
            raise CheckpointError(f"{classifier[1]}: the classifier's weight has shape {list(stored['weight'].shape)}; "
                                  f"the probe on the backbone of {path} reads {wanted}-d features{blocks}: pass the "
                                  "linear file trained on this pre-training file, or the linear.* settings it used")
        source_of = f"{classifier[1]} ({importer.project} linear probe on {path.name})"
        ckpt["imported"]["classifier_file"] = {"file": str(classifier[1]), **probe_info}
    classifier = stored
    if classifier is not None:
        ckpt["classifier"] = {**classifier, "num_classes": int(classifier["weight"].shape[0]), "source": source_of}
    ckpt.update(importer.extras(released, cfg))
    ckpt["imported"]["entries"] = released.other  # extras may have said what became of an entry

    check_record(placement, ckpt, importer.project)

    log(f"import: placed {summary['placed']} tensors into the {cfg.method.name} model"
        + (f"; the classifier ({ckpt['classifier']['num_classes']} classes) is stored for `eval linear "
           "--stored-classifier`" if classifier is not None else ""))
    for why, count in summary["initial"].items():
        log(f"import: {count} tensor(s) not in the file: {why}")
    for name, what in released.other.items():
        log(f"import: entry {name!r}: {what}")
    return Converted(method, ckpt, {"recipe": chosen, "from": source, "kind": released.kind, "epoch": epoch,
                                    "placed": summary["placed"], "initialised": sum(summary["initial"].values()),
                                    "classifier": classifier is not None})


def _same(a: object, b: torch.Tensor) -> bool:
    """Whether ``a`` is a tensor equal to ``b`` (shape, dtype and values; NaN equal to NaN)."""
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_record(placement: Placement, ckpt: dict[str, Any], project: str) -> None:
    """Hold the import record to the checkpoint about to be written (see the module docstring).

    Checks that each of our keys the placement filled (placed from the file, or kept initial) is in ``ckpt["method"]``
    with the value placed; that each upstream key placed outside the method (``Placement.take``: ``fc.weight`` ->
    ``"classifier"``) is in that entry of the checkpoint, under the key's last name (``weight``) with the file's
    value; and that a ``classifier`` entry came from the file or from ``--classifier FILE``.

    Raises:
        RuntimeError: they disagree, a bug in the importer of ``project`` (not something the user can fix).
    """
    method = ckpt.get("method", {})
    wrong = [key for key in [*placement.placed, *placement.initial]
             if key not in method or not _same(method[key], placement.out[key])]
    for src, entry in placement.elsewhere.items():
        stored = ckpt.get(entry)
        if not isinstance(stored, dict) or not _same(stored.get(src.rsplit(".", 1)[-1]), placement.source[src]):
            wrong.append(f"{src} -> {entry}")
    if "classifier" in ckpt and "classifier" not in placement.elsewhere.values() \
            and "classifier_file" not in ckpt.get("imported", {}):
        wrong.append("a classifier entry that the record does not account for")
    if wrong:
        raise RuntimeError(f"{placement.where}: the import record and the checkpoint disagree on {len(wrong)} "
                           f"key(s): {_listed(wrong)}. Nothing was written. This is a bug in the {project} importer; "
                           "please report it")
