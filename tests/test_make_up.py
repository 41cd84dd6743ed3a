"""`make up` as a user runs it: everything answers, every asset materialises, a second start leaves the first
alone, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from idp_pipelines.settings import REPO_ROOT
from tests.support import free_port, kill_processes_of, processes_of, read_until, write_lab

pytestmark = pytest.mark.slow


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]


def _failed_steps(port: int) -> str:
    """Each failed run's assets and step errors: what a failed stage's assertion shows."""
    runs = _graphql(port, 'query { runsOrError(filter: {statuses: [FAILURE]}) { ... on Runs { results { runId '
                          'assetSelection { path } } } } }')["runsOrError"]["results"]
    out = []
    for run in runs:
        logs = _graphql(port, 'query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { '
                              '__typename ... on ExecutionStepFailureEvent { stepKey error { message cause { message } } } } } } }',
                        {"id": run["runId"]})["logsForRun"]["events"]
        errors = [f"{e['stepKey']}: {(e['error']['cause'] or e['error'])['message'].strip()[:800]}" for e in logs
                  if e["__typename"] == "ExecutionStepFailureEvent"]
        out.append(f"run {run['runId'][:8]} {[a['path'] for a in run['assetSelection'] or []]}: " + "; ".join(errors))
    return "\n".join(out)


def _asset_materialized(port: int, path: list[str], partition: str) -> bool:
    query = ("query($key: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $key) { ... on Asset { "
             "assetMaterializations(partitions: $p, limit: 1) { partition } } } }")
    data = _graphql(port, query, {"key": {"path": path}, "p": [partition]})
    return bool(data["assetOrError"]["assetMaterializations"])


@pytest.mark.timeout(2400)
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
        read_until(proc, r"Ctrl-C stops everything", 400, lines)
        out = "".join(lines)
        pids = [int(p) for p in re.findall(r"\(pid (\d+),", out)]
        assert len(pids) == 4
        for url in (f"http://127.0.0.1:{llama}/v1/models", f"http://127.0.0.1:{mlflow}/health",
                    f"http://127.0.0.1:{dagster}/server_info", f"http://127.0.0.1:{hub}/api/models/idp-local/tiny-llama"):
            assert url.split("/")[2] in out  # its host:port is printed
            assert httpx.get(url, timeout=10).status_code == 200

        # the main job (every asset, every partition) materialises end to end against the embedded lab, the
        # measurements once everything else has ended, what follows them after
        read_until(proc, r"main job: done", 1200, lines)
        out = "".join(lines)
        ended = re.findall(r"main job: (.+?) ended (\w+)", out)
        assert ended == [("everything but the measurements", "COMPLETED_SUCCESS"),
                         ("the measurements (benchmark_runs, rpc_latency)", "COMPLETED_SUCCESS"),
                         ("what follows the measurements", "COMPLETED_SUCCESS")], out + _failed_steps(dagster)
        assert out.index("everything but the measurements ended") < out.index("main job: the measurements (")
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
        assert processes_of(env["IDP_HOME"]) == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{dagster}/server_info", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_of(env["IDP_HOME"])


def _idp_up(tmp_path, *, dagster: int, lab_ports: dict[str, int]) -> tuple[subprocess.Popen, dict[str, str]]:
    lab = write_lab(tmp_path / "lab.yaml", endpoint_url=f"http://127.0.0.1:{lab_ports['llama']}",
                    mlflow_url=f"http://127.0.0.1:{lab_ports['mlflow']}", hub_url=f"http://127.0.0.1:{lab_ports['hub']}")
    env = {**os.environ, "IDP_HOME": str(tmp_path / "home"), "IDP_LAB": str(lab), "IDP_DAGSTER_PORT": str(dagster),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "idp_pipelines.cli", "up", "--no-run"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, env


def test_a_port_already_taken_is_an_error_naming_the_port_and_where_to_change_it(tmp_path):
    ports = {"llama": free_port(), "mlflow": free_port(), "hub": free_port()}
    dagster = free_port()
    with socket.socket() as taken:  # another program listening on the lab's MLflow port
        taken.bind(("127.0.0.1", ports["mlflow"]))
        taken.listen()
        proc, env = _idp_up(tmp_path, dagster=dagster, lab_ports=ports)
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            kill_processes_of(env["IDP_HOME"])
    assert proc.returncode == 1, out
    assert (f"error: MLflow cannot start: 127.0.0.1:{ports['mlflow']} is already in use by another program. "
            f"Fix: stop it, or change the port ({tmp_path / 'lab.yaml'}).") in out
    assert "started" not in out  # checked before anything starts: nothing to clean up
    # the Dagster port names the variable that sets it
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", dagster))
        taken.listen()
        proc, env = _idp_up(tmp_path, dagster=dagster, lab_ports=ports)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and f"127.0.0.1:{dagster} is already in use" in out and "IDP_DAGSTER_PORT" in out


def test_sigterm_during_start_up_stops_everything(tmp_path):
    ports = {"llama": free_port(), "mlflow": free_port(), "hub": free_port()}
    proc, env = _idp_up(tmp_path, dagster=free_port(), lab_ports=ports)
    lines: list[str] = []
    try:
        read_until(proc, r"started Dagster \(pid \d+", 300, lines)  # every service started, none ready yet
        pids = [int(p) for p in re.findall(r"\(pid (\d+),", "".join(lines))]
        assert len(pids) == 4 and "Ctrl-C stops everything" not in "".join(lines)
        proc.send_signal(signal.SIGTERM)  # what a service manager (or `kill`) sends to the launcher
        rest, _ = proc.communicate(timeout=120)
        assert "stopped." in rest and "was killed" not in rest
        assert proc.returncode != 0
        time.sleep(0.5)
        assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
        assert processes_of(env["IDP_HOME"]) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_processes_of(env["IDP_HOME"])
