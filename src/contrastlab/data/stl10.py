"""STL-10 from the official binary files, memory-mapped.

``*_X.bin`` holds N images of 3x96x96 bytes; each channel is stored column-major (the bytes run down
the first column, then the second, ...), so a file reshaped to ``[N, 3, 96, 96]`` is indexed
``[n, channel, x, y]``. ``*_y.bin`` holds one byte per image, labels 1..10 (mapped here to 0..9).
Image files are opened with :class:`numpy.memmap`, so the 100,000 unlabeled images (2.7 GB) are read
only as samples are requested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from contrastlab.data.base import UNLABELED, ArrayDataset
from contrastlab.data.download import DownloadSpec, RemoteFile
from contrastlab.data.layout import PathLike, check_split, dataset_error, require_file, resolve_folder

SOURCE = "https://cs.stanford.edu/~acoates/stl10/ (stl10_binary.tar.gz; extract it), or data.download=true"

LAYOUT = """
root/stl10_binary/            (or root itself is this folder)
    train_X.bin  train_y.bin
    test_X.bin   test_y.bin
    unlabeled_X.bin
    class_names.txt
"""

SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
SIDE = 96
_IMAGE_BYTES = 3 * SIDE * SIDE
_NUM_CLASSES = 10


def _open_images(path: Path) -> np.ndarray:
    """Memory-map an ``*_X.bin`` file as a read-only ``[N, 96, 96, 3]`` (row, column, channel) view."""
    require_file(path, "stl10", LAYOUT, SOURCE)
    size = path.stat().st_size
    if size == 0 or size % _IMAGE_BYTES:
        raise dataset_error(
            f"stl10: file size {size} bytes is not a positive multiple of {_IMAGE_BYTES} (3x96x96)",
            path,
            LAYOUT,
            SOURCE,
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // _IMAGE_BYTES, 3, SIDE, SIDE))
    return raw.transpose(0, 3, 2, 1)


def _read_labels(path: Path, count: int) -> list[int]:
    """Read an ``*_y.bin`` file (bytes 1..10) as labels 0..9 and check it matches ``count`` images."""
    require_file(path, "stl10", LAYOUT, SOURCE)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != count:
        raise dataset_error(
            f"stl10: {raw.size} labels for {count} images (one byte per image expected)", path, LAYOUT, SOURCE
        )
    if raw.size and (raw.min() < 1 or raw.max() > _NUM_CLASSES):
        raise dataset_error(f"stl10: labels must lie in 1..{_NUM_CLASSES}", path, LAYOUT, SOURCE)
    return [int(v) - 1 for v in raw]


def _read_class_names(path: Path) -> list[str]:
    """Read ``class_names.txt`` (one name per line)."""
    require_file(path, "stl10", LAYOUT, SOURCE)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != _NUM_CLASSES:
        raise dataset_error(
            f"stl10: expected {_NUM_CLASSES} class names, found {len(names)}", path, LAYOUT, SOURCE
        )
    return names


class STL10(ArrayDataset):
    """STL-10: 96x96 RGB images; 5,000 train, 8,000 test, 100,000 unlabeled (label -1).

    ``data`` is a read-only memmap view ``[N, 96, 96, 3]`` for the single splits. The
    ``"train+unlabeled"`` split concatenates two files, which a single array view cannot express
    without reading them, so it has no ``data`` attribute; its ``parts`` holds the two views.
    Pickling (e.g. for spawned DataLoader workers) stores paths only and re-opens the memmaps.
    """

    name = "stl10"
    download = DownloadSpec("stl10", (RemoteFile("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                                                 "91f7769df0f17e558f3565bffb0c7dfb"),),
                            tuple(f"stl10_binary/{f}" for f in ("class_names.txt", "train_X.bin", "train_y.bin",
                                                                "test_X.bin", "test_y.bin", "unlabeled_X.bin")))

    def __init__(self, root: PathLike | None, split: str = "train") -> None:
        """Open one split.

        Args:
            root: The folder holding ``stl10_binary/``, or that folder itself.
            split: ``"train"``, ``"test"``, ``"unlabeled"`` or ``"train+unlabeled"``.

        Raises:
            DatasetError: If files are missing or have the wrong size.
        """
        self.split = check_split(self.name, split, SPLITS)
        self.root = resolve_folder(root, "stl10_binary", "class_names.txt", self.name, LAYOUT, SOURCE)
        self.classes = _read_class_names(self.root / "class_names.txt")
        self._open()

    def _open(self) -> None:
        """Memory-map the image files of ``self.split`` and read its labels."""
        parts: list[np.ndarray] = []
        targets: list[int] = []
        for part in self.split.split("+"):
            images = _open_images(self.root / f"{part}_X.bin")
            parts.append(images)
            if part == "unlabeled":
                targets.extend([UNLABELED] * images.shape[0])
            else:
                targets.extend(_read_labels(self.root / f"{part}_y.bin", images.shape[0]))
        self.parts = parts
        self.targets = targets
        self._starts = np.cumsum([0] + [p.shape[0] for p in parts])
        if len(parts) == 1:
            self.data = parts[0]

    def load_image(self, i: int) -> Image.Image:
        """Read image ``i`` from whichever file holds it."""
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return Image.fromarray(np.ascontiguousarray(self.parts[k][i - self._starts[k]]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("data", "parts", "targets", "_starts"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()
