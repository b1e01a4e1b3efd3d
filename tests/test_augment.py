"""Property tests for the batched regularizers and soft-target losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imgclf.augment.cutmix import cutmix
from imgclf.augment.cutout import cutout
from imgclf.augment.dual_cutout import dual_cutout_views
from imgclf.augment.mixup import mixup, sample_beta
from imgclf.augment.random_erasing import erasing_boxes, random_erasing
from imgclf.augment.ricap import ricap
from imgclf.losses import dual_cutout_loss, dual_cutout_predict, one_hot, smooth_targets, soft_cross_entropy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rectangle(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) if the (H, W) bool mask is exactly one filled axis-aligned rectangle."""
    if not mask.any():
        return None
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
    box = torch.zeros_like(mask)
    box[top:bottom + 1, left:right + 1] = True
    assert torch.equal(box, mask), "mask is not a filled rectangle"
    return top, left, bottom - top + 1, right - left + 1


def labelled_batch(n: int, size: int = 16, channels: int = 3):
    """Sample i is the constant i (all channels), its target is class i of n."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, channels, size, size).contiguous()
    return x, one_hot(torch.arange(n), n)


def pixel_fractions(x: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, K): fraction of each image's pixels whose value is k (channel 0)."""
    values = x[:, 0].round().long().flatten(1)
    counts = F.one_hot(values, n_classes).sum(1).float()
    return counts / values.shape[1]


# --------------------------------------------------------------------------- cutout
@pytest.mark.parametrize("mask_size", [4, 5])
@pytest.mark.parametrize("cut_inside", [False, True])
def test_cutout_masks_one_square_clipped_at_borders(mask_size, cut_inside):
    x = torch.randn(400, 3, 12, 12) + 10.0  # far from the mask colour
    out = cutout(x, mask_size=mask_size, prob=1.0, cut_inside=cut_inside, mask_color=-1.5, generator=gen())
    masked = out == -1.5
    assert torch.equal(masked[:, :1].expand_as(masked), masked), "all channels masked alike"
    assert torch.equal(out[~masked], x[~masked])
    clipped = 0
    for m in masked[:, 0]:
        top, left, h, w = rectangle(m)
        if cut_inside:
            assert (h, w) == (mask_size, mask_size)
        else:
            # A side shorter than mask_size must end at a border (clipping), never inside.
            assert h == mask_size or top == 0 or top + h == 12
            assert w == mask_size or left == 0 or left + w == 12
            assert h >= mask_size - mask_size // 2 - (mask_size % 2 == 0) and w >= 1
            clipped += (h, w) != (mask_size, mask_size)
    assert (clipped > 0) != cut_inside


@pytest.mark.parametrize("mask_size", [4, 5])
def test_cutout_coverage_is_symmetric(mask_size):
    # Centre uniform with the even-size offset: row r is covered as often as row H-1-r.
    out = cutout(torch.ones(20000, 1, 10, 10), mask_size=mask_size, prob=1.0, cut_inside=False, mask_color=0.0,
                 generator=gen(1))
    coverage = (out == 0)[:, 0].any(2).float().mean(0)  # how often each row is masked
    assert torch.allclose(coverage, coverage.flip(0), atol=0.02)
    # Expected cover of a middle row: mask_size positions of the centre out of H + (size even).
    assert coverage[4].item() == pytest.approx(mask_size / (10 + (mask_size % 2 == 0)), abs=0.02)


def test_cutout_applies_with_probability_prob():
    x = torch.ones(4000, 1, 8, 8)
    out = cutout(x, mask_size=4, prob=0.3, cut_inside=False, mask_color=0.0, generator=gen(2))
    fraction = (out == 0).flatten(1).any(1).float().mean().item()
    assert fraction == pytest.approx(0.3, abs=0.035)  # > 4 standard deviations
    assert torch.equal(x, torch.ones_like(x)), "input not modified"


def test_cutout_larger_than_image_inside_covers_everything():
    out = cutout(torch.ones(3, 1, 4, 4), mask_size=6, prob=1.0, cut_inside=True, mask_color=0.0, generator=gen())
    assert (out == 0).all()


