"""The run directory: where a run writes, whether it continues an earlier one, and the files that describe it.

Layout::

    <out>/config.yaml        the resolved config (re-runnable: ``contrastlab train <out>/config.yaml``)
    <out>/run.json           derived values (scaled lr, steps), world size, device, input pipeline, versions
    <out>/checkpoints/       last.pt (every epoch, and every ``train.checkpoint_every_steps`` steps),
                             epoch_NNNN.pt every ``train.checkpoint_every`` epochs, each with a .sha256
    <out>/results.json       final numbers and how they were measured
    <out>/bad_images.txt     unreadable images skipped (``data.bad_images=skip``)
    <out>/run.lock           held by the running trainer (host, pid, start, heartbeat): engine.run_lock

and the files and folders the run's observers and loggers write (:mod:`contrastlab.observers`).

A run that starts afresh starts in an empty directory, so two runs never mix there (:func:`check_fresh_start`,
:func:`clear_for_fresh_start`): a directory holding an earlier contrastlab run is emptied with ``overwrite=true`` (or
with ``resume=auto`` when that run left no checkpoint), and said in the log; a non-empty folder that is not a
contrastlab run directory is refused, or with ``overwrite=true`` its contents are moved aside into
``<out>.replaced-<time>`` next to it (contrastlab never deletes files it did not write).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from contrastlab import __version__
from contrastlab.config.load import dump_config
from contrastlab.config.schema import Config
from contrastlab.engine import distributed as dist
from contrastlab.engine.checkpoint import newest_intact_checkpoint
from contrastlab.engine.run_lock import LOCK_NAME
from contrastlab.errors import ConfigError, ContrastlabError


def run_directory(cfg: Config, recipe: str) -> Path:
    """``cfg.out`` or ``runs/<recipe name>``."""
    return Path(cfg.out) if cfg.out else Path("runs") / Path(recipe).with_suffix("").as_posix().replace("/", "_")


def resolve_resume(cfg: Config, out: Path, log: Callable[[str], None],
                   device: torch.device | str = "cpu", trust_pickle: bool = False) -> Path | None:
    """The checkpoint to resume from (``resume``, or a torchrun restart), or None to start afresh.

    Under torchrun every rank must call it: whether the job was restarted is agreed across ranks (``device`` is
    where the ranks' agreement is reduced).

    Raises:
        ConfigError: ``out`` already holds a run and neither ``resume`` nor ``overwrite`` says what to do.
    """
    last = out / "checkpoints" / "last.pt"
    resume = cfg.resume
    if dist.restarted_by_torchrun(device) and resume is None:  # collective: every rank resumes, or none
        log("torchrun restarted this job: resuming from its last checkpoint")
        resume = "auto"
    if resume == "auto":  # the newest intact checkpoint: a damaged last.pt falls back to epoch_NNNN.pt
        found = newest_intact_checkpoint(out / "checkpoints", log=log, trust_pickle=trust_pickle)
        if found is None and any((out / "checkpoints").glob("*.pt")):
            raise ContrastlabError(f"resume=auto: every checkpoint in {out / 'checkpoints'} is damaged (see above); "
                                   "pass overwrite=true to start afresh")
        return found
    if resume:
        return Path(resume)
    if last.is_file() and not cfg.overwrite:
        raise ConfigError(
            f"run directory {out} already holds a run ({last}); pass resume=auto to continue it, "
            "overwrite=true to start afresh there (its files are deleted), or another out=DIR"
        )
    return None


def is_run_directory(folder: Path) -> bool:
    """Whether ``folder`` was written by a contrastlab trainer (its ``run.json`` says so)."""
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "contrastlab" in info


def previous_contents(out: Path) -> list[Path]:
    """What ``out`` holds besides the lock of the trainer now starting there."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name != LOCK_NAME and not p.name.startswith(f".{LOCK_NAME}."))


def _listing(paths: list[Path], limit: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_fresh_start(cfg: Config, out: Path) -> None:
    """Whether a run may start afresh in ``out`` (every rank checks; nothing is changed).

    Raises:
        ConfigError: ``out`` is a file; or it holds files and ``overwrite`` is not set, unless it is an earlier
            contrastlab run that left no checkpoint and ``resume=auto`` was asked for.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder; choose a folder for the run directory")
    contents = previous_contents(out)
    if not contents or cfg.overwrite:
        return
    if not is_run_directory(out):
        raise ConfigError(f"out={out} is not empty ({_listing(contents)}) and is not a contrastlab run directory; "
                          "choose a new or empty folder, or pass overwrite=true to move its contents aside into "
                          f"{out.name}.replaced-<time> next to it")
    if cfg.resume != "auto":
        raise ConfigError(f"run directory {out} holds an earlier run that wrote no checkpoint ({_listing(contents)}); "
                          "pass overwrite=true (or resume=auto) to start afresh there (its files are deleted), or "
                          "another out=DIR")


def clear_for_fresh_start(out: Path, log: Callable[[str], None]) -> None:
    """Empty ``out`` for a fresh run (rank 0, after :func:`check_fresh_start`): an earlier contrastlab run's files are
    deleted, anything else is moved into ``<out>.replaced-<time>`` next to it; either is said in ``log``."""
    contents = previous_contents(out)
    if not contents:
        return
    if is_run_directory(out):
        for path in contents:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        log(f"starting afresh in {out}: deleted the earlier run's files ({_listing(contents)})")
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.parent / f"{out.name}.replaced-{stamp}"
    for n in range(1, 1000):
        if not aside.exists():
            break
        aside = out.parent / f"{out.name}.replaced-{stamp}-{n}"
    aside.mkdir()
    for path in contents:
        path.rename(aside / path.name)
    log(f"overwrite=true: {out} held files of its own ({_listing(contents)}); moved them to {aside}")


def write_run_files(out: Path, cfg: Config, recipe: str, info: dict[str, Any], device: torch.device) -> None:
    """``config.yaml`` and ``run.json`` (``info``: derived values, input pipeline, ... plus versions and device)."""
    out.mkdir(parents=True, exist_ok=True)
    given = info.get("objects") or {}
    header = "".join(f"# {kind}: an object given in Python ({name}); the {kind} keys below were not used and this file "
                     "alone does not rebuild it\n" for kind, name in given.items())
    (out / "config.yaml").write_text(header + dump_config(cfg))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    (out / "run.json").write_text(json.dumps({
        "recipe": recipe, **info, "device": str(device), "device_name": name, "torch": torch.__version__,
        "contrastlab": __version__, "python": platform.python_version()}, indent=2))
