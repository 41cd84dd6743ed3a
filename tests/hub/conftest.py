"""Fixtures for the Hub core tests (the Hub server and the isolated HF home are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "model-cache"


@pytest.fixture
def no_resume_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's downloader without its 1 s wait between resume attempts, and nothing else.

    Only the `time` name inside huggingface_hub.file_download is replaced (by the real module with a
    no-op sleep): the Hub server's own waits, and every other module's, stay real.
    """
    import time

    import huggingface_hub.file_download as fd

    class _NoWaitTime:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            pass

    monkeypatch.setattr(fd, "time", _NoWaitTime())
