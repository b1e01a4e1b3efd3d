"""Fixtures for the differential suite against the reference implementation (oracle.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from oracle import load_reference, reference_missing


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

