"""Class-per-folder image trees (ImageNet, ImageNet-100, any custom set), opened lazily.

``root/<split>/<class>/...`` holds the images of one class (sub-folders inside a class folder are
scanned too; links to folders are followed, each real folder once: :func:`scan_images`). Classes are the
sorted class folder names, or, with ``class_list``, exactly the classes that list names in the list's order
(e.g. the 100 wnids of ImageNet-100). Passing the same list for every split keeps labels consistent even if
a split lacks a class folder it should have.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from contrastlab.data.base import FileDataset
from contrastlab.data.layout import PathLike, dataset_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

SOURCE = (
    "any class-per-folder tree; for ImageNet see https://image-net.org/ (its val images must be sorted "
    "into one folder per class first). ImageNet-100 / ImageNet-200 are ImageNet with class_list: "
    "imagenet100 / imagenet200 (shipped wnid lists)"
)

LAYOUT = """
root/
    <split>/                  e.g. train/, val/
        <class>/              one folder per class
            *.jpg|*.jpeg|*.png|*.bmp|*.webp   (any case; sub-folders scanned)
class_list file (optional): one class folder name per line, or a shipped list's name: imagenet100, imagenet200
"""

#: Class lists shipped with the package (``data.class_list: imagenet100``), in ``contrastlab/data/class_lists``.
SHIPPED_CLASS_LISTS = ("imagenet100", "imagenet200")
CLASS_LIST_DIR = Path(__file__).parent / "class_lists"


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (case-insensitive) and is not a hidden file."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def scan_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursively), sorted by path string.

    Links to folders are followed, each real folder once (by device and inode): a link to a folder already
    scanned (``folder`` itself, one of its parents, or a folder reached another way) is skipped with a
    RuntimeWarning naming it, so a loop neither repeats images nor scans without end. Links to files are read.
    """
    found: list[Path] = []
    top = Path(folder)
    if not top.is_dir():
        return found
    seen = {_folder_key(p) for p in (top, *top.resolve().parents)}  # a link to a parent would contain itself
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        base = Path(dirpath)
        kept = []
        for name in sorted((d for d in dirnames if not d.startswith(".")),
                           key=lambda d: ((base / d).is_symlink(), d)):  # real folders before links to them
            key = _folder_key(base / name)
            if key in seen:
                skipped.append(f"{base / name} -> {(base / name).resolve()}")
            else:
                seen.add(key)
                kept.append(name)
        dirnames[:] = kept
        found.extend(base / f for f in filenames if is_image_file(base / f))
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"imagefolder: skipped {len(skipped)} link(s) to a folder scanned already (each folder's "
                      f"images are read once): {shown}", RuntimeWarning, stacklevel=2)
    return sorted(found, key=str)


def _folder_key(path: Path) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of the folder ``path`` leads to (links followed): the same for every way to reach it."""
    info = path.stat()
    return info.st_dev, info.st_ino


def read_class_list(class_list: PathLike | Sequence[str]) -> list[str]:
    """Class names from a file (one per line; blank lines and ``#`` comments skipped) or a sequence.

    A name of :data:`SHIPPED_CLASS_LISTS` (``"imagenet100"``: CMC's ImageNet-100, ``"imagenet200"``:
    ContrastiveCrop's ImageNet-200) reads the list shipped with the package.

    Raises:
        DatasetError: If the file is missing, the list is empty or names a class twice.
    """
    if isinstance(class_list, str) and class_list in SHIPPED_CLASS_LISTS:
        class_list = CLASS_LIST_DIR / f"{class_list}.txt"
    if isinstance(class_list, (str, os.PathLike)):
        path = Path(class_list).expanduser()
        if not path.is_file():
            raise dataset_error("imagefolder: class_list file not found (give a file of class folder names or "
                                f"one of the shipped lists {', '.join(SHIPPED_CLASS_LISTS)})", path, LAYOUT, SOURCE)
        lines = path.read_text(encoding="utf-8").splitlines()
        names = [ln.split("#", 1)[0].strip() for ln in lines]
        names = [n for n in names if n]
        where: PathLike = path
    else:
        names = [str(n).strip() for n in class_list]
        where = "class_list argument"
    if not names:
        raise dataset_error("imagefolder: class_list is empty", where, LAYOUT, SOURCE)
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise dataset_error(f"imagefolder: class_list names {n!r} twice", where, LAYOUT, SOURCE)
        seen.add(n)
    return names


class ImageFolder(FileDataset):
    """Images in ``root/<split>/<class>/``, labelled by class folder.

    Attributes:
        classes: Class folder names (sorted, or in ``class_list`` order).
        paths: One file per sample, grouped by class, sorted within a class.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: PathLike | None,
        split: str = "train",
        class_list: PathLike | Sequence[str] | None = None,
    ) -> None:
        """Scan one split.

        Args:
            root: Folder whose sub-folders are the splits.
            split: Name of the split folder under ``root`` (e.g. ``"train"``).
            class_list: Optional file (one class folder name per line) or sequence of names selecting
                the classes and their order.

        Raises:
            DatasetError: If the split folder or a listed class is missing, or a class has no images.
        """
        if root is None:
            raise dataset_error("imagefolder needs a root folder", None, LAYOUT, SOURCE)
        base = Path(root).expanduser()
        if not base.is_dir():
            raise dataset_error("imagefolder root does not exist", base, LAYOUT, SOURCE)
        split_dir = base / split
        if not split or not split_dir.is_dir():
            available = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise dataset_error(
                f"unknown split {split!r} for dataset 'imagefolder'; valid splits (folders under the "
                f"root): {', '.join(available) or 'none'}",
                split_dir,
                LAYOUT,
                SOURCE,
            )
        self.root = base
        self.split = split
        on_disk = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_list is None:
            if not on_disk:
                raise dataset_error(
                    "imagefolder: split folder has no class folders", split_dir, LAYOUT, SOURCE
                )
            self.classes = on_disk
        else:
            self.classes = read_class_list(class_list)
            existing = set(on_disk)
            missing = [c for c in self.classes if c not in existing]
            if missing:
                shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise dataset_error(
                    f"imagefolder: class_list names {len(missing)} class(es) with no folder: {shown}",
                    split_dir / missing[0],
                    LAYOUT,
                    SOURCE,
                )
        self.paths = []
        self.targets = []
        for label, cls in enumerate(self.classes):
            files = scan_images(split_dir / cls)
            if not files:
                raise dataset_error(
                    f"imagefolder: class folder {cls!r} has no images", split_dir / cls, LAYOUT, SOURCE
                )
            self.paths.extend(files)
            self.targets.extend([label] * len(files))
