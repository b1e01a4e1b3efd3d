"""Dataset readers: official file layouts -> uint8 tensors (N, C, H, W) + int64 labels.

Each reader takes the dataset's folder under the data root and returns
``{"train": (images, labels), "test": (images, labels), "classes": [...]}``.
A missing or damaged file raises :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import pickle
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from imgclf import catalog


class DataError(RuntimeError):
    """Missing, truncated or corrupt dataset files; the message names them."""


Split = tuple[torch.Tensor, torch.Tensor]

def read_digits(_folder: Path | None = None, _name: str = "digits") -> dict:
    """scikit-learn's bundled UCI handwritten digits: 1,797 real 8x8 images, 16 grey levels.

    A fixed stratified 75/25 split (random_state=0), so every machine sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, stratify=labels, random_state=0)
    as_split = lambda i: (torch.from_numpy(images[i].copy()), torch.from_numpy(labels[i].copy()))  # noqa: E731
    return {"train": as_split(train_idx), "test": as_split(test_idx), "classes": list(catalog.DATASETS["digits"].classes)}


def _idx_limit(name: str, stem: str) -> int:
    """The most bytes an official IDX file of this kind holds: a file, or a gzip stream inflating
    (a gzip bomb), beyond it is refused before anything that size is allocated."""
    entry = catalog.DATASETS[name]
    n = max(entry.split_sizes.values())
    return 16 + n * entry.shape[1] * entry.shape[2] if "images" in stem else 8 + n


def _open_idx(folder: Path, name: str, stem: str) -> tuple[bytes, Path, bytes | None]:
    """(decompressed bytes, path, the .gz file's own bytes or None for a plain file)."""
    limit = _idx_limit(name, stem)
    for name in (stem, stem + ".gz"):
        path = folder / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        # deflate never grows data by more than a few bytes per 16 KB block (stored blocks)
        if size > limit + limit // 64 + 1024:
            raise DataError(f"{path}: {size:,} bytes, more than the {limit:,} of an official {stem}")
        packed = path.read_bytes()
        if not name.endswith(".gz"):
            return packed, path, None
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(packed)) as f:
                raw = f.read(limit + 1)
                if len(raw) > limit:
                    raise DataError(f"{path}: inflates to more than the {limit:,} bytes of an official {stem} "
                                    "(a gzip bomb?)")
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt") from None
        return raw, path, packed
    raise DataError(f"{folder}: missing {stem}[.gz] (expected the four IDX files of the official release)")


def _parse_idx(raw: bytes, path: Path, expected_ndim: int) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise DataError(f"{path}: not an IDX file of {expected_ndim} dimension(s) of uint8")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_ndim)]
    offset = 4 + 4 * expected_ndim
    # math.prod, not np.prod: a header claiming 2^31 x 2^31 images must not wrap around int64.
    if len(raw) != offset + math.prod(dims):
        raise DataError(f"{path}: size {len(raw)} bytes does not match its header {dims}; the file is truncated"
                        " or its header is wrong")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _check_md5(name: str, stem: str, path: Path, raw: bytes, packed: bytes | None) -> DataError | None:
    """The published checksum of the decompressed file where known (whatever its compression),
    else of the released .gz file: a dataset with published checksums accepts no file it cannot
    check (that error is returned, for the caller to raise once the structure is judged)."""
    entry = catalog.DATASETS[name]
    want = entry.md5.get(stem)
    if want:
        if (got := hashlib.md5(raw).hexdigest()) != want:
            raise DataError(f"{path}: MD5 {got} != published {want}; re-download it")
        return None
    want = entry.gz_md5.get(stem)
    if not want:
        return None
    if packed is None:
        return DataError(f"{path}: {name} is checked against the published MD5s of its released .gz files; "
                         f"place {stem}.gz as downloaded (`imgclf data {name.lower()} --download`)")
    if (got := hashlib.md5(packed).hexdigest()) != want:
        raise DataError(f"{path}: MD5 {got} != published {want} (of the released .gz); re-download it")
    return None


