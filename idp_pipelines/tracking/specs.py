"""What one MLflow run should hold, built from DuckDB rows without talking to MLflow (plain data in, out).

A benchmark run becomes params (endpoint, engine settings, workload, SLOs), per-step metric curves
(step = concurrency), the tuned step's headline figures, tags linking back to Dagster, and a function
that draws its artefacts. A quantization becomes its params, size and timing, and the benchmark runs
that used its artefact.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

BENCHMARK = "benchmark"
QUANTIZATION = "quantization"
TAG_KIND = "idp.kind"
TAG_BENCHMARK_ID = "idp.benchmark_run_id"
TAG_QUANTIZATION_ID = "idp.quantization_id"
TAG_COMPLETE = "idp.complete"
TAG_CONFLICT = "idp.param_conflict."

# MLflow's limits (mlflow.utils.validation): values beyond these are refused or truncated server-side.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000

HEADLINE = ("goodput_requests_per_s", "goodput_fraction", "requests_per_s", "output_tokens_per_s",
            "output_tok_s_per_request", "error_rate", "ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50",
            "tpot_ms_p95", "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p95", "roofline_fraction")

# Per-step columns that identify the step rather than measure it.
_STEP_IDENTITY = {"run_id", "step_index", "step", "mode", "concurrency", "rate_rps", "started_at",
                  "summary", "server_metrics", "suspect", "slos"}
# MLflow's key rule (mlflow.utils.validation): word characters, - . space / and :, as a normalised path.
_KEY_BAD = re.compile(r"[^\w\-. /:]")

# (closed-loop steps, the run's SLOs) -> the concurrency benchmark_tuning recommends, or None
Recommend = Callable[[list[dict], dict], "int | None"]

TUNED_BY_SLO = "benchmark_tuning's rule: the highest concurrency meeting every SLO"
TUNED_BY_GOODPUT = "max goodput_requests_per_s (ties: lower concurrency)"


@dataclass
class RunSpec:
    """Everything one MLflow run should hold; built from DuckDB rows, without talking to MLflow."""

    kind: str
    source_id: str
    id_tag: str
    experiment_name: str
    run_name: str
    start_time_ms: int
    end_time_ms: int
    params: dict[str, str]
    tags: dict[str, str]
    metrics: list[tuple[str, float, int, int]]  # key, value, timestamp ms, step
    artifacts: Callable[[Path], dict[str, Path]] = field(default=lambda _d: {})  # run path -> local file
    late_digest: str = ""


# ------------------------------------------------------------------------------------------- values


def ms(ts: Any) -> int | None:
    if ts is None:
        return None
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return int(ts.timestamp() * 1000)


def from_json(v: Any) -> Any:
    if v is None or isinstance(v, (dict, list)):
        return v
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return v


def flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts become dotted keys; lists stay whole."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def param_str(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def mlflow_key(key: str) -> str:
    """A param, metric or tag key MLflow accepts: other characters become _, the path is normalised."""
    key = re.sub(r"/+", "/", _KEY_BAD.sub("_", key)).strip("/")
    key = "/".join("_" if part in (".", "..") else part for part in key.split("/"))
    return key[:250] or "_"


def dagster_run_url(base: str, run_id: str | None) -> str | None:
    return f"{base.rstrip('/')}/runs/{quote(run_id)}" if run_id else None


def file_digest(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def list_digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest() if items else ""


def step_summaries(steps: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Each step's summary JSON overlaid with its non-null columns (the columns win)."""
    return [{**(from_json(s.get("summary")) or {}), **{k: v for k, v in s.items() if v is not None}} for s in steps]


# ---------------------------------------------------------------------------------------- judgements


def tuned_step(steps: Sequence[Mapping[str, Any]], slos: Mapping[str, Any] | None = None,
               recommend: Recommend | None = None) -> tuple[Mapping[str, Any] | None, str]:
    """The step MLflow's `tuned/*` metrics describe, and by which rule it was chosen.

    With `recommend` (benchmark_tuning's own judgement, handed in by the caller) and SLOs: the step it
    recommends, so `tuned/concurrency` and the recommended --max-num-seqs / -np are the same number.
    Otherwise, or when no step meets the SLOs: the step with the most goodput (SLO-meeting requests/s),
    else the most output tokens/s; ties go to the lower concurrency.
    """
    if slos and recommend is not None:
        rec = recommend([dict(s) for s in steps], dict(slos))
        match = [s for s in steps if rec is not None and s.get("concurrency") == rec]
        if match:
            return match[0], TUNED_BY_SLO
    for key in ("goodput_requests_per_s", "output_tokens_per_s"):
        scored = [s for s in steps if number(s.get(key)) is not None]
        if scored:
            return max(scored, key=lambda s: (s[key], -(s.get("concurrency") or 0))), TUNED_BY_GOODPUT
    return None, TUNED_BY_GOODPUT


