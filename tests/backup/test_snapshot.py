"""Snapshots with the real rsync on real files: what goes in, what stays out, links, crashes, space, retention."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from idp_pipelines.backup import BackupError, Target
from idp_pipelines.backup.retention import plan_retention
from idp_pipelines.backup import seed as seed_module
from idp_pipelines.backup.seed import seed
from idp_pipelines.backup.snapshot import make_snapshot, snapshot_name
from idp_pipelines.backup.verify import cache_content, coverage, snapshot_files
from tests.backup.conftest import SPARSE_BYTES, make_cache, tree


def _snap(cache, target, tmp_path, **kw):
    return make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock", **kw)


def test_first_snapshot_is_the_cache_with_links_kept_and_work_files_left_out(cache, target, tmp_path):
    # a name rsync escapes in its list of files (space, newline, a byte that is not UTF-8): still kernel-copied
    odd = cache.path / "gguf" / "tiny" / os.fsdecode(b"odd name\n\xff.gguf")
    odd.write_bytes(os.urandom(3000))
    src = tree(cache.path)
    result = _snap(cache, target, tmp_path)
    assert target.snapshots() == [result.name] and result.previous is None
    snap = Path(target.path) / result.name / "cache"
    got = tree(snap)
    # a symlink stays a symlink, pointing where it pointed (relative, into blobs/)
    assert got[cache.snapshot_link] == src[cache.snapshot_link] and got[cache.snapshot_link][0] == "l"
    assert (snap / cache.snapshot_link).resolve().read_bytes() == (cache.path / cache.blob_lfs).read_bytes()
    # content, modes and modification times as in the cache
    for rel in (cache.blob_lfs, cache.blob_git, *cache.gguf, ".locks/idp-verified.json"):
        assert got[rel] == src[rel], rel
    # the sparse GGUF file: whole, and as sparse on the target as in the cache (not 64 MB of zeros)
    sparse = Path("gguf/tiny") / cache.sha[:12] / "tiny.F16.gguf"
    assert got[str(sparse)] == src[str(sparse)] and (snap / sparse).stat().st_size == SPARSE_BYTES
    assert (snap / sparse).stat().st_blocks <= (cache.path / sparse).stat().st_blocks + 64
    # never: a work file in progress, huggingface_hub's download locks
    left_out = {rel for rel in src if rel not in got}
    locks = {rel for rel in left_out if rel.startswith(".locks/models--lab--tiny-model/") and rel.endswith(".lock")}
    assert left_out - locks == {f"gguf/tiny/{cache.sha[:12]}/.tiny.Q4_K_M.gguf.12345.tmp"} and len(locks) >= 2
    # the CACHEDIR.TAG in the cache changed nothing: every blob and GGUF file is there, same size
    assert (cache.path / "CACHEDIR.TAG").exists()
    assert coverage(cache_content(cache.path), snapshot_files(target, result.name)) == []
    assert result.files_sent == len([r for r in got if got[r][0] == "f"]) and result.own_bytes == result.apparent_bytes
    assert result.bytes_sent == result.apparent_bytes and not list(Path(target.path).glob("*.partial"))
    # a folder on this host: the kernel copied the content (backup/seed.py), rsync found it up to date and
    # copied the rest (refs, the verified record)
    content = [r for r in got if got[r][0] == "f" and ("/blobs/" in r or r.startswith("gguf/"))]
    assert result.kernel_copied == len(content) and result.files_sent > len(content)


def test_a_second_snapshot_links_unchanged_files_and_copies_only_what_is_new(hub, cache, target, tmp_path):
    first = _snap(cache, target, tmp_path, now=datetime(2026, 11, 1, 4, tzinfo=timezone.utc))
    new = cache.path / "gguf" / "tiny" / cache.sha[:12] / "tiny.Q4_0.gguf"
    new.write_bytes(os.urandom(50_000))
    second = _snap(cache, target, tmp_path, now=datetime(2026, 11, 2, 4, tzinfo=timezone.utc))
    assert target.snapshots() == [first.name, second.name] and second.previous == first.name
    assert second.files_sent == 1 and second.bytes_sent == 50_000 and second.kernel_copied == 1
    assert second.own_bytes == 50_000 and second.apparent_bytes == first.apparent_bytes + 50_000
    a, b = (Path(target.path) / n / "cache" / cache.blob_lfs for n in (first.name, second.name))
    assert a.stat().st_ino == b.stat().st_ino  # a hard link: the unchanged blob costs an inode, not bytes


def test_a_run_with_nothing_changed_keeps_the_newest_snapshot_as_it_is(cache, target, tmp_path):
    first = _snap(cache, target, tmp_path, now=datetime(2026, 11, 1, 4, tzinfo=timezone.utc))
    # a new download lock and a work file in progress are not changes of what is backed up
    (cache.path / ".locks" / "models--lab--tiny-model" / "y.lock").write_text("")
    (cache.path / "gguf" / ".new.gguf.1.tmp").write_text("x")
    again = _snap(cache, target, tmp_path, now=datetime(2026, 11, 2, 4, tzinfo=timezone.utc))
    assert again.unchanged and again.name == first.name and target.snapshots() == [first.name]
    assert again.files_sent == 0 and again.files == first.files and again.apparent_bytes == first.apparent_bytes


def test_coverage_names_a_blob_the_snapshot_lacks(cache, target, tmp_path):
    result = _snap(cache, target, tmp_path)
    snap = Path(target.path) / result.name / "cache"
    (snap / cache.blob_lfs).unlink()
    q8 = next(iter(cache.gguf))
    os.truncate(snap / q8, 199_999)
    gaps = coverage(cache_content(cache.path), snapshot_files(target, result.name))
    assert [(g["file"], g["problem"]) for g in gaps] == [
        (q8, "199999 bytes in the snapshot, 200004 in the cache"), (cache.blob_lfs, "not in the snapshot")]


_KILL_SCRIPT = """
import sys
from pathlib import Path
from idp_pipelines.backup import Target
from idp_pipelines.backup.snapshot import make_snapshot
make_snapshot(Path(sys.argv[1]), Target(sys.argv[2], bwlimit_kib_s=int(sys.argv[3])), lock_path=Path(sys.argv[4]))
"""


def test_sigkill_mid_copy_then_a_rerun_leaves_one_complete_snapshot(hub, tmp_path):
    cache = make_cache(hub, tmp_path, weights=400_000, sparse_bytes=1024 * 1024)
    extra = cache.path / "gguf" / "tiny" / "many"
    extra.mkdir()
    for i in range(24):
        (extra / f"part-{i:02}.gguf").write_bytes(os.urandom(256 * 1024))
    target_dir = tmp_path / "nas"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(cache.path), str(target_dir), "1024",
                             str(tmp_path / "backup.lock")], env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                            start_new_session=False)
    try:
        deadline = time.monotonic() + 120
        copied = 0
        while time.monotonic() < deadline and proc.poll() is None:
            copied = sum(1 for _ in target_dir.glob("*.partial/cache/gguf/tiny/many/part-*"))
            if copied >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None and copied >= 3, f"the backup never got mid-copy (exit {proc.poll()})"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.name() == "rsync" for c in children)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        psutil.wait_procs(children, timeout=30)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], \
            "rsync went on writing after the backup was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (partial,) = [p.name for p in target_dir.iterdir()]
    assert partial.endswith(".partial")  # killed: no snapshot claims to be complete
    target = Target(str(target_dir))
    assert target.snapshots() == []

    result = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock")
    assert result.resumed == partial
    assert [p.name for p in target_dir.iterdir()] == [result.name]  # one complete snapshot, no partial
    total = sum(cache_content(cache.path).values())
    assert result.bytes_sent < total - 3 * 256 * 1024  # what the killed run copied was kept
    src, got = tree(cache.path), tree(target_dir / result.name / "cache")
    for rel, info in src.items():
        if not rel.endswith((".tmp", ".lock")):
            assert got.get(rel) == info, rel  # nothing lost, nothing half-written


_KILL_WHILE_COPYING = """
import os, signal, sys, threading
from pathlib import Path
from idp_pipelines.backup import Target
from idp_pipelines.backup import seed
from idp_pipelines.backup.snapshot import make_snapshot

