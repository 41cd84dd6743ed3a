from __future__ import annotations

import math

import pytest

from idp_pipelines.bench import metrics
from idp_pipelines.bench.records import RequestRecord
from idp_pipelines.bench.server_metrics import (
    metrics_delta,
    parse_prometheus_text,
    prefix_cache_hit_rate,
)


def record(ttft=0.05, itl=0.01, tokens=11, intended=0.0, sent=0.0, error=None, max_tokens=11):
    times = [sent + ttft + i * itl for i in range(tokens)]
    return RequestRecord(
        step="s", request_id=0, max_tokens=max_tokens, t_intended=intended, t_sent=sent,
        t_first_token=times[0], t_last_token=times[-1], t_end=times[-1], chunk_times=times,
        chunk_tokens=[1] * tokens, content_chunks=tokens, completion_tokens=tokens,
        server_reported_tokens=True, token_source="usage", error=error,
    )


def test_small_n_percentiles_are_marked_insufficient_not_reported_as_max():
    values = list(range(1, 51))
    p99 = metrics.percentile_ci(values, 99)
    assert not p99.sufficient and p99.value is None and p99.hi is None
    p50 = metrics.percentile_ci(values, 50)
    assert p50.sufficient and p50.lo <= p50.value <= p50.hi
    summary = metrics.summarize([record() for _ in range(50)])
    assert summary["ttft_ms_p99"] is None and summary["ttft_ms_p99_sufficient"] is False
    assert summary["ttft_ms_p50"] == pytest.approx(50.0)


def test_min_samples_matches_the_ci_boundary():
    for q in (50, 90, 95, 99):
        n = metrics.min_samples_for_percentile(q)
        assert metrics.percentile_ci(range(n), q).sufficient
        assert not metrics.percentile_ci(range(n - 1), q).sufficient
    assert metrics.min_samples_for_percentile(99) == 368  # p99 at 95 % needs hundreds


def test_ci_covers_the_true_median_about_95_percent_of_the_time():
    import numpy as np

    rng = np.random.default_rng(0)
    hits = sum(
        (e := metrics.percentile_ci(rng.exponential(1.0, 60), 50)).lo <= math.log(2) <= e.hi
        for _ in range(400)
    )
    assert hits / 400 >= 0.92


def test_per_request_latencies_follow_the_vllm_definitions():
    r = record(ttft=0.05, itl=0.01, tokens=11, intended=0.0, sent=0.004)
    assert metrics.ttft_s(r) == pytest.approx(0.05)
    assert metrics.tpot_s(r) == pytest.approx(0.01)
    assert metrics.e2e_s(r) == pytest.approx(0.15)
    assert metrics.queue_s(r) == pytest.approx(0.004)
    assert metrics.ttft_from_intended_s(r) == pytest.approx(0.054)
    assert metrics.itl_s(r) == pytest.approx([0.01] * 10)


def test_goodput_counts_only_requests_within_every_slo():
    fast, slow = record(ttft=0.05), record(ttft=0.5)
    failed = record(error="HTTP 500")
    s = metrics.summarize([fast, slow, failed], duration_s=1.0,
                          slos={"ttft_ms_max": 100, "tpot_ms_max": 20})
    assert s["goodput_requests_per_s"] == 1.0 and s["requests_per_s"] == 2.0
    assert s["error_rate"] == pytest.approx(1 / 3)
    assert s["output_tokens_per_s"] == 22.0
    with pytest.raises(ValueError, match="unknown SLO keys"):
        metrics.summarize([fast], slos={"ttft_p99": 1})


def test_roofline_flags_figures_above_the_bandwidth_ceiling():
    assert metrics.decode_ceiling_tok_s(100, 4e9) == pytest.approx(25.0)
    ok = metrics.roofline_check(20, 100, 4e9)
    assert ok["roofline_fraction"] == pytest.approx(0.8) and not ok["roofline_suspect"]
    assert metrics.roofline_check(30, 100, 4e9)["roofline_suspect"]


PROM_BEFORE = """# HELP vllm:prefix_cache_queries_total q
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{model_name="m"} 100
vllm:prefix_cache_hits_total{model_name="m"} 10
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 4
"""
PROM_AFTER = PROM_BEFORE.replace(" 100\n", " 300\n").replace("} 10\n", "} 160\n").replace(
    "} 3\n", "} 0\n").replace("} 4\n", "} 9\n")


def test_prometheus_delta_keeps_counter_increases_and_final_gauges():
    delta = metrics_delta(parse_prometheus_text(PROM_BEFORE), parse_prometheus_text(PROM_AFTER))
    assert delta.total("vllm:prefix_cache_queries_total") == 200
    assert delta.counters['vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"}'] == 5
    assert delta.gauges['vllm:num_requests_running{model_name="m"}'] == 0
    assert prefix_cache_hit_rate(delta) == pytest.approx(0.75)
