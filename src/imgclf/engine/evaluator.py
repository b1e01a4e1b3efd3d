"""Batched evaluation on a device-resident test set; sharded across DDP ranks and reduced."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _onednn_cl_hazard(model: nn.Module) -> bool:
    """oneDNN's CPU weight gradient of a strided channels_last conv with 2..7 input channels
    corrupts the heap (segfault / 'corrupted size vs. prev_size'; seen with torch 2.14, e.g. a
    1x1 stride-2 shortcut of a model with initial_channels 4). Such (tiny) models stay NCHW on CPU."""
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels < 8 for m in model.modules())


def use_channels_last(requested: bool, device: torch.device, model: torch.nn.Module) -> bool:
    """One memory-format decision for training and for ``imgclf evaluate``: the same kernels,
    so the same test error in result.json and eval.json."""
    return (requested and device.type in ("cpu", "cuda")
            and not (device.type == "cpu" and _onednn_cl_hazard(model)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, transform, *,
             batch_size: int, precision, rank: int = 0, world_size: int = 1,
             channels_last: bool = False) -> dict[str, float]:
    """Test loss and error (in %) over the whole set. Sums stay on the device until the end."""
    was_training = model.training
    if world_size > 1:
        # Each rank's BN running statistics last saw its own shard; the saved model holds rank 0's.
        # Evaluate that model on every rank (DDP overwrites them from rank 0 at the next forward
        # anyway), so result.json's test error is eval.json's.
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = len(labels)
    shard = torch.arange(rank, n, world_size, device=device)
    for start in range(0, len(shard), batch_size):
        idx = shard[start:start + batch_size]
        x = transform(images[idx]).to(precision.input_dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels[idx], reduction="sum").double()
        correct += (logits.argmax(1) == labels[idx]).sum()
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
    model.train(was_training)
    n_correct = int(correct.item())
    return {"test_loss": float(loss_sum.item()) / n, "test_error": 100.0 * (n - n_correct) / n, "n_test": n}


def evaluate_run(run_dir) -> dict:
    """``imgclf evaluate``: reload a finished run's final weights and score the test set -> eval.json."""
    from pathlib import Path

    from imgclf.augment.pipeline import EvalTransform
    from imgclf.config import precision as precision_name
    from imgclf.data import load as load_data
    from imgclf.models import build as build_model
    from imgclf.runs import verify
    from imgclf.utils import read_json_object, write_json

    from imgclf.runs import load_run_config

    from . import distenv
    from .precision import Precision, apply_backend_flags, backend_flags

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: missing; is this a run directory?")
    if not (run_dir / "result.json").is_file():
        raise FileNotFoundError(f"{run_dir}: result.json and model.pt missing; is the run finished?")
    cfg = load_run_config(run_dir)
    result = read_json_object(run_dir / "result.json", "the run's result (a JSON object)")
    verify(run_dir, cfg, result)
    if result.get("diverged"):
        out = {"diverged": True, "test_error": None, "test_loss": None, "message": result.get("message"),
               "seed": cfg.train.seed, "epochs": result.get("epochs")}
        write_json(run_dir / "eval.json", out)
        return out
    if not (run_dir / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir / 'model.pt'}: missing; is the run finished?")
    device = distenv.current(cfg.device)[1]

    def unloadable(e: Exception) -> ValueError:  # truncated, corrupt or foreign: one line naming the file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ValueError(f"{run_dir / 'model.pt'}: cannot load the final weights ({msg[:200]}); re-run the seed")

    try:  # the weights before the data: a refused evaluation writes no dataset cache
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise unloadable(e) from None
    data = load_data(cfg.dataset.name, root=cfg.data_root, folder=cfg.dataset.dataset_dir or None)
    model = build_model(cfg, in_channels=data.n_channels, n_classes=cfg.dataset.n_classes or data.n_classes)
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise unloadable(e) from None
    prec = Precision(precision_name(cfg), device)
    apply_backend_flags(backend_flags(prec.name, device.type, cfg.train.deterministic))  # the training's kernels
    model = prec.cast_model(model.to(device))
    channels_last = use_channels_last(cfg.train.channels_last, device, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, labels = data.test_images.to(device), data.test_labels.to(device)
    out = evaluate(model, images, labels, EvalTransform(*data.normalization, device),
                   batch_size=cfg.validation.batch_size, precision=prec, channels_last=channels_last)
    out.update({"train_seconds": result.get("train_seconds"), "wall_seconds": result.get("wall_seconds"),
                "gpu": result.get("gpu"), "epochs": result.get("epochs"), "seed": cfg.train.seed,
                "n_params": result.get("n_params"), "diverged": bool(result.get("diverged", False))})
    write_json(run_dir / "eval.json", out)
    return out
