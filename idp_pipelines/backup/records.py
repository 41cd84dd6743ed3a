"""The backup's warehouse tables (this core is their one writer) and what it reads from others' tables."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from idp_pipelines.warehouse import insert_rows

if TYPE_CHECKING:
    import duckdb

    from idp_pipelines.backup.restore import DrillReport, RestoreResult
    from idp_pipelines.backup.snapshot import SnapshotResult
    from idp_pipelines.backup.verify import VerifyReport


def _now() -> datetime:
    return datetime.now(timezone.utc)


def record_snapshot(con: duckdb.DuckDBPyConnection, *, run_id: str | None, target: str,
                    result: SnapshotResult) -> None:
    insert_rows(con, "backup_snapshots", [{
        "made_at": _now(), "dagster_run_id": run_id, "target": target, "snapshot": result.name,
        "previous": result.previous, "resumed": result.resumed, "files": result.files,
        "files_sent": result.files_sent, "bytes_sent": result.bytes_sent, "seconds": result.seconds,
        "mb_per_s": result.mb_per_s, "own_bytes": result.own_bytes, "apparent_bytes": result.apparent_bytes,
        "free_before": result.free_before, "state": result.state, "deleted": result.deleted,
    }])


def record_verification(con: duckdb.DuckDBPyConnection, *, run_id: str | None, target: str,
                        report: VerifyReport, period: int) -> None:
    insert_rows(con, "backup_verifications", [{
        "verified_at": _now(), "dagster_run_id": run_id, "target": target, "snapshot": report.snapshot,
        "full_pass": report.full, "period": period, "cursor_from": report.slice.cursor_from,
        "cursor_to": report.slice.cursor, "wrapped": report.slice.wrapped, "files": report.hashed,
        "bytes": report.hashed_bytes, "total_files": report.slice.total_items,
        "total_bytes": report.slice.total_bytes, "problems": len(report.findings),
        "findings": json.dumps(report.findings), "seconds": report.seconds,
    }])


def record_restore(con: duckdb.DuckDBPyConnection, *, run_id: str | None, target: str,
                   result: RestoreResult | None = None, drill: DrillReport | None = None) -> None:
    if drill is not None:
        row = {"snapshot": drill.snapshot, "source": f"drill {drill.repo_id}", "dest": None, "files": drill.files,
               "bytes": drill.bytes, "seconds": drill.seconds, "overwritten": [], "drill": True,
               "problems": json.dumps(drill.problems)}
    else:
        assert result is not None
        row = {"snapshot": result.snapshot, "source": result.source, "dest": str(result.dest),
               "files": result.files, "bytes": result.bytes, "seconds": result.seconds,
               "overwritten": result.overwritten, "drill": False, "problems": "[]"}
    insert_rows(con, "backup_restores", [{"restored_at": _now(), "dagster_run_id": run_id, "target": target, **row}])


def last_verify_cursor(con: duckdb.DuckDBPyConnection, target: str) -> str | None:
    """Where the previous slice stopped (paths are relative to a snapshot, so the walk goes on across them)."""
    row = con.execute("SELECT cursor_to FROM backup_verifications WHERE target = ? AND NOT full_pass "
                      "ORDER BY verified_at DESC LIMIT 1", [target]).fetchone()
    return row[0] if row else None


def gguf_hashes(con: duckdb.DuckDBPyConnection, cache_dir: Path) -> dict[str, str]:
    """{path relative to the cache: sha256} of every GGUF output the quantizer recorded (newest wins)."""
    rows = con.execute("SELECT output_path, output_sha256 FROM quantizations ORDER BY quantized_at").fetchall()
    out = {}
    for path, sha in rows:
        rel = os.path.relpath(path, cache_dir)
        if not rel.startswith(".."):
            out[Path(rel).as_posix()] = sha
    return out
