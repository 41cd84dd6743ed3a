"""Verification on the target, restores and the restore drill, on real snapshots made with rsync."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from idp_pipelines.backup import BackupError
from idp_pipelines.backup.checks import judge_coverage, judge_drill, judge_verification
from idp_pipelines.backup.records import gguf_hashes
from idp_pipelines.backup.restore import check_restored_cache, restore, restore_drill
from idp_pipelines.backup.snapshot import make_snapshot, manifest_of
from idp_pipelines.backup.state import stage_state
from idp_pipelines.backup.verify import verify_snapshot
from tests.backup.conftest import REPO, after_reboot, ext4_volume, make_cache, power_cut, tree

MODELS = {REPO: ["tiny"]}


@pytest.fixture
def snapshot(cache, target, tmp_path):
    result = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock")
    return result.name


def _verify(cache, target, name, **kw):
    with cache.warehouse.read() as con:
        ggufs = gguf_hashes(con, cache.path)
    kw.setdefault("cursor", None)
    kw.setdefault("period", 1)
    return verify_snapshot(target, name, manifest_of(target, name), gguf_sha256=ggufs, models_by_repo=MODELS, **kw)


def test_an_intact_snapshot_verifies_blobs_by_name_and_gguf_by_the_warehouse(cache, target, snapshot):
    report = _verify(cache, target, snapshot)
    assert report.findings == []
    # three Hub blobs (sha256 and git sha1 names) and two GGUF files: every one of them re-hashed
    assert report.hashed == 5 and report.slice.total_items == 5
    j = judge_verification(report, target.describe())
    assert j.passed and j.description.endswith("every file's presence and size checked: all intact.")


def test_a_flipped_byte_fails_naming_the_file_and_its_model(cache, target, snapshot):
    blob = Path(target.path) / snapshot / "cache" / cache.blob_lfs
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    report = _verify(cache, target, snapshot)
    (f,) = report.findings
    name = cache.blob_lfs.rsplit("/", 1)[1]
    assert f == {"file": f"cache/{cache.blob_lfs}", "problem": "hash mismatch", "expected": f"sha256 {name}",
                 "actual": f"sha256 {hashlib.sha256(bytes(data)).hexdigest()}", "models": ["tiny"]}
    j = judge_verification(report, target.describe())
    assert not j.passed
    assert f"1 problem(s): cache/{cache.blob_lfs}: hash mismatch (expected sha256 {name}" in j.description
    assert "used by tiny. Fix: make a new snapshot" in j.description


def test_a_deleted_blob_and_a_broken_gguf_are_reported(cache, target, snapshot):
    snap = Path(target.path) / snapshot / "cache"
    (snap / cache.blob_git).unlink()
    q8 = next(iter(cache.gguf))
    with (snap / q8).open("r+b") as f:
        f.seek(10)
        f.write(b"\0\0\0")  # same size: only the warehouse's hash can tell
    report = _verify(cache, target, snapshot)
    got = {f["file"]: (f["problem"], f["models"]) for f in report.findings}
    assert got == {f"cache/{cache.blob_git}": ("missing", ["tiny"]), f"cache/{q8}": ("hash mismatch", ["tiny"])}
    assert f"cache/{cache.blob_git}: missing (expected" in judge_verification(report, "nas").description


def test_a_symlink_replaced_by_a_file_is_reported(cache, target, snapshot):
    link = Path(target.path) / snapshot / "cache" / cache.snapshot_link
    data = link.read_bytes()
    link.unlink()
    link.write_bytes(data)
    (f,) = _verify(cache, target, snapshot).findings
    assert (f["file"], f["problem"], f["actual"]) == (f"cache/{cache.snapshot_link}", "symlink changed", "not a symlink")


def test_the_rotating_slice_covers_the_whole_snapshot_within_its_period(hub, target, tmp_path):
    cache = make_cache(hub, tmp_path, sparse_bytes=250_000)  # files of similar sizes: slices of 2 files
    snapshot = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock").name
    seen, cursor = [], None
    for _ in range(3):
        report = _verify(cache, target, snapshot, cursor=cursor, period=3)
        assert report.findings == [] and 1 <= report.hashed < 5
        seen += report.slice.keys
        cursor = report.slice.cursor
    assert len(set(seen)) == 5
    assert _verify(cache, target, snapshot, cursor=cursor, period=3, full=True).hashed == 5


def test_a_restored_model_keeps_times_and_a_differing_file_is_not_overwritten(cache, target, snapshot, tmp_path):
    repo_dir = "models--lab--tiny-model"
    dest = tmp_path / "restored"
    result = restore(target, snapshot, f"cache/{repo_dir}", dest / repo_dir)
    src = {k: v for k, v in tree(cache.path / repo_dir).items()}
    assert tree(dest / repo_dir) == src  # content, symlinks, modes and mtimes as in the cache
    assert result.files == 4 and check_restored_cache(dest, repo_dir) == []

    config = dest / cache.blob_git  # the restored config.json, edited since
    config.write_text('{"hidden_size": 16}\n')
    with pytest.raises(BackupError) as err:
        restore(target, snapshot, f"cache/{repo_dir}", dest / repo_dir)
    rel = cache.blob_git.split("/", 1)[1]
    assert str(err.value) == (
        f"Restoring cache/{repo_dir} from snapshot {snapshot} would overwrite 1 file(s) in {dest / repo_dir} that "
        f"differ from the backup: {rel}. Nothing was changed. Fix: restore into an empty folder (dest), or run "
        "the restore again with overwrite: true to replace them.")
    assert config.read_text() == '{"hidden_size": 16}\n'
    again = restore(target, snapshot, f"cache/{repo_dir}", dest / repo_dir, overwrite=True)
    assert again.overwritten == [rel] and config.read_bytes() == (cache.path / cache.blob_git).read_bytes()


def test_a_restore_that_returned_is_on_the_disk(cache, target, snapshot, tmp_path):
    """A power cut right after a restore returns finds the restored files with their bytes, not empty files
    (the cache's verified marker keys on size and time: an empty file would be a re-download, at best)."""
    repo_dir = "models--lab--tiny-model"
    with ext4_volume(tmp_path, "cache-disk") as (image, mnt):
        restore(target, snapshot, f"cache/{repo_dir}", mnt / repo_dir)
        cut = power_cut(image, "cut-after-restore")
    with after_reboot(cut) as disk:
        assert tree(disk / repo_dir) == tree(cache.path / repo_dir)


def test_the_whole_cache_restored_loads_the_model_offline(cache, target, snapshot, tmp_path, monkeypatch):
    from huggingface_hub import hf_hub_download

    dest = tmp_path / "new-machine" / "models"
    restore(target, snapshot, "cache", dest)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = hf_hub_download(REPO, "model.safetensors", revision=cache.sha, cache_dir=dest, local_files_only=True)
    assert Path(path).read_bytes() == (cache.path / cache.snapshot_link).read_bytes()
    sparse = next(p for p in cache.gguf if p.endswith("F16.gguf"))
    assert (dest / sparse).read_bytes() == (cache.path / sparse).read_bytes()
    assert (dest / sparse).stat().st_blocks <= (cache.path / sparse).stat().st_blocks + 64  # sparse again
    # the verified record came back with the blobs' times: no re-hash of the whole cache after a restore
    record = json.loads((dest / ".locks" / "idp-verified.json").read_text())["blobs"]
    for rel, (size, mtime_ns, *_rest) in record.items():
        assert (dest / rel).stat().st_mtime_ns == mtime_ns and (dest / rel).stat().st_size == size


def test_the_restore_drill_passes_on_a_good_snapshot_and_fails_on_a_damaged_one(cache, target, snapshot, tmp_path):
    report = restore_drill(target, snapshot, manifest_of(target, snapshot), rng=random.Random(0), workdir=tmp_path)
    assert report.repo_id == REPO and report.problems == [] and report.files == 4
    j = judge_drill(report, "nas")
    assert j.passed and "huggingface_hub scans it without errors" in j.description
    assert not list(tmp_path.glob("idp-restore-drill-*"))  # the temporary cache is gone

    blob = Path(target.path) / snapshot / "cache" / cache.blob_lfs
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    bad = restore_drill(target, snapshot, manifest_of(target, snapshot), workdir=tmp_path)
    assert len(bad.problems) == 1 and bad.problems[0].startswith(f"models--lab--tiny-model/blobs/{cache.blob_lfs.split('/')[-1]}: sha256")
    assert not judge_drill(bad, "nas").passed


def test_state_is_staged_consistently_with_modes_and_restored(cache, target, tmp_path):
    import sqlite3

    keys = tmp_path / "secrets"
    keys.mkdir(mode=0o700)
    (keys / "llama.key").write_text("not-a-real-key")
    os.chmod(keys / "llama.key", 0o600)
    mlflow = tmp_path / "mlflow"
    mlflow.mkdir()
    with sqlite3.connect(mlflow / "mlflow.db") as db:
        db.execute("CREATE TABLE runs (id INTEGER)")
        db.execute("INSERT INTO runs VALUES (42)")
    staging = tmp_path / "staging"
    outcome = stage_state({"keys": keys, "mlflow": mlflow, "vault": tmp_path / "no-vault"}, staging)
    assert outcome == {"keys": "copied", "mlflow": "copied", "vault": f"absent: {tmp_path / 'no-vault'}"}
    result = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock", state_dir=staging)
    assert result.state == ["keys", "mlflow"]
    snap = Path(target.path) / result.name / "state"
    assert (snap / "keys" / "llama.key").stat().st_mode & 0o777 == 0o600
    assert (snap / "keys").stat().st_mode & 0o777 == 0o700
    report = _verify(cache, target, result.name)
    assert report.findings == [] and report.hashed == 7  # 5 cache files + the key + the MLflow store

    (snap / "keys" / "llama.key").write_text("tampered")
    assert [f["file"] for f in _verify(cache, target, result.name).findings] == ["state/keys/llama.key"]
    out = tmp_path / "restored-mlflow"
    restore(target, result.name, "state/mlflow", out)
    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("SELECT id FROM runs").fetchall() == [(42,)]


def test_coverage_and_link_refusal_texts():
    assert judge_coverage([], "S", "/c", 5).description == (
        "all 5 blob(s) and GGUF file(s) of /c are in snapshot S with the same size.")
    j = judge_coverage([{"file": "gguf/m/x.gguf", "problem": "not in the snapshot", "bytes": 3}], "S", "/c", 5)
    assert not j.passed and j.description.startswith(
        "1 of 5 blob(s)/GGUF file(s) of /c are not in snapshot S as they are in the cache: gguf/m/x.gguf (not in the "
        "snapshot). Fix: materialise cache_backup again")


def test_a_missing_snapshot_or_model_is_a_clear_error(cache, target, snapshot, tmp_path):
    with pytest.raises(BackupError, match=r"No snapshot '2020-01-01T00-00-00Z' on .* \(it has \['20"):
        restore(target, "2020-01-01T00-00-00Z", "cache", tmp_path / "x")
    with pytest.raises(BackupError, match=r"holds nothing under cache/models--nobody--x. Fix: check the model name"):
        restore(target, snapshot, "cache/models--nobody--x", tmp_path / "x")


def test_restore_plans():
    from idp_pipelines.backup.restore import restore_plan

    files = ["cache/models--org--m/blobs/ab", "cache/gguf/m/abc/m.Q8_0.gguf"]
    common = {"snapshot_files": files, "cache": Path("/c"), "state_home": Path("/h/restored"), "snapshot": "S",
              "state_items": ("warehouse", "keys")}
    assert restore_plan("model", dest=None, model="m", repo_id="org/m", **common) == [
        ("cache/models--org--m", Path("/c/models--org--m")), ("cache/gguf/m", Path("/c/gguf/m"))]
    assert restore_plan("cache", dest=Path("/new"), **common) == [("cache", Path("/new"))]
    assert restore_plan("keys", dest=None, **common) == [("state/keys", Path("/h/restored/S/keys"))]
    with pytest.raises(BackupError, match=r"what=model needs model: <name"):
        restore_plan("model", dest=None, **common)
