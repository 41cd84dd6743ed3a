"""The backup group in Dagster: hub_model -> cache_backup -> backup_verification, its checks, the restore job,
the drill, the new-artefact sensor and the freshness check (ephemeral instance, local Hub, real rsync)."""

from __future__ import annotations

import os
import time

import dagster as dg
import duckdb
import pytest
import yaml

from idp_pipelines.assets import backup, models
from idp_pipelines.assets.backup import BACKUP_COVERAGE, BACKUP_INTACT, RESTORE_DRILL, evaluate_backup_trigger
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import HubResource, LabResource, WarehouseResource
from idp_pipelines.warehouse import Warehouse
from tests.support import write_lab

REPO = "idp-local/tiny-llama"


@pytest.fixture
def lab(tmp_path, hub, tiny_gguf):
    hub.create_repo(REPO, {tiny_gguf.name: tiny_gguf})
    path = write_lab(tmp_path / "lab.yaml", hub_url=hub.url)
    lab_res = LabResource(path=str(path))
    resources = {"lab": lab_res, "hub": HubResource(lab=lab_res),
                 "warehouse": WarehouseResource(path=str(tmp_path / "wh.duckdb"))}
    inv = load_lab(path)
    defs = dg.Definitions.merge(models.build(inv), backup.build(inv), dg.Definitions(resources=resources))
    return path, defs, dg.DagsterInstance.ephemeral()


def _asset(defs, key):
    return defs.get_assets_def(key)


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_model_then_backup_then_verification_with_checks_restore_and_drill(lab, tmp_path):
    path, defs, instance = lab
    home = tmp_path / "idp-home"
    # the model and its quantizations, made by llama.cpp's quantizer, their hashes in the warehouse
    assert dg.materialize([_asset(defs, "hub_model"), _asset(defs, "gguf_model")], partition_key="tiny-llama",
                          instance=instance, resources=defs.resources).success
    result = dg.materialize([_asset(defs, "cache_backup"), _asset(defs, "backup_verification")], instance=instance,
                            resources=defs.resources,
                            run_config={"ops": {"backup_verification": {"config": {"full": True}}}})
    assert result.success
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(m.endswith("MB (100 %): cache: copied") for m in logs), [m for m in logs if "MB" in m]
    (snap,) = result.asset_materializations_for_node("cache_backup")
    md = {k: v.value for k, v in snap.metadata.items()}
    name = md["snapshot"]
    assert (home / "backup" / name / "cache").is_dir() and md["target"] == str(home / "backup")
    assert md["files_sent"] == md["files"] and md["bytes_sent"] == md["apparent_bytes"]
    assert md["own_bytes"] == md["apparent_bytes"] > 5_000_000 and md["mb_per_s"] > 0
    assert md["state"] == {"warehouse": "copied", "mlflow": f"absent: {home / 'mlflow'}",
                           "dagster": f"absent: {home / 'dagster'}", "keys": f"absent: {home / 'deploy'}"}
    checks = _checks(result)
    assert checks[BACKUP_COVERAGE].passed and checks[BACKUP_INTACT].passed, checks
    (ver,) = result.asset_materializations_for_node("backup_verification")
    # the Hub blob, both GGUF outputs (by the warehouse's hashes) and the warehouse copy (by the manifest's)
    assert ver.metadata["files_hashed"].value == 4
    ggufs = list((home / "backup" / name / "cache" / "gguf" / "tiny-llama").rglob("*.gguf"))
    assert sorted(p.name.split(".")[-2] for p in ggufs) == ["Q4_K_M", "Q8_0"]
    # the warehouse in the snapshot is a consistent DuckDB file that opens and holds the download
    with duckdb.connect(str(home / "backup" / name / "state" / "warehouse" / "wh.duckdb"), read_only=True) as con:
        assert con.execute("SELECT model FROM model_downloads").fetchall() == [("tiny-llama",)]
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        assert con.execute("SELECT snapshot, files_sent > 0, unchanged FROM backup_snapshots").fetchall() == [
            (name, True, False)]
        assert con.execute("SELECT snapshot, problems FROM backup_verifications").fetchall() == [(name, 0)]

    drill = defs.resolve_job_def("restore_drill_job").execute_in_process(instance=instance)
    (ev,) = drill.get_asset_check_evaluations()
    assert ev.check_name == RESTORE_DRILL and ev.passed, ev.description

    # restore the model into another folder, then into the cache itself, where a changed file is refused
    job = defs.resolve_job_def("restore_job")
    dest = tmp_path / "restored"
    ok = job.execute_in_process(instance=instance, run_config={"ops": {"restore_from_backup": {"config": {
        "what": "model", "model": "tiny-llama", "dest": str(dest)}}}})
    assert ok.success and list(dest.glob("models--idp-local--tiny-llama/snapshots/*/*.gguf"))
    blob = next((home / "models" / "models--idp-local--tiny-llama" / "blobs").iterdir())
    blob.write_bytes(b"bit rot")
    refused = job.execute_in_process(instance=instance, raise_on_error=False, run_config={"ops": {
        "restore_from_backup": {"config": {"what": "model", "model": "tiny-llama"}}}})
    assert not refused.success
    err = str(refused.failure_data_for_node("restore_from_backup").error)
    assert f"would overwrite 1 file(s) in {home / 'models' / 'models--idp-local--tiny-llama'}" in err
    assert f"blobs/{blob.name}" in err and blob.read_bytes() == b"bit rot"
    fixed = job.execute_in_process(instance=instance, run_config={"ops": {"restore_from_backup": {"config": {
        "what": "model", "model": "tiny-llama", "overwrite": True}}}})
    assert fixed.success and blob.read_bytes() != b"bit rot"


