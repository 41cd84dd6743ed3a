"""`make up` as a user runs it: everything answers, every asset materialises, a second start leaves the first
alone, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from idp_pipelines.settings import REPO_ROOT
from tests.support import free_port, write_lab

pytestmark = pytest.mark.slow


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float, lines: list[str]) -> re.Match:
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


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


def _backfill_status(port: int, backfill_id: str, timeout_s: float) -> str:
    query = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = _graphql(port, query, {"id": backfill_id})["partitionBackfillOrError"].get("status")
        if status not in (None, "REQUESTED", "CANCELING", "FAILING"):
            return status
        time.sleep(2)
    return f"still {status} after {timeout_s} s"


def _asset_materialized(port: int, path: list[str], partition: str) -> bool:
    query = ("query($key: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $key) { ... on Asset { "
             "assetMaterializations(partitions: $p, limit: 1) { partition } } } }")
    data = _graphql(port, query, {"key": {"path": path}, "p": [partition]})
    return bool(data["assetOrError"]["assetMaterializations"])


def test_make_up_starts_the_lab_and_ctrl_c_stops_it(tmp_path):
    llama, mlflow, dagster, hub = free_port(), free_port(), free_port(), free_port()
    lab = write_lab(tmp_path / "lab.yaml", endpoint_url=f"http://127.0.0.1:{llama}",
                    mlflow_url=f"http://127.0.0.1:{mlflow}", hub_url=f"http://127.0.0.1:{hub}")
    env = {**os.environ, "IDP_HOME": str(tmp_path / "home"), "IDP_LAB": str(lab), "IDP_DAGSTER_PORT": str(dagster),
           "PYTHONUNBUFFERED": "1"}
    # started the way `make up &` in a script starts it: with SIGINT ignored, which children inherit
    proc = subprocess.Popen(["make", "-s", "up"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    try:
        _read_until(proc, r"Ctrl-C stops everything", 400, lines)
        out = "".join(lines)
        pids = [int(p) for p in re.findall(r"\(pid (\d+),", out)]
        assert len(pids) == 4
        for url in (f"http://127.0.0.1:{llama}/v1/models", f"http://127.0.0.1:{mlflow}/health",
                    f"http://127.0.0.1:{dagster}/server_info", f"http://127.0.0.1:{hub}/api/models/idp-local/tiny-llama"):
            assert url.split("/")[2] in out  # its host:port is printed
            assert httpx.get(url, timeout=10).status_code == 200

        # the main job (every asset, every partition) materialises end to end against the embedded lab
        backfill = re.search(r"first materialisation\s+\S+/runs/b/(\w+)", out).group(1)
        assert _backfill_status(dagster, backfill, timeout_s=300) == "COMPLETED_SUCCESS"
        assert _asset_materialized(dagster, ["gguf_model"], "tiny-llama")
        # what the owner then finds: this repo's commits as dev-log notes, the sweep in MLflow
        home = tmp_path / "home"
        assert list((home / "vault" / "Dev Log").glob("*.md"))
        assert "# Hardware findings: local" in (home / "reports" / "hardware_findings.md").read_text()
        exp = httpx.get(f"http://127.0.0.1:{mlflow}/api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": "benchmarks/local-llamacpp"}, timeout=30).json()["experiment"]
        runs = httpx.post(f"http://127.0.0.1:{mlflow}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [exp["experiment_id"]]}, timeout=30).json()["runs"]
        assert runs and all(any(t["key"] == "idp.benchmark_run_id" for t in r["data"]["tags"]) for r in runs)

        # running it twice must not break the first
        second = subprocess.run(["make", "-s", "up"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already running" in second.stdout and f"http://127.0.0.1:{dagster}" in second.stdout
        assert httpx.get(f"http://127.0.0.1:{llama}/v1/models", timeout=10).status_code == 200

        # Ctrl-C: SIGINT to the whole foreground group, as a terminal does
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        rest = proc.stdout.read()
        assert "stopped." in rest
        assert "was killed" not in rest  # every service stopped on SIGTERM
        time.sleep(0.5)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == []
        leftovers = [p.info["pid"] for p in psutil.process_iter(["pid", "environ"])
                     if (p.info.get("environ") or {}).get("IDP_HOME") == env["IDP_HOME"]]
        assert leftovers == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{dagster}/server_info", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in psutil.process_iter(["pid", "environ"]):
            try:
                if (p.info.get("environ") or {}).get("IDP_HOME") == env["IDP_HOME"]:
                    p.kill()
            except psutil.Error:
                pass
