"""scan_model_cache / delete_plan on real caches made by huggingface_hub from the local Hub server."""

from __future__ import annotations

import hashlib
import os
import random
import time
from datetime import datetime
from pathlib import Path
from unittest.mock import ANY

import pytest

from idp_pipelines.hub import HubError, download_model
from idp_pipelines.hub.inventory import SCHEMAS, CacheInventory, delete_plan, human_bytes, scan_model_cache

TINY = "lab/tiny-model"
OTHER = "lab/other-model"

WEIGHTS = random.Random(1).randbytes(300_000)  # LFS (sha256-named blob)
CONFIG_1 = b'{"hidden_size": 8}\n'  # regular file (git-sha1-named blob)
CONFIG_2 = b'{"hidden_size": 16}\n'
VOCAB = b"<s>\n</s>\nhello\n"
OTHER_WEIGHTS = random.Random(2).randbytes(120_000)


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def lab_cache(hub, cache_dir):
    """tiny-model at two commits (only config.json changed; main moved to the second) + other-model."""
    from huggingface_hub import snapshot_download

    first = hub.create_repo(TINY, {"config.json": CONFIG_1, "model.safetensors": WEIGHTS, "vocab.txt": VOCAB})
    download_model(TINY, "main", cache_dir=cache_dir, endpoint=hub.url)
    second = hub.commit(TINY, {"config.json": CONFIG_2})
    download_model(TINY, "main", cache_dir=cache_dir, endpoint=hub.url)
    other = hub.create_repo(OTHER, {"model.safetensors": OTHER_WEIGHTS})
    snapshot_download(OTHER, revision=other, cache_dir=str(cache_dir), endpoint=hub.url)  # no idp record
    return {"first": first, "second": second, "other": other}


def rev(inv: CacheInventory, commit: str) -> dict:
    return next(r for r in inv.revisions if r["commit"] == commit)


def test_files_revisions_and_shared_blobs_counted_once(lab_cache, cache_dir):
    first, second, other = lab_cache["first"], lab_cache["second"], lab_cache["other"]

    inv = scan_model_cache(cache_dir)

    assert inv.repos == [OTHER, TINY]
    assert {(r["repo_id"], r["commit"]) for r in inv.revisions} == {(TINY, first), (TINY, second), (OTHER, other)}
    assert rev(inv, second)["refs"] == ["main"] and rev(inv, first)["refs"] == []
    assert rev(inv, first)["n_files"] == rev(inv, second)["n_files"] == 3
    assert rev(inv, first)["bytes"] == len(CONFIG_1) + len(WEIGHTS) + len(VOCAB)
    assert rev(inv, second)["bytes"] == len(CONFIG_2) + len(WEIGHTS) + len(VOCAB)
    assert all(r["used"] is None for r in inv.revisions) and inv.unused_revisions == []
    # The weights and vocab are shared by both tiny-model revisions: on disk once.
    unique = len(CONFIG_1) + len(CONFIG_2) + len(WEIGHTS) + len(VOCAB) + len(OTHER_WEIGHTS)
    assert inv.total_bytes == inv.snapshot_bytes == unique
    assert inv.orphaned_blobs == [] and inv.incomplete_downloads == [] and inv.warnings == []
    assert inv.budget_bytes is None and not inv.over_budget

    assert len(inv.files) == 7
    assert all(list(row) == list(SCHEMAS["files"]) for row in inv.files)
    weights = [f for f in inv.files if f["repo_id"] == TINY and f["path"] == "model.safetensors"]
    assert len(weights) == 2 and len({f["blob_path"] for f in weights}) == 1
    w = weights[0]
    assert w["hash"] == hashlib.sha256(WEIGHTS).hexdigest() and w["algo"] == "sha256"
    assert w["size"] == len(WEIGHTS) and w["verified"] is True
    assert Path(w["blob_path"]).name == w["hash"] and Path(w["blob_path"]).parent.name == "blobs"
    assert isinstance(w["last_modified"], datetime) and w["last_modified"].tzinfo is not None
    cfg = next(f for f in inv.files if f["commit"] == second and f["path"] == "config.json")
    assert cfg["hash"] == git_sha1(CONFIG_2) and cfg["algo"] == "git-sha1" and cfg["refs"] == ["main"]
    # Fetched by snapshot_download directly: in the cache but not in the idp verified record.
    assert [f["verified"] for f in inv.files if f["repo_id"] == OTHER] == [False]


