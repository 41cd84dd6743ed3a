"""Knowledge: git commits of the watched repos into DuckDB, and Obsidian notes that connect them with benchmarks."""

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource

OWNER_EDITS = "owner_edits_preserved"
INSIDE_VAULT = "paths_inside_vault"
DAGSTER_URL_ENV = "IDP_DAGSTER_URL"


class GitCommitsConfig(dg.Config):
    max_new_commits: Optional[int] = None  # bounds a first sync (or a re-read after a lost head): newest N


class ObsidianNotesConfig(dg.Config):
    recreate: bool = False  # also recreate generated notes the owner deleted


def build(lab: Lab) -> dg.Definitions:
    repo_partitions = dg.StaticPartitionsDefinition([r.name for r in lab.git_repos])

    @dg.asset(
        partitions_def=repo_partitions,
        group_name="knowledge",
        kinds={"git", "duckdb"},
        pool="duckdb",
        description="Commits of a watched repo's branches (sha, parents, people, times with zone, message, files "
                    "with renames), read incrementally with the git CLI.",
    )
    def git_commits(context: dg.AssetExecutionContext, config: GitCommitsConfig, lab: LabResource,
                    warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.notes.git import sync_repo

        repo = next(r for r in lab.load().git_repos if r.name == context.partition_key)
        wh = warehouse.get(context.log)
        with wh.read() as con:
            old = dict(con.execute("SELECT branch, head_sha FROM git_branch_heads WHERE repo = ?",
                                   [repo.name]).fetchall())
        t0 = time.perf_counter()
        sync = sync_repo(repo.path, repo.branches, old, max_new=config.max_new_commits)
        read_s = time.perf_counter() - t0
        for msg in sync.messages:
            context.log.warning(f"{repo.name}: {msg}")
        with wh.write() as con:
            inserted = store_sync(con, repo.name, sync, context.run.run_id)
        moves = [{"branch": b, "move": m.kind, "from": (m.old or "")[:12], "to": (m.new or "")[:12],
                  "new_on_branch": len(sync.members.get(b, []))} for b, m in sync.moves.items()]
        context.log.info(f"{repo.name}: {inserted} new commit(s), {len(sync.rewritten)} rewritten away, "
                         f"read in {read_s:.2f} s")
        return dg.MaterializeResult(
            metadata={
                "repo_path": dg.MetadataValue.path(str(repo.path)),
                "new_commits": inserted,
                "rewritten_commits": len(sync.rewritten),
                "read_seconds": dg.MetadataValue.float(round(read_s, 3)),
                "branches": dg.MetadataValue.md(md_table(moves, ["branch", "move", "from", "to", "new_on_branch"])),
                "notes": dg.MetadataValue.md("\n".join(f"- {m}" for m in sync.messages) or "none"),
            },
            data_version=dg.DataVersion(",".join(f"{b}={h}" for b, h in sorted(sync.heads.items())) or "empty"),
        )

    @dg.asset(
        group_name="knowledge",
        kinds={"obsidian", "duckdb"},
        # benchmark notes read benchmark_runs and link the MLflow runs: both are part of its lineage
        deps=[git_commits, dg.AssetKey("benchmark_runs"), dg.AssetKey("mlflow_experiments")],
        automation_condition=FOLLOW_UPDATES,
        description="The Obsidian vault's dev log (a note per day), a hub note per repo and a note per benchmark "
                    "run, written only inside the generator's marked blocks.",
        check_specs=[
            dg.AssetCheckSpec(OWNER_EDITS, asset="obsidian_notes",
                              description="Blocks the owner edited by hand were left as they are (listed)."),
            dg.AssetCheckSpec(INSIDE_VAULT, asset="obsidian_notes",
                              description="Every note path stays inside the vault."),
        ],
    )
    def obsidian_notes(context: dg.AssetExecutionContext, config: ObsidianNotesConfig, lab: LabResource,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
        inv = lab.load()
        with warehouse.get(context.log).read() as con:
            data = load_note_data(con, inv)
        result = generate_notes(inv, data, recreate=config.recreate)
        report = result["report"]
        context.log.info(f"vault {inv.vault.path}: {len(report.created)} created, {len(report.updated)} updated, "
                         f"{len(report.unchanged)} unchanged, {len(report.deleted_by_owner)} deleted by the owner "
                         f"(not recreated)")
        return note_result(inv, result)

    @dg.sensor(
        name="git_commit_sensor",
        asset_selection=[git_commits],
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A watched branch that moved (new commits, force-push) requests a git_commits run for its repo.",
    )
    def git_commit_sensor(context: dg.SensorEvaluationContext, lab: LabResource):
        return evaluate_git_heads(context, lab.load())

    return dg.Definitions(assets=[git_commits, obsidian_notes], sensors=[git_commit_sensor])


# --------------------------------------------------------------------------------------- sensor


def evaluate_git_heads(context: dg.SensorEvaluationContext, inv: Lab) -> dg.SensorResult:
    """One `git for-each-ref` per repo; more git only for a branch that moved."""
    from idp_pipelines.notes.git import GitError, classify_move, resolve_refs

    cursor: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}
    requests, skipped = [], []
    for repo in inv.git_repos:
        seen = cursor.get(repo.name, {})
        try:
            heads = resolve_refs(repo.path, repo.branches)
            moved = {b: h for b, h in heads.items() if h is not None and seen.get(b) != h}
            moves = {b: classify_move(repo.path, seen.get(b), h) for b, h in moved.items()}
        except GitError as exc:
            context.log.warning(f"git_commit_sensor: skipping {repo.name}: {exc}")
            skipped.append(repo.name)
            continue
        for branch in (b for b, h in heads.items() if h is None):
            context.log.warning(f"git_commit_sensor: {repo.name}: branch {branch!r} does not exist in {repo.path}")
        new_seen = dict(seen)
        for branch, move in moves.items():
            tags = {"idp/git_repo": repo.name, "idp/git_branch": branch, "idp/git_head": move.new,
                    "idp/git_move": move.kind}
            if move.merge_base:
                tags["idp/git_merge_base"] = move.merge_base
            if move.kind in ("rewrite", "cursor-missing"):
                context.log.warning(f"git_commit_sensor: {repo.name}:{branch} {move.kind} "
                                    f"({(move.old or '')[:12]} -> {move.new[:12]})")
            requests.append(dg.RunRequest(partition_key=repo.name, run_key=f"{repo.name}:{branch}:{move.new}",
                                          tags=tags))
            new_seen[branch] = move.new
        cursor[repo.name] = new_seen
    new_cursor = json.dumps(cursor, sort_keys=True)
    if not requests:
        reason = "no new commits" + (f"; skipped (unavailable): {', '.join(skipped)}" if skipped else "")
        return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=new_cursor)
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


