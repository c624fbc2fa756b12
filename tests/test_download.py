"""data.download=true against a local HTTP server: the test builds small archives in each upstream format (CIFAR
python pickles in a .tar.gz, STL-10 binaries in a .tar.gz, Fashion-MNIST gzipped IDX files, a Tiny-ImageNet zip with
val/val_annotations.txt), serves them on 127.0.0.1, downloads them through the config, and reads them with the real
readers. Also: nothing downloads unless asked; an interrupted transfer and a corrupt archive are detected and named,
leave no file posing as complete, and a second run restarts cleanly."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import stat
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from test_data import _write_cifar10, _write_fashion, _write_stl, _write_tiny

from contrastlab import assemble
from contrastlab.config.load import load_config
from contrastlab.data import CIFAR10, STL10
from contrastlab.data.download import DownloadSpec, RemoteFile
from contrastlab.errors import DatasetError


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records each GET; cuts off the files named in ``server.truncate`` half-way."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        if name in self.server.truncate:
            body = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes: a transfer cut off
            self.close_connection = True
            return
        super().do_GET()


def _tar_gz(source: Path, folder: str, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source / folder, arcname=folder)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The served folder with one small archive per dataset, its MD5 list, and what each reader must find."""
    staging, served = tmp_path_factory.mktemp("staging"), tmp_path_factory.mktemp("served")
    written = {"cifar10": _write_cifar10(staging)}
    folder = staging / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    rows = np.stack([np.concatenate([im[:, :, c].ravel() for c in range(3)]) for im in images])
    import pickle

    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({b"fine_labels": [5, 99, 0], b"data": rows}, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{k}".encode() for k in range(100)]}))
    written["cifar100"] = images
    written["stl10"] = _write_stl(staging)
    written["tiny_imagenet"] = _write_tiny(staging)
    fashion = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    _write_fashion(served, "train", fashion, np.array([1, 2, 3, 4], dtype=np.uint8), gz=True)
    _write_fashion(served, "t10k", fashion[:2], np.array([9, 0], dtype=np.uint8), gz=True)
    written["fashion_mnist"] = fashion
    _tar_gz(staging, "cifar-10-batches-py", served / "cifar-10-python.tar.gz")
    _tar_gz(staging, "cifar-100-python", served / "cifar-100-python.tar.gz")
    _tar_gz(staging, "stl10_binary", served / "stl10_binary.tar.gz")
    with zipfile.ZipFile(served / "tiny-imagenet-200.zip", "w") as zf:
        for path in sorted((staging / "tiny-imagenet-200").rglob("*")):
            zf.write(path, path.relative_to(staging).as_posix())
    manifest = served / "MD5SUMS"
    manifest.write_text("".join(f"{_md5(p)}  {p.name}\n" for p in sorted(served.iterdir()) if p != manifest))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(served)))
    server.requests, server.truncate = [], set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/", "manifest": manifest, "server": server,
           "written": written, "served": served}
    server.shutdown()
    server.server_close()


def _cfg(mirror, root: Path, name: str, *extra: str):
    return load_config("demo", [f"data.name={name}", f"data.root={root}", f"data.download_mirror={mirror['url']}",
                                f"data.download_checksums={mirror['manifest']}", *extra])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "fashion_mnist", "tiny_imagenet"])
