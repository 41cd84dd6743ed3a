"""The hub core's warehouse tables, written by column name (warehouse.insert_rows) and read back.

The one writer of model_downloads, model_download_files, model_cache_scans, model_cache_files and
model_cache_rehashes. The asset shells hand over a connection and what the core computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from idp_pipelines.warehouse import insert_rows

if TYPE_CHECKING:
    import duckdb

    from .download import DownloadPlan, DownloadResult
    from .inventory import CacheInventory
    from .rehash import RehashReport


def _now(at: datetime | None) -> datetime:
    return at or datetime.now(timezone.utc)


def record_download(con: duckdb.DuckDBPyConnection, *, run_id: str | None, model: str, result: DownloadResult,
                    at: datetime | None = None) -> None:
    insert_rows(con, "model_downloads", [{
        "downloaded_at": _now(at), "dagster_run_id": run_id, "model": model, "repo_id": result.repo_id,
        "revision": result.revision, "commit_sha": result.sha, "files": len(result.files),
        "bytes": result.total_bytes, "bytes_downloaded": result.bytes_downloaded, "seconds": result.seconds,
        "mb_per_s": result.mb_per_s, "snapshot_path": str(result.snapshot_path),
    }])


def record_plan(con: duckdb.DuckDBPyConnection, *, run_id: str | None, model: str, plan: DownloadPlan,
                at: datetime | None = None) -> None:
    """What a complete snapshot of `model` holds, recorded before any byte is fetched."""
    when = _now(at)
    insert_rows(con, "model_download_files", [
        {"planned_at": when, "dagster_run_id": run_id, "model": model, "repo_id": plan.repo_id,
         "commit_sha": plan.sha, "path": f.path, "size": f.size, "hash": f.hash, "algo": f.algo}
        for f in plan.files
    ])


@dataclass(frozen=True)
class ExpectedSnapshot:
    model: str
    repo_id: str
    commit_sha: str
    files: dict[str, tuple[int, str]]  # path -> (size, hash)


def expected_snapshots(con: duckdb.DuckDBPyConnection) -> dict[str, ExpectedSnapshot]:
    """Per model, the file list of its latest planned download (the last hub_model that got that far)."""
    rows = con.execute(
        """SELECT f.model, f.repo_id, f.commit_sha, f.path, f.size, f.hash
           FROM model_download_files f
           JOIN (SELECT model, max(planned_at) AS at FROM model_download_files GROUP BY model) l
             ON f.model = l.model AND f.planned_at = l.at
           ORDER BY f.model, f.path"""
    ).fetchall()
    out: dict[str, ExpectedSnapshot] = {}
    for model, repo_id, sha, path, size, digest in rows:
        snap = out.setdefault(model, ExpectedSnapshot(model, repo_id, sha, {}))
        snap.files[path] = (size, digest)
    return out


def record_cache_scan(con: duckdb.DuckDBPyConnection, *, run_id: str | None, cache: CacheInventory,
                      at: datetime | None = None) -> None:
    when = _now(at)
    insert_rows(con, "model_cache_scans", [{
        "scanned_at": when, "dagster_run_id": run_id, "cache_dir": str(cache.cache_dir),
        "total_bytes": cache.total_bytes, "snapshot_bytes": cache.snapshot_bytes, "budget_bytes": cache.budget_bytes,
        "repos": len(cache.repos), "revisions": len(cache.revisions), "files": len(cache.files),
        "orphaned_bytes": cache.orphaned_bytes, "incomplete_bytes": cache.incomplete_bytes,
        "unused_bytes": cache.unused_bytes,
    }])
    used = {(r["repo_id"], r["commit"]): r["used"] for r in cache.revisions}
    insert_rows(con, "model_cache_files", [
        {"scanned_at": when, "repo_id": f["repo_id"], "repo_type": f["repo_type"], "commit_sha": f["commit"],
         "refs": f["refs"], "path": f["path"], "size": f["size"], "blob_path": f["blob_path"], "hash": f["hash"],
         "algo": f["algo"], "verified": f["verified"], "used": used.get((f["repo_id"], f["commit"])),
         "last_modified": f["last_modified"], "last_accessed": f["last_accessed"]}
        for f in cache.files
    ])


def record_rehash(con: duckdb.DuckDBPyConnection, *, run_id: str | None, report: RehashReport,
                  at: datetime | None = None) -> None:
    s = report.slice
    insert_rows(con, "model_cache_rehashes", [{
        "rehashed_at": _now(at), "dagster_run_id": run_id, "cache_dir": str(report.cache_dir),
        "period_days": report.period_days, "cursor_from": s.cursor_from, "cursor_to": s.cursor,
        "wrapped": s.wrapped, "files": len(s.keys), "bytes": s.bytes, "total_files": s.total_items,
        "total_bytes": s.total_bytes, "mismatches": len(report.findings),
        "findings": json.dumps(report.findings), "seconds": report.seconds,
    }])


def last_rehash_cursor(con: duckdb.DuckDBPyConnection, cache_dir: str) -> str | None:
    row = con.execute("SELECT cursor_to FROM model_cache_rehashes WHERE cache_dir = ? "
                      "ORDER BY rehashed_at DESC LIMIT 1", [cache_dir]).fetchone()
    return row[0] if row else None