def step_metrics(step: Mapping[str, Any]) -> dict[str, float]:
    """Every finite number of one load step: its columns, then what only its summary JSON has."""
    out: dict[str, float] = {}
    summary = from_json(step.get("summary")) or {}
    server = from_json(step.get("server_metrics")) or {}
    for key, v in step.items():
        if key not in _STEP_IDENTITY and (n := number(v)) is not None:
            out[mlflow_key(key)] = n
    if isinstance(summary, Mapping):
        for key, v in flat("", {k: v for k, v in summary.items() if k not in _STEP_IDENTITY}, {}).items():
            if (n := number(v)) is not None:
                out.setdefault(mlflow_key(key), n)
    if isinstance(server, Mapping):
        for key, v in flat("server", server, {}).items():
            if (n := number(v)) is not None:
                out.setdefault(mlflow_key(key), n)
    return out


# ---------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Context:
    """Where the links of a spec point: the Dagster UI, the run doing the logging, the experiments' prefix."""

    dagster_url: str
    logger_run_id: str | None = None
    experiment_prefix: str = ""

    def benchmark_experiment(self, endpoint: str) -> str:
        return f"{self.experiment_prefix}benchmarks/{endpoint}"

    def quantization_experiment(self) -> str:
        return f"{self.experiment_prefix}quantizations"


def benchmark_spec(run: dict, steps: list[dict], quant_sha: str | None, ctx: Context, *,
                   findings: Path | None = None, artifacts: Callable[[Path], dict[str, Path]] | None = None,
                   recommend: Recommend | None = None) -> RunSpec:
    """One benchmark run (a `benchmark_runs` row and its `benchmark_steps` rows) as an MLflow run."""
    rid, endpoint = run["run_id"], run["endpoint"]
    engine = from_json(run.get("engine_settings")) or {}
    workload = from_json(run.get("workload")) or {}
    slos = from_json(run.get("slos")) or {}
    params: dict[str, Any] = {
        "endpoint": endpoint, "engine": run["kind"], "host": run["host"], "base_url": run["base_url"],
        "model": run.get("model"), "served_model_name": run.get("served_model_name"),
        "model_repo_id": run.get("model_repo_id"), "model_revision": run.get("model_revision"),
        "model_commit_sha": run.get("model_commit_sha"), "quantization": run.get("quantization"),
        "load_model": run["load_model"], "concurrencies": run.get("concurrencies"),
        "harness_version": run["harness_version"], "trigger": run.get("trigger"),
        "model_bytes": run.get("model_bytes"), "gpu_bandwidth_gb_s": run.get("gpu_bandwidth_gb_s"),
        "decode_ceiling_tok_s": run.get("decode_ceiling_tok_s"),
    }
    if isinstance(workload, Mapping):
        prompt_set = workload.get("prompt_set") or workload.get("prompts") or workload.get("name")
        if isinstance(prompt_set, str):
            params["prompt_set"] = prompt_set
    params.update(flat("engine", engine, {}) if isinstance(engine, Mapping) else {"engine_settings": engine})
    params.update(flat("workload", workload, {}) if isinstance(workload, Mapping) else {"workload": workload})
    params.update(flat("slo", slos, {}) if isinstance(slos, Mapping) else {"slos": slos})

    # step = concurrency draws one curve per metric; a sweep without distinct concurrencies uses the index.
    concs = [s.get("concurrency") for s in steps]
    by_conc = all(c is not None for c in concs) and len(set(concs)) == len(concs)
    metrics: list[tuple[str, float, int, int]] = []
    started = ms(run["started_at"])
    finished = ms(run.get("finished_at")) or started
    for s in steps:
        ts = ms(s.get("started_at")) or started
        at = int(s["concurrency"]) if by_conc else int(s["step_index"])
        metrics += [(k, v, ts, at) for k, v in step_metrics(s).items()]
    tuned, tuned_by = tuned_step(step_summaries(steps), slos if isinstance(slos, Mapping) else None, recommend)
    if tuned is not None:
        if tuned.get("concurrency") is not None:
            metrics.append(("tuned/concurrency", float(tuned["concurrency"]), finished, 0))
        for key in HEADLINE:
            if (n := number(tuned.get(key))) is not None:
                metrics.append((f"tuned/{key}", n, finished, 0))
    peaks = [n for s in steps if (n := number(s.get("output_tokens_per_s"))) is not None]
    if peaks:
        metrics.append(("peak/output_tokens_per_s", max(peaks), finished, 0))

    base = ctx.dagster_url.rstrip("/")
    bench_url = dagster_run_url(base, run.get("dagster_run_id"))
    logger_url = dagster_run_url(base, ctx.logger_run_id)
    asset_url = f"{base}/assets/benchmark_runs?partition={quote(endpoint)}"
    tags: dict[str, Any] = {
        TAG_KIND: BENCHMARK, TAG_BENCHMARK_ID: rid,
        "idp.endpoint": endpoint,
        "idp.asset_key": "benchmark_runs", "idp.partition": endpoint, "idp.dagster_asset_url": asset_url,
        "idp.dagster_run_id": run.get("dagster_run_id"), "idp.dagster_run_url": bench_url,
        "idp.logged_by_dagster_run_id": ctx.logger_run_id, "idp.logged_by_dagster_run_url": logger_url,
        "idp.project_git_sha": run.get("project_git_sha"),
        "mlflow.source.git.commit": run.get("project_git_sha"),
        "idp.status": run["status"], "idp.started_at": str(run["started_at"]),
        "idp.finished_at": str(run["finished_at"]) if run.get("finished_at") else None,
        "idp.metric_step": "concurrency" if by_conc else "step_index",
        "idp.tuned_by": tuned_by,
        "idp.quantization_id": quant_sha,
    }
    lab_shas = from_json(run.get("lab_git_shas"))
    if isinstance(lab_shas, Mapping):
        tags.update({f"idp.lab_git_sha.{k}": v for k, v in flat("", lab_shas, {}).items()})
    elif isinstance(lab_shas, list) and all(isinstance(x, Mapping) and "sha" in x for x in lab_shas):
        tags.update({f"idp.lab_git_sha.{x.get('name') or x.get('repo') or i}": x["sha"]
                     for i, x in enumerate(lab_shas)})
    elif lab_shas:
        tags["idp.lab_git_shas"] = json.dumps(lab_shas, default=str)
    links = [f"- Dagster run that measured it: [{run.get('dagster_run_id')}]({bench_url})" if bench_url else
             "- Measured outside Dagster (no Dagster run id).",
             f"- Asset: [benchmark_runs, partition {endpoint}]({asset_url})",
             f"- Logged by Dagster run [{ctx.logger_run_id}]({logger_url})" if logger_url else None]
    tags["mlflow.note.content"] = (
        f"Benchmark run `{rid}` of **{endpoint}** ({run['kind']}, {run.get('model') or '?'}"
        f"{', ' + run['quantization'] if run.get('quantization') else ''}), {run['load_model']} load.\n\n"
        + "\n".join(x for x in links if x))

    started_txt = run["started_at"].strftime("%Y-%m-%d %H:%M") if hasattr(run["started_at"], "strftime") \
        else str(run["started_at"])
    return RunSpec(
        kind=BENCHMARK, source_id=rid, id_tag=TAG_BENCHMARK_ID,
        experiment_name=ctx.benchmark_experiment(endpoint),
        run_name=f"{endpoint} {started_txt}", start_time_ms=started, end_time_ms=finished,
        params={k: param_str(v) for k, v in params.items() if v is not None},
        tags={k: str(v) for k, v in tags.items() if v is not None},
        metrics=metrics, artifacts=artifacts or (lambda _d: {}), late_digest=file_digest(findings),
    )