# ------------------------------------------------------------------------------------ warehouse


def store_sync(con, repo: str, sync, run_id: Optional[str]) -> int:
    """Insert new commits (those already stored are kept as they are), branch membership, rewrites, heads."""
    import pandas as pd

    now = datetime.now(timezone.utc)
    inserted = 0
    if sync.commits:
        on: dict[str, list[str]] = {}
        for branch, shas in sync.members.items():
            for sha in shas:
                on.setdefault(sha, []).append(branch)
        df = pd.DataFrame({
            "sha": [c.sha for c in sync.commits],
            "parents": [" ".join(c.parents) for c in sync.commits],
            "author_name": [c.author_name for c in sync.commits],
            "author_email": [c.author_email for c in sync.commits],
            "author_time": [int(c.author_time.timestamp()) for c in sync.commits],
            "author_tz": [c.author_tz for c in sync.commits],
            "committer_name": [c.committer_name for c in sync.commits],
            "committer_email": [c.committer_email for c in sync.commits],
            "commit_time": [int(c.commit_time.timestamp()) for c in sync.commits],
            "commit_tz": [c.commit_tz for c in sync.commits],
            "subject": [c.subject for c in sync.commits],
            "body": [c.body for c in sync.commits],
            "files": [json.dumps([f.to_json() for f in c.files], ensure_ascii=False) for c in sync.commits],
            "files_changed": [len(c.files) for c in sync.commits],
            "insertions": [c.insertions for c in sync.commits],
            "deletions": [c.deletions for c in sync.commits],
            "encoding": [c.encoding for c in sync.commits],
            "branches": [" ".join(on.get(c.sha, ())) for c in sync.commits],  # git forbids spaces in branch names
        }).drop_duplicates("sha")
        con.register("new_commits", df)
        # DuckDB answers an INSERT with the number of rows it inserted
        inserted = con.execute(
            """
            INSERT INTO git_commits (repo, sha, parents, author_name, author_email, author_time, author_tz,
                committer_name, committer_email, commit_time, commit_tz, subject, body, files, files_changed,
                insertions, deletions, encoding, branches, rewritten, first_seen_at, dagster_run_id)
            SELECT ?, n.sha, CASE WHEN n.parents = '' THEN []::VARCHAR[] ELSE string_split(n.parents, ' ') END,
                n.author_name, n.author_email, to_timestamp(n.author_time), n.author_tz, n.committer_name,
                n.committer_email, to_timestamp(n.commit_time), n.commit_tz, n.subject, n.body, n.files::JSON, n.files_changed, n.insertions,
                n.deletions, n.encoding,
                CASE WHEN n.branches = '' THEN []::VARCHAR[] ELSE string_split(n.branches, ' ') END, false, ?, ?
            FROM new_commits n ANTI JOIN (SELECT sha FROM git_commits WHERE repo = ?) g ON g.sha = n.sha
            """,
            [repo, now, run_id, repo],
        ).fetchone()[0]
        con.unregister("new_commits")
    for branch, shas in sync.members.items():
        if not shas:
            continue
        con.register("branch_shas", pd.DataFrame({"sha": shas}))
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
        con.register("gone", pd.DataFrame({"sha": sync.rewritten}))
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