real, lock, big = seed._Copier.copy_bytes, threading.Lock(), []

def copy_bytes(self, fin, fout, size):
    if size >= 1 << 20:
        with lock:
            big.append(size)
            third = len(big) == 3
        if third:  # the third large file: half of its bytes, then the kill, as a power cut would land
            os.copy_file_range(fin, fout, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, fin, fout, size)

seed._Copier.copy_bytes = copy_bytes
make_snapshot(Path(sys.argv[1]), Target(sys.argv[2]), lock_path=Path(sys.argv[3]))
"""


def test_sigkill_while_the_kernel_copies_then_a_rerun_leaves_one_complete_snapshot(hub, tmp_path):
    cache = make_cache(hub, tmp_path, weights=400_000, sparse_bytes=1024 * 1024)
    extra = cache.path / "gguf" / "tiny" / "many"
    extra.mkdir()
    for i in range(24):
        (extra / f"part-{i:02}.gguf").write_bytes(os.urandom(1024 * 1024 + i))
    target_dir = tmp_path / "nas"
    proc = subprocess.run([sys.executable, "-c", _KILL_WHILE_COPYING, str(cache.path), str(target_dir),
                           str(tmp_path / "backup.lock")], env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (partial,) = [p.name for p in target_dir.iterdir()]
    assert partial.endswith(".partial") and Target(str(target_dir)).snapshots() == []
    # the file the kill cut short (and any the other thread was writing) lies under a temporary name beside
    # its place, never under its own name
    cuts = {p: p.parent / p.name.removeprefix(".").removesuffix(".idp-seed")
            for p in (target_dir / partial / "cache").rglob("*.idp-seed")}
    sizes = {p.stat().st_size: (cache.path / o.relative_to(target_dir / partial / "cache")).stat().st_size
             for p, o in cuts.items()}
    assert any(cut == full // 2 for cut, full in sizes.items()) and not any(o.exists() for o in cuts.values())
    # every file under its own name is whole, with the cache's content, mode and time (rsync compares
    # times only to the second: a whole copy with the copying time would pass for up to date)
    src, partial_tree = tree(cache.path), tree(target_dir / partial / "cache")
    whole = [rel for rel in partial_tree if partial_tree[rel][0] == "f" and not rel.endswith(".idp-seed")]
    assert whole and all(partial_tree[rel] == src[rel] for rel in whole)

    target = Target(str(target_dir))
    result = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock")
    assert result.resumed == partial and result.kernel_copied == 0  # continuing a partial: rsync alone
    assert [p.name for p in target_dir.iterdir()] == [result.name]  # one complete snapshot, no partial
    src, got = tree(cache.path), tree(target_dir / result.name / "cache")
    for rel, info in src.items():
        if not rel.endswith((".tmp", ".lock")):
            assert got.get(rel) == info, rel  # nothing lost, nothing half-written, the cut file copied again
    assert not [rel for rel in got if rel.endswith(".idp-seed")]  # the leftover went with the rerun's --delete


@pytest.fixture
def small_target(tmp_path):
    mnt = tmp_path / "small-nas"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_target_without_enough_space_is_refused_before_copying(cache, small_target, tmp_path):
    before = tree(cache.path)
    with pytest.raises(BackupError) as err:
        make_snapshot(cache.path, Target(str(small_target / "backup")), lock_path=tmp_path / "backup.lock",
                      margin_bytes=1_000_000)
    msg = str(err.value)
    assert msg.startswith(f"Not enough space on the backup target {small_target / 'backup'}: this snapshot needs ")
    assert "to copy + 1.00 MB backup.free_space_margin_gb) and 3.1" in msg and "MB is free. Nothing was copied." in msg
    assert [p.name for p in (small_target / "backup").iterdir()] == []  # no snapshot, no partial
    assert tree(cache.path) == before


def test_retention_plan_keeps_the_newest_of_each_day_and_week():
    start = datetime(2026, 10, 1, 4, tzinfo=timezone.utc)  # a Thursday
    names = [snapshot_name(start + timedelta(days=d)) for d in range(30)]
    names.insert(-1, snapshot_name(start + timedelta(days=28, hours=12)))  # two on the 29th
    keep, delete = plan_retention(names, keep_daily=3, keep_weekly=2)
    assert keep == ["2026-10-25T04-00-00Z",  # newest of the week before last (Sunday)
                    "2026-10-28T04-00-00Z", "2026-10-29T16-00-00Z", "2026-10-30T04-00-00Z"]
    assert "2026-10-29T04-00-00Z" in delete and len(keep) + len(delete) == len(names)
    # the newest complete snapshot is never deleted, whatever the numbers
    assert plan_retention(names[:1], keep_daily=1, keep_weekly=0) == (names[:1], [])


def test_retention_on_the_target_keeps_exactly_the_plan(cache, target, tmp_path):
    start = datetime(2026, 10, 1, 4, tzinfo=timezone.utc)
    made = []
    for d in range(9):
        (cache.path / "gguf" / f"day-{d}.gguf").write_bytes(os.urandom(1000))  # something new every day
        made.append(_snap(cache, target, tmp_path, now=start + timedelta(days=d), keep_daily=2, keep_weekly=2).name)
    assert target.snapshots() == plan_retention(made, keep_daily=2, keep_weekly=2)[0] == [
        "2026-10-04T04-00-00Z", "2026-10-08T04-00-00Z", "2026-10-09T04-00-00Z"]
    assert not [n for n in os.listdir(target.path) if not n.startswith("2026-")]


def test_an_invalid_cache_or_an_unreachable_target_says_what_and_where(tmp_path):
    with pytest.raises(BackupError, match=r"The model cache .*/nope does not exist: nothing to back up. Fix: check "
                                          r"model_cache.path in lab.yaml"):
        make_snapshot(tmp_path / "nope", Target(str(tmp_path / "t")), lock_path=tmp_path / "l")
    (tmp_path / "c").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(BackupError, match=r"on .*/file/t failed \(exit 1\): mkdir: cannot create directory"):
        make_snapshot(tmp_path / "c", Target(str(tmp_path / "file" / "t")), lock_path=tmp_path / "l")


def test_the_target_link_check_passes_on_a_linux_filesystem(target):
    target.check_links()  # ext4/tmpfs keep both; the refusal text is asserted in test_checks
    assert not [n for n in os.listdir(target.path) if n.startswith(".idp-linkcheck")]


def test_never_two_backups_at_once(cache, target, tmp_path):
    from idp_pipelines.locks import file_lock

    lock = tmp_path / "backup.lock"
    with file_lock(lock, timeout_s=1, what="the backup lock", fix="-", holder="cache_backup run 1234"):
        with pytest.raises(BackupError) as err:
            make_snapshot(cache.path, target, lock_path=lock, lock_timeout_s=0.5)
    assert str(err.value).startswith(f"Waited 0 s for the backup lock {lock}, held by cache_backup run 1234 (pid ")
    assert str(err.value).endswith("Fix: only one backup runs at a time; let the running one finish.")
    assert target.snapshots() == []


@pytest.mark.parametrize("kernel_call", ["copy_file_range", "sendfile"])
def test_the_kernel_copy_keeps_holes_where_the_cache_has_them(tmp_path, monkeypatch, kernel_call):
    if kernel_call == "sendfile":  # what a local cache to an NFS or FUSE target gets: copy_file_range refused
        def refused(*_a, **_k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refused)
    src, dest = tmp_path / "cache", tmp_path / "nas"
    src.mkdir()
    mb = 1 << 20
    layouts = {  # name -> (offset, bytes) written into an 8 MB file; the rest is holes
        "trailing-hole.gguf": [(0, b"GGUF")],
        "all-hole.gguf": [],
        "holes-between.gguf": [(0, b"GGUF"), (4 * mb, os.urandom(70_000)), (8 * mb - 4, b"tail")],
    }
    for name, parts in layouts.items():
        with (src / name).open("wb") as f:
            for offset, data in parts:
                f.seek(offset)
                f.write(data)
            f.truncate(8 * mb)
    (src / "dense.gguf").write_bytes(os.urandom(mb))
    result = seed(src, dest, sorted(p.name for p in src.iterdir()))
    assert result.files == 4 and result.left == 0 and result.bytes == 3 * 8 * mb + mb
    for p in src.iterdir():
        copy = dest / p.name
        assert copy.read_bytes() == p.read_bytes() and copy.stat().st_mtime_ns == p.stat().st_mtime_ns, p.name
        assert copy.stat().st_blocks <= p.stat().st_blocks + 64, p.name  # no hole filled with zeros
    assert (dest / "all-hole.gguf").stat().st_blocks * 512 < 64 * 1024


def test_a_stop_in_the_middle_of_a_file_leaves_it_to_rsync(tmp_path, monkeypatch):
    """A stop (the run cancelled) between two data segments of a file: never under its name, half copied."""
    src, dest = tmp_path / "cache", tmp_path / "nas"
    src.mkdir()
    mb = 1 << 20
    with (src / "model.gguf").open("wb") as f:  # three data segments with holes between, ending in data
        for offset in (0, 2 * mb, 4 * mb - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    real = seed_module._Copier.copy_range

    def copy_range(self, fin, fout, offset, size):
        got = real(self, fin, fout, offset, size)
        self.stop.set()  # after the first segment
        return got

    monkeypatch.setattr(seed_module._Copier, "copy_range", copy_range)
    result = seed(src, dest, ["model.gguf"])
    assert (result.files, result.left) == (0, 1)
    assert list(dest.iterdir()) == []  # neither the file under its name nor its temporary copy