def test_rows_go_into_duckdb(lab_cache, cache_dir):
    import duckdb

    blobs = cache_dir / "models--lab--tiny-model" / "blobs"
    (blobs / ("ab" * 32)).write_bytes(b"x")
    (blobs / "partial.incomplete").write_bytes(b"y")
    inv = scan_model_cache(cache_dir, used={TINY: {lab_cache["second"]}})
    con = duckdb.connect()
    for table, schema in SCHEMAS.items():
        rows = getattr(inv, table)
        assert rows and all(list(r) == list(schema) for r in rows), table
        con.execute(f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in schema.items())})")
        marks = ", ".join("?" * len(schema))
        con.executemany(f"INSERT INTO {table} VALUES ({marks})", [list(r.values()) for r in rows])
    assert con.execute("SELECT count(*), sum(size) FROM files").fetchone() == (7, sum(f["size"] for f in inv.files))
    assert con.execute("SELECT refs FROM revisions WHERE commit = ?", [lab_cache["second"]]).fetchone() == (["main"],)
    assert con.execute("SELECT count(DISTINCT hash) FROM files").fetchone() == (5,)
    assert con.execute("SELECT sum(bytes) FROM unused_revisions").fetchone() == (inv.unused_bytes,)


def test_used_marks_revisions_and_the_bytes_they_alone_hold(lab_cache, cache_dir):
    first, second, other = lab_cache["first"], lab_cache["second"], lab_cache["other"]

    inv = scan_model_cache(cache_dir, used={TINY: {second}})

    assert rev(inv, second)["used"] is True
    assert rev(inv, first)["used"] is False and rev(inv, other)["used"] is False
    unused = {r["commit"]: r for r in inv.unused_revisions}
    assert set(unused) == {first, other}
    # The old tiny-model revision alone holds its config: weights and vocab are shared with the used one.
    assert unused[first]["bytes"] == unused[first]["exclusive_bytes"] == len(CONFIG_1)
    assert unused[first]["repo_in_inventory"] is True and unused[first]["refs"] == []
    # A repo the inventory does not list at all: everything it holds could go.
    assert unused[other]["bytes"] == len(OTHER_WEIGHTS) and unused[other]["repo_in_inventory"] is False
    assert inv.unused_bytes == len(CONFIG_1) + len(OTHER_WEIGHTS)

    plan = delete_plan(inv, which=("unused",))
    tiny = cache_dir / "models--lab--tiny-model"
    other_dir = cache_dir / "models--lab--other-model"
    assert tiny / "snapshots" / first in plan
    assert tiny / "blobs" / git_sha1(CONFIG_1) in plan
    assert tiny / "blobs" / hashlib.sha256(WEIGHTS).hexdigest() not in plan  # shared with the used revision
    assert tiny / "snapshots" / second not in plan and tiny / "refs" / "main" not in plan
    assert other_dir / "refs" / "main" not in plan  # pinned by sha: no ref to remove
    assert other_dir / "blobs" / hashlib.sha256(OTHER_WEIGHTS).hexdigest() in plan
    assert all(p.exists() for p in plan)  # nothing was deleted

    # A branch name in the used set marks what that ref points to; refs of unused revisions are in the plan.
    by_ref = scan_model_cache(cache_dir, used={TINY: {"main"}, OTHER: {other}})
    assert [r["commit"] for r in by_ref.unused_revisions] == [first]
    all_used = scan_model_cache(cache_dir, used={TINY: {first, second}, OTHER: {other}})
    assert all_used.unused_revisions == [] and all_used.unused_bytes == 0 and delete_plan(all_used) == []
    old_main = scan_model_cache(cache_dir, used={TINY: {first}, OTHER: {other}})
    assert tiny / "refs" / "main" in delete_plan(old_main, which="unused")
    assert old_main.unused_revisions[0]["bytes"] == len(CONFIG_2)

    # What the plan lists, once removed, leaves a cache huggingface_hub still reads without warnings.
    for p in delete_plan(inv, which=("unused",)):
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()
    after = scan_model_cache(cache_dir, used={TINY: {second}})
    assert after.warnings == [] and [r["commit"] for r in after.revisions] == [second]
    assert after.orphaned_blobs == [] and after.total_bytes == len(CONFIG_2) + len(WEIGHTS) + len(VOCAB)


def test_orphaned_and_incomplete_blobs(lab_cache, cache_dir):
    blobs = cache_dir / "models--lab--tiny-model" / "blobs"
    orphan = blobs / ("ab" * 32)
    orphan.write_bytes(b"x" * 1234)
    partial = blobs / ("cd" * 32 + ".incomplete")
    partial.write_bytes(b"y" * 777)
    old = time.time() - 3600
    os.utime(partial, (old, old))
    before = scan_model_cache(cache_dir, budget_bytes=10**9)

    (orphan_row,) = before.orphaned_blobs
    assert orphan_row == {"path": str(orphan), "bytes": 1234, "hash": "ab" * 32, "last_modified": ANY}
    (row,) = before.incomplete_downloads
    assert row["path"] == str(partial) and row["bytes"] == 777 and row["repo_dir"] == "models--lab--tiny-model"
    assert 3500 < row["age_seconds"] < 3700
    # On disk they count; the snapshots do not reference them.
    assert before.total_bytes == before.snapshot_bytes + 1234 + 777
    assert before.reclaimable_bytes == 1234 + 777  # no `used` given: no revision is called unused
    assert delete_plan(before) == [orphan, partial]
    assert delete_plan(before, which=["incomplete"]) == [partial]
    assert orphan.exists() and partial.exists()
    with pytest.raises(ValueError, match="unknown kind"):
        delete_plan(before, which=("everything",))

    md = before.to_markdown()
    assert "| Orphaned blobs | 1 (1.2 kB) |" in md and "| Incomplete downloads | 1 (777 B) |" in md
    assert "n/a (no inventory given)" in md and TINY in md