def test_a_damaged_target_fails_backup_intact_naming_the_model(lab, tmp_path):
    path, defs, instance = lab
    dg.materialize([_asset(defs, "hub_model")], partition_key="tiny-llama", instance=instance,
                   resources=defs.resources)
    dg.materialize([_asset(defs, "cache_backup")], instance=instance, resources=defs.resources)
    (blob,) = (tmp_path / "idp-home" / "backup").glob("*/cache/models--*/blobs/*")
    blob.unlink()
    result = dg.materialize([_asset(defs, "backup_verification")], instance=instance, resources=defs.resources,
                            run_config={"ops": {"backup_verification": {"config": {"full": True}}}})
    check = _checks(result)[BACKUP_INTACT]
    assert not check.passed and f"blobs/{blob.name}: missing" in check.description
    assert "used by tiny-llama" in check.description


def test_an_exfat_target_fails_cache_backup_with_the_reason(lab, exfat):
    """The run fails on a USB disk (exFAT) saying why and what to do, and leaves nothing on it."""
    path, defs, instance = lab
    data = yaml.safe_load(path.read_text())
    data["backup"]["target"] = str(exfat / "nas")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    dg.materialize([_asset(defs, "hub_model")], partition_key="tiny-llama", instance=instance,
                   resources=defs.resources)
    result = dg.materialize([_asset(defs, "cache_backup")], instance=instance, resources=defs.resources,
                            raise_on_error=False)
    assert not result.success
    error = str(result.failure_data_for_node("cache_backup").error)
    assert f"The backup target {exfat / 'nas'} cannot make a hard link: every snapshot there would be a full " in error
    assert "Fix: point backup.target at a Linux filesystem" in error
    assert os.listdir(exfat / "nas") == []


def test_new_artefacts_start_one_debounced_backup(lab, tmp_path):
    path, defs, instance = lab
    sensor = defs.get_sensor_def("backup_after_new_models_sensor")

    def tick(cursor, debounce_s, now=None):
        with dg.build_sensor_context(instance=instance, cursor=cursor) as ctx:
            return evaluate_backup_trigger(ctx, debounce_s=debounce_s, now=now)

    assert tick(None, 0).skip_reason.skip_message == "no new model artefact since the last backup request"
    dg.materialize([_asset(defs, "hub_model")], partition_key="tiny-llama", instance=instance,
                   resources=defs.resources)
    waiting = tick(None, 600)
    assert not waiting.run_requests and "waiting for" in waiting.skip_reason.skip_message
    go = tick(None, 600, now=time.time() + 601)
    (req,) = go.run_requests
    assert req.job_name in (None, "cache_backup_job") and sensor.job_name == "cache_backup_job"
    assert tick(go.cursor, 0).skip_reason.skip_message == "no new model artefact since the last backup request"


def test_the_freshness_check_fails_without_a_recent_snapshot(lab):
    path, defs, instance = lab
    checks = [c for c in defs.asset_checks if any("freshness" in k.name for k in c.check_keys)]
    assert checks, "no freshness check on cache_backup"
    job = dg.define_asset_job("fresh", selection=dg.AssetSelection.checks(*checks))
    run = dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def("fresh").execute_in_process(
        instance=instance, raise_on_error=False)
    (ev,) = run.get_asset_check_evaluations()
    assert ev.asset_key == dg.AssetKey("cache_backup") and not ev.passed
    assert ev.severity == dg.AssetCheckSeverity.ERROR


def test_restore_job_rejects_an_unknown_item(lab, tmp_path):
    path, defs, instance = lab
    run = defs.resolve_job_def("restore_job").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"restore_from_backup": {"config": {"what": "everything"}}}})
    assert not run.success
    assert "restore: what='everything' is unknown. Fix: model (with model: <name>), cache, or one of warehouse" in str(
        run.failure_data_for_node("restore_from_backup").error)


def test_schedules_and_sensors_run_by_default(lab):
    path, defs, instance = lab
    assert defs.get_schedule_def("cache_backup_schedule").cron_schedule == "0 4 * * *"
    assert defs.get_schedule_def("restore_drill_schedule").cron_schedule == "0 5 * * 0"
    for s in ("cache_backup_schedule", "restore_drill_schedule"):
        assert defs.get_schedule_def(s).default_status == dg.DefaultScheduleStatus.RUNNING
    for s in ("backup_after_new_models_sensor", "backup_freshness_sensor"):
        assert defs.get_sensor_def(s).default_status == dg.DefaultSensorStatus.RUNNING
    assert _asset(defs, "cache_backup").op.pool == _asset(defs, "backup_verification").op.pool == "backup"
