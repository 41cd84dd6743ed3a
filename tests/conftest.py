from __future__ import annotations

from pathlib import Path

import pytest

from idp_pipelines.embedded.hubserver import HubServer
from tests.support import llama_server

# The only reasons a test may be skipped, each with why (the README lists them). Any other skip, and any
# xfail, fails the run: a skip must never hide a broken install (a missing build, a failed import).
ALLOWED_SKIPS: dict[str, str] = {}


def pytest_report_header(config) -> list[str]:
    """One early line per missing part, so a machine that cannot run some tests says so before they fail
    one by one. Informational only: the tests themselves fail (never skip) without what they need."""
    try:
        return _missing_parts()
    except Exception as exc:  # a header must never stop the session
        return [f"idp_pipelines: could not check this machine's services and devices: {exc!r}"]


def _missing_parts() -> list[str]:
    import os
    import shutil

    from idp_pipelines.llama_tools import LlamaToolsError, tool

    missing = []
    if os.geteuid() != 0:
        missing.append("root (a private dockerd, sshd on 127.0.0.1, mount namespaces, the exFAT volume)")
    for dev, what in (("/dev/fuse", "FUSE (the exFAT backup target)"), ("/dev/loop-control", "loop devices "
                      "(the exFAT backup target)")):
        if not os.path.exists(dev):
            missing.append(f"{what}: {dev}")
    for name in ("dockerd", "sshd", "nginx", "promtool", "rsync", "mkfs.exfat", "mount.exfat-fuse", "unshare"):
        if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            missing.append(f"{name} (`make install` installs the Debian packages)")
    for name in ("llama-server", "llama-quantize"):
        try:
            tool(name)
        except LlamaToolsError:
            missing.append(f"{name} (`make install` builds it once per machine)")
    if not missing:
        return ["idp_pipelines: every service and device the tests start is on this machine"]
    return ["idp_pipelines: MISSING on this machine, the tests that need them will fail:"] + \
        [f"  - {m}" for m in missing]


def _not_allowed(report) -> str | None:
    """Why this skipped or xfailed report must count as a failure (None: it may stay a skip)."""
    if hasattr(report, "wasxfail"):
        return f"xfail is not allowed in this project (an expected failure hides a broken behaviour): {report.wasxfail}"
    if not report.skipped:
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason in ALLOWED_SKIPS:
        return None
    return (f"skipped for a reason not in ALLOWED_SKIPS (tests/conftest.py, listed in the README): {reason!r}. "
            f"Fix: install what is missing, or make the test run here.")


def _fail(report, why: str) -> None:
    report.outcome = "failed"
    report.longrepr = why


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (why := _not_allowed(report)) is not None:
        _fail(report, why)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if (why := _not_allowed(report)) is not None:  # a module-level importorskip / pytest.skip
        _fail(report, why)


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


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never read or write ~/.cache/huggingface, never send telemetry, never use a real token."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these paths once, at its first import: patch the module too.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    return home


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server
