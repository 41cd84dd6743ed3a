"""hub_model -> gguf_model -> model_cache_inventory against a local Hub-compatible server, and the sensor."""

from __future__ import annotations

import json
import logging
import os

import dagster as dg
import pytest
import yaml

from idp_pipelines.assets import models
from idp_pipelines.assets.common import Throttle
from idp_pipelines.assets.models import (
    CACHE_BUDGET, CACHE_COMPLETE, CACHE_ORPHANS, CACHE_UNUSED, GGUF_GENERATES, GGUF_SIZE, GGUF_TYPES, REHASH_INTACT,
)
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import HubResource, LabResource, WarehouseResource
from idp_pipelines.warehouse import Warehouse
from tests.support import write_lab

REPO = "idp-local/tiny-llama"


@pytest.fixture
def tiny_repo(hub, tiny_gguf):
    return hub.create_repo(REPO, {tiny_gguf.name: tiny_gguf})


def _lab(tmp_path, hub, **model_changes):
    path = write_lab(tmp_path / "lab.yaml", hub_url=hub.url)
    data = yaml.safe_load(path.read_text())
    data["models"][0].update(model_changes)
    # a compose service that serves a quantization the changed model no longer makes goes with it
    targets = data["models"][0].get("quantize") or []
    data["services"] = [s for s in data.get("services", []) if not s.get("quant") or s["quant"] in targets]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _resources(lab_file, tmp_path):
    lab = LabResource(path=str(lab_file))
    return {"lab": lab, "hub": HubResource(lab=lab), "warehouse": WarehouseResource(path=str(tmp_path / "wh.duckdb"))}


def _assets(lab_file):
    return {a.key.to_user_string(): a for a in models.build(load_lab(lab_file)).assets}


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_download_quantize_and_inventory_end_to_end(tmp_path, hub, tiny_repo, tiny_gguf):
    lab_file = _lab(tmp_path, hub)
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    instance = dg.DagsterInstance.ephemeral()

    result = dg.materialize([assets["hub_model"], assets["gguf_model"]], partition_key="tiny-llama",
                            resources=res, instance=instance)
    assert result.success
    (dl,) = result.asset_materializations_for_node("hub_model")
    assert dl.metadata["commit_sha"].value == tiny_repo and dl.metadata["files"].value == 1
    assert dl.metadata["bytes"].value == tiny_gguf.stat().st_size
    (q,) = result.asset_materializations_for_node("gguf_model")
    assert q.metadata["outputs"].value == 2 and "Q4_K_M" in q.metadata["quantizations"].value
    checks = _checks(result)
    assert all(checks[c].passed for c in (GGUF_TYPES, GGUF_GENERATES, GGUF_SIZE)), checks
    out_dir = tmp_path / "idp-home" / "models" / "gguf" / "tiny-llama" / tiny_repo[:12]
    assert sorted(p.name for p in out_dir.glob("*.gguf")) == [
        "tiny-llama-f32.Q4_K_M.gguf", "tiny-llama-f32.Q8_0.gguf"]

    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        assert con.execute("SELECT model, commit_sha, files FROM model_downloads").fetchall() == [
            ("tiny-llama", tiny_repo, 1)]
        rows = con.execute("SELECT quant_type, source_dtype, reused FROM quantizations ORDER BY 1").fetchall()
    assert rows == [("Q4_K_M", "F32", False), ("Q8_0", "F32", False)]

    # rerun with nothing new: no file fetched from the Hub, no re-quantization
    gets = hub.content_gets(REPO)
    again = dg.materialize([assets["hub_model"], assets["gguf_model"]], partition_key="tiny-llama",
                           resources=res, instance=instance)
    assert again.success and hub.content_gets(REPO) == gets
    (dl2,) = again.asset_materializations_for_node("hub_model")
    assert dl2.metadata["bytes_downloaded"].value == 0 and dl2.metadata["repaired_files"].value == 0
    (q2,) = again.asset_materializations_for_node("gguf_model")
    # both outputs reused, row by row: not one "yes" somewhere in the table
    assert q2.metadata["reused"].value == 2
    table = q2.metadata["quantizations"].value.splitlines()[2:]
    assert len(table) == 2 and all(row.split("|")[7].strip() == "yes" for row in table), table

    inv = dg.materialize([assets["model_cache_inventory"]], resources=res, instance=instance)
    assert inv.success
    checks = _checks(inv)
    assert all(checks[c].passed for c in (CACHE_BUDGET, CACHE_ORPHANS, CACHE_UNUSED, CACHE_COMPLETE)), checks
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        files = con.execute("SELECT repo_id, commit_sha, path, size, used FROM model_cache_files").fetchall()
    assert files == [(REPO, tiny_repo, "tiny-llama-f32.gguf", tiny_gguf.stat().st_size, True)]

    # an orphaned blob is reported with the space it holds
    blobs = next((tmp_path / "idp-home" / "models").glob("models--*/blobs"))
    (blobs / ("ab" * 32)).write_bytes(b"x" * 4096)
    inv = dg.materialize([assets["model_cache_inventory"]], resources=res, instance=instance)
    orphan = _checks(inv)[CACHE_ORPHANS]
    assert not orphan.passed and orphan.severity == dg.AssetCheckSeverity.WARN and "4.1 kB" in orphan.description


