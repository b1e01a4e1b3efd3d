"""The benchmark harness (``python -m benchmarks.run --smoke``), and the equivalence of what it
compares: our batched augmentation and the plain torchvision per-sample path train on the
same distribution of images, so their speeds are comparable."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO

if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder beside src/, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import plain  # noqa: E402
from benchmarks.run import merge  # noqa: E402
from imgclf import catalog, losses, models  # noqa: E402
from imgclf import config as C  # noqa: E402
from imgclf.augment.pipeline import TrainTransform  # noqa: E402

SECTIONS = ["### Targets", "### Training step:", "### End-to-end epoch:", "### Data pipeline per batch",
            "### Training step of every family's seed recipe", "### Workflow planning"]


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    block = markdown.split(heading, 1)[1].split("\n### ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")][2:]  # past the header and the rule
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def number(cell: str) -> float:
    return float(re.match(r"[\d,.]+", cell.replace("*", "")).group(0).replace(",", ""))


def test_smoke_run_writes_every_section_with_positive_numbers(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n<!-- device: CUDA: some GPU -->\n## CUDA: some GPU\nkept\n<!-- end device -->\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "## CUDA: some GPU\nkept" in text  # another device's section survives
    assert text.count("<!-- device: CPU:") == 1 and "SMOKE RUN" in text
    for heading in SECTIONS:
        assert heading in text, heading
    assert re.search(r"Load average \(1 min\) at start \d+\.\d\d", text)
    assert "torch " + torch.__version__ in text

    steps = table_rows(text, "### Training step:")
    assert [r[0].split(":")[0] for r in steps] == ["plain", "ours", "ours", "ours"]
    assert all(number(r[3]) > 0 and number(r[7]) > 0 for r in steps)  # img/s, peak MiB
    epochs = table_rows(text, "### End-to-end epoch:")
    assert len(epochs) == 4 and all(number(r[4]) > 0 and number(r[5]) > 0 for r in epochs)
    pipeline = table_rows(text, "### Data pipeline per batch")
    assert len(pipeline) == 3 and all(number(r[1]) > 0 for r in pipeline)
    families = table_rows(text, "### Training step of every family's seed recipe")
    assert sorted(r[0] for r in families) == sorted(catalog.MODELS)
    assert all(number(r[4]) > 0 for r in families)
    planning = table_rows(text, "### Workflow planning")
    assert number(planning[0][2]) > 0 and number(planning[0][4]) > 0  # median seconds, jobs planned
    targets = table_rows(text, "### Targets")
    assert all(r[2] in ("met", "**missed**", "—") for r in targets)


def test_merge_replaces_only_its_own_device():
    a = "<!-- device: CPU: x -->\nold cpu\n<!-- end device -->\n"
    b = "<!-- device: CUDA: y -->\ngpu\n<!-- end device -->\n"
    text = merge("# Benchmarks\n\n" + a + "\n" + b, "<!-- device: CPU: x -->\nnew cpu\n<!-- end device -->\n",
                 "CPU: x")
    assert "new cpu" in text and "old cpu" not in text and "gpu" in text
    text = merge(text, "<!-- device: CPU: z -->\nother\n<!-- end device -->\n", "CPU: z")
    assert "new cpu" in text and "other" in text and text.index("other") > text.index("gpu")


# ---------------------------------------------------------------- same augmentation, same loss
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def aug_config(crop_flip: bool) -> C.AugmentationConfig:
    aug = C.AugmentationConfig()
    aug.use_random_crop = aug.use_random_horizontal_flip = crop_flip
    assert aug.random_crop.padding == 4 and aug.random_crop.fill == 0 and aug.random_horizontal_flip.prob == 0.5
    return aug


def ours(images, labels, crop_flip: bool, seed: int = 0, mean=MEAN, std=STD):
    transform = TrainTransform(aug_config(crop_flip), mean, std, 10, 32, torch.device("cpu"))
    return transform(images, labels, torch.Generator().manual_seed(seed))


def theirs(images, labels, crop_flip: bool, seed: int = 0, mean=MEAN, std=STD):
    torch.manual_seed(seed)  # torchvision's transforms draw from the global generator
    dataset = plain.InMemoryCIFAR(images, labels, plain.transform(mean, std, augment=crop_flip))
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


def test_without_crop_and_flip_both_paths_give_the_same_tensor_and_loss():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (32,), generator=g)
    batch = ours(images, labels, crop_flip=False)
    x_plain, y_plain = theirs(images, labels, crop_flip=False)
    assert torch.equal(y_plain, labels) and torch.equal(batch.labels, labels)
    torch.testing.assert_close(batch.images, x_plain, atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    model = models.create("resnet_preact", depth=8, initial_channels=8, in_channels=3, n_classes=10).train()
    with torch.no_grad():
        loss_ours = losses.soft_cross_entropy(model(batch.images.contiguous(memory_format=torch.channels_last)),
                                              batch.targets)
        loss_plain = nn.CrossEntropyLoss()(model(x_plain), y_plain)
    torch.testing.assert_close(loss_ours, loss_plain, atol=1e-5, rtol=1e-5)


def expected_mean(image: torch.Tensor) -> torch.Tensor:
    """The exact per-pixel mean of crop(pad 4) + flip over its 81 offsets x 2 coin sides, in [0, 1]."""
    padded = F.pad(image.float()[None] / 255, (4, 4, 4, 4))[0]
    crops = torch.stack([padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)])
    return (crops.mean(0) + crops.flip(3).mean(0)) / 2


def test_with_crop_and_flip_both_paths_have_the_same_per_pixel_mean():
    # ramps across x and y (flips and shifts both move them) and a constant channel
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    image = torch.stack([xs * 8, ys * 8, torch.full_like(xs, 200)]).to(torch.uint8)
    n = 4096
    images, labels = image.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long)
    # mean 0, std 1: the augmented images stay in [0, 1], comparable with the exact expectation
    zero, one = [0.0] * 3, [1.0] * 3
    want = expected_mean(image)
    mean_ours = ours(images, labels, True, mean=zero, std=one).images.mean(0)
    mean_plain = theirs(images, labels, True, mean=zero, std=one)[0].mean(0)
    # each pixel's mean over 4096 samples; its spread from the shifts is <= 0.5 -> 4 sigma ~ 0.03
    assert (mean_ours - want).abs().max() < 0.035
    assert (mean_plain - want).abs().max() < 0.035
    assert (mean_ours - mean_plain).abs().mean() < 0.005


def crop_offsets(augmented: torch.Tensor, threshold: float) -> torch.Tensor:
    """(dy, dx) in 0..8 of each crop of a constant image padded with zeros: from the zero border.
    A flip mirrors dx (8 - dx); with a fair coin the joint law stays uniform."""
    inside = augmented[:, 0] > threshold  # (N, 32, 32) True where the image, False on the padding
    rows, cols = inside.any(2), inside.any(1)
    top, bottom = (~rows).long().cumprod(1).sum(1), (~rows).flip(1).long().cumprod(1).sum(1)
    left, right = (~cols).long().cumprod(1).sum(1), (~cols).flip(1).long().cumprod(1).sum(1)
    return torch.stack([4 - top + bottom, 4 - left + right], 1)


@pytest.mark.parametrize("path", ["ours", "plain"])
def test_crop_offsets_are_uniform_over_the_81_positions(path):
    n = 8100
    images = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.long)
    mean, std = [0.5] * 3, [0.5] * 3  # padding 0 -> -1, image 255 -> +1
    x = ours(images, labels, True, seed=3, mean=mean, std=std).images if path == "ours" else \
        theirs(images, labels, True, seed=3, mean=mean, std=std)[0]
    offsets = crop_offsets(x, threshold=0.0)
    assert offsets.min() >= 0 and offsets.max() <= 8
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81).double()
    assert counts.numel() == 81 and (counts > 0).all()
    chi2 = ((counts - n / 81) ** 2 / (n / 81)).sum().item()
    assert chi2 < 124.8, (chi2, counts.view(9, 9))  # chi-square, 80 degrees of freedom, p = 0.001
