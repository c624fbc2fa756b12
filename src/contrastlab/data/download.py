"""Datasets that download themselves: ``data.download=true`` fetches, verifies and extracts into ``data.root``.

Each dataset class that can fetch its files carries a :class:`DownloadSpec` as its ``download`` attribute
(:class:`~contrastlab.data.CIFAR10`, ``CIFAR100``, ``STL10``, ``FashionMNIST``, ``TinyImageNet``); calling it
puts the dataset under ``root`` in the layout the class reads::

    CIFAR10.download("data")                      # -> data/cifar-10-batches-py/
    CIFAR10.download("data", mirror="http://host/files/", checksums={"cifar-10-python.tar.gz": "<md5>"})

Nothing downloads unless asked: the readers never call it; the trainer and ``contrastlab eval`` call it
before reading a dataset only with ``data.download=true`` (:func:`download_dataset`). The transfer itself is
torchvision's (``torchvision.datasets.utils.download_url``, ``calculate_md5``); extraction is ``tarfile``'s and
``zipfile``'s, with the safety rules below.

How a download stays safe:

- a dataset already in place (every file the reader needs present) downloads nothing; an archive already in
  ``root`` with the right MD5 (fetched by hand, or by an earlier run) is not fetched again;
- a file is fetched to a temporary ``.<name>.<pid>.part`` file, its MD5 compared with the published one, and
  only then renamed to its final name: an interrupted or corrupt transfer never leaves a file posing as
  complete. It raises :class:`~contrastlab.errors.DatasetError` naming the URL, the sizes and both MD5s;
  running again restarts the transfer from scratch (left-over ``.part`` files are deleted first);
- an archive is extracted into a temporary folder inside ``root`` and its top-level folder renamed into place,
  so an interrupted extraction leaves no half-filled dataset folder;
- only regular files, folders and links that stay inside the dataset folder are extracted, without setuid, setgid
  or sticky bits or write permission for others, owned by the user extracting (``tarfile``'s ``"data"`` filter,
  with the same rules applied here on Pythons that lack it); device files, FIFOs and links leading outside are
  skipped with a log line naming them (a name or link target that is absolute or holds ``..`` refuses the whole
  archive);
- concurrent processes (the ranks of one node) take turns through an advisory ``flock`` on
  ``root/.contrastlab-download.lock``: the first downloads, the others find the dataset in place.

Mirrors: ``mirror`` (``data.download_mirror``) is a base URL under which every file is found by its file name
(``<mirror>/cifar-10-python.tar.gz``); the published MD5s still apply. A mirror serving other bytes (a local
copy re-packed, the tests' small archives) comes with its own list of MD5s in ``md5sum`` format
(``data.download_checksums=FILE``, lines ``<md5>  <file name>``; :func:`read_checksums`), which replaces
the published MD5 of each file it names.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import http.client
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from contrastlab.errors import DatasetError

PathLike = str | os.PathLike[str]
Log = Callable[[str], None]

LOCK_NAME = ".contrastlab-download.lock"
"""Advisory lock file in ``root`` taken while a dataset is fetched there."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset is distributed as.

    Attributes:
        url: the upstream URL; its last path component is the file name.
        md5: the published MD5 of the file.
        extract: whether it is an archive to extract into ``root`` (else it is kept as it is, e.g. ``.gz`` IDX files).
    """

    url: str
    md5: str
    extract: bool = True

    @property
    def name(self) -> str:
        """The file name (the URL's last component)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def url_from(self, mirror: str | None) -> str:
        """The upstream URL, or ``<mirror>/<name>`` when a mirror is given."""
        return self.url if not mirror else f"{mirror.rstrip('/')}/{self.name}"


def read_checksums(path: PathLike) -> dict[str, str]:
    """Read an ``md5sum``-format file (``<md5>  <file name>`` per line; ``*`` before the name allowed).

    Raises:
        DatasetError: the file is missing or a line is not ``<32 hex digits> <name>``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"data.download_checksums: {path} does not exist; give a file of '<md5>  <file name>' "
                           "lines (as `md5sum FILES > MD5SUMS` writes), or null for the published MD5s")
    table: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise DatasetError(f"data.download_checksums: line {number} of {path} is not '<md5>  <file name>': "
                               f"{line!r}")
        table[parts[1].strip().lstrip("*")] = digest
    return table


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/.contrastlab-download.lock`` (best effort where flock is unsupported)."""
    with open(root / LOCK_NAME, "a") as fh:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _safe_members(archive: Path) -> None:
    """Refuse an archive with a member outside the extraction folder (an absolute path or ``..``)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            names = [m.name for m in members]
            names += [m.linkname for m in members if m.issym() or m.islnk()]
    for name in names:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise DatasetError(f"{archive}: member {name!r} would be written outside the dataset folder; "
                               "this is not the published archive. Delete it and download it again")


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` (links resolved) is ``root`` or lies under it; ``root`` is a resolved path."""
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _data_member(member: tarfile.TarInfo, dest: str, umask: int) -> tarfile.TarInfo:
    """``member`` made safe to extract into ``dest`` as ``tarfile.data_filter`` makes it, for Pythons without that
    filter: regular files, folders and links that stay inside ``dest`` only; no setuid/setgid/sticky bit, no write
    permission for group and others; the current user as owner.

    Raises:
        tarfile.TarError: the member is to be skipped; the message says why.
    """
    root = os.path.realpath(dest)
    name = member.name.lstrip("/")
    if not _inside(os.path.join(root, name), root):
        raise tarfile.TarError(f"{member.name!r} would be written outside the dataset folder")
    if member.issym() or member.islnk():
        base = os.path.dirname(name) if member.issym() else ""  # a hard link names a path from the top
        if os.path.isabs(member.linkname) or not _inside(os.path.join(root, base, member.linkname), root):
            raise tarfile.TarError(f"{member.name!r} is a link to {member.linkname!r}, outside the dataset folder")
    elif not (member.isfile() or member.isdir()):
        raise tarfile.TarError(f"{member.name!r} is a special file (device or FIFO)")
    if member.isdir():
        mode = 0o777 & ~umask  # a new folder's usual permissions
    else:  # a file, or a hard link (its mode is set on the file it links); a symbolic link's is never used
        mode = (member.mode & 0o755) | 0o600  # no high bits, no group/other write; the owner reads and writes
        if not member.mode & 0o100:
            mode &= ~0o111  # executable by others only if by its owner
    safe = copy.copy(member)
    safe.name, safe.mode = name, mode
    safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""  # owned by whoever extracts
    return safe


def _extract_tar(archive: Path, dest: Path) -> list[str]:
    """Extract a tar archive's regular files, folders and inner links into ``dest`` with ordinary permissions and
    the current user as owner (``tarfile``'s ``"data"`` filter, or :func:`_data_member` where Python lacks it).

    Returns:
        each member skipped, with the reason.
    """
    skipped: list[str] = []
    builtin = getattr(tarfile, "data_filter", None)
    with tarfile.open(archive) as tf:
        if builtin is not None:
            def data_only(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                try:
                    return builtin(member, path)
                except tarfile.TarError as exc:  # tarfile.FilterError: a member the filter refuses
                    skipped.append(str(exc))
                    return None

            tf.extractall(dest, filter=data_only)
            return skipped
        umask = os.umask(0)
        os.umask(umask)
        for member in tf.getmembers():
            try:
                safe = _data_member(member, str(dest), umask)
            except tarfile.TarError as exc:
                skipped.append(str(exc))
                continue
            tf.extract(safe, dest)
    return skipped


def _extract_zip(archive: Path, dest: Path) -> list[str]:
    """Extract a zip archive's files and folders into ``dest``; members stored as links, devices or FIFOs (Unix
    file types in their attributes) are skipped. ``zipfile`` applies no stored permissions or owners.

    Returns:
        each member skipped, with the reason.
    """
    kept, skipped = [], []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix attributes (written elsewhere)
                kept.append(info)
            else:
                what = "a symbolic link" if kind == stat.S_IFLNK else "a special file (device, FIFO or socket)"
                skipped.append(f"{info.filename!r} is {what}")
        zf.extractall(dest, members=kept)
    return skipped


@dataclass(frozen=True)
class DownloadSpec:
    """How one dataset is fetched: its files, their MD5s, and what must exist under ``root`` afterwards.

    Call it (``CIFAR10.download(root)``) to put the dataset in place; see the module docstring.

    Attributes:
        dataset: the registry name, for messages.
        files: the files to fetch (archives are extracted into ``root``).
        expected: paths relative to ``root`` that exist once the dataset is in place.
    """

    dataset: str
    files: tuple[RemoteFile, ...]
    expected: tuple[str, ...]

    def present(self, root: PathLike) -> bool:
        """Whether every file the reader needs is under ``root`` (or in ``root`` itself when ``root`` is the
        dataset's folder, e.g. ``.../cifar-10-batches-py``, which the readers accept too)."""
        root = Path(root)
        if all((root / p).exists() for p in self.expected):
            return True
        heads = {PurePosixPath(p).parts[0] for p in self.expected}
        return (len(heads) == 1 and root.name in heads and all(len(PurePosixPath(p).parts) > 1 for p in self.expected)
                and all((root / PurePosixPath(p).relative_to(root.name)).exists() for p in self.expected))

    def __call__(self, root: PathLike, *, mirror: str | None = None, checksums: Mapping[str, str] | None = None,
                 log: Log = _stderr) -> Path:
        """Fetch, verify and extract the dataset into ``root`` unless it is there already.

        Args:
            root: the folder to put the dataset in (created if missing): the reader's ``root``.
            mirror: a base URL replacing the upstream hosts (each file fetched as ``<mirror>/<name>``).
            checksums: file name -> MD5, replacing the published MD5 of the files it names.
            log: where progress lines go.

        Returns:
            ``root``.

        Raises:
            DatasetError: a transfer failed or arrived corrupt (nothing of it is kept), an archive in ``root``
                does not match its MD5, or the extracted files are not the layout the reader expects.
        """
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        with _folder_lock(root):
            if self.present(root):
                return root
            for remote in self.files:
                md5 = (checksums or {}).get(remote.name, remote.md5)
                target = root / remote.name
                if target.is_file():
                    self._check_existing(target, md5)
                    log(f"{self.dataset}: {target} is already here (MD5 {md5} matches)")
                else:
                    self._fetch(remote.url_from(mirror), target, md5, log)
                if remote.extract:
                    self._extract(target, root, log)
            missing = [p for p in self.expected if not (root / p).exists()]
            if missing:
                raise DatasetError(f"{self.dataset}: after downloading into {root}, {', '.join(missing)} is "
                                   "missing: the files fetched do not hold the layout the reader expects. Check "
                                   "data.download_mirror, delete what was fetched, and run again")
        log(f"{self.dataset}: in place under {root}")
        return root

    def _check_existing(self, path: Path, md5: str) -> None:
        from torchvision.datasets.utils import calculate_md5

        got = calculate_md5(path)
        if got != md5:
            raise DatasetError(f"{self.dataset}: {path} is corrupt or not the published file (MD5 {got}, expected "
                               f"{md5}, {path.stat().st_size} bytes). Delete it and run again with data.download=true "
                               "to fetch it afresh, or put a good copy there")

    def _fetch(self, url: str, target: Path, md5: str, log: Log) -> None:
        """Download ``url`` to a temporary file, check its MD5, then rename it to ``target``."""
        from torchvision.datasets.utils import calculate_md5, download_url

        for stale in target.parent.glob(f".{target.name}.*.part"):  # left by an interrupted run
            log(f"{self.dataset}: removing {stale}, left by an interrupted download; starting again")
            stale.unlink(missing_ok=True)
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        log(f"{self.dataset}: downloading {url} -> {target}")
        try:
            download_url(url, str(target.parent), part.name)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            part.unlink(missing_ok=True)
            raise DatasetError(f"{self.dataset}: downloading {url} failed ({type(exc).__name__}: {exc}); nothing "
                               "was kept. Check the network (or data.download_mirror) and run again, or fetch "
                               f"{target.name} by hand into {target.parent}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        got = calculate_md5(part)
        if got != md5:
            size = part.stat().st_size
            part.unlink(missing_ok=True)
            raise DatasetError(f"{self.dataset}: {url} arrived incomplete or corrupt ({size} bytes, MD5 {got}, "
                               f"expected {md5}); the partial file was deleted and {target} not written. Run "
                               "again to restart the download; if it fails again, the server sends another file "
                               "(a mirror's own files need their MD5s in data.download_checksums)")
        os.replace(part, target)

    def _extract(self, archive: Path, root: Path, log: Log) -> None:
        """Extract ``archive`` into a temporary folder in ``root``, then rename its top-level entries into place."""
        for stale in root.glob(f".{archive.name}.*.extract"):
            shutil.rmtree(stale, ignore_errors=True)
        log(f"{self.dataset}: extracting {archive}")
        scratch = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extract", dir=root))
        try:
            try:
                _safe_members(archive)
                extract = _extract_zip if zipfile.is_zipfile(archive) else _extract_tar
                skipped = extract(archive, scratch)
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
                raise DatasetError(f"{self.dataset}: {archive} could not be extracted ({type(exc).__name__}: "
                                   f"{exc}); delete it and run again with data.download=true") from exc
            if skipped:
                log(f"{self.dataset}: {archive}: skipped {len(skipped)} member(s) that are not regular files, "
                    f"folders or links inside the dataset folder: {'; '.join(skipped[:10])}"
                    + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
            for entry in sorted(scratch.iterdir()):
                destination = root / entry.name
                if destination.exists():
                    raise DatasetError(f"{self.dataset}: {destination} exists but does not hold the whole dataset "
                                       f"(expected {', '.join(self.expected)} under {root}); move or delete it, "
                                       "then run again with data.download=true")
                os.replace(entry, destination)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def download_dataset(name: str, root: PathLike | None, mirror: str | None = None,
                     checksums: PathLike | Mapping[str, str] | None = None, log: Log = _stderr) -> Path | None:
    """``data.download=true``: put dataset ``name`` under ``root`` with its class's :class:`DownloadSpec`.

    Args:
        name: a registry name (:data:`contrastlab.data.DATASETS`).
        root: ``data.root``.
        mirror: ``data.download_mirror``.
        checksums: ``data.download_checksums`` (an md5sum-format file), or a file name -> MD5 mapping.
        log: where progress lines go.

    Returns:
        ``root``, or None for the embedded ``demo`` (nothing to fetch).

    Raises:
        DatasetError: the dataset cannot be downloaded (an image folder), no root was given, or the download
            failed (see :class:`DownloadSpec`).
    """
    from contrastlab.data import DATASETS, dataset_class

    cls = dataset_class(name)
    spec = getattr(cls, "download", ...)
    if spec is None:  # a dataset that declares it has nothing to fetch (the embedded demo)
        return None
    if not isinstance(spec, DownloadSpec):
        able = [n for n in DATASETS if isinstance(getattr(dataset_class(n), "download", None), DownloadSpec)]
        raise DatasetError(f"data.download=true: dataset {name!r} cannot be downloaded (its files are not public "
                           f"or not one archive); put it under data.root yourself. Downloadable: {', '.join(able)}")
    if root is None:
        raise DatasetError(f"data.download=true needs data.root, the folder to put {name} in (e.g. data.root=./data)")
    table = read_checksums(checksums) if isinstance(checksums, (str, os.PathLike)) else checksums
    return spec(root, mirror=mirror, checksums=table, log=log)
