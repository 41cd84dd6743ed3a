"""Judge the seed plan's claims (``lab.expectations``) against what the warehouse measured.

Each expectation names a metric; ``METRICS`` maps it to a warehouse figure (see ``measure``). A claim is

* **confirmed** when the figure's confidence interval (or the point, when there is no CI) lies inside
  the expected [low, high];
* **refuted** when the interval (or point) lies entirely outside it;
* **inconclusive** when the interval straddles a bound;
* **not enough data** when nothing was measured or the sample is too small to estimate the figure.

Metric -> warehouse figure ("latest" = the latest ``status='complete'`` run by ``started_at`` that has
the figure; endpoint-scoped metrics use the expectation's endpoint, host-scoped ones its host):

======================== ====================================================================== =====================
metric                   figure                                                                 CI
======================== ====================================================================== =====================
ttft_p50_ms              benchmark_steps.ttft_ms_p50 at concurrency 1, n = ttft_ms_n            [ttft_ms_p50_lo, _hi]
ttft_p95_ms              benchmark_steps.ttft_ms_p95 at concurrency 1 (NULL: n too small)       [ttft_ms_p95_lo, _hi]
output_tok_s_per_request benchmark_steps.output_tok_s_per_request at concurrency 1              1000 / tpot_ms_p50 CI
                         (fallback 1000 / tpot_ms_p50; runs with engine threads=1 excluded)
output_tok_s_1_thread    the same, only from runs whose engine_settings has threads == 1        1000 / tpot_ms_p50 CI
output_tok_s_aggregate   max benchmark_steps.output_tokens_per_s over the latest run's steps    none (marked)
gpu_utilization_pct      max over steps of the latest run on the host with the column           none (marked)
gpu_memory_used_gb       max over steps of the latest run on the host with the column           none (marked)
health_rtt_p50_ms        endpoint_probes.rtt_p50_ms of the latest probe with a round trip       none (median of few)
rpc_{min,max,mean}_ms    rpc_latency.{min,max,mean}_ms, latest row for the host                 none (extremes)
rpc_{p50,p95,p99}_ms     rpc_latency.pXX_ms (NULL: n too small), latest row for the host        [pXX_lo, pXX_hi]
======================== ====================================================================== =====================

Plain Python, no Dagster. Missing tables, an unreadable warehouse or empty data never raise: they turn
into "not enough data" with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal

from idp_pipelines.bench.metrics import min_samples_for_percentile
from idp_pipelines.markdown import md_cell

if TYPE_CHECKING:
    from idp_pipelines.lab import Expectation, Lab
    from idp_pipelines.warehouse import Warehouse

__all__ = [
    "Measurement",
    "Verdict",
    "FindingsReport",
    "METRICS",
    "judge",
    "measure",
    "build_findings",
]

VerdictName = Literal["confirmed", "refuted", "inconclusive", "not enough data"]
CONFIRMED: VerdictName = "confirmed"
REFUTED: VerdictName = "refuted"
INCONCLUSIVE: VerdictName = "inconclusive"
NO_DATA: VerdictName = "not enough data"


@dataclass(frozen=True)
class Measurement:
    """One measured figure for a metric, with its CI when the warehouse has one."""

    metric: str
    value: float | None
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    sufficient: bool = True  # False: the sample is too small to estimate the figure
    run_id: str | None = None
    measured_at: str | None = None
    source: str = ""  # where it came from, e.g. "benchmark_steps.ttft_ms_p50 at concurrency 1"
    note: str = ""

    @property
    def has_ci(self) -> bool:
        return self.lo is not None and self.hi is not None


@dataclass(frozen=True)
class Verdict:
    expectation: Expectation
    measurement: Measurement | None
    verdict: VerdictName
    reason: str

    @property
    def name(self) -> str:
        return self.expectation.name


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    mag = abs(x)
    return f"{x:.0f}" if mag >= 100 else f"{x:.1f}" if mag >= 10 else f"{x:.2f}" if mag >= 1 else f"{x:.3g}"


def judge(expectation: Expectation, measurement: Measurement | None) -> Verdict:
    """Compare a measurement with the expectation's [low, high] (see the module docstring)."""
    low, high, unit = expectation.low, expectation.high, expectation.unit
    expected = f"[{low:g}, {high:g}] {unit}"
    if measurement is None:
        return Verdict(expectation, None, NO_DATA, "nothing measured")
    if measurement.value is None or not measurement.sufficient:
        why = measurement.note or (f"n={measurement.n} is too small" if measurement.n is not None
                                   else "nothing measured")
        return Verdict(expectation, measurement, NO_DATA, why)
    if measurement.has_ci:
        lo, hi, what = measurement.lo, measurement.hi, f"CI [{_fmt(measurement.lo)}, {_fmt(measurement.hi)}]"
    else:
        lo = hi = measurement.value
        what = f"{_fmt(measurement.value)} {unit} (no CI: judged on the point)"
    if low <= lo and hi <= high:
        return Verdict(expectation, measurement, CONFIRMED, f"{what} lies inside {expected}")
    if hi < low or lo > high:
        side = "below" if hi < low else "above"
        return Verdict(expectation, measurement, REFUTED, f"{what} lies entirely {side} {expected}")
    return Verdict(expectation, measurement, INCONCLUSIVE, f"{what} straddles a bound of {expected}")