def test_download_then_read_with_the_real_reader(mirror, tmp_path, name):
    root = tmp_path / "data"
    before = len(mirror["server"].requests)
    with pytest.raises(DatasetError, match="data.download=true"):  # nothing downloads unless asked
        assemble.dataset(_cfg(mirror, root, name), "train")
    assert len(mirror["server"].requests) == before
    cfg = _cfg(mirror, root, name, "data.download=true")
    train = assemble.dataset(cfg, "train")
    fetched = mirror["server"].requests[before:]  # torchvision's redirect check GETs each URL once more
    assert len(set(fetched)) == (4 if name == "fashion_mnist" else 1)
    written = mirror["written"][name]
    if name == "cifar10":
        images, labels = written[0], written[1]
        assert train.targets == labels and all(np.array_equal(np.asarray(train[i][0]), images[i]) for i in (0, 9))
        assert CIFAR10.download.present(root / "cifar-10-batches-py")  # the folder itself, as the reader allows
    elif name == "cifar100":
        assert train.targets == [5, 99, 0] and np.array_equal(np.asarray(train[1][0]), written[1])
    elif name == "stl10":
        images, labels = written["train"]
        assert train.targets == [v - 1 for v in labels] and np.array_equal(np.asarray(train[2][0]), images[2])
    elif name == "fashion_mnist":
        assert train.targets == [1, 2, 3, 4] and np.array_equal(np.asarray(train[3][0])[:, :, 0], written[3])
    else:
        val = assemble.dataset(_cfg(mirror, root, name, "data.download=true", "data.test_split=val"), "val")
        assert len(train) == 6 and [val.targets[i] for i in range(3)] == [t[1] for t in written[1]]
    assemble.dataset(cfg, cfg.data.test_split if name != "tiny_imagenet" else "val")  # in place: no new request
    assert len(mirror["server"].requests) == before + len(fetched)
    assert not list(root.glob(".*.part")) and not list(root.glob(".*.extract"))


def test_published_checksums_reject_a_mirror_serving_other_bytes(mirror, tmp_path):
    """Without the mirror's own MD5 list the published MD5 applies: the test's archive is a corrupt download."""
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as caught:
        CIFAR10.download(root, mirror=mirror["url"], log=lambda s: None)
    message = str(caught.value)
    assert "cifar-10-python.tar.gz arrived incomplete or corrupt" in message
    assert "c58f30108f718f92721af3b95e74349a" in message and "data.download_checksums" in message
    assert list(root.iterdir()) == [root / ".contrastlab-download.lock"]  # nothing posing as complete


