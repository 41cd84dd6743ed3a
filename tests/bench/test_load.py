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


def _max_in_flight(records) -> int:
    """Most requests in flight at once: at each send, the earlier-sent ones that had not ended."""
    return max(1 + sum(o.t_sent <= r.t_sent < o.t_end for o in records if o is not r) for r in records)


def test_open_loop_caps_in_flight_requests_and_records_the_wait(server):
    # 200 ms requests arriving every 10 ms: without a cap many are in flight at once, with a cap of 2
    # the rest wait on the client, and that wait is recorded as queue time (never negative)
    ep = endpoint(server, ttft_s=0.2, itl_s=0.005)
    wl = Workload(max_tokens=4, ignore_eos=True)
    capped, free = run_benchmark(ep, wl, [
        request_rate(100, 20, seed=1, max_concurrency=2, name="capped"),
        request_rate(100, 20, seed=1, name="free"),
    ])
    sc = capped.summary()
    assert sc["n_ok"] == free.summary()["n_ok"] == 20
    assert _max_in_flight(capped.records) <= 2 < _max_in_flight(free.records)
    for r in capped.records + free.records:
        assert r.t_sent >= r.t_intended and r.t_first_token - r.t_sent >= 0.2  # injected TTFT: a lower bound
    # the 3rd capped request cannot be sent before one of the first two ended: it waited >= one request
    third = sorted(capped.records, key=lambda r: r.t_sent)[2]
    assert third.t_sent >= min(r.t_end for r in capped.records if r is not third and r.t_sent < third.t_sent)
    assert sc["queue_ms_p50"] >= 0 and sc["ttft_from_intended_ms_p50"] >= sc["ttft_ms_p50"]


def test_concurrency_sweep_runs_each_step_and_excludes_warmup(server):
    steps = concurrency_sweep([1, 4], lambda c: 2 * c, warmup_requests=2)
    results = run_benchmark(endpoint(server), Workload(max_tokens=4), steps)
    assert [r.name for r in results] == ["c1", "c4"]
    assert [len(r.records) for r in results] == [2, 8]
    assert all(r.warmup_count == 2 for r in results)


def test_a_step_against_a_server_in_its_own_process_at_concurrency_16():
    """Server in its own process, as in a real run. Only bounds that load cannot break are asserted: the
    injected latencies are lower bounds; how close the harness gets to them is `make bench`'s figure."""
    config = SyntheticConfig(ttft_s=0.05, itl_s=0.01)
    with synthetic_server_subprocess(config) as (_proc, url):
        ep = EndpointConfig(url, "synthetic", api="chat", engine="synthetic")
        steps = concurrency_sweep([16], 48, warmup_requests=16)
        step = run_benchmark(ep, Workload(max_tokens=32, ignore_eos=True), steps)[0]
    s = step.summary()
    assert s["n_ok"] == 48 and s["server_reported_tokens_fraction"] == 1.0 and s["retries"] == 0
    assert 12 <= _max_in_flight(step.records) <= 16  # never above the cap; launches may trail on a busy box
    assert s["ttft_ms_n"] == 48 and min(r.t_first_token - r.t_sent for r in step.records) >= 0.05
    assert min(r.t_last_token - r.t_sent for r in step.records) >= 0.05 + 31 * 0.01
    assert all(len(r.chunk_times) == 32 and r.chunk_times == sorted(r.chunk_times) for r in step.records)
    assert s["ttft_ms_p50_sufficient"] and not s["ttft_ms_p99_sufficient"]