def read_idx(folder: Path, name: str) -> dict:
    """MNIST / Fashion-MNIST / KMNIST in the official IDX layout, gzip-compressed or not."""
    entry = catalog.DATASETS[name]
    sizes, classes, (_, h, w) = entry.split_sizes, list(entry.classes), entry.shape
    out: dict = {"classes": classes}
    unverifiable: list[DataError] = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays = []
        for kind, ndim in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
            stem = f"{prefix}-{kind}"
            raw, path, packed = _open_idx(folder, name, stem)
            # Structure first (wrong magic / truncated say so precisely), then the published checksum.
            arrays.append(_parse_idx(raw, path, ndim))
            if (error := _check_md5(name, stem, path, raw, packed)) is not None:
                unverifiable.append(error)
        images, labels = arrays
        if len(images) != len(labels):
            raise DataError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        if len(images) != sizes[split]:
            raise DataError(f"{folder}: {split} has {len(images)} images, expected the official {sizes[split]}"
                            f" ({prefix}-* files swapped or not the official release?)")
        if labels.size and int(labels.max()) >= len(classes):
            raise DataError(f"{folder}: {split} labels go up to {int(labels.max())}, "
                            f"expected 0..{len(classes) - 1}")
        if images.shape[1:] != (h, w):
            raise DataError(f"{folder}: {split} images are {images.shape[1:]}, expected {h}x{w}")
        out[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    if unverifiable:  # after the structure of all four, which says more about a broken set
        raise unverifiable[0]
    return out


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # The official CIFAR batches are pickles of plain dicts of numpy arrays and lists; an
            # Unpickler restricted to numpy's array reconstruction refuses anything else.
            d = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any malformed pickle: UnpicklingError, EOFError, KeyError, ...
        raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR python batch (holds a {type(d).__name__}, expected a dict)")
    return d


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batches_dir(folder: Path, name: str) -> Path | None:
    sub = catalog.DATASETS[name].archive_folder
    for cand in (folder / sub, folder):
        marker = "test_batch" if name == "CIFAR10" else "test"
        if (cand / marker).is_file():
            return cand
    return None


def read_cifar(folder: Path, name: str) -> dict:
    """CIFAR-10/100 as the python pickle batches, or an image folder ``train|test/<class>/*``."""
    entry = catalog.DATASETS[name]
    batches = _cifar_batches_dir(folder, name)
    if batches is None:
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return _check_named(read_image_folder(folder), folder, name)
        raise DataError(
            f"{folder}: no CIFAR data; expected {entry.archive_folder}/"
            f" (the python batches) or train/ and test/ image folders; `imgclf data {name.lower()} --from ARCHIVE`"
            " prepares them"
        )
    if name == "CIFAR10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = "labels"
        meta = _unpickle(batches / "batches.meta") if (batches / "batches.meta").is_file() else {}
        classes = meta.get("label_names") or [str(i) for i in range(entry.n_classes)]
    else:
        files = {"train": ["train"], "test": ["test"]}
        label_key = "fine_labels"
        meta = _unpickle(batches / "meta") if (batches / "meta").is_file() else {}
        classes = meta.get("fine_label_names") or [str(i) for i in range(entry.n_classes)]
    out: dict = {"classes": list(classes)}
    for split, names in files.items():
        images, labels = [], []
        for fname in names:
            path = batches / fname
            if not path.is_file():
                raise DataError(f"{path}: missing (expected the official batches {', '.join(names)})")
            d = _unpickle(path)
            if "data" not in d or label_key not in d:
                raise DataError(f"{path}: keys {sorted(map(str, d))}, expected 'data' and '{label_key}'")
            data = np.asarray(d["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
            lab = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
            if len(lab) != len(data):
                raise DataError(f"{path}: {len(data)} images but {len(lab)} labels")
            if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
                raise DataError(f"{path}: labels {lab.min()}..{lab.max()}, expected 0..{len(classes) - 1}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(lab)
        x, y = np.concatenate(images), np.concatenate(labels)
        if len(x) != entry.split_sizes[split]:
            raise DataError(f"{batches}: {split} has {len(x)} images, expected {entry.split_sizes[split]}")
        out[split] = (torch.from_numpy(x), torch.from_numpy(y))
    return out


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _check_named(out: dict, folder: Path, name: str) -> dict:
    """An image folder standing for a named dataset must be that dataset: its image shape, its
    class count and its official split sizes (a 2-class 4x4 folder is not CIFAR-10)."""
    entry = catalog.DATASETS[name]
    if len(out["classes"]) != entry.n_classes:
        raise DataError(f"{folder}: {len(out['classes'])} class folders, but {name} has {entry.n_classes}")
    for split in ("train", "test"):
        images = out[split][0]
        if tuple(images.shape[1:]) != entry.shape:
            raise DataError(f"{folder / split}: images are {'x'.join(map(str, images.shape[1:]))}, but {name}'s "
                            f"are {'x'.join(map(str, entry.shape))}")
        if len(images) != entry.split_sizes[split]:
            raise DataError(f"{folder / split}: {len(images)} images, expected {name}'s official "
                            f"{entry.split_sizes[split]}")
    return out


@contextlib.contextmanager
def _native_stderr():
    """Collect what native decoders write to the process's stderr while images decode: libjpeg
    reports a corrupt JPEG ('Corrupt JPEG data: ...') there and still returns pixels. Yields a
    function returning what was written since its last call."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to collect
        yield lambda: ""
        return
    sink = tempfile.TemporaryFile()
    seen = 0

    def new() -> str:
        nonlocal seen
        size = os.fstat(sink.fileno()).st_size
        if size == seen:
            return ""
        sink.seek(seen)
        text = sink.read(min(size - seen, 4096)).decode(errors="replace")
        seen = size
        return text

    os.dup2(sink.fileno(), 2)
    try:
        yield new
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.close()


def read_image_folder(folder: Path) -> dict:
    """``<folder>/<split>/<class>/*.png|jpg``; classes in sorted order, files in sorted order."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders (one warning per image: 120,000 for CIFAR-10);
        # they still decode exactly, and the cache means this runs once per dataset.
        warnings.simplefilter("ignore", DeprecationWarning)
        with _native_stderr() as decoder_messages:
            return _read_image_folder(folder, decoder_messages)


def _read_image_folder(folder: Path, decoder_messages) -> dict:
    from torchvision.io import ImageReadMode, decode_image

    out: dict = {}
    classes: list[str] | None = None
    for split in ("train", "test"):
        root = folder / split
        if not root.is_dir():
            raise DataError(f"{root}: missing (expected {folder}/<train|test>/<class>/<image>)")
        split_classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not split_classes:
            raise DataError(f"{root}: no class folders")
        if classes is None:
            classes = split_classes
        elif split_classes != classes:
            raise DataError(f"{root}: classes {split_classes} differ from train's {classes}")
        images, labels = [], []
        for label, cls in enumerate(classes):
            for path in sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                try:
                    img = decode_image(str(path), mode=ImageReadMode.UNCHANGED)
                except RuntimeError as e:
                    raise DataError(f"{path}: cannot decode image ({str(e).strip().splitlines()[-1][-200:]})") from None
                warning = decoder_messages().strip()
                if warning:  # decoded, but from damaged bytes: garbage pixels must not be cached
                    raise DataError(f"{path}: corrupt image data ({warning.splitlines()[0][:120]})")
                images.append(img)
                labels.append(label)
        if not images:
            raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) != 1:
            raise DataError(f"{root}: images differ in size/channels {sorted(shapes)[:3]}; expected one shape")
        out[split] = (torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    out["classes"] = classes
    return out
