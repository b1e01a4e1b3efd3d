"""Fixtures for the differential suite against the reference implementation (oracle.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# This folder is a package (its test modules share basenames with tests/test_*.py, e.g.
# test_optim.py); its test modules import their helpers as `from oracle import ...`.
sys.path.insert(0, str(Path(__file__).parent))

from oracle import load_reference, reference_missing  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.oracle)


@pytest.fixture(scope="session")
def ref():
    """The reference package ``pytorch_image_classification``."""
    why = reference_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI provides the reference implementation, but: {why}")
        pytest.skip(why)
    return load_reference()

