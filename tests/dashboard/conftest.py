"""The demo zoo, trained once per test session into a temporary cache that the browser tests
share (``CCAMERGE_CACHE_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def demo_cache_dir(tmp_path_factory) -> Path:
    """One folder per test session (``CCAMERGE_TEST_CACHE_DIR`` reuses one across sessions)."""
    fixed = os.environ.get("CCAMERGE_TEST_CACHE_DIR")
    return Path(fixed) if fixed else tmp_path_factory.getbasetemp() / "ccamerge-demo"


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """Point the dashboard at a session-wide cache and train the demo zoo there once."""
    path = demo_cache_dir(tmp_path_factory)
    os.environ["CCAMERGE_CACHE_DIR"] = str(path)
    from dashboard import data

    data.ensure_demo()
    return path
