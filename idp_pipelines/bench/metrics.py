"""Pure functions from request records to latency, throughput and goodput figures.

Definitions follow vLLM's benchmark_serving: TTFT is to the first chunk with content,
TPOT = (E2E - TTFT) / (completion_tokens - 1), ITL are the gaps between content chunks.
Percentiles carry a distribution-free confidence interval from order statistics
(the count of samples below the q-quantile is Binomial(n, q)); when n is too small for
both ends of that interval to exist, the percentile is marked insufficient.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from idp_pipelines.bench.records import RequestRecord

__all__ = [
    "PercentileEstimate",
    "percentile_ci",
    "min_samples_for_percentile",
    "ttft_s",
    "e2e_s",
    "tpot_s",
    "itl_s",
    "queue_s",
    "ttft_from_intended_s",
    "e2e_from_intended_s",
    "derived_ms",
    "request_row",
    "served_from_cache",
    "ttft_split",
    "meets_slos",
    "summarize",
    "SLO_KEYS",
    "PERCENTILES",
    "decode_ceiling_tok_s",
    "roofline_check",
]

PERCENTILES = (50, 90, 95, 99)
SLO_KEYS = ("ttft_ms_max", "tpot_ms_max", "e2e_ms_max")


@dataclass(frozen=True)
class PercentileEstimate:
    """A sample percentile with its order-statistic confidence interval."""

    q: float  # percentile, 0-100
    n: int
    point: float | None  # sample quantile (linear interpolation); None when n == 0
    lo: float | None  # CI bounds; None when the interval does not exist for this n
    hi: float | None
    confidence: float
    sufficient: bool

    @property
    def value(self) -> float | None:
        """The point estimate, or None when n is too small to bound it."""
        return self.point if self.sufficient else None


def _ci_ranks(n: int, p: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ranks (l, u) with P(x_(l) <= quantile_p <= x_(u)) >= confidence, or None."""
    alpha = 1.0 - confidence
    # cdf[k] = P(K <= k) for k < n, K = number of samples below the quantile (non-decreasing)
    # x_(l) <= Q  <=>  K >= l, so take the largest l with P(K <= l - 1) <= alpha/2 (= how many cdf[k] are)
    # Q <= x_(u)  <=>  K <= u - 1, so take the smallest u with P(K <= u - 1) >= 1 - alpha/2
    c = idx = None
    for k, cdf in _binom_cdf(n, p):
        if c is None and cdf > alpha / 2:
            c = k
        if cdf >= 1 - alpha / 2:
            idx = k
            break
    c = n if c is None else c
    idx = n if idx is None else idx
    return (c if c > 0 else None, idx + 1 if idx < n else None)


