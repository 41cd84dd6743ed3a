"""Scrape Prometheus text from the server before and after a step and keep the difference.

A small parser (prometheus_client is not a dependency): it reads samples and ``# TYPE``
lines, which is all a before/after delta needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

__all__ = [
    "MetricsSnapshot",
    "ServerMetricsDelta",
    "parse_prometheus_text",
    "scrape_metrics",
    "metrics_delta",
    "prefix_cache_hit_rate",
]

_CUMULATIVE_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


@dataclass
class MetricsSnapshot:
    samples: dict[str, float]  # series ("name{labels}") -> value
    types: dict[str, str]  # metric family name -> counter/gauge/histogram/summary/untyped


@dataclass
class ServerMetricsDelta:
    """Counter increases over the step and gauge values at its end, keyed by series."""

    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why scraping failed, if it did

    def total(self, name: str) -> float | None:
        """Sum of a counter family's deltas over all label sets, or None if absent."""
        vals = [v for k, v in self.counters.items() if k.split("{", 1)[0] == name]
        return sum(vals) if vals else None


def _series_name(series: str) -> str:
    return series.split("{", 1)[0]


def parse_prometheus_text(text: str) -> MetricsSnapshot:
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3].strip()
            continue
        close = line.rfind("}")
        if "{" in line and close > 0:
            series, rest = line[: close + 1], line[close + 1 :]
        else:
            series, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            samples[series.replace(" ", "")] = float(fields[0])
        except ValueError:
            continue
    return MetricsSnapshot(samples, types)


def _is_cumulative(series: str, types: dict[str, str]) -> bool:
    name = _series_name(series)
    kind = types.get(name)
    if kind in ("counter", "gauge"):
        return kind == "counter"
    for suffix in _CUMULATIVE_SUFFIXES:
        if name.endswith(suffix) and types.get(name[: -len(suffix)], "counter") != "gauge":
            return True  # counter family, or a histogram/summary's cumulative parts
    return False


async def scrape_metrics(
    client: httpx.AsyncClient, url: str, timeout_s: float = 10.0
) -> MetricsSnapshot:
    """GET Prometheus text; raises httpx errors (callers record them, the run goes on)."""
    resp = await client.get(url, timeout=timeout_s)
    resp.raise_for_status()
    return parse_prometheus_text(resp.text)


def metrics_delta(before: MetricsSnapshot, after: MetricsSnapshot) -> ServerMetricsDelta:
    types = {**before.types, **after.types}
    out = ServerMetricsDelta()
    for series, value in after.samples.items():
        if _is_cumulative(series, types):
            # a counter that went down means the server restarted: count from zero
            prev = before.samples.get(series, 0.0)
            out.counters[series] = value - prev if value >= prev else value
        else:
            out.gauges[series] = value
    return out


def prefix_cache_hit_rate(delta: ServerMetricsDelta) -> float | None:
    """The server's prompt-cache hits over the step, in tokens: vLLM's hits / queries, llama.cpp's cached
    prompt tokens / all prompt tokens (its prompt_tokens_total counts only the evaluated ones)."""
    cached, evaluated = delta.total("llamacpp:prompt_tokens_cached_total"), delta.total("llamacpp:prompt_tokens_total")
    if cached is not None and evaluated is not None and cached + evaluated > 0:
        return cached / (cached + evaluated)
    for hits_name, queries_name in (
        ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
        ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"),
        ("vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total"),
    ):
        hits, queries = delta.total(hits_name), delta.total(queries_name)
        if hits is not None and queries:
            return hits / queries
    return None