def test_an_interrupted_download_is_named_removed_and_restarts_cleanly(mirror, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    stale = root / ".stl10_binary.tar.gz.12345.part"  # left by a process killed mid-transfer
    stale.write_bytes(b"half an archive")
    checksums = {"stl10_binary.tar.gz": _md5(mirror["served"] / "stl10_binary.tar.gz")}
    mirror["server"].truncate.add("stl10_binary.tar.gz")
    lines = []
    try:
        with pytest.raises(DatasetError, match="stl10_binary.tar.gz arrived incomplete or corrupt.*Run again"):
            STL10.download(root, mirror=mirror["url"], checksums=checksums, log=lines.append)
    finally:
        mirror["server"].truncate.clear()
    assert any("interrupted download" in line for line in lines) and not stale.exists()
    assert not (root / "stl10_binary.tar.gz").exists() and not list(root.glob(".*.part"))
    STL10.download(root, mirror=mirror["url"], checksums=checksums, log=lines.append)  # the re-run
    assert len(STL10(root, "test")) == 2


def test_an_archive_damaged_on_disk_is_named_with_the_fix(mirror, tmp_path):
    root = tmp_path / "data"
    cfg = _cfg(mirror, root, "cifar100", "data.download=true")
    root.mkdir()
    (root / "cifar-100-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(DatasetError, match="cifar-100-python.tar.gz is corrupt.*Delete it and run again"):
        assemble.dataset(cfg, "train")
    (root / "cifar-100-python.tar.gz").unlink()
    assert assemble.dataset(cfg, "train").targets == [5, 99, 0]


def test_what_cannot_be_downloaded_says_so(tmp_path):
    with pytest.raises(DatasetError, match="'imagefolder' cannot be downloaded.*cifar10, cifar100, fashion_mnist, stl10, tiny_imagenet"):
        assemble.dataset(load_config("demo", ["data.name=imagefolder", f"data.root={tmp_path}",
                                              "data.download=true"]), "train")
    with pytest.raises(DatasetError, match="needs data.root"):
        assemble.dataset(load_config("demo", ["data.name=cifar10", "data.download=true"]), "train")
    assert len(assemble.dataset(load_config("demo", ["data.download=true"]), "test")) == 1000  # embedded: nothing
    bad = tmp_path / "MD5SUMS"
    bad.write_text("xyz  cifar-10-python.tar.gz\n")
    with pytest.raises(DatasetError, match="line 1 of .*MD5SUMS"):
        assemble.dataset(load_config("demo", ["data.name=cifar10", f"data.root={tmp_path}", "data.download=true",
                                              f"data.download_checksums={bad}"]), "train")


def _toy_spec(archive: Path) -> DownloadSpec:
    """A dataset of one archive already in ``root`` (nothing to fetch): only the extraction runs."""
    return DownloadSpec("toy", (RemoteFile(f"http://127.0.0.1:9/{archive.name}", _md5(archive)),), ("ds/plain.txt",))


def _member(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
    info.uid, info.gid, info.uname, info.gname = 4242, 4343, "", ""  # someone else's files
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, data


@pytest.mark.parametrize("python", ["with tarfile.data_filter", "without tarfile.data_filter"])
def test_tar_members_are_extracted_as_plain_data_and_the_rest_is_named(tmp_path, monkeypatch, python):
    """Only regular files, folders and links inside the dataset are extracted; setuid/setgid/sticky bits and
    group/other write permission dropped, the extracting user the owner: tarfile's "data" filter, and the same
    rules where Python lacks it (before 3.10.12 / 3.11.4). Device files and FIFOs are skipped with a log line."""
    if python.startswith("without"):
        monkeypatch.delattr(tarfile, "data_filter")
    members = [
        _member("ds", tarfile.DIRTYPE, 0o7777),
        _member("ds/plain.txt", tarfile.REGTYPE, 0o6666, b"plain"),  # setuid + setgid, writable by all
        _member("ds/tool.sh", tarfile.REGTYPE, 0o4777, b"#!/bin/sh\n"),
        _member("ds/null", tarfile.CHRTYPE, 0o666),
        _member("ds/pipe", tarfile.FIFOTYPE, 0o666),
        _member("ds/alias.txt", tarfile.SYMTYPE, 0o777, link="plain.txt"),
        _member("ds/hard.txt", tarfile.LNKTYPE, 0o6666, link="ds/plain.txt"),  # its mode is set on plain.txt
    ]
    root = tmp_path / "data"
    root.mkdir()
    archive = root / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data))
    lines: list[str] = []
    old_umask = os.umask(0o022)
    try:
        _toy_spec(archive)(root, log=lines.append)
    finally:
        os.umask(old_umask)
    ds = root / "ds"
    assert sorted(p.name for p in ds.iterdir()) == ["alias.txt", "hard.txt", "plain.txt", "tool.sh"]
    skipped = next(line for line in lines if "skipped" in line)
    assert "skipped 2 member" in skipped and "ds/null" in skipped and "ds/pipe" in skipped
    assert (ds / "alias.txt").is_symlink() and os.readlink(ds / "alias.txt") == "plain.txt"
    assert (ds / "hard.txt").read_bytes() == b"plain" and os.stat(ds / "hard.txt").st_ino == os.stat(ds / "plain.txt").st_ino
    for path in (ds, ds / "plain.txt", ds / "tool.sh"):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) & 0o7022 == 0, (path, oct(info.st_mode))  # no high bits, no g/o write
        assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid()), path
        assert stat.S_IMODE(info.st_mode) & 0o600 == 0o600, path  # the owner reads and writes
    assert stat.S_IMODE((ds / "tool.sh").stat().st_mode) & 0o100 and not stat.S_IMODE((ds / "plain.txt").stat().st_mode) & 0o111


def test_zip_members_that_are_links_or_special_files_are_skipped_and_named(tmp_path):
    """zipfile writes a stored link or FIFO as a regular file holding its target: such members are skipped; the
    stored permissions (setuid here) are never applied."""
    root = tmp_path / "data"
    root.mkdir()
    archive = root / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, mode, data in (("ds/plain.txt", stat.S_IFREG | 0o4777, b"plain"),
                                 ("ds/alias.txt", stat.S_IFLNK | 0o777, b"plain.txt"),
                                 ("ds/pipe", stat.S_IFIFO | 0o666, b"")):
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, mode << 16  # 3: Unix
            zf.writestr(info, data)
    lines: list[str] = []
    _toy_spec(archive)(root, log=lines.append)
    assert sorted(p.name for p in (root / "ds").iterdir()) == ["plain.txt"]
    skipped = next(line for line in lines if "skipped" in line)
    assert "'ds/alias.txt' is a symbolic link" in skipped and "'ds/pipe' is a special file" in skipped
    assert stat.S_IMODE((root / "ds" / "plain.txt").stat().st_mode) & 0o7000 == 0
