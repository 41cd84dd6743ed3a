"""Load models and the accuracy of the harness against injected latencies."""

from __future__ import annotations

import statistics

import pytest

from idp_pipelines.bench.client import EndpointConfig, Workload
from idp_pipelines.bench.load import (
    arrival_offsets,
    concurrency_sweep,
    request_rate,
    run_benchmark,
)
from idp_pipelines.doubles.synthetic_server import SyntheticConfig, synthetic_server_subprocess
from tests.bench.conftest import endpoint


def test_poisson_arrivals_are_seeded_and_have_the_requested_rate():
    spec = request_rate(50, 2000, seed=7)
    a, b = arrival_offsets(spec), arrival_offsets(request_rate(50, 2000, seed=7))
    assert a == b and a != arrival_offsets(request_rate(50, 2000, seed=8))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.08)
    assert arrival_offsets(request_rate(10, 3, arrival="constant")) == pytest.approx([0, 0.1, 0.2])


def test_open_loop_records_client_queue_time(server):
    ep = endpoint(server, ttft_s=0.02, itl_s=0.005)
    wl = Workload(max_tokens=8, ignore_eos=True)
    capped, free = run_benchmark(ep, wl, [
        request_rate(100, 20, seed=1, max_concurrency=2, name="capped"),
        request_rate(100, 20, seed=1, name="free"),
    ])
    sc, sf = capped.summary(), free.summary()
    assert sc["n_ok"] == sf["n_ok"] == 20
    # two slots serving ~55 ms requests cannot keep up with 100 req/s: requests queue client-side
    assert sc["queue_ms_p50"] > 50 > sf["queue_ms_p50"]
    assert sc["ttft_from_intended_ms_p50"] > sc["ttft_ms_p50"] + 50
    for r in capped.records:
        assert r.t_sent >= r.t_intended


def test_concurrency_sweep_runs_each_step_and_excludes_warmup(server):
    steps = concurrency_sweep([1, 4], lambda c: 2 * c, warmup_requests=2)
    results = run_benchmark(endpoint(server), Workload(max_tokens=4), steps)
    assert [r.name for r in results] == ["c1", "c4"]
    assert [len(r.records) for r in results] == [2, 8]
    assert all(r.warmup_count == 2 for r in results)


def test_measured_latencies_match_the_injected_ones_at_concurrency_16():
    """Server in its own process, as in a real run. Tolerances hold on a loaded 2-core box."""
    config = SyntheticConfig(ttft_s=0.05, itl_s=0.01)
    with synthetic_server_subprocess(config) as (_proc, url):
        ep = EndpointConfig(url, "synthetic", api="chat", engine="synthetic")
        steps = concurrency_sweep([16], 48, warmup_requests=16)
        step = run_benchmark(ep, Workload(max_tokens=32, ignore_eos=True), steps)[0]
    s = step.summary()
    assert s["n_ok"] == 48 and s["server_reported_tokens_fraction"] == 1.0
    assert abs(s["ttft_ms_p50"] - 50.0) < 5.0, s["ttft_ms_p50"]
    assert abs(s["tpot_ms_p50"] - 10.0) / 10.0 < 0.03, s["tpot_ms_p50"]
    assert abs(s["itl_ms_p50"] - 10.0) < 1.0
    assert s["ttft_ms_p50_sufficient"] and not s["ttft_ms_p99_sufficient"]
