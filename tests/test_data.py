"""The dataset layer: IDX / CIFAR pickle / image-folder readers on files generated in the official
formats, the decoded-tensor cache, ``imgclf data --from ARCHIVE``, the real datasets where present,
and the device loader."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lift_published_checksums, require, shrink_official_sizes

from imgclf import catalog, cli
from imgclf.data import DataError, DeviceLoader, cache_path, load, prepare, readers
from imgclf.data.datasets import canonical_name

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder: one test's cache never answers another's load."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "cache"))


def idx_bytes(a: np.ndarray, magic_type: int = 0x08) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return bytes([0, 0, magic_type, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.tobytes()


def write_idx(path: Path, a: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(a)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_idx(folder: Path, n_train=20, n_test=8, gz=True, seed=0) -> dict:
    """The four IDX files of an MNIST-layout dataset, random content."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


@pytest.fixture
def small_idx(monkeypatch):
    """Official IDX counts shrunk to what the generated files hold, and KMNIST's published
    checksums lifted (generated files are not the release)."""
    shrink_official_sizes(monkeypatch, "idx", 20, 8)
    lift_published_checksums(monkeypatch, "KMNIST")


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 did for the official CIFAR batches: every str/bytes as a py2
    ``str`` (BINSTRING), which Python 3 reads back with ``encoding='latin1'``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        b = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj, path: Path) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The released files name numpy's pre-2.0 module path.
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(folder: Path, per_batch=10, n_test=10, seed=0) -> dict:
    """``<folder>/cifar-10-batches-py/`` as released: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    out: dict = {"train": [], "test": []}
    for fname, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        py2_pickle({"batch_label": f"{fname} of 5", "labels": y, "data": x,
                    "filenames": [f"img_{i}.png" for i in range(n)]}, d / fname)
        out["test" if fname == "test_batch" else "train"].append((x, y))
    py2_pickle({"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072}, d / "batches.meta")
    (d / "readme.html").write_text("<html></html>")
    return {k: (np.concatenate([x for x, _ in v]).reshape(-1, 3, 32, 32), np.concatenate([y for _, y in v]))
            for k, v in out.items()}


def make_cifar100(folder: Path, n_train=30, n_test=10, seed=0) -> dict:
    """``<folder>/cifar-100-python/``: train, test, meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    d = folder / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        py2_pickle({"filenames": [f"f{i}.png" for i in range(n)], "batch_label": f"{split}ing batch 1 of 1",
                    "fine_labels": fine, "coarse_labels": coarse, "data": x}, d / split)
        out[split] = (x.reshape(-1, 3, 32, 32), np.asarray(fine))
    fine_names = [f"fine{i:02d}" for i in range(100)]
    py2_pickle({"fine_label_names": fine_names, "coarse_label_names": [f"coarse{i}" for i in range(20)]}, d / "meta")
    out["classes"] = fine_names
    return out


@pytest.fixture
def small_cifar(monkeypatch):
    shrink_official_sizes(monkeypatch, "cifar", 50, 10)


def make_image_folder(root: Path, classes=("cat", "ant", "bee"), n=(3, 2), size=8, channels=3, fmt="png",
                      seed=0) -> dict:
    """``<root>/{train,test}/<class>/NNNN.<fmt>``; returns the written pixels per split and class."""
    from torchvision.io import write_jpeg, write_png

    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    for split, count in zip(("train", "test"), n):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=g)
                path = root / split / cls / f"{i:04d}.{fmt}"
                with warnings.catch_warnings():  # torchvision 0.29 deprecates its encoders, per image
                    warnings.simplefilter("ignore", DeprecationWarning)
                    (write_png if fmt == "png" else write_jpeg)(img, str(path))
                out.setdefault(split, {}).setdefault(cls, []).append(img)
    return out


