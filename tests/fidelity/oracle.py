"""The reference implementation as a test oracle (../shared/reference, see its ORACLE.md).

Tests import it from there at test time, never from the project: ``ref`` (the fixture in this
folder's conftest) skips with the reason when the reference or its packages are absent, and
fails under CI, which provides them.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("IMGCLF_REFERENCE_DIR") or REPO.parent / "shared" / "reference")
RECIPES = REPO / "config" / "recipes"


def reference_missing() -> str | None:
    if not (REFERENCE_DIR / "pytorch_image_classification").is_dir():
        return f"the reference implementation is not in {REFERENCE_DIR} (set IMGCLF_REFERENCE_DIR)"
    for name in ("yacs", "fvcore", "termcolor", "thop"):
        try:
            importlib.import_module(name)
        except ImportError:
            return f"the reference needs '{name}' (pip install -e '.[dev]')"
    return None


def load_reference():
    """The reference package ``pytorch_image_classification`` (check reference_missing first)."""
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    return importlib.import_module("pytorch_image_classification")


def reference_config(ref, recipe: str, options: dict | None = None):
    """A reference config built the way its train.py does: defaults, the recipe under
    ``configs/`` (same relative name as ours, e.g. ``cifar/resnet_preact.yaml``), the KEY VALUE
    options, then ``update_config``; on CPU, frozen."""
    cfg = ref.get_default_config()
    cfg.merge_from_file(str(REFERENCE_DIR / "configs" / recipe))
    items: list = []
    for key, value in (options or {}).items():
        items += [key, value]
    items += ["device", "cpu", "train.dataloader.pin_memory", False]
    cfg.merge_from_list(items)
    cfg = ref.update_config(cfg)
    cfg.freeze()
    return cfg
