"""Judgements on a benchmark run: regression against the nightly baseline, sanity of each step, and what
failed when nothing answered. Plain Python (the asset turns a `Judgement` into an AssetCheckResult)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from idp_pipelines.checks import Judgement

__all__ = ["Judgement", "MIN_BASELINE_RUNS", "MAX_ERROR_RATE", "MIN_LENGTH_HONOURED", "MAX_CACHED_FRACTION",
           "regression", "sanity", "error_digest", "describe_errors"]

MIN_BASELINE_RUNS = 3
NO_REGRESSION = "no_regression_against_baseline"
SANE = "sane_results"
MAX_ERROR_RATE = 0.05
MIN_LENGTH_HONOURED = 0.9
# With cache_bust on, a step where more than this share of the requests came mostly from the server's
# prompt cache measured the cache, not prompt processing (the template's fixed prefix is far below half).
MAX_CACHED_FRACTION = 0.1


def regression(head: Mapping[str, Any], base: Mapping[str, Any], tolerance: float) -> Judgement:
    """This run's headline (throughput at the top concurrency, TTFT p95 at the lowest) against the
    median of recent nightly runs; passes with a note while fewer than MIN_BASELINE_RUNS exist."""
    runs = base.get("runs") or 0
    if runs < MIN_BASELINE_RUNS:
        return Judgement(NO_REGRESSION, True, f"not enough baseline yet: {runs} earlier nightly run(s), {MIN_BASELINE_RUNS} needed")
    problems = []
    tput, base_tput = head.get("output_tokens_per_s"), base.get("output_tokens_per_s")
    if base_tput and tput is not None and tput < (1 - tolerance) * base_tput:
        problems.append(f"throughput {tput:.1f} tok/s is below the baseline {base_tput:.1f} by more than "
                        f"{tolerance:.0%}")
    ttft = head.get("ttft_ms_p95") if head.get("ttft_ms_p95") is not None else head.get("ttft_ms_p50")
    base_ttft = base.get("ttft_ms")
    if base_ttft and ttft is not None and ttft > (1 + tolerance) * base_ttft:
        problems.append(f"TTFT {ttft:.1f} ms is above the baseline {base_ttft:.1f} ms by more than {tolerance:.0%}")
    return Judgement(
        NO_REGRESSION, not problems,
        "; ".join(problems) or f"within {tolerance:.0%} of the median of {runs} nightly runs",
        metadata={"baseline_runs": runs, "baseline_output_tokens_per_s": base_tput, "baseline_ttft_ms": base_ttft},
    )


def sanity(steps: Sequence[Mapping[str, Any]], *, cache_bust: bool, max_other_load_cores: float,
           run_error: str | None = None) -> Judgement:
    """Each step's error rate, honoured output length, roofline, prompt-cache hits and host load."""
    insane = [f"run failed: {run_error}"] if run_error else []
    for s in steps:
        where = f"c={s.get('concurrency')}"
        if (s.get("error_rate") or 0) > MAX_ERROR_RATE:
            insane.append(f"{where}: error rate {s['error_rate']:.0%}")
        honoured = s.get("length_honoured_fraction")
        if honoured is not None and honoured < MIN_LENGTH_HONOURED:
            insane.append(f"{where}: only {honoured:.0%} of requests produced max_tokens")
        if s.get("suspect"):
            insane.append(f"{where}: {s['suspect']}")
        cached, n_ok = s.get("served_from_cache"), s.get("n_ok") or 0
        if cache_bust and cached and n_ok and cached / n_ok > MAX_CACHED_FRACTION:
            insane.append(f"{where}: {cached} of {n_ok} prompts were served from the server's prompt cache "
                          f"although cache_bust is on (hit rate {s.get('prefix_cache_hit_rate') or 0:.2f})")
        load = s.get("host_other_cpu_cores")
        if load is not None and load > max_other_load_cores:
            top = s.get("host_other_top") or []
            top = json.loads(top) if isinstance(top, str) else top  # as stored in benchmark_steps
            who = ", ".join(f"{t['name']} (pid {t['pid']})" for t in top[:3])
            insane.append(f"{where}: measured under load: other processes used {load:.2f} cores of this host "
                          f"(limit benchmarks.max_other_load_cores = {max_other_load_cores:g})"
                          + (f", mostly {who}" if who else ""))
    return Judgement(SANE, not insane, "; ".join(insane) or "errors, lengths, roofline, prompt cache and host load sane")


def error_digest(records: Iterable[Any], into: dict[str, list] | None = None) -> dict[str, list]:
    """Error kind -> [count, one message], accumulated over records (a step, then a whole run)."""
    out = into if into is not None else {}
    for r in records:
        if r.error_kind:
            entry = out.setdefault(r.error_kind, [0, r.error])
            entry[0] += 1
    return out


def describe_errors(digest: Mapping[str, Sequence], limit: int = 3) -> str:
    """The most common error kinds, with a count and one message each."""
    ranked = sorted(digest.items(), key=lambda kv: -kv[1][0])[:limit]
    return "; ".join(f"{kind} x{count}: {message}" for kind, (count, message) in ranked)