def make_tgz(path: Path, src: Path, arcname: str, extra=()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=arcname)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def data_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["data", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_reads_generated_kmnist(tmp_path, small_idx, gz):
    ref = make_idx(tmp_path / "kmnist", gz=gz)
    out = readers.read_idx(tmp_path / "kmnist", "KMNIST")
    assert out["classes"] == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    for split, n in (("train", 20), ("test", 8)):
        x, y = out[split]
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8 and x.is_contiguous()
        assert y.shape == (n,) and y.dtype == torch.int64
        assert torch.equal(x[:, 0], torch.from_numpy(ref[split][0]))
        assert torch.equal(y, torch.from_numpy(ref[split][1].astype(np.int64)))


def test_idx_mixed_gzip_and_plain_through_load(tmp_path, small_idx):
    ref = make_idx(tmp_path / "kmnist", gz=True)
    f = tmp_path / "kmnist" / "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "kmnist" / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(f.read_bytes()))
    f.unlink()
    d = load("kmnist", root=tmp_path)  # alias, folder under the root
    assert d.name == "KMNIST" and d.n_channels == 1 and d.image_size == 28 and d.n_classes == 10
    assert torch.equal(d.test_labels, torch.from_numpy(ref["test"][1].astype(np.int64)))
    x = ref["train"][0].astype(np.float64) / 255
    assert d.mean == pytest.approx([x.mean()], abs=1e-12)
    assert d.std == pytest.approx([x.std(ddof=1)], abs=1e-12)


def test_idx_truncated_plain_and_gzip(tmp_path, small_idx):
    make_idx(tmp_path / "a", gz=False)
    f = tmp_path / "a" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="does not match its header.*; the file is truncated") as e:
        readers.read_idx(tmp_path / "a", "KMNIST")
    assert str(f) in str(e.value)

    make_idx(tmp_path / "b", gz=True)
    f = tmp_path / "b" / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(DataError, match="cannot decompress.*; the file is truncated or corrupt") as e:
        readers.read_idx(tmp_path / "b", "KMNIST")
    assert str(f) in str(e.value)

    # Only the header's first bytes.
    make_idx(tmp_path / "c", gz=False)
    f = tmp_path / "c" / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:6])
    with pytest.raises(DataError, match="size 6 bytes does not match.*; the file is truncated"):
        readers.read_idx(tmp_path / "c", "KMNIST")


def test_idx_truncated_mnist_says_truncated_not_md5(tmp_path):
    """A cut-off MNIST download is reported as truncated (the structural check runs before the MD5)."""
    make_idx(tmp_path, gz=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-10]))
    with pytest.raises(DataError, match="does not match its header.*; the file is truncated") as e:
        readers.read_idx(tmp_path, "MNIST")
    assert str(f) in str(e.value)


@pytest.mark.parametrize("where", ["deflate", "crc"])
def test_idx_corrupt_gzip(tmp_path, small_idx, where):
    make_idx(tmp_path, gz=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(f.read_bytes())
    if where == "deflate":  # the block header right after the 10-byte gzip header: zlib.error
        raw[10:13] = b"\xff\xff\xff"
    else:  # the trailer's CRC32: gzip.BadGzipFile
        raw[-8] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot decompress") as e:
        readers.read_idx(tmp_path, "KMNIST")
    assert str(f) in str(e.value)


@pytest.mark.parametrize("case", ["swapped", "float", "garbage"])
def test_idx_wrong_magic(tmp_path, small_idx, case):
    make_idx(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    if case == "swapped":  # a labels file (1 dimension) where the images belong
        f.write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes())
    elif case == "float":  # dtype byte 0x0D: float32
        f.write_bytes(idx_bytes(np.zeros((20, 28, 28)), magic_type=0x0D))
    else:
        f.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataError, match="not an IDX file") as e:
        readers.read_idx(tmp_path, "KMNIST")
    assert str(f) in str(e.value)


def test_idx_missing_file_and_folder(tmp_path, small_idx):
    make_idx(tmp_path / "kmnist", gz=True)
    (tmp_path / "kmnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\].*four IDX files"):
        readers.read_idx(tmp_path / "kmnist", "KMNIST")
    with pytest.raises(DataError, match="dataset folder for KMNIST not found.*IMGCLF_DATA_ROOT"):
        load("KMNIST", root=tmp_path / "elsewhere")
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load("svhn", root=tmp_path)


@pytest.mark.parametrize("name, want", [("MNIST", "6bbc9ace898e44ae57da46a324031adb"),
                                        ("FashionMNIST", "f4a8712d7a061bf5bd6d2ca38dc4d50a")])