# --------------------------------------------------------------------------- random erasing
def test_random_erasing_areas_and_aspect_ratios_in_range():
    n, size, lo, hi, r1 = 600, 32, 0.02, 0.4, 0.3
    x = torch.full((n, 3, size, size), 5.0)
    out = random_erasing(x, prob=1.0, area_ratio_range=[lo, hi], min_aspect_ratio=r1, max_attempt=20,
                         generator=gen(3))
    erased = out != 5.0
    assert torch.equal(erased[:, :1].expand_as(erased), erased)
    assert ((out[erased] >= 0) & (out[erased] < 1)).all(), "default fill is U(0, 1)"
    boxes = [rectangle(m) for m in erased[:, 0]]
    assert sum(b is None for b in boxes) <= 2, "20 attempts almost always find a fit"
    boxes = [b for b in boxes if b is not None]
    for top, left, h, w in boxes:
        # h = int(sqrt(S r)), w = int(sqrt(S / r)) (the reference's truncation): h·w <= S < (h+1)(w+1)
        assert h * w <= hi * size * size and (h + 1) * (w + 1) > lo * size * size
        assert (h + 1) / w >= r1 and h / (w + 1) <= 1 / r1
        assert top + h < size and left + w < size  # the reference's corner never reaches the far border
    assert len(set(boxes)) > 0.8 * len(boxes), "each sample draws its own rectangle"
    areas = torch.tensor([h * w for _, _, h, w in boxes], dtype=torch.float32) / size**2
    assert areas.min() < 0.05 and areas.max() > 0.3


def test_random_erasing_probability_and_failed_attempts_leave_images_alone():
    x = torch.randn(4000, 1, 8, 8)
    out = random_erasing(x, prob=0.5, area_ratio_range=[0.1, 0.2], min_aspect_ratio=0.5, max_attempt=5,
                         generator=gen(4))
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert changed == pytest.approx(0.5, abs=0.04)
    # Areas near the whole image with extreme aspect ratios rarely fit in one attempt.
    out = random_erasing(x, prob=1.0, area_ratio_range=[0.8, 1.0], min_aspect_ratio=0.3, max_attempt=1,
                         generator=gen(5))
    changed = (out != x).flatten(1).any(1)
    assert 0.05 < changed.float().mean().item() < 0.6
    assert torch.equal(out[~changed], x[~changed])


def test_random_erasing_keeps_the_first_candidate_that_fits():
    # Replays the same draws through the reference's sequential loop (int(), strict fit).
    n, size, attempts = 64, 8, 6
    top, left, h, w, found = erasing_boxes(n, size, size, area_ratio_range=(0.3, 1.0), min_aspect_ratio=0.3,
                                           max_attempt=attempts, generator=gen(6), device="cpu")
    g = gen(6)
    area = torch.empty(n, attempts).uniform_(0.3, 1.0, generator=g) * size * size
    aspect = torch.empty(n, attempts).uniform_(0.3, 1 / 0.3, generator=g)
    for i in range(n):
        expected = None
        for a in range(attempts):
            hh = int(math.sqrt(area[i, a] * aspect[i, a]))
            ww = int(math.sqrt(area[i, a] / aspect[i, a]))
            if hh < size and ww < size:
                expected = (hh, ww)
                break
        assert found[i].item() == (expected is not None)
        if expected:
            assert (h[i].item(), w[i].item()) == expected
            assert 0 <= top[i] < size - h[i] and 0 <= left[i] < size - w[i]
    assert 0 < found.sum() < n


def test_random_erasing_per_channel_fill_bounds():
    low, high = torch.tensor([-2.0, 0.0, 10.0]), torch.tensor([-1.0, 1.0, 11.0])
    x = torch.full((50, 3, 16, 16), 100.0)
    out = random_erasing(x, prob=1.0, area_ratio_range=[0.2, 0.4], min_aspect_ratio=0.5, max_attempt=10,
                         generator=gen(7), fill_low=low, fill_high=high)
    for c in range(3):
        values = out[:, c][out[:, c] != 100.0]
        assert values.numel() > 0 and (values >= low[c]).all() and (values < high[c]).all()
    # one value per rectangle, the same u mapped through each channel's bounds (as the reference)
    erased = out[:, 0] != 100.0
    for i in range(50):
        vals = out[i][:, erased[i]]
        assert torch.all(vals == vals[:, :1])
        torch.testing.assert_close(vals[:, 0] - low, (vals[0, 0] - low[0]) * (high - low))


