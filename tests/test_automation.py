"""The chains a user relies on, through the real daemon of the embedded lab (`idp up --no-run`).

Sensor ticks by hand test the sensors' logic elsewhere; here nothing is ticked by hand: a commit in a
watched repo must reach the day's note, and a benchmark run must be followed by tuning, findings, MLflow
and its note, through `git_commit_sensor` and the `default_automation_condition_sensor` that the daemon
runs. The waits are generous (this is about whether it happens at all, not how fast): the git sensor
ticks every 60 s, the automation sensor every 30 s, and each run starts a process on a loaded 2-core box.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from idp_pipelines.settings import REPO_ROOT
from tests.support import free_port, kill_processes_of, read_until, write_lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

WAIT_S = 480  # per chain: 8 min
POLL_S = 2
# Secrets the lab names (an endpoint's key variable, the Hub's token variable): no store may hold them.
LLAMA_KEY = "sk-idp-test-" + uuid.uuid4().hex
HF_TOKEN = "hf_idptest" + uuid.uuid4().hex
FOLLOWERS = ("benchmark_tuning", "hardware_findings", "mlflow_experiments", "obsidian_notes")


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "Lab Owner", "GIT_AUTHOR_EMAIL": "owner@example.invalid",
           "GIT_COMMITTER_NAME": "Lab Owner", "GIT_COMMITTER_EMAIL": "owner@example.invalid"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _commit(repo: Path, subject: str) -> str:
    (repo / "log.txt").open("a").write(subject + "\n")
    _git(repo, "add", "log.txt")
    _git(repo, "commit", "-q", "-m", subject)
    return _git(repo, "rev-parse", "HEAD")


class Lab:
    """The embedded lab as a test sees it: its folders, its Dagster API."""

    def __init__(self, home: Path, repo: Path, dagster_port: int, mlflow_port: int, llama_port: int) -> None:
        self.home, self.repo, self.port = home, repo, dagster_port
        self.mlflow_port, self.llama_port = mlflow_port, llama_port

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        r = httpx.post(f"http://127.0.0.1:{self.port}/graphql", json={"query": query, "variables": variables or {}},
                       timeout=60, trust_env=False)
        r.raise_for_status()
        body = r.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def sensor_status(self, name: str) -> str:
        q = ("query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename "
             "... on Sensor { sensorState { status } } } }")
        sel = {"repositoryLocationName": "idp_pipelines", "repositoryName": "__repository__", "sensorName": name}
        out = self.graphql(q, {"s": sel})["sensorOrError"]
        return out["sensorState"]["status"] if out["__typename"] == "Sensor" else out["__typename"]

    def latest(self, asset: str) -> dict | None:
        """The asset's latest materialisation: timestamp (ms), run id, metadata entries."""
        q = ("query($k: AssetKeyInput!) { assetOrError(assetKey: $k) { ... on Asset { "
             "assetMaterializations(limit: 1) { timestamp runId partition "
             "metadataEntries { label ... on TextMetadataEntry { text } } } } } }")
        mats = (self.graphql(q, {"k": {"path": [asset]}})["assetOrError"] or {}).get("assetMaterializations") or []
        return mats[0] if mats else None

    def backfill(self, asset: str, partitions: list[str]) -> str:
        q = ("mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename "
             "... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }")
        out = self.graphql(q, {"p": {"assetSelection": [{"path": [asset]}], "partitionNames": partitions}})
        out = out["launchPartitionBackfill"]
        assert out["__typename"] == "LaunchBackfillSuccess", out
        return out["backfillId"]

    def backfill_status(self, backfill_id: str) -> str | None:
        q = "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"
        return self.graphql(q, {"id": backfill_id})["partitionBackfillOrError"].get("status")