def test_idx_md5_mismatch_names_published(tmp_path, name, want):
    make_idx(tmp_path, gz=True)
    with pytest.raises(DataError, match=f"published {want}") as e:
        readers.read_idx(tmp_path, name)
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_idx_counts_and_shapes_checked(tmp_path, monkeypatch):
    lift_published_checksums(monkeypatch, "KMNIST")  # generated files: no published checksum applies
    make_idx(tmp_path / "a")
    # Official counts (60000/10000) unless the files are the official release.
    with pytest.raises(DataError, match="train has 20 images, expected the official 60000"):
        readers.read_idx(tmp_path / "a", "KMNIST")
    shrink_official_sizes(monkeypatch, "idx", 20, 8)
    # Train and test swapped: caught by the counts.
    a = tmp_path / "a"
    for kind in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        (a / f"train-{kind}").rename(a / "tmp")
        (a / f"t10k-{kind}").rename(a / f"train-{kind}")
        (a / "tmp").rename(a / f"t10k-{kind}")
    with pytest.raises(DataError, match="train has 8 images, expected the official 20"):
        readers.read_idx(a, "KMNIST")

    make_idx(tmp_path / "b")
    write_idx(tmp_path / "b" / "train-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=True)
    with pytest.raises(DataError, match="20 images but 19 labels"):
        readers.read_idx(tmp_path / "b", "KMNIST")

    make_idx(tmp_path / "c")
    write_idx(tmp_path / "c" / "t10k-images-idx3-ubyte", np.zeros((8, 32, 32), np.uint8), gz=True)
    with pytest.raises(DataError, match="expected 28x28"):
        readers.read_idx(tmp_path / "c", "KMNIST")

    make_idx(tmp_path / "d")
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.full(8, 10, np.uint8), gz=True)
    with pytest.raises(DataError, match="labels go up to 10"):
        readers.read_idx(tmp_path / "d", "KMNIST")


# ----------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_batches(tmp_path, small_cifar):
    ref = make_cifar10(tmp_path / "cifar10")
    d = load("CIFAR10", root=tmp_path)
    assert d.classes == CIFAR10_CLASSES
    assert d.train_images.shape == (50, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10, 3, 32, 32) and d.train_labels.dtype == torch.int64
    # data_batch_1..5 in order, rows as R plane, G plane, B plane.
    assert torch.equal(d.train_images, torch.from_numpy(ref["train"][0]))
    assert torch.equal(d.train_labels, torch.from_numpy(ref["train"][1]))
    assert torch.equal(d.test_images, torch.from_numpy(ref["test"][0]))
    assert torch.equal(d.test_labels, torch.from_numpy(ref["test"][1]))
    # The batches directly in the dataset folder are found too.
    out = readers.read_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", "CIFAR10")
    assert torch.equal(out["train"][0], d.train_images)


def test_cifar100_batches_use_fine_labels(tmp_path, small_cifar, monkeypatch):
    monkeypatch.setitem(catalog.DATASETS["CIFAR100"].split_sizes, "train", 30)
    ref = make_cifar100(tmp_path / "cifar100")
    d = load("cifar100", root=tmp_path)
    assert d.classes == ref["classes"] and d.n_classes == 100
    assert d.train_images.shape == (30, 3, 32, 32) and d.test_images.shape == (10, 3, 32, 32)
    assert torch.equal(d.train_images, torch.from_numpy(ref["train"][0]))
    assert torch.equal(d.train_labels, torch.from_numpy(ref["train"][1]))
    assert torch.equal(d.test_labels, torch.from_numpy(ref["test"][1]))


def test_cifar_official_counts_required(tmp_path):
    make_cifar10(tmp_path)
    with pytest.raises(DataError, match="train has 50 images, expected 50000"):
        readers.read_cifar(tmp_path, "CIFAR10")
    make_cifar100(tmp_path)
    with pytest.raises(DataError, match="train has 30 images, expected 50000"):
        readers.read_cifar(tmp_path, "CIFAR100")


