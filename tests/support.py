"""Helpers shared by the tests: a real llama.cpp server (its C++ llama-server) and lab files (process helpers: embedded.processes)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

from idp_pipelines import llama_tools
from idp_pipelines.embedded.processes import free_port, stop_process_group, wait_http
from idp_pipelines.settings import REPO_ROOT


@contextlib.contextmanager
def llama_server(model: Path, log: Path, *, alias: str = "tiny-llama", n_ctx: int = 2048,
                 parallel: int = 4) -> Iterator[str]:
    """llama.cpp's own C++ `llama-server` on 127.0.0.1 (what the lab runs); yields its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(llama_tools.tool("llama-server")), "-m", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--alias", alias, "-c", str(n_ctx), "-t", "1", "-np", str(parallel),
             "--cont-batching", "--metrics", "--no-webui"],
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
