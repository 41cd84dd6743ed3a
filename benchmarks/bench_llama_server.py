"""The harness against llama.cpp's own C++ `llama-server`: does it agree with the engine's own timing, and
does cache-busting keep the prompt cache out of the measurement?

A random-weight llama of ~35 M parameters (F16, ~70 MB; generated, nothing downloaded) makes each token
cost a few milliseconds on one CPU thread, so the client's own per-chunk cost (tens of microseconds) is
small beside it, as it is beside a real model on a real engine. Prints each figure, its goal and
whether it is met.

    .venv/bin/python benchmarks/bench_llama_server.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idp_pipelines.bench.client import EndpointConfig, Workload  # noqa: E402
from idp_pipelines.bench.load import fixed_concurrency, run_benchmark  # noqa: E402
from idp_pipelines.bench.metrics import tpot_s  # noqa: E402


def _goal(label: str, value: str, goal: str, met: bool) -> bool:
    print(f"  {label:<44} {value:<30} goal {goal:<22} {'MET' if met else 'NOT MET'}")
    return met


def _fixed_prefixes(base: str, ep: EndpointConfig, wl: Workload) -> dict[str, int]:
    """Per first character of the cache-bust prefix: the tokens before the unique text (BOS, and a
    SentencePiece leading space when the tokenizer does not merge it into that character), as the server
    itself tokenizes the prompt. That is the part every prompt may share by construction."""
    import httpx

    from idp_pipelines.bench.client import _DIGITS, BenchClient

    client = BenchClient(ep, wl, 1)
    out = {}
    for k, char in enumerate(_DIGITS):
        prompt = client.build_body(k)["prompt"]
        assert prompt[0] == char
        pieces = httpx.post(base + "/tokenize", json={"content": prompt, "add_special": True, "with_pieces": True},
                            timeout=10).json()["tokens"]
        fixed = 0
        for tok in pieces:
            piece = tok["piece"] if isinstance(tok["piece"], str) else ""
            special = piece.startswith("<") and piece.endswith(">") and len(piece) > 2  # BOS "<s>"
            if not special and piece.replace("\u2581", " ").strip():
                break  # the first token carrying text: the unique part starts here
            fixed += 1
        out[char] = fixed
    return out


def _beyond_prefix(steps, fixed: dict[str, int], warmup: int) -> list[float | None]:
    """Per step: the share of prompt tokens, past each prompt's fixed prefix, the server took from cache.

    Prompts are built in send order over the run (warm-up first), so request k of the run led with
    _DIGITS[k % 62]."""
    from idp_pipelines.bench.client import _DIGITS

    out, k = [], warmup
    for step in steps:
        cached = past = 0
        for r in sorted(step.records, key=lambda r: r.t_sent):
            f = fixed[_DIGITS[k % len(_DIGITS)]]
            k += 1
            if r.ok and r.cached_prompt_tokens is not None and r.prompt_tokens:
                cached += max(0, r.cached_prompt_tokens - f)
                past += r.prompt_tokens - f
        out.append(cached / past if past > 0 else None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args()

    from idp_pipelines.embedded.tiny_model import write_tiny_gguf
    from tests.support import llama_server

    results = []
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_gguf(Path(tmp) / "bench-35m-f16.gguf", seed=1, n_embd=768, n_layer=6, n_head=12,
                                n_head_kv=4, n_ff=2048, n_ctx=2048, dtype="f16")
        print(f"model {model.stat().st_size / 1e6:.0f} MB, llama-server -np 4 --metrics, client in this process")
        with llama_server(model, Path(tmp) / "llama.log", parallel=4) as base:
            ep = EndpointConfig(base, "tiny-llama", api="completions", engine="llamacpp")
            wl = Workload(max_tokens=args.tokens, ignore_eos=True, cache_bust=True)
            n = args.requests
            c1, c4 = run_benchmark(ep, wl, [fixed_concurrency(1, n, warmup_requests=1),
                                            fixed_concurrency(4, 4 * n)])

            print(f"(a) decode rate at c=1, {n} requests of {args.tokens} tokens: the harness against the "
                  "server's own timings")
            ok = [r for r in c1.records if r.ok and r.server_predicted_ms and tpot_s(r)]
            harness = [1 / tpot_s(r) for r in ok]
            # llama.cpp times predicted_ms from the first sampled token to the last (n - 1 decode steps) and
            # reports predicted_per_second = (n - 1) / predicted_ms: the same interval as the harness's 1/TPOT
            server = [(r.server_predicted_n - 1) / r.server_predicted_ms * 1000 for r in ok]
            errs = [h / s - 1 for h, s in zip(harness, server)]
            med = statistics.median(errs) if errs else float("nan")
            results.append(_goal("harness 1/TPOT vs timings.predicted_per_second",
                                 f"{statistics.fmean(harness):.1f} vs {statistics.fmean(server):.1f} tok/s",
                                 "within 1 % (median)", bool(errs) and abs(med) <= 0.01))
            print(f"    per request: median {med:+.2%}, worst {max(errs, key=abs):+.2%} ({len(errs)} requests)")
            sm = c1.server_metrics
            if sm is not None and sm.error is None:
                toks, secs = sm.total("llamacpp:tokens_predicted_total"), sm.total("llamacpp:tokens_predicted_seconds_total")
                mine = sum(r.server_predicted_n for r in ok) / sum(r.server_predicted_ms for r in ok) * 1000
                if toks and secs:
                    print(f"    /metrics over the step: {toks / secs:.1f} tok/s ({toks:.0f} tokens / {secs:.3f} s; the "
                          f"same sums from the responses' timings: {mine:.1f} tok/s)")

            print("(b) prompt cache with cache_bust on (every prompt unique from its first token)")
            fixed = _fixed_prefixes(base, ep, wl)
            shares = _beyond_prefix([c1, c4], fixed, warmup=1)
            for step, beyond in zip((c1, c4), shares):
                s = step.summary()
                results.append(_goal(f"c={step.load.concurrency}: cache hits beyond the fixed prefix",
                                     f"{beyond:.3f} (raw {s['prefix_cache_hit_rate']:.3f}, /metrics "
                                     f"{s['server_prefix_cache_hit_rate']:.3f})"
                                     if beyond is not None else "not reported",
                                     f"0 ({min(fixed.values())}-{max(fixed.values())} fixed tokens)", beyond == 0))
            print("(c) connections and scrapes against a server that closes after each streamed response")
            for step in (c1, c4):
                s = step.summary()
                print(f"    c={step.load.concurrency}: {s['n_ok']}/{s['n_requests']} ok, {s['retries']} resent on a "
                      f"fresh connection, /metrics scrape "
                      f"{'ok' if step.server_metrics and not step.server_metrics.error else step.server_metrics.error}")
                results.append(step.server_metrics is not None and step.server_metrics.error is None)
            wl_shared = Workload(max_tokens=8, ignore_eos=True, cache_bust=False)
            (shared,) = run_benchmark(ep, wl_shared, [fixed_concurrency(4, 16)])
            print(f"    for contrast, cache_bust off: hit rate {shared.summary()['prefix_cache_hit_rate']:.2f}, "
                  f"{shared.summary()['served_from_cache']} of 16 prompts served from the cache")
    print(f"{sum(results)}/{len(results)} goals met in {time.perf_counter() - t:.1f} s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