def test_not_enough_budget_refuses_before_downloading(tmp_path, hub, tiny_repo):
    lab_file = _lab(tmp_path, hub)
    data = yaml.safe_load(lab_file.read_text())
    data["model_cache"]["budget_gb"] = 0.001  # 1 MB, the model is 5.8 MB
    lab_file.write_text(yaml.safe_dump(data))
    result = dg.materialize([_assets(lab_file)["hub_model"]], partition_key="tiny-llama",
                            resources=_resources(lab_file, tmp_path), raise_on_error=False)
    assert not result.success
    err = str(result.failure_data_for_node("hub_model").error)
    assert "budget" in err and "GB" in err
    assert hub.content_gets(REPO) == 0
    assert not list((tmp_path / "idp-home" / "models").rglob("*.gguf"))


def test_safetensors_model_with_quantize_targets_fails_clearly(tmp_path, hub, tiny_repo):
    lab_file = _lab(tmp_path, hub, format="safetensors")
    result = dg.materialize([_assets(lab_file)["gguf_model"]], partition_key="tiny-llama",
                            resources=_resources(lab_file, tmp_path), raise_on_error=False)
    assert not result.success
    assert "need a GGUF source, but the model's format is safetensors" in str(
        result.failure_data_for_node("gguf_model").error)


def test_fp8_model_records_its_serving_quantization(tmp_path, hub, tiny_repo):
    lab_file = _lab(tmp_path, hub, quantize=[], serving_quantization="fp8", format="safetensors")
    result = dg.materialize([_assets(lab_file)["gguf_model"]], partition_key="tiny-llama",
                            resources=_resources(lab_file, tmp_path))
    (mat,) = result.asset_materializations_for_node("gguf_model")
    assert mat.metadata["serving"].value == "quantized on the fly by the serving engine (fp8)"
    assert mat.metadata["outputs"].value == 0


def _tick(lab_file, tmp_path, cursor):
    res = _resources(lab_file, tmp_path)
    defs = dg.Definitions.merge(models.build(load_lab(lab_file)), dg.Definitions(resources=res))
    with dg.build_sensor_context(cursor=cursor, resources={"lab": res["lab"], "hub": res["hub"]},
                                 definitions=defs) as ctx:
        return defs.sensors[0].evaluate_tick(ctx)


def test_revision_sensor_requests_new_commits_only(tmp_path, hub, tiny_repo, tiny_gguf):
    lab_file = _lab(tmp_path, hub)
    first = _tick(lab_file, tmp_path, None)
    assert [(r.partition_key, r.run_key) for r in first.run_requests] == [("tiny-llama", f"tiny-llama@{tiny_repo}")]
    assert json.loads(first.cursor) == {"tiny-llama": tiny_repo}

    same = _tick(lab_file, tmp_path, first.cursor)
    assert same.run_requests == [] and same.skip_message == "no branch-tracked model moved"
    assert same.cursor == first.cursor

    new = hub.commit(REPO, {"README.md": b"new card\n"})
    moved = _tick(lab_file, tmp_path, first.cursor)
    assert [r.run_key for r in moved.run_requests] == [f"tiny-llama@{new}"]
    assert json.loads(moved.cursor) == {"tiny-llama": new}


def test_revision_sensor_skips_when_hub_is_down_and_ignores_pinned(tmp_path, hub, tiny_repo):
    lab_file = _lab(tmp_path, hub)
    (tmp_path / "pinned").mkdir()
    pinned = _lab(tmp_path / "pinned", hub, revision=tiny_repo)
    cursor = json.dumps({"tiny-llama": tiny_repo})
    hub.stop()
    down = _tick(lab_file, tmp_path, cursor)
    assert down.run_requests == [] and "Hub unreachable for tiny-llama" in down.skip_message
    assert down.cursor == cursor  # nothing forgotten

    tick = _tick(pinned, tmp_path, None)  # the Hub is down, but a pinned model is never asked about
    assert tick.run_requests == [] and tick.skip_message == "no branch-tracked model moved"


# -- issue 10: loud repairs, complete models, a rotating re-hash ---------------------------------------


def test_throttle_drops_only_routine_progress():
    info, warn, err = [], [], []
    throttle = Throttle(info.append, every_s=3600, warn=warn.append, error=err.append)
    throttle("1 of 3")
    throttle("2 of 3")  # within the interval: routine, dropped
    throttle.warning("hash mismatch: model.gguf")
    throttle.error("gave up on model.gguf")
    throttle.warning("hash mismatch: config.json")
    throttle("3 of 3", final=True)
    assert info == ["1 of 3", "3 of 3"]
    assert warn == ["hash mismatch: model.gguf", "hash mismatch: config.json"] and err == ["gave up on model.gguf"]
    bare = []  # without separate channels, warnings go through the one emitter, never dropped
    plain = Throttle(bare.append, every_s=3600)
    plain("a")
    plain.warning("w")
    plain("b")
    assert bare == ["a", "w"]