def _wait(what: str, probe, timeout_s: float = WAIT_S):
    """Poll `probe` every POLL_S until it returns something truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(POLL_S)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("automation")
    repo = tmp / "watched"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _commit(repo, "first commit of the watched repo")
    llama, mlflow, dagster, hub = free_port(), free_port(), free_port(), free_port()
    lab_file = write_lab(tmp / "lab.yaml", endpoint_url=f"http://127.0.0.1:{llama}",
                         mlflow_url=f"http://127.0.0.1:{mlflow}", hub_url=f"http://127.0.0.1:{hub}",
                         extra={"git_repos": [{"name": "watched", "path": str(repo), "branches": ["main"]}]})
    data = yaml.safe_load(lab_file.read_text())
    data["endpoints"][0]["api_key_env"] = "IDP_TEST_LLAMA_KEY"
    lab_file.write_text(yaml.safe_dump(data, sort_keys=False))
    home = tmp / "home"
    env = {**os.environ, "IDP_HOME": str(home), "IDP_LAB": str(lab_file), "PYTHONUNBUFFERED": "1",
           "IDP_TEST_LLAMA_KEY": LLAMA_KEY, "HF_TOKEN": HF_TOKEN, "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen([sys.executable, "-m", "idp_pipelines.cli", "up", "--no-run", "--lab", str(lab_file),
                             "--dagster-port", str(dagster)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        read_until(proc, r"Ctrl-C stops everything", 400, lines)
        yield Lab(home, repo, dagster, mlflow, llama)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kill_processes_of(str(home))


def test_the_embedded_endpoint_is_llama_server_with_the_inventorys_flags(lab):
    """labs/local.yaml's llamacpp: block: 4 slots of 512 tokens (-c 2048 -np 4), --metrics, the key required."""
    base = f"http://127.0.0.1:{lab.llama_port}"
    auth = {"Authorization": f"Bearer {LLAMA_KEY}"}
    props = httpx.get(f"{base}/props", headers=auth, timeout=30, trust_env=False).json()
    assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 512
    metrics = httpx.get(f"{base}/metrics", headers=auth, timeout=30, trust_env=False)
    assert metrics.status_code == 200 and "llamacpp:prompt_tokens_total" in metrics.text
    assert httpx.get(f"{base}/props", timeout=30, trust_env=False).status_code == 401


def test_a_commit_in_a_watched_repo_becomes_a_line_in_the_days_note(lab):
    # the daemon evaluates automation conditions without anyone switching it on
    assert lab.sensor_status("default_automation_condition_sensor") == "RUNNING"
    assert lab.sensor_status("git_commit_sensor") == "RUNNING"
    subject = f"automation probe {uuid.uuid4().hex[:12]}"
    sha = _commit(lab.repo, subject)
    day = dt.datetime.fromtimestamp(int(_git(lab.repo, "log", "-1", "--format=%ct", sha)), dt.timezone.utc).date()
    note = lab.home / "vault" / "Dev Log" / f"{day:%Y-%m-%d}.md"  # labs/local.yaml: UTC, YYYY-MM-DD

    t0 = time.monotonic()
    _wait(f"the commit {sha[:12]} in {note}", lambda: note.exists() and subject in note.read_text())
    print(f"figure: the commit reached the day's note {time.monotonic() - t0:.0f} s after it was made")
    line = next(ln for ln in note.read_text().splitlines() if subject in ln)
    assert line.startswith("- ") and f"`{sha[:10]}` {subject}" in line and "Lab Owner" in line


