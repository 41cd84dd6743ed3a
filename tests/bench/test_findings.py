from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from idp_pipelines.bench.findings import METRICS, FindingsReport, Measurement, build_findings, judge
from idp_pipelines.bench.rpc import RpcLatency
from idp_pipelines.lab import Expectation, load_lab
from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import Warehouse

NOW = datetime(2026, 1, 14, 9, 30, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def lab():
    return load_lab(REPO_ROOT / "labs" / "schlimers.yaml")


def _insert(con, table: str, row: dict) -> None:
    con.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def add_run(con, run_id, endpoint, started_at, *, host="schlimers-server", kind="vllm", status="complete",
            engine_settings=None):
    _insert(con, "benchmark_runs", {
        "run_id": run_id, "endpoint": endpoint, "kind": kind, "host": host, "base_url": "http://x:1",
        "engine_settings": json.dumps(engine_settings or {}), "load_model": "concurrency",
        "harness_version": "test", "trigger": "test", "started_at": started_at, "status": status,
    })


def add_step(con, run_id, index, concurrency, **cols):
    row = {"run_id": run_id, "step_index": index, "step": f"c{concurrency}", "mode": "concurrency",
           "concurrency": concurrency, "started_at": "2026-01-12 02:00:00+00", "n_requests": 200, "n_ok": 200,
           "n_errors": 0, "error_rate": 0.0, "ttft_ms_n": 200}
    row.update(cols)
    _insert(con, "benchmark_steps", row)


def add_rpc(con, host, measured_at, samples, *, failures=0, dagster_run_id="dg-rpc"):
    r = RpcLatency(target_url="http://192.168.1.50:8001/health", probes=len(samples) + failures,
                   failures=failures, samples_ms=list(samples), connect_samples_ms=[0.4, 0.5])
    _insert(con, "rpc_latency", {"measured_at": measured_at, "dagster_run_id": dagster_run_id, "host": host,
                                 **r.row()})


def rpc_samples() -> list[float]:
    """400 probes: the bulk 2.2-2.8 ms, a tail 3.5-4.5 ms, four 20 ms outliers."""
    rng = np.random.default_rng(0)
    xs = np.concatenate([np.linspace(2.2, 2.8, 380), np.linspace(3.5, 4.5, 16), [20.0] * 4])
    rng.shuffle(xs)
    return [float(x) for x in xs]


@pytest.fixture
def wh(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    with wh.write() as con:
        # vLLM: an older run that would confirm throughput, then the latest one
        add_run(con, "vllm-old", "vllm-gpu", "2026-01-10 02:00:00+00")
        add_step(con, "vllm-old", 0, 1, ttft_ms_p50=20.0, ttft_ms_p50_lo=19.0, ttft_ms_p50_hi=21.0,
                 output_tok_s_per_request=80.0, tpot_ms_p50=12.5, tpot_ms_p50_lo=12.0, tpot_ms_p50_hi=13.0,
                 gpu_utilization_pct=90.0, gpu_memory_used_gb=13.0)
        add_run(con, "vllm-new", "vllm-gpu", "2026-01-12 02:00:00+00")
        add_step(con, "vllm-new", 0, 1, ttft_ms_p50=110.0, ttft_ms_p50_lo=100.0, ttft_ms_p50_hi=120.0,
                 ttft_ms_p95=180.0, ttft_ms_p95_lo=170.0, ttft_ms_p95_hi=230.0,
                 output_tok_s_per_request=45.0, tpot_ms_p50=22.0, tpot_ms_p50_lo=21.0, tpot_ms_p50_hi=23.0,
                 output_tokens_per_s=45.0, gpu_utilization_pct=97.0, gpu_memory_used_gb=13.1)
        add_step(con, "vllm-new", 1, 8, ttft_ms_p50=130.0, output_tokens_per_s=300.0,
                 gpu_utilization_pct=99.0, gpu_memory_used_gb=13.4)
        add_run(con, "vllm-broken", "vllm-gpu", "2026-01-13 02:00:00+00", status="failed")
        add_step(con, "vllm-broken", 0, 1, ttft_ms_p50=5.0, ttft_ms_p50_lo=4.0, ttft_ms_p50_hi=6.0)
        # llama.cpp, 10 threads: c=1 per-request and a sweep for the aggregate
        add_run(con, "cpu-10t", "llamacpp-cpu", "2026-01-12 03:00:00+00", kind="llamacpp",
                engine_settings={"threads": 10, "parallel": 8})
        for i, (c, agg) in enumerate([(1, 20.0), (2, 38.0), (4, 70.0), (8, 150.0)]):
            extra = dict(output_tok_s_per_request=20.0, tpot_ms_p50=50.0, tpot_ms_p50_lo=48.0,
                         tpot_ms_p50_hi=52.0) if c == 1 else {}
            add_step(con, "cpu-10t", i, c, output_tokens_per_s=agg, **extra)
        # Triton health round trip
        _insert(con, "endpoint_probes", {
            "probed_at": "2026-01-12 04:00:00+00", "dagster_run_id": "dg-probe", "endpoint": "triton-gpu",
            "kind": "triton", "host": "schlimers-server", "base_url": "http://x:8001", "required": True,
            "up": True, "probes": 5, "rtt_min_ms": 1.9, "rtt_p50_ms": 2.5, "rtt_max_ms": 4.0})
        _insert(con, "endpoint_probes", {  # a later probe found it down: no round trip
            "probed_at": "2026-01-12 05:00:00+00", "dagster_run_id": "dg-probe2", "endpoint": "triton-gpu",
            "kind": "triton", "host": "schlimers-server", "base_url": "http://x:8001", "required": True,
            "up": False, "probes": 0})
        add_rpc(con, "jetson-orin", "2026-01-12 06:00:00+00", rpc_samples())
    return wh


def verdicts(report: FindingsReport) -> dict[str, str]:
    return {v.name: v.verdict for v in report.verdicts}


def test_verdicts_against_the_warehouse(wh, lab):
    report = build_findings(wh, lab, now=NOW)
    assert len(report.verdicts) == len(lab.expectations) == 14
    assert verdicts(report) == {
        "vllm-ttft": "confirmed",            # CI [100, 120] inside [80, 150]
        "vllm-throughput": "refuted",        # 1000/TPOT CI [43.5, 47.6] below [60, 100]
        "vllm-gpu-memory": "confirmed",      # max 13.4 GB, no CI, inside [12, 14]
        "vllm-gpu-utilisation": "refuted",   # max 99 %, above [85, 95]
        "vllm-latency-p95": "inconclusive",  # CI [170, 230] straddles 200
        "cpu-single-thread": "not enough data",  # no run with threads=1
        "cpu-ten-threads": "refuted",        # ~20 tok/s, far below 120-150
        "cpu-aggregate": "confirmed",        # 150 tok/s at c=8 inside [144, 200]
        "jetson-throughput": "not enough data",  # never benchmarked
        "triton-latency": "confirmed",       # health RTT p50 2.5 ms (latest probe with a round trip)
        "rpc-min": "refuted",                # 2.2 ms above [1.5, 2]
        "rpc-p50": "confirmed",              # ~2.5 ms with a tight CI
        "rpc-p95": "inconclusive",           # CI reaches from the bulk into the tail across 3 ms
        "rpc-max": "refuted",                # 20 ms above [8, 15]
    }
    by = report.by_name()
    ttft = by["vllm-ttft"].measurement
    assert (ttft.value, ttft.lo, ttft.hi, ttft.n, ttft.run_id) == (110.0, 100.0, 120.0, 200, "vllm-new")
    tput = by["vllm-throughput"].measurement
    assert tput.value == 45.0 and tput.lo == pytest.approx(1000 / 23) and tput.hi == pytest.approx(1000 / 21)
    agg = by["cpu-aggregate"].measurement
    assert agg.value == 150.0 and not agg.has_ci and "concurrency 8" in agg.source
    assert by["vllm-gpu-memory"].measurement.run_id == "vllm-new"
    assert "threads = 1" in by["cpu-single-thread"].reason
    rpc95 = by["rpc-p95"].measurement
    assert rpc95.n == 400 and rpc95.lo < 3 < rpc95.hi
    assert by["triton-latency"].measurement.run_id == "dg-probe"
    assert by["rpc-p50"].measurement.run_id == "dg-rpc"


def test_markdown_table_and_revise_list(wh, lab):
    md = build_findings(wh, lab, now=NOW).to_markdown()
    assert md.startswith("# Hardware findings: schlimers\n")
    assert "Generated 2026-01-14 09:30:00 UTC" in md
    assert "14 claims of the seed plan: 5 confirmed, 5 refuted, 2 inconclusive, 2 without enough data" in md
    assert "| Claim | Seed section | Expected | Measured | 95 % CI | n | Verdict | Run |" in md
    assert "| vLLM TTFT 80-150 ms (not 22 ms) | 1.1 | 80–150 ms | 110 ms | [100, 120] | 200 | **confirmed** | vllm-new |" in md
    assert "| llama.cpp 10 threads + 8 parallel 144-200 tok/s aggregate | 1.2 | 144–200 tok/s | 150 tok/s | no CI | 200 | **confirmed** | cpu-10t |" in md
    assert "| Jetson 1B Q4 5-10 tok/s | 1.3 | 5–10 tok/s | — | — | — | not enough data | — |" in md
    assert "| Inference latency P95 < 200 ms for 8B models | Part 4 | 0–200 ms | 180 ms | [170, 230] | 200 | inconclusive | vllm-new |" in md
    revise = md.split("## What to revise")[1].split("## Still open")[0]
    for name in ("vllm-throughput", "vllm-gpu-utilisation", "cpu-ten-threads", "rpc-min", "rpc-max"):
        assert f"**{name}**" in revise
    assert "vllm-ttft" not in revise
    assert "**vllm-throughput** (seed 1.1): \"vLLM 60-100 tok/s (not 140-170)\": CI [43.5, 47.6] lies entirely below [60, 100] tok/s" in revise
    assert "**jetson-throughput** (not enough data)" in md.split("## Still open")[1]
    # machine-readable too
    data = json.loads(build_findings(wh, lab, now=NOW).to_json())
    assert data["counts"]["refuted"] == 5


def test_single_thread_run_and_insufficient_percentiles(wh, lab):
    with wh.write() as con:
        add_run(con, "cpu-1t", "llamacpp-cpu", "2026-01-13 03:00:00+00", kind="llamacpp",
                engine_settings={"threads": 1})
        add_step(con, "cpu-1t", 0, 1, output_tok_s_per_request=18.0, tpot_ms_p50=55.0, tpot_ms_p50_lo=52.0,
                 tpot_ms_p50_hi=58.0)
        # a newer vLLM run with only 40 requests: p95 cannot be bounded (stored as NULL)
        add_run(con, "vllm-small", "vllm-gpu", "2026-01-13 05:00:00+00")
        add_step(con, "vllm-small", 0, 1, ttft_ms_n=40, ttft_ms_p50=120.0, ttft_ms_p50_lo=110.0,
                 ttft_ms_p50_hi=160.0, ttft_ms_p95=None, ttft_ms_p95_lo=150.0, ttft_ms_p95_hi=None)
        # a newer RPC measurement with 30 successes out of 50
        add_rpc(con, "jetson-orin", "2026-01-13 06:00:00+00", [2.5 + 0.01 * i for i in range(30)], failures=20)
    report = build_findings(wh, lab, now=NOW)
    v = report.by_name()
    assert v["cpu-single-thread"].verdict == "confirmed"  # 1000/58..1000/52 = 17.2..19.2 inside [15, 25]
    assert v["cpu-single-thread"].measurement.run_id == "cpu-1t"
    assert v["cpu-ten-threads"].measurement.run_id == "cpu-10t"  # the newer threads=1 run is not used here
    assert v["vllm-ttft"].verdict == "inconclusive"  # CI [110, 160] straddles 150
    assert v["vllm-latency-p95"].verdict == "not enough data"
    assert "n=40" in v["vllm-latency-p95"].reason and ">= 72" in v["vllm-latency-p95"].reason
    assert v["rpc-p95"].verdict == "not enough data"
    assert v["rpc-p95"].measurement.n == 30
    assert v["rpc-p50"].verdict == "confirmed"


def test_judge_cases():
    x = Expectation(name="x", claim="c", metric="rpc_p50_ms", low=2, high=3, unit="ms", host="h")
    m = lambda value, lo=None, hi=None, **kw: Measurement("rpc_p50_ms", value, lo, hi, n=100, **kw)  # noqa: E731
    assert judge(x, m(2.5, 2.2, 2.8)).verdict == "confirmed"
    assert judge(x, m(2.0, 2.0, 3.0)).verdict == "confirmed"  # bounds are inclusive
    assert judge(x, m(3.5, 3.2, 3.9)).verdict == "refuted"
    assert judge(x, m(1.5, 1.2, 1.9)).verdict == "refuted"
    assert judge(x, m(2.9, 2.7, 3.3)).verdict == "inconclusive"
    assert judge(x, m(2.5, 1.5, 3.5)).verdict == "inconclusive"  # CI wider than the range
    assert judge(x, m(2.5)).verdict == "confirmed"  # no CI: the point decides
    assert "no CI" in judge(x, m(2.5)).reason
    assert judge(x, m(4.0)).verdict == "refuted"
    assert judge(x, m(3.5, 3.2, None)).verdict == "refuted"  # half a CI is no CI
    assert judge(x, None).verdict == "not enough data"
    assert judge(x, m(None, 2.0, None)).verdict == "not enough data"
    assert judge(x, m(2.5, 2.2, 2.8, sufficient=False, note="too few")).reason == "too few"


def test_empty_warehouse_and_unknown_metric(tmp_path, lab):
    report = build_findings(Warehouse(tmp_path / "empty.duckdb"), lab, now=NOW)
    assert set(verdicts(report).values()) == {"not enough data"}
    md = report.to_markdown()
    assert "| Claim |" in md and "Nothing is refuted" in md
    odd = lab.model_copy(update={"expectations": [
        Expectation(name="odd", claim="odd", metric="bogus_metric", low=0, high=1, unit="x")]})
    r = build_findings(Warehouse(tmp_path / "empty.duckdb"), odd, now=NOW)
    assert r.verdicts[0].verdict == "not enough data" and "unknown metric" in r.verdicts[0].reason
    none = build_findings(Warehouse(tmp_path / "empty.duckdb"), lab.model_copy(update={"expectations": []}))
    assert none.verdicts == [] and "no expectations" in none.to_markdown()


def test_missing_table_and_unreadable_warehouse(wh, lab, tmp_path):
    with wh.write() as con:
        con.execute("DROP TABLE rpc_latency")
    report = build_findings(wh, lab, now=NOW)
    v = report.by_name()
    assert v["rpc-p50"].verdict == "not enough data" and "could not read" in v["rpc-p50"].reason
    assert v["vllm-ttft"].verdict == "confirmed"  # the other tables still answer

    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"this is not a duckdb file" * 100)
    broken = build_findings(Warehouse(junk, lock_timeout_s=5), lab, now=NOW)
    assert len(broken.verdicts) == 14 and set(verdicts(broken).values()) == {"not enough data"}
    assert broken.warnings and "could not be read" in broken.to_markdown()


def test_every_lab_metric_is_mapped(lab):
    assert {x.metric for x in lab.expectations} <= set(METRICS)
