"""Benchmark runs and quantizations from DuckDB into MLflow: what MLflow lacks, each run logged once.

The sync plans from the links (`links`), builds each run's spec from DuckDB rows (`queries`, `specs`),
draws its artefacts (`artifacts`) while the previous run uploads, logs it by the idempotent protocol
(`protocol`) and records the links in batches.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idp_pipelines import settings
from idp_pipelines.secrets import Redactor
from idp_pipelines.tracking import queries
from idp_pipelines.tracking.artifacts import benchmark_artifacts
from idp_pipelines.tracking.errors import TrackingError
from idp_pipelines.tracking.links import Links
from idp_pipelines.tracking.protocol import Logged, MLflowRuns, is_complete
from idp_pipelines.tracking.specs import (
    BENCHMARK,
    QUANTIZATION,
    Context,
    Recommend,
    RunSpec,
    benchmark_spec,
    file_digest,
    list_digest,
    quantization_spec,
    used_by_tags,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from idp_pipelines.warehouse import Warehouse

LINK_FLUSH_EVERY = 50


def findings_report(run_id: str) -> Path | None:
    """The hardware_findings report that first judged this run, once that asset has run."""
    path = settings.findings_path(run_id)
    return path if path.is_file() else None


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


class MLflowLogger:
    """Logs what MLflow lacks; see `protocol` for the idempotency contract.

    `recommend` is benchmark_tuning's judgement (steps, SLOs -> concurrency), handed in by the caller so
    that `tuned/*` is the recommended step without this domain importing the benchmark core.
    """

    def __init__(
        self,
        client: MlflowClient,
        warehouse: Warehouse,
        tracking_uri: str,
        *,
        experiment_prefix: str = "",
        dagster_url: str | None = None,
        dagster_run_id: str | None = None,
        findings_for: Callable[[str], Path | None] = findings_report,
        redactor: Redactor | None = None,
        recommend: Recommend | None = None,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> None:
        self.warehouse = warehouse
        self.uri = tracking_uri.rstrip("/")
        self.ctx = Context(dagster_url=(dagster_url or settings.dagster_url()).rstrip("/"),
                           logger_run_id=dagster_run_id, experiment_prefix=experiment_prefix)
        self.findings_for = findings_for
        self.redactor = redactor or Redactor.from_env()
        self.recommend = recommend
        self.progress = progress or (lambda _msg: None)
        self.progress_every_s = progress_every_s
        self.runs = MLflowRuns(client, self.uri, self.redactor, self.progress)
        self.links = Links(warehouse, self.uri, dagster_run_id)

    # ---- what is missing

    def plan(self) -> dict[str, Any]:
        """What a sync would do: the benchmark runs and quantizations MLflow lacks, and the linked ones.

        A link in DuckDB is trusted only while MLflow still has its run (`MLflowRuns.missing`).
        """
        with self.warehouse.read() as con:
            links = self.links.read(con)
            runs = queries.complete_benchmark_runs(con)
            quants = queries.quantization_ids(con)
        qexp = self.ctx.quantization_experiment()
        linked_b = {r for r, ep in runs if self.links.here(links.get((BENCHMARK, r)), self.ctx.benchmark_experiment(ep))}
        linked_q = {q for q in quants if self.links.here(links.get((QUANTIZATION, q)), qexp)}
        check = [(kind, sid, (link := links[(kind, sid)]).experiment_name, link.mlflow_run_id, link.experiment_id)
                 for kind, ids in ((BENCHMARK, [r for r, _ in runs if r in linked_b]),
                                   (QUANTIZATION, [q for q in quants if q in linked_q]))
                 for sid in ids]
        gone = self.runs.missing(check)
        linked_b -= {sid for kind, sid in gone if kind == BENCHMARK}
        linked_q -= {sid for kind, sid in gone if kind == QUANTIZATION}
        return {
            "benchmarks": [(r, ep) for r, ep in runs if r not in linked_b],
            "quantizations": [q for q in quants if q not in linked_q],
            "linked_benchmarks": [(r, links[(BENCHMARK, r)]) for r, _ in runs if r in linked_b],
            "linked_quantizations": [(q, links[(QUANTIZATION, q)]) for q in quants if q in linked_q],
            "stale": len(gone),
        }

    # ---- DuckDB -> specs

    def benchmark_specs(self, run_ids: Sequence[str]) -> list[RunSpec]:
        if not run_ids:
            return []
        with self.warehouse.read() as con:
            runs, steps, quant = queries.benchmark_rows(con, run_ids)
        missing = [r for r in run_ids if r not in runs]
        if missing:
            raise TrackingError(f"benchmark run(s) {', '.join(missing)} are not in {self.warehouse.path}")
        specs = []
        for rid in run_ids:
            run, run_steps, findings = runs[rid], steps.get(rid, []), self.findings_for(rid)

            def artifacts(folder: Path, run=run, run_steps=run_steps, findings=findings) -> dict[str, Path]:
                with self.warehouse.read() as con:
                    requests = queries.requests_table(con, run["run_id"])
                return benchmark_artifacts(requests, run, run_steps, findings, folder, self.redactor)

            specs.append(benchmark_spec(run, run_steps, quant.get(rid), self.ctx, findings=findings,
                                        artifacts=artifacts, recommend=self.recommend))
        return specs

    def quantization_specs(self, shas: Sequence[str]) -> list[RunSpec]:
        if not shas:
            return []
        with self.warehouse.read() as con:
            rows = queries.quantization_rows(con, shas)
            used = queries.used_by(con, list(shas))
        return [quantization_spec(rows[s], used.get(s, []), self.ctx) for s in shas if s in rows]

    # ---- the backfill

    def sync(self, *, batch: int = 25) -> SyncReport:
        """Log every complete benchmark run and quantization MLflow lacks; refresh late parts of linked ones."""
        t0 = time.monotonic()
        report = SyncReport(self.uri)
        self.runs.check_reachable()
        with self.links.sync_lock(self.progress):
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
            done: list[Logged] = []
            last_note = time.monotonic()
            try:
                for ids, build in ((pending_q, self.quantization_specs),
                                   ([r for r, _ in pending_b], self.benchmark_specs)):
                    for i in range(0, len(ids), batch):
                        specs = build(ids[i:i + batch])
                        existing = self.runs.existing(specs)
                        for spec, files in self._prefetched(specs, existing):
                            try:
                                logged = self.runs.log(spec, existing.get(spec.source_id, []), files)
                            except TrackingError as exc:
                                if getattr(exc, "fatal", True):
                                    raise
                                report.failures.append(str(exc))
                                continue
                            report.logged.append(logged)
                            done.append(logged)
                            if len(done) >= LINK_FLUSH_EVERY:
                                self.links.write(done)
                            if time.monotonic() - last_note >= self.progress_every_s:
                                last_note = time.monotonic()
                                n = len(report.logged) + len(report.failures)
                                self.progress(f"{n} of {total} logged ({n / (last_note - t0):.1f}/s)")
            finally:
                # What completed is recorded even when a later run fails: it will not be looked up again.
                self.links.write(done)
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
            return not any(is_complete(r) for r in existing.get(spec.source_id, []))

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

    def _refresh_late(self, plan: dict[str, Any]) -> int:
        """A findings report written later, a benchmark run that later used a quantization: pushed to linked runs."""
        from mlflow.exceptions import MlflowException

        updates: list[tuple[str, str, str]] = []  # kind, source id, new digest
        try:
            for rid, link in plan["linked_benchmarks"]:
                findings = self.findings_for(rid)
                new = file_digest(findings)
                if findings is None or new == (link.late_digest or ""):
                    continue
                self.runs.push_findings(link.mlflow_run_id, findings)
                updates.append((BENCHMARK, rid, new))
            linked_q = plan["linked_quantizations"]
            if linked_q:
                with self.warehouse.read() as con:
                    used = queries.used_by(con, [q for q, _ in linked_q])
                for sha, link in linked_q:
                    new = list_digest(used.get(sha, []))
                    if new == (link.late_digest or ""):
                        continue
                    self.runs.set_tags(link.mlflow_run_id, used_by_tags(used.get(sha, [])))
                    updates.append((QUANTIZATION, sha, new))
        except MlflowException as exc:
            raise self.runs.fail("refreshing findings reports and quantization usage", exc) from exc
        self.links.set_digests(updates)
        return len(updates)
