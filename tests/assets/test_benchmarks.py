"""benchmark_runs against real servers into DuckDB, its checks, the nightly schedule and the change sensor."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
import yaml

from idp_pipelines.assets import benchmarks
from idp_pipelines.assets.benchmarks import NO_REGRESSION, SANE, evaluate_benchmark_triggers
from idp_pipelines.bench.suite import run_endpoint
from idp_pipelines.doubles.synthetic_server import SyntheticConfig, SyntheticServer
from idp_pipelines.cli import main as idp
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource, WarehouseResource
from idp_pipelines.warehouse import Warehouse
from tests.support import write_lab

EP = "local-llamacpp"


def _lab(tmp_path, url, bench=None, **endpoint_changes):
    path = write_lab(tmp_path / "lab.yaml", endpoint_url=url)
    data = yaml.safe_load(path.read_text())
    data["endpoints"][0].update(endpoint_changes)
    ep = data["endpoints"][0]
    if ep["kind"] != "llamacpp":  # the typed llama-server flags, and its compose service, belong to llama.cpp
        ep.pop("llamacpp", None)
        data["services"] = [s for s in data.get("services", []) if s.get("endpoint") != ep["name"]]
    data["benchmarks"].update(bench or {})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(lab_file, wh_path, tags=None):
    assets = {a.key.to_user_string(): a for a in benchmarks.build(load_lab(lab_file)).assets}
    return dg.materialize(
        [assets["benchmark_runs"]], partition_key=EP, tags=tags or {}, raise_on_error=False,
        resources={"lab": LabResource(path=str(lab_file)), "warehouse": WarehouseResource(path=str(wh_path))},
    )


def _checks(result):
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


# This shared 2-core test machine is rarely quiet: tests that need a passing sanity check lift the host-load
# limit (test_a_step_measured_under_load_is_flagged covers the flag itself).
QUIET_ENOUGH = {"max_other_load_cores": 64}


def test_sweep_of_the_real_llama_cpp_server_lands_in_duckdb(tmp_path, llama_base_url):
    lab_file, wh = _lab(tmp_path, llama_base_url, bench=QUIET_ENOUGH), tmp_path / "wh.duckdb"
    result = _run(lab_file, wh)
    assert result.success
    checks = _checks(result)
    assert checks[SANE].passed, checks[SANE].description
    assert checks[NO_REGRESSION].passed and "not enough baseline" in checks[NO_REGRESSION].description
    with Warehouse(wh).read() as con:
        run = con.execute("SELECT status, trigger, concurrencies, dagster_run_id, project_git_sha, engine_settings "
                          "FROM benchmark_runs").fetchone()
        steps = con.execute("SELECT concurrency, n_ok, n_requests, ttft_ms_p50, output_tokens_per_s "
                            "FROM benchmark_steps ORDER BY step_index").fetchall()
        # max, not min: a random-weight model can emit 16 byte tokens that never complete a UTF-8 character
        requests = con.execute("SELECT count(*), count(*) FILTER (WHERE error IS NULL), min(completion_tokens), "
                               "max(len(chunk_times)) FROM benchmark_requests").fetchone()
    assert run[:4] == ("complete", "manual", [1, 2], result.run_id)
    assert len(run[4]) == 40 and json.loads(run[5])["threads"] == 2
    assert [s[0] for s in steps] == [1, 2] and all(s[1] == s[2] == 8 for s in steps)
    assert all(s[3] > 0 and s[4] > 0 for s in steps)
    assert requests[0] == requests[1] == 16 and requests[2] >= 1 and requests[3] >= 1


def test_rejected_api_key_becomes_error_rows_and_a_failed_sanity_check(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_KEY", "sk-wrong-key")
    with SyntheticServer(SyntheticConfig(ttft_s=0.001, itl_s=0.0005, api_key="sk-right-key")) as server:
        lab_file = _lab(tmp_path, server.url, kind="vllm", api_key_env="BENCH_KEY")
        result = _run(lab_file, tmp_path / "wh.duckdb")
    assert result.success  # refused requests are findings, not a crash
    sane = _checks(result)[SANE]
    assert not sane.passed and "error rate 100%" in sane.description
    assert "run failed: no request was answered: auth x8: HTTP 401" in sane.description
    (mat,) = result.asset_materializations_for_node("benchmark_runs")
    assert mat.metadata["status"].value == "failed"
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        kinds = con.execute("SELECT DISTINCT error_kind FROM benchmark_requests").fetchall()
        errors = [e for (e,) in con.execute("SELECT error FROM benchmark_requests").fetchall()]
    assert kinds == [("auth",)]
    assert all("sk-wrong-key" not in e for e in errors)


def _fake_nightly(wh: Warehouse, tokens_per_s: float, ttft_ms: float, days_ago: int) -> None:
    run_id = uuid.uuid4().hex
    started = datetime.now(timezone.utc) - timedelta(days=days_ago)
    with wh.write() as con:
        con.execute("INSERT INTO benchmark_runs (run_id, endpoint, kind, host, base_url, load_model, harness_version, "
                    "trigger, started_at, status) VALUES (?, ?, 'vllm', 'localhost', 'http://x', 'sweep', '1', "
                    "'nightly', ?, 'complete')", [run_id, EP, started])
        for i, c in enumerate((1, 2)):
            con.execute("INSERT INTO benchmark_steps (run_id, step_index, step, mode, concurrency, started_at, "
                        "n_requests, n_ok, n_errors, ttft_ms_p50, output_tokens_per_s) "
                        "VALUES (?, ?, ?, 'concurrency', ?, ?, 8, 8, 0, ?, ?)",
                        [run_id, i, f"c{c}", c, started, ttft_ms, tokens_per_s * c])


def test_regression_against_the_nightly_baseline_is_flagged(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    # a baseline much faster than what the server below can do; three different nightlies so that only
    # the median gives 100k tok/s and 1 ms (mean 160k and 1.5 ms; latest 300k and 3 ms)
    for day, tput, ttft in ((1, 150_000, 3.0), (2, 50_000, 1.0), (3, 40_000, 0.5)):
        _fake_nightly(wh, tokens_per_s=tput, ttft_ms=ttft, days_ago=day)
    with SyntheticServer(SyntheticConfig(ttft_s=0.03, itl_s=0.002)) as server:
        result = _run(_lab(tmp_path, server.url, kind="vllm"), tmp_path / "wh.duckdb", tags={"idp/trigger": "nightly"})
    check = _checks(result)[NO_REGRESSION]
    assert not check.passed
    assert "below the baseline 100000.0 by more than 15%" in check.description
    assert "above the baseline 1.0 ms by more than 15%" in check.description
    assert check.metadata["baseline_runs"].value == 3
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        assert con.execute("SELECT count(*) FROM benchmark_runs WHERE trigger = 'nightly'").fetchone()[0] == 4


def test_a_crash_mid_sweep_keeps_the_steps_already_measured(tmp_path):
    with SyntheticServer(SyntheticConfig(ttft_s=0.001, itl_s=0.0005)) as server:
        lab = load_lab(_lab(tmp_path, server.url, kind="vllm"))
        wh = Warehouse(tmp_path / "wh.duckdb")

        def progress(step, done, total):
            if step == "c2":
                raise MemoryError("the client process dies during the second step")

        with pytest.raises(MemoryError):
            run_endpoint(lab, EP, wh, trigger="cli", progress=progress)
    with wh.read() as con:
        status, error = con.execute("SELECT status, error FROM benchmark_runs").fetchone()
        steps = con.execute("SELECT concurrency, n_ok FROM benchmark_steps").fetchall()
    assert status == "failed" and "MemoryError: the client process dies" in error
    assert steps == [(1, 8)]


def test_nightly_schedule_requests_every_endpoint_once_per_night():
    from idp_pipelines.definitions import build_defs

    defs = build_defs(load_lab("labs/schlimers.yaml"))
    schedule = defs.get_schedule_def("nightly_benchmarks_schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc),
                                    repository_def=defs.get_repository_def())
    requests = schedule.evaluate_tick(ctx).run_requests
    # Triton's own API is not OpenAI-compatible: it is probed (inference_endpoints), not benchmarked
    assert [(r.partition_key, r.run_key, r.tags["idp/trigger"]) for r in requests] == [
        (ep, f"nightly:2026-11-27:{ep}", "nightly") for ep in ("vllm-gpu", "llamacpp-cpu", "jetson-edge")]


def _tick(lab_file, cursor, now, instance):
    with dg.build_sensor_context(cursor=cursor, instance=instance) as ctx:
        return evaluate_benchmark_triggers(ctx, load_lab(lab_file), now)


def test_change_sensor_debounces_settings_edits_and_model_updates(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    lab_file = _lab(tmp_path, "http://127.0.0.1:9")
    t = time.time()
    first = _tick(lab_file, None, t, instance)
    assert first.run_requests == [] and first.skip_reason.skip_message == "no endpoint changed"
    cursor = first.cursor
    assert _tick(lab_file, cursor, t + 10, instance).run_requests == []

    # the owner edits the serving settings: nothing until the change has settled for debounce_s (30 s)
    _lab(tmp_path, "http://127.0.0.1:9", llamacpp={"ctx_size": 1024, "threads": 2, "parallel": 2})
    pending = _tick(lab_file, cursor, t + 20, instance)
    assert pending.run_requests == [] and "waiting 30 s" in pending.skip_reason.skip_message
    assert _tick(lab_file, pending.cursor, t + 40, instance).run_requests == []  # 20 s: still settling
    fired = _tick(lab_file, pending.cursor, t + 51, instance)
    assert [(r.partition_key, r.tags["idp/trigger"]) for r in fired.run_requests] == [(EP, "sensor")]
    assert _tick(lab_file, fired.cursor, t + 200, instance).run_requests == []  # fired once

    # the model it serves is downloaded again, then quantized: one run once both have settled
    instance.report_runless_asset_event(dg.AssetMaterialization("hub_model", partition="tiny-llama"))
    instance.report_runless_asset_event(dg.AssetMaterialization("gguf_model", partition="tiny-llama"))
    now = time.time()
    assert _tick(lab_file, fired.cursor, now + 5, instance).run_requests == []
    model_run = _tick(lab_file, fired.cursor, now + 31, instance)
    assert len(model_run.run_requests) == 1 and "model:" in model_run.run_requests[0].tags["idp/change"]
    assert _tick(lab_file, model_run.cursor, now + 100, instance).run_requests == []

    # a benchmark that already followed the model (the nightly, make up's backfill) leaves nothing to do
    instance.report_runless_asset_event(dg.AssetMaterialization("hub_model", partition="tiny-llama"))
    instance.report_runless_asset_event(dg.AssetMaterialization("benchmark_runs", partition=EP))
    assert _tick(lab_file, model_run.cursor, time.time() + 100, instance).run_requests == []


def test_change_sensor_waits_while_a_benchmark_of_the_endpoint_is_queued_or_running(tmp_path):
    """A model downloaded while a benchmark of its endpoint is already queued (by hand, a backfill, the
    nightly) is measured by that run: the sensor adds no second one behind it."""
    from idp_pipelines.definitions import build_defs

    instance = dg.DagsterInstance.ephemeral()
    lab_file = _lab(tmp_path, "http://127.0.0.1:9")
    first = _tick(lab_file, None, time.time(), instance)
    instance.report_runless_asset_event(dg.AssetMaterialization("gguf_model", partition="tiny-llama"))
    job = build_defs(load_lab(lab_file)).resolve_job_def("benchmarks_job")
    queued = instance.create_run_for_job(job, tags={"dagster/partition": EP})  # NOT_STARTED: launched, not yet running
    later = time.time() + 60  # past the 30 s debounce
    busy = _tick(lab_file, first.cursor, later, instance)
    assert busy.run_requests == []
    assert busy.skip_reason.skip_message == f"a benchmark is already queued or running for: {EP}"
    # once that run is over (here: without measuring), the unmeasured model is benchmarked
    instance.report_run_canceled(queued)
    fired = _tick(lab_file, busy.cursor, later + 1, instance)
    assert [r.partition_key for r in fired.run_requests] == [EP] and "model:" in fired.run_requests[0].tags["idp/change"]


def test_cli_benchmarks_an_endpoint_with_a_table(tmp_path, llama_base_url, capsys, monkeypatch):
    lab_file = _lab(tmp_path, llama_base_url)
    assert idp(["bench", EP, "--concurrency", "1,2", "--requests", "3", "--max-tokens", "4",
                "--lab", str(lab_file)]) == 0
    out = capsys.readouterr().out
    assert "concurrency" in out and "output_tokens_per_s" in out and "(complete)" in out
    with Warehouse(tmp_path / "idp-home" / "warehouse.duckdb").read() as con:
        assert con.execute("SELECT trigger, concurrencies FROM benchmark_runs").fetchall() == [("cli", [1, 2])]
        assert con.execute("SELECT count(*) FROM benchmark_requests").fetchone()[0] == 6
    assert idp(["bench", "nope", "--lab", str(lab_file)]) == 2
    assert "unknown endpoint 'nope'" in capsys.readouterr().err


def test_rpc_tuning_and_findings_follow_a_run(tmp_path, llama_base_url):
    from idp_pipelines.settings import idp_home

    lab_file, wh = _lab(tmp_path, llama_base_url), tmp_path / "wh.duckdb"
    res = {"lab": LabResource(path=str(lab_file)), "warehouse": WarehouseResource(path=str(wh))}
    assets = {a.key.to_user_string(): a for a in benchmarks.build(load_lab(lab_file)).assets}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([assets["benchmark_runs"]], partition_key=EP, resources=res, instance=instance).success
    rpc = dg.materialize([assets["rpc_latency"]], partition_key="localhost", resources=res, instance=instance)
    assert rpc.success
    (m,) = rpc.asset_materializations_for_node("rpc_latency")
    assert m.metadata["probes"].value == 100 and m.metadata["failures"].value == 0
    assert 0 < m.metadata["p50_ms"].value < 1000

    result = dg.materialize([assets["benchmark_tuning"], assets["hardware_findings"]], resources=res,
                            instance=instance, selection=["benchmark_tuning", "hardware_findings"])
    assert result.success
    tuning = json.loads((idp_home() / "reports" / "benchmark_tuning.json").read_text())
    assert tuning[EP]["setting"] == "parallel" and tuning[EP]["recommended"] in (1, 2)
    report = (idp_home() / "reports" / "hardware_findings.md").read_text()
    assert "# Hardware findings: local" in report
    assert "| tiny model TTFT under 500 ms |" in report and "loopback round trip p50 under 20 ms" in report
    with Warehouse(wh).read() as con:
        assert con.execute("SELECT endpoint, setting FROM benchmark_tuning").fetchall() == [(EP, "parallel")]


def test_gpu_figures_come_from_the_hosts_dcgm_exporter(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    text = (b"# TYPE DCGM_FI_DEV_GPU_UTIL gauge\nDCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-1\"} 87\n"
            b"# TYPE DCGM_FI_DEV_FB_USED gauge\nDCGM_FI_DEV_FB_USED{gpu=\"0\",UUID=\"GPU-1\"} 12800\n")

    class Exporter(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args):
            pass

    dcgm = ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=dcgm.serve_forever, daemon=True).start()
    try:
        with SyntheticServer(SyntheticConfig(ttft_s=0.001, itl_s=0.0005)) as server:
            path = _lab(tmp_path, server.url, kind="vllm")
            data = yaml.safe_load(path.read_text())
            data["hosts"][0]["dcgm_url"] = f"http://127.0.0.1:{dcgm.server_port}/metrics"
            path.write_text(yaml.safe_dump(data))
            wh = Warehouse(tmp_path / "wh.duckdb")
            run_endpoint(load_lab(path), EP, wh, trigger="manual")
    finally:
        dcgm.shutdown()
    with wh.read() as con:
        rows = con.execute("SELECT gpu_utilization_pct, gpu_memory_used_gb FROM benchmark_steps").fetchall()
    assert rows == [(87.0, 12.5), (87.0, 12.5)]


def test_an_endpoint_without_an_openai_api_is_refused_clearly(tmp_path):
    from idp_pipelines.bench.client import BenchError

    lab = load_lab(_lab(tmp_path, "http://127.0.0.1:9", kind="triton"))
    with pytest.raises(BenchError, match="kind 'triton', whose HTTP API is not OpenAI-compatible. Fix: add"):
        run_endpoint(lab, EP, Warehouse(tmp_path / "wh.duckdb"), trigger="manual")
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        assert con.execute("SELECT count(*) FROM benchmark_runs").fetchone()[0] == 0


HOLD_SLOT = """
import sys, time
from idp_pipelines.bench.suite import host_slot
with host_slot(sys.argv[1], holder="a sweep started by hand"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_measurement_waits_for_its_hosts_slot_and_names_who_holds_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    from idp_pipelines.bench import suite

    lab = load_lab(_lab(tmp_path, "http://127.0.0.1:9", kind="vllm"))
    host = lab.endpoint(EP).host
    wh = Warehouse(tmp_path / "wh.duckdb")
    other = subprocess.Popen([sys.executable, "-c", HOLD_SLOT, host, "30"], stdout=subprocess.PIPE)
    try:
        assert other.stdout.readline() == b"held\n"
        monkeypatch.setattr(suite, "HOST_SLOT_WAIT_S", 0.5)
        with pytest.raises(suite.BenchError, match=rf"measurement slot of host '{host}' .* held by a sweep started by "
                                                   rf"hand \(pid {other.pid}\)"):
            run_endpoint(lab, EP, wh, trigger="cli")
        with wh.read() as con:
            assert con.execute("SELECT count(*) FROM benchmark_runs").fetchone()[0] == 0  # nothing started
    finally:
        other.kill()
        other.wait()
    # the holder is gone (killed, even): the slot is free at once
    with SyntheticServer(SyntheticConfig(ttft_s=0.001, itl_s=0.0005)) as server:
        lab = load_lab(_lab(tmp_path, server.url, kind="vllm"))
        assert run_endpoint(lab, EP, wh, trigger="cli").status == "complete"


RELEASE_SLOT = """
import sys, time
from idp_pipelines.bench.suite import host_slot
with host_slot(sys.argv[1], holder="a sweep started by hand"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    print(time.time(), flush=True)
"""


def test_a_measurement_waits_for_its_hosts_slot_and_then_proceeds(tmp_path):
    import subprocess
    import sys

    with SyntheticServer(SyntheticConfig(ttft_s=0.001, itl_s=0.0005)) as server:
        lab = load_lab(_lab(tmp_path, server.url, kind="vllm"))
        wh = Warehouse(tmp_path / "wh.duckdb")
        other = subprocess.Popen([sys.executable, "-c", RELEASE_SLOT, lab.endpoint(EP).host, "1.5"],
                                 stdout=subprocess.PIPE)
        try:
            assert other.stdout.readline() == b"held\n"
            said: list[str] = []
            out = run_endpoint(lab, EP, wh, trigger="cli", log=said.append)
            released = float(other.stdout.readline())
        finally:
            other.kill()
            other.wait()
    assert out.status == "complete" and [s["n_ok"] for s in out.steps] == [8, 8]
    assert any("held by a sweep started by hand" in m and f"pid {other.pid}" in m for m in said), said
    with wh.read() as con:
        (started,) = con.execute("SELECT epoch(started_at) FROM benchmark_runs").fetchone()
    assert started >= released - 0.01  # nothing was measured while the other held the host


def test_cli_against_a_down_endpoint_says_what_failed_and_exits_nonzero(tmp_path, capsys):
    from tests.support import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    lab_file = _lab(tmp_path, dead)
    assert idp(["bench", EP, "--concurrency", "1,2", "--requests", "3", "--lab", str(lab_file)]) == 1
    out, err = capsys.readouterr()
    assert "(complete)" not in out and "(failed)" in out
    assert (f"error: the run failed: no request was answered: connection x3: cannot connect to {dead}/v1/completions: "
            "[Errno 111]") in err
    with Warehouse(tmp_path / "idp-home" / "warehouse.duckdb").read() as con:
        status, error, errors = con.execute("SELECT status, error, errors FROM benchmark_runs").fetchone()
        steps = con.execute("SELECT concurrency, n_ok FROM benchmark_steps").fetchall()
    assert status == "failed" and error.startswith("no request was answered: connection x3")
    assert json.loads(errors)["connection"][0] == 3
    assert steps == [(1, 0)]  # the c=2 step was not run against a server that answered nothing


BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


def test_a_step_measured_under_load_is_flagged(tmp_path):
    import subprocess
    import sys

    with SyntheticServer(SyntheticConfig(ttft_s=0.05, itl_s=0.01)) as server:
        lab_file = _lab(tmp_path, server.url, bench={"max_other_load_cores": 0.1, "concurrency": [1],
                                                      "requests_per_step": 40}, kind="vllm")
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            result = _run(lab_file, tmp_path / "wh.duckdb")
        finally:
            busy.kill()
            busy.wait()
    sane = _checks(result)[SANE]
    assert not sane.passed and "c=1: measured under load: other processes used" in sane.description
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        load, top = con.execute("SELECT host_other_cpu_cores, host_other_top FROM benchmark_steps").fetchone()
    # a spinning process gets at least a share of a core even on a busy machine; the harness is not counted
    assert load > 0.2 and os.getpid() not in [t["pid"] for t in json.loads(top)]


def test_cli_warns_about_a_step_measured_under_load(tmp_path, capsys):
    import subprocess
    import sys

    with SyntheticServer(SyntheticConfig(ttft_s=0.05, itl_s=0.01)) as server:
        lab_file = _lab(tmp_path, server.url, bench={"max_other_load_cores": 0.1}, kind="vllm")
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            assert idp(["bench", EP, "--concurrency", "1", "--requests", "20", "--lab", str(lab_file)]) == 0
        finally:
            busy.kill()
            busy.wait()
    out, err = capsys.readouterr()
    assert "(complete)" in out
    assert "warning: c=1: measured under load: other processes used" in err
    assert "(limit benchmarks.max_other_load_cores = 0.1)" in err
