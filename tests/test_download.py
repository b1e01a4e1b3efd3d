"""Downloading the official releases (torchvision's downloaders), without a network."""
import gzip

import pytest
import torchvision.datasets as tvd
from conftest import lift_published_checksums

from imgclf.data import DataError, datasets


def test_offline_download_fails_with_one_line_naming_the_folder(tmp_path, monkeypatch):
    def offline(self, *a, **k):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tvd.KMNIST, "download", offline)
    monkeypatch.setattr(tvd.KMNIST, "_check_exists", lambda self: False)
    with pytest.raises(DataError, match=r"kmnist: KMNIST is not there and could not be downloaded "
                                        r"\(Temporary failure in name resolution\)"):
        datasets.prepare("kmnist", root=tmp_path, download=True)
    assert not (tmp_path / "kmnist").exists()


def test_downloaded_idx_files_land_in_our_layout(tmp_path, monkeypatch):
    """torchvision keeps raw files under <root>/KMNIST/raw; they move to <data_root>/kmnist/."""

    def fake_init(self, root, train=True, download=False):
        raw = tmp_path / "seen"
        raw.write_text(str(root))
        from pathlib import Path

        d = Path(root) / "KMNIST" / "raw"
        d.mkdir(parents=True, exist_ok=True)
        for prefix, n in (("train", 60000), ("t10k", 10000)):
            (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n)))
            (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
                bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(n * 784)))

    monkeypatch.setattr(tvd.KMNIST, "__init__", fake_init)
    # The fake files are not the release: KMNIST's published checksums are lifted for them.
    lift_published_checksums(monkeypatch, "KMNIST")
    data = datasets.prepare("kmnist", root=tmp_path / "root", download=True)
    assert sorted(p.name for p in (tmp_path / "root" / "kmnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz"]
    assert data.train_images.shape == (60000, 1, 28, 28) and data.classes[1] == "ki"
    assert not list((tmp_path / "root").glob(".download-*"))  # staging removed
