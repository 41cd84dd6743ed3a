"""Pure functions from request records to latency, throughput and goodput figures.

Definitions follow vLLM's benchmark_serving: TTFT is to the first chunk with content,
TPOT = (E2E - TTFT) / (completion_tokens - 1), ITL are the gaps between content chunks.
Percentiles carry a distribution-free confidence interval from order statistics
(the count of samples below the q-quantile is Binomial(n, q)); when n is too small for
both ends of that interval to exist, the percentile is marked insufficient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

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
    cdf = binom.cdf(np.arange(n), n, p)
    # x_(l) <= Q  <=>  K >= l, so take the largest l with P(K <= l - 1) <= alpha/2
    c = int(np.searchsorted(cdf, alpha / 2, side="right"))
    # Q <= x_(u)  <=>  K <= u - 1, so take the smallest u with P(K <= u - 1) >= 1 - alpha/2
    idx = int(np.searchsorted(cdf, 1 - alpha / 2, side="left"))
    return (c if c > 0 else None, idx + 1 if idx < n else None)


def percentile_ci(
    values: Iterable[float], q: float, confidence: float = 0.95
) -> PercentileEstimate:
    """Percentile ``q`` (0-100) of ``values`` with a two-sided binomial order-statistic CI."""
    xs = np.sort(np.asarray([v for v in values if v is not None], dtype=float))
    n = len(xs)
    if n == 0:
        return PercentileEstimate(q, 0, None, None, None, confidence, False)
    point = float(np.quantile(xs, q / 100.0))
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
    out[f"{name}_mean"] = float(np.mean(values)) if values else None
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
    }
    for name, fn in _PER_REQUEST.items():
        vals = [v * 1000.0 for v in (fn(r) for r in ok) if v is not None]
        _add_distribution(out, name, vals, confidence)
    itl = [g * 1000.0 for r in ok for g in itl_s(r)]
    _add_distribution(out, "itl_ms", itl, confidence)
    return out


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