def _warnings(instance: dg.DagsterInstance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]


def _rot(path) -> bytes:
    """Flip a byte of a cached blob, keeping its size and mtime: the verified record still vouches for it."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return bytes(data)


def test_a_cache_repair_is_a_warning_and_counted(tmp_path, hub, tiny_repo, tiny_gguf):
    import hashlib

    lab_file = _lab(tmp_path, hub)
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance).success
    blob = next((tmp_path / "idp-home" / "models").glob("models--*/blobs/*"))
    bad = _rot(blob)
    os.utime(blob)  # a rewrite behind the cache's back moves the mtime: the next run hashes the file again

    result = dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance)

    (mat,) = result.asset_materializations_for_node("hub_model")
    assert mat.metadata["repaired_files"].value == 1
    assert "bad cache copy" in mat.metadata["file_list"].value
    expected, got = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest(), hashlib.sha256(bad).hexdigest()
    (warning,) = [w for w in _warnings(instance, result) if "hash mismatch" in w]
    assert f"'{tiny_gguf.name}'" in warning and expected in warning and got in warning
    assert blob.read_bytes() == tiny_gguf.read_bytes()


def test_inventory_fails_a_half_downloaded_model_naming_the_missing_file(tmp_path, hub, tiny_gguf):
    sha = hub.create_repo(REPO, {"config.json": b'{"architectures": ["LlamaForCausalLM"]}\n', tiny_gguf.name: tiny_gguf})
    hub.hide_file(REPO, tiny_gguf.name)  # listed, but its download fails: the cache keeps config.json only
    lab_file = _lab(tmp_path, hub, allow_patterns=None)
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    instance = dg.DagsterInstance.ephemeral()
    failed = dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance,
                            raise_on_error=False)
    assert not failed.success

    inv = dg.materialize([assets["model_cache_inventory"]], resources=res, instance=instance)
    complete = _checks(inv)[CACHE_COMPLETE]
    assert not complete.passed and complete.severity == dg.AssetCheckSeverity.ERROR
    assert complete.description == (
        f"tiny-llama ({REPO}@{sha[:12]}) lacks 1 of 2 file(s): {tiny_gguf.name}. "
        "Fix: materialise hub_model for tiny-llama (a failed or interrupted download).")
    assert _checks(inv)[CACHE_BUDGET].passed and _checks(inv)[CACHE_ORPHANS].passed

    hub.clear_faults()
    assert dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance).success
    again = dg.materialize([assets["model_cache_inventory"]], resources=res, instance=instance)
    assert _checks(again)[CACHE_COMPLETE].passed


def test_rehash_slice_finds_bit_rot_in_a_trusted_file_on_its_own_schedule(tmp_path, hub, tiny_repo, tiny_gguf):
    lab_file = _lab(tmp_path, hub)
    data = yaml.safe_load(lab_file.read_text())
    data["model_cache"]["rehash_days"] = 7
    data["schedules"]["rehash_cron"] = "15 5 * * *"
    lab_file.write_text(yaml.safe_dump(data, sort_keys=False))
    defs = models.build(load_lab(lab_file))
    (schedule,) = defs.schedules
    assert (schedule.name, schedule.cron_schedule, schedule.default_status) == (
        "model_cache_rehash_schedule", "15 5 * * *", dg.DefaultScheduleStatus.RUNNING)
    assert schedule.job.name == "model_cache_rehash_job"

    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance).success
    first = dg.materialize([assets["model_cache_rehash"]], resources=res, instance=instance)
    (mat,) = first.asset_materializations_for_node("model_cache_rehash")
    assert (mat.metadata["files"].value, mat.metadata["period_days"].value, mat.metadata["mismatches"].value) == (1, 7, 0)
    assert _checks(first)[REHASH_INTACT].passed

    blob = next((tmp_path / "idp-home" / "models").glob("models--*/blobs/*"))
    _rot(blob)
    rerun = dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance)
    assert rerun.asset_materializations_for_node("hub_model")[0].metadata["repaired_files"].value == 0  # unseen
    found = dg.materialize([assets["model_cache_rehash"]], resources=res, instance=instance)
    check = _checks(found)[REHASH_INTACT]
    assert not check.passed and tiny_gguf.name in check.description
    assert "Fix: materialise hub_model for tiny-llama" in check.description
    assert any("hash mismatch in the model cache" in w for w in _warnings(instance, found))
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        assert con.execute("SELECT files, mismatches FROM model_cache_rehashes ORDER BY rehashed_at").fetchall() == [
            (1, 0), (1, 1)]
    repaired = dg.materialize([assets["hub_model"]], partition_key="tiny-llama", resources=res, instance=instance)
    assert repaired.asset_materializations_for_node("hub_model")[0].metadata["repaired_files"].value == 1
