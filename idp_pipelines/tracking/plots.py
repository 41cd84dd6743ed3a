"""The two PNGs logged with every benchmark run. matplotlib (Agg, no pyplot state) is imported only here."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any


def _figure(width: float = 6.4, height: float = 4.2):
    # Figure + the Agg canvas directly: no pyplot global state, no GUI backend, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins: a constrained layout triples savefig's time, and a backfill draws two per run.
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def latency_throughput_png(steps: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """Output tokens/s against latency, one point per load step, labelled with its concurrency."""
    fig = _figure()
    ax = fig.add_subplot()
    pts = [s for s in steps if s.get("output_tokens_per_s") is not None]
    x = [s["output_tokens_per_s"] for s in pts]
    for key, label, style in (("e2e_ms_p50", "e2e p50", "o-"), ("ttft_ms_p95", "TTFT p95", "s--"),
                              ("ttft_ms_p50", "TTFT p50", "^:")):
        xs = [xi for xi, s in zip(x, pts) if s.get(key) is not None]
        ys = [s[key] for s in pts if s.get(key) is not None]
        if ys:
            ax.plot(xs, ys, style, label=label)
    for xi, s in zip(x, pts):
        y = s.get("e2e_ms_p50") if s.get("e2e_ms_p50") is not None else s.get("ttft_ms_p95")
        if y is not None:
            tag = s.get("concurrency") if s.get("concurrency") is not None else s.get("step")
            ax.annotate(f"c={tag}", (xi, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s (all requests)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no step with throughput", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def ttft_distribution_png(ttft_by_step: Mapping[str, Sequence[float]], title: str) -> bytes:
    """Empirical CDF of time to first token, one line per load step (successful requests)."""
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for label, values in ttft_by_step.items():
        v = np.sort(np.asarray([x for x in values if x is not None], dtype=float))
        if v.size == 0:
            continue
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{label} (n={v.size})")
        drawn += 1
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no successful request", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)
