"""The IDX file format of MNIST and Fashion-MNIST (plain or gzip-compressed), unsigned bytes only.

An IDX file starts with a big-endian 32-bit magic number ``0x0000TTDD`` (type ``TT`` = 0x08 for
unsigned bytes, ``DD`` = number of dimensions), then one big-endian 32-bit size per dimension, then the
values in row-major order. Image files therefore have magic 2051 (0x0803: ``[N, rows, cols]``) and
label files 2049 (0x0801: ``[N]``).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from contrastlab.data.layout import dataset_error

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UBYTE = 0x08


def _read_bytes(path: Path, dataset: str, layout: str, source: str) -> bytes:
    """Read a file's bytes, decompressing it when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise dataset_error(f"{dataset}: cannot read IDX file ({exc})", path, layout, source) from exc


def read_idx(path: Path, magic: int, dataset: str, layout: str, source: str) -> np.ndarray:
    """Read an unsigned-byte IDX file and check its magic number and size.

    Args:
        path: The ``.gz`` or uncompressed IDX file.
        magic: The expected magic number (:data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`).
        dataset: Dataset name, for error messages.
        layout: Tree sketch, for error messages.
        source: Where to get the data, for error messages.

    Returns:
        A read-only uint8 array with the dimensions given in the header.

    Raises:
        DatasetError: On a wrong magic number or a byte count that does not match the header.
    """
    raw = _read_bytes(path, dataset, layout, source)
    if len(raw) < 4:
        raise dataset_error(f"{dataset}: IDX file too short ({len(raw)} bytes)", path, layout, source)
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise dataset_error(
            f"{dataset}: bad IDX magic number {found} (expected {magic})", path, layout, source
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise dataset_error(f"{dataset}: IDX header truncated", path, layout, source)
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise dataset_error(
            f"{dataset}: IDX file has {len(raw)} bytes, header {list(shape)} implies {expected}",
            path,
            layout,
            source,
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzip-compressed (reproducibly) when ``path`` ends in ``.gz``."""
    values = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", (_UBYTE << 8) | values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
    payload = header + values.tobytes()
    if path.suffix == ".gz":
        with (
            path.open("wb") as raw_fh,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw_fh, compresslevel=9, mtime=0) as fh,
        ):
            fh.write(payload)
    else:
        path.write_bytes(payload)
