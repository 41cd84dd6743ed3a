"""Child services on 127.0.0.1: a free port, waiting until one answers, stopping its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """True when `url` gives any HTTP answer below 500."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout_s, trust_env=False).status_code < 500
    except httpx.HTTPError:
        return False


def wait_http(url: str, *, proc: subprocess.Popen | None = None, timeout_s: float = 120.0,
              log: Path | None = None, poll_s: float = 0.25) -> None:
    """Poll `url` until it answers; fail early, with the log's tail, if `proc` dies first."""
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered" +
                               (f"; {log}:\n{tail}" if log else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s" + (f"; see {log}" if log else ""))
        time.sleep(poll_s)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> bool:
    """SIGTERM the group, SIGKILL what is left after `timeout_s`; True if it stopped on SIGTERM."""
    clean = True
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            clean = False
    # stragglers in the group (dagster's code server, mlflow's workers) go too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return clean
