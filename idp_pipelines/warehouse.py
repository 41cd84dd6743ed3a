"""The DuckDB warehouse: one file, schema migrated on first use, short-lived connections.

DuckDB lets one process open a file read-write, and no process read it meanwhile. Two Dagster runs
(separate processes) would fail with "Could not set lock on file". So every connection takes an
advisory lock on a sibling ``.lock`` file first: exclusive for writers (one at a time, the others wait),
shared for readers (any number, read-only). The lock is held only for the connection's life.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import duckdb


class WarehouseError(RuntimeError):
    """The warehouse file could not be opened or migrated."""


# Append-only: a migration, once released, is never edited; a change is a new entry.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "endpoint probes",
        """
        CREATE TABLE endpoint_probes (
            probed_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            endpoint VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            host VARCHAR NOT NULL,
            base_url VARCHAR NOT NULL,
            required BOOLEAN NOT NULL,
            up BOOLEAN NOT NULL,
            status_code INTEGER,
            error VARCHAR,
            expected_model VARCHAR,
            served_models VARCHAR[],
            model_served BOOLEAN,
            probes INTEGER NOT NULL,
            rtt_min_ms DOUBLE,
            rtt_p50_ms DOUBLE,
            rtt_max_ms DOUBLE
        );
        CREATE INDEX endpoint_probes_endpoint_time ON endpoint_probes (endpoint, probed_at);
        """,
    ),
    (
        2,
        "model downloads and quantizations",
        """
        CREATE TABLE model_downloads (
            downloaded_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            model VARCHAR NOT NULL,
            repo_id VARCHAR NOT NULL,
            revision VARCHAR NOT NULL,
            commit_sha VARCHAR NOT NULL,
            files INTEGER NOT NULL,
            bytes BIGINT NOT NULL,
            bytes_downloaded BIGINT NOT NULL,
            seconds DOUBLE NOT NULL,
            mb_per_s DOUBLE,
            snapshot_path VARCHAR NOT NULL
        );
        CREATE TABLE quantizations (
            quantized_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            model VARCHAR NOT NULL,
            commit_sha VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            source_sha256 VARCHAR NOT NULL,
            source_dtype VARCHAR NOT NULL,
            quant_type VARCHAR NOT NULL,
            output_path VARCHAR NOT NULL,
            output_sha256 VARCHAR NOT NULL,
            output_bytes BIGINT NOT NULL,
            size_ratio DOUBLE NOT NULL,
            seconds DOUBLE NOT NULL,
            fallbacks INTEGER NOT NULL,
            params JSON,
            reused BOOLEAN NOT NULL
        );
        """,
    ),
    (
        3,
        "model cache inventory",
        """
        CREATE TABLE model_cache_scans (
            scanned_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            cache_dir VARCHAR NOT NULL,
            total_bytes BIGINT NOT NULL,
            snapshot_bytes BIGINT NOT NULL,
            budget_bytes BIGINT,
            repos INTEGER NOT NULL,
            revisions INTEGER NOT NULL,
            files INTEGER NOT NULL,
            orphaned_bytes BIGINT NOT NULL,
            incomplete_bytes BIGINT NOT NULL,
            unused_bytes BIGINT NOT NULL
        );
        CREATE TABLE model_cache_files (
            scanned_at TIMESTAMPTZ NOT NULL,
            repo_id VARCHAR NOT NULL,
            repo_type VARCHAR,
            commit_sha VARCHAR NOT NULL,
            refs VARCHAR[],
            path VARCHAR NOT NULL,
            size BIGINT NOT NULL,
            blob_path VARCHAR,
            hash VARCHAR,
            algo VARCHAR,
            verified BOOLEAN,
            used BOOLEAN,
            last_modified TIMESTAMPTZ,
            last_accessed TIMESTAMPTZ
        );
        CREATE INDEX model_cache_files_scan ON model_cache_files (scanned_at);
        """,
    ),
]


class Warehouse:
    def __init__(self, path: str | os.PathLike[str], *, lock_timeout_s: float = 600.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout_s = lock_timeout_s
        self.on_wait = on_wait
        self._migrated = False

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            deadline = time.monotonic() + self.lock_timeout_s
            next_note = time.monotonic() + 5.0
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now > deadline:
                        raise WarehouseError(
                            f"Waited {self.lock_timeout_s:.0f} s for the warehouse lock {self.lock_path}: another "
                            f"process keeps {self.path} open. Fix: let that run finish (see `fuser {self.lock_path}`)."
                        ) from None
                    if self.on_wait and now > next_note:
                        self.on_wait(f"waiting for the warehouse lock {self.lock_path}")
                        next_note = now + 30.0
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        import duckdb

        try:
            return duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as exc:
            raise WarehouseError(f"Cannot open the warehouse {self.path}: {exc}") from exc

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMPTZ)")
        done = {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            con.execute("BEGIN")
            try:
                con.execute(sql)
                con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
                con.execute("COMMIT")
            except Exception as exc:
                con.execute("ROLLBACK")
                raise WarehouseError(f"Migration {version} ({name}) of {self.path} failed: {exc}") from exc
        self._migrated = True

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction; committed on success, rolled back on error."""
        with self._locked(exclusive=True):
            con = self._connect(read_only=False)
            try:
                if not self._migrated:
                    self._migrate(con)
                con.execute("BEGIN")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            finally:
                con.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; migrates (briefly as a writer) if the file is new or behind."""
        if not self._migrated:
            with self.write():
                pass
        with self._locked(exclusive=False):
            con = self._connect(read_only=True)
            try:
                yield con
            finally:
                con.close()

    def schema_version(self) -> int:
        with self.read() as con:
            return con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
