"""Where and how the step runs: the device, the autocast precision, ``torch.compile``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from contrastlab.config.derived import Derived
from contrastlab.config.schema import Config
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
    """Whether ``exc`` is an allocation failure (CUDA out of memory, the CPU allocator refusing a size, or Python's
    MemoryError, e.g. PIL's)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: the GPU's free memory, or the host's ``MemAvailable``; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def view_bytes(sizes: Sequence[int], per_rank: int) -> int:
    """Bytes of one rank's views of a step as float32 tensors ``[per_rank, 3, s, s]``, one per view side ``s``."""
    return per_rank * sum(3 * s * s * 4 for s in sizes)


def _sides(sizes: Sequence[int]) -> str:
    """``224x224`` for views of one side, ``224x224/96x96`` for several."""
    return "/".join(f"{s}x{s}" for s in dict.fromkeys(sizes))


def _image_size(cfg: Config) -> str:
    return str(cfg.data.image_size) if cfg.data.image_size else "null (the dataset's own size)"


def step_load(cfg: Config, sizes: Sequence[int], d: Derived) -> str:
    """What a step holds and how to make it smaller, for out-of-memory messages."""
    return (f"each step holds {d.per_rank_batch_size} image(s) x {len(sizes)} views of {_sides(sizes)} px per rank "
            f"(data.batch_size={cfg.data.batch_size} over {d.world_size} rank(s), data.image_size={_image_size(cfg)}) "
            "and the model's activations for them; lower data.image_size or data.batch_size, or train a smaller "
            f"model (model.width={cfg.model.width})")


def check_view_memory(cfg: Config, sizes: Sequence[int], per_rank: int, device: torch.device) -> None:
    """ConfigError when the views of one step (:func:`view_bytes`) alone exceed the memory free on ``device``."""
    need, free = view_bytes(sizes, per_rank), free_memory(device)
    if free is None or need <= free:
        return
    raise ConfigError(
        f"data.image_size={_image_size(cfg)}: one step's views ({per_rank} image(s) x {len(sizes)} views of "
        f"{_sides(sizes)} px per rank, float32) need {need / 2**30:.1f} GiB before the model's activations, which "
        f"take several times more, but {device} has {free / 2**30:.1f} GiB free. Lower data.image_size (224 suits "
        "ImageNet-sized images; small datasets train at their own size) or data.batch_size")