def test_a_benchmark_run_is_followed_by_tuning_findings_mlflow_and_its_note(lab):
    before = {a: (lab.latest(a) or {}).get("timestamp") for a in FOLLOWERS}
    backfill = lab.backfill("benchmark_runs", ["local-llamacpp"])
    t0 = time.monotonic()
    _wait("the benchmark backfill to end", lambda: lab.backfill_status(backfill) not in (None, "REQUESTED"))
    t_bench = time.monotonic()
    assert lab.backfill_status(backfill) == "COMPLETED_SUCCESS"

    def followed():
        # The newest benchmark: the lab's own sensors may have measured too (the Hub sensor downloads the
        # model at start, and the trigger sensor benchmarks a new model), before or after this backfill.
        bench = lab.latest("benchmark_runs")
        latest = {a: lab.latest(a) for a in FOLLOWERS}
        return bench if all(m and float(m["timestamp"]) > float(bench["timestamp"]) and m["timestamp"] != before[a]
                            for a, m in latest.items()) else None

    bench = _wait("benchmark_tuning, hardware_findings, mlflow_experiments and obsidian_notes after the benchmark",
                  followed)
    run_id = next(e["text"] for e in bench["metadataEntries"] if e["label"] == "run_id")
    print(f"figure: benchmark backfill {t_bench - t0:.0f} s, its followers done {time.monotonic() - t_bench:.0f} s later")
    # What the owner then finds for that benchmark: the recommendation, the verdicts, the MLflow run, the
    # run's note. Waited for, not read once: when another benchmark of the lab (its sensors measure too)
    # ended while these followers were ending, the followers' materialisations above may be of the run
    # before, and the daemon runs them again for this one (assets/common.py, FOLLOW_UPDATES).
    tuning = lab.home / "reports" / "benchmark_tuning.json"
    _wait("the tuning recommendation from the benchmark",
          lambda: tuning.exists() and "local-llamacpp" in tuning.read_text() and run_id in tuning.read_text())
    _wait("the benchmark's findings", lambda: (lab.home / "reports" / "findings" / f"{run_id}.md").is_file())

    def in_mlflow() -> bool:
        runs = httpx.post(f"http://127.0.0.1:{lab.mlflow_port}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [_experiment_id(lab)], "max_results": 200}, timeout=30,
                          trust_env=False).json().get("runs", [])
        return any({"key": "idp.benchmark_run_id", "value": run_id} in r["data"]["tags"] for r in runs)

    _wait("the benchmark's MLflow run", in_mlflow)
    notes = _wait("the benchmark's note", lambda: list((lab.home / "vault" / "Benchmarks").glob(
        f"* local-llamacpp {run_id[:8]}.md")))
    assert run_id[:8] in notes[0].read_text()

    # the endpoint's key was live (the server refuses a request without it) and no store holds it
    r = httpx.post(f"http://127.0.0.1:{lab.llama_port}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                   timeout=30, trust_env=False)
    assert r.status_code == 401
    _assert_no_secret_in_dagster(lab, run_id)


def _experiment_id(lab: Lab) -> str:
    r = httpx.get(f"http://127.0.0.1:{lab.mlflow_port}/api/2.0/mlflow/experiments/get-by-name",
                  params={"experiment_name": "benchmarks/local-llamacpp"}, timeout=30, trust_env=False)
    return r.json()["experiment"]["experiment_id"]


def _assert_no_secret_in_dagster(lab: Lab, run_id: str) -> None:
    """Every event of every run (logs, materialisations and their metadata) and every byte Dagster, the
    vault, the reports and MLflow stored: no secret. The run id must be found, so the scan reads real data."""
    import dagster as dg
    from dagster._serdes import serialize_value

    secrets = (LLAMA_KEY, HF_TOKEN)
    with dg.DagsterInstance.from_config(str(lab.home / "dagster")) as instance:
        records = instance.get_run_records()
        assert records
        materialised = set()
        for rec in records:
            for entry in instance.all_logs(rec.dagster_run.run_id):
                text = serialize_value(entry)
                assert not [s for s in secrets if s in text], f"a secret in the event log of run {rec.dagster_run.run_id}"
                if entry.dagster_event and entry.dagster_event.is_step_materialization:
                    materialised.add(entry.dagster_event.asset_key.to_user_string())
        assert {"benchmark_runs", *FOLLOWERS} <= materialised
    found_run_id = False
    for folder in ("dagster", "vault", "reports", "mlflow", "logs"):
        for path in (lab.home / folder).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not [s for s in secrets if s.encode() in data], f"a secret in {path}"
                found_run_id |= run_id.encode() in data
    assert found_run_id
