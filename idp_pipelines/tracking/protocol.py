"""The idempotent MLflow protocol: one complete MLflow run per source row, never two.

In the order things happen for one source row (a benchmark run or a quantization):

1. The MLflow run is created with its identity tags (``idp.kind`` and ``idp.benchmark_run_id`` or
   ``idp.quantization_id``), so a crash at any later point leaves a run that the next sync finds by tag.
2. Params, tags and metrics go in ``log_batch`` calls. Params are write-once in MLflow: a resumed run
   only gets the params it lacks; one whose logged value differs is left alone and the new value goes
   in the tag ``idp.param_conflict.<key>``. Metrics carry deterministic timestamps (the step's start),
   so re-sending them on resume adds nothing (MLflow drops exact duplicates).
3. Artefacts the run lacks are uploaded (a resumed run lists what it has first).
4. The run is terminated, then ``idp.complete=true`` is set LAST: a run without it is resumed, never
   duplicated.
5. Only then does the caller record the link (``links``). A crash between 4 and 5 costs one search at
   the next sync, which finds the complete run and writes the link.

Secrets are replaced by ``[redacted]`` in every param, tag and artefact before anything leaves the process.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from idp_pipelines.secrets import Redactor
from idp_pipelines.tracking.errors import TrackingError
from idp_pipelines.tracking.specs import (
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    TAG_BENCHMARK_ID,
    TAG_COMPLETE,
    TAG_CONFLICT,
    TAG_KIND,
    TAG_QUANTIZATION_ID,
    RunSpec,
    mlflow_key,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

MAX_PER_BATCH = 1000  # metrics + params + tags in one log_batch
MAX_PARAMS_TAGS_PER_BATCH = 100
# Above this many runs to look up in one experiment, one paged listing beats a search per run.
LIST_INSTEAD_OF_SEARCH = 25


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI's page of a run (None for a store without a UI: sqlite, file)."""
    uri = tracking_uri.rstrip("/")
    if not uri.startswith("http"):
        return None
    return f"{uri}/#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}"


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


def is_complete(run: Run) -> bool:
    return run.data.tags.get(TAG_COMPLETE) == "true"


class MLflowRuns:
    """One tracking server, spoken to by the protocol above."""

    def __init__(self, client: MlflowClient, tracking_uri: str, redactor: Redactor,
                 progress: Callable[[str], None]) -> None:
        self.client = client
        self.uri = tracking_uri.rstrip("/")
        self.redactor = redactor
        self.progress = progress
        self._experiments: dict[str, str] = {}

    def fail(self, what: str, exc: BaseException) -> TrackingError:
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

    # ---- lookups

    def experiment(self, name: str) -> str:
        """The experiment's id, created when missing; a deleted one is an error with the fix."""
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
            raise self.fail(f"getting the experiment {name!r}", exc) from exc
        self._experiments[name] = eid
        return eid

    def existing(self, specs: Sequence[RunSpec]) -> dict[str, list[Run]]:
        """MLflow runs already tagged with each spec's source id (any state), by source id."""
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        found: dict[str, list[Run]] = {}
        by_exp: dict[str, list[RunSpec]] = {}
        for s in specs:
            by_exp.setdefault(s.experiment_name, []).append(s)
        for name, group in by_exp.items():
            eid = self.experiment(name)
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
                raise self.fail(f"searching experiment {name!r}", exc) from exc
        return found

    def missing(self, linked: list[tuple[str, str, str, str | None, str | None]]) -> set[tuple[str, str]]:
        """Of the linked (kind, source id, experiment name, MLflow run id, experiment id), those MLflow no
        longer has: its store was wiped or replaced behind the same URI.

        Per experiment, two cheap calls: the experiment (by name) must still have the id the links
        recorded, and the newest linked run must still exist. Only when one fails are the experiment's
        runs listed, deleted ones included: a run the owner deleted in the MLflow UI is respected,
        never logged again.
        """
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        by_exp: dict[str, list[tuple[str, str, str | None, str | None]]] = {}
        for kind, sid, exp, run_id, eid in linked:
            by_exp.setdefault(exp, []).append((kind, sid, run_id, eid))
        gone: set[tuple[str, str]] = set()
        try:
            for name, items in by_exp.items():
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    gone.update((kind, sid) for kind, sid, _, _ in items)
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
                gone.update((kind, sid) for kind, sid, run_id, _ in items if run_id not in present)
        except MlflowException as exc:
            raise self.fail("checking that MLflow still has the runs DuckDB links", exc) from exc
        return gone

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

    # ---- logging

    def log(self, spec: RunSpec, existing: list[Run],
            artifacts: Callable[[Path], dict[str, Path]] | None = None) -> Logged:
        """Create, resume or just find the spec's run, following the protocol; the caller records the link."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException, RestException

        t0 = time.monotonic()
        eid = self.experiment(spec.experiment_name)
        what = f"logging {spec.kind} {spec.source_id}"
        try:
            run = self._choose(existing)
            if run is not None and is_complete(run):
                # What late parts it got is unknown: an empty digest makes the next sync push them again.
                return Logged(spec.kind, spec.source_id, run.info.run_id, eid, spec.experiment_name,
                              run_url(self.uri, eid, run.info.run_id), "found", time.monotonic() - t0, spec.run_name)
            action = "resumed" if run is not None else "created"
            if run is None:
                run = self.client.create_run(
                    eid, start_time=spec.start_time_ms, run_name=self.redactor.text(spec.run_name),
                    tags={TAG_KIND: spec.kind, spec.id_tag: spec.source_id})
            run_id = run.info.run_id
            have = dict(run.data.params) if action == "resumed" else {}

            params, tags = {}, {}
            for k, v in spec.params.items():
                k, v = mlflow_key(k), self.redactor.value(k, v)[:MAX_PARAM_VALUE]
                if k not in have:
                    params[k] = v
                elif have[k] != v:  # write-once: keep what was logged, say what it would be now
                    tags[f"{TAG_CONFLICT}{k}"] = v[:MAX_TAG_VALUE]
            for k, v in spec.tags.items():
                if k != TAG_COMPLETE:
                    tags[mlflow_key(k)] = self.redactor.value(k, v)[:MAX_TAG_VALUE]
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
            err = self.fail(what, exc)
            # A refused value (a 4xx for this run's data) must not stop the other runs; anything else does.
            err.fatal = exc.error_code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")
            raise err from exc
        except MlflowException as exc:
            raise self.fail(what, exc) from exc
        except OSError as exc:
            raise self.fail(what, exc) from exc
        return Logged(spec.kind, spec.source_id, run_id, eid, spec.experiment_name, run_url(self.uri, eid, run_id),
                      action, time.monotonic() - t0, spec.run_name, spec.late_digest)

    def _choose(self, runs: list[Run]) -> Run | None:
        """The run to keep among those tagged with one source id; extras (only a race makes them) are deleted."""
        if not runs:
            return None
        runs = sorted(runs, key=lambda r: (not is_complete(r), r.info.start_time or 0, r.info.run_id))
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

    # ---- late parts

    def push_findings(self, mlflow_run_id: str, findings: Path) -> None:
        """A findings report written after the run was logged, attached (redacted) to it."""
        with tempfile.TemporaryDirectory(prefix="idp-mlflow-") as tmp:
            local = Path(tmp) / "findings.md"
            local.write_text(self.redactor.text(findings.read_text(errors="replace")))
            self.client.log_artifact(mlflow_run_id, str(local), "findings")

    def set_tags(self, mlflow_run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(mlflow_run_id, k, v)
