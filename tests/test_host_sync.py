"""The step of the default training loop (augmentation, batch mixer, forward, backward, optimizer
step) never moves data between host and device: on a GPU each such copy or read stalls the
host until the device queue drains.

A CPU has no host-device copies to watch, so a TorchFunctionMode fails on the calls that make
them on a GPU: a tensor built from host data (``torch.tensor([a, b], device=...)``), a move
to another device, and every read of a tensor's value on the host (``.item()``, ``bool()``,
``float()``, ``.tolist()``, ...)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import make_run
from imgclf.engine import Trainer

T = torch.Tensor
READS = {T.item, T.tolist, T.numpy, T.cpu, T.__bool__, T.__float__, T.__int__, T.__index__, T.__complex__}
FROM_HOST = {torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        if func in READS:
            raise HostSync(f"{name}: a device-to-host read inside the step")
        if func in FROM_HOST and args and not isinstance(args[0], torch.Tensor):
            raise HostSync(f"{name}({args[0]!r}): host data copied into a tensor inside the step")
        if func in (T.to, T.cuda) and args:
            target = torch._C._nn._parse_to(*args[1:], **kwargs)[0] if func is T.to else torch.device("cuda")
            if target is not None and target.type != args[0].device.type:
                raise HostSync(f"{name}: a copy from {args[0].device} to {target} inside the step")
        if func is T.copy_ and isinstance(args[1], torch.Tensor) and args[1].device != args[0].device:
            raise HostSync(f"copy_: a copy from {args[1].device} to {args[0].device} inside the step")
        return func(*args, **kwargs)


def guarded(fn):
    def call(*args, **kwargs):
        with NoHostSync():
            return fn(*args, **kwargs)
    return call


AUGMENTATIONS = {
    "crop": {},
    "mixup": {"augmentation.use_mixup": True},
    "cutmix": {"augmentation.use_cutmix": True},
    "ricap": {"augmentation.use_ricap": True},
    "random_erasing": {"augmentation.use_random_erasing": True},
    "cutout_label_smoothing": {"augmentation.use_cutout": True, "augmentation.cutout.mask_size": 4,
                               "augmentation.use_label_smoothing": True},
    "dual_cutout": {"augmentation.use_dual_cutout": True, "augmentation.cutout.mask_size": 4},
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_the_default_loop_step_neither_copies_to_nor_reads_from_the_device(tmp_path, name):
    """Every step of a real epoch, with the trainer's own loop, under the guard."""
    run = make_run(tmp_path / name, **{"scheduler.epochs": 1, "train.batch_size": 256, **AUGMENTATIONS[name]})
    trainer = Trainer(run, progress=False)
    steps = []
    augment, step_fn = trainer.batches.augment, trainer.step.body

    def counted_step(*args):
        steps.append(1)
        return guarded(step_fn)(*args)

    trainer.batches.augment, trainer.step.body = guarded(augment), counted_step
    result = trainer.fit()
    assert len(steps) == len(trainer.loader) > 1 and 0 < result["train_loss"] < 10


@pytest.mark.parametrize("mixer", ["mixup", "cutmix", "ricap"])
def test_the_batch_mixers_run_without_host_device_traffic(mixer):
    from imgclf.augment import cutmix, mixup, ricap

    fn = {"mixup": lambda x, y, g: mixup.mixup(x, y, alpha=1.0, generator=g),
          "cutmix": lambda x, y, g: cutmix.cutmix(x, y, alpha=1.0, generator=g),
          "ricap": lambda x, y, g: ricap.ricap(x, y, beta=0.3, generator=g)}[mixer]
    x, y = torch.rand(8, 3, 6, 6), torch.eye(4)[torch.arange(8) % 4]
    expected = fn(x, y, torch.Generator().manual_seed(3))
    with NoHostSync():
        got = fn(x, y, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_random_erasing_runs_without_host_device_traffic_and_draws_the_same_rectangles():
    from imgclf.augment.random_erasing import random_erasing

    x = torch.randn(16, 3, 12, 12)
    kw = {"prob": 0.5, "area_ratio_range": (0.02, 0.4), "min_aspect_ratio": 0.3, "max_attempt": 20}
    g_free, g_guarded = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = random_erasing(x, generator=g_free, fill_low=-0.3, fill_high=0.7, **kw)
    with NoHostSync():
        got = random_erasing(x, generator=g_guarded, fill_low=-0.3, fill_high=0.7, **kw)
        per_channel = random_erasing(x, generator=torch.Generator().manual_seed(5),
                                     fill_low=torch.full((3,), -0.3), fill_high=torch.full((3,), 0.7), **kw)
        default_fill = random_erasing(x, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, expected) and torch.equal(got, per_channel) and not torch.equal(got, x)
    assert torch.equal(g_free.get_state(), g_guarded.get_state())  # the same draws consumed
    erased = default_fill != x
    assert erased.any() and (default_fill[erased] >= 0).all() and (default_fill[erased] < 1).all()


def test_the_guard_catches_what_it_is_meant_to():
    x = torch.ones(3)
    for bad in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: float(x[0]), lambda: x.tolist(),
                lambda: torch.tensor([1.0, 2.0], device=x.device), lambda: torch.as_tensor(0.5, device=x.device)):
        with pytest.raises(HostSync), NoHostSync():
            bad()
    with NoHostSync():  # on-device work passes
        torch.full((2,), 0.5).add_(x[:2]).to(torch.float64).copy_(torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA's own sync detector")
@pytest.mark.parametrize("mixer", ["mixup", "cutmix", "ricap", "random_erasing"])
def test_on_a_gpu_the_mixers_and_random_erasing_never_synchronize(mixer):
    """On a GPU, CUDA's sync debug mode raises on any synchronizing call (a read back, a pageable copy)."""
    from imgclf.augment import cutmix, mixup, random_erasing, ricap

    fn = {"mixup": lambda x, y, g: mixup.mixup(x, y, alpha=1.0, generator=g),
          "cutmix": lambda x, y, g: cutmix.cutmix(x, y, alpha=1.0, generator=g),
          "ricap": lambda x, y, g: ricap.ricap(x, y, beta=0.3, generator=g),
          "random_erasing": lambda x, y, g: random_erasing.random_erasing(
              x, prob=0.5, area_ratio_range=(0.02, 0.4), min_aspect_ratio=0.3, max_attempt=20, generator=g)}[mixer]
    x, y = torch.rand(8, 3, 6, 6, device="cuda"), torch.eye(4, device="cuda")[torch.arange(8, device="cuda") % 4]
    g = torch.Generator(device="cuda").manual_seed(3)
    fn(x, y, g)  # first call: kernels load, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with NoHostSync():
            fn(x, y, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
