"""Recommend a concurrency limit (vLLM ``max_num_seqs``, llama.cpp ``parallel``) from a concurrency sweep.

The rule: the highest swept concurrency whose step meets every SLO the endpoint sets
(``ttft_ms`` on the step's TTFT p95, ``tpot_ms`` on TPOT p50, ``e2e_ms`` on E2E p95) with an error rate
of at most 1 %. A percentile that is None (too few requests to bound it) falls back to the p50 and the
evidence says so. Plain Python, no Dagster; ``Recommendation.row()`` matches ``benchmark_tuning``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from idp_pipelines.lab import Lab
    from idp_pipelines.warehouse import Warehouse

__all__ = [
    "MAX_ERROR_RATE",
    "Recommendation",
    "StepVerdict",
    "recommend_concurrency",
    "setting_for",
    "tune_endpoint",
    "latest_sweep",
    "store_recommendations",
]

MAX_ERROR_RATE = 0.01

_SETTINGS = {"vllm": "max_num_seqs", "llamacpp": "parallel"}

# SLO key -> (step column judged, fallback column when the first is None, label)
_CHECKS = {
    "ttft_ms": ("ttft_ms_p95", "ttft_ms_p50", "TTFT"),
    "tpot_ms": ("tpot_ms_p50", None, "TPOT"),
    "e2e_ms": ("e2e_ms_p95", "e2e_ms_p50", "E2E"),
}


def setting_for(kind: str) -> str | None:
    """The engine setting that caps concurrent sequences: vLLM max_num_seqs, llama.cpp parallel."""
    return _SETTINGS.get(kind)


@dataclass
class StepVerdict:
    concurrency: int | None
    step: str | None
    meets: bool
    reasons: list[str] = field(default_factory=list)  # why it fails (empty when it meets every SLO)
    notes: list[str] = field(default_factory=list)  # e.g. "TTFT p95 unavailable, judged on p50"
    figures: dict[str, Any] = field(default_factory=dict)  # the values judged


@dataclass
class Recommendation:
    recommended: int | None
    reason: str
    slo: dict[str, float]
    evidence: list[StepVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    endpoint: str | None = None
    run_id: str | None = None
    setting: str | None = None
    current: int | None = None

    @property
    def change(self) -> int | None:
        """recommended - current, when both are known."""
        if self.recommended is None or self.current is None:
            return None
        return self.recommended - self.current

    def evidence_json(self) -> str:
        return json.dumps({
            "reason": self.reason,
            "slo": self.slo,
            "max_error_rate": MAX_ERROR_RATE,
            "notes": self.notes,
            "steps": [asdict(v) for v in self.evidence],
        }, default=str)

    def row(self) -> dict[str, Any]:
        """``benchmark_tuning`` columns (the caller adds tuned_at and dagster_run_id)."""
        return {"endpoint": self.endpoint, "run_id": self.run_id, "setting": self.setting,
                "recommended": self.recommended, "current": self.current, "evidence": self.evidence_json()}


def _normalise_slo(slo: Mapping[str, Any] | None) -> dict[str, float]:
    """Accept Slo.model_dump() keys (ttft_ms) or metrics.SLO_KEYS (ttft_ms_max); drop unset ones."""
    out: dict[str, float] = {}
    for key, value in (slo or {}).items():
        k = key.removesuffix("_max")
        if k not in _CHECKS:
            raise ValueError(f"unknown SLO key {key!r}; allowed: {sorted(_CHECKS)}")
        if value is not None:
            out[k] = float(value)
    return out


def _error_rate(step: Mapping[str, Any]) -> float | None:
    rate = step.get("error_rate")
    if rate is None and step.get("n_requests"):
        rate = (step.get("n_errors") or 0) / step["n_requests"]
    return rate


def _judge_step(step: Mapping[str, Any], slo: Mapping[str, float]) -> StepVerdict:
    v = StepVerdict(concurrency=step.get("concurrency"), step=step.get("step"), meets=True)
    v.figures = {k: step.get(k) for k in ("ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "e2e_ms_p95",
                                         "error_rate", "goodput_fraction", "output_tokens_per_s")
                 if k in step}
    err = _error_rate(step)
    if err is None:
        v.reasons.append("error rate unknown (no requests)")
    elif err > MAX_ERROR_RATE:
        v.reasons.append(f"error rate {err:.1%} > {MAX_ERROR_RATE:.0%}")
    for key, limit in slo.items():
        column, fallback, label = _CHECKS[key]
        value, used = step.get(column), column
        if value is None and fallback is not None and step.get(fallback) is not None:
            value, used = step.get(fallback), fallback
            v.notes.append(f"{label} {column.rsplit('_', 1)[-1]} unavailable (too few requests to bound it); "
                           f"judged on {fallback.rsplit('_', 1)[-1]}, which understates the tail")
        stat = used.rsplit("_", 1)[-1]
        if value is None:
            v.reasons.append(f"{label} not measured")
        elif value > limit:
            v.reasons.append(f"{label} {stat} {value:.1f} ms > {limit:g} ms")
    v.meets = not v.reasons
    return v


def recommend_concurrency(steps: list[dict], slo: Mapping[str, Any] | None) -> Recommendation:
    """The highest concurrency of one sweep meeting every SLO in ``slo`` (and error rate <= 1 %).

    ``steps`` are ``benchmark_steps`` rows as dicts; open-loop steps (concurrency None) are ignored.
    With no SLO set, the concurrency with the best output_tokens_per_s (error rate <= 1 %) is chosen.
    """
    limits = _normalise_slo(slo)
    closed = sorted((s for s in steps if s.get("concurrency") is not None), key=lambda s: s["concurrency"])
    verdicts = [_judge_step(s, limits) for s in closed]
    rec = Recommendation(recommended=None, reason="", slo=limits, evidence=verdicts)
    if not closed:
        rec.reason = "no closed-loop (concurrency) steps in the sweep"
        return rec
    if len(closed) == 1:
        rec.notes.append("a single concurrency was measured: nothing to compare it with")

    if not limits:
        usable = [(s, v) for s, v in zip(closed, verdicts)
                  if v.meets and s.get("output_tokens_per_s") is not None]
        if not usable:
            rec.reason = (f"no SLO set, and no step had an error rate <= {MAX_ERROR_RATE:.0%} "
                          f"and a measured throughput")
            return rec
        best, _ = max(usable, key=lambda sv: (sv[0]["output_tokens_per_s"], -sv[0]["concurrency"]))
        rec.recommended = int(best["concurrency"])
        rec.reason = (f"no SLO set for this endpoint: chose the concurrency with the highest output "
                      f"throughput ({best['output_tokens_per_s']:.1f} tok/s at {rec.recommended})")
        rec.notes.append("no SLO set: latency was not considered; set slo.ttft_ms / tpot_ms / e2e_ms in "
                         "the lab to trade throughput for latency")
        return rec

    passing = [v for v in verdicts if v.meets]
    slo_text = ", ".join(f"{k} <= {v:g}" for k, v in limits.items())
    if not passing:
        first = verdicts[0]
        rec.reason = (f"no measured concurrency meets the SLOs ({slo_text}, error rate <= "
                      f"{MAX_ERROR_RATE:.0%}); even concurrency {first.concurrency} fails: "
                      + "; ".join(first.reasons))
        return rec
    best = max(passing, key=lambda v: v.concurrency)
    rec.recommended = int(best.concurrency)
    rec.reason = (f"concurrency {rec.recommended} is the highest measured that meets every SLO "
                  f"({slo_text}, error rate <= {MAX_ERROR_RATE:.0%})")
    above = [v for v in verdicts if v.concurrency > best.concurrency]
    if above:
        rec.reason += f"; {above[0].concurrency} fails: " + "; ".join(above[0].reasons)
    else:
        rec.notes.append(f"the highest swept concurrency ({best.concurrency}) still meets the SLOs: the "
                         f"limit may be higher; extend the sweep")
    below_failing = [v.concurrency for v in verdicts if v.concurrency < best.concurrency and not v.meets]
    if below_failing:
        rec.notes.append(f"lower concurrencies {below_failing} failed while {best.concurrency} passed: the "
                         f"sweep is noisy near the limit; re-run before relying on it")
    if any(v.notes for v in verdicts):
        rec.notes.append("some steps were judged on p50 because the p95 could not be bounded; "
                         "run more requests per step")
    return rec


def _fetch_dicts(con: Any, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def latest_sweep(warehouse: Warehouse, endpoint: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(run row, its closed-loop step rows) of the endpoint's latest complete run with >1 such step."""
    with warehouse.read() as con:
        runs = _fetch_dicts(con, """
            SELECT r.run_id, r.endpoint, r.kind, r.engine_settings, r.slos, CAST(r.started_at AS VARCHAR) AS started_at
            FROM benchmark_runs r
            WHERE r.endpoint = ? AND r.status = 'complete'
              AND (SELECT count(*) FROM benchmark_steps s
                   WHERE s.run_id = r.run_id AND s.concurrency IS NOT NULL) > 1
            ORDER BY r.started_at DESC
            LIMIT 1""", [endpoint])
        if not runs:
            return None
        steps = _fetch_dicts(con, """
            SELECT * EXCLUDE (server_metrics, summary) FROM benchmark_steps
            WHERE run_id = ? AND concurrency IS NOT NULL ORDER BY concurrency, step_index""",
                             [runs[0]["run_id"]])
    return runs[0], steps


