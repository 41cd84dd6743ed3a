from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import llama_server


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """No test touches the checkout's .idp/ or the user's lab: state goes to tmp."""
    monkeypatch.setenv("IDP_HOME", str(tmp_path / "idp-home"))
    monkeypatch.delenv("IDP_LAB", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    from idp_pipelines.embedded.tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-llama-f32.gguf", seed=0)


@pytest.fixture(scope="session")
def llama_base_url(tiny_gguf, tmp_path_factory) -> str:
    """One real llama.cpp server for the whole session, serving the generated tiny model."""
    with llama_server(tiny_gguf, tmp_path_factory.mktemp("logs") / "llama.log") as base:
        yield base
