"""Snapshots with the real rsync on real files: what goes in, what stays out, links, crashes, space, retention."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from idp_pipelines.backup import BackupError, Target
from idp_pipelines.backup.errors import FlushError
from idp_pipelines.backup.retention import plan_retention
from idp_pipelines.backup import seed as seed_module
from idp_pipelines.backup import snapshot as snapshot_module
from idp_pipelines.backup.seed import seed
from idp_pipelines.backup.snapshot import EXCLUDES, is_content, make_snapshot, snapshot_name
from idp_pipelines.backup.target import PARTIAL_SUFFIX
from idp_pipelines.backup.verify import cache_content, coverage, snapshot_files
from tests.backup.conftest import (
    SNAPSHOT_SCRIPT, SPARSE_BYTES, after_reboot, ext4_volume, make_cache, power_cut, running, tree,
)


def _snap(cache, target, tmp_path, **kw):
    return make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock", **kw)


def test_first_snapshot_is_the_cache_with_links_kept_and_work_files_left_out(cache, target, tmp_path):
    # a name rsync escapes in its list of files (space, newline, a byte that is not UTF-8): still copied by cp
    odd = cache.path / "gguf" / "tiny" / os.fsdecode(b"odd name\n\xff.gguf")
    odd.write_bytes(os.urandom(3000))
    (cache.path / "gguf" / "empty").mkdir()  # an empty content folder is in the snapshot too
    # content folders with a mode and an old time of their own: cp fills them, so the backup sets both
    old = time.time() - 86_400
    for d in [p for p in cache.path.rglob("*") if p.is_dir() and not p.is_symlink()] + [cache.path]:
        os.utime(d, (old, old))
    os.chmod(cache.path / "gguf" / "tiny", 0o750)
    src = tree(cache.path)
    logs: list[str] = []
    result = _snap(cache, target, tmp_path, log=logs.append)
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
    # a folder on this host: cp copied the content (backup/seed.py), rsync made the rest (refs, the verified
    # record, the symlinks); no staging folder is left
    content = [r for r in got if got[r][0] == "f" and ("/blobs/" in r or r.startswith("gguf/"))]
    assert result.cp_copied == len(content) and result.files_sent > len(content)
    assert not [r for r in got if ".idp-seed" in r]
    # rsync's pass left the content folders out (a first snapshot: nothing to link to or delete) ...
    assert any("rsync's pass leaves the content folders out" in m for m in logs), logs
    # ... and the snapshot is what rsync alone would have made: it finds nothing to change (folder modes and
    # times included)
    assert _rsync_would_change(cache.path, snap) == []


def _rsync_would_change(cache_dir: Path, snap: Path) -> list[str]:
    """What `rsync -a` with the backup's filters would still create, change or delete in `snap` (times of
    folders included: no --omit-dir-times)."""
    out = subprocess.run(["rsync", "-a", "--delete", "--dry-run", "--itemize-changes",
                          *(f"--filter={rule}" for rule in EXCLUDES), f"{cache_dir}/", f"{snap}/"],
                         capture_output=True, check=True).stdout
    return [line for line in os.fsdecode(out).splitlines() if line.strip()]


def test_a_symlink_among_the_content_is_in_the_first_snapshot(cache, target, tmp_path):
    """cp copies only the content's files; anything else there (a blob kept in a shared store and linked)
    is left to rsync's pass over the content, which is then not skipped."""
    out = cache.path / "gguf" / "tiny" / cache.sha[:12]
    (out / "latest.gguf").symlink_to("tiny.Q8_0.gguf")
    result = _snap(cache, target, tmp_path)
    snap = Path(target.path) / result.name / "cache"
    assert os.readlink(snap / out.relative_to(cache.path) / "latest.gguf") == "tiny.Q8_0.gguf"
    assert result.cp_copied > 0 and _rsync_would_change(cache.path, snap) == []


