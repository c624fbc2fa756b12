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
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from contrastlab import __version__
from contrastlab.config.load import dump_config
from contrastlab.config.schema import Config
from contrastlab.engine import distributed as dist
from contrastlab.engine.checkpoint import newest_intact_checkpoint
from contrastlab.errors import ConfigError, ContrastlabError


def run_directory(cfg: Config, recipe: str) -> Path:
    """``cfg.out`` or ``runs/<recipe name>``."""
    return Path(cfg.out) if cfg.out else Path("runs") / Path(recipe).with_suffix("").as_posix().replace("/", "_")


def resolve_resume(cfg: Config, out: Path, log: Callable[[str], None],
                   device: torch.device | str = "cpu") -> Path | None:
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
        found = newest_intact_checkpoint(out / "checkpoints", log=log)
        if found is None and any((out / "checkpoints").glob("*.pt")):
            raise ContrastlabError(f"resume=auto: every checkpoint in {out / 'checkpoints'} is damaged (see above); "
                                   "pass overwrite=true to start afresh")
        return found
    if resume:
        return Path(resume)
    if last.is_file() and not cfg.overwrite:
        raise ConfigError(
            f"run directory {out} already holds a run ({last}); pass resume=auto to continue it, "
            "overwrite=true to start afresh there, or another out=DIR"
        )
    return None


def write_run_files(out: Path, cfg: Config, recipe: str, info: dict[str, Any], device: torch.device) -> None:
    """``config.yaml`` and ``run.json`` (``info``: derived values, input pipeline, ... plus versions and device)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    (out / "run.json").write_text(json.dumps({
        "recipe": recipe, **info, "device": str(device), "device_name": name, "torch": torch.__version__,
        "contrastlab": __version__, "python": platform.python_version()}, indent=2))
