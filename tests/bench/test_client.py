"""The client against the synthetic server: every quirk becomes a correct record, never a crash."""

from __future__ import annotations

import dataclasses

import pytest

from idp_pipelines.bench.client import BenchError, EndpointConfig, Workload, length_control_params
from idp_pipelines.bench.load import fixed_concurrency, run_benchmark
from idp_pipelines.bench.metrics import request_row
from idp_pipelines.doubles.synthetic_server import SyntheticConfig, SyntheticServer
from tests.bench.conftest import API_KEY, endpoint


def run(ep, n=4, concurrency=4, workload=None, **kw):
    steps = [fixed_concurrency(concurrency, n, **kw)]
    return run_benchmark(ep, workload or Workload(max_tokens=8, ignore_eos=True), steps)[0]


@pytest.mark.parametrize("transport", ["fast", "httpcore"])
def test_role_only_first_chunk_is_not_the_first_token(server, transport):
    ep = dataclasses.replace(endpoint(server, role_chunk=True, ttft_s=0.05), transport=transport)
    step = run(ep)
    for r in step.records:
        assert r.ok, r.error
        # the role chunk arrives first; the first content token only after the injected TTFT (a lower
        # bound, which a loaded machine can only lengthen: counting the role chunk would give ~0 here)
        assert r.t_first_byte < r.t_first_token
        assert r.t_first_token - r.t_sent >= 0.045
        assert r.content_chunks == 8 and r.completion_tokens == 8 and r.finish_reason == "length"


def test_multi_token_chunks_are_counted_from_server_usage(server):
    step = run(endpoint(server, tokens_per_chunk=4), workload=Workload(max_tokens=16, ignore_eos=True))
    for r in step.records:
        assert r.content_chunks == 4
        assert r.completion_tokens == 16 and r.server_reported_tokens and r.token_source == "usage"
    assert step.summary()["length_honoured_fraction"] == 1.0


def test_without_usage_tokens_fall_back_to_chunks_and_are_flagged(server):
    # stopped by EOS before max_tokens, no usage: only the chunks are left to count, and it says so
    step = run(endpoint(server, usage="none", tokens_per_chunk=4, eos_after=8),
               workload=Workload(max_tokens=16))
    for r in step.records:
        assert not r.server_reported_tokens and r.token_source == "chunks"
        assert r.completion_tokens == 2  # undercount a consumer can see through the flag
    assert step.summary()["server_reported_tokens_fraction"] == 0.0


def test_without_usage_a_length_stop_gives_the_exact_count(server):
    # llama-cpp-python streams no usage, but finish_reason "length" means exactly max_tokens were made
    step = run(endpoint(server, usage="none", tokens_per_chunk=4), workload=Workload(max_tokens=16, ignore_eos=True))
    for r in step.records:
        assert r.finish_reason == "length" and r.token_source == "finish_reason"
        assert r.completion_tokens == 16 and r.server_reported_tokens
    assert step.summary()["length_honoured_fraction"] == 1.0


def test_usage_only_in_last_chunk_is_read(server):
    ep = dataclasses.replace(endpoint(server, usage="last_chunk"), include_usage=False)
    for r in run(ep).records:
        assert r.server_reported_tokens and r.completion_tokens == 8 and r.prompt_tokens > 0


def test_llamacpp_timings_give_tokens_and_cache_hits(server):
    ep = endpoint(server, api="completions", usage="none", llamacpp_timings=True)
    step = run(ep, n=6, concurrency=1)
    assert all(r.token_source == "timings" and r.completion_tokens == 8 for r in step.records)
    assert step.records[-1].cached_prompt_tokens > 0
    assert step.summary()["prefix_cache_hit_rate"] > 0


def test_error_mid_stream_becomes_a_record_and_others_are_kept(server):
    step = run(endpoint(server, error_every=3), n=9, concurrency=3)
    bad = [r for r in step.records if not r.ok]
    assert 1 <= len(bad) <= 4 and len(step.records) == 9
    for r in bad:
        assert r.error_kind == "stream_error"
        assert "error event mid-stream" in r.error and "injected mid-stream failure" in r.error
        assert r.content_chunks > 0 and r.t_end is not None  # measured part is kept
    good = [r for r in step.records if r.ok]
    assert all(r.completion_tokens == 8 for r in good)
    s = step.summary()
    assert s["n_errors"] == len(bad) and s["errors_by_kind"] == {"stream_error": len(bad)}


def test_dropped_connection_becomes_a_record_and_others_are_kept(server):
    step = run(endpoint(server, drop_every=3), n=9, concurrency=3)
    bad = [r for r in step.records if not r.ok]
    assert 1 <= len(bad) <= 4
    for r in bad:
        assert r.error_kind == "connection" and "connection dropped mid-stream" in r.error
    assert sum(r.ok for r in step.records) == 9 - len(bad)


def test_wrong_api_key_says_so_without_leaking_the_key(server):
    wrong = "sk-wrong-secret-123456"
    step = run(endpoint(server, key=wrong), n=2, concurrency=2)
    for r in step.records:
        assert r.error_kind == "auth" and r.http_status == 401
        assert "API key was rejected" in r.error
        assert wrong not in r.error and wrong not in repr(request_row(r))
    ep = endpoint(server, key=wrong)
    assert wrong not in repr(ep) and API_KEY not in repr(endpoint(server))


def test_http_error_status_is_recorded_with_the_url(server):
    step = run(endpoint(server, http_status=503), n=2, concurrency=2)
    assert all(r.error_kind == "http_status" and "HTTP 503" in r.error and server.url in r.error
               for r in step.records)


