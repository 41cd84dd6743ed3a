"""Backup: daily hard-link snapshots of the model cache and the lab's state, verified and restorable."""

import json
import random
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import get_args

import dagster as dg

from idp_pipelines import settings
from idp_pipelines.assets.common import Throttle, check_result
from idp_pipelines.backup.checks import BACKUP_COVERAGE, BACKUP_INTACT, RESTORE_DRILL
from idp_pipelines.lab import BackupState, Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource

__all__ = ["BACKUP_COVERAGE", "BACKUP_INTACT", "RESTORE_DRILL", "build", "state_sources"]

BACKUP_JOB = "cache_backup_job"
NEW_ARTEFACTS = (dg.AssetKey("hub_model"), dg.AssetKey("gguf_model"))
_ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
           dg.DagsterRunStatus.STARTED]


def state_sources(inv: Lab, warehouse_path: str) -> dict[str, Path]:
    """Where each state item of `backup.include` lives (generated service keys: each host's `.env` under
    settings.deploy_dir(), with the rendered files beside them)."""
    home = settings.idp_home()
    every = {"warehouse": Path(warehouse_path), "mlflow": home / "mlflow", "dagster": settings.dagster_home(),
             "keys": settings.deploy_dir(), "vault": inv.vault.path}
    return {name: every[name] for name in inv.backup.include}


def _progress(log):
    throttle = Throttle(log.info, warn=log.warning, error=log.error)

    def report(done: int, total: int, message: str) -> None:
        if not total:  # a copy whose size no dry run gave (rsync's catch-up pass): what is done so far
            throttle(f"{done / 1e6:,.1f} MB: {message}")
            return
        pct = f" ({100 * min(done, total) / total:.0f} %)"
        throttle(f"{done / 1e6:,.1f} of {total / 1e6:,.1f} MB{pct}: {message}", final=done >= total)

    return report


def _models_by_repo(inv: Lab) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in inv.models:
        out.setdefault(m.repo_id, []).append(m.name)
    return out


class VerifyConfig(dg.Config):
    full: bool = False  # re-hash every file of the newest snapshot, not today's slice


class RestoreConfig(dg.Config):
    what: str = "model"  # "model", "cache", or a state item: warehouse, mlflow, dagster, keys, vault
    model: str = ""  # with what: model, the inventory's model name
    snapshot: str = "newest"
    dest: str = ""  # default: the model cache for a model or the cache, IDP_HOME/restored/<snapshot>/<item> for state
    overwrite: bool = False  # replace files at dest that differ from the backup


