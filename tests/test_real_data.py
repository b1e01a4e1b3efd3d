"""Real MNIST from the data root (../shared/data in CI): real learning in well under 2 minutes."""
import time


from conftest import RECIPES
from imgclf import config as C, runs
from imgclf.engine import train


def test_mnist_resnet_preact_learns(tmp_path, data_root):
    cfg = C.build(RECIPES / "mnist" / "resnet_preact.yaml", {
        "data_root": str(data_root), "model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8,
        "scheduler.epochs": 1, "train.batch_size": 128, "train.base_lr": 0.1, "scheduler.type": "cosine",
        "validation.batch_size": 2000})
    run = runs.prepare(cfg, tmp_path / "mnist", resume=False)
    start = time.perf_counter()
    result = train(run, progress=False)
    elapsed = time.perf_counter() - start
    print(f"MNIST, ResNet-PreAct-8 (8 channels), 1 epoch: test error {result['test_error']:.2f}% in {elapsed:.0f} s")
    assert result["test_error"] < 5.0  # chance is 90%; one epoch of a tiny ResNet gets ~2-3%
    assert elapsed < 120