def test_a_download_that_finishes_during_the_first_copy_leaves_no_dangling_link(cache, target, tmp_path,
                                                                              monkeypatch):
    """A blob that lands after the dry run (not copied by cp) whose symlink rsync's pass then finds: rsync
    walks the content too, so the first snapshot has the blob its link points at."""
    repo = cache.path / cache.blob_lfs.split("/blobs/")[0]
    data = os.urandom(5000)
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    link = repo / "snapshots" / cache.sha / "late.safetensors"
    real = snapshot_module.seed

    def seed_while_a_download_finishes(*args, **kwargs):
        blob.write_bytes(data)  # huggingface_hub: the blob first, then the link
        link.symlink_to(f"../../blobs/{blob.name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot_module, "seed", seed_while_a_download_finishes)
    logs: list[str] = []
    result = _snap(cache, target, tmp_path, log=logs.append)
    snap = Path(target.path) / result.name / "cache"
    rel = link.relative_to(cache.path)
    assert (snap / rel).read_bytes() == data  # the link resolves, in the snapshot itself
    assert any("symlinks point at content the dry run did not list" in m for m in logs), logs
    assert _rsync_would_change(cache.path, snap) == []


def test_a_copy_without_the_cache_time_is_never_put_in_place(cache, target, tmp_path, monkeypatch):
    """A staged copy that does not carry the cache's modification time (here a cp that does not keep it) is
    never renamed into place: rsync copies those files, and the snapshot is still right."""
    old = time.time() - 86_400
    for p in cache.path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.utime(p, (old, old))
    monkeypatch.setattr(seed_module, "CP", [a for a in seed_module.CP if not a.startswith("--preserve")]
                        + ["--preserve=mode,ownership"])
    result = _snap(cache, target, tmp_path)
    assert result.cp_copied == 0
    snap = Path(target.path) / result.name / "cache"
    assert _rsync_would_change(cache.path, snap) == [] and not (snap / ".idp-seed").exists()


@pytest.fixture
def whole_seconds(tmp_path):
    """An ext4 volume with 128-byte inodes, which keep modification times in whole seconds (an ext4 made by an
    old mkfs, ext3): a NAS disk of that kind as the target."""
    with ext4_volume(tmp_path, "old-disk", "-I", "128") as (_, mnt):
        yield mnt


@pytest.mark.parametrize("cut_at", ["the rename", "the run's end"])
def test_a_power_cut_after_the_rename_or_the_run_finds_the_snapshot_whole(cache, tmp_path, monkeypatch, cut_at):
    """A snapshot named complete is on the disk with all its bytes, and a run that returned left it there.
    ext4 writes a new file's data up to 30 s later and can put a rename on disk first: without the flush before
    the rename, a power cut right after it (its folder forced to disk, as the journal may do at any moment)
    finds a complete snapshot of empty files; without the flush after it, a cut as the run returns finds
    only the .partial."""
    real_rename, cuts = Target.rename, []
    with ext4_volume(tmp_path, "nas-disk") as (image, mnt):
        def rename_then_power_cut(self, old, new):
            real_rename(self, old, new)
            if old.endswith(PARTIAL_SUFFIX):
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)  # the rename on the disk (the journal committed), the files' data not forced
                finally:
                    os.close(fd)
                cuts.append(power_cut(image, "cut"))

        if cut_at == "the rename":
            monkeypatch.setattr(Target, "rename", rename_then_power_cut)
        target = Target(str(mnt / "backup"))
        result = _snap(cache, target, tmp_path)
        if cut_at == "the run's end":
            cuts.append(power_cut(image, "cut"))
        expected = tree(Path(target.path) / result.name)
        assert expected[f"cache/{cache.blob_lfs}"][0] == "f" and expected["idp-manifest.json"][0] == "f"
    (cut,) = cuts
    with after_reboot(cut) as disk:
        assert sorted(p.name for p in (disk / "backup").iterdir()) == [result.name]
        assert tree(disk / "backup" / result.name) == expected


