"""The embedded demo dataset: a balanced real subset of Fashion-MNIST shipped inside the package.

Split ``"train"`` holds 500 images per class drawn from the official Fashion-MNIST train split (5,000
images), split ``"test"`` 100 per class from the official t10k split (1,000 images). The gzipped IDX
files live in ``contrastlab/data/demo/``; ``scripts/make_demo_data.py`` regenerates them and
``demo/NOTICE.txt`` carries the attribution (Fashion-MNIST, Zalando SE, MIT License).
"""

from __future__ import annotations

from pathlib import Path

from contrastlab.data.fashion_mnist import FashionMNIST
from contrastlab.data.layout import PathLike, check_split

DEMO_DIR = Path(__file__).with_name("demo")
"""Folder holding the demo's IDX files and NOTICE.txt."""

SOURCE = (
    "these files ship with contrastlab; reinstall the package, or regenerate them with "
    "scripts/make_demo_data.py from the Fashion-MNIST files (Debian: apt install dataset-fashion-mnist)"
)

LAYOUT = """
contrastlab/data/demo/
    train-images-idx3-ubyte.gz   train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz    t10k-labels-idx1-ubyte.gz
    NOTICE.txt
"""

PER_CLASS = {"train": 500, "test": 100}
"""Images per class in each demo split."""


class Demo(FashionMNIST):
    """The embedded Fashion-MNIST subset: 5,000 train and 1,000 test 28x28 images, served as RGB."""

    name = "demo"
    layout = LAYOUT
    source = SOURCE
    download = None  # embedded in the package: nothing to fetch (not FashionMNIST's archives)

    def __init__(self, root: PathLike | None = None, split: str = "train") -> None:
        """Read one split of the embedded files.

        Args:
            root: Ignored (the files ship inside the package); accepted for the registry's signature.
            split: ``"train"`` or ``"test"``.

        Raises:
            DatasetError: If the packaged files are missing or damaged.
        """
        self.split = check_split(self.name, split, tuple(PER_CLASS))
        self.root = self._locate(DEMO_DIR, split)
        self._read(self.root, split)
