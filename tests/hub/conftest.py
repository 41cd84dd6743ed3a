"""Fixtures for the Hub core tests (the Hub server and the isolated HF home are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "model-cache"
