"""Datasets by name: where they live under the data root, how they are read, and the
decoded-once tensor cache under ``resources/cache``."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgclf import catalog
from imgclf.utils import exclusive

from . import readers
from .readers import DataError


CACHE_VERSION = 1


@dataclass
class Data:
    """A whole dataset in memory: uint8 images (N, C, H, W), int64 labels, per-channel stats."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: list[float]  # of the training images, in [0, 1]
    std: list[float]
    cached: bool = field(default=False, repr=False, compare=False)  # read from, or written to, the cache

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        """(mean, std) that the transforms normalize with: the catalog's (the reference's constants)
        where it has them, the measured statistics otherwise (digits)."""
        entry = catalog.DATASETS.get(self.name)
        if entry is None or entry.normalization is None:
            return self.mean, self.std
        return list(entry.normalization[0]), list(entry.normalization[1])

    @property
    def n_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def canonical_name(name: str) -> str:
    """A catalog name from any case of it or of one of its aliases (fashion_mnist)."""
    if name in catalog.DATASETS:
        return name
    for entry in catalog.DATASETS.values():
        if name.lower() in (entry.name.lower(), *entry.aliases):
            return entry.name
    raise DataError(f"unknown dataset '{name}'; known: {', '.join(catalog.DATASETS)}")


def data_root(configured: str = "") -> Path:
    """$IMGCLF_DATA_ROOT, else the configured ``data_root``, else ./resources/data."""
    return Path(os.environ.get("IMGCLF_DATA_ROOT") or configured or "resources/data")


def cache_dir() -> Path:
    return Path(os.environ.get("IMGCLF_CACHE_DIR") or "resources/cache")


def cache_path(name: str) -> Path:
    return cache_dir() / f"{canonical_name(name).lower()}.pt"  # the workflow's {dataset} slug


def _read(name: str, folder: Path) -> dict:
    entry = catalog.DATASETS[name]
    if entry.folder and not folder.is_dir():
        raise DataError(
            f"{folder}: dataset folder for {name} not found; set data_root in config/config.yaml or "
            f"IMGCLF_DATA_ROOT to a folder holding {entry.folder}/ (see `imgclf data --help`)"
        )
    return getattr(readers, f"read_{entry.reader}")(folder, name)


def _bundled(name: str) -> bool:
    """Shipped with a library (no folder under the data root): the digits."""
    return not catalog.DATASETS[name].folder


def _stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std in [0, 1], from exact integer sums over chunks: no
    float64 copy of the whole dataset (1.2 GB for CIFAR's training set)."""
    c = images.shape[1]
    s, ss = [0] * c, [0] * c
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.int64)
        s = [a + int(b) for a, b in zip(s, x.sum(dim=(0, 2, 3)).tolist())]
        ss = [a + int(b) for a, b in zip(ss, (x * x).sum(dim=(0, 2, 3)).tolist())]
    n = images.numel() // c
    mean = [a / (n * 255) for a in s]
    std = [((n * b - a * a) / (n * (n - 1))) ** 0.5 / 255 if n > 1 else float("nan") for a, b in zip(s, ss)]
    return mean, std


def _fingerprint(folder: Path) -> str:
    """The folder's location and its files' names, sizes and mtimes (ns): a changed file, or another
    folder with the same dataset name, invalidates the cache."""
    if not folder.is_dir():
        return "builtin"
    h = hashlib.sha256(str(folder.resolve()).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"\0{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load(name: str, root: str | Path | None = None, folder: str | Path | None = None, use_cache: bool = True,
         write_cache: bool = True) -> Data:
    """Read a dataset (decoding once into a cached tensor file) and return it in memory. With
    ``write_cache=False`` a freshly decoded dataset is not cached yet: the caller checks it against
    the config first, then calls :func:`store` (nothing is written for a refused command)."""
    name = canonical_name(name)
    folder = Path(folder) if folder else data_root(str(root or "")) / catalog.DATASETS[name].folder
    cache = cache_path(name)
    if use_cache and cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("version") == CACHE_VERSION and _cache_serves(blob, name, folder):
                return Data(name, *(blob[k] for k in ("train_images", "train_labels", "test_images",
                                                      "test_labels", "classes", "mean", "std")), cached=True)
        except Exception:  # a damaged cache is rebuilt from the source files
            pass
    raw = _read(name, folder)
    mean, std = _stats(raw["train"][0])
    data = Data(name, *raw["train"], *raw["test"], list(raw["classes"]), mean, std)
    if use_cache and write_cache:
        store(data, folder)
    return data


def _source(name: str, folder: Path) -> str:
    """The folder a cache was decoded from, as an absolute path ('builtin' for the digits)."""
    return "builtin" if _bundled(name) else str(folder.resolve())


def _cache_serves(blob: dict, name: str, folder: Path) -> bool:
    """A cache answers for the folder it was decoded from: unchanged, or gone (sources deleted
    after caching). A folder that is not there never gets another folder's cache."""
    if blob.get("fingerprint") == "builtin":  # the bundled digits, or a synthetic set a test or benchmark injects
        return True
    if blob.get("source") != _source(name, folder):
        return False
    return not folder.exists() or blob.get("fingerprint") == _fingerprint(folder)


def store(data: Data, folder: str | Path | None = None, root: str | Path | None = None) -> None:
    """Cache a dataset returned by ``load(..., write_cache=False)`` once it has been accepted."""
    if data.cached:
        return
    name = data.name
    folder = Path(folder) if folder else data_root(str(root or "")) / catalog.DATASETS[name].folder
    builtin = _bundled(name)
    _write_cache(cache_path(name), data, "builtin" if builtin else _fingerprint(folder), _source(name, folder))
    data.cached = True