class _Evil:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("where", ["batch", "meta", "inside_array"])
def test_cifar_malicious_pickle_refused(tmp_path, small_cifar, where):
    make_cifar10(tmp_path)
    sentinel = tmp_path / "pwned"
    d = tmp_path / "cifar-10-batches-py"
    if where == "batch":
        payload = {"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 10, "x": _Evil(sentinel)}
        target = d / "test_batch"
    elif where == "meta":
        payload = {"label_names": _Evil(sentinel)}
        target = d / "batches.meta"
    else:  # an object array whose element reduces to os.system
        arr = np.empty(1, dtype=object)
        arr[0] = _Evil(sentinel)
        payload = {"data": arr, "labels": [0]}
        target = d / "data_batch_3"
    target.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load (posix|os|nt)\.system") as e:
        readers.read_cifar(tmp_path, "CIFAR10")
    assert str(target) in str(e.value)
    assert not sentinel.exists()


def test_cifar_damaged_batches(tmp_path, small_cifar):
    make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: missing"):
        readers.read_cifar(tmp_path, "CIFAR10")

    make_cifar10(tmp_path)
    (d / "data_batch_2").write_bytes((d / "data_batch_2").read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_2: not a CIFAR python batch"):
        readers.read_cifar(tmp_path, "CIFAR10")

    make_cifar10(tmp_path)
    py2_pickle({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 9}, d / "data_batch_4")
    with pytest.raises(DataError, match="data_batch_4: 10 images but 9 labels"):
        readers.read_cifar(tmp_path, "CIFAR10")

    make_cifar10(tmp_path)
    py2_pickle({"data": np.zeros((10, 3072), np.uint8)}, d / "data_batch_4")
    with pytest.raises(DataError, match="data_batch_4: keys.*expected 'data' and 'labels'"):
        readers.read_cifar(tmp_path, "CIFAR10")

    make_cifar10(tmp_path)
    py2_pickle({"data": np.zeros((10, 1024), np.uint8), "labels": [0] * 10}, d / "test_batch")
    with pytest.raises(DataError, match=r"test_batch: data has shape \(10, 1024\)"):
        readers.read_cifar(tmp_path, "CIFAR10")

    make_cifar10(tmp_path)
    py2_pickle({"data": np.zeros((10, 3072), np.uint8), "labels": [10] * 10}, d / "test_batch")
    with pytest.raises(DataError, match="test_batch: labels 10..10, expected 0..9"):
        readers.read_cifar(tmp_path, "CIFAR10")

    make_cifar10(tmp_path)
    py2_pickle([1, 2, 3], d / "test_batch")
    with pytest.raises(DataError, match="holds a list, expected a dict"):
        readers.read_cifar(tmp_path, "CIFAR10")


def test_cifar_nothing_there(tmp_path):
    (tmp_path / "cifar100").mkdir()
    with pytest.raises(DataError, match=r"no CIFAR data; expected cifar-100-python/.*imgclf data cifar100 --from"):
        load("CIFAR100", root=tmp_path)


# ----------------------------------------------------------------------------- image folders


def test_image_folder(tmp_path):
    ref = make_image_folder(tmp_path, classes=("cat", "ant", "bee"), n=(3, 2))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    out = readers.read_image_folder(tmp_path)
    assert out["classes"] == ["ant", "bee", "cat"]
    x, y = out["train"]
    assert x.shape == (9, 3, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(x, torch.stack([*ref["train"]["ant"], *ref["train"]["bee"], *ref["train"]["cat"]]))
    assert out["test"][0].shape == (6, 3, 8, 8) and out["test"][1].tolist() == [0, 0, 1, 1, 2, 2]
    # The CIFAR reader falls back to the image-folder layout, which must then be CIFAR-10's
    # (test_cli_data_from_jpeg_copy_archive reads one that is).
    with pytest.raises(DataError, match="3 class folders, but CIFAR10 has 10"):
        load("CIFAR10", folder=tmp_path)


def test_image_folder_grey_and_jpeg(tmp_path):
    make_image_folder(tmp_path / "g", channels=1, n=(2, 1))
    x, _ = readers.read_image_folder(tmp_path / "g")["train"]
    assert x.shape == (6, 1, 8, 8)
    ref = make_image_folder(tmp_path / "j", fmt="jpg", size=16, n=(2, 1))
    x, _ = readers.read_image_folder(tmp_path / "j")["train"]
    assert x.shape == (6, 3, 16, 16)
    # Lossy: close to, not equal with, the written pixels.
    diff = (x.float() - torch.stack([*ref["train"]["ant"], *ref["train"]["bee"], *ref["train"]["cat"]]).float())
    assert 0 < diff.abs().mean() < 80


def test_image_folder_errors(tmp_path):
    make_image_folder(tmp_path / "a")
    (tmp_path / "a" / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=r"classes \['ant', 'bee', 'cat', 'dog'\] differ from train's"):
        readers.read_image_folder(tmp_path / "a")

    make_image_folder(tmp_path / "b")
    bad = tmp_path / "b" / "train" / "bee" / "0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="cannot decode image") as e:
        readers.read_image_folder(tmp_path / "b")
    assert str(bad) in str(e.value)

    make_image_folder(tmp_path / "c")
    make_image_folder(tmp_path / "c", classes=("ant",), n=(1, 1), size=10, seed=1)  # overwrites 0000.png
    with pytest.raises(DataError, match="differ in size"):
        readers.read_image_folder(tmp_path / "c")

    (tmp_path / "d" / "train" / "x").mkdir(parents=True)
    (tmp_path / "d" / "test" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        readers.read_image_folder(tmp_path / "d")

    (tmp_path / "e" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        readers.read_image_folder(tmp_path / "e")
    with pytest.raises(DataError, match="train: missing"):
        readers.read_image_folder(tmp_path / "nothing")


# ----------------------------------------------------------------------------- cache


def _touch_later(path: Path, seconds: float = 2.0) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def test_cache_is_read_on_second_load(tmp_path, small_idx, monkeypatch):
    make_idx(tmp_path / "kmnist")
    first = load("KMNIST", root=tmp_path)
    assert cache_path("KMNIST").is_file()
    assert cache_path("KMNIST").parent == tmp_path / "cache"

    def boom(*a, **k):
        raise AssertionError("source files read although the cache is valid")

    monkeypatch.setattr(readers, "read_idx", boom)
    second = load("KMNIST", root=tmp_path)
    for k in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, k), getattr(second, k))
    assert (second.classes, second.mean, second.std) == (first.classes, first.mean, first.std)
    # use_cache=False always reads the sources.
    with pytest.raises(AssertionError, match="source files read"):
        load("KMNIST", root=tmp_path, use_cache=False)


def test_cache_invalidated_by_modified_source(tmp_path, small_idx):
    folder = tmp_path / "kmnist"
    make_idx(folder, seed=0, gz=False)
    first = load("KMNIST", root=tmp_path)
    # Same size, other bytes, later mtime: rebuilt.
    f = folder / "t10k-labels-idx1-ubyte"
    size = f.stat().st_size
    new_labels = (first.test_labels.numpy() + 1) % 10
    write_idx(f, new_labels.astype(np.uint8), gz=False)
    assert f.stat().st_size == size
    _touch_later(f)
    assert torch.equal(load("KMNIST", root=tmp_path).test_labels, torch.from_numpy(new_labels))
    # A file added or removed changes the fingerprint too.
    f.unlink()
    with pytest.raises(DataError, match="missing t10k-labels"):
        load("KMNIST", root=tmp_path)


def test_cache_distinguishes_folders(tmp_path, small_idx):
    """Two folders with the same file names, sizes and mtimes hold different data: the cache
    (keyed by dataset name) must not answer one with the other."""
    ref_a = make_idx(tmp_path / "a" / "kmnist", seed=1, gz=False)
    ref_b = make_idx(tmp_path / "b" / "kmnist", seed=2, gz=False)
    for fa in (tmp_path / "a" / "kmnist").iterdir():
        st = fa.stat()
        os.utime(tmp_path / "b" / "kmnist" / fa.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert torch.equal(load("KMNIST", root=tmp_path / "a").train_images[:, 0], torch.from_numpy(ref_a["train"][0]))
    assert torch.equal(load("KMNIST", root=tmp_path / "b").train_images[:, 0], torch.from_numpy(ref_b["train"][0]))


def test_cache_serves_when_sources_are_gone(tmp_path, small_idx, monkeypatch):
    """A node without the data root (the folder is absent) still trains from the cache."""
    import shutil

    make_idx(tmp_path / "kmnist")
    first = load("KMNIST", root=tmp_path)
    shutil.rmtree(tmp_path / "kmnist")
    assert torch.equal(load("KMNIST", root=tmp_path).train_images, first.train_images)
    # ... but with use_cache=False the missing folder is an error.
    with pytest.raises(DataError, match="not found"):
        load("KMNIST", root=tmp_path, use_cache=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "old_version", "not_a_dict"])
def test_corrupted_cache_is_rebuilt(tmp_path, small_idx, damage):
    make_idx(tmp_path / "kmnist")
    first = load("KMNIST", root=tmp_path)
    cache = cache_path("KMNIST")
    blob = cache.read_bytes()
    if damage == "garbage":
        cache.write_bytes(os.urandom(1000))
    elif damage == "truncated":
        cache.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "old_version":
        b = torch.load(cache, weights_only=True)
        b["version"] = -1
        b["train_labels"] = torch.zeros_like(b["train_labels"])
        torch.save(b, cache)
    else:
        torch.save([1, 2, 3], cache)
    again = load("KMNIST", root=tmp_path)
    assert torch.equal(again.train_images, first.train_images)
    assert torch.equal(again.train_labels, first.train_labels)
    rebuilt = torch.load(cache, weights_only=True)  # rewritten, valid
    assert torch.equal(rebuilt["train_labels"], first.train_labels)
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


def test_digits_builtin():
    d = load("digits")
    assert d.train_images.shape[1:] == (1, 8, 8) and len(d.train_labels) + len(d.test_labels) == 1797
    assert load("digits").classes == [str(i) for i in range(10)]


# ----------------------------------------------------------------------------- imgclf data --from


def test_cli_data_from_jpeg_copy_archive(tmp_path, capsys, small_cifar):
    src = tmp_path / "src"
    make_image_folder(src / "cifar10", classes=CIFAR10_CLASSES, n=(5, 1), size=32, fmt="jpg")
    (src / "cifar10" / "README.md").write_text("copy of CIFAR-10")
    tgz = make_tgz(tmp_path / "cifar10_jpg.tgz", src / "cifar10", "cifar10")
    root = tmp_path / "root"
    rc, out, err = data_cli(capsys, "cifar10", "--root", root, "--from", tgz)
    assert rc == 0, err
    assert out.strip() == (f"CIFAR10: 50 train + 10 test images, 3x32x32, 10 classes; cached at "
                           f"{tmp_path / 'cache' / 'cifar10.pt'}")
    assert sorted(p.name for p in (root / "cifar10" / "train").iterdir()) == sorted(CIFAR10_CLASSES)
    assert not [p for p in root.iterdir() if p.name.startswith(".unpack-")]  # staging cleaned up
    d = load("CIFAR10", root=root)
    assert d.classes == sorted(CIFAR10_CLASSES)
    assert d.train_labels.tolist() == [k for k in range(10) for _ in range(5)]
    # Preparing again from the same archive is idempotent.
    assert data_cli(capsys, "cifar10", "--root", root, "--from", tgz)[0] == 0
    # A folder works as a source too (one holding cifar10/, or train/ + test/ directly).
    assert data_cli(capsys, "cifar10", "--root", tmp_path / "root2", "--from", src)[0] == 0
    assert (tmp_path / "root2" / "cifar10" / "test" / "cat" / "0000.jpg").is_file()


def test_cli_data_from_official_cifar10_archive(tmp_path, capsys, small_cifar):
    ref = make_cifar10(tmp_path / "src")
    tgz = make_tgz(tmp_path / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py",
                   "cifar-10-batches-py")
    root = tmp_path / "root"
    rc, out, err = data_cli(capsys, "cifar10", "--root", root, "--from", tgz)
    assert rc == 0, err
    assert out.startswith("CIFAR10: 50 train + 10 test images, 3x32x32, 10 classes")
    assert (root / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar10"]
    assert torch.equal(load("CIFAR10", root=root).train_images, torch.from_numpy(ref["train"][0]))


def test_cli_data_from_official_cifar100_archive(tmp_path, capsys, small_cifar, monkeypatch):
    monkeypatch.setitem(catalog.DATASETS["CIFAR100"].split_sizes, "train", 30)
    ref = make_cifar100(tmp_path / "src")
    tgz = make_tgz(tmp_path / "cifar-100-python.tar.gz", tmp_path / "src" / "cifar-100-python", "cifar-100-python")
    rc, out, err = data_cli(capsys, "cifar100", "--root", tmp_path / "root", "--from", tgz)
    assert rc == 0, err
    assert out.startswith("CIFAR100: 30 train + 10 test images, 3x32x32, 100 classes")
    assert torch.equal(load("CIFAR100", root=tmp_path / "root").test_labels, torch.from_numpy(ref["test"][1]))


def test_prepare_batches_at_archive_top_level(tmp_path, small_cifar):
    """Batches without their folder in the archive land in <root>/cifar10/cifar-10-batches-py/, and
    nothing else of the root is copied (it used to copy the root's parent into the target)."""
    make_cifar10(tmp_path / "src")
    tgz = make_tgz(tmp_path / "flat.tgz", tmp_path / "src" / "cifar-10-batches-py", ".")
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    d = prepare("cifar10", root=root, source=tgz)
    assert len(d.train_labels) == 50
    assert sorted(p.name for p in root.iterdir()) == ["cifar10", "mnist"]
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["cifar-10-batches-py"]


def test_cli_data_absolute_member_neutralised(tmp_path, capsys, small_cifar):
    src = tmp_path / "src"
    make_image_folder(src / "cifar10", classes=CIFAR10_CLASSES, n=(5, 1), size=32)
    outside = tmp_path / "outside" / "evil.txt"
    info = tarfile.TarInfo(str(outside))  # an absolute member name
    info.size = 4
    tgz = make_tgz(tmp_path / "abs.tgz", src / "cifar10", "cifar10", extra=[(info, b"evil")])
    with tarfile.open(tgz) as t:
        assert str(outside) in t.getnames()
    rc, _, err = data_cli(capsys, "cifar10", "--root", tmp_path / "root", "--from", tgz)
    assert rc == 0, err
    assert not outside.exists()
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["cifar10"]


@pytest.mark.parametrize("kind", ["dotdot", "symlink_out", "hardlink_out"])
def test_cli_data_escaping_member_refused(tmp_path, capsys, kind):
    src = tmp_path / "src"
    make_image_folder(src / "cifar10", n=(1, 1), size=4)
    root = tmp_path / "root"
    root.mkdir()
    if kind == "dotdot":
        info = tarfile.TarInfo("cifar10/../../evil.txt")
        info.size, data = 4, b"evil"
    else:
        info = tarfile.TarInfo("cifar10/train/ant/link.png")
        info.type = tarfile.SYMTYPE if kind == "symlink_out" else tarfile.LNKTYPE
        info.linkname, data = "/etc/passwd" if kind == "symlink_out" else "../../../../etc/passwd", None
    tgz = make_tgz(tmp_path / "bad.tgz", src / "cifar10", "cifar10", extra=[(info, data)])
    rc, out, err = data_cli(capsys, "cifar10", "--root", root, "--from", tgz)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot unpack" in err and str(tgz) in err
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert list(root.iterdir()) == []  # nothing unpacked, staging removed


def test_cli_data_bad_sources(tmp_path, capsys):
    not_archive = tmp_path / "cifar-10-python.tar.gz"
    not_archive.write_text("this is not an archive\n")
    rc, out, err = data_cli(capsys, "cifar10", "--root", tmp_path / "root", "--from", not_archive)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("imgclf data: error: ") and "not a tar archive" in err

    rc, _, err = data_cli(capsys, "cifar10", "--root", tmp_path / "root", "--from", tmp_path / "nope.tgz")
    assert rc == 2 and err.count("\n") == 1 and "not found" in err

    # A truncated archive: a one-line error, not a traceback.
    src = tmp_path / "src"
    make_image_folder(src / "cifar10", n=(20, 5), size=32)
    tgz = make_tgz(tmp_path / "cut.tgz", src / "cifar10", "cifar10")
    tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    rc, _, err = data_cli(capsys, "cifar10", "--root", tmp_path / "root2", "--from", tgz)
    assert rc == 2 and err.count("\n") == 1 and "cannot unpack" in err

    # A valid tar without CIFAR data.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("a")
    tgz = make_tgz(tmp_path / "junk.tgz", tmp_path / "junk", "junk")
    rc, _, err = data_cli(capsys, "cifar10", "--root", tmp_path / "root3", "--from", tgz)
    assert rc == 2 and "holds neither CIFAR python batches nor train/ and test/" in err

    rc, _, err = data_cli(capsys, "svhn", "--root", tmp_path / "root")
    assert rc == 2 and "unknown dataset 'svhn'" in err


# ----------------------------------------------------------------------------- real data


MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize("name, folder", [("MNIST", "mnist"), ("FashionMNIST", "fashion_mnist")])
def test_real_idx_datasets(data_root, name, folder):
    require((data_root / folder).is_dir(), f"{data_root / folder} not present")
    for f in sorted((data_root / folder).iterdir()):
        stem = f.name.removesuffix(".gz")
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        assert hashlib.md5(raw).hexdigest() == catalog.DATASETS[name].md5[stem]
    d = load(name, root=data_root)
    assert d.train_images.shape == (60000, 1, 28, 28) and d.test_images.shape == (10000, 1, 28, 28)
    assert d.train_images.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
    counts = torch.bincount(d.train_labels, minlength=10).tolist()
    if name == "MNIST":
        assert counts == MNIST_TRAIN_COUNTS
        assert d.mean == pytest.approx([0.1307], abs=1e-4) and d.std == pytest.approx([0.3081], abs=1e-4)
    else:
        assert counts == [6000] * 10 and torch.bincount(d.test_labels).tolist() == [1000] * 10
        assert d.classes[0] == "T-shirt/top" and d.classes[-1] == "Ankle boot"
        assert d.mean == pytest.approx([0.2860], abs=1e-4) and d.std == pytest.approx([0.3530], abs=1e-4)


@pytest.mark.slow
def test_real_cifar10_jpeg_archive(data_root, tmp_path, capsys):
    tgz = data_root / "cifar10_jpg" / "cifar10_jpg.tgz"
    require(tgz.is_file(), f"{tgz} not present")
    t0 = time.perf_counter()
    rc, out, err = data_cli(capsys, "cifar10", "--root", tmp_path / "root", "--from", tgz)
    seconds = time.perf_counter() - t0
    assert rc == 0, err
    print(f"\nimgclf data cifar10 --from {tgz.name}: {seconds:.1f} s; {out.strip()}")
    d = load("CIFAR10", root=tmp_path / "root")  # from the cache just written
    assert d.classes == CIFAR10_CLASSES
    assert d.train_images.shape == (50000, 3, 32, 32) and d.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(d.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(d.test_labels, minlength=10).tolist() == [1000] * 10
    assert d.mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.01)
    assert d.std == pytest.approx([0.2470, 0.2435, 0.2616], abs=0.01)


# ----------------------------------------------------------------------------- DeviceLoader


def _loader(n=23, batch=4, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n, dtype=torch.int64) * 10
    return DeviceLoader(images, labels, batch, **{"shuffle": True, "drop_last": False, **kw})


def _ids(batches):
    out = []
    for _, x, y in batches:
        assert torch.equal(y, x[:, 0, 0, 0].long() * 10)  # images and labels stay paired
        out.append(x[:, 0, 0, 0].long().tolist())
    return out


def test_loader_every_sample_once():
    ld = _loader(n=23, batch=4)
    assert len(ld) == 6
    for epoch in range(3):
        ids = _ids(ld.batches(epoch))
        assert [len(b) for b in ids] == [4, 4, 4, 4, 4, 3]
        assert sorted(sum(ids, [])) == list(range(23))
    ld = _loader(n=23, batch=4, drop_last=True)
    assert len(ld) == 5
    ids = _ids(ld.batches(0))
    flat = sum(ids, [])
    assert [len(b) for b in ids] == [4] * 5 and len(set(flat)) == 20
    # Unshuffled: in order.
    assert sum(_ids(_loader(n=10, batch=3, shuffle=False).batches(5)), []) == list(range(10))


def test_loader_order_depends_on_seed_and_epoch_only():
    a, b = _loader(seed=3), _loader(seed=3)
    torch.manual_seed(123)
    first = _ids(a.batches(1))
    torch.manual_seed(456)
    torch.rand(10)
    assert _ids(b.batches(1)) == first
    assert _ids(a.batches(1)) == first  # replaying an epoch
    assert _ids(a.batches(2)) != first
    assert _ids(_loader(seed=4).batches(1)) != first
    assert torch.equal(a.order(7), b.order(7))


def test_loader_mid_epoch_start():
    ld = _loader(n=23, batch=4, seed=1)
    full = list(ld.batches(2))
    for start in range(len(ld) + 1):
        rest = list(ld.batches(2, start=start))
        assert [s for s, *_ in rest] == list(range(start, len(ld)))
        assert _ids(rest) == _ids(full[start:])


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_ranks_interleave_to_single_process(drop_last):
    single = _loader(n=23, batch=4, seed=5, drop_last=drop_last)
    ranks = [_loader(n=23, batch=4, seed=5, drop_last=drop_last, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for epoch in (0, 1):
        want = _ids(single.batches(epoch))
        got0, got1 = (_ids(r.batches(epoch)) for r in ranks)
        for w, g0, g1 in zip(want, got0, got1, strict=True):
            assert w[0::2] == g0 and w[1::2] == g1
        # Resuming mid-epoch on every rank gives the same shards.
        assert _ids(ranks[1].batches(epoch, start=3)) == got1[3:]


def test_loader_rejects_bad_sharding():
    with pytest.raises(ValueError, match="batch_size 5 is not divisible by the world size 2"):
        _loader(batch=5, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        _loader(batch=4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="batch_size 0"):
        _loader(batch=0)


def test_every_catalog_dataset_is_known_by_name_and_alias():
    assert [canonical_name(n.lower()) for n in catalog.DATASETS] == list(catalog.DATASETS)
    assert canonical_name("fashion-mnist") == canonical_name("FASHION_MNIST") == "FashionMNIST"
    with pytest.raises(DataError, match="unknown dataset 'svhn'; known: digits, MNIST, FashionMNIST, KMNIST, "
                                        "CIFAR10, CIFAR100"):
        canonical_name("svhn")


def test_digits_match_their_catalog_entry():
    """The catalog's facts are what the reader delivers: planning refuses rows by them."""
    entry = catalog.DATASETS["digits"]
    d = load("digits")
    assert (len(d.train_labels), len(d.test_labels)) == (entry.split_sizes["train"], entry.split_sizes["test"])
    assert tuple(d.train_images.shape[1:]) == entry.shape and d.n_classes == entry.n_classes == 10
    assert d.normalization == (d.mean, d.std)  # no published constants: the measured statistics
