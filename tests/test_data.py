"""Tests for contrastlab.data: every loader reads files written here in the upstream formats.

Fixtures encode images with their own code (per-plane concatenation for CIFAR, Fortran-order
flattening for STL-10, struct-packed headers for IDX), so each check compares the loader against an
independent encoding of known pixels.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastlab.data import DATASETS, build_dataset, native_size, normalization
from contrastlab.data.stats import NATIVE_SIZE, NORMALIZATION
from contrastlab.errors import ConfigError, DatasetError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _pixels(sample: tuple) -> np.ndarray:
    image, _, _ = sample
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return np.asarray(image)


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """Upstream row layout: 1024 red values (row-major), then 1024 green, then 1024 blue."""
    return np.stack(
        [np.concatenate([img[:, :, 0].ravel(), img[:, :, 1].ravel(), img[:, :, 2].ravel()]) for img in images]
    ).astype(np.uint8)


def _dump(path: Path, content: dict) -> None:
    with path.open("wb") as fh:
        pickle.dump(content, fh, protocol=2)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar10(parent: Path, per_batch: int = 2) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = _rng(1)
    train_images = rng.integers(0, 256, size=(5 * per_batch, 32, 32, 3), dtype=np.uint8)
    train_labels = [int(v) for v in rng.integers(0, 10, size=5 * per_batch)]
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": train_labels[part],
                b"data": _cifar_rows(train_images[part]),
                b"filenames": [f"img_{b}_{k}.png".encode() for k in range(per_batch)],
            },
        )
    test_images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    test_labels = [9, 0, 4]
    _dump(folder / "test_batch", {b"labels": test_labels, b"data": _cifar_rows(test_images)})
    _dump(
        folder / "batches.meta",
        {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch},
    )
    return train_images, train_labels, test_images, test_labels


def test_cifar10_reads_pixels_labels_and_names(tmp_path: Path) -> None:
    train_images, train_labels, test_images, test_labels = _write_cifar10(tmp_path)
    train = build_dataset("cifar10", tmp_path, "train")
    assert len(train) == 10 and train.name == "cifar10"
    assert train.classes == CIFAR10_NAMES
    assert train.targets == train_labels
    assert train.data.shape == (10, 32, 32, 3) and train.data.dtype == np.uint8
    for i in range(10):
        image, label, index = train[i]
        assert np.array_equal(np.asarray(image), train_images[i])
        assert (label, index) == (train_labels[i], i)
    assert train[-1][2] == 9
    test = build_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test")  # the folder itself
    assert [test[i][1] for i in range(3)] == test_labels
    assert all(np.array_equal(_pixels(test[i]), test_images[i]) for i in range(3))
    with pytest.raises(IndexError):
        test[3]


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{k:02d}" for k in range(100)]
    rng = _rng(2)
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    fine, coarse = [99, 0, 57, 3], [19, 4, 2, 0]
    for split in ("train", "test"):
        _dump(
            folder / split,
            {b"fine_labels": fine, b"coarse_labels": coarse, b"data": _cifar_rows(images)},
        )
    _dump(
        folder / "meta",
        {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"x"] * 20},
    )
    ds = build_dataset("cifar100", tmp_path, "test")
    assert ds.classes == names and ds.targets == fine
    assert all(np.array_equal(_pixels(ds[i]), images[i]) for i in range(4))


def test_cifar_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        build_dataset("cifar10", tmp_path / "nowhere", "train")
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    batch = folder / "data_batch_3"
    batch.unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar10", tmp_path, "train")
    assert str(batch) in str(info.value) and "cs.toronto.edu" in str(info.value)
    _dump(batch, {b"images": np.zeros((1, 3072), np.uint8), b"labels": [0]})  # wrong key
    with pytest.raises(DatasetError, match="data") as info:
        build_dataset("cifar10", tmp_path, "train")
    assert str(batch) in str(info.value)
    _dump(batch, {b"data": np.zeros((1, 3071), np.uint8), b"labels": [0]})  # wrong row size
    with pytest.raises(DatasetError, match="3072") as info:
        build_dataset("cifar10", tmp_path, "train")
    assert str(batch) in str(info.value)
    batch.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar10", tmp_path, "train")
    assert str(batch) in str(info.value)


# -------------------------------------------------------------------------------------------- STL-10


def _stl_bytes(images: np.ndarray) -> bytes:
    """Upstream layout: per image, per channel, the 96x96 plane flattened column by column."""
    return b"".join(img[:, :, c].flatten(order="F").tobytes() for img in images for c in range(3))


def _write_stl(parent: Path) -> dict[str, tuple[np.ndarray, list[int] | None]]:
    folder = parent / "stl10_binary"
    folder.mkdir()
    rng = _rng(3)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    written: dict[str, tuple[np.ndarray, list[int] | None]] = {}
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 4)):
        images = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(images))
        labels = None
        if split != "unlabeled":
            labels = [int(v) for v in rng.integers(1, 11, size=n)]  # upstream labels are 1..10
            (folder / f"{split}_y.bin").write_bytes(bytes(labels))
        written[split] = (images, labels)
    return written


def test_stl10_splits_pixels_and_labels(tmp_path: Path) -> None:
    written = _write_stl(tmp_path)
    train = build_dataset("stl10", tmp_path, "train")
    assert isinstance(train.data, np.memmap) and train.data.shape == (3, 96, 96, 3)
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    images, labels = written["train"]
    assert train.targets == [v - 1 for v in labels]
    for i in range(3):
        assert np.array_equal(_pixels(train[i]), images[i])
    test = build_dataset("stl10", tmp_path / "stl10_binary", "test")
    assert np.array_equal(_pixels(test[1]), written["test"][0][1])
    unlabeled = build_dataset("stl10", tmp_path, "unlabeled")
    assert unlabeled.targets == [-1] * 4 and unlabeled[2][1] == -1
    both = build_dataset("stl10", tmp_path, "train+unlabeled")
    assert len(both) == 7 and both.targets == train.targets + [-1] * 4
    expected = np.concatenate([written["train"][0], written["unlabeled"][0]])
    for i in range(7):
        image, _, index = both[i]
        assert np.array_equal(np.asarray(image), expected[i]) and index == i
    clone = pickle.loads(pickle.dumps(both))  # spawned workers re-open the memmaps
    assert np.array_equal(_pixels(clone[5]), expected[5]) and clone.targets == both.targets


def test_stl10_errors_name_the_path(tmp_path: Path) -> None:
    _write_stl(tmp_path)
    folder = tmp_path / "stl10_binary"
    bin_file = folder / "test_X.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="27648") as info:
        build_dataset("stl10", tmp_path, "test")
    assert str(bin_file) in str(info.value) and "stanford.edu" in str(info.value)
    labels = folder / "train_y.bin"
    labels.write_bytes(b"\x01\x02")
    with pytest.raises(DatasetError) as info:
        build_dataset("stl10", tmp_path, "train")
    assert str(labels) in str(info.value)
    (folder / "unlabeled_X.bin").unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset("stl10", tmp_path, "unlabeled")
    assert str(folder / "unlabeled_X.bin") in str(info.value)
    with pytest.raises(DatasetError, match="train\\+unlabeled"):
        build_dataset("stl10", tmp_path, "extra")


# ------------------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n02124075", "n01443537", "n09246464"]  # deliberately not sorted


def _solid(color: tuple[int, int, int], gray: bool = False) -> Image.Image:
    if gray:
        return Image.new("L", (64, 64), color[0])
    return Image.new("RGB", (64, 64), color)


def _write_tiny(parent: Path) -> tuple[dict[Path, tuple[tuple[int, int, int], int]], list[tuple]]:
    folder = parent / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (folder / "words.txt").write_text(
        "n00001740\tentity\nn02124075\tEgyptian cat\nn01443537\tgoldfish, Carassius auratus\n"
    )
    train: dict[Path, tuple[tuple[int, int, int], int]] = {}
    for label, wnid in enumerate(WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        for k in range(2):
            gray = label == 2 and k == 1
            color = (40 * label + 20, 200 - 60 * k, 90) if not gray else (130, 130, 130)
            path = images / f"{wnid}_{k}.JPEG"
            _solid(color, gray).save(path, "JPEG", quality=95)
            train[path] = (color, label)
    val = [("val_0.JPEG", 2, (10, 220, 30)), ("val_1.JPEG", 0, (250, 5, 120)), ("val_2.JPEG", 2, (0, 0, 255))]
    lines = []
    for name, label, color in val:
        _solid(color).save(folder / "val" / "images" / name, "JPEG", quality=95)
        lines.append(f"{name}\t{WNIDS[label]}\t0\t1\t62\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return train, val


def _close(image: Image.Image, color: tuple[int, int, int]) -> bool:
    """JPEG is lossy: a solid colour must decode within a few levels."""
    diff = np.abs(np.asarray(image).astype(int) - np.array(color)).max()
    return bool(diff <= 4)


def test_tiny_imagenet_train_and_val(tmp_path: Path) -> None:
    train_files, val = _write_tiny(tmp_path)
    train = build_dataset("tiny_imagenet", tmp_path, "train")
    assert train.classes == WNIDS
    assert train.class_names == ["Egyptian cat", "goldfish, Carassius auratus", "n09246464"]
    assert len(train) == 6 and sorted(train.targets) == [0, 0, 1, 1, 2, 2]
    for i in range(len(train)):
        image, label, index = train[i]
        color, expected = train_files[train.paths[i]]
        assert image.mode == "RGB" and image.size == (64, 64) and index == i
        assert label == expected and _close(image, color)
    val_ds = build_dataset("tiny_imagenet", tmp_path / "tiny-imagenet-200", "val")
    assert val_ds.targets == [label for _, label, _ in val]
    for i, (name, label, color) in enumerate(val):
        image, got, _ = val_ds[i]
        assert val_ds.paths[i].name == name and got == label and _close(image, color)


def test_tiny_imagenet_errors_name_the_path(tmp_path: Path) -> None:
    _write_tiny(tmp_path)
    folder = tmp_path / "tiny-imagenet-200"
    annotations = folder / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.write_text(text.replace(WNIDS[0], "n99999999"))
    with pytest.raises(DatasetError, match="n99999999") as info:
        build_dataset("tiny_imagenet", tmp_path, "val")
    assert str(annotations) in str(info.value)
    annotations.write_text(text + "val_9.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="val_9.JPEG"):
        build_dataset("tiny_imagenet", tmp_path, "val")
    annotations.unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset("tiny_imagenet", tmp_path, "val")
    assert str(annotations) in str(info.value) and "cs231n" in str(info.value)
    (folder / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match="wnids.txt"):
        build_dataset("tiny_imagenet", tmp_path, "train")


# --------------------------------------------------------------------------------------- ImageFolder


def _write_tree(root: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    rng = _rng(4)
    tree: dict[str, list[tuple[str, np.ndarray]]] = {
        "zebra": [("b.png", None), ("a.PNG", None)],
        "apple": [("x.Png", None), ("sub/y.png", None)],
        "mango": [("m.png", None)],
    }
    written: dict[str, list[tuple[str, np.ndarray]]] = {}
    for cls, files in tree.items():
        written[cls] = []
        for name, _ in files:
            path = root / "train" / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, "PNG")
            written[cls].append((name, pixels))
        (root / "train" / cls / "notes.txt").write_text("not an image")
    gray = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    Image.fromarray(gray).save(root / "train" / "mango" / "n.png")
    written["mango"].append(("n.png", np.repeat(gray[..., None], 3, axis=2)))
    for files in written.values():
        files.sort()
    (root / "val").mkdir()
    return written


def test_imagefolder_scans_sorted_classes_and_files(tmp_path: Path) -> None:
    written = _write_tree(tmp_path)
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["apple", "mango", "zebra"]
    expected = [(cls, name, px) for cls in ds.classes for name, px in written[cls]]
    assert len(ds) == len(expected) == 6
    for i, (cls, name, pixels) in enumerate(expected):
        image, label, index = ds[i]
        assert ds.paths[i] == tmp_path / "train" / cls / name
        assert (label, index) == (ds.classes.index(cls), i)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


def test_imagefolder_class_list_and_errors(tmp_path: Path) -> None:
    written = _write_tree(tmp_path)
    listing = tmp_path / "imagenet100.txt"
    listing.write_text("zebra\n\nmango\n")
    ds = build_dataset("imagefolder", tmp_path, "train", class_list=str(listing))
    assert ds.classes == ["zebra", "mango"] and ds.targets == [0, 0, 1, 1]
    assert np.array_equal(_pixels(ds[3]), written["mango"][1][1])
    listing.write_text("zebra\npear\n")
    with pytest.raises(DatasetError, match="pear") as info:
        build_dataset("imagefolder", tmp_path, "train", class_list=listing)
    assert str(tmp_path / "train" / "pear") in str(info.value)
    with pytest.raises(DatasetError) as info:
        build_dataset("imagefolder", tmp_path, "train", class_list=tmp_path / "absent.txt")
    assert str(tmp_path / "absent.txt") in str(info.value)
    empty = tmp_path / "train" / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images") as info:
        build_dataset("imagefolder", tmp_path, "train")
    assert str(empty) in str(info.value)
    with pytest.raises(DatasetError, match="train, val") as info:
        build_dataset("imagefolder", tmp_path, "test")
    assert str(tmp_path / "test") in str(info.value)
    with pytest.raises(DatasetError, match="no class folders"):
        build_dataset("imagefolder", tmp_path, "val")


def test_imagefolder_follows_each_real_folder_once_and_names_the_links_it_skips(tmp_path: Path) -> None:
    """A link to the class folder itself (a loop: once ~40 copies of each image, the depth Linux allows) and a
    second link to a folder already read are skipped with a warning naming them; a link to another real folder
    (a class folder too) is read once; a link to a file is an image like any other."""
    _write_tree(tmp_path)
    apple = tmp_path / "train" / "apple"
    extra, kiwi = tmp_path / "extra", tmp_path / "kiwi_images"
    for folder, names in ((extra, ["e.png"]), (kiwi, ["k1.png", "k2.png"])):
        folder.mkdir()
        for name in names:
            Image.new("RGB", (3, 3)).save(folder / name)
    (apple / "self").symlink_to(".")
    (apple / "more").symlink_to(extra)
    (apple / "more_again").symlink_to(extra)
    (apple / "linked.png").symlink_to(apple / "x.Png")
    (tmp_path / "train" / "kiwi").symlink_to(kiwi)  # a class folder assembled from elsewhere
    with pytest.warns(RuntimeWarning, match="skipped 2 link") as caught:
        ds = build_dataset("imagefolder", tmp_path, "train")
    message = str(caught[0].message)
    assert str(apple / "self") in message and str(apple / "more_again") in message
    assert ds.classes == ["apple", "kiwi", "mango", "zebra"]
    apple_files = sorted(["linked.png", "more/e.png", "sub/y.png", "x.Png"])
    assert [str(p.relative_to(apple)) for p in ds.paths if p.is_relative_to(apple)] == apple_files
    assert [p.name for p, t in zip(ds.paths, ds.targets) if t == 1] == ["k1.png", "k2.png"]
    assert len(ds) == len(apple_files) + 2 + 2 + 2  # kiwi, mango (one colour, one gray image), zebra


def test_imagefolder_scan_ends_with_two_looping_links(tmp_path: Path) -> None:
    """Two links back up the tree made the scan run without end (each path doubles at every level): now it ends,
    each image once. In a subprocess with a time limit, so a scan that does not end fails the test."""
    import subprocess
    import sys

    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    Image.new("RGB", (3, 3)).save(folder / "a.png")
    (folder / "self").symlink_to(".")
    (folder / "up").symlink_to("..")
    script = ("import sys, warnings\nfrom pathlib import Path\nfrom contrastlab.data.imagefolder import scan_images\n"
              "warnings.simplefilter('ignore')\nprint(len(scan_images(Path(sys.argv[1]))))\n")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]


def _png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG written here byte by byte (big-endian samples): grayscale for ``[H, W]``, RGB for
    ``[H, W, 3]``, so the test does not depend on which 16-bit modes an image library can write."""
    import zlib

    height, width = values.shape[:2]
    color = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16_bit_pngs_become_8_bit_alike_in_every_reader(tmp_path: Path) -> None:
    """16-bit PNGs (values over 0..65535) read as 8 bits by their high byte ``v // 256`` through PIL (the CPU
    pipeline, the device store, the view sheet) and torchvision (the GPU file pipeline): grayscale was clipped
    to 255, and torchvision's uint16 decode wrapped around."""
    import torch
    from torchvision.io import read_file

    from contrastlab.data.device_images import load_images
    from contrastlab.data.jpeg import decode_images
    from contrastlab.viz.view_sheet import ImageList

    rng = _rng(16)
    gray = rng.integers(0, 65536, size=(6, 5)).astype(np.uint16)
    gray.flat[:8] = [0, 255, 256, 32767, 32768, 65279, 65280, 65535]
    colour = rng.integers(0, 65536, size=(6, 5, 3)).astype(np.uint16)
    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    Image.fromarray(gray).save(folder / "gray.png")  # PIL's own 16-bit grayscale writer
    with Image.open(folder / "gray.png") as check:
        assert check.mode.startswith("I") and np.array_equal(np.asarray(check), gray)  # really 16 bits on disk
    _png16(folder / "rgb.png", colour)
    expected = {"gray.png": np.repeat((gray // 256).astype(np.uint8)[..., None], 3, axis=2),
                "rgb.png": (colour // 256).astype(np.uint8)}
    ds = build_dataset("imagefolder", tmp_path, "train")
    store = load_images(ds).permute(0, 2, 3, 1).numpy()
    sheet = ImageList(folder)
    for i, path in enumerate(ds.paths):
        want = expected[path.name]
        assert np.array_equal(_pixels(ds[i]), want), path.name
        assert np.array_equal(store[i], want), path.name
        assert np.array_equal(np.asarray(sheet[sheet.files.index(path)][0]), want), path.name
        (decoded,) = decode_images([read_file(str(path))], torch.device("cpu"))
        assert decoded.dtype == torch.uint8 and np.array_equal(decoded.permute(1, 2, 0).numpy(), want), path.name


# ------------------------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def _write_fashion(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, magic, array in (
        (f"{prefix}-images-idx3-ubyte", 2051, images),
        (f"{prefix}-labels-idx1-ubyte", 2049, labels),
    ):
        payload = _idx_bytes(magic, array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / stem).write_bytes(payload)


def test_fashion_mnist_gz_and_raw_layouts(tmp_path: Path) -> None:
    rng = _rng(5)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 9, 1, 5], dtype=np.uint8)
    _write_fashion(tmp_path / "flat", "train", images, labels, gz=True)
    _write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", "t10k", images[:4], labels[:4], gz=False)
    train = build_dataset("fashion_mnist", tmp_path / "flat", "train")
    assert train.classes[9] == "Ankle boot" and train.targets == labels.tolist()
    assert train.data.shape == (6, 28, 28, 3)
    for i in range(6):
        image, label, index = train[i]
        rgb = np.asarray(image)
        assert all(np.array_equal(rgb[:, :, c], images[i]) for c in range(3))
        assert (label, index) == (labels[i], i)
    test = build_dataset("fashion_mnist", tmp_path / "tv", "test")
    assert len(test) == 4 and np.array_equal(_pixels(test[3])[:, :, 1], images[3])
    clone = pickle.loads(pickle.dumps(test))
    assert clone.data.shape == (4, 28, 28, 3) and np.array_equal(_pixels(clone[2])[:, :, 2], images[2])


def test_fashion_mnist_errors_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("contrastlab.data.fashion_mnist.DEBIAN_PATH", tmp_path / "no-debian")
    with pytest.raises(DatasetError, match="needs a root folder"):
        build_dataset("fashion_mnist", None, "test")
    rng = _rng(6)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    with pytest.raises(DatasetError) as info:
        build_dataset("fashion_mnist", tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "zalandoresearch/fashion-mnist" in message and "/usr/share/datasets/fashion-mnist" in message
    image_file = tmp_path / "train-images-idx3-ubyte.gz"
    label_file = tmp_path / "train-labels-idx1-ubyte.gz"
    image_file.write_bytes(gzip.compress(_idx_bytes(2049, images)))  # label magic on an image file
    label_file.write_bytes(gzip.compress(_idx_bytes(2049, labels)))
    with pytest.raises(DatasetError, match="magic") as info:
        build_dataset("fashion_mnist", tmp_path, "train")
    assert str(image_file) in str(info.value)
    image_file.write_bytes(gzip.compress(_idx_bytes(2051, images)[:-5]))  # truncated
    with pytest.raises(DatasetError) as info:
        build_dataset("fashion_mnist", tmp_path, "train")
    assert str(image_file) in str(info.value)
    image_file.write_bytes(gzip.compress(_idx_bytes(2051, images)))
    label_file.write_bytes(gzip.compress(_idx_bytes(2049, labels[:2])))  # counts differ
    with pytest.raises(DatasetError, match="3 images") as info:
        build_dataset("fashion_mnist", tmp_path, "train")
    assert str(label_file) in str(info.value)
    image_file.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError) as info:
        build_dataset("fashion_mnist", tmp_path, "train")
    assert str(image_file) in str(info.value)


# ---------------------------------------------------------------------------------------------- demo


@functools.lru_cache(maxsize=2)
def _read_real(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(REAL_FASHION / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(REAL_FASHION / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


def test_demo_is_balanced_and_embedded() -> None:
    for split, total, per_class in (("train", 5000, 500), ("test", 1000, 100)):
        ds = build_dataset("demo", "/ignored/root", split)
        assert ds.name == "demo" and len(ds) == total
        assert np.bincount(ds.targets, minlength=10).tolist() == [per_class] * 10
        assert ds.classes[0] == "T-shirt/top" and ds.data.shape == (total, 28, 28, 3)
        image, _, index = ds[total - 1]
        assert image.mode == "RGB" and image.size == (28, 28) and index == total - 1
    notice = Path(build_dataset("demo", None, "train").root) / "NOTICE.txt"
    text = notice.read_text()
    assert "Zalando SE" in text and "MIT License" in text


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize(("split", "prefix"), [("train", "train"), ("test", "t10k")])
def test_demo_images_come_from_the_official_split(split: str, prefix: str) -> None:
    images, labels = _read_real(prefix)
    position: dict[bytes, int] = {}
    for i in range(len(images)):
        position.setdefault(images[i].tobytes(), i)
    ds = build_dataset("demo", None, split)
    found = []
    for i in range(len(ds)):
        gray = np.asarray(ds.data[i, :, :, 0])
        j = position.get(gray.tobytes())
        assert j is not None, f"demo {split} image {i} is not in the official {prefix} split"
        assert labels[j] == ds.targets[i]
        found.append(j)
    assert len(set(found)) == len(ds)  # distinct images
    assert found == sorted(found)  # official order kept


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_normalization_matches_the_train_file() -> None:
    images, _ = _read_real("train")
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)  # histogram of levels
    levels = np.arange(256) / 255.0
    true_mean = (counts * levels).sum() / counts.sum()
    true_std = np.sqrt((counts * (levels - true_mean) ** 2).sum() / counts.sum())
    mean, std = NORMALIZATION["fashion_mnist"]
    assert mean == pytest.approx((true_mean,) * 3, abs=5e-5)
    assert std == pytest.approx((true_std,) * 3, abs=5e-5)
    assert NORMALIZATION["demo"] == NORMALIZATION["fashion_mnist"]


# ------------------------------------------------------------------------------------------ registry


def test_registry_names_splits_and_stats() -> None:
    assert set(DATASETS) == {
        "cifar10",
        "cifar100",
        "stl10",
        "tiny_imagenet",
        "imagefolder",
        "fashion_mnist",
        "demo",
    }
    assert set(NORMALIZATION) == set(DATASETS) == set(NATIVE_SIZE)
    names = ["cifar10", "cifar100", "stl10", "tiny_imagenet", "imagefolder", "fashion_mnist", "demo"]
    assert [native_size(n) for n in names] == [NATIVE_SIZE[n] for n in names] == [32, 32, 96, 64, 224, 28, 28]
    assert all(normalization(n) == NORMALIZATION[n] for n in names)
    for mean, std in NORMALIZATION.values():
        assert len(mean) == len(std) == 3 and all(0 < v < 1 for v in (*mean, *std))
    with pytest.raises(ConfigError, match="Did you mean 'tiny_imagenet'") as info:
        build_dataset("tinyimagenet", None, "train")
    assert all(n in str(info.value) for n in DATASETS)
    with pytest.raises(DatasetError, match="valid splits: train, test"):
        build_dataset("demo", None, "val")
    with pytest.raises(DatasetError, match="valid splits: train, val"):
        build_dataset("tiny_imagenet", "/nowhere", "test")
    with pytest.raises(DatasetError, match="needs a root"):
        build_dataset("cifar100", None, "train")


def test_unknown_dataset_option_is_a_dataset_error():
    from contrastlab.data import build_dataset
    from contrastlab.errors import DatasetError

    with pytest.raises(DatasetError, match="class_list"):
        build_dataset("demo", None, "train", class_list="x.txt")


def test_evenly_spaced_takes_the_first_of_every_len_over_n_items() -> None:
    from contrastlab.data.subsets import IndexedSubset, evenly_spaced

    demo = build_dataset("demo", "", "test")
    for n in (1, 7, 250, 999):
        sub = evenly_spaced(demo, n)
        expected = [int(k * len(demo) / n) for k in range(n)]  # floor(k * len / n), in exact arithmetic here
        assert isinstance(sub, IndexedSubset) and sub.indices == expected and len(set(expected)) == n
        assert sub.targets == [demo.targets[i] for i in expected] and sub[n - 1][2] == n - 1
    assert evenly_spaced(demo, 0) is demo and evenly_spaced(demo, len(demo)) is demo
