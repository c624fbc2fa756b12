"""Fashion-MNIST from its IDX files (gzip-compressed or not).

The grayscale 28x28 images are served as RGB by repeating the channel; ``data`` is a zero-copy
read-only broadcast view ``[N, 28, 28, 3]`` of the ``[N, 28, 28]`` array read from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from contrastlab.data.base import ArrayDataset
from contrastlab.data.download import DownloadSpec, RemoteFile
from contrastlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from contrastlab.data.layout import PathLike, check_split, dataset_error

DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the official files."""

SOURCE = (
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz), or on Debian/Ubuntu "
    f"`apt install dataset-fashion-mnist`, which installs the files in {DEBIAN_PATH}/, or data.download=true"
)

LAYOUT = """
root/                         (or root/FashionMNIST/raw/)
    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]
"""

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The uncompressed or ``.gz`` file named ``stem`` in ``folder`` (uncompressed preferred), if any."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST: 60,000 train and 10,000 test 28x28 grayscale images in 10 classes, served as RGB."""

    name = "fashion_mnist"
    download = DownloadSpec("fashion_mnist", tuple(
        RemoteFile(f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}", md5, extract=False)
        for name, md5 in (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                          ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                          ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                          ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"))),
        tuple(f"{stem}.gz" for pair in FILES.values() for stem in pair))
    layout = LAYOUT
    source = SOURCE

    def __init__(self, root: PathLike | None, split: str = "train") -> None:
        """Read one split into memory.

        Args:
            root: The folder holding the IDX files, or a folder holding ``FashionMNIST/raw/``. ``None``
                uses Debian's install location when it exists.
            split: ``"train"`` or ``"test"``.

        Raises:
            DatasetError: If files are missing, have a bad magic number, or image and label counts differ.
        """
        self.split = check_split(self.name, split, SPLITS)
        if root is None and (DEBIAN_PATH / f"{FILES[split][0]}.gz").is_file():
            root = DEBIAN_PATH
        self.root = self._locate(root, split)
        self._read(self.root, split)

    def _locate(self, root: PathLike | None, split: str) -> Path:
        """Find the folder holding the split's IDX files: ``root`` or ``root/FashionMNIST/raw``."""
        if root is None:
            raise dataset_error(f"{self.name} needs a root folder", None, self.layout, self.source)
        base = Path(root).expanduser()
        if not base.is_dir():
            raise dataset_error(f"{self.name} root does not exist", base, self.layout, self.source)
        for folder in (base, base / "FashionMNIST" / "raw"):
            if find_idx_file(folder, FILES[split][0]) is not None:
                return folder
        raise dataset_error(
            f"{self.name}: no {FILES[split][0]}[.gz] in the root or in FashionMNIST/raw under it",
            base,
            self.layout,
            self.source,
        )

    def _read(self, folder: Path, split: str) -> None:
        """Read and cross-check the split's image and label files."""
        paths: list[Path] = []
        for stem in FILES[split]:
            path = find_idx_file(folder, stem)
            if path is None:
                raise dataset_error(
                    f"{self.name}: missing file", folder / f"{stem}[.gz]", self.layout, self.source
                )
            paths.append(path)
        images = read_idx(paths[0], IMAGES_MAGIC, self.name, self.layout, self.source)
        labels = read_idx(paths[1], LABELS_MAGIC, self.name, self.layout, self.source)
        if images.shape[0] != labels.shape[0]:
            raise dataset_error(
                f"{self.name}: {images.shape[0]} images in {paths[0].name} but {labels.shape[0]} labels",
                paths[1],
                self.layout,
                self.source,
            )
        if labels.size and int(labels.max()) >= len(CLASSES):
            raise dataset_error(
                f"{self.name}: labels must lie in 0..{len(CLASSES) - 1}", paths[1], self.layout, self.source
            )
        self.classes = list(CLASSES)
        self.targets = [int(v) for v in labels]
        self.data = np.broadcast_to(images[..., None], (*images.shape, 3))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["data"] = np.ascontiguousarray(self.data[..., 0])  # pickle one channel, not three
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gray = state.pop("data")
        self.__dict__.update(state)
        self.data = np.broadcast_to(gray[..., None], (*gray.shape, 3))
