"""Checkpoints: atomic writes, checksums, clear errors on damaged files, and the backbone loader used by eval.

A checkpoint is a ``torch.save`` dictionary with ``format == "contrastlab-checkpoint"``. It is written
to a temporary file in the same folder, flushed, fsynced, then renamed over the target, so a crash
never leaves a half-written ``last.pt``. Next to it, ``<name>.sha256`` holds the SHA-256 of its bytes
(written the same way, after the checkpoint); :func:`load_checkpoint` checks it, so a file damaged on
disk later is detected, not loaded. A checkpoint copied without that file still verifies itself: ``torch.save``
writes a zip archive whose members each carry a CRC-32, and :func:`load_checkpoint` checks them all. The checksum
file is replaced before the checkpoint is renamed into place, and lists both the new file's digest and the one it
replaces, so a crash at any moment (``kill -9``, a node lost) leaves a checkpoint that matches it. A damaged
``last.pt`` makes ``resume=auto`` fall back to an older one (:func:`newest_intact_checkpoint`). A failed write
(disk full) raises :class:`~contrastlab.errors.CheckpointError` and leaves the previous checkpoint untouched.

Opening a checkpoint never runs code from it: it holds tensors, numbers, strings and plain containers only, and is
read as such (:func:`contrastlab.safe_load.load_torch_file`); ``trust_pickle=True`` (``--trust-pickle``) opens a
file holding other Python objects, from a source the user trusts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from contrastlab.errors import CheckpointError
from contrastlab.safe_load import load_torch_file, plain_tree

FORMAT = "contrastlab-checkpoint"
VERSION = 2
"""2: a config's ``views`` section holds the keys of its planner only (1: every planner's keys)."""


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the SHA-256 of checkpoint ``path`` is kept: ``<path>.sha256``."""
    return Path(f"{path}.sha256")


class _HashingWriter:
    """A write-only file that passes bytes on to ``fh`` and feeds them to ``digest`` on the way."""

    def __init__(self, fh: BinaryIO, digest: Any) -> None:
        self.fh = fh
        self.digest = digest

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _written_temp(data: bytes | memoryview | Callable[[BinaryIO], None], path: Path) -> Path:
    """``data`` (bytes, or a function writing to a file) written, flushed and fsynced to a temporary file beside
    ``path``; the caller renames it (or deletes it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomically(data: bytes | memoryview | Callable[[BinaryIO], None], path: Path) -> None:
    """Write ``data`` (bytes, or a function writing to a file) to ``path`` through a temporary file in the same
    folder, fsync, then rename."""
    tmp = _written_temp(data, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file, fsync, its checksum file, rename, fsync folder).

    ``obj`` holds tensors, numbers, strings and plain containers only (numpy scalars become Python numbers): what
    :func:`load_checkpoint` opens without running code.

    Raises:
        CheckpointError: the file could not be written (disk full, permissions), or ``obj`` holds another kind of
            object (the message names its entry); the previous file at ``path`` is left as it was.
    """
    path = Path(path)
    obj = plain_tree(obj, f"checkpoint {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()  # of the bytes as they stream to disk: the checkpoint is never copied in memory
    try:
        tmp = _written_temp(lambda fh: torch.save(obj, _HashingWriter(fh, digest)), path)
        try:  # the checksum file first, naming the new file and the one it replaces: a crash between the two
            # renames leaves a checkpoint that still matches it
            previous = recorded_digests(path)[:1] if path.is_file() else []
            lines = [f"{digest.hexdigest()}  {path.name}\n", *(f"{d}  {path.name} (before)\n" for d in previous)]
            write_atomically("".join(lines).encode(), checksum_path(path))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as exc:
        # Streaming into the file, torch.save reports a failed write (disk full, file too large) as the OSError
        # itself or as a RuntimeError from its zip writer raised while handling it.
        failure = _os_error_in(exc)
        if failure is None:
            raise
        raise CheckpointError(f"could not write checkpoint {path} ({failure.strerror or failure}; it needs about "
                              f"{_tensor_bytes(obj) / 2**20:.0f} MB, {_free_bytes(path.parent) / 2**20:.0f} MB "
                              "are free there); the previous checkpoint there, if any, is unchanged. Free disk "
                              "space or choose another out=DIR, then resume with resume=auto") from exc


def _os_error_in(exc: BaseException | None) -> OSError | None:
    """The first :class:`OSError` in ``exc``'s chain of causes and contexts, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list (the bulk of a checkpoint's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def recorded_digests(path: str | os.PathLike) -> list[str]:
    """The SHA-256 digests ``<path>.sha256`` lists (the file's, then, while it is being replaced, the previous one's)."""
    try:
        lines = checksum_path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in lines if line.split()]


def verify_checksum(path: str | os.PathLike) -> bool | None:
    """Whether ``path`` matches a SHA-256 its checksum file lists; ``None`` when no checksum was recorded."""
    if not checksum_path(path).is_file():
        return None
    expected = recorded_digests(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest() in expected


def damaged_zip_member(path: str | os.PathLike) -> str | None:
    """The first member of ``torch.save``'s zip archive at ``path`` whose bytes do not match their CRC-32, if any.

    ``None`` also for a file that is not a zip archive (the legacy torch format): :func:`torch.load` judges it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except zipfile.BadZipFile:
        return None
    except (OSError, EOFError, zipfile.LargeZipFile) as exc:
        return f"(unreadable: {exc})"


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint and its checksum file."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def newest_intact_checkpoint(folder: str | os.PathLike, log=print, trust_pickle: bool = False) -> Path | None:
    """``last.pt`` if intact, else the newest intact ``epoch_NNNN.pt``; each damaged file is named in ``log``."""
    folder = Path(folder)
    candidates = [folder / "last.pt", *sorted(folder.glob("epoch_*.pt"), reverse=True)]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            load_checkpoint(candidate, map_location="cpu", trust_pickle=trust_pickle)
        except CheckpointError as exc:
            log(f"skipping {candidate}: {exc}")
            continue
        return candidate
    return None


UPGRADES: list[Callable[[dict[str, Any]], None]] = []
"""Functions that bring, in place, a checkpoint written by an older contrastlab up to date (the plug-in whose
state moved adds its own, e.g. the localiser observer's box table); :func:`load_checkpoint` applies them all."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    trust_pickle: bool = False) -> dict[str, Any]:
    """Read a contrastlab checkpoint, verified and without running code from it.

    Args:
        path: The ``.pt`` file.
        map_location: Where its tensors go.
        trust_pickle: Also open a file holding Python objects besides tensors and plain containers (it may run code
            from the file): only for a file from a source you trust.

    Raises:
        CheckpointError: naming the file, when it is missing, damaged (its ``.sha256``, else its zip CRCs),
            holds other Python objects (without ``trust_pickle``) or was not written by contrastlab.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pt file written by "
                              "`contrastlab train` (runs/<name>/checkpoints/last.pt)")
    intact = verify_checksum(path)
    if intact is False:
        raise CheckpointError(f"checkpoint {path} does not match its checksum {checksum_path(path).name} (damaged "
                              "on disk, or a write was cut off); use an earlier checkpoint from the same folder")
    damaged = damaged_zip_member(path) if intact is None else None  # a matching .sha256 has checked every byte
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: its part {damaged} does not match the CRC-32 stored "
                              "with it (changed on disk or in a copy); use an earlier or another copy of it")
    ckpt = load_torch_file(path, map_location, trust_pickle=trust_pickle)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by contrastlab (no '{FORMAT}' marker); "
                              "to evaluate foreign weights, convert them first")
    for upgrade in UPGRADES:
        upgrade(ckpt)
    return ckpt