def test_unreachable_server_and_timeouts_become_records():
    ep = EndpointConfig("http://127.0.0.1:9", "m", engine="synthetic", connect_timeout_s=2)
    step = run(ep, n=2, concurrency=2)
    assert all(r.error_kind == "connection" and "127.0.0.1:9" in r.error for r in step.records)


def test_read_timeout_is_a_timeout_record(server):
    ep = dataclasses.replace(endpoint(server, ttft_s=1.0), read_timeout_s=0.2)
    step = run(ep, n=2, concurrency=2)
    assert all(r.error_kind == "timeout" for r in step.records), [r.error for r in step.records]


def test_step_duration_limit_aborts_in_flight_and_keeps_finished(server):
    # ~30 ms requests, far more than a 3 s step can hold: some finish, the two in flight at the limit are
    # aborted, the rest are never sent (margins that a loaded machine cannot eat)
    ep = endpoint(server, ttft_s=0.01, itl_s=0.005)
    step = run(ep, n=100_000, concurrency=2, max_duration_s=3.0,
               workload=Workload(max_tokens=4, ignore_eos=True))
    done = [r for r in step.records if r.ok]
    aborted = [r for r in step.records if r.error_kind == "aborted"]
    assert done and 1 <= len(aborted) <= 2 and len(step.records) == len(done) + len(aborted) < 100_000
    assert all("max_duration_s" in r.error for r in aborted)


def test_length_control_and_honoured_check(server):
    ep = endpoint(server, eos_after=3)
    early = run(ep, workload=Workload(max_tokens=8)).summary()
    forced = run(ep, workload=Workload(max_tokens=8, ignore_eos=True)).summary()
    at_least = run(ep, workload=Workload(max_tokens=8, min_tokens=8)).summary()
    assert early["length_honoured_fraction"] == 0.0
    assert forced["length_honoured_fraction"] == 1.0 and at_least["length_honoured_fraction"] == 1.0
    assert length_control_params("vllm", 8, True, 8) == {"max_tokens": 8, "ignore_eos": True,
                                                         "min_tokens": 8}
    assert length_control_params("llamacpp", 8, True, None) == {"max_tokens": 8, "ignore_eos": True}
    # llama-cpp-python's server honours min_tokens (the C++ server ignores it and takes ignore_eos)
    assert length_control_params("llamacpp", 8, True, 8) == {"max_tokens": 8, "ignore_eos": True,
                                                             "min_tokens": 8}
    with pytest.raises(BenchError, match="cannot force"):
        length_control_params("openai", 8, True, None)


def test_cache_bust_defeats_the_prefix_cache(server):
    prompts = ("the same long shared system prompt for every request here",)
    shared = run(endpoint(server), n=6, workload=Workload(prompts=prompts, max_tokens=4))
    busted = run(endpoint(server), n=6,
                 workload=Workload(prompts=prompts, max_tokens=4, cache_bust=True))
    assert shared.summary()["server_prefix_cache_hit_rate"] > 0.5
    assert busted.summary()["server_prefix_cache_hit_rate"] == 0.0
    assert busted.summary()["prefix_cache_hit_rate"] == 0.0


def test_progress_callback_reports_each_completion(server):
    seen = []
    steps = [fixed_concurrency(3, 7, warmup_requests=2, name="p")]
    result = run_benchmark(endpoint(server), Workload(max_tokens=4), steps,
                           progress=lambda *a: seen.append(a))[0]
    assert seen[-1] == ("p", 7, 7) and len(seen) == 7
    assert len(result.records) == 7 and result.warmup_count == 2
    assert all(r.request_id >= 0 for r in result.records)


@pytest.mark.parametrize("close_after_s", [0.0, 0.15])
def test_a_server_that_closes_after_each_response_costs_no_errors_and_no_waiting(close_after_s):
    """llama-server closes after every streamed response while saying Keep-Alive. A request that meets
    such a dead pooled connection is resent on a fresh one, counted, and timed from the resend; the
    origin is not pooled again (a server closing 150 ms late would otherwise add 150 ms to every TTFT)."""
    config = SyntheticConfig(ttft_s=0.02, itl_s=0.002, close_after_stream_s=close_after_s)
    with SyntheticServer(config) as srv:
        ep = EndpointConfig(srv.url, "synthetic", engine="synthetic", api="chat")
        step = run(ep, n=12, concurrency=1, workload=Workload(max_tokens=4, ignore_eos=True))
        closes = srv._state.closes
    s = step.summary()
    assert s["n_ok"] == 12 and s["n_errors"] == 0 and closes >= 1
    # closing late, the server leaves the first pooled connection looking alive: the one request that met
    # it is resent; then the origin is not pooled again. Closing at once, the close is seen before reuse.
    # (A client stalled past the 150 ms sees the close first and needs no resend: at most one, never an error.)
    assert s["retries"] <= 1
    assert sum(r.retries for r in step.records) == s["retries"]
    by_send = sorted(step.records, key=lambda r: r.t_sent)
    for prev, r in zip(by_send, by_send[1:]):
        # every request was answered on a connection opened after the previous response; one that first
        # met the dead connection is timed from the attempt that was answered, after the server's close
        assert r.t_sent >= prev.t_end
        if r.retries:
            assert r.t_sent >= prev.t_end + close_after_s * 0.9
        assert r.t_first_token - r.t_sent >= 0.02  # the injected TTFT is a lower bound
