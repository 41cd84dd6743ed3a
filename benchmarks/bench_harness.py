"""How accurate and how cheap is the benchmark harness? Measured against injected truth.

The synthetic server runs in its own process (as a real engine would), the harness in
this one. Prints each figure, its goal and whether the goal is met.

    .venv/bin/python benchmarks/bench_harness.py
"""

from __future__ import annotations

import argparse
import time

from idp_pipelines.bench.client import EndpointConfig, Workload
from idp_pipelines.bench.load import fixed_concurrency, run_benchmark
from idp_pipelines.doubles.synthetic_server import SyntheticConfig, synthetic_server_subprocess


def _step(ttft_s: float, itl_s: float, tokens: int, concurrency: int, rounds: int):
    config = SyntheticConfig(ttft_s=ttft_s, itl_s=itl_s)
    with synthetic_server_subprocess(config) as (_proc, url):
        ep = EndpointConfig(url, "synthetic", api="chat", engine="synthetic")
        spec = fixed_concurrency(concurrency, concurrency * rounds, warmup_requests=concurrency,
                                 max_duration_s=120)
        step = run_benchmark(ep, Workload(max_tokens=tokens, ignore_eos=True), [spec])[0]
    s = step.summary()
    ideal = concurrency * tokens / (ttft_s + (tokens - 1) * itl_s)
    server_cpu = (step.server_metrics.counters.get("process_cpu_seconds_total")
                  if step.server_metrics else None)
    return step, s, ideal, server_cpu


def _goal(label: str, value: str, goal: str, met: bool) -> bool:
    print(f"  {label:<34} {value:<28} goal {goal:<14} {'MET' if met else 'NOT MET'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="requests per worker per scenario")
    args = parser.parse_args()
    results = []
    t = time.perf_counter()

    print("(a) injected TTFT 50 ms, 10 ms/token, 64 tokens, concurrency 64")
    step, s, ideal, server_cpu_a = _step(0.050, 0.010, 64, 64, args.rounds)
    err = s["ttft_ms_p50"] - 50.0
    results.append(_goal("TTFT p50 vs 50 ms truth",
                         f"{s['ttft_ms_p50']:.2f} ms ({err:+.2f}) [{s['ttft_ms_p50_lo']:.1f}, "
                         f"{s['ttft_ms_p50_hi']:.1f}]", "within 10 ms", abs(err) <= 10))
    frac = s["output_tokens_per_s"] / ideal
    results.append(_goal("throughput vs ideal",
                         f"{s['output_tokens_per_s']:.0f}/{ideal:.0f} tok/s ({frac:.1%})",
                         ">= 95 %", frac >= 0.95))
    print(f"  errors {s['n_errors']}/{s['n_requests']}, TTFT p90 {s['ttft_ms_p90']:.2f} ms, "
          f"TPOT p50 {s['tpot_ms_p50']:.3f} ms")
    tokens_a = s["output_tokens"]
    cpu_us = step.client_cpu_s / tokens_a * 1e6 if tokens_a else float("nan")

    print("(b) injected TTFT 20 ms, 2 ms/token, 64 tokens, concurrency 16")
    _step_b, sb, ideal_b, _ = _step(0.020, 0.002, 64, 16, args.rounds * 3)
    tpot_err = (sb["tpot_ms_p50"] - 2.0) / 2.0
    results.append(_goal("TPOT p50 vs 2 ms truth", f"{sb['tpot_ms_p50']:.4f} ms ({tpot_err:+.2%})",
                         "within 2 %", abs(tpot_err) <= 0.02))
    frac_b = sb["output_tokens_per_s"] / ideal_b
    results.append(_goal("throughput vs ideal",
                         f"{sb['output_tokens_per_s']:.0f}/{ideal_b:.0f} tok/s ({frac_b:.1%})",
                         ">= 95 %", frac_b >= 0.95))
    print(f"  TTFT p50 {sb['ttft_ms_p50']:.2f} ms vs 20 ms truth, errors {sb['n_errors']}")

    print("(c) CPU per streamed token in scenario (a), client and server in separate processes")
    results.append(_goal("client CPU per token", f"{cpu_us:.1f} us ({tokens_a} tokens)",
                         "< 40 us", cpu_us < 40))
    if server_cpu_a is not None and tokens_a:
        print(f"  server CPU per token               {server_cpu_a / tokens_a * 1e6:.1f} us "
              f"({server_cpu_a:.2f} s over the step)")
    print(f"{sum(results)}/{len(results)} goals met in {time.perf_counter() - t:.1f} s")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