def test_budget(lab_cache, cache_dir):
    total = scan_model_cache(cache_dir).total_bytes

    over = scan_model_cache(cache_dir, budget_bytes=total - 1)
    assert over.over_budget and over.budget_bytes == total - 1
    assert "OVER BUDGET" in over.to_markdown()

    fits = scan_model_cache(cache_dir, budget_bytes=total * 2)
    assert not fits.over_budget and fits.budget_used == pytest.approx(0.5)
    assert "50.0% used" in fits.to_markdown() and "OVER" not in fits.to_markdown()
    assert not scan_model_cache(cache_dir, budget_bytes=total).over_budget  # exactly full is not over


def test_corrupted_repo_is_a_warning_not_orphans(lab_cache, cache_dir):
    # A ref pointing to a snapshot that is not there: scan_cache_dir skips the repo and warns.
    (cache_dir / "models--lab--other-model" / "refs").mkdir(exist_ok=True)
    (cache_dir / "models--lab--other-model" / "refs" / "main").write_text("f" * 40)

    inv = scan_model_cache(cache_dir)

    assert inv.repos == [TINY]
    assert len(inv.warnings) == 1 and "models--lab--other-model" in inv.warnings[0]
    assert inv.orphaned_blobs == []  # its blobs are not called orphaned because its snapshots were not read
    assert inv.total_bytes == inv.snapshot_bytes + len(OTHER_WEIGHTS)  # but they are on disk
    assert "| Warnings | 1 |" in inv.to_markdown()


def test_missing_and_empty_cache(tmp_path):
    missing = scan_model_cache(tmp_path / "nope", used={TINY: {"a" * 40}}, budget_bytes=100)
    assert not missing.exists and missing.files == [] and missing.revisions == [] and missing.total_bytes == 0
    assert not missing.over_budget and delete_plan(missing) == []
    assert "does not exist" in missing.to_markdown()
    assert not (tmp_path / "nope").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    inv = scan_model_cache(empty, used={})
    assert inv.exists and inv.files == [] and inv.revisions == [] and inv.total_bytes == 0 and inv.warnings == []
    assert "| Repos | 0 |" in inv.to_markdown()


def test_cache_path_is_a_file(tmp_path):
    path = tmp_path / "model-cache"
    path.write_text("not a cache")
    with pytest.raises(HubError) as excinfo:
        scan_model_cache(path)
    assert str(excinfo.value) == (
        f"The model cache path {path} is not a directory (it is a file). Point `model_cache.path` in lab.yaml at "
        "a directory holding a huggingface_hub cache (models--<org>--<name>/...), or remove the file.")


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(1234) == "1.2 kB"
    assert human_bytes(512 * 10**9) == "512.0 GB"
    assert human_bytes(3 * 10**12) == "3.0 TB"


def test_shared_blob_store_counts_a_payload_once(lab_cache, cache_dir):
    """huggingface_hub's cache-wide store (Xet downloads): repo blobs are symlinks to <cache>/blobs/xx/<hash>."""
    store = cache_dir / "blobs"
    store.mkdir()
    (store / ".huggingface-shared-blobs").write_text("1\n")
    xet = "ef" * 32
    payload = store / xet[:2] / xet
    payload.parent.mkdir()
    entry = cache_dir / "models--lab--tiny-model" / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()
    os.replace(entry, payload)
    entry.symlink_to(os.path.relpath(payload, entry.parent))
    stray = "aa" * 32  # a store payload no repo points to any more
    (store / "aa").mkdir()
    (store / "aa" / stray).write_bytes(b"z" * 50)

    inv = scan_model_cache(cache_dir, used={TINY: {lab_cache["second"]}, OTHER: {lab_cache["other"]}})

    assert inv.warnings == []
    w = next(f for f in inv.files if f["path"] == "model.safetensors" and f["repo_id"] == TINY)
    assert w["blob_path"] == str(entry) and w["hash"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert w["size"] == len(WEIGHTS)
    unique = len(CONFIG_1) + len(CONFIG_2) + len(WEIGHTS) + len(VOCAB) + len(OTHER_WEIGHTS)
    assert inv.snapshot_bytes == unique and inv.total_bytes == unique + 50
    assert inv.orphaned_blobs == [{"path": str(store / "aa" / stray), "bytes": 50, "hash": stray, "last_modified": ANY}]
    assert [r["bytes"] for r in inv.unused_revisions] == [len(CONFIG_1)]