def tune_endpoint(warehouse: Warehouse, lab: Lab, endpoint_name: str) -> Recommendation | None:
    """Recommend the endpoint's concurrency setting from its latest complete sweep (None: no sweep yet)."""
    ep = lab.endpoint(endpoint_name)  # a LabError naming the file and the fix
    found = latest_sweep(warehouse, endpoint_name)
    if found is None:
        return None
    run, steps = found
    rec = recommend_concurrency(steps, ep.slo.model_dump())
    rec.endpoint, rec.run_id, rec.setting = ep.name, run["run_id"], setting_for(ep.kind)
    if rec.setting is not None:
        current = ep.settings.get(rec.setting)
        if current is None:  # the inventory's typed llama.cpp settings, where it has them
            current = getattr(getattr(ep, "llamacpp", None), rec.setting, None)
        if current is None and run.get("engine_settings"):
            try:
                current = json.loads(run["engine_settings"]).get(rec.setting)
            except (TypeError, ValueError, AttributeError):
                current = None
        rec.current = int(current) if isinstance(current, (int, float)) and not isinstance(current, bool) else None
    else:
        rec.notes.append(f"{ep.kind} has no single concurrency setting to tune; the recommendation is the "
                         f"client-side concurrency to stay within the SLOs")
    if rec.recommended is not None and rec.current is not None and rec.recommended > rec.current:
        rec.notes.append(f"the sweep went above {rec.setting}={rec.current}: the server queued the excess, so "
                         f"the measured steps above {rec.current} reflect queueing, not more batching")
    return rec


def store_recommendations(warehouse: Warehouse, recs: list[Recommendation], dagster_run_id: str | None) -> int:
    """Append the recommendations to ``benchmark_tuning`` (its one writer); returns the row count."""
    from datetime import datetime, timezone

    from idp_pipelines.warehouse import insert_rows

    now = datetime.now(timezone.utc)
    with warehouse.write() as con:
        return insert_rows(con, "benchmark_tuning", [
            {"tuned_at": now, "dagster_run_id": dagster_run_id, **r.row()} for r in recs])
