"""The knowledge domain's plumbing between DuckDB, git and the vault (no Dagster)."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from idp_pipelines.lab import Lab

DAGSTER_URL_ENV = "IDP_DAGSTER_URL"


def store_sync(con, repo: str, sync, run_id: Optional[str]) -> int:
    """Insert new commits (those already stored are kept as they are), branch membership, rewrites, heads."""
    # A dict of NumPy arrays: DuckDB scans it directly, without the ~0.5 s import of pandas that both a
    # DataFrame and pyarrow's first conversion cost. Lists travel space-joined (git forbids spaces in
    # shas and branch names) and times as epoch microseconds.
    import numpy as np

    now = datetime.now(timezone.utc)
    inserted = 0
    if sync.commits:
        on: dict[str, list[str]] = {}
        for branch, shas in sync.members.items():
            for sha in shas:
                on.setdefault(sha, []).append(branch)
        seen: set[str] = set()
        commits = [c for c in sync.commits if not (c.sha in seen or seen.add(c.sha))]

        def text(values) -> np.ndarray:
            return np.array(list(values), dtype=object)

        def ints(values) -> np.ndarray:
            return np.fromiter(values, dtype=np.int64, count=len(commits))

        table = {
            "sha": text(c.sha for c in commits),
            "parents": text(" ".join(c.parents) for c in commits),
            "author_name": text(c.author_name for c in commits),
            "author_email": text(c.author_email for c in commits),
            "author_us": ints(round(c.author_time.timestamp() * 1e6) for c in commits),
            "author_tz": text(c.author_tz for c in commits),
            "committer_name": text(c.committer_name for c in commits),
            "committer_email": text(c.committer_email for c in commits),
            "commit_us": ints(round(c.commit_time.timestamp() * 1e6) for c in commits),
            "commit_tz": text(c.commit_tz for c in commits),
            "subject": text(c.subject for c in commits),
            "body": text(c.body for c in commits),
            "files": text(json.dumps([f.to_json() for f in c.files], ensure_ascii=False) for c in commits),
            "files_changed": ints(len(c.files) for c in commits),
            "insertions": ints(c.insertions for c in commits),
            "deletions": ints(c.deletions for c in commits),
            "encoding": text(c.encoding for c in commits),
            "branches": text(" ".join(on.get(c.sha, ())) for c in commits),
        }
        con.register("new_commits", table)
        # DuckDB answers an INSERT with the number of rows it inserted
        inserted = con.execute(
            """
            INSERT INTO git_commits (repo, sha, parents, author_name, author_email, author_time, author_tz,
                committer_name, committer_email, commit_time, commit_tz, subject, body, files, files_changed,
                insertions, deletions, encoding, branches, rewritten, first_seen_at, dagster_run_id)
            SELECT ?, n.sha, CASE WHEN n.parents = '' THEN []::VARCHAR[] ELSE string_split(n.parents, ' ') END,
                n.author_name, n.author_email, make_timestamptz(n.author_us), n.author_tz, n.committer_name,
                n.committer_email, make_timestamptz(n.commit_us), n.commit_tz, n.subject, n.body, n.files::JSON,
                n.files_changed, n.insertions, n.deletions, n.encoding,
                CASE WHEN n.branches = '' THEN []::VARCHAR[] ELSE string_split(n.branches, ' ') END, false, ?, ?
            FROM new_commits n ANTI JOIN (SELECT sha FROM git_commits WHERE repo = ?) g ON g.sha = n.sha
            """,
            [repo, now, run_id, repo],
        ).fetchone()[0]
        con.unregister("new_commits")
    for branch, shas in sync.members.items():
        if not shas:
            continue
        con.register("branch_shas", {"sha": np.array(list(shas), dtype=object)})
        # commits stored before and now on this branch too; one seen again on a watched branch is not
        # rewritten (any more)
        con.execute(
            """
            UPDATE git_commits SET
                branches = CASE WHEN list_contains(branches, ?) THEN branches ELSE list_append(branches, ?) END,
                rewritten = false, rewritten_at = NULL
            WHERE repo = ? AND (rewritten OR NOT list_contains(branches, ?)) AND sha IN (SELECT sha FROM branch_shas)
            """,
            [branch, branch, repo, branch],
        ).fetchall()
        con.unregister("branch_shas")
    if sync.rewritten:
        con.register("gone", {"sha": np.array(list(sync.rewritten), dtype=object)})
        con.execute("UPDATE git_commits SET rewritten = true, rewritten_at = ? "
                    "WHERE repo = ? AND NOT rewritten AND sha IN (SELECT sha FROM gone)", [now, repo]).fetchall()
        con.unregister("gone")
    for branch, head in sync.heads.items():
        con.execute("INSERT OR REPLACE INTO git_branch_heads (repo, branch, head_sha, synced_at, dagster_run_id) "
                    "VALUES (?, ?, ?, ?, ?)", [repo, branch, head, now, run_id]).fetchall()
    return inserted


# Cheap SQL prefilter for commits that may touch a service config; render.is_service_config decides.
_CONFIG_HINT = r"(\.ya?ml|\.env|\.conf|nginx|prometheus|dockerfile|\.service|triton|deploy/|vllm|llama)"


def load_note_data(con, inv: Lab) -> dict:
    """Rows for the notes: commits, benchmark runs with their steps and MLflow links, synced heads."""
    from zoneinfo import ZoneInfo

    from idp_pipelines.notes.render import BenchRun, CommitRow, RepoInfo, is_service_config

    con.execute("SET TimeZone = 'UTC'")
    rows = con.execute(
        "SELECT repo, sha, author_name, epoch(author_time), epoch(commit_time), subject, insertions, deletions, "
        "files_changed, parents, rewritten FROM git_commits").fetchall()
    configs: dict[tuple[str, str], tuple[str, ...]] = {}
    hinted = con.execute(
        "SELECT repo, sha, files FROM git_commits WHERE regexp_matches(lower(files::VARCHAR), ?)",
        [_CONFIG_HINT]).fetchall()
    for repo, sha, files in hinted:
        paths = tuple(f["path"] for f in json.loads(files) if is_service_config(f["path"]))
        if paths:
            configs[(repo, sha)] = paths
    utc = ZoneInfo("UTC")

    def aware(t):
        return t if t is None or t.tzinfo else t.replace(tzinfo=utc)

    def at(epoch):
        return datetime.fromtimestamp(epoch, timezone.utc)

    commits = [CommitRow(repo=r[0], sha=r[1], author_name=r[2] or "", author_time=at(r[3]),
                         commit_time=at(r[4]), subject=r[5] or "", insertions=r[6] or 0, deletions=r[7] or 0,
                         files_changed=r[8] or 0, parents=tuple(r[9] or ()), rewritten=bool(r[10]),
                         config_files=configs.get((r[0], r[1]), ()))
               for r in rows]
    steps: dict[str, list[dict]] = {}
    cols = ["run_id", "step_index", "step", "concurrency", "n_requests", "n_errors", "requests_per_s",
            "output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p95", "goodput_fraction"]
    for r in con.execute(f"SELECT {', '.join(cols)} FROM benchmark_steps ORDER BY run_id, step_index").fetchall():
        steps.setdefault(r[0], []).append(dict(zip(cols, r)))
    runs = [
        BenchRun(run_id=r[0], endpoint=r[1], started_at=aware(r[2]), status=r[3], model=r[4], quantization=r[5],
                 finished_at=aware(r[6]), dagster_run_id=r[7], trigger=r[8], error=r[9], mlflow_url=r[10],
                 mlflow_experiment=r[11], steps=tuple(steps.get(r[0], ())))
        for r in con.execute(
            "SELECT b.run_id, b.endpoint, b.started_at, b.status, b.model, b.quantization, b.finished_at, "
            "b.dagster_run_id, b.trigger, b.error, m.run_url, m.experiment_name FROM benchmark_runs b "
            "LEFT JOIN mlflow_runs m ON m.kind = 'benchmark' AND m.source_id = b.run_id").fetchall()
    ]
    heads: dict[str, dict[str, str]] = {}
    for repo, branch, sha in con.execute("SELECT repo, branch, head_sha FROM git_branch_heads").fetchall():
        heads.setdefault(repo, {})[branch] = sha
    repos = [RepoInfo(r.name, str(r.path), {b: heads.get(r.name, {}).get(b) for b in r.branches})
             for r in inv.git_repos]
    return {"commits": commits, "runs": runs, "repos": repos}


# ------------------------------------------------------------------------------------------ notes


def layout_for(inv: Lab):
    from zoneinfo import ZoneInfo

    from idp_pipelines.notes.render import Layout

    return Layout(daily_folder=inv.vault.daily_folder, date_format=inv.vault.date_format,
                  tz=ZoneInfo(inv.schedules.timezone),
                  dagster_url=os.environ.get(DAGSTER_URL_ENV) or "http://127.0.0.1:3000")


def generate_notes(inv: Lab, data: dict, *, recreate: bool = False, fsync: bool = True) -> dict:
    from idp_pipelines.notes.render import render_all
    from idp_pipelines.notes.vault import write_notes

    notes = render_all(data["commits"], data["runs"], data["repos"], layout_for(inv))
    report = write_notes(inv.vault.path, notes, recreate=recreate, fsync=fsync)
    outside = [p for p in report.written if not _inside(inv.vault.path, p)]
    return {"report": report, "notes": len(notes), "outside": outside}


def _inside(vault: Path, rel: str) -> bool:
    root = Path(os.path.realpath(vault))
    real = Path(os.path.realpath(root / rel))
    return root in real.parents