def _binom_cdf(n: int, p: float) -> Iterator[tuple[int, float]]:
    """(k, P(K <= k)) for k = 0..n-1, K ~ Binomial(n, p), summed from log-space terms.

    Pure Python on purpose: scipy.stats and numpy cost `idp bench` about 0.5 s of start-up CPU and
    60 MB for this one function; the terms agree with scipy's binom.cdf to ~1e-12. For large n the sum
    starts 12 standard deviations below the mean, where the mass left out is below 1e-30.
    """
    if p <= 0.0 or p >= 1.0:  # K is certainly 0 (p = 0) or n (p = 1)
        yield from ((k, 1.0 if p <= 0.0 else 0.0) for k in range(n))
        return
    lp, lq = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    start = 0
    if n > 2000:
        start = max(0, int(n * p - 12 * math.sqrt(n * p * (1 - p))))
        yield from ((k, 0.0) for k in range(start))
    total = 0.0
    for k in range(start, n):
        total += math.exp(lgn - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq)
        yield k, min(total, 1.0)


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation sample quantile of sorted ``xs`` (numpy's default method)."""
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentile_ci(
    values: Iterable[float], q: float, confidence: float = 0.95
) -> PercentileEstimate:
    """Percentile ``q`` (0-100) of ``values`` with a two-sided binomial order-statistic CI."""
    xs = sorted(float(v) for v in values if v is not None)
    n = len(xs)
    if n == 0:
        return PercentileEstimate(q, 0, None, None, None, confidence, False)
    point = _quantile(xs, q / 100.0)
    lo_rank, hi_rank = _ci_ranks(n, q / 100.0, confidence)
    lo = float(xs[lo_rank - 1]) if lo_rank else None
    hi = float(xs[hi_rank - 1]) if hi_rank else None
    return PercentileEstimate(q, n, point, lo, hi, confidence, lo is not None and hi is not None)


def min_samples_for_percentile(q: float, confidence: float = 0.95) -> int:
    """Smallest n for which ``percentile_ci`` can bound percentile q on both sides."""
    p, tail = q / 100.0, (1 - confidence) / 2
    # both ends exist once P(K = 0) = (1-p)^n <= tail and P(K = n) = p^n <= tail
    return max(math.ceil(math.log(tail) / math.log(p)), math.ceil(math.log(tail) / math.log(1 - p)))


def ttft_s(r: RequestRecord) -> float | None:
    if r.t_first_token is None or r.t_sent is None:
        return None
    return r.t_first_token - r.t_sent


def e2e_s(r: RequestRecord) -> float | None:
    """Send to last content token (the usage/[DONE] tail adds no tokens)."""
    if r.t_last_token is None or r.t_sent is None:
        return None
    return r.t_last_token - r.t_sent


def tpot_s(r: RequestRecord) -> float | None:
    ttft, e2e = ttft_s(r), e2e_s(r)
    if ttft is None or e2e is None or not r.completion_tokens or r.completion_tokens < 2:
        return None
    return (e2e - ttft) / (r.completion_tokens - 1)


def itl_s(r: RequestRecord) -> list[float]:
    t = r.chunk_times
    return [b - a for a, b in zip(t, t[1:])]


def queue_s(r: RequestRecord) -> float | None:
    """Client-side send delay: actual minus intended send time."""
    if r.t_sent is None or r.t_intended is None:
        return None
    return r.t_sent - r.t_intended


def ttft_from_intended_s(r: RequestRecord) -> float | None:
    if r.t_first_token is None or r.t_intended is None:
        return None
    return r.t_first_token - r.t_intended


def e2e_from_intended_s(r: RequestRecord) -> float | None:
    if r.t_last_token is None or r.t_intended is None:
        return None
    return r.t_last_token - r.t_intended


_PER_REQUEST = {
    "ttft_ms": ttft_s,
    "tpot_ms": tpot_s,
    "e2e_ms": e2e_s,
    "queue_ms": queue_s,
    "ttft_from_intended_ms": ttft_from_intended_s,
    "e2e_from_intended_ms": e2e_from_intended_s,
}


def derived_ms(r: RequestRecord) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, fn in _PER_REQUEST.items():
        v = fn(r)
        out[name] = None if v is None else v * 1000.0
    return out


def request_row(r: RequestRecord) -> dict[str, Any]:
    """Raw fields plus derived latencies in ms: one `benchmark_requests` row (or a DataFrame row)."""
    row = dataclasses.asdict(r)
    row.update(derived_ms(r))
    return row


def _check_slos(slos: Mapping[str, float] | None) -> Mapping[str, float]:
    slos = slos or {}
    unknown = set(slos) - set(SLO_KEYS)
    if unknown:
        raise ValueError(f"unknown SLO keys {sorted(unknown)}; allowed: {list(SLO_KEYS)}")
    return slos


def meets_slos(r: RequestRecord, slos: Mapping[str, float] | None) -> bool:
    """True for a successful request within every given SLO (a missing figure fails it)."""
    slos = _check_slos(slos)
    if not r.ok:
        return False
    d = derived_ms(r)
    for key, limit in slos.items():
        v = d[key.removesuffix("_max")]
        if key == "tpot_ms_max" and v is None and (r.completion_tokens or 0) < 2:
            continue  # TPOT undefined for a single token: not a violation
        if v is None or v > limit:
            return False
    return True


def _add_distribution(
    out: dict[str, Any], name: str, values: Sequence[float], confidence: float
) -> None:
    out[f"{name}_n"] = len(values)
    out[f"{name}_mean"] = statistics.fmean(values) if values else None
    for q in PERCENTILES:
        est = percentile_ci(values, q, confidence)
        out[f"{name}_p{q}"] = est.value
        out[f"{name}_p{q}_lo"] = est.lo
        out[f"{name}_p{q}_hi"] = est.hi
        out[f"{name}_p{q}_sufficient"] = est.sufficient


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float | None = None,
    slos: Mapping[str, float] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Flat dict of step figures (keys are DuckDB column names).

    ``duration_s`` defaults to first send to last end over the records. Latency
    distributions use successful requests only; pXX is None when n is too small for
    its CI (see ``*_sufficient``), never silently the max.
    """
    slos = _check_slos(slos)
    n = len(records)
    ok = [r for r in records if r.ok]
    if duration_s is None:
        starts = [r.t_sent for r in records if r.t_sent is not None]
        ends = [r.t_end for r in records if r.t_end is not None]
        duration_s = (max(ends) - min(starts)) if starts and ends else 0.0
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    with_max = [r for r in ok if r.max_tokens]
    reported = [r for r in ok if r.server_reported_tokens]
    cache_known = [r for r in ok if r.cached_prompt_tokens is not None and r.prompt_tokens]
    good = [r for r in ok if meets_slos(r, slos)] if slos else ok
    timed = [r for r in ok if r.server_predicted_ms is not None and (r.server_predicted_n or 0) > 1]
    errors_by_kind: dict[str, int] = {}
    for r in records:
        if r.error_kind:
            errors_by_kind[r.error_kind] = errors_by_kind.get(r.error_kind, 0) + 1
    rate = (lambda x: x / duration_s) if duration_s and duration_s > 0 else (lambda x: None)
    out: dict[str, Any] = {
        "n_requests": n,
        "n_ok": len(ok),
        "n_errors": n - len(ok),
        "n_aborted": errors_by_kind.get("aborted", 0),
        "error_rate": (n - len(ok)) / n if n else None,
        "errors_by_kind": errors_by_kind,
        "duration_s": duration_s,
        "requests_per_s": rate(len(ok)),
        "output_tokens": out_tokens,
        "output_tokens_per_s": rate(out_tokens),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "goodput_requests_per_s": rate(len(good)),
        "goodput_fraction": len(good) / n if n else None,
        "slos": dict(slos),
        "server_reported_tokens_fraction": len(reported) / len(ok) if ok else None,
        "length_honoured_fraction": (
            sum(r.completion_tokens == r.max_tokens for r in with_max) / len(with_max)
            if with_max else None
        ),
        "prefix_cache_hit_rate": (
            sum(r.cached_prompt_tokens for r in cache_known)
            / sum(r.prompt_tokens for r in cache_known)
            if cache_known else None
        ),
        # requests whose prompt the server mostly took from its cache: with cache_bust on, a template's
        # fixed prefix is a few tokens, never half the prompt
        "served_from_cache": sum(served_from_cache(r) for r in cache_known) if cache_known else None,
        "cache_fixed_prefix_tokens": min(r.cached_prompt_tokens for r in cache_known) if cache_known else None,
        "retries": sum(r.retries for r in records),
        # the server's own decode rate (llama.cpp: timings.predicted_per_second, token-weighted)
        "server_decode_tok_s": (
            sum(r.server_predicted_n for r in timed) / sum(r.server_predicted_ms for r in timed) * 1000.0
            if timed and sum(r.server_predicted_ms for r in timed) > 0 else None
        ),
    }
    for name, fn in _PER_REQUEST.items():
        vals = [v * 1000.0 for v in (fn(r) for r in ok) if v is not None]
        _add_distribution(out, name, vals, confidence)
    itl = [g * 1000.0 for r in ok for g in itl_s(r)]
    _add_distribution(out, "itl_ms", itl, confidence)
    _add_distribution(out, "server_prompt_ms",
                      [r.server_prompt_ms for r in ok if r.server_prompt_ms is not None], confidence)
    return out


def served_from_cache(r: RequestRecord) -> bool:
    """The server reports that it took at least half of this request's prompt from its cache."""
    return bool(r.prompt_tokens and r.cached_prompt_tokens is not None
                and r.cached_prompt_tokens * 2 >= r.prompt_tokens)


def ttft_split(summary: Mapping[str, Any], network_rtt_ms: float | None) -> dict[str, Any]:
    """TTFT p50 taken apart: the server's prompt time, its queue/slot time, the client and network.

    llama.cpp reports its prompt time (`timings.prompt_ms`) but no queue time, so the network share is
    the probe's round trip before the run, and the queue/slot share is what remains: it holds the wait
    for a free slot and work such as saving the slot's previous state to the prompt cache (--cache-ram).
    """
    ttft, prompt = summary.get("ttft_ms_p50"), summary.get("server_prompt_ms_p50")
    if ttft is None or prompt is None:
        return {"ttft_server_prompt_ms": prompt, "ttft_network_ms": network_rtt_ms, "ttft_server_queue_ms": None}
    network = network_rtt_ms or 0.0
    return {"ttft_server_prompt_ms": prompt, "ttft_network_ms": network_rtt_ms,
            "ttft_server_queue_ms": max(0.0, ttft - prompt - network)}


def decode_ceiling_tok_s(bandwidth_gb_s: float, model_bytes_per_token: float) -> float:
    """Memory-bandwidth roofline for single-stream decode: every token reads the weights once."""
    if bandwidth_gb_s <= 0 or model_bytes_per_token <= 0:
        raise ValueError("bandwidth_gb_s and model_bytes_per_token must be positive")
    return bandwidth_gb_s * 1e9 / model_bytes_per_token


def roofline_check(
    measured_tok_s: float, bandwidth_gb_s: float, model_bytes_per_token: float
) -> dict[str, Any]:
    """Measured single-stream decode rate (1 / TPOT) against the bandwidth ceiling.

    Above the ceiling is physically implausible for one stream, so it is flagged suspect
    (wrong token counts, cached output, speculative decoding or a wrong byte count).
    Batched aggregate throughput may legitimately exceed it; compare per-stream rates.
    """
    ceiling = decode_ceiling_tok_s(bandwidth_gb_s, model_bytes_per_token)
    fraction = measured_tok_s / ceiling
    return {
        "decode_ceiling_tok_s": ceiling,
        "measured_tok_s": measured_tok_s,
        "roofline_fraction": fraction,
        "roofline_suspect": fraction > 1.0,
    }