# --------------------------------------------------------------------------- mixers
def test_mixup_targets_match_the_mixed_pixels():
    x, y = labelled_batch(32)
    for step, g in enumerate([gen(8)] * 5):
        xm, ym = mixup(x, y, alpha=1.0, generator=g)
        assert torch.allclose(ym.sum(1), torch.ones(32))
        # Each pixel is Σ_k weight_k · k, the targets' own mix of the source values.
        value = ym @ torch.arange(32, dtype=torch.float32)
        assert torch.allclose(xm, value.view(-1, 1, 1, 1).expand_as(xm), atol=1e-4)
        assert ((ym > 0).sum(1) <= 2).all()


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_cutmix_targets_equal_pasted_pixel_fractions(alpha):
    x, y = labelled_batch(16, size=15)  # odd side: boxes clip unevenly
    g = gen(9)
    seen_partial = False
    for _ in range(40):
        xm, ym = cutmix(x, y, alpha=alpha, generator=g)
        assert torch.allclose(ym.sum(1), torch.ones(16))
        assert torch.allclose(ym, pixel_fractions(xm, 16), atol=1e-6)
        pasted = xm[:, 0] != x[:, 0]
        moved = pasted.any(0)
        rectangle(moved)  # one box per batch
        seen_partial |= bool(0 < moved.float().mean() < 1)
    assert seen_partial


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_ricap_targets_equal_patch_areas_and_crops_are_contiguous(mode):
    n, size = 16, 12
    idx = torch.arange(n).view(n, 1, 1) * 10000 + torch.arange(size).view(1, size, 1) * 100 + torch.arange(size)
    x = idx.float().unsqueeze(1).repeat(1, 2, 1, 1)
    y = one_hot(torch.arange(n), n)
    g = gen(10)
    offsets = set()
    for _ in range(30):
        xm, ym = ricap(x, y, beta=0.3, generator=g, offsets=mode)
        assert torch.allclose(ym.sum(1), torch.ones(n))
        assert torch.equal(xm[:, 0], xm[:, 1])
        code = xm[:, 0].long()
        src, src_r, src_c = code // 10000, code // 100 % 100, code % 100
        assert torch.allclose(ym, F.one_hot(src.flatten(1), n).float().mean(1), atol=1e-6)
        # Each quadrant is one crop: a constant source and a constant shift from output to source pixel.
        rows, cols = torch.arange(size).view(size, 1), torch.arange(size).view(1, size)
        dr, dc = src_r - rows, src_c - cols
        src_id = src * 1_000_000 + dr * 1000 + dc  # one value per (source, shift)
        assert len(torch.unique(src_id[0])) <= 4
        for i in range(n):
            for value in torch.unique(src_id[i]):
                rectangle(src_id[i] == value)
            offsets.add(tuple(dr[i].flatten().tolist()))
        if mode == "per_batch":  # one crop offset per region for the whole batch
            assert torch.equal(dr, dr[:1].expand_as(dr)) and torch.equal(dc, dc[:1].expand_as(dc))
    if mode == "per_sample":
        assert len(offsets) > 30, "crop offsets are drawn per sample"


def test_ricap_keeps_memory_format():
    x, y = labelled_batch(8)
    out, _ = ricap(x, y, beta=0.3, generator=gen())
    assert out.is_contiguous()
    out, _ = ricap(x.to(memory_format=torch.channels_last), y, beta=0.3, generator=gen())
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_sample_beta_moments_and_no_nan():
    for a in (0.01, 0.3, 1.0):
        draws = sample_beta(a, a, (20000,), generator=gen(11))
        assert torch.isfinite(draws).all() and (draws >= 0).all() and (draws <= 1).all()
        assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
        assert draws.var().item() == pytest.approx(1 / (4 * (2 * a + 1)), abs=0.01)