def backbone_state(ckpt: dict[str, Any], peer: int | None = None,
                   module: str = "backbone") -> dict[str, torch.Tensor]:
    """The online backbone's weights from a checkpoint's method state (keys without ``backbone.``).

    ``peer`` selects peer ``i`` of a cohort method (MCL) instead: its weights, shared trunk included, are
    under ``cohort.peers.<i>.``; ``backbone.`` is peer 0. ``module`` reads another copy of the backbone, e.g. the
    method's momentum backbone (:attr:`contrastlab.methods.Method.momentum_backbone`, DINO's ``teacher_backbone``).
    """
    prefix = f"{module}." if peer is None else f"cohort.peers.{peer}."
    state = {k[len(prefix):]: v for k, v in ckpt["method"].items() if k.startswith(prefix)}
    if not state:
        if module != "backbone":
            raise CheckpointError(f"checkpoint holds no '{prefix}*' weights in its method state")
        if peer is not None:
            peers = sorted({int(k.split(".")[2]) for k in ckpt["method"] if k.startswith("cohort.peers.")})
            raise CheckpointError(f"checkpoint has no peer {peer}; its peers: {peers or 'none (not a cohort method)'}")
        raise CheckpointError("checkpoint holds no 'backbone.*' weights in its method state")
    return state


def stored_classifier(ckpt: dict[str, Any], peer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The classifier a checkpoint carries: ``(weight [C, D], bias [C], where it came from)``.

    An imported linear-probe file's classifier is the ``classifier`` entry (:mod:`contrastlab.importers`); a
    cohort method's (MCL) are its ``classifiers.<peer>`` (peer 0 by default).

    Raises:
        CheckpointError: the checkpoint has none.
    """
    if "classifier" in ckpt and not peer:
        entry = ckpt["classifier"]
        return entry["weight"], entry["bias"], str(entry.get("source", "the checkpoint's classifier entry"))
    name = f"classifiers.{peer or 0}"
    method = ckpt.get("method", {})
    if f"{name}.weight" in method:
        return method[f"{name}.weight"], method[f"{name}.bias"], f"the method's {name}"
    raise CheckpointError("the checkpoint stores no classifier (only imported linear-probe files and supervised "
                          "cohorts do); run `contrastlab eval linear` without --stored-classifier to train a probe")


def load_backbone_weights(backbone: nn.Module, ckpt: dict[str, Any], source: str = "checkpoint",
                          peer: int | None = None, module: str = "backbone") -> None:
    """Load the backbone (or cohort peer ``peer``, or the copy at ``module``) weights strictly; CheckpointError
    listing mismatches."""
    try:
        backbone.load_state_dict(backbone_state(ckpt, peer, module), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: backbone weights do not match the model built from its config: {exc}") from exc