# ------------------------------------------------------------------------------------------ measuring


def _rows(con: Any, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


@dataclass(frozen=True)
class _Scope:
    endpoint: str | None
    host: str | None


def _scope(x: Expectation, lab: Lab) -> _Scope:
    host = x.host
    if host is None and x.endpoint is not None:
        host = next((e.host for e in lab.endpoints if e.name == x.endpoint), None)
    return _Scope(x.endpoint, host)


def _run_filter(scope: _Scope) -> tuple[str, list[Any]]:
    if scope.endpoint is not None:
        return "r.endpoint = ?", [scope.endpoint]
    if scope.host is not None:
        return "r.host = ?", [scope.host]
    return "false", []


_C1_SQL = """
    SELECT r.run_id, CAST(r.started_at AS VARCHAR) AS started_at, s.*
    FROM benchmark_runs r JOIN benchmark_steps s USING (run_id)
    WHERE {where} AND r.status = 'complete' AND s.concurrency = 1 {extra}
    ORDER BY r.started_at DESC, s.n_ok DESC, s.step_index DESC
    LIMIT 1"""

_THREADS = "TRY_CAST(json_extract_string(r.engine_settings, '$.threads') AS INTEGER)"
_THREADS_1 = f"AND {_THREADS} = 1"
_NOT_THREADS_1 = f"AND coalesce({_THREADS}, 0) <> 1"  # a dedicated single-thread run is not the usual config


def _c1_step(con: Any, scope: _Scope, extra: str = "") -> dict[str, Any] | None:
    where, params = _run_filter(scope)
    rows = _rows(con, _C1_SQL.format(where=where, extra=extra), params)
    return rows[0] if rows else None


def _percentile_at_c1(column: str, q: float) -> Callable[[Any, _Scope, str], Measurement]:
    def get(con: Any, scope: _Scope, metric: str) -> Measurement:
        step = _c1_step(con, scope)
        source = f"benchmark_steps.{column} at concurrency 1"
        if step is None:
            return Measurement(metric, None, source=source,
                               note="no complete benchmark run with a concurrency-1 step")
        n = step.get("ttft_ms_n")
        value = step.get(column)
        need = min_samples_for_percentile(q)
        note = "" if value is not None else f"n={n} successful requests; p{q:g} needs >= {need} to be bounded"
        return Measurement(metric, value, step.get(f"{column}_lo"), step.get(f"{column}_hi"), n,
                           sufficient=value is not None, run_id=step["run_id"],
                           measured_at=step["started_at"], source=source, note=note)
    return get


def _per_request_tok_s(step: dict[str, Any] | None, metric: str, source: str, missing: str) -> Measurement:
    if step is None:
        return Measurement(metric, None, source=source, note=missing)
    value = step.get("output_tok_s_per_request")
    tpot, tlo, thi = step.get("tpot_ms_p50"), step.get("tpot_ms_p50_lo"), step.get("tpot_ms_p50_hi")
    note = ""
    if value is None and tpot:
        value, note = 1000.0 / tpot, "point = 1000 / TPOT p50"
    lo = 1000.0 / thi if thi else None  # a slower TPOT bound is the lower tok/s bound
    hi = 1000.0 / tlo if tlo else None
    if value is not None and (lo is None or hi is None):
        note = (note + "; " if note else "") + "no CI (TPOT p50 could not be bounded)"
    if value is None:
        note = "no per-request rate and no TPOT measured at concurrency 1"
    return Measurement(metric, value, lo, hi, step.get("n_ok"), sufficient=value is not None,
                       run_id=step["run_id"], measured_at=step["started_at"], source=source, note=note)


def _output_tok_s_per_request(con: Any, scope: _Scope, metric: str) -> Measurement:
    return _per_request_tok_s(_c1_step(con, scope, _NOT_THREADS_1), metric,
                              "benchmark_steps.output_tok_s_per_request at concurrency 1, threads != 1 "
                              "(CI: 1000/TPOT p50 CI)",
                              "no complete benchmark run with a concurrency-1 step")


def _output_tok_s_1_thread(con: Any, scope: _Scope, metric: str) -> Measurement:
    return _per_request_tok_s(_c1_step(con, scope, _THREADS_1), metric,
                              "benchmark_steps.output_tok_s_per_request at concurrency 1, run with threads=1",
                              "no complete run with engine_settings threads = 1 (the configured threads "
                              "differ): benchmark with threads=1 to test this claim")


def _output_tok_s_aggregate(con: Any, scope: _Scope, metric: str) -> Measurement:
    where, params = _run_filter(scope)
    rows = _rows(con, f"""
        SELECT r.run_id, CAST(r.started_at AS VARCHAR) AS started_at, s.concurrency, s.rate_rps, s.step,
               s.output_tokens_per_s, s.n_ok
        FROM benchmark_runs r JOIN benchmark_steps s USING (run_id)
        WHERE r.run_id = (SELECT r.run_id FROM benchmark_runs r
                          WHERE {where} AND r.status = 'complete'
                            AND EXISTS (SELECT 1 FROM benchmark_steps s2
                                        WHERE s2.run_id = r.run_id AND s2.output_tokens_per_s IS NOT NULL)
                          ORDER BY r.started_at DESC LIMIT 1)
          AND s.output_tokens_per_s IS NOT NULL
        ORDER BY s.output_tokens_per_s DESC LIMIT 1""", params)
    source = "max benchmark_steps.output_tokens_per_s over the latest run's steps"
    if not rows:
        return Measurement(metric, None, source=source, note="no complete benchmark run with throughput")
    r = rows[0]
    at = f"concurrency {r['concurrency']}" if r["concurrency"] is not None else f"step {r['step']}"
    return Measurement(metric, r["output_tokens_per_s"], None, None, r["n_ok"], run_id=r["run_id"],
                       measured_at=r["started_at"], source=f"{source} ({at})",
                       note=f"no CI (aggregate throughput is one figure per step); best at {at}")


def _gpu_max(column: str) -> Callable[[Any, _Scope, str], Measurement]:
    def get(con: Any, scope: _Scope, metric: str) -> Measurement:
        # host-wide: the latest run of any endpoint on the host (or of the named endpoint) with the column
        where, params = ("r.host = ?", [scope.host]) if scope.host is not None else _run_filter(scope)
        rows = _rows(con, f"""
            SELECT r.run_id, CAST(r.started_at AS VARCHAR) AS started_at,
                   max(s.{column}) AS value, count(s.{column}) AS n
            FROM benchmark_runs r JOIN benchmark_steps s USING (run_id)
            WHERE {where} AND r.status = 'complete' AND s.{column} IS NOT NULL
            GROUP BY r.run_id, r.started_at
            ORDER BY r.started_at DESC LIMIT 1""", params)
        source = f"max benchmark_steps.{column} over the latest run on the host"
        if not rows:
            return Measurement(metric, None, source=source, note=f"no complete run recorded {column}")
        r = rows[0]
        return Measurement(metric, r["value"], None, None, r["n"], run_id=r["run_id"],
                           measured_at=r["started_at"], source=source,
                           note="no CI (max over steps of a sampled gauge)")
    return get


def _health_rtt_p50(con: Any, scope: _Scope, metric: str) -> Measurement:
    source = "endpoint_probes.rtt_p50_ms (latest probe with a round trip)"
    if scope.endpoint is None:
        return Measurement(metric, None, source=source, note="health_rtt_p50_ms needs an endpoint")
    rows = _rows(con, """
        SELECT CAST(probed_at AS VARCHAR) AS probed_at, dagster_run_id, probes, rtt_p50_ms
        FROM endpoint_probes WHERE endpoint = ? AND rtt_p50_ms IS NOT NULL
        ORDER BY probed_at DESC LIMIT 1""", [scope.endpoint])
    if not rows:
        return Measurement(metric, None, source=source, note="the endpoint was never probed up")
    r = rows[0]
    return Measurement(metric, r["rtt_p50_ms"], None, None, r["probes"], sufficient=bool(r["probes"]),
                       run_id=r["dagster_run_id"], measured_at=r["probed_at"], source=source,
                       note=f"no CI (median of {r['probes']} health round trips, not an inference request)")


_RPC_COLUMNS = {  # metric suffix -> (value column, lo, hi, percentile or None)
    "min": ("min_ms", None, None, None),
    "p50": ("p50_ms", "p50_lo", "p50_hi", 50),
    "p95": ("p95_ms", "p95_lo", "p95_hi", 95),
    "p99": ("p99_ms", "p99_lo", "p99_hi", 99),
    "max": ("max_ms", None, None, None),
    "mean": ("mean_ms", None, None, None),
}


def _rpc(stat: str) -> Callable[[Any, _Scope, str], Measurement]:
    column, lo_col, hi_col, q = _RPC_COLUMNS[stat]

    def get(con: Any, scope: _Scope, metric: str) -> Measurement:
        source = f"rpc_latency.{column} (latest for the host)"
        if scope.host is None:
            return Measurement(metric, None, source=source, note=f"{metric} needs a host")
        rows = _rows(con, f"""
            SELECT CAST(measured_at AS VARCHAR) AS measured_at, dagster_run_id, target_url, probes, failures,
                   {column} AS value, {lo_col or 'NULL'} AS lo, {hi_col or 'NULL'} AS hi
            FROM rpc_latency WHERE host = ? ORDER BY measured_at DESC LIMIT 1""", [scope.host])
        if not rows:
            return Measurement(metric, None, source=source, note="no RPC latency measured for the host")
        r = rows[0]
        n = (r["probes"] or 0) - (r["failures"] or 0)
        note = f"{r['target_url']}"
        if r["value"] is None:
            note = (f"n={n} successful probes; p{q} needs >= {min_samples_for_percentile(q)}" if q
                    else "no successful probe")
        elif q is None:
            note += "; no CI (an extreme or the mean)"
        return Measurement(metric, r["value"], r["lo"], r["hi"], n, sufficient=r["value"] is not None and n > 0,
                           run_id=r["dagster_run_id"], measured_at=r["measured_at"], source=source, note=note)
    return get


METRICS: dict[str, Callable[[Any, _Scope, str], Measurement]] = {
    "ttft_p50_ms": _percentile_at_c1("ttft_ms_p50", 50),
    "ttft_p95_ms": _percentile_at_c1("ttft_ms_p95", 95),
    "output_tok_s_per_request": _output_tok_s_per_request,
    "output_tok_s_1_thread": _output_tok_s_1_thread,
    "output_tok_s_aggregate": _output_tok_s_aggregate,
    "gpu_utilization_pct": _gpu_max("gpu_utilization_pct"),
    "gpu_memory_used_gb": _gpu_max("gpu_memory_used_gb"),
    "health_rtt_p50_ms": _health_rtt_p50,
    **{f"rpc_{stat}_ms": _rpc(stat) for stat in _RPC_COLUMNS},
}


def measure(con: Any, lab: Lab, expectation: Expectation) -> Measurement:
    """The warehouse figure for one expectation's metric (never raises on missing data)."""
    metric = expectation.metric
    getter = METRICS.get(metric)
    if getter is None:
        return Measurement(metric, None, note=f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    try:
        m = getter(con, _scope(expectation, lab), metric)
    except Exception as exc:  # noqa: BLE001 - a missing table or odd row is "no data", not a crash
        return Measurement(metric, None, note=f"could not read the warehouse: {type(exc).__name__}: {exc}")
    if m.value is not None and isinstance(m.value, float) and math.isnan(m.value):
        return Measurement(metric, None, source=m.source, note="measured value is NaN")
    return m


# ------------------------------------------------------------------------------------------ the report


@dataclass
class FindingsReport:
    lab: str
    generated_at: datetime
    verdicts: list[Verdict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {CONFIRMED: 0, REFUTED: 0, INCONCLUSIVE: 0, NO_DATA: 0}
        for v in self.verdicts:
            out[v.verdict] += 1
        return out

    def by_name(self) -> dict[str, Verdict]:
        return {v.name: v for v in self.verdicts}

    def rows(self) -> list[dict[str, Any]]:
        """Flat records (for metadata, JSON or a table)."""
        out = []
        for v in self.verdicts:
            x, m = v.expectation, v.measurement
            out.append({
                "name": x.name, "claim": x.claim, "source": x.source, "metric": x.metric,
                "low": x.low, "high": x.high, "unit": x.unit, "endpoint": x.endpoint, "host": x.host,
                "value": m.value if m else None, "lo": m.lo if m else None, "hi": m.hi if m else None,
                "n": m.n if m else None, "run_id": m.run_id if m else None,
                "measured_at": m.measured_at if m else None, "measured_from": m.source if m else None,
                "verdict": v.verdict, "reason": v.reason,
            })
        return out

    def to_json(self) -> str:
        return json.dumps({"lab": self.lab, "generated_at": self.generated_at.isoformat(),
                           "counts": self.counts(), "findings": self.rows(), "warnings": self.warnings},
                          default=str)

    def to_markdown(self) -> str:
        c = self.counts()
        lines = [
            f"# Hardware findings: {self.lab}",
            "",
            f"Generated {self.generated_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC. "
            f"{len(self.verdicts)} claims of the seed plan: {c[CONFIRMED]} confirmed, {c[REFUTED]} refuted, "
            f"{c[INCONCLUSIVE]} inconclusive, {c[NO_DATA]} without enough data. A claim is confirmed when the "
            f"95 % confidence interval (or the value, where there is no CI) lies inside the expected range, "
            f"refuted when it lies entirely outside.",
            "",
        ]
        for w in self.warnings:
            lines.append(f"> {w}")
        if self.warnings:
            lines.append("")
        lines += [
            "| Claim | Seed section | Expected | Measured | 95 % CI | n | Verdict | Run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in self.verdicts:
            x, m = v.expectation, v.measurement
            measured = f"{_fmt(m.value)} {x.unit}" if m and m.value is not None else "—"
            ci = f"[{_fmt(m.lo)}, {_fmt(m.hi)}]" if m and m.has_ci else ("no CI" if m and m.value is not None else "—")
            n = str(m.n) if m and m.n is not None else "—"
            run = m.run_id if m and m.run_id else "—"
            lines.append("| " + " | ".join(md_cell(s) for s in (
                x.claim, x.source or "—", f"{x.low:g}–{x.high:g} {x.unit}", measured, ci, n,
                f"**{v.verdict}**" if v.verdict in (CONFIRMED, REFUTED) else v.verdict, run)) + " |")
        lines += ["", "## What to revise", ""]
        refuted = [v for v in self.verdicts if v.verdict == REFUTED]
        if not refuted:
            lines.append("Nothing is refuted by the measurements so far.")
        for v in refuted:
            x = v.expectation
            where = f"seed {x.source}" if x.source else "seed"
            lines.append(f"- **{x.name}** ({where}): \"{x.claim}\": {v.reason}.")
        pending = [v for v in self.verdicts if v.verdict in (INCONCLUSIVE, NO_DATA)]
        if pending:
            lines += ["", "## Still open", ""]
            for v in pending:
                lines.append(f"- **{v.expectation.name}** ({v.verdict}): {v.reason}.")
        return "\n".join(lines) + "\n"


def build_findings(warehouse: Warehouse, lab: Lab, *, now: datetime | None = None) -> FindingsReport:
    """Judge every ``lab.expectations`` entry against the warehouse; never raises on missing data."""
    report = FindingsReport(lab=lab.name, generated_at=now or datetime.now(timezone.utc))
    if not lab.expectations:
        report.warnings.append("The lab lists no expectations: nothing to judge.")
        return report
    try:
        with warehouse.read() as con:
            for x in lab.expectations:
                report.verdicts.append(judge(x, measure(con, lab, x)))
    except Exception as exc:  # noqa: BLE001 - an unreadable warehouse leaves every claim open
        report.warnings.append(f"The warehouse {getattr(warehouse, 'path', '')} could not be read: {exc}")
        done = {v.name for v in report.verdicts}
        for x in lab.expectations:
            if x.name not in done:
                report.verdicts.append(judge(x, Measurement(x.metric, None, note="the warehouse could not be read")))
    return report
