"""The DuckDB warehouse: one file, schema migrated on first use, short-lived connections.

DuckDB lets one process open a file read-write, and no process read it meanwhile. Two Dagster runs
(separate processes) would fail with "Could not set lock on file". So every connection takes an
advisory lock on a sibling ``.lock`` file first: exclusive for writers (one at a time, the others wait),
shared for readers (any number, read-only). The lock is held only for the connection's life.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from idp_pipelines.locks import file_lock

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
    (
        4,
        "benchmarks",
        """
        CREATE TABLE benchmark_runs (
            run_id VARCHAR PRIMARY KEY,
            endpoint VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            host VARCHAR NOT NULL,
            base_url VARCHAR NOT NULL,
            model VARCHAR,
            served_model_name VARCHAR,
            model_repo_id VARCHAR,
            model_revision VARCHAR,
            model_commit_sha VARCHAR,
            quantization VARCHAR,
            engine_settings JSON,
            workload JSON,
            load_model VARCHAR NOT NULL,
            concurrencies INTEGER[],
            slos JSON,
            harness_version VARCHAR NOT NULL,
            project_git_sha VARCHAR,
            lab_git_shas JSON,
            dagster_run_id VARCHAR,
            trigger VARCHAR NOT NULL,
            started_at TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ,
            status VARCHAR NOT NULL,
            error VARCHAR,
            gpu_bandwidth_gb_s DOUBLE,
            model_bytes BIGINT,
            decode_ceiling_tok_s DOUBLE
        );
        CREATE INDEX benchmark_runs_endpoint_time ON benchmark_runs (endpoint, started_at);
        CREATE TABLE benchmark_steps (
            run_id VARCHAR NOT NULL,
            step_index INTEGER NOT NULL,
            step VARCHAR NOT NULL,
            mode VARCHAR NOT NULL,
            concurrency INTEGER,
            rate_rps DOUBLE,
            started_at TIMESTAMPTZ NOT NULL,
            duration_s DOUBLE,
            n_requests INTEGER NOT NULL,
            n_ok INTEGER NOT NULL,
            n_errors INTEGER NOT NULL,
            error_rate DOUBLE,
            requests_per_s DOUBLE,
            output_tokens BIGINT,
            output_tokens_per_s DOUBLE,
            output_tok_s_per_request DOUBLE,
            goodput_requests_per_s DOUBLE,
            goodput_fraction DOUBLE,
            server_reported_tokens_fraction DOUBLE,
            length_honoured_fraction DOUBLE,
            prefix_cache_hit_rate DOUBLE,
            ttft_ms_n INTEGER,
            ttft_ms_p50 DOUBLE, ttft_ms_p50_lo DOUBLE, ttft_ms_p50_hi DOUBLE,
            ttft_ms_p95 DOUBLE, ttft_ms_p95_lo DOUBLE, ttft_ms_p95_hi DOUBLE,
            ttft_ms_p99 DOUBLE,
            tpot_ms_mean DOUBLE,
            tpot_ms_p50 DOUBLE, tpot_ms_p50_lo DOUBLE, tpot_ms_p50_hi DOUBLE,
            tpot_ms_p95 DOUBLE,
            itl_ms_p50 DOUBLE, itl_ms_p99 DOUBLE,
            e2e_ms_p50 DOUBLE, e2e_ms_p95 DOUBLE,
            queue_ms_p50 DOUBLE, queue_ms_p95 DOUBLE,
            client_cpu_us_per_chunk DOUBLE,
            gpu_utilization_pct DOUBLE,
            gpu_memory_used_gb DOUBLE,
            roofline_fraction DOUBLE,
            suspect VARCHAR,
            server_metrics JSON,
            summary JSON,
            PRIMARY KEY (run_id, step_index)
        );
        CREATE TABLE benchmark_requests (
            run_id VARCHAR NOT NULL,
            step_index INTEGER NOT NULL,
            request_id INTEGER NOT NULL,
            t_intended DOUBLE,
            t_sent DOUBLE,
            t_first_byte DOUBLE,
            t_first_token DOUBLE,
            t_last_token DOUBLE,
            t_end DOUBLE,
            ttft_ms DOUBLE,
            tpot_ms DOUBLE,
            e2e_ms DOUBLE,
            queue_ms DOUBLE,
            ttft_from_intended_ms DOUBLE,
            e2e_from_intended_ms DOUBLE,
            max_tokens INTEGER,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_prompt_tokens INTEGER,
            content_chunks INTEGER,
            token_source VARCHAR,
            server_reported_tokens BOOLEAN,
            finish_reason VARCHAR,
            http_status SMALLINT,
            error_kind VARCHAR,
            error VARCHAR,
            chunk_times FLOAT[],
            chunk_tokens SMALLINT[]
        );
        CREATE TABLE rpc_latency (
            measured_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            host VARCHAR NOT NULL,
            target_url VARCHAR NOT NULL,
            probes INTEGER NOT NULL,
            failures INTEGER NOT NULL,
            connect_ms_p50 DOUBLE,
            min_ms DOUBLE, p50_ms DOUBLE, p50_lo DOUBLE, p50_hi DOUBLE,
            p95_ms DOUBLE, p95_lo DOUBLE, p95_hi DOUBLE,
            p99_ms DOUBLE, p99_lo DOUBLE, p99_hi DOUBLE,
            max_ms DOUBLE, mean_ms DOUBLE, stdev_ms DOUBLE,
            samples_ms FLOAT[]
        );
        CREATE TABLE benchmark_tuning (
            tuned_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            endpoint VARCHAR NOT NULL,
            run_id VARCHAR,
            setting VARCHAR,
            recommended INTEGER,
            current INTEGER,
            evidence JSON
        );
        """,
    ),
    (
        5,
        "mlflow runs",
        """
        CREATE TABLE mlflow_runs (
            kind VARCHAR NOT NULL,
            source_id VARCHAR NOT NULL,
            mlflow_run_id VARCHAR NOT NULL,
            experiment_id VARCHAR NOT NULL,
            experiment_name VARCHAR NOT NULL,
            run_url VARCHAR,
            tracking_uri VARCHAR NOT NULL,
            logged_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            -- sha256 of the parts that can change after the run is complete (a findings report written
            -- later; the benchmark runs that later used a quantization): pushed again when it differs.
            late_digest VARCHAR,
            PRIMARY KEY (kind, source_id)
        );
        """,
    ),
    (
        6,
        "git commits",
        """
        CREATE TABLE git_commits (
            repo VARCHAR NOT NULL,
            sha VARCHAR NOT NULL,
            parents VARCHAR[],
            author_name VARCHAR,
            author_email VARCHAR,
            author_time TIMESTAMPTZ,
            author_tz VARCHAR,
            committer_name VARCHAR,
            committer_email VARCHAR,
            commit_time TIMESTAMPTZ,
            commit_tz VARCHAR,
            subject VARCHAR,
            body VARCHAR,
            files JSON,
            files_changed INTEGER,
            insertions INTEGER,
            deletions INTEGER,
            encoding VARCHAR,
            branches VARCHAR[],
            rewritten BOOLEAN NOT NULL DEFAULT false,
            rewritten_at TIMESTAMPTZ,
            first_seen_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            PRIMARY KEY (repo, sha)
        );
        CREATE TABLE git_branch_heads (
            repo VARCHAR NOT NULL,
            branch VARCHAR NOT NULL,
            head_sha VARCHAR NOT NULL,
            synced_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            PRIMARY KEY (repo, branch)
        );
        """,
    ),
    (
        20,
        "model file lists and cache re-hashes",
        """
        -- What a complete snapshot of a model holds, recorded by hub_model before it fetches a byte:
        -- model_cache_inventory compares the cache with the latest list of each model.
        CREATE TABLE model_download_files (
            planned_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            model VARCHAR NOT NULL,
            repo_id VARCHAR NOT NULL,
            commit_sha VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            size BIGINT NOT NULL,
            hash VARCHAR NOT NULL,
            algo VARCHAR NOT NULL
        );
        CREATE INDEX model_download_files_model ON model_download_files (model, planned_at);
        -- One row per rotating re-hash of a slice of the model cache; cursor_to is where the next starts.
        CREATE TABLE model_cache_rehashes (
            rehashed_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            cache_dir VARCHAR NOT NULL,
            period_days INTEGER NOT NULL,
            cursor_from VARCHAR,
            cursor_to VARCHAR,
            wrapped BOOLEAN NOT NULL,
            files INTEGER NOT NULL,
            bytes BIGINT NOT NULL,
            total_files INTEGER NOT NULL,
            total_bytes BIGINT NOT NULL,
            mismatches INTEGER NOT NULL,
            findings JSON,
            seconds DOUBLE NOT NULL
        );
        """,
    ),
    (
        30,
        "benchmarks: server timings, connection resends, cache hits, host load, roofline sources",
        """
        ALTER TABLE benchmark_requests ADD COLUMN retries INTEGER;
        ALTER TABLE benchmark_requests ADD COLUMN server_prompt_ms DOUBLE;
        ALTER TABLE benchmark_requests ADD COLUMN server_prompt_n INTEGER;
        ALTER TABLE benchmark_requests ADD COLUMN server_predicted_ms DOUBLE;
        ALTER TABLE benchmark_requests ADD COLUMN server_predicted_n INTEGER;
        ALTER TABLE benchmark_steps ADD COLUMN retries INTEGER;
        ALTER TABLE benchmark_steps ADD COLUMN served_from_cache INTEGER;
        ALTER TABLE benchmark_steps ADD COLUMN cache_fixed_prefix_tokens INTEGER;
        ALTER TABLE benchmark_steps ADD COLUMN server_decode_tok_s DOUBLE;
        ALTER TABLE benchmark_steps ADD COLUMN ttft_server_prompt_ms DOUBLE;
        ALTER TABLE benchmark_steps ADD COLUMN ttft_server_queue_ms DOUBLE;
        ALTER TABLE benchmark_steps ADD COLUMN ttft_network_ms DOUBLE;
        ALTER TABLE benchmark_steps ADD COLUMN host_other_cpu_cores DOUBLE;
        ALTER TABLE benchmark_steps ADD COLUMN host_other_top JSON;
        ALTER TABLE benchmark_steps ADD COLUMN errors JSON;
        ALTER TABLE benchmark_runs ADD COLUMN server_props JSON;
        ALTER TABLE benchmark_runs ADD COLUMN network_rtt_ms DOUBLE;
        ALTER TABLE benchmark_runs ADD COLUMN n_gpu_layers INTEGER;
        ALTER TABLE benchmark_runs ADD COLUMN ceiling_source VARCHAR;
        ALTER TABLE benchmark_runs ADD COLUMN errors JSON;
        """,
    ),
    (
        70,
        "backup snapshots, verifications and restores",
        """
        -- One row per cache_backup run: the snapshot it made, or the newest one when nothing changed.
        CREATE TABLE backup_snapshots (
            made_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            target VARCHAR NOT NULL,
            snapshot VARCHAR NOT NULL,
            previous VARCHAR,
            resumed VARCHAR,
            files BIGINT NOT NULL,
            files_sent BIGINT NOT NULL,
            bytes_sent BIGINT NOT NULL,
            seconds DOUBLE NOT NULL,
            mb_per_s DOUBLE,
            own_bytes BIGINT NOT NULL,
            apparent_bytes BIGINT NOT NULL,
            free_before BIGINT,
            state VARCHAR[],
            deleted VARCHAR[],
            unchanged BOOLEAN NOT NULL  -- nothing changed: `snapshot` is the newest one, no new folder made
        );
        -- One row per verification of a snapshot; cursor_to is where the next rotating slice starts.
        CREATE TABLE backup_verifications (
            verified_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            target VARCHAR NOT NULL,
            snapshot VARCHAR NOT NULL,
            full_pass BOOLEAN NOT NULL,
            period INTEGER NOT NULL,
            cursor_from VARCHAR,
            cursor_to VARCHAR,
            wrapped BOOLEAN NOT NULL,
            files BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            total_files BIGINT NOT NULL,
            total_bytes BIGINT NOT NULL,
            problems INTEGER NOT NULL,
            findings JSON,
            seconds DOUBLE NOT NULL
        );
        -- Restores (the restore job) and restore drills (the weekly check).
        CREATE TABLE backup_restores (
            restored_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            target VARCHAR NOT NULL,
            snapshot VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            dest VARCHAR,
            files BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            seconds DOUBLE NOT NULL,
            overwritten VARCHAR[],
            drill BOOLEAN NOT NULL,
            problems JSON
        );
        """,
    ),
    (
        80,
        "deployed state",
        """
        -- What a deploy left running on a host (deployed_state[host]): one row per container and per file.
        CREATE TABLE deployed_state (
            deployed_at TIMESTAMPTZ NOT NULL,
            dagster_run_id VARCHAR,
            host VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,          -- container | file
            name VARCHAR NOT NULL,          -- container name, or the file's path under config_dir
            service VARCHAR,
            container_id VARCHAR,
            image VARCHAR,
            spec_hash VARCHAR,              -- io.idp.spec-hash (containers); sha256 (files)
            status VARCHAR,
            health VARCHAR,
            ports VARCHAR[],
            mode INTEGER,                   -- files: permission bits on the host
            settings JSON                   -- containers serving an endpoint: the engine settings deployed
        );
        """,
    ),
]


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> int:
    """Insert dict rows by column name (`INSERT ... BY NAME`): a new column touches the schema and the
    one core that writes the table, never a positional `VALUES (?, ?, ...)` list. Returns the count."""
    if not rows:
        return 0
    cols = list(rows[0])
    for row in rows[1:]:
        if list(row) != cols:
            raise ValueError(f"insert_rows({table}): rows have different columns: {cols} vs {list(row)}")
    select = ", ".join(f"? AS {c}" for c in cols)
    con.executemany(f"INSERT INTO {table} BY NAME SELECT {select}", [list(r.values()) for r in rows])
    return len(rows)


class Warehouse:
    def __init__(self, path: str | os.PathLike[str], *, lock_timeout_s: float = 600.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout_s = lock_timeout_s
        self.on_wait = on_wait
        self._migrated = False

    def _locked(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.lock_path, exclusive=exclusive, timeout_s=self.lock_timeout_s,
                         what="the warehouse lock", on_wait=self.on_wait, error=WarehouseError,
                         fix=f"let the run that keeps {self.path} open finish (see `fuser {self.lock_path}`).")

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
