"""Knowledge: git commits of the watched repos into DuckDB, and Obsidian notes that connect them with benchmarks."""

import json
import time
from typing import Optional

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource

OWNER_EDITS = "owner_edits_preserved"
INSIDE_VAULT = "paths_inside_vault"


class GitCommitsConfig(dg.Config):
    max_new_commits: Optional[int] = None  # bounds a first sync (or a re-read after a lost head): newest N


class ObsidianNotesConfig(dg.Config):
    recreate: bool = False  # also recreate generated notes the owner deleted


def build(inventory: Lab) -> dg.Definitions:
    repo_partitions = dg.StaticPartitionsDefinition([r.name for r in inventory.git_repos])

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
        from idp_pipelines.notes.git import BATCH_COMMITS
        from idp_pipelines.notes.pipeline import sync_to_warehouse

        repo = lab.load().git_repo(context.partition_key)  # a partition left after an edit: LabError naming it
        wh = warehouse.get(context.log)

        def progress(read: int, stored: int) -> None:
            if read >= BATCH_COMMITS:  # a long first sync; a nightly one is a single small batch
                context.log.info(f"{repo.name}: {read:,} commits read, {stored:,} stored so far")

        t0 = time.perf_counter()
        sync, inserted = sync_to_warehouse(wh, repo.name, repo.path, repo.branches, run_id=context.run.run_id,
                                           max_new=config.max_new_commits, progress=progress)
        sync_s = time.perf_counter() - t0
        for msg in sync.messages:
            context.log.warning(f"{repo.name}: {msg}")
        moves = [{"branch": b, "move": m.kind, "from": (m.old or "")[:12], "to": (m.new or "")[:12],
                  "new_on_branch": len(sync.members.get(b, []))} for b, m in sync.moves.items()]
        context.log.info(f"{repo.name}: {inserted} new commit(s), {len(sync.rewritten)} rewritten away, "
                         f"read and stored in {sync_s:.2f} s")
        return dg.MaterializeResult(
            metadata={
                "repo_path": dg.MetadataValue.path(str(repo.path)),
                "new_commits": inserted,
                "rewritten_commits": len(sync.rewritten),
                "sync_seconds": dg.MetadataValue.float(round(sync_s, 3)),
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
        from idp_pipelines.notes.pipeline import generate_notes, load_note_data

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
    from idp_pipelines.gitcli import GitError, resolve_refs
    from idp_pipelines.notes.git import classify_move

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