# --------------------------------------------------------------------------- reproducibility
def _all_methods(x, y, g):
    return [
        cutout(x, mask_size=8, prob=0.5, cut_inside=False, mask_color=0.0, generator=g),
        random_erasing(x, prob=0.5, area_ratio_range=[0.02, 0.4], min_aspect_ratio=0.3, max_attempt=20,
                       generator=g),
        dual_cutout_views(x, mask_size=8, prob=1.0, cut_inside=False, mask_color=0.0, generator=g),
        *mixup(x, y, alpha=1.0, generator=g),
        *cutmix(x, y, alpha=1.0, generator=g),
        *ricap(x, y, beta=0.3, generator=g),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_from_seed_and_different_across_steps(device):
    x = torch.randn(32, 3, 16, 16, device=device)
    y = smooth_targets(torch.randint(0, 10, (32,)), 10, 0.1).to(device)
    g = gen(12, device)
    step1, step2 = _all_methods(x, y, g), _all_methods(x, y, g)
    again = _all_methods(x, y, gen(12, device))
    for a, b, c in zip(step1, step2, again):
        assert torch.isfinite(a).all()
        assert torch.equal(a, c), "a pure function of the generator state"
        assert not torch.equal(a, b), "a new draw each step"


# --------------------------------------------------------------------------- dual cutout + losses
def test_dual_cutout_views_are_two_independent_cutouts():
    x = torch.randn(64, 3, 16, 16) + 10
    views = dual_cutout_views(x, mask_size=8, prob=1.0, cut_inside=True, mask_color=0.0, generator=gen(13))
    assert views.shape == (128, 3, 16, 16)
    for view in views.chunk(2):
        masked = view == 0
        assert torch.equal(view[~masked], x[~masked])
        assert (masked[:, 0].flatten(1).sum(1) == 64).all()
    v1, v2 = views.chunk(2)
    assert ((v1 == 0) != (v2 == 0)).flatten(1).any(1).float().mean() > 0.9


def test_label_smoothing_and_one_hot():
    labels = torch.tensor([0, 3, 2])
    assert torch.equal(one_hot(labels, 4), torch.eye(4)[labels])
    t = smooth_targets(labels, 4, 0.2)
    assert torch.allclose(t, 0.8 * torch.eye(4)[labels] + 0.05)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.equal(smooth_targets(labels, 4, 0.0), one_hot(labels, 4))


def test_soft_cross_entropy_is_linear_in_the_targets():
    logits = torch.randn(8, 5, generator=gen(14))
    a, b = torch.randint(0, 5, (8,), generator=gen(15)), torch.randint(0, 5, (8,), generator=gen(16))
    assert soft_cross_entropy(logits, one_hot(a, 5)).item() == pytest.approx(F.cross_entropy(logits, a).item())
    mixed = 0.3 * one_hot(a, 5) + 0.7 * one_hot(b, 5)
    expected = 0.3 * F.cross_entropy(logits, a) + 0.7 * F.cross_entropy(logits, b)
    assert soft_cross_entropy(logits, mixed).item() == pytest.approx(expected.item(), rel=1e-6)
    assert soft_cross_entropy(logits.half(), mixed).dtype == torch.float32


def test_dual_cutout_loss_on_a_hand_made_batch():
    # view 1 logits [0, 0], view 2 logits [1, 0], target class 0, α = 0.1:
    # CE1 = log 2, CE2 = log(1 + e^-1), MSE over the 2 entries = (1 + 0) / 2.
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected = 0.5 * (math.log(2) + math.log(1 + math.exp(-1))) + 0.1 * 0.5
    assert dual_cutout_loss(logits, target, 0.1).item() == pytest.approx(expected, rel=1e-6)
    assert dual_cutout_loss(logits, target, 0.0).item() == pytest.approx(expected - 0.05, rel=1e-6)
    assert torch.allclose(dual_cutout_predict(logits), torch.tensor([[0.5, 0.0]]))


# --------------------------------------------------------------------------- non-square images, λ's law
def coded_batch(n: int, height: int, width: int):
    """Pixel (r, c) of sample i holds i·10000 + r·100 + c (both channels): every output pixel says
    where it came from."""
    code = (torch.arange(n).view(n, 1, 1) * 10000 + torch.arange(height).view(1, height, 1) * 100
            + torch.arange(width).view(1, 1, width))
    return code.float().unsqueeze(1).repeat(1, 2, 1, 1), one_hot(torch.arange(n), n)


def test_cutmix_box_on_non_square_images_scales_each_side_by_its_own_length():
    """24x40 images: the box is H·sqrt(1-λ) high and W·sqrt(1-λ) wide (so wider than high), inside
    the image, and the targets equal the pasted pixel fractions."""
    height, width, n = 24, 40, 8
    x, y = coded_batch(n, height, width)
    g = gen(21)
    unclipped = 0
    for _ in range(200):
        xm, ym = cutmix(x, y, alpha=1.0, generator=g)
        src = xm[:, 0].long() // 10000
        assert torch.allclose(ym, F.one_hot(src.flatten(1), n).float().mean(1), atol=1e-6)
        moved = (xm[:, 0] != x[:, 0]).any(0)
        box = rectangle(moved)
        if box is None:
            continue
        top, left, h, w = box
        assert top + h <= height and left + w <= width
        if 0 < top and top + h < height and 0 < left and left + w < width:  # not clipped: the drawn sides
            unclipped += 1
            # h = floor(24·s), w = floor(40·s) for one s = sqrt(1-λ) in [0, 1]
            lo = max(h / height, w / width)
            hi = min((h + 1) / height, (w + 1) / width)
            assert lo < hi, f"box {h}x{w} is not (24·s)x(40·s) for any s"
    assert unclipped > 20


def test_ricap_on_non_square_images_splits_each_axis_by_its_own_length():
    height, width, n = 24, 40, 8
    x, y = coded_batch(n, height, width)
    g = gen(22)
    boundary_cols, boundary_rows = [], []
    for _ in range(300):
        xm, ym = ricap(x, y, beta=0.3, generator=g)
        code = xm[:, 0].long()
        src, src_r, src_c = code // 10000, code // 100 % 100, code % 100
        assert (src_r < height).all() and (src_c < width).all()  # every crop inside its source image
        assert torch.allclose(ym, F.one_hot(src.flatten(1), n).float().mean(1), atol=1e-6)
        rows, cols = torch.arange(height).view(height, 1), torch.arange(width).view(1, width)
        shift = src * 1_000_000 + (src_r - rows) * 1000 + (src_c - cols)
        # The vertical boundary: a column where every row changes crop (source or shift); likewise rows.
        col_change = (shift[0, :, 1:] != shift[0, :, :-1]).all(0).nonzero().flatten() + 1
        row_change = (shift[0, 1:, :] != shift[0, :-1, :]).all(1).nonzero().flatten() + 1
        boundary_cols += col_change.tolist()
        boundary_rows += row_change.tolist()
    assert max(boundary_cols) > height, "the vertical boundary ranges over the width (40), not the height"
    assert max(boundary_rows) < height and min(boundary_cols) > 0


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_mixup_lambda_is_beta_alpha_alpha(alpha):
    """λ read back from mixup's targets, over 1,500 batches, against Beta(α, α) by a KS test; the same
    test rejects Beta(α, 2α) and Beta(2α, 2α), so it would see a wrong parameter."""
    from scipy import stats

    x, y = labelled_batch(8, size=2)
    g = gen(23)
    lams = []
    for _ in range(1500):
        _, ym = mixup(x, y, alpha=alpha, generator=g)
        mixed = [i for i in range(8) if ym[i, i] < 1 - 1e-7 or (ym[i] > 0).sum() == 2]
        if mixed:
            lams.append(ym[mixed[0], mixed[0]].item())
    assert len(lams) > 1400
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(alpha, 2 * alpha).cdf).pvalue < 1e-3
    assert stats.kstest(lams, stats.beta(2 * alpha, 2 * alpha).cdf).pvalue < 1e-3