def quantization_spec(q: dict, used_by: list[str], ctx: Context) -> RunSpec:
    """One quantized artefact (its first `quantizations` row) as an MLflow run."""
    start = ms(q["quantized_at"])
    params = {k: q[k] for k in ("model", "commit_sha", "source_file", "source_sha256", "source_dtype",
                                "quant_type", "output_sha256")}
    qp = from_json(q.get("params"))
    if isinstance(qp, Mapping):
        params.update(flat("quant", qp, {}))
    metrics = [(k, n, start, 0) for k in ("size_ratio", "seconds", "output_bytes", "fallbacks")
               if (n := number(q.get(k))) is not None]
    url = dagster_run_url(ctx.dagster_url, q.get("dagster_run_id"))
    tags = {
        TAG_KIND: QUANTIZATION, TAG_QUANTIZATION_ID: q["output_sha256"],
        "idp.asset_key": "gguf_model", "idp.partition": q["model"],
        "idp.dagster_run_id": q.get("dagster_run_id"), "idp.dagster_run_url": url,
        "idp.logged_by_dagster_run_id": ctx.logger_run_id,
        "idp.logged_by_dagster_run_url": dagster_run_url(ctx.dagster_url, ctx.logger_run_id),
        "idp.output_path": q.get("output_path"),
        **used_by_tags(used_by),
    }
    return RunSpec(
        kind=QUANTIZATION, source_id=q["output_sha256"], id_tag=TAG_QUANTIZATION_ID,
        experiment_name=ctx.quantization_experiment(), run_name=f"{q['model']} {q['quant_type']}",
        start_time_ms=start, end_time_ms=start + int(1000 * (q.get("seconds") or 0)),
        params={k: param_str(v) for k, v in params.items() if v is not None},
        tags={k: str(v) for k, v in tags.items() if v is not None},
        metrics=metrics, late_digest=list_digest(used_by),
    )


def used_by_tags(used_by: list[str]) -> dict[str, str]:
    listing = ",".join(used_by)
    if len(listing) > MAX_TAG_VALUE:  # the newest ones matter most
        listing = "…," + listing[-(MAX_TAG_VALUE - 2):].split(",", 1)[-1]
    return {"idp.used_by_benchmark_runs": listing, "idp.used_by_benchmark_runs_count": str(len(used_by))}
