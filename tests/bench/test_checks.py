"""The run judgements, without Dagster: regression against the baseline, step sanity, error digests."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from idp_pipelines.bench import checks
from idp_pipelines.bench.suite import baseline
from idp_pipelines.warehouse import Warehouse, insert_rows

EP = "ep"


def _nightly(wh: Warehouse, tokens_per_s: float, ttft_ms: float, days_ago: int, trigger: str = "nightly") -> None:
    run_id = uuid.uuid4().hex
    started = datetime.now(timezone.utc) - timedelta(days=days_ago)
    with wh.write() as con:
        insert_rows(con, "benchmark_runs", [{"run_id": run_id, "endpoint": EP, "kind": "vllm", "host": "h",
                                             "base_url": "http://x", "load_model": "sweep", "harness_version": "1",
                                             "trigger": trigger, "started_at": started, "status": "complete"}])
        insert_rows(con, "benchmark_steps", [
            {"run_id": run_id, "step_index": i, "step": f"c{c}", "mode": "concurrency", "concurrency": c,
             "started_at": started, "n_requests": 8, "n_ok": 8, "n_errors": 0,
             "ttft_ms_p95": ttft_ms * c, "output_tokens_per_s": tokens_per_s * c}
            for i, c in enumerate((1, 4))])


def test_baseline_is_the_median_not_the_mean_nor_the_latest(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    # newest first: 400, 120, 100, 90 tok/s at c=1 -> x4 at the top step; TTFT 9, 30, 10, 11 ms at c=1
    for days, tput, ttft in ((1, 400, 9), (2, 120, 30), (3, 100, 10), (4, 90, 11)):
        _nightly(wh, tput, ttft, days)
    _nightly(wh, 1, 1000, 0, trigger="cli")  # newer, but not a nightly: never part of the baseline
    base = baseline(wh, EP, exclude_run="none", runs=3)  # the last three nightlies: 400, 120, 100
    assert base["runs"] == 3
    assert base["output_tokens_per_s"] == 480.0  # median of 1600, 480, 400 (mean 826.7, latest 1600)
    assert base["ttft_ms"] == 10.0  # median of 9, 30, 10 (mean 16.3, latest 9): TTFT p95 at the lowest c


def test_regression_names_both_figures_against_the_baseline():
    base = {"runs": 3, "output_tokens_per_s": 480.0, "ttft_ms": 10.0}
    slow = checks.regression({"output_tokens_per_s": 300.0, "ttft_ms_p95": 20.0}, base, 0.15)
    assert not slow.passed
    assert slow.description == ("throughput 300.0 tok/s is below the baseline 480.0 by more than 15%; "
                                "TTFT 20.0 ms is above the baseline 10.0 ms by more than 15%")
    ok = checks.regression({"output_tokens_per_s": 420.0, "ttft_ms_p95": 11.0}, base, 0.15)
    assert ok.passed and ok.description == "within 15% of the median of 3 nightly runs"
    early = checks.regression({"output_tokens_per_s": 1.0}, {"runs": 2}, 0.15)
    assert early.passed and early.description == "not enough baseline yet: 2 earlier nightly run(s), 3 needed"


def _step(**kw):
    return {"concurrency": 4, "n_ok": 10, "error_rate": 0.0, "length_honoured_fraction": 1.0, **kw}


def test_sanity_flags_each_problem_of_a_step():
    fine = checks.sanity([_step(served_from_cache=0, host_other_cpu_cores=0.1)], cache_bust=True,
                         max_other_load_cores=0.5)
    assert fine.passed
    bad = checks.sanity([
        _step(concurrency=1, error_rate=0.5),
        _step(concurrency=2, length_honoured_fraction=0.5),
        _step(concurrency=4, served_from_cache=9, prefix_cache_hit_rate=0.93),
        _step(concurrency=8, host_other_cpu_cores=1.4,
              host_other_top='[{"pid": 42, "name": "cc1plus", "cpu_cores": 0.9}]'),
    ], cache_bust=True, max_other_load_cores=0.5)
    assert not bad.passed
    parts = bad.description.split("; ")
    assert parts == [
        "c=1: error rate 50%",
        "c=2: only 50% of requests produced max_tokens",
        "c=4: 9 of 10 prompts were served from the server's prompt cache although cache_bust is on (hit rate 0.93)",
        "c=8: measured under load: other processes used 1.40 cores of this host (limit "
        "benchmarks.max_other_load_cores = 0.5), mostly cc1plus (pid 42)",
    ]
    # without cache_bust, cache hits are what the user asked to measure
    assert checks.sanity([_step(served_from_cache=9)], cache_bust=False, max_other_load_cores=0.5).passed


def test_a_failed_run_is_insane_and_its_errors_are_summarised():
    recs = [SimpleNamespace(error_kind="connection", error=f"cannot connect to http://127.0.0.1:9 ({i})")
            for i in range(3)] + [SimpleNamespace(error_kind="timeout", error="timeout: ReadTimeout"),
                                  SimpleNamespace(error_kind=None, error=None)]
    digest = checks.error_digest(recs)
    assert digest == {"connection": [3, "cannot connect to http://127.0.0.1:9 (0)"],
                      "timeout": [1, "timeout: ReadTimeout"]}
    checks.error_digest(recs[:1], digest)  # a run accumulates its steps
    assert digest["connection"][0] == 4
    assert checks.describe_errors(digest) == ("connection x4: cannot connect to http://127.0.0.1:9 (0); "
                                              "timeout x1: timeout: ReadTimeout")
    judged = checks.sanity([], cache_bust=True, max_other_load_cores=0.5, run_error="no request was answered")
    assert not judged.passed and judged.description == "run failed: no request was answered"
