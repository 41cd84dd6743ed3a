"""The harness against llama.cpp's own C++ llama-server (-np 4 --metrics): its real wire behaviour (a close
after every streamed response, `timings`, Prometheus names), its prompt cache and its own timing."""

from __future__ import annotations

import json

import psutil
import pytest
import yaml

from idp_pipelines.bench import checks
from idp_pipelines.bench.client import EndpointConfig, Workload
from idp_pipelines.bench.host_load import local_server_pids
from idp_pipelines.bench.load import fixed_concurrency, run_benchmark
from idp_pipelines.cli import main as idp
from idp_pipelines.warehouse import Warehouse
from tests.support import write_lab

EP = "local-llamacpp"
PROMPTS = ("The same prompt in every step of the run, long enough that a cache hit is most of it.",)


def _steps(base, cache_bust: bool):
    ep = EndpointConfig(base, "tiny-llama", api="completions", engine="llamacpp")
    wl = Workload(prompts=PROMPTS, max_tokens=8, ignore_eos=True, cache_bust=cache_bust)
    return run_benchmark(ep, wl, [fixed_concurrency(1, 6), fixed_concurrency(4, 8)])


def test_cache_bust_keeps_every_step_out_of_the_prompt_cache(llama_base_url):
    busted = _steps(llama_base_url, cache_bust=True)
    for step in busted:
        s = step.summary()
        assert s["n_ok"] == s["n_requests"] and s["served_from_cache"] == 0, s
        # llama.cpp reports the cached tokens of every response (timings.cache_n): the hit rate is known,
        # and only what all prompts share (BOS, the leading space) is ever reused
        assert all(r.cached_prompt_tokens is not None and r.cached_prompt_tokens <= 3 for r in step.records)
        assert s["prefix_cache_hit_rate"] < 0.2
        # the same figure from its /metrics (prompt_tokens_cached_total over all prompt tokens)
        assert s["server_prefix_cache_hit_rate"] == pytest.approx(s["prefix_cache_hit_rate"])
    steps = [dict(st.summary(), concurrency=st.load.concurrency) for st in busted]
    assert checks.sanity(steps, cache_bust=True, max_other_load_cores=64).passed
    # the same prompts without the unique prefix: the second step is served from the cache, and the
    # sanity check says so when the run claimed cache_bust (what ids restarting per step used to do)
    shared = _steps(llama_base_url, cache_bust=False)
    s = shared[1].summary()
    assert s["served_from_cache"] >= 4 and s["prefix_cache_hit_rate"] > 0.4  # 4 slots: at least the 2nd wave
    assert s["server_prefix_cache_hit_rate"] == pytest.approx(s["prefix_cache_hit_rate"])
    judged = checks.sanity([dict(s, concurrency=4)], cache_bust=True, max_other_load_cores=64)
    assert not judged.passed and "prompts were served from the server's prompt cache" in judged.description


def test_llama_server_closes_after_each_stream_and_every_scrape_still_succeeds(llama_base_url):
    ep = EndpointConfig(llama_base_url, "tiny-llama", api="completions", engine="llamacpp")
    steps = run_benchmark(ep, Workload(max_tokens=8, ignore_eos=True, cache_bust=True),
                          [fixed_concurrency(1, 4), fixed_concurrency(4, 8), fixed_concurrency(2, 4)])
    for step in steps:
        s = step.summary()
        assert s["n_errors"] == 0 and s["n_ok"] == s["n_requests"]
        # the /metrics scrapes before and after each step: no dead pooled socket fails them
        assert step.server_metrics.error is None
        assert step.server_metrics.total("llamacpp:tokens_predicted_total") >= 8 * s["n_ok"]
        # the server's own account of each request (timings) is kept beside the client's
        for r in step.records:
            assert r.server_prompt_ms is not None and r.server_prompt_n is not None
            assert r.server_predicted_n == r.completion_tokens == 8 and r.server_predicted_ms > 0


def test_the_server_process_is_the_measurement_not_load(llama_base_url):
    pids = local_server_pids(llama_base_url)
    assert pids and all(psutil.Process(p).name() == "llama-server" for p in pids)
    assert local_server_pids("http://192.0.2.1:8000") == []  # not this machine: nothing to leave out


def _lab(tmp_path, url, **endpoint):
    path = write_lab(tmp_path / "lab.yaml", endpoint_url=url)
    data = yaml.safe_load(path.read_text())
    data["endpoints"][0].update(endpoint)
    data["hosts"][0]["cpu"]["memory_bandwidth_gb_s"] = 20.0
    data["benchmarks"]["max_other_load_cores"] = 64  # this shared test machine is never quiet
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cli_prints_the_roofline_and_ttft_taken_apart(tmp_path, llama_base_url, tiny_gguf, capsys):
    # a fresh IDP_HOME: no hub_model row; the inventory names the GGUF file the server loads
    lab_file = _lab(tmp_path, llama_base_url, model_file=str(tiny_gguf))
    # 64 tokens: a loaded client can read a tiny model's tokens in bursts, but not a whole stream in one
    assert idp(["bench", EP, "--concurrency", "1,2", "--requests", "8", "--max-tokens", "64",
                "--lab", str(lab_file)]) == 0
    out = capsys.readouterr().out
    size = tiny_gguf.stat().st_size
    ceiling = 20e9 / size
    assert (f"roofline: ceiling {ceiling:,.1f} tok/s per request = 20 GB/s (hosts[localhost].cpu."
            f"memory_bandwidth_gb_s (n_gpu_layers 0)) / {size / 1e6:,.1f} MB (size of {tiny_gguf})") in out
    assert "TTFT p50 c=1:" in out and "server prompt" in out and "the probe's round trip" in out
    with Warehouse(tmp_path / "idp-home" / "warehouse.duckdb").read() as con:
        run = con.execute("SELECT decode_ceiling_tok_s, model_bytes, ceiling_source, server_props, network_rtt_ms "
                          "FROM benchmark_runs").fetchone()
        steps = con.execute("SELECT roofline_fraction, output_tok_s_per_request, ttft_ms_p50, ttft_server_prompt_ms, "
                            "ttft_server_queue_ms, ttft_network_ms, served_from_cache FROM benchmark_steps "
                            "ORDER BY step_index").fetchall()
        prompt_ms = con.execute("SELECT count(*) FILTER (WHERE server_prompt_ms IS NOT NULL), count(*) "
                                "FROM benchmark_requests").fetchone()
    assert run[0] == ceiling and run[1] == size and f"size of {tiny_gguf}" in run[2]
    assert json.loads(run[3])["total_slots"] == 4 and run[4] > 0  # slots as the server reports them; RTT
    assert any(fraction for fraction, *_ in steps)
    for fraction, per_request, ttft, prompt, queue, network, cached in steps:
        assert fraction == (pytest.approx(per_request / ceiling) if per_request else None)
        assert prompt is not None and network == run[4] and cached == 0
        assert prompt + queue + network == pytest.approx(ttft) or (queue == 0 and prompt + network >= ttft)
    assert "roofline_fraction" in out.splitlines()[0]
    assert prompt_ms[0] == prompt_ms[1] == 8 + 8
