"""Locating a dataset's files on disk and reporting layout problems.

Every loader describes its expected layout as a short tree sketch and names where to get the data.
When something is missing or malformed, :func:`dataset_error` builds a
:class:`~contrastlab.errors.DatasetError` whose message names the offending path, shows that sketch
and says where the data comes from. Nothing here downloads (:mod:`contrastlab.data.download` does, only
with ``data.download=true``).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from contrastlab.errors import DatasetError

PathLike = str | os.PathLike[str]


def dataset_error(problem: str, path: PathLike | None, layout: str, source: str) -> DatasetError:
    """Build a DatasetError naming the path, the expected layout and where to get the data.

    Args:
        problem: What went wrong, e.g. ``"missing file"``.
        path: The file or folder concerned (``None`` when no path was given at all).
        layout: A short tree sketch of the expected files.
        source: Where to obtain the data.

    Returns:
        The error, ready to raise.
    """
    where = "(no path given)" if path is None else str(path)
    sketch = textwrap.indent(textwrap.dedent(layout).strip("\n"), "    ")
    return DatasetError(f"{problem}: {where}\nExpected layout:\n{sketch}\nGet the data: {source}")


def resolve_folder(
    root: PathLike | None, folder: str, marker: str, dataset: str, layout: str, source: str
) -> Path:
    """Find a dataset's extracted folder given either its parent or the folder itself.

    Args:
        root: The path the user gave.
        folder: Name of the extracted folder, e.g. ``"cifar-10-batches-py"``.
        marker: A file that must exist inside the extracted folder, e.g. ``"batches.meta"``.
        dataset: Human name of the dataset, for messages.
        layout: Tree sketch for error messages.
        source: Where to get the data, for error messages.

    Returns:
        The extracted folder.

    Raises:
        DatasetError: If neither ``root/folder`` nor ``root`` itself holds ``marker``.
    """
    if root is None:
        raise dataset_error(f"{dataset} needs a root folder", None, layout, source)
    base = Path(root).expanduser()
    if not base.exists():
        raise dataset_error(f"{dataset} root does not exist", base, layout, source)
    if (base / folder / marker).is_file():
        return base / folder
    if (base / marker).is_file():
        return base
    if (base / folder).is_dir():
        raise dataset_error(f"{dataset} folder lacks {marker}", base / folder / marker, layout, source)
    raise dataset_error(
        f"{dataset} not found (neither {folder}/{marker} nor {marker} under the root)", base, layout, source
    )


def require_file(path: Path, dataset: str, layout: str, source: str) -> Path:
    """Return ``path`` if it is a file, else raise a DatasetError naming it."""
    if not path.is_file():
        raise dataset_error(f"{dataset}: missing file", path, layout, source)
    return path


def check_split(dataset: str, split: str, valid: Sequence[str]) -> str:
    """Return ``split`` if it is one of ``valid``, else raise a DatasetError listing the valid splits."""
    if split not in valid:
        raise DatasetError(
            f"unknown split {split!r} for dataset {dataset!r}; valid splits: {', '.join(valid)}"
        )
    return split
