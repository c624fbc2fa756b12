"""Reading files that may come from anyone, without running code from them.

A pickle can name any Python callable and have it called while it loads (``os.system`` included); ``torch.load``
with ``weights_only=False`` is such a pickle. Checkpoints travel between people (a shared cluster folder, a download
link, a paper's release), so contrastlab opens every checkpoint and every released file with
:func:`load_torch_file`: tensors, numbers, strings and plain containers only (``weights_only=True``), plus the numpy
arrays of numbers that checkpoints of contrastlab 0.x kept numpy's random state in. Anything else is refused with
:data:`TRUST_PICKLE_HINT`: the one opt-in, ``--trust-pickle`` on the command line and ``trust_pickle=True`` in
Python, for a file whose source the user trusts.

Dataset pickles (CIFAR's python version) go through :func:`load_plain_pickle`: builtins and numeric numpy arrays,
no other callable.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from contrastlab.errors import CheckpointError

TRUST_PICKLE_HINT = ("loading it could run code from the file. If you trust where the file came from, run again with "
                     "--trust-pickle (Python: trust_pickle=True)")
"""The one wording of the opt-in, used by every command that opens a checkpoint or a released file."""


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return core.multiarray._reconstruct


def _numpy_frombuffer() -> Any:
    core = getattr(np, "_core", None) or np.core
    return core.numeric._frombuffer


def _numeric_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the numeric types only: an object array could hold anything."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy arrays of Python objects ({dtype}) are not loaded")
    return dtype


NUMERIC_DTYPES = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
"""numpy's classes of the numeric dtypes (``numpy.dtypes.UInt32DType``, ...), which an array's pickle names."""

NUMPY_ARRAY_GLOBALS = [_numpy_reconstruct(), np.ndarray, np.dtype, *NUMERIC_DTYPES]
"""What a numeric numpy array inside a torch file needs (older contrastlab checkpoints hold numpy's RNG state as
one)."""


def _allowing_numpy_arrays():
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only the global list
    if allow is None:
        torch.serialization.add_safe_globals(NUMPY_ARRAY_GLOBALS)
        return nullcontext()
    return allow(NUMPY_ARRAY_GLOBALS)


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The callables a torch file names beyond what a weights-only load allows (read without loading them)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if find is None:
        return []
    try:
        return sorted(set(find(path)) - {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_ARRAY_GLOBALS})
    except Exception:  # noqa: BLE001 - only used to word an error; the load itself reported the failure
        return []


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu", trust_pickle: bool = False,
                    what: str = "checkpoint") -> Any:
    """``torch.load`` ``path``: tensors and plain containers only, unless ``trust_pickle``.

    Raises:
        CheckpointError: the file names other Python objects (the message lists them and gives the opt-in), or it is
            not a readable torch file (damaged, truncated, another format).
    """
    path = Path(path)
    try:
        if trust_pickle:
            return torch.load(path, map_location=map_location, weights_only=False)
        with _allowing_numpy_arrays():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise CheckpointError(f"{what} {path} is damaged or not a torch file ({exc})") from exc
        names = unsafe_globals(path)
        found = f"it names {', '.join(names)}" if names else str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{what} {path} holds Python objects besides tensors and plain containers ({found}); "
                              f"{TRUST_PICKLE_HINT}") from exc
    except Exception as exc:  # torch raises many types for truncated / corrupt zip files
        raise CheckpointError(f"{what} {path} is damaged or not a torch file ({type(exc).__name__}: {exc}); use an "
                              "earlier copy of it") from exc


_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple)


def plain_tree(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` checked to hold tensors, numbers, strings and plain containers only, what :func:`load_torch_file`
    opens without ``trust_pickle``; numpy scalars become Python numbers (containers holding one are rebuilt, others
    are returned as they are).

    Raises:
        CheckpointError: naming the entry (``where`` and its keys) that holds anything else, and how to store it.
    """
    kind = type(obj)
    if kind in _PLAIN_LEAVES or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
        return obj.item()
    if kind in (dict, OrderedDict):
        items = {}
        for key, value in obj.items():
            if type(key) not in _PLAIN_LEAVES:
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}: {_ONLY_PLAIN}")
            items[key] = plain_tree(value, f"{where}[{key!r}]")
        if all(items[k] is obj[k] for k in obj):
            return obj
        return kind(items)
    if kind in (list, tuple):
        values = [plain_tree(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return obj if all(a is b for a, b in zip(values, obj)) else kind(values)
    raise CheckpointError(f"{where} holds a {kind.__module__}.{kind.__qualname__}: {_ONLY_PLAIN}")


_ONLY_PLAIN = ("a checkpoint holds tensors, numbers, strings, None and lists, tuples and dicts of them only, so that "
               "opening it runs no code; store the value as one of these (a numpy array as torch.from_numpy(a) or "
               "a.tolist(), an object as a dict of its fields)")


class _PlainUnpickler(pickle.Unpickler):
    """Builtins and numeric numpy arrays; any other callable a pickle names is refused."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer(),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer(),
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _numeric_dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes (text codecs only: no code is loaded)
        **{(t.__module__, t.__name__): t for t in NUMERIC_DTYPES},
    }

    def find_class(self, module: str, name: str) -> Any:
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"the pickle names {module}.{name}; only plain data (numbers, strings, "
                                         "lists, dicts, numeric numpy arrays) is loaded")
        return found


def load_plain_pickle(fh: BinaryIO | bytes, encoding: str = "ASCII") -> Any:
    """Unpickle plain data (numbers, strings, bytes, lists, tuples, dicts, numeric numpy arrays) from ``fh``.

    Raises:
        pickle.UnpicklingError: the pickle names any other callable (it would run on load).
    """
    stream = io.BytesIO(fh) if isinstance(fh, (bytes, bytearray)) else fh
    return _PlainUnpickler(stream, encoding=encoding).load()
