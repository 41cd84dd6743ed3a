"""Benchmark runs and quantizations from DuckDB into MLflow: one complete MLflow run each, never two.

Idempotency, in the order things happen for one source row (a benchmark run or a quantization):

1. The MLflow run is created with its identity tags (``idp.kind`` and ``idp.benchmark_run_id`` or
   ``idp.quantization_id``), so a crash at any later point leaves a run that the next sync finds by tag.
2. Params, tags and metrics go in ``log_batch`` calls. Params are write-once in MLflow: a resumed run
   only gets the params it lacks; one whose logged value differs is left alone and the new value goes
   in the tag ``idp.param_conflict.<key>``. Metrics carry deterministic timestamps (the step's start),
   so re-sending them on resume adds nothing (MLflow drops exact duplicates).
3. Artefacts the run lacks are uploaded (a resumed run lists what it has first).
4. The run is terminated, then ``idp.complete=true`` is set LAST: a run without it is resumed, never
   duplicated.
5. Only then does DuckDB's ``mlflow_runs`` get the link row. A crash between 4 and 5 costs one search
   at the next sync, which finds the complete run and writes the link.

"MLflow lacks it" means: no ``mlflow_runs`` row for this tracking URI and experiment. Secrets (values
of environment variables named like keys, tokens and passwords) are replaced by ``[redacted]`` in every
param, tag and artefact before anything leaves the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from idp_pipelines.secrets import REDACTED, Redactor  # noqa: F401  (part of this module's API)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

    from idp_pipelines.warehouse import Warehouse

BENCHMARK = "benchmark"
QUANTIZATION = "quantization"
TAG_KIND = "idp.kind"
TAG_BENCHMARK_ID = "idp.benchmark_run_id"
TAG_QUANTIZATION_ID = "idp.quantization_id"
TAG_COMPLETE = "idp.complete"
TAG_CONFLICT = "idp.param_conflict."

ARTIFACT_CURVE = "plots/latency_throughput.png"
ARTIFACT_TTFT = "plots/ttft_distribution.png"
ARTIFACT_REQUESTS = "requests/requests.parquet"
ARTIFACT_STEPS = "steps/steps.json"
ARTIFACT_FINDINGS = "findings/findings.md"

# MLflow's limits (mlflow.utils.validation): values beyond these are refused or truncated server-side.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PER_BATCH = 1000  # metrics + params + tags in one log_batch
MAX_PARAMS_TAGS_PER_BATCH = 100
# Above this many runs to look up in one experiment, one paged listing beats a search per run.
LIST_INSTEAD_OF_SEARCH = 25
LINK_FLUSH_EVERY = 50

# Per-step columns that identify the step rather than measure it.
_STEP_IDENTITY = {"run_id", "step_index", "step", "mode", "concurrency", "rate_rps", "started_at",
                  "summary", "server_metrics", "suspect", "slos"}
# MLflow's key rule (mlflow.utils.validation): word characters, - . space / and :, as a normalised path.
_KEY_BAD = re.compile(r"[^\w\-. /:]")


class TrackingError(RuntimeError):
    """MLflow could not be reached, or refused what was logged; the message names the tracking URI."""

    fatal = True  # False: only this run's data was refused, the others can still be logged


# ---------------------------------------------------------------------------------------------- specs


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


@dataclass
class Logged:
    kind: str
    source_id: str
    mlflow_run_id: str
    experiment_id: str
    experiment_name: str
    run_url: str | None
    action: str  # "created", "resumed" or "found" (already complete in MLflow, only the link was missing)
    seconds: float
    label: str = ""
    late_digest: str = ""  # of what was pushed: the findings report, or the list of runs using a quantization


@dataclass
class SyncReport:
    tracking_uri: str
    logged: list[Logged] = field(default_factory=list)
    up_to_date: int = 0
    refreshed: int = 0
    relogged: int = 0  # linked in DuckDB but gone from MLflow (a wiped or replaced store): logged again
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, kind: str, action: str | None = None) -> int:
        return sum(1 for r in self.logged if r.kind == kind and (action is None or r.action == action))


def _ms(ts: Any) -> int | None:
    if ts is None:
        return None
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return int(ts.timestamp() * 1000)


def _json(v: Any) -> Any:
    if v is None or isinstance(v, (dict, list)):
        return v
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return v


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts become dotted keys; lists stay whole."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def _param_str(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, (dict,)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _key(key: str) -> str:
    """A param, metric or tag key MLflow accepts: other characters become _, the path is normalised."""
    key = re.sub(r"/+", "/", _KEY_BAD.sub("_", key)).strip("/")
    key = "/".join("_" if part in (".", "..") else part for part in key.split("/"))
    return key[:250] or "_"


def dagster_run_url(base: str, run_id: str | None) -> str | None:
    return f"{base.rstrip('/')}/runs/{quote(run_id)}" if run_id else None


def tuned_step(steps: Sequence[Mapping[str, Any]], slos: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
    """The step benchmark_tuning recommends (the highest concurrency meeting the SLOs), so MLflow's
    `tuned/*` and the recommended --max-num-seqs / -np are the same number.

    Without SLOs, or when no step meets them: the step with the most goodput (SLO-meeting requests/s),
    else the most output tokens/s; ties go to the lower concurrency.
    """
    if slos:
        from idp_pipelines.bench.tuning import recommend_concurrency

        rec = recommend_concurrency([dict(s) for s in steps], dict(slos))
        match = [s for s in steps if rec.recommended is not None and s.get("concurrency") == rec.recommended]
        if match:
            return match[0]
    for key in ("goodput_requests_per_s", "output_tokens_per_s"):
        scored = [s for s in steps if _number(s.get(key)) is not None]
        if scored:
            return max(scored, key=lambda s: (s[key], -(s.get("concurrency") or 0)))
    return None


HEADLINE = ("goodput_requests_per_s", "goodput_fraction", "requests_per_s", "output_tokens_per_s",
            "output_tok_s_per_request", "error_rate", "ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50",
            "tpot_ms_p95", "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p95", "roofline_fraction")


def step_metrics(step: Mapping[str, Any]) -> dict[str, float]:
    """Every finite number of one load step: its columns, then what only its summary JSON has."""
    out: dict[str, float] = {}
    summary = _json(step.get("summary")) or {}
    server = _json(step.get("server_metrics")) or {}
    for key, v in step.items():
        if key not in _STEP_IDENTITY and (n := _number(v)) is not None:
            out[_key(key)] = n
    if isinstance(summary, Mapping):
        for key, v in _flat("", {k: v for k, v in summary.items() if k not in _STEP_IDENTITY}, {}).items():
            if (n := _number(v)) is not None:
                out.setdefault(_key(key), n)
    if isinstance(server, Mapping):
        for key, v in _flat("server", server, {}).items():
            if (n := _number(v)) is not None:
                out.setdefault(_key(key), n)
    return out


# ---------------------------------------------------------------------------------------------- the logger


class MLflowLogger:
    """Logs what MLflow lacks; see the module docstring for the idempotency contract."""

    def __init__(
        self,
        client: MlflowClient,
        warehouse: Warehouse,
        tracking_uri: str,
        *,
        experiment_prefix: str = "",
        dagster_url: str = "http://127.0.0.1:3000",
        dagster_run_id: str | None = None,
        findings_for: Callable[[str], Path | None] | None = None,
        redactor: Redactor | None = None,
        run_url: Callable[[str, str], str | None] | None = None,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> None:
        self.client = client
        self.warehouse = warehouse
        self.uri = tracking_uri.rstrip("/")
        self.prefix = experiment_prefix
        self.dagster_url = dagster_url.rstrip("/")
        self.dagster_run_id = dagster_run_id
        self.findings_for = findings_for or (lambda _run_id: None)
        self.redactor = redactor or Redactor.from_env()
        self._run_url = run_url or self._default_run_url
        self.progress = progress or (lambda _msg: None)
        self.progress_every_s = progress_every_s
        self._experiments: dict[str, str] = {}

    # ---- names and links

    def benchmark_experiment(self, endpoint: str) -> str:
        return f"{self.prefix}benchmarks/{endpoint}"

    def quantization_experiment(self) -> str:
        return f"{self.prefix}quantizations"

    def _default_run_url(self, experiment_id: str, run_id: str) -> str | None:
        if not self.uri.startswith("http"):
            return None
        return f"{self.uri}/#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}"

    def _fail(self, what: str, exc: BaseException) -> TrackingError:
        return TrackingError(
            f"MLflow at {self.uri} failed while {what}: {exc}. DuckDB keeps every benchmark row; the next "
            f"materialisation of mlflow_experiments logs what is missing (a half-logged run is resumed, not duplicated)."
        )

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast with the URI: the client would otherwise retry an unreachable server for minutes."""
        if not self.uri.startswith("http"):
            return
        import httpx

        try:
            r = httpx.get(f"{self.uri}/health", timeout=timeout_s, trust_env=False)
        except httpx.HTTPError as exc:
            raise TrackingError(
                f"MLflow tracking server {self.uri} is not reachable ({type(exc).__name__}: {exc}). Nothing was "
                f"logged and DuckDB is unchanged. Fix: start it (`make up` starts the lab's), or set the lab's "
                f"mlflow.tracking_uri; then materialise mlflow_experiments again."
            ) from exc
        if r.status_code >= 400:
            raise TrackingError(f"MLflow tracking server {self.uri} answered {r.status_code} to /health: "
                                f"{r.text[:200]!r}. Nothing was logged and DuckDB is unchanged.")

    # ---- what is missing

    def _links(self, con) -> dict[tuple[str, str], tuple[str, str, str | None, str | None, str | None]]:
        rows = con.execute("SELECT kind, source_id, tracking_uri, experiment_name, mlflow_run_id, late_digest, "
                           "experiment_id FROM mlflow_runs").fetchall()
        return {(k, s): (uri, exp, run, dig, eid) for k, s, uri, exp, run, dig, eid in rows}

    def plan(self) -> dict[str, Any]:
        """What a sync would do: the benchmark runs and quantizations MLflow lacks, and the linked ones.

        A link in DuckDB is trusted only while MLflow still has its run: see `_stale_links`.
        """
        with self.warehouse.read() as con:
            links = self._links(con)
            runs = con.execute("SELECT run_id, endpoint FROM benchmark_runs WHERE status = 'complete' "
                               "ORDER BY started_at, run_id").fetchall()
            quants = con.execute("SELECT output_sha256, min(quantized_at) FROM quantizations "
                                 "GROUP BY output_sha256 ORDER BY 2, 1").fetchall()

        def linked(kind: str, sid: str, exp: str) -> bool:
            link = links.get((kind, sid))
            return link is not None and link[0] == self.uri and link[1] == exp

        qexp = self.quantization_experiment()
        linked_b = {r for r, ep in runs if linked(BENCHMARK, r, self.benchmark_experiment(ep))}
        linked_q = {q for q, _ in quants if linked(QUANTIZATION, q, qexp)}
        stale = self._stale_links([(BENCHMARK, r, links[(BENCHMARK, r)]) for r, _ in runs if r in linked_b]
                                  + [(QUANTIZATION, q, links[(QUANTIZATION, q)]) for q, _ in quants if q in linked_q])
        linked_b -= {sid for kind, sid in stale if kind == BENCHMARK}
        linked_q -= {sid for kind, sid in stale if kind == QUANTIZATION}
        return {
            "benchmarks": [(r, ep) for r, ep in runs if r not in linked_b],
            "quantizations": [q for q, _ in quants if q not in linked_q],
            "linked_benchmarks": [(r, links[(BENCHMARK, r)]) for r, _ in runs if r in linked_b],
            "linked_quantizations": [(q, links[(QUANTIZATION, q)]) for q, _ in quants if q in linked_q],
            "stale": len(stale),
        }

    def _stale_links(self, linked: list[tuple[str, str, tuple]]) -> set[tuple[str, str]]:
        """Linked runs MLflow no longer has: its store was wiped or replaced behind the same URI.

        Per experiment, two cheap calls: the experiment (by name) must still have the id the links
        recorded, and the newest linked run must still exist. Only when one fails are the experiment's
        runs listed, deleted ones included: a run the owner deleted in the MLflow UI is respected,
        never logged again.
        """
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        by_exp: dict[str, list[tuple[str, str, str | None, str | None]]] = {}
        for kind, sid, (_uri, exp, run_id, _digest, eid) in linked:
            by_exp.setdefault(exp, []).append((kind, sid, run_id, eid))
        stale: set[tuple[str, str]] = set()
        try:
            for name, items in by_exp.items():
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    stale.update((kind, sid) for kind, sid, _, _ in items)
                    continue
                if all(eid == exp.experiment_id for *_, eid in items) and self._run_exists(items[-1][2]):
                    continue
                present: set[str] = set()
                token = None
                while True:
                    page = self.client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL,
                                                   max_results=1000, page_token=token)
                    present.update(r.info.run_id for r in page)
                    token = page.token
                    if not token:
                        break
                stale.update((kind, sid) for kind, sid, run_id, _ in items if run_id not in present)
        except MlflowException as exc:
            raise self._fail("checking that MLflow still has the runs DuckDB links", exc) from exc
        return stale

    def _run_exists(self, run_id: str | None) -> bool:
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    # ---- the backfill

    def sync(self, *, batch: int = 25) -> SyncReport:
        """Log every complete benchmark run and quantization MLflow lacks; refresh late parts of linked ones."""
        t0 = time.monotonic()
        report = SyncReport(self.uri)
        self.check_reachable()
        with self._sync_lock():
            plan = self.plan()
            pending_b, pending_q = plan["benchmarks"], plan["quantizations"]
            report.up_to_date = len(plan["linked_benchmarks"]) + len(plan["linked_quantizations"])
            report.relogged = plan["stale"]
            if plan["stale"]:
                self.progress(f"MLflow at {self.uri} no longer has {plan['stale']} run(s) that DuckDB links (its "
                              f"store was wiped or replaced?): logging them again")
            total = len(pending_b) + len(pending_q)
            if total:
                self.progress(f"{len(pending_b)} benchmark run(s) and {len(pending_q)} quantization(s) to log "
                              f"to {self.uri}")
            links: list[Logged] = []
            last_note = time.monotonic()
            try:
                for kind, ids, build in ((QUANTIZATION, pending_q, self._quantization_specs),
                                         (BENCHMARK, [r for r, _ in pending_b], self._benchmark_specs)):
                    for i in range(0, len(ids), batch):
                        chunk = ids[i:i + batch]
                        specs = build(chunk)
                        existing = self._existing_runs(specs)
                        for spec, files in self._prefetched(specs, existing):
                            try:
                                logged = self._log(spec, existing.get(spec.source_id, []), files)
                            except TrackingError as exc:
                                if getattr(exc, "fatal", True):
                                    raise
                                report.failures.append(str(exc))
                                continue
                            report.logged.append(logged)
                            links.append(logged)
                            if len(links) >= LINK_FLUSH_EVERY:
                                self._write_links(links)
                            if time.monotonic() - last_note >= self.progress_every_s:
                                last_note = time.monotonic()
                                done = len(report.logged) + len(report.failures)
                                self.progress(f"{done} of {total} logged ({done / (last_note - t0):.1f}/s)")
            finally:
                # What completed is recorded even when a later run fails: it will not be looked up again.
                self._write_links(links)
            report.refreshed = self._refresh_late(plan)
        report.seconds = time.monotonic() - t0
        if report.failures:
            raise TrackingError(f"{len(report.failures)} run(s) could not be logged to {self.uri} (the others "
                                f"were): " + " | ".join(report.failures[:5]))
        return report

    def _prefetched(self, specs: list[RunSpec], existing: Mapping[str, list[Run]]
                    ) -> Iterator[tuple[RunSpec, Callable[[Path], dict[str, Path]]]]:
        """Each spec with its artefacts, the next run's drawn in a thread while this one uploads.

        Drawing the PNGs is most of a run's CPU time and uploading is mostly waiting for the server: overlapped,
        a backfill goes about a third faster. Runs already complete in MLflow draw nothing.
        """
        from concurrent.futures import ThreadPoolExecutor

        def needed(spec: RunSpec) -> bool:
            return not any(r.data.tags.get(TAG_COMPLETE) == "true" for r in existing.get(spec.source_id, []))

        with tempfile.TemporaryDirectory(prefix="idp-mlflow-") as tmp, ThreadPoolExecutor(1) as pool:
            def draw(i: int):
                return pool.submit(specs[i].artifacts, Path(tmp) / str(i)) if needed(specs[i]) else None

            ahead = draw(0) if specs else None
            for i, spec in enumerate(specs):
                current, ahead = ahead, (draw(i + 1) if i + 1 < len(specs) else None)
                try:
                    yield spec, (lambda folder, f=current, s=spec: f.result() if f is not None else s.artifacts(folder))
                finally:
                    if current is not None and not current.cancelled():
                        current.exception()  # wait: its folder goes next
                    shutil.rmtree(Path(tmp) / str(i), ignore_errors=True)
            if ahead is not None:
                ahead.cancel()

    def log_benchmark_run(self, run_id: str) -> Logged:
        """Log (or resume, or just find) one benchmark run and record its link."""
        self.check_reachable()
        (spec,) = self._benchmark_specs([run_id])
        logged = self._log(spec, self._existing_runs([spec]).get(run_id, []))
        self._write_links([logged])
        return logged

    @contextlib.contextmanager
    def _sync_lock(self) -> Iterator[None]:
        """Two syncs at once (two Dagster runs) would both miss a run and both create it: one at a time."""
        lock = self.warehouse.path.with_name(self.warehouse.path.name + ".mlflow-sync.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            next_note = 0.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= next_note:
                        self.progress(f"waiting for another MLflow sync to finish ({lock})")
                        next_note = time.monotonic() + 30.0
                    time.sleep(0.5)
            yield
        finally:
            os.close(fd)

    # ---- DuckDB -> specs

    def _benchmark_specs(self, run_ids: Sequence[str]) -> list[RunSpec]:
        if not run_ids:
            return []
        marks = ",".join("?" * len(run_ids))
        with self.warehouse.read() as con:
            cur = con.execute(f"SELECT * FROM benchmark_runs WHERE run_id IN ({marks})", list(run_ids))
            cols = [d[0] for d in cur.description]
            runs = {r["run_id"]: r for r in (dict(zip(cols, row)) for row in cur.fetchall())}
            cur = con.execute(f"SELECT * FROM benchmark_steps WHERE run_id IN ({marks}) ORDER BY run_id, step_index",
                              list(run_ids))
            cols = [d[0] for d in cur.description]
            steps: dict[str, list[dict]] = {}
            for row in cur.fetchall():
                d = dict(zip(cols, row))
                steps.setdefault(d["run_id"], []).append(d)
            quant = {}
            for rid, out_sha in con.execute(
                f"""SELECT b.run_id, min(q.output_sha256) FROM benchmark_runs b JOIN quantizations q
                    ON q.model = b.model AND q.quant_type = b.quantization
                   AND (b.model_commit_sha IS NULL OR q.commit_sha = b.model_commit_sha)
                   WHERE b.run_id IN ({marks}) GROUP BY b.run_id""", list(run_ids)).fetchall():
                quant[rid] = out_sha
        missing = [r for r in run_ids if r not in runs]
        if missing:
            raise TrackingError(f"benchmark run(s) {', '.join(missing)} are not in {self.warehouse.path}")
        return [self._benchmark_spec(runs[r], steps.get(r, []), quant.get(r)) for r in run_ids]

    def _benchmark_spec(self, run: dict, steps: list[dict], quant_sha: str | None) -> RunSpec:
        rid, endpoint = run["run_id"], run["endpoint"]
        engine = _json(run.get("engine_settings")) or {}
        workload = _json(run.get("workload")) or {}
        slos = _json(run.get("slos")) or {}
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
        params.update(_flat("engine", engine, {}) if isinstance(engine, Mapping) else {"engine_settings": engine})
        params.update(_flat("workload", workload, {}) if isinstance(workload, Mapping) else {"workload": workload})
        params.update(_flat("slo", slos, {}) if isinstance(slos, Mapping) else {"slos": slos})

        # step = concurrency draws one curve per metric; a sweep without distinct concurrencies uses the index.
        concs = [s.get("concurrency") for s in steps]
        by_conc = all(c is not None for c in concs) and len(set(concs)) == len(concs)
        metrics: list[tuple[str, float, int, int]] = []
        started = _ms(run["started_at"])
        finished = _ms(run.get("finished_at")) or started
        for s in steps:
            ts = _ms(s.get("started_at")) or started
            at = int(s["concurrency"]) if by_conc else int(s["step_index"])
            metrics += [(k, v, ts, at) for k, v in step_metrics(s).items()]
        tuned = tuned_step([{**(_json(s.get("summary")) or {}), **{k: v for k, v in s.items() if v is not None}}
                            for s in steps], slos if isinstance(slos, Mapping) else None)
        if tuned is not None:
            if tuned.get("concurrency") is not None:
                metrics.append(("tuned/concurrency", float(tuned["concurrency"]), finished, 0))
            for key in HEADLINE:
                if (n := _number(tuned.get(key))) is not None:
                    metrics.append((f"tuned/{key}", n, finished, 0))
        peaks = [n for s in steps if (n := _number(s.get("output_tokens_per_s"))) is not None]
        if peaks:
            metrics.append(("peak/output_tokens_per_s", max(peaks), finished, 0))

        bench_url = dagster_run_url(self.dagster_url, run.get("dagster_run_id"))
        logger_url = dagster_run_url(self.dagster_url, self.dagster_run_id)
        asset_url = f"{self.dagster_url}/assets/benchmark_runs?partition={quote(endpoint)}"
        tags: dict[str, Any] = {
            TAG_KIND: BENCHMARK, TAG_BENCHMARK_ID: rid,
            "idp.endpoint": endpoint,
            "idp.asset_key": "benchmark_runs", "idp.partition": endpoint, "idp.dagster_asset_url": asset_url,
            "idp.dagster_run_id": run.get("dagster_run_id"), "idp.dagster_run_url": bench_url,
            "idp.logged_by_dagster_run_id": self.dagster_run_id, "idp.logged_by_dagster_run_url": logger_url,
            "idp.project_git_sha": run.get("project_git_sha"),
            "mlflow.source.git.commit": run.get("project_git_sha"),
            "idp.status": run["status"], "idp.started_at": str(run["started_at"]),
            "idp.finished_at": str(run["finished_at"]) if run.get("finished_at") else None,
            "idp.metric_step": "concurrency" if by_conc else "step_index",
            "idp.tuned_by": "max goodput_requests_per_s (ties: lower concurrency)",
            "idp.quantization_id": quant_sha,
        }
        lab_shas = _json(run.get("lab_git_shas"))
        if isinstance(lab_shas, Mapping):
            tags.update({f"idp.lab_git_sha.{k}": v for k, v in _flat("", lab_shas, {}).items()})
        elif isinstance(lab_shas, list) and all(isinstance(x, Mapping) and "sha" in x for x in lab_shas):
            tags.update({f"idp.lab_git_sha.{x.get('name') or x.get('repo') or i}": x["sha"]
                         for i, x in enumerate(lab_shas)})
        elif lab_shas:
            tags["idp.lab_git_shas"] = json.dumps(lab_shas, default=str)
        links = [f"- Dagster run that measured it: [{run.get('dagster_run_id')}]({bench_url})" if bench_url else
                 "- Measured outside Dagster (no Dagster run id).",
                 f"- Asset: [benchmark_runs, partition {endpoint}]({asset_url})",
                 f"- Logged by Dagster run [{self.dagster_run_id}]({logger_url})" if logger_url else None]
        tags["mlflow.note.content"] = (
            f"Benchmark run `{rid}` of **{endpoint}** ({run['kind']}, {run.get('model') or '?'}"
            f"{', ' + run['quantization'] if run.get('quantization') else ''}), {run['load_model']} load.\n\n"
            + "\n".join(x for x in links if x))
        findings = self.findings_for(rid)
        digest = _file_digest(findings)

        def artifacts(folder: Path) -> dict[str, Path]:
            return self._benchmark_artifacts(run, steps, findings, folder)

        started_txt = run["started_at"].strftime("%Y-%m-%d %H:%M") if hasattr(run["started_at"], "strftime") \
            else str(run["started_at"])
        return RunSpec(
            kind=BENCHMARK, source_id=rid, id_tag=TAG_BENCHMARK_ID,
            experiment_name=self.benchmark_experiment(endpoint),
            run_name=f"{endpoint} {started_txt}", start_time_ms=started, end_time_ms=finished,
            params={k: _param_str(v) for k, v in params.items() if v is not None},
            tags={k: str(v) for k, v in tags.items() if v is not None},
            metrics=metrics, artifacts=artifacts, late_digest=digest,
        )

    def _benchmark_artifacts(self, run: dict, steps: list[dict], findings: Path | None,
                             folder: Path) -> dict[str, Path]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from idp_pipelines.tracking import plots

        with self.warehouse.read() as con:
            table = con.sql("SELECT * FROM benchmark_requests WHERE run_id = ? ORDER BY step_index, request_id",
                            params=[run["run_id"]]).to_arrow_table()
        # Error texts can echo request headers: no secret leaves in a string column.
        for i, f in enumerate(table.schema):
            if str(f.type) in ("string", "large_string") and self.redactor.secrets:
                col = table.column(i)
                for s in self.redactor.secrets:
                    col = pc.replace_substring(col, pattern=s, replacement=REDACTED)
                table = table.set_column(i, f, col)
        out: dict[str, Path] = {}
        (folder / "requests").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / ARTIFACT_REQUESTS, compression="zstd")
        out[ARTIFACT_REQUESTS] = folder / ARTIFACT_REQUESTS

        title = self.redactor.text(f"{run['endpoint']} · {run.get('model') or ''} "
                                   f"{run.get('quantization') or ''} · {str(run['started_at'])[:16]}")
        summaries = [{**(_json(s.get("summary")) or {}), **{k: v for k, v in s.items() if v is not None}}
                     for s in steps]
        (folder / "plots").mkdir(parents=True, exist_ok=True)
        (folder / ARTIFACT_CURVE).write_bytes(plots.latency_throughput_png(summaries, title))
        out[ARTIFACT_CURVE] = folder / ARTIFACT_CURVE
        label = {s["step_index"]: (f"c={s['concurrency']}" if s.get("concurrency") is not None else s["step"])
                 for s in steps}
        ttft: dict[str, list[float]] = {}
        if table.num_rows:
            idx = table.column("step_index").to_pylist()
            vals = table.column("ttft_ms").to_pylist()
            errs = table.column("error").to_pylist()
            for si, v, e in zip(idx, vals, errs):
                if v is not None and e is None:
                    ttft.setdefault(label.get(si, str(si)), []).append(v)
        (folder / ARTIFACT_TTFT).write_bytes(plots.ttft_distribution_png(ttft, title))
        out[ARTIFACT_TTFT] = folder / ARTIFACT_TTFT

        (folder / "steps").mkdir(parents=True, exist_ok=True)
        steps_json = json.dumps([{k: _json(v) if k in ("summary", "server_metrics") else v for k, v in s.items()}
                                 for s in steps], default=str, indent=1, sort_keys=True)
        (folder / ARTIFACT_STEPS).write_text(self.redactor.text(steps_json))
        out[ARTIFACT_STEPS] = folder / ARTIFACT_STEPS
        if findings is not None:
            (folder / "findings").mkdir(parents=True, exist_ok=True)
            (folder / ARTIFACT_FINDINGS).write_text(self.redactor.text(findings.read_text(errors="replace")))
            out[ARTIFACT_FINDINGS] = folder / ARTIFACT_FINDINGS
        return out

    def _quantization_specs(self, shas: Sequence[str]) -> list[RunSpec]:
        if not shas:
            return []
        marks = ",".join("?" * len(shas))
        with self.warehouse.read() as con:
            # The first time the artefact was made (a reused row repeats an older one).
            cur = con.execute(
                f"""SELECT * FROM quantizations WHERE output_sha256 IN ({marks})
                    QUALIFY row_number() OVER (PARTITION BY output_sha256 ORDER BY reused, quantized_at) = 1""",
                list(shas))
            cols = [d[0] for d in cur.description]
            rows = {r["output_sha256"]: r for r in (dict(zip(cols, x)) for x in cur.fetchall())}
            used = self._used_by(con, list(shas))
        return [self._quantization_spec(rows[s], used.get(s, [])) for s in shas if s in rows]

    @staticmethod
    def _used_by(con, shas: list[str]) -> dict[str, list[str]]:
        marks = ",".join("?" * len(shas))
        out: dict[str, list[str]] = {}
        for sha, rid in con.execute(
            f"""SELECT DISTINCT q.output_sha256, b.run_id FROM quantizations q JOIN benchmark_runs b
                ON b.model = q.model AND b.quantization = q.quant_type
               AND (b.model_commit_sha IS NULL OR b.model_commit_sha = q.commit_sha)
               AND b.started_at >= q.quantized_at
               WHERE q.output_sha256 IN ({marks}) AND b.status = 'complete'
               ORDER BY 1, 2""", shas).fetchall():
            out.setdefault(sha, []).append(rid)
        return out

    def _quantization_spec(self, q: dict, used_by: list[str]) -> RunSpec:
        start = _ms(q["quantized_at"])
        params = {k: q[k] for k in ("model", "commit_sha", "source_file", "source_sha256", "source_dtype",
                                    "quant_type", "output_sha256")}
        qp = _json(q.get("params"))
        if isinstance(qp, Mapping):
            params.update(_flat("quant", qp, {}))
        metrics = [(k, n, start, 0) for k in ("size_ratio", "seconds", "output_bytes", "fallbacks")
                   if (n := _number(q.get(k))) is not None]
        url = dagster_run_url(self.dagster_url, q.get("dagster_run_id"))
        tags = {
            TAG_KIND: QUANTIZATION, TAG_QUANTIZATION_ID: q["output_sha256"],
            "idp.asset_key": "gguf_model", "idp.partition": q["model"],
            "idp.dagster_run_id": q.get("dagster_run_id"), "idp.dagster_run_url": url,
            "idp.logged_by_dagster_run_id": self.dagster_run_id,
            "idp.logged_by_dagster_run_url": dagster_run_url(self.dagster_url, self.dagster_run_id),
            "idp.output_path": q.get("output_path"),
            **self._used_by_tags(used_by),
        }
        return RunSpec(
            kind=QUANTIZATION, source_id=q["output_sha256"], id_tag=TAG_QUANTIZATION_ID,
            experiment_name=self.quantization_experiment(), run_name=f"{q['model']} {q['quant_type']}",
            start_time_ms=start, end_time_ms=start + int(1000 * (q.get("seconds") or 0)),
            params={k: _param_str(v) for k, v in params.items() if v is not None},
            tags={k: str(v) for k, v in tags.items() if v is not None},
            metrics=metrics, late_digest=_list_digest(used_by),
        )

    @staticmethod
    def _used_by_tags(used_by: list[str]) -> dict[str, str]:
        listing = ",".join(used_by)
        if len(listing) > MAX_TAG_VALUE:  # the newest ones matter most
            listing = "…," + listing[-(MAX_TAG_VALUE - 2):].split(",", 1)[-1]
        return {"idp.used_by_benchmark_runs": listing, "idp.used_by_benchmark_runs_count": str(len(used_by))}

    # ---- MLflow

    def _experiment(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        from mlflow.exceptions import MlflowException

        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    eid = self.client.create_experiment(name, tags={"idp.managed_by": "idp_pipelines"})
                except MlflowException as exc:  # created meanwhile by someone else
                    if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                    eid = self.client.get_experiment_by_name(name).experiment_id
            elif exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} (id {exp.experiment_id}) at {self.uri} is deleted, so no run can be "
                    f"logged to it. Fix: restore it (`mlflow experiments restore --experiment-id {exp.experiment_id}`) "
                    f"or purge it for good (`mlflow gc`).")
            else:
                eid = exp.experiment_id
        except MlflowException as exc:
            raise self._fail(f"getting the experiment {name!r}", exc) from exc
        self._experiments[name] = eid
        return eid

    def _existing_runs(self, specs: Sequence[RunSpec]) -> dict[str, list[Run]]:
        """MLflow runs already tagged with each spec's source id (any state), by source id."""
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        found: dict[str, list[Run]] = {}
        by_exp: dict[str, list[RunSpec]] = {}
        for s in specs:
            by_exp.setdefault(s.experiment_name, []).append(s)
        for name, group in by_exp.items():
            eid = self._experiment(name)
            wanted = {s.source_id for s in group}
            try:
                if len(group) > LIST_INSTEAD_OF_SEARCH:
                    filters = [f"tags.`{TAG_KIND}` = '{group[0].kind}'"]
                else:
                    for s in group:
                        if "'" in s.source_id or "\\" in s.source_id:
                            raise TrackingError(f"source id {s.source_id!r} cannot be searched for in MLflow")
                    filters = [f"tags.`{s.id_tag}` = '{s.source_id}'" for s in group]
                for flt in filters:
                    token = None
                    while True:
                        page = self.client.search_runs([eid], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY,
                                                       max_results=1000, page_token=token,
                                                       order_by=["attributes.start_time ASC"])
                        for run in page:
                            sid = run.data.tags.get(group[0].id_tag)
                            if sid in wanted:
                                found.setdefault(sid, []).append(run)
                        token = page.token
                        if not token:
                            break
            except MlflowException as exc:
                raise self._fail(f"searching experiment {name!r}", exc) from exc
        return found

    def _log(self, spec: RunSpec, existing: list[Run],
             artifacts: Callable[[Path], dict[str, Path]] | None = None) -> Logged:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException, RestException

        t0 = time.monotonic()
        eid = self._experiment(spec.experiment_name)
        what = f"logging {spec.kind} {spec.source_id}"
        try:
            run = self._choose(existing)
            if run is not None and run.data.tags.get(TAG_COMPLETE) == "true":
                # What late parts it got is unknown: an empty digest makes the next sync push them again.
                return Logged(spec.kind, spec.source_id, run.info.run_id, eid, spec.experiment_name,
                              self._run_url(eid, run.info.run_id), "found", time.monotonic() - t0, spec.run_name)
            action = "resumed" if run is not None else "created"
            if run is None:
                run = self.client.create_run(
                    eid, start_time=spec.start_time_ms, run_name=self.redactor.text(spec.run_name),
                    tags={TAG_KIND: spec.kind, spec.id_tag: spec.source_id})
            run_id = run.info.run_id
            have = dict(run.data.params) if action == "resumed" else {}

            params, tags = {}, {}
            for k, v in spec.params.items():
                k, v = _key(k), self.redactor.value(k, v)[:MAX_PARAM_VALUE]
                if k not in have:
                    params[k] = v
                elif have[k] != v:  # write-once: keep what was logged, say what it would be now
                    tags[f"{TAG_CONFLICT}{k}"] = v[:MAX_TAG_VALUE]
            for k, v in spec.tags.items():
                if k != TAG_COMPLETE:
                    tags[_key(k)] = self.redactor.value(k, v)[:MAX_TAG_VALUE]
            metrics = [Metric(k, v, ts, st) for k, v, ts, st in spec.metrics]
            self._batches(run_id, [Param(k, v) for k, v in params.items()],
                          [RunTag(k, v) for k, v in tags.items()], metrics)

            with tempfile.TemporaryDirectory(prefix="idp-mlflow-") as tmp:
                files = (artifacts or spec.artifacts)(Path(tmp))
                present = self._artifact_paths(run_id, files) if action == "resumed" else set()
                for path, local in files.items():
                    if path in present:
                        continue
                    if self.redactor.leaks(local.read_bytes()):
                        raise TrackingError(f"refusing to upload {path} of {spec.kind} {spec.source_id}: it holds "
                                            f"a secret value after redaction")
                    folder = path.rsplit("/", 1)[0] if "/" in path else None
                    self.client.log_artifact(run_id, str(local), folder)
            with contextlib.redirect_stdout(io.StringIO()):  # set_terminated prints the run's URL
                self.client.set_terminated(run_id, "FINISHED", end_time=spec.end_time_ms)
            self.client.set_tag(run_id, TAG_COMPLETE, "true")
        except RestException as exc:
            err = self._fail(what, exc)
            # A refused value (a 4xx for this run's data) must not stop the other runs; anything else does.
            err.fatal = exc.error_code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")
            raise err from exc
        except MlflowException as exc:
            raise self._fail(what, exc) from exc
        except OSError as exc:
            raise self._fail(what, exc) from exc
        return Logged(spec.kind, spec.source_id, run_id, eid, spec.experiment_name, self._run_url(eid, run_id),
                      action, time.monotonic() - t0, spec.run_name, spec.late_digest)

    def _choose(self, runs: list[Run]) -> Run | None:
        """The run to keep among those tagged with one source id; extras (only a race makes them) are deleted."""
        if not runs:
            return None
        runs = sorted(runs, key=lambda r: (r.data.tags.get(TAG_COMPLETE) != "true", r.info.start_time or 0,
                                           r.info.run_id))
        for extra in runs[1:]:
            self.progress(f"deleting duplicate MLflow run {extra.info.run_id} of "
                          f"{extra.data.tags.get(TAG_BENCHMARK_ID) or extra.data.tags.get(TAG_QUANTIZATION_ID)}")
            self.client.delete_run(extra.info.run_id)
        return runs[0]

    def _batches(self, run_id: str, params: list, tags: list, metrics: list[Metric]) -> None:
        while params or tags or metrics:
            p, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
            t, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
            room = MAX_PER_BATCH - len(p) - len(t)
            m, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t, synchronous=True)

    def _artifact_paths(self, run_id: str, files: Mapping[str, Path]) -> set[str]:
        folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
        have: set[str] = set()
        for folder in folders:
            have |= {f.path for f in self.client.list_artifacts(run_id, folder) if not f.is_dir}
        return have

    # ---- links and late parts

    def _write_links(self, links: list[Logged]) -> None:
        """Record completed runs in DuckDB (then they are never looked up again), and empty the list."""
        if not links:
            return
        now = datetime.now(timezone.utc)
        rows = [[x.kind, x.source_id, x.mlflow_run_id, x.experiment_id, x.experiment_name, x.run_url, self.uri, now,
                 self.dagster_run_id, x.late_digest] for x in links]
        with self.warehouse.write() as con:
            con.executemany("INSERT OR REPLACE INTO mlflow_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        links.clear()

    def _refresh_late(self, plan: dict[str, Any]) -> int:
        """A findings report written later, a benchmark run that later used a quantization: pushed to linked runs."""
        from mlflow.exceptions import MlflowException

        updates: list[tuple[str, str, str]] = []  # kind, source id, new digest
        try:
            for rid, (_uri, _exp, mlflow_id, digest, _eid) in plan["linked_benchmarks"]:
                findings = self.findings_for(rid)
                new = _file_digest(findings)
                if findings is None or new == (digest or ""):
                    continue
                with tempfile.TemporaryDirectory(prefix="idp-mlflow-") as tmp:
                    local = Path(tmp) / "findings.md"
                    local.write_text(self.redactor.text(findings.read_text(errors="replace")))
                    self.client.log_artifact(mlflow_id, str(local), "findings")
                updates.append((BENCHMARK, rid, new))
            linked_q = plan["linked_quantizations"]
            if linked_q:
                with self.warehouse.read() as con:
                    used = self._used_by(con, [q for q, _ in linked_q])
                for sha, (_uri, _exp, mlflow_id, digest, _eid) in linked_q:
                    new = _list_digest(used.get(sha, []))
                    if new == (digest or ""):
                        continue
                    for k, v in self._used_by_tags(used.get(sha, [])).items():
                        self.client.set_tag(mlflow_id, k, v)
                    updates.append((QUANTIZATION, sha, new))
        except MlflowException as exc:
            raise self._fail("refreshing findings reports and quantization usage", exc) from exc
        if updates:
            with self.warehouse.write() as con:
                con.executemany("UPDATE mlflow_runs SET late_digest = ? WHERE kind = ? AND source_id = ?",
                                [[d, k, s] for k, s, d in updates])
        return len(updates)


def _file_digest(path: Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _list_digest(items: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest() if items else ""