def _write_cache(path: Path, data: Data, fingerprint: str, source: str = "builtin") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"version": CACHE_VERSION, "fingerprint": fingerprint, "source": source,
                    "train_images": data.train_images,
                    "train_labels": data.train_labels, "test_images": data.test_images,
                    "test_labels": data.test_labels, "classes": data.classes, "mean": data.mean,
                    "std": data.std}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def prepare(name: str, root: str | Path, source: str | Path | None = None, download: bool = False) -> Data:
    """``imgclf data``: unpack ``source`` (an official archive, the JPEG-copy archive, or a
    folder) into ``<root>/<dataset>/`` if given, or download the official release when
    ``download`` and the folder is missing; then read, verify and cache the dataset."""
    name = canonical_name(name)
    # Two preparations of one dataset at once would read each other's half-copied files: the
    # second waits for the first, then finds the folder (and the cache) ready.
    with exclusive(cache_path(name).with_name(f".{cache_path(name).stem}.prepare.lock")):
        return _prepare(name, Path(root) / catalog.DATASETS[name].folder, root, source, download)


def _prepare(name: str, target: Path, root: str | Path, source: str | Path | None, download: bool) -> Data:
    bundled = _bundled(name)
    if source is None and download and not bundled and not target.is_dir():
        fetch(name, target)
    if source is None:
        return load(name, root=root, folder=None if bundled else target)
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: not found (expected an archive .tar.gz/.tgz or a folder)")
    created = target  # the outermost folder this command creates, removed again if it fails
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    created = None if target.exists() else created
    try:
        if source.is_dir():
            _copy_tree(source, target)
        else:
            _unpack(source, target, name)
        return load(name, root=root, folder=None if bundled else target)
    except BaseException:
        # A refused source leaves no half-prepared folder behind for the next (good) one to merge into.
        if created is not None and created.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise


def fetch(name: str, target: Path) -> None:
    """Download ``name``'s official files into ``target`` in our layout (IDX files, or the
    python batches); a machine without internet gets one line saying what to place where."""
    import torchvision.datasets as tvd

    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent if target.parent.is_dir() else None))
    try:
        # torchvision's downloaders fetch the official releases and verify their published MD5s.
        cls = getattr(tvd, catalog.DATASETS[name].torchvision)
        try:
            cls(str(staging), train=True, download=True)
            cls(str(staging), train=False, download=True)
        except Exception as e:  # noqa: BLE001 - URLError, socket errors, checksum failures
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{target}: {name} is not there and could not be downloaded ({first}); place the official "
                f"files there or run `imgclf data {name.lower()} --from ARCHIVE`") from None
        if catalog.DATASETS[name].reader == "idx":
            raw = staging / name / "raw"
            target.mkdir(parents=True, exist_ok=True)
            for gz in raw.glob("*.gz"):
                os.replace(gz, target / gz.name)
        else:
            batches = next(p for p in staging.iterdir() if p.is_dir() and p.name.startswith("cifar-"))
            target.mkdir(parents=True, exist_ok=True)
            os.replace(batches, target / batches.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_tree(src: Path, target: Path) -> None:
    if src.resolve() == target.resolve():
        return
    # A folder that itself holds <dataset>/train (like the archive's top level) or train/ directly.
    inner = src / target.name
    src = inner if inner.is_dir() else src
    _refuse_linked_dirs(src)
    shutil.copytree(src, target, dirs_exist_ok=True)


def _refuse_linked_dirs(src: Path) -> None:
    """A dataset folder holds plain folders: a symlinked directory (to '..', say) would make the
    copy follow it without end. Checked before anything is copied."""
    for dirpath, dirnames, _ in os.walk(src):  # os.walk never follows links itself
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise DataError(f"{Path(dirpath) / d}: a symbolic link to a directory; `imgclf data --from` "
                                "copies plain folders only (copy or move the linked folder in)")


def _place(src: Path, dst: Path) -> None:
    """Move an unpacked tree into place (a rename: 60,000 JPEGs are not copied twice), or merge
    it into an existing one."""
    if dst.exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))


def _unpack(archive: Path, target: Path, name: str) -> None:
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError as e:
        raise DataError(f"{archive}: cannot read ({e})") from None
    if not is_tar:
        raise DataError(f"{archive}: not a tar archive (expected the official .tar.gz or the JPEG-copy .tgz)")
    target.parent.mkdir(parents=True, exist_ok=True)  # staging beside the target: moved, not copied
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        try:
            with tarfile.open(archive) as tar:
                # 'data' strips leading '/', refuses members or links that land outside, and devices.
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{archive}: cannot unpack ({type(e).__name__}: {e})") from None
        # Find the folder that holds the data: python batches, or train/ + test/ image folders.
        batches_dir = catalog.DATASETS[name].archive_folder
        for cand in [staging, *sorted(p for p in staging.rglob("*") if p.is_dir())]:
            if (cand / "train").is_dir() and (cand / "test").is_dir():
                _refuse_linked_dirs(cand)
                _place(cand, target)
                return
            if batches_dir and ((cand / "test_batch").is_file() or (cand / "test").is_file()):
                # The batches go to <target>/<official folder name>, wherever the archive kept them.
                _refuse_linked_dirs(cand)
                _place(cand, target / batches_dir)
                return
        raise DataError(f"{archive}: holds neither CIFAR python batches nor train/ and test/ image folders")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
