"""Tiny-ImageNet-200 as distributed (``tiny-imagenet-200.zip``), images opened lazily.

Train images sit in one folder per class; validation images sit in one flat folder and take their
labels from ``val/val_annotations.txt`` (tab-separated: filename, wnid, x0, y0, x1, y1), so the
official archive works without regrouping the validation folder.
"""

from __future__ import annotations

from pathlib import Path

from contrastlab.data.base import FileDataset
from contrastlab.data.download import DownloadSpec, RemoteFile
from contrastlab.data.imagefolder import is_image_file
from contrastlab.data.layout import PathLike, check_split, dataset_error, require_file, resolve_folder

SOURCE = "http://cs231n.stanford.edu/tiny-imagenet-200.zip (extract it), or data.download=true"

LAYOUT = """
root/tiny-imagenet-200/       (or root itself is this folder)
    wnids.txt                 200 wnids, one per line (defines the class order)
    words.txt                 optional: wnid<TAB>human-readable name
    train/<wnid>/images/*.JPEG
    val/images/*.JPEG
    val/val_annotations.txt   filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1
"""

SPLITS = ("train", "val")


def _read_wnids(path: Path) -> list[str]:
    """Read ``wnids.txt``: one class id per line, order preserved, no duplicates."""
    require_file(path, "tiny_imagenet", LAYOUT, SOURCE)
    wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not wnids:
        raise dataset_error("tiny_imagenet: wnids.txt is empty", path, LAYOUT, SOURCE)
    if len(set(wnids)) != len(wnids):
        raise dataset_error("tiny_imagenet: wnids.txt lists a wnid twice", path, LAYOUT, SOURCE)
    return wnids


def _read_words(path: Path, wnids: list[str]) -> list[str]:
    """Human-readable names for ``wnids`` from ``words.txt``; the wnid itself where none is given."""
    if not path.is_file():
        return list(wnids)
    words: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, sep, text = line.partition("\t")
        if sep:
            words[wnid.strip()] = text.strip()
    return [words.get(w, w) for w in wnids]


def _train_samples(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """List ``train/<wnid>/images/*`` in wnid order, files sorted by name."""
    paths: list[Path] = []
    targets: list[int] = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise dataset_error("tiny_imagenet: missing class folder", images, LAYOUT, SOURCE)
        files = sorted(p for p in images.iterdir() if p.is_file() and is_image_file(p))
        if not files:
            raise dataset_error("tiny_imagenet: class folder has no images", images, LAYOUT, SOURCE)
        paths.extend(files)
        targets.extend([label] * len(files))
    return paths, targets


def _val_samples(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """List validation images in annotation-file order, labelled from the annotations."""
    annotations = require_file(folder / "val" / "val_annotations.txt", "tiny_imagenet", LAYOUT, SOURCE)
    images = folder / "val" / "images"
    if not images.is_dir():
        raise dataset_error("tiny_imagenet: missing folder", images, LAYOUT, SOURCE)
    present = {p.name for p in images.iterdir()}
    index = {w: k for k, w in enumerate(wnids)}
    paths: list[Path] = []
    targets: list[int] = []
    for number, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise dataset_error(
                f"tiny_imagenet: line {number} is not 'filename<TAB>wnid<TAB>...'",
                annotations,
                LAYOUT,
                SOURCE,
            )
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise dataset_error(
                f"tiny_imagenet: line {number} names wnid {wnid!r}, which is not in wnids.txt",
                annotations,
                LAYOUT,
                SOURCE,
            )
        if filename not in present:
            raise dataset_error(
                f"tiny_imagenet: image {filename!r} (line {number} of val_annotations.txt) is missing",
                images / filename,
                LAYOUT,
                SOURCE,
            )
        paths.append(images / filename)
        targets.append(index[wnid])
    if not paths:
        raise dataset_error("tiny_imagenet: val_annotations.txt is empty", annotations, LAYOUT, SOURCE)
    return paths, targets


class TinyImageNet(FileDataset):
    """Tiny-ImageNet-200: 64x64 images, 100,000 train and 10,000 val in 200 classes.

    Attributes:
        classes: wnids in ``wnids.txt`` order.
        class_names: Human-readable names from ``words.txt`` (the wnid where unavailable).
    """

    name = "tiny_imagenet"
    download = DownloadSpec("tiny_imagenet", (RemoteFile("http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                                                         "90528d7ca1a48142e341f4ef8d21d0de"),),
                            tuple(f"tiny-imagenet-200/{f}" for f in ("wnids.txt", "train", "val/images",
                                                                     "val/val_annotations.txt")))
    uniform_size = (64, 64)  #: every image is 64x64 (height, width): the GPU pipeline may hold the split on the device

    def __init__(self, root: PathLike | None, split: str = "train") -> None:
        """Index one split (images are decoded only when requested).

        Args:
            root: The folder holding ``tiny-imagenet-200/``, or that folder itself.
            split: ``"train"`` or ``"val"``.

        Raises:
            DatasetError: If files are missing or the annotations are malformed.
        """
        self.split = check_split(self.name, split, SPLITS)
        self.root = resolve_folder(root, "tiny-imagenet-200", "wnids.txt", self.name, LAYOUT, SOURCE)
        self.classes = _read_wnids(self.root / "wnids.txt")
        self.class_names = _read_words(self.root / "words.txt", self.classes)
        if split == "train":
            self.paths, self.targets = _train_samples(self.root, self.classes)
        else:
            self.paths, self.targets = _val_samples(self.root, self.classes)
