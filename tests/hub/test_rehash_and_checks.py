"""The cache's re-hash slice (bit rot in trusted files) and the inventory checks, on real caches and DuckDB."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from idp_pipelines.hub import HubError, download_model
from idp_pipelines.hub.checks import CACHE_COMPLETE, judge_cache, judge_rehash
from idp_pipelines.hub.inventory import scan_model_cache
from idp_pipelines.hub.records import (
    expected_snapshots, last_rehash_cursor, record_cache_scan, record_plan, record_rehash,
)
from idp_pipelines.hub.rehash import rehash_slice
from idp_pipelines.warehouse import Warehouse

REPO = "lab/tiny-model"
FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "model-00001.safetensors": random.Random(1).randbytes(200_000),
    "model-00002.safetensors": random.Random(2).randbytes(150_000),
    "tokenizer.json": b'{"vocab": ["<s>", "</s>"]}\n',
}


@pytest.fixture
def cached(hub, cache_dir):
    sha = hub.create_repo(REPO, FILES)
    return sha, download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)


def test_rehash_covers_the_whole_cache_within_its_period(cached, cache_dir):
    _, result = cached
    seen: list[str] = []
    cursor = None
    for _day in range(3):
        report = rehash_slice(cache_dir, period_days=3, cursor=cursor)
        assert report.findings == [] and report.slice.total_items == 4
        seen += [c["blob"] for c in report.checked]
        cursor = report.slice.cursor
    blobs = {str(f.local_path.resolve().relative_to(cache_dir)) for f in result.files}
    assert set(seen) == blobs


def test_bit_rot_is_found_named_and_repaired_by_the_next_download(hub, cached, cache_dir, tmp_path):
    sha, result = cached
    weights = next(f for f in result.files if f.path == "model-00001.safetensors")
    blob = weights.local_path.resolve()
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[1234] ^= 0x01  # one flipped bit, size and mtime as they were: the verified record still vouches
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    quiet = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url)
    assert quiet.files_hashed == 0 and quiet.repaired_files == ()  # the trusted file is not read: unseen

    report = rehash_slice(cache_dir, period_days=1, cursor=None)  # the whole cache in one slice
    (finding,) = report.findings
    bad = hashlib.sha256(bytes(data)).hexdigest()
    rel = str(blob.relative_to(cache_dir))
    assert finding == {"blob": rel, "expected": weights.hash, "actual": bad, "algo": "sha256", "size": 200_000,
                       "files": [f"{REPO}@{sha[:12]}/model-00001.safetensors"]}
    judged = judge_rehash(report, {REPO: ["tiny"]})
    assert not judged.passed and judged.description == (
        f"re-hashed 4 blob(s), 350.0 kB of 350.0 kB in the cache (every blob within 1 day(s)): 1 mismatch(es) "
        f"(bit rot or an edit behind the cache's back): {REPO}@{sha[:12]}/model-00001.safetensors: expected "
        f"sha256 {weights.hash}, got {bad}. Fix: materialise hub_model for tiny: it re-hashes the file and "
        "fetches a good copy."
    )
    assert blob.read_bytes() == bytes(data)  # reported, not deleted

    warnings: list[str] = []
    repaired = download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, warn=warnings.append)
    assert [f.path for f in repaired.repaired_files] == ["model-00001.safetensors"] and len(warnings) == 1
    assert weights.local_path.read_bytes() == FILES["model-00001.safetensors"]
    assert judge_rehash(rehash_slice(cache_dir, period_days=1, cursor=None), {}).passed

    wh = Warehouse(tmp_path / "wh.duckdb")
    with wh.write() as con:
        record_rehash(con, run_id="r1", report=report)
    with wh.read() as con:
        assert last_rehash_cursor(con, str(cache_dir)) == report.slice.cursor
        row = con.execute("SELECT files, mismatches, period_days, wrapped FROM model_cache_rehashes").fetchone()
    assert row == (4, 1, 1, False)


def test_a_half_downloaded_model_fails_the_inventory_naming_the_missing_files(hub, cache_dir, tmp_path,
                                                                               no_resume_waits):
    sha = hub.create_repo(REPO, FILES)
    hub.drop_connection(REPO, "model-00002.safetensors", times=None)
    wh = Warehouse(tmp_path / "wh.duckdb")

    def on_plan(plan):
        with wh.write() as con:
            record_plan(con, run_id="r1", model="tiny", plan=plan)

    with pytest.raises(HubError):
        download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, on_plan=on_plan, max_workers=1)

    cache = scan_model_cache(cache_dir, used={REPO: {"main"}}, budget_bytes=10**9)
    with wh.write() as con:
        record_cache_scan(con, run_id="r2", cache=cache)
        expected = expected_snapshots(con)
    judged = {j.check: j for j in judge_cache(cache, expected, [("tiny", REPO), ("other", "lab/other")],
                                               "/srv/lab.yaml")}
    complete = judged[CACHE_COMPLETE]
    assert not complete.passed and complete.severity == "ERROR"
    present = {f["path"] for f in cache.files}
    missing = sorted(set(FILES) - present)
    assert "model-00002.safetensors" in missing
    assert complete.description == (
        f"tiny ({REPO}@{sha[:12]}) lacks {len(missing)} of 4 file(s): {', '.join(missing)}. "
        "Fix: materialise hub_model for tiny (a failed or interrupted download)."
    )

    hub.clear_faults()
    download_model(REPO, sha, cache_dir=cache_dir, endpoint=hub.url, on_plan=on_plan)
    cache = scan_model_cache(cache_dir, used={REPO: {"main"}}, budget_bytes=10**9)
    with wh.read() as con:
        expected = expected_snapshots(con)
    ok = {j.check: j for j in judge_cache(cache, expected, [("tiny", REPO), ("other", "lab/other")])}[CACHE_COMPLETE]
    assert ok.passed and ok.description == (
        "every downloaded model holds all its files (1 model(s)); not downloaded yet: other")
