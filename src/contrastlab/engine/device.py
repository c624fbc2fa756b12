"""Where and how the step runs: the device, the autocast precision, ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from contrastlab.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` -> the autocast dtype (None: no autocast)."""


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ConfigError when ``cuda`` is asked for and missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` of ``model`` for ``train.compile``: an inductor mode, or ``eager`` (Dynamo tracing only,
    to check that a method compiles without paying for code generation)."""
    if mode == "eager":
        return torch.compile(model, backend="eager")
    return torch.compile(model, mode=mode)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA out of memory, or the CPU allocator refusing a size)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)
