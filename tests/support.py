"""Helpers shared by the tests: free ports, waiting for a server, a real llama.cpp server, lab files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from idp_pipelines.embedded.mlflow_server import free_port
from idp_pipelines.settings import REPO_ROOT


def wait_http(url: str, *, proc: subprocess.Popen | None = None, timeout_s: float = 120.0,
              log: Path | None = None) -> httpx.Response:
    """Poll `url` until it answers below 500; fail early if `proc` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(url, timeout=5.0)
            if r.status_code < 500:
                return r
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered:\n"
                               + (log.read_text(errors="replace")[-3000:] if log else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s} s")
        time.sleep(0.25)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def llama_server(model: Path, log: Path, *, alias: str = "tiny-llama", n_ctx: int = 512) -> Iterator[str]:
    """A real llama-cpp-python OpenAI-compatible server on 127.0.0.1; yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--model_alias", alias, "--n_ctx", str(n_ctx), "--n_threads", "1",
             # by default a new request aborts the one streaming (see embedded/stack.py)
             "--interrupt_requests", "False"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_http(base + "/v1/models", proc=proc, log=log)
        yield base
    finally:
        stop_process_group(proc)


def write_lab(path: Path, *, endpoint_url: str | None = None, mlflow_url: str | None = None,
              hub_url: str | None = None, extra: dict | None = None) -> Path:
    """labs/local.yaml with its embedded services moved to other ports (tests run beside `make up`)."""
    data = yaml.safe_load((REPO_ROOT / "labs" / "local.yaml").read_text())
    data["git_repos"][0]["path"] = str(REPO_ROOT)
    if endpoint_url:
        data["endpoints"][0]["base_url"] = endpoint_url
    if mlflow_url:
        data["mlflow"]["tracking_uri"] = mlflow_url
    if hub_url:
        data["hub"]["endpoint"] = hub_url
    for key, value in (extra or {}).items():
        data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