def note_result(inv: Lab, result: dict) -> dg.MaterializeResult:
    report = result["report"]
    edited = report.edited_blocks
    refused = report.refused + [f"{p}: written outside the vault" for p in result["outside"]]
    written = [{"note": p, "change": "created"} for p in report.created[:15]] + \
              [{"note": p, "change": "updated"} for p in report.updated[:15]]
    return dg.MaterializeResult(
        metadata={
            "vault": dg.MetadataValue.path(str(inv.vault.path)),
            "notes": result["notes"],
            "created": len(report.created),
            "updated": len(report.updated),
            "unchanged": len(report.unchanged),
            "deleted_by_owner": len(report.deleted_by_owner),
            "written": dg.MetadataValue.md(md_table(written, ["note", "change"]) if written else "nothing changed"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=OWNER_EDITS, passed=not edited, severity=dg.AssetCheckSeverity.WARN,
                description=("hand-edited blocks left as they are (delete such a block, markers included, to "
                             "let the generator write it again): " + "; ".join(f"{n} [{', '.join(b)}]" for n, b in
                                                                         sorted(edited.items())))
                if edited else "no generated block was edited by hand",
                metadata={"notes": dg.MetadataValue.json(sorted(edited))},
            ),
            dg.AssetCheckResult(
                check_name=INSIDE_VAULT, passed=not refused, severity=dg.AssetCheckSeverity.ERROR,
                description="; ".join(refused[:20]) if refused else f"all {len(report.written)} written path(s) "
                                                                    f"are inside {inv.vault.path}",
            ),
        ],
    )
