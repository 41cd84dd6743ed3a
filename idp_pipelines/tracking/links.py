"""Link bookkeeping: DuckDB's `mlflow_runs` says which source row is logged where, so a sync asks MLflow
only about what is new, and one sync at a time runs per warehouse.

"MLflow lacks it" means: no `mlflow_runs` row for this tracking URI and experiment (or a row whose run
MLflow no longer has; the protocol's `missing` finds those).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from idp_pipelines.locks import file_lock
from idp_pipelines.tracking.errors import TrackingError
from idp_pipelines.warehouse import insert_rows

if TYPE_CHECKING:
    from idp_pipelines.tracking.protocol import Logged
    from idp_pipelines.warehouse import Warehouse

# Two Dagster runs syncing at once is rare and short; a sync stuck for this long is a hung process.
SYNC_LOCK_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Link:
    tracking_uri: str
    experiment_name: str
    mlflow_run_id: str
    late_digest: str | None
    experiment_id: str | None


class Links:
    """The `mlflow_runs` rows of one warehouse: read, written by column name, one sync at a time."""

    def __init__(self, warehouse: Warehouse, tracking_uri: str, dagster_run_id: str | None) -> None:
        self.warehouse = warehouse
        self.uri = tracking_uri.rstrip("/")
        self.dagster_run_id = dagster_run_id

    @staticmethod
    def read(con) -> dict[tuple[str, str], Link]:
        """Every link, by (kind, source id)."""
        rows = con.execute("SELECT kind, source_id, tracking_uri, experiment_name, mlflow_run_id, late_digest, "
                           "experiment_id FROM mlflow_runs").fetchall()
        return {(k, s): Link(uri, exp, run, dig, eid) for k, s, uri, exp, run, dig, eid in rows}

    def here(self, link: Link | None, experiment: str) -> bool:
        """Whether a link points at this tracking server and this experiment."""
        return link is not None and link.tracking_uri == self.uri and link.experiment_name == experiment

    def write(self, logged: list[Logged]) -> None:
        """Record completed runs (then they are never looked up again), and empty the list."""
        if not logged:
            return
        now = datetime.now(timezone.utc)
        rows = [{"kind": x.kind, "source_id": x.source_id, "mlflow_run_id": x.mlflow_run_id,
                 "experiment_id": x.experiment_id, "experiment_name": x.experiment_name, "run_url": x.run_url,
                 "tracking_uri": self.uri, "logged_at": now, "dagster_run_id": self.dagster_run_id,
                 "late_digest": x.late_digest} for x in logged]
        with self.warehouse.write() as con:
            # a link logged again (its run gone from MLflow) replaces the old one
            con.executemany("DELETE FROM mlflow_runs WHERE kind = ? AND source_id = ?",
                            [[r["kind"], r["source_id"]] for r in rows])
            insert_rows(con, "mlflow_runs", rows)
        logged.clear()

    def set_digests(self, updates: Sequence[tuple[str, str, str]]) -> None:
        """(kind, source id, digest of the late parts now pushed) for linked runs."""
        if updates:
            with self.warehouse.write() as con:
                con.executemany("UPDATE mlflow_runs SET late_digest = ? WHERE kind = ? AND source_id = ?",
                                [[d, k, s] for k, s, d in updates])

    @contextlib.contextmanager
    def sync_lock(self, on_wait: Callable[[str], None]) -> Iterator[None]:
        """Two syncs at once (two Dagster runs) would both miss a run and both create it: one at a time."""
        lock = self.warehouse.path.with_name(self.warehouse.path.name + ".mlflow-sync.lock")
        with file_lock(lock, timeout_s=SYNC_LOCK_TIMEOUT_S, what="the MLflow sync lock", on_wait=on_wait,
                       holder=f"an MLflow sync (Dagster run {self.dagster_run_id})", error=TrackingError,
                       fix="let the other mlflow_experiments run finish, or stop it if it hangs"):
            yield
