"""Data against the reference: normalisation constants and transform order, per dataset.

The reference normalizes with fixed constants per dataset (not with statistics measured on the
data), in float64 on each image after the crop and flip and before Cutout / Random Erasing /
Dual-Cutout; imgclf must do the same on its batched tensors.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from imgclf.augment.pipeline import EvalTransform, TrainTransform
from imgclf.config import build as build_config
from imgclf.data.datasets import Data

from oracle import reference_config

REFERENCE_DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100")
# The reference's training transform order (its create_cifar_transform); each row uses a subsequence.
ORDER = ("RandomCrop", "RandomHorizontalFlip", "Normalize", "Cutout", "RandomErasing", "DualCutout", "ToTensor")
SHAPES = {"MNIST": (1, 28), "FashionMNIST": (1, 28), "KMNIST": (1, 28), "CIFAR10": (3, 32), "CIFAR100": (3, 32)}


def _data(name: str) -> Data:
    c, s = SHAPES[name]
    x = torch.zeros(2, c, s, s, dtype=torch.uint8)
    y = torch.zeros(2, dtype=torch.int64)
    return Data(name, x, y, x, y, ["a"], [0.25] * c, [0.5] * c)  # measured stats that must NOT be used


def _ref_cfg(ref, name: str, aug: dict | None = None):
    return reference_config(ref, "cifar/resnet_preact.yaml", {"dataset.name": name} | (aug or {}))


def _images(name: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    c, s = SHAPES[name]
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pil(image: torch.Tensor) -> PIL.Image.Image:
    a = image.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def _reference_batch(transform, images: torch.Tensor) -> torch.Tensor:
    return torch.stack([transform(_pil(im)) for im in images])


def _ours(name: str, overrides: dict) -> TrainTransform:
    cfg = build_config(None, {"dataset.name": name} | overrides)
    c, s = SHAPES[name]
    return TrainTransform(cfg.augmentation, *_data(name).normalization, 10, s, torch.device("cpu"))


@pytest.mark.parametrize("name", REFERENCE_DATASETS)
def test_normalization_constants_are_the_reference_s(ref, name):
    from pytorch_image_classification.transforms import _get_dataset_stats

    mean, std = _get_dataset_stats(_ref_cfg(ref, name))
    assert _data(name).normalization == (list(mean), list(std))


@pytest.mark.parametrize("name", REFERENCE_DATASETS)
def test_eval_transform_equals_the_reference_s(ref, name):
    images = _images(name)
    want = _reference_batch(ref.create_transform(_ref_cfg(ref, name), is_train=False), images)
    got = EvalTransform(*_data(name).normalization, torch.device("cpu"))(images)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def _table_augmentations() -> list[tuple[str, tuple[str, ...]]]:
    from oracle import REPO
    from imgclf.tables.plan import Plan

    seen = set()
    for run in Plan.from_dir(REPO / "config" / "tables", REPO / "config" / "recipes").runs.values():
        a = run.config["augmentation"]
        if run.config["dataset"]["name"] in REFERENCE_DATASETS:
            seen.add((run.config["dataset"]["name"], tuple(sorted(k for k, v in a.items()
                                                                 if k.startswith("use_") and v is True))))
    return sorted(seen)


TABLE_AUGMENTATIONS = _table_augmentations()


@pytest.mark.parametrize("name,flags", TABLE_AUGMENTATIONS, ids=[f"{n}-{'+'.join(f)}" for n, f in TABLE_AUGMENTATIONS])
def test_every_table_row_s_reference_transform_runs_in_the_order_imgclf_implements(ref, name, flags):
    """The reference's per-sample transforms for each row's switches are ORDER's subsequence, the
    order imgclf's TrainTransform applies (checked by effect in the tests below)."""
    switches = {f"augmentation.{k}": k in flags for k in ("use_random_crop", "use_random_horizontal_flip",
                                                           "use_cutout", "use_random_erasing", "use_dual_cutout")}
    got = [type(t).__name__ for t in ref.create_transform(_ref_cfg(ref, name, switches), is_train=True).transforms]
    assert got == [t for t in ORDER if t in got]
    assert ("RandomCrop" in got) == ("use_random_crop" in flags)
    assert ("Cutout" in got) == ("use_cutout" in flags)


@pytest.mark.parametrize("name", REFERENCE_DATASETS)
def test_crop_padding_is_filled_before_normalizing(ref, name):
    """A white image padded with 0: crop before normalize gives exactly two values, the
    normalized 255 and the normalized 0 (= -mean/std), in both implementations."""
    images = torch.full((64,) + _images(name).shape[1:], 255, dtype=torch.uint8)
    aug = {"augmentation.use_random_crop": True, "augmentation.use_random_horizontal_flip": True,
           "augmentation.use_cutout": False}
    theirs = _reference_batch(ref.create_transform(_ref_cfg(ref, name, aug), is_train=True), images)
    ours = _ours(name, aug)(images, torch.zeros(64, dtype=torch.int64), torch.Generator().manual_seed(0)).images
    for out in (theirs, ours):
        for c in range(out.shape[1]):
            values = out[:, c].unique()
            assert len(values) == 2, values
        torch.testing.assert_close(out.amax(dim=(0, 2, 3)), theirs.amax(dim=(0, 2, 3)), rtol=0, atol=2e-6)
        torch.testing.assert_close(out.amin(dim=(0, 2, 3)), theirs.amin(dim=(0, 2, 3)), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", REFERENCE_DATASETS)
@pytest.mark.parametrize("kind", ["use_cutout", "use_dual_cutout"])
def test_cutout_masks_after_normalizing(ref, name, kind):
    """Cutout's mask colour 0 lands on the normalized image (the dataset mean), not on the pixels."""
    images = torch.full((32,) + _images(name).shape[1:], 255, dtype=torch.uint8)
    aug = {"augmentation.use_random_crop": False, "augmentation.use_random_horizontal_flip": False,
           f"augmentation.{kind}": True, "augmentation.cutout.mask_size": 8, "augmentation.cutout.prob": 1.0}
    theirs = ref.create_transform(_ref_cfg(ref, name, aug), is_train=True)
    want = torch.stack([theirs(_pil(im)) for im in images])
    if kind == "use_dual_cutout":  # the reference's two views side by side (N, C, H, 2W); ours [view1; view2]
        want = torch.cat(want.chunk(2, dim=3))
    got = _ours(name, aug)(images, torch.zeros(32, dtype=torch.int64), torch.Generator().manual_seed(0)).images
    assert got.shape == want.shape
    values = want.unique()
    assert len(values) == 1 + images.shape[1] and values[0] == 0.0  # the mask (mean); each channel's 255
    torch.testing.assert_close(got.unique(), values, rtol=0, atol=2e-6)