def build(inventory: Lab) -> dg.Definitions:
    b = inventory.backup
    tags = {"idp/host": b.host} if b.host else {}

    @dg.asset(
        group_name="backup",
        kinds={"rsync"},
        deps=list(NEW_ARTEFACTS),
        pool="backup",
        op_tags=tags,
        description="A dated rsync hard-link snapshot of the model cache and the lab's state on backup.target "
                    "(unchanged files linked to the previous snapshot), then retention.",
        check_specs=[dg.AssetCheckSpec(BACKUP_COVERAGE, asset="cache_backup",
                                       description="Every blob and GGUF file of the cache is in the newest "
                                                   "snapshot with the same size.")],
    )
    def cache_backup(context: dg.AssetExecutionContext, lab: LabResource,
                     warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.backup import Target
        from idp_pipelines.backup.checks import judge_coverage
        from idp_pipelines.backup.records import record_snapshot
        from idp_pipelines.backup.snapshot import make_snapshot
        from idp_pipelines.backup.state import copy_locked_file, stage_state
        from idp_pipelines.backup.verify import cache_content, coverage, snapshot_files

        inv = lab.load()
        target = Target.from_inventory(inv.backup)
        wh = warehouse.get(context.log)

        def copy_warehouse(dest: Path) -> None:
            with wh.read():  # a shared hold of the writer lock: no writer is inside while the file is copied
                copy_locked_file(wh.path, dest)

        staging = settings.idp_home() / "backup-staging"
        state = stage_state(state_sources(inv, warehouse.path), staging, warehouse_copy=copy_warehouse,
                            log=context.log.info)
        result = make_snapshot(inv.model_cache.path, target, lock_path=settings.idp_home() / "locks" / "backup.lock",
                               margin_bytes=int(inv.backup.free_space_margin_gb * 1e9), state_dir=staging,
                               keep_daily=inv.backup.keep_daily, keep_weekly=inv.backup.keep_weekly,
                               progress=_progress(context.log), log=context.log.info)
        with wh.write() as con:
            record_snapshot(con, run_id=context.run.run_id, target=target.describe(), result=result)
        in_cache = cache_content(inv.model_cache.path)
        gaps = coverage(in_cache, snapshot_files(target, result.name))
        context.log.info(f"snapshot {result.name}: {result.files_sent} file(s), {result.bytes_sent / 1e6:,.1f} MB sent "
                         f"in {result.seconds:.1f} s ({result.mb_per_s:,.1f} MB/s); its own size "
                         f"{result.own_bytes / 1e6:,.1f} MB of {result.apparent_bytes / 1e6:,.1f} MB")
        return dg.MaterializeResult(
            metadata={
                "target": target.describe(),
                "snapshot": result.name,
                "unchanged": result.unchanged,
                "previous": result.previous or "",
                "resumed": result.resumed or "",
                "files": dg.MetadataValue.int(result.files),
                "files_sent": dg.MetadataValue.int(result.files_sent),
                "files_copied_by_cp": dg.MetadataValue.int(result.cp_copied),
                "bytes_sent": dg.MetadataValue.int(result.bytes_sent),
                "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
                "mb_per_s": dg.MetadataValue.float(round(result.mb_per_s, 1)),
                "own_bytes": dg.MetadataValue.int(result.own_bytes),
                "apparent_bytes": dg.MetadataValue.int(result.apparent_bytes),
                "free_before": dg.MetadataValue.int(result.free_before),
                "state": dg.MetadataValue.json(state),
                "kept": dg.MetadataValue.json(result.kept),
                "deleted": dg.MetadataValue.json(result.deleted),
            },
            data_version=dg.DataVersion(result.name),
            check_results=[check_result(judge_coverage(gaps, result.name, str(inv.model_cache.path), len(in_cache)))],
        )

    @dg.asset(
        group_name="backup",
        kinds={"rsync"},
        deps=[cache_backup],
        pool="backup",
        op_tags=tags,
        automation_condition=dg.AutomationCondition.eager(),
        description="The newest snapshot re-hashed on the target (a rotating slice, all of it within "
                    "backup.verify_days runs; config full: true for everything) against blob names, the warehouse's "
                    "GGUF hashes and the state manifest.",
        check_specs=[dg.AssetCheckSpec(BACKUP_INTACT, asset="backup_verification",
                                       description="No file of the snapshot is missing, changed size or hashes wrong.")],
    )
    def backup_verification(context: dg.AssetExecutionContext, config: VerifyConfig, lab: LabResource,
                            warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.backup import Target
        from idp_pipelines.backup.checks import judge_verification
        from idp_pipelines.backup.records import gguf_hashes, last_verify_cursor, record_verification
        from idp_pipelines.backup.snapshot import manifest_of, newest_or_fail
        from idp_pipelines.backup.verify import verify_snapshot

        inv = lab.load()
        target = Target.from_inventory(inv.backup)
        name = newest_or_fail(target)
        wh = warehouse.get(context.log)
        with wh.read() as con:
            cursor = last_verify_cursor(con, target.describe())
            ggufs = gguf_hashes(con, inv.model_cache.path)
        report = verify_snapshot(target, name, manifest_of(target, name), gguf_sha256=ggufs,
                                 models_by_repo=_models_by_repo(inv), cursor=cursor, period=inv.backup.verify_days,
                                 full=config.full)
        for f in report.findings:
            context.log.warning(f"backup {name}: {f['file']}: {f['problem']} (expected {f['expected']}, found "
                                f"{f['actual']}); used by {', '.join(f['models']) or 'no model'}")
        with wh.write() as con:
            record_verification(con, run_id=context.run.run_id, target=target.describe(), report=report,
                                period=inv.backup.verify_days)
        context.log.info(f"verified {name}: {report.hashed} file(s), {report.hashed_bytes / 1e6:,.1f} MB in "
                         f"{report.seconds:.1f} s ({report.mb_per_s:,.1f} MB/s)")
        return dg.MaterializeResult(
            metadata={
                "snapshot": name,
                "full": config.full,
                "files_hashed": dg.MetadataValue.int(report.hashed),
                "bytes_hashed": dg.MetadataValue.int(report.hashed_bytes),
                "snapshot_files": dg.MetadataValue.int(report.slice.total_items),
                "cursor": report.slice.cursor or "",
                "wrapped": report.slice.wrapped,
                "problems": dg.MetadataValue.int(len(report.findings)),
                "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
                "findings": dg.MetadataValue.md(md_table(
                    [dict(f, models=", ".join(f["models"])) for f in report.findings],
                    ["file", "problem", "expected", "actual", "models"]) if report.findings else "none"),
            },
            check_results=[check_result(judge_verification(report, target.describe()))],
        )

    @dg.asset_check(asset=cache_backup, name=RESTORE_DRILL, blocking=False,
                    description="A random model restored from the newest snapshot into a temporary cache: a valid "
                                "Hugging Face cache (scan_cache_dir), identical hashes, loads offline.")
    def restore_drill(context: dg.AssetCheckExecutionContext, lab: LabResource,
                      warehouse: WarehouseResource) -> dg.AssetCheckResult:
        from idp_pipelines.backup import Target
        from idp_pipelines.backup.checks import judge_drill
        from idp_pipelines.backup.records import record_restore
        from idp_pipelines.backup.restore import restore_drill as drill
        from idp_pipelines.backup.snapshot import manifest_of, newest_or_fail

        inv = lab.load()
        target = Target.from_inventory(inv.backup)
        name = newest_or_fail(target)
        report = drill(target, name, manifest_of(target, name), rng=random.Random(),
                       workdir=settings.idp_home(), log=context.log.info)
        with warehouse.get(context.log).write() as con:
            record_restore(con, run_id=context.run.run_id, target=target.describe(), drill=report)
        j = judge_drill(report, target.describe())
        return check_result(j, snapshot=name, model=report.repo_id or "", seconds=round(report.seconds, 3))

    @dg.op(tags=tags, description="Bring back one model, the whole cache or a state item from a snapshot.")
    def restore_from_backup(context: dg.OpExecutionContext, config: RestoreConfig, lab: LabResource,
                            warehouse: WarehouseResource) -> None:
        from idp_pipelines.backup import Target
        from idp_pipelines.backup.records import record_restore
        from idp_pipelines.backup.restore import check_what, restore, restore_plan
        from idp_pipelines.backup.snapshot import manifest_of, newest_or_fail

        inv = lab.load()
        check_what(config.what, get_args(BackupState))
        target = Target.from_inventory(inv.backup)
        snap = newest_or_fail(target) if config.snapshot == "newest" else config.snapshot
        model = inv.model(config.model) if config.what == "model" and config.model else None
        parts = restore_plan(config.what, snapshot_files=list(manifest_of(target, snap)["files"]),
                             cache=inv.model_cache.path, state_home=settings.idp_home() / "restored", snapshot=snap,
                             dest=Path(config.dest) if config.dest else None, model=model and model.name,
                             repo_id=model and model.repo_id, state_items=get_args(BackupState))
        for source, dest in parts:
            result = restore(target, snap, source, dest, overwrite=config.overwrite, progress=_progress(context.log),
                             log=context.log.info)
            with warehouse.get(context.log).write() as con:
                record_restore(con, run_id=context.run.run_id, target=target.describe(), result=result)
            context.log.info(f"restored {source} of {snap} into {dest}: {result.files} file(s), "
                             f"{result.bytes / 1e6:,.1f} MB" + (f", {len(result.overwritten)} overwritten"
                                                                if result.overwritten else ""))

    @dg.job(name="restore_job", description="Restore from a backup snapshot (config: what, model, snapshot, dest, "
                                             "overwrite). Never deletes; refuses to overwrite a differing file "
                                             "unless overwrite: true.")
    def restore_job():
        restore_from_backup()

    backup_job = dg.define_asset_job(BACKUP_JOB, selection=[cache_backup, backup_verification],
                                     description="A snapshot, then the verification of its slice.")
    drill_job = dg.define_asset_job("restore_drill_job", selection=dg.AssetSelection.checks(restore_drill))
    schedules = [
        dg.ScheduleDefinition(name="cache_backup_schedule", job=backup_job, cron_schedule=inventory.schedules.backup_cron,
                              execution_timezone=inventory.schedules.timezone,
                              default_status=dg.DefaultScheduleStatus.RUNNING,
                              description="The daily snapshot (lab.yaml schedules.backup_cron)."),
        dg.ScheduleDefinition(name="restore_drill_schedule", job=drill_job, cron_schedule=b.drill_cron,
                              execution_timezone=inventory.schedules.timezone,
                              default_status=dg.DefaultScheduleStatus.RUNNING,
                              description="The weekly restore drill (lab.yaml backup.drill_cron)."),
    ]

    @dg.sensor(name="backup_after_new_models_sensor", job=backup_job, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="A new download or quantization is backed up: one backup after a burst of them "
                           "(backup.debounce_s), never while a backup runs.")
    def backup_after_new_models_sensor(context: dg.SensorEvaluationContext):
        return evaluate_backup_trigger(context, debounce_s=b.debounce_s)

    from idp_pipelines.backup.schedule import longest_gap

    # The newest snapshot may be as old as the longest gap of the schedule plus a long copy (2 h), no more.
    # Freshness checks, not the newer FreshnessPolicy: that one is a preview that evaluates only with
    # `freshness: enabled` in the instance's dagster.yaml; these are asset checks that work everywhere.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.SupersessionWarning)
        freshness = dg.build_last_update_freshness_checks(
            assets=[cache_backup], lower_bound_delta=longest_gap(inventory.schedules.backup_cron) + timedelta(hours=2),
            severity=dg.AssetCheckSeverity.ERROR)
        freshness_sensor = dg.build_sensor_for_freshness_checks(
            freshness_checks=freshness, name="backup_freshness_sensor", default_status=dg.DefaultSensorStatus.RUNNING)
    return dg.Definitions(
        assets=[cache_backup, backup_verification],
        asset_checks=[restore_drill, *freshness],
        jobs=[backup_job, drill_job, restore_job],
        schedules=schedules,
        sensors=[backup_after_new_models_sensor, freshness_sensor],
    )


def evaluate_backup_trigger(context: dg.SensorEvaluationContext, *, debounce_s: float,
                            now: float | None = None) -> dg.SensorResult:
    """New hub_model / gguf_model materialisations since the cursor start one debounced backup run."""
    from idp_pipelines.backup.schedule import decide_trigger

    cursor = json.loads(context.cursor) if context.cursor else {}
    after = int(cursor.get("storage_id", 0))
    times, newest_id = [], after
    for key in NEW_ARTEFACTS:
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after), limit=1000).records
        for r in records:
            times.append(r.timestamp)
            newest_id = max(newest_id, r.storage_id)
    running = bool(context.instance.get_run_ids(dg.RunsFilter(job_name=BACKUP_JOB, statuses=_ACTIVE), limit=1))
    decision = decide_trigger(times, time.time() if now is None else now, debounce_s, running)
    if not decision.run:
        return dg.SensorResult(skip_reason=dg.SkipReason(decision.reason), cursor=context.cursor)
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"new-artefacts-{newest_id}",
                                                       tags={"idp/reason": decision.reason[:200]})],
                           cursor=json.dumps({"storage_id": newest_id}))
