"""Helpers shared by the tests: a real llama.cpp server (its C++ llama-server) and lab files (process helpers: idp_pipelines.processes)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from idp_pipelines import llama_tools
from idp_pipelines.processes import free_port, stop_process_group, wait_http
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


def read_until(proc: subprocess.Popen, pattern: str, timeout_s: float, lines: list[str]) -> re.Match:
    """Read `proc`'s text stdout line by line (into `lines`) until `pattern` matches; fail with the output."""
    deadline = time.monotonic() + timeout_s
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if m := rx.search(line):
            return m
    raise AssertionError(f"{pattern!r} not seen within {timeout_s} s; output:\n" + "".join(lines))


def processes_of(home: str) -> list[int]:
    """Live processes started with IDP_HOME=`home` (what a stopped lab must not leave behind)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "environ", "status"]):
        try:
            if (p.info.get("environ") or {}).get("IDP_HOME") == home and p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(p.info["pid"])
        except psutil.Error:
            pass
    return pids


def kill_processes_of(home: str) -> None:
    """The last resort of a failing test: SIGKILL whatever still runs with IDP_HOME=`home`."""
    import psutil

    for pid in processes_of(home):
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