def test_cp_copies_onto_a_target_that_keeps_whole_seconds(cache, whole_seconds, tmp_path):
    """The staged copy's time is the cache's truncated to the second: as good as rsync's copy (rsync compares
    times to the second), so it is put in place, not copied twice."""
    for p in cache.path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.utime(p, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    target = Target(str(whole_seconds / "backup"))
    result = _snap(cache, target, tmp_path)
    snap = Path(target.path) / result.name / "cache"
    assert (snap / cache.blob_lfs).stat().st_mtime_ns == 1_700_000_000_000_000_000  # the volume keeps seconds
    content = [r for r, info in tree(snap).items() if info[0] == "f" and is_content(r)]
    assert result.cp_copied == len(content) > 0 and _rsync_would_change(cache.path, snap) == []


def test_a_second_snapshot_links_unchanged_files_and_copies_only_what_is_new(hub, cache, target, tmp_path):
    first = _snap(cache, target, tmp_path, now=datetime(2026, 11, 1, 4, tzinfo=timezone.utc))
    new = cache.path / "gguf" / "tiny" / cache.sha[:12] / "tiny.Q4_0.gguf"
    new.write_bytes(os.urandom(50_000))
    second = _snap(cache, target, tmp_path, now=datetime(2026, 11, 2, 4, tzinfo=timezone.utc))
    assert target.snapshots() == [first.name, second.name] and second.previous == first.name
    assert second.files_sent == 1 and second.bytes_sent == 50_000 and second.cp_copied == 1
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


def test_sigkill_mid_copy_then_a_rerun_leaves_one_complete_snapshot(hub, tmp_path):
    cache = make_cache(hub, tmp_path, weights=400_000, sparse_bytes=1024 * 1024)
    extra = cache.path / "gguf" / "tiny" / "many"
    extra.mkdir()
    part = 2 * 1024 * 1024  # 48 MB in all, at 1 MB/s: killed after 3 parts, what is left takes over 40 s
    for i in range(24):
        (extra / f"part-{i:02}.gguf").write_bytes(os.urandom(part))
    target_dir = tmp_path / "nas"
    proc = subprocess.Popen([sys.executable, "-c", SNAPSHOT_SCRIPT, str(cache.path), str(target_dir),
                             str(tmp_path / "backup.lock"), "1024"], env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                            start_new_session=False)
    children: list[psutil.Process] = []
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
        rsyncs = []
        for c in children:
            with contextlib.suppress(psutil.NoSuchProcess):  # a flush of the target (`sync -f`) that just ended
                if c.name() == "rsync":
                    rsyncs.append(c)
        assert rsyncs
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # at the bandwidth limit what is left takes over 40 s: an rsync still writing would still be there
        psutil.wait_procs(rsyncs, timeout=30)
        assert not [c for c in rsyncs if running(c)], \
            "rsync went on writing after the backup was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # a flush of the target the killed backup started ends on its own (a zombie is init's to reap)
        deadline = time.monotonic() + 300
        while [c for c in children if running(c)] and time.monotonic() < deadline:
            time.sleep(0.1)
    (partial,) = [p.name for p in target_dir.iterdir()]
    assert partial.endswith(".partial")  # killed: no snapshot claims to be complete
    target = Target(str(target_dir))
    assert target.snapshots() == []

    result = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock")
    assert result.resumed == partial
    assert [p.name for p in target_dir.iterdir()] == [result.name]  # one complete snapshot, no partial
    total = sum(cache_content(cache.path).values())
    assert result.bytes_sent < total - 3 * part  # what the killed run copied was kept
    src, got = tree(cache.path), tree(target_dir / result.name / "cache")
    for rel, info in src.items():
        if not rel.endswith((".tmp", ".lock")):
            assert got.get(rel) == info, rel  # nothing lost, nothing half-written


_KILL_WHILE_COPYING = """
import os, sys
from pathlib import Path
from idp_pipelines.backup import Target
from idp_pipelines.backup import seed
from idp_pipelines.backup.snapshot import make_snapshot

seed.BATCH_FILES = 2
# the third batch: cp copies it, then its last file is cut to half (cp was writing it) and the power goes
# (SIGKILL of the backup's process, as a power cut would land: while its worker waits for the copy). The
# file is the batch's own: no other worker copies it meanwhile.
CUT = '"$0" "$@" && for f; do :; done && head -c $(($(stat -c %s "$CACHE_DIR/$f") / 2)) ' \\
      '"$CACHE_DIR/$f" > "$STAGED/$f" && echo $$ > "$PIDFILE" && kill -KILL $PPID; exec sleep 60'
calls = []
real = seed._Copier.copy

def copy(self, folder, files):
    calls.append(folder)
    if len(calls) == 3:
        os.environ.update(CACHE_DIR=os.path.join(self.src, folder), STAGED=os.path.join(self.dest, seed.STAGING, folder),
                          PIDFILE=sys.argv[4])
        seed.CP = ["sh", "-c", CUT, *seed.CP]
    return real(self, folder, files)

seed._Copier.copy = copy
make_snapshot(Path(sys.argv[1]), Target(sys.argv[2]), lock_path=Path(sys.argv[3]))
"""


def test_sigkill_while_cp_copies_then_a_rerun_leaves_one_complete_snapshot(hub, tmp_path):
    cache = make_cache(hub, tmp_path, weights=400_000, sparse_bytes=1024 * 1024)
    extra = cache.path / "gguf" / "tiny" / "many"
    extra.mkdir()
    for i in range(24):
        (extra / f"part-{i:02}.gguf").write_bytes(os.urandom(1024 * 1024 + i))
    target_dir = tmp_path / "nas"
    pidfile = tmp_path / "cut.pid"
    proc = subprocess.run([sys.executable, "-c", _KILL_WHILE_COPYING, str(cache.path), str(target_dir),
                           str(tmp_path / "backup.lock"), str(pidfile)],
                          env={**os.environ, "PYTHONPATH": str(Path.cwd())}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # the copying process (its `sleep 60` after the kill) died with the backup (a parent-death signal)
    cut_pid = int(pidfile.read_text())
    with contextlib.suppress(psutil.NoSuchProcess):
        cut = psutil.Process(cut_pid)
        gone, alive = psutil.wait_procs([cut], timeout=30)
        if alive:
            cut.kill()
        assert not alive, "the copy went on after the backup was killed"
    (partial,) = [p.name for p in target_dir.iterdir()]
    assert partial.endswith(".partial") and Target(str(target_dir)).snapshots() == []
    # the file the kill cut short lies in the staging folder, never under its own name
    staged = target_dir / partial / "cache" / ".idp-seed"
    cuts = {p.relative_to(staged): p.stat().st_size for p in staged.rglob("*") if p.is_file()}
    full = {rel: (cache.path / rel).stat().st_size for rel in cuts}
    assert any(cuts[rel] == full[rel] // 2 for rel in cuts), cuts
    assert not [rel for rel in cuts if cuts[rel] < full[rel] and (target_dir / partial / "cache" / rel).exists()]
    # every file under its own name is whole, with the cache's content, mode and time (rsync compares
    # times only to the second: a whole copy with the copying time would pass for up to date)
    src, partial_tree = tree(cache.path), tree(target_dir / partial / "cache")
    whole = [rel for rel in partial_tree if partial_tree[rel][0] == "f" and not rel.startswith(".idp-seed/")]
    assert whole and all(partial_tree[rel] == src[rel] for rel in whole)

    target = Target(str(target_dir))
    result = make_snapshot(cache.path, target, lock_path=tmp_path / "backup.lock")
    assert result.resumed == partial and result.cp_copied == 0  # continuing a partial: rsync alone
    assert [p.name for p in target_dir.iterdir()] == [result.name]  # one complete snapshot, no partial
    src, got = tree(cache.path), tree(target_dir / result.name / "cache")
    for rel, info in src.items():
        if not rel.endswith((".tmp", ".lock")):
            assert got.get(rel) == info, rel  # nothing lost, nothing half-written, the cut file copied again
    assert not [rel for rel in got if ".idp-seed" in rel]  # the leftover went with the rerun's --delete


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


def test_cp_keeps_holes_where_the_cache_has_them(tmp_path):
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
    assert sorted(os.listdir(dest)) == sorted([*layouts, "dense.gguf"])  # no staging folder left


def test_a_stop_kills_the_running_copies_and_leaves_no_half_file(tmp_path, monkeypatch):
    """The run cancelled (here: its progress report raises) while cp copies: the copies stop, nothing half
    copied is under its name and the staging folder is gone."""
    src, dest = tmp_path / "cache", tmp_path / "nas"
    src.mkdir()
    for i in range(6):
        (src / f"part-{i}.gguf").write_bytes(os.urandom(100_000 + i))
    pids, first = tmp_path / "pids", tmp_path / "first"
    # one batch is copied; every other one hangs in a cp that never ends (a slow NAS), its pid noted
    monkeypatch.setattr(seed_module, "BATCH_FILES", 1)
    monkeypatch.setattr(seed_module, "CP", ["sh", "-c", f'if mkdir {first} 2>/dev/null; then exec "$0" "$@"; fi; '
                                                        f'echo $$ >> {pids}; exec sleep 3600', *seed_module.CP])

    def progress(done, total, message):  # the run is cancelled once one batch is in and another hangs
        for _ in range(600):
            if pids.exists() and pids.read_text().strip():
                break
            time.sleep(0.1)
        raise KeyboardInterrupt("the run was cancelled")

    with pytest.raises(KeyboardInterrupt):
        seed(src, dest, sorted(p.name for p in src.iterdir()), progress=progress)
    hung = [int(pid) for pid in pids.read_text().split()]
    assert hung and not [pid for pid in hung if psutil.pid_exists(pid)
                         and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    (copied,) = os.listdir(dest)  # the one whole file, no staging folder
    assert (dest / copied).read_bytes() == (src / copied).read_bytes()


def test_a_large_file_shows_progress_while_it_is_copied(tmp_path, monkeypatch):
    """A GGUF of gigabytes is a batch of its own: its progress comes from its staged size, not only at its end.
    A slow NAS stands in for cp here: eight 1 MB chunks, half a second apart, then the cache's time."""
    src, dest = tmp_path / "cache", tmp_path / "nas"
    src.mkdir()
    (src / "model.gguf").write_bytes(os.urandom(8 << 20))
    slow = ('while [ "$1" != "-t" ]; do shift; done; dir=$2; shift 3; for f; do i=0; while [ $i -lt 8 ]; do '
            'dd if="$f" of="$dir/$f" bs=1M skip=$i seek=$i count=1 conv=notrunc status=none; sleep 0.5; '
            'i=$((i + 1)); done; touch -r "$f" "$dir/$f"; done')
    monkeypatch.setattr(seed_module, "CP", ["sh", "-c", slow, "sh", *seed_module.CP])
    reports: list[int] = []
    result = seed(src, dest, ["model.gguf"], total_bytes=8 << 20, progress=lambda done, total, m: reports.append(done))
    assert (result.files, result.left) == (1, 0)
    assert (dest / "model.gguf").read_bytes() == (src / "model.gguf").read_bytes()
    assert [d for d in reports if 0 < d < 8 << 20], reports  # part-way figures before the end
    assert reports == sorted(reports) and reports[-1] == 8 << 20


@pytest.mark.parametrize("how", ["cp fails", "cp leaves the mode"])
def test_a_copy_cp_did_not_finish_is_never_put_in_place(cache, target, tmp_path, monkeypatch, how):
    """cp sets a file's time before its owner and mode: a cp that fails (a root-squashed NFS share refusing
    chown) or is killed at its last step leaves a whole copy with the cache's time that is 0600. Such a copy
    is never put in place: rsync copies those files and the snapshot has the cache's modes."""
    for p in cache.path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(0o644)
    after = {"cp fails": "exit 1", "cp leaves the mode": 'while [ "$1" != "-t" ]; do shift; done; chmod 600 "$2"/*'}
    monkeypatch.setattr(seed_module, "CP", ["sh", "-c", f'"$0" "$@"; {after[how]}', *seed_module.CP])
    result = _snap(cache, target, tmp_path)
    snap = Path(target.path) / result.name / "cache"
    assert result.cp_copied == 0 and (snap / cache.blob_lfs).stat().st_mode & 0o777 == 0o644
    assert _rsync_would_change(cache.path, snap) == []


def test_a_link_the_cache_itself_leaves_dangling_is_copied_as_it_is(cache, target, tmp_path):
    """A blob deleted by hand: its snapshot link dangles in the cache, and in the snapshot, with no extra pass
    of rsync over the content for it (that pass is for blobs that landed during the copy)."""
    link = cache.path / Path(cache.snapshot_link).parent / "gone.safetensors"
    link.symlink_to("../../blobs/" + "0" * 64)
    logs: list[str] = []
    result = _snap(cache, target, tmp_path, log=logs.append)
    snap = Path(target.path) / result.name / "cache"
    assert os.readlink(snap / link.relative_to(cache.path)) == "../../blobs/" + "0" * 64
    assert any("rsync's pass leaves the content folders out" in m for m in logs), logs
    assert not any("symlinks point at content" in m for m in logs), logs


def test_a_staging_folder_that_stays_is_removed_by_rsync(cache, target, tmp_path, monkeypatch):
    """A staging folder seed could not remove: rsync's pass over everything removes it (--delete), also
    where a rule that shields content folders would match it (a top-level blobs/ folder in the cache)."""
    (cache.path / "blobs").mkdir()
    (cache.path / "blobs" / "shared-blob").write_bytes(os.urandom(1000))
    monkeypatch.setattr(seed_module.shutil, "rmtree", lambda *a, **k: None)
    result = _snap(cache, target, tmp_path)
    snap = Path(target.path) / result.name / "cache"
    assert result.cp_copied > 0 and not (snap / ".idp-seed").exists()
    assert _rsync_would_change(cache.path, snap) == []


def test_the_copy_reaches_the_disk_while_the_snapshot_is_made(cache, tmp_path, monkeypatch):
    """The target is flushed while the snapshot is copied, not only before the rename: a power cut as rsync's
    pass starts finds what cp copied before it on the disk (a first snapshot of 500 GB does not wait in the
    page cache for its flush). The pass waits for a flush that starts after cp finished; without the flusher
    none comes and the test fails at its deadline."""
    syncs: list[tuple[float, float]] = []
    changed = threading.Condition()
    real_sync, real_rsync = Target.sync, snapshot_module.run_rsync

    def sync(self, sub=""):
        start = time.monotonic()
        real_sync(self, sub)
        with changed:
            syncs.append((start, time.monotonic()))
            changed.notify_all()

    cuts = []

    def rsync_after_a_flush(argv, **kw):
        if "--dry-run" not in argv and not cuts:  # the first pass after cp's copy
            after = time.monotonic()
            with changed:
                assert changed.wait_for(lambda: any(s >= after for s, _ in syncs), timeout=120), \
                    "no flush of the target while the snapshot was copied"
            cuts.append(power_cut(image, "cut-during-rsync"))
        return real_rsync(argv, **kw)

    monkeypatch.setattr(Target, "sync", sync)
    monkeypatch.setattr(snapshot_module, "run_rsync", rsync_after_a_flush)
    monkeypatch.setattr(snapshot_module._Flusher, "DIRTY_BYTES", 0)  # this cache is far below 64 MB
    with ext4_volume(tmp_path, "nas-disk") as (image, mnt):
        result = _snap(cache, Target(str(mnt / "backup")), tmp_path)
        copied = {r: info for r, info in tree(mnt / "backup" / result.name / "cache").items()
                  if info[0] == "f" and is_content(r)}  # cp's part
    assert result.cp_copied == len(copied) > 0 and len(cuts) == 1
    with after_reboot(cuts[0]) as disk:
        partial = tree(disk / "backup" / f"{result.name}{PARTIAL_SUFFIX}" / "cache")
        assert {r: partial.get(r) for r in copied} == copied


def test_a_flush_that_fails_while_copying_fails_the_snapshot(cache, target, tmp_path, monkeypatch):
    """The kernel reports a write the disk failed to one flush only: when that is the flush during the copy,
    the snapshot fails on it, naming it, and its partial goes (a file the disk failed to write keeps its size
    and time: a next run continuing it would take it as copied). The next run starts over. A flush that
    cannot run is an error, not a silent fallback."""
    with pytest.raises(BackupError) as err:
        Target(str(tmp_path / "unplugged")).sync()
    assert str(err.value).startswith(f"flushing the target to its disk on {tmp_path / 'unplugged'} failed (exit 75): "
                                     "sync: error opening")
    real_sync, tried = Target.sync, tmp_path / "flush-tried"

    def sync(self, sub=""):
        if threading.current_thread().name == "backup-flush":
            tried.touch()
            raise FlushError("flushing the target to its disk on the NAS failed (exit 75): sync: error syncing "
                             "'x': Input/output error.")
        real_sync(self, sub)

    monkeypatch.setattr(Target, "sync", sync)
    monkeypatch.setattr(snapshot_module._Flusher, "DIRTY_BYTES", 0)
    # cp starts copying once the flusher has tried (so its failure lands while the snapshot copies); bounded
    monkeypatch.setattr(seed_module, "CP", [
        "sh", "-c", f'i=0; while [ ! -e {shlex.quote(str(tried))} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); '
                    'done; exec "$0" "$@"',
        *seed_module.CP])
    with pytest.raises(FlushError) as err:
        _snap(cache, target, tmp_path, now=datetime(2026, 11, 1, 4, tzinfo=timezone.utc))
    assert str(err.value) == (
        "flushing the target to its disk on the NAS failed (exit 75): sync: error syncing 'x': Input/output error. "
        "A file the disk failed to write keeps its size and time, and a next run would take it as copied: "
        "2026-11-01T04-00-00Z.partial is deleted and the next run starts the snapshot over. Fix: check the target's "
        "disk (dmesg, smartctl) and its free space.")
    assert os.listdir(target.path) == []  # no snapshot named complete, no partial a next run would trust
    monkeypatch.setattr(Target, "sync", real_sync)
    again = _snap(cache, target, tmp_path)
    assert again.resumed is None and again.cp_copied > 0 and target.snapshots() == [again.name]
