"""A dated hard-link snapshot of the model cache (and staged state) on the target, made with rsync.

Layout on the target:

    <target>/2026-11-28T04-00-00Z/cache/...        the cache tree, symlinks kept as symlinks
                                 /state/<item>/... the warehouse copy, MLflow store, Dagster storage, keys
                                 /idp-manifest.json what the snapshot holds (written last)
    <target>/2026-11-29T04-00-00Z.partial/         the one being made; renamed into place when complete

Unchanged files are hard links into the newest complete snapshot (`--link-dest`): a daily snapshot of a
500 GB cache costs inodes, not bytes, and every snapshot is a plain tree `cp -a` can restore from.
A snapshot killed midway leaves its `.partial`; the next run continues in it (what it already copied is
kept) and only the rename makes a snapshot complete, so a complete snapshot is never half a copy. The copy
is flushed to the target's disk before the rename (a power cut, not only a killed run, leaves no complete
snapshot of empty files).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from idp_pipelines.backup.errors import BackupError, FlushError
from idp_pipelines.backup.retention import plan_retention
from idp_pipelines.backup.seed import Progress, seed
from idp_pipelines.backup.target import (
    DELETING_SUFFIX, MANIFEST, PARTIAL_SUFFIX, SNAPSHOT_RE, Entry, Target, ensure_tools,
)
from idp_pipelines.locks import file_lock

# Never in a snapshot: work in progress of this project (`.<name>.*.tmp`, atomic_write's `.idp-tmp`) and of
# huggingface_hub (`*.incomplete`), and its per-file download locks. The verified record stays: without
# it a restored cache would be re-hashed whole by the next hub_model.
EXCLUDES = ["- .*.tmp", "- *.idp-tmp", "- *.incomplete",
            "+ /.locks/", "+ /.locks/idp-verified.json", "- /.locks/**"]
# The first pass copies only content (Hub blobs, GGUF outputs); the second adds snapshots/, refs/ and the
# rest, so snapshot symlinks never point at a blob that is not there yet.
CONTENT_FIRST = ["+ /*/", "+ /*/blobs/***", "+ /blobs/***", "+ /gguf/***", "- *"]
# ... and the second leaves the content alone, so no file is scanned twice (and --delete spares it).
CONTENT_DONE = ["- /*/blobs/", "- /blobs/", "- /gguf/"]
# rsync --itemize-changes: one line per created, updated or deleted entry; ">f" is a file it would send
_ITEM = re.compile(rb"^(\*deleting|[<>ch.][fdLDS][.+a-zA-Z?]{9})\s")
_ESCAPE = re.compile(rb"\\#([0-7]{3})")  # rsync writes an unprintable byte of a name as \#ooo


def is_content(rel: str) -> bool:
    """A path CONTENT_FIRST includes: `<repo>/blobs/...`, `blobs/...` or `gguf/...`."""
    parts = rel.split("/")
    return parts[0] in ("blobs", "gguf") or (len(parts) > 2 and parts[1] == "blobs")


def is_content_dir(rel: str) -> bool:
    """A folder CONTENT_DONE leaves out: `<repo>/blobs`, `blobs`, `gguf` or one below them."""
    return is_content(f"{rel}/-")


_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)\s+(\d+:\d\d:\d\d)")
_STATS = {
    "files": re.compile(r"^Number of files: ([\d,]+)", re.M),
    "files_sent": re.compile(r"^Number of regular files transferred: ([\d,]+)", re.M),
    "total_bytes": re.compile(r"^Total file size: ([\d,]+) bytes", re.M),
    "bytes_sent": re.compile(r"^Total transferred file size: ([\d,]+) bytes", re.M),
}


@dataclass
class RsyncStats:
    files: int = 0
    files_sent: int = 0
    total_bytes: int = 0
    bytes_sent: int = 0
    changes: int = 0  # itemized entries (with --itemize-changes)
    to_send: list[str] = field(default_factory=list)  # regular files a dry run would send, relative paths
    new_dirs: list[str] = field(default_factory=list)  # folders a dry run would create, relative paths
    others: list[str] = field(default_factory=list)  # any other itemized entry (a symlink: with its " -> target")

    def add(self, other: RsyncStats) -> None:
        for k in ("files_sent", "bytes_sent"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.files, self.total_bytes = max(self.files, other.files), max(self.total_bytes, other.total_bytes)


@dataclass(frozen=True)
class SnapshotResult:
    name: str
    previous: str | None  # the snapshot unchanged files are hard-linked to
    resumed: str | None  # the partial snapshot this one continued
    files: int  # regular files in the snapshot
    files_sent: int
    bytes_sent: int
    seconds: float
    own_bytes: int  # bytes no other snapshot shares (what this snapshot costs on the target)
    apparent_bytes: int  # the size of everything in it
    free_before: int
    needed: int
    state: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unchanged: bool = False  # nothing changed since `name`, which stays the newest snapshot
    cp_copied: int = 0  # of files_sent, those cp copied before rsync ran (backup/seed.py)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0


def snapshot_name(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def snapshot_time(name: str) -> datetime:
    return datetime.strptime(name.removesuffix(PARTIAL_SUFFIX), "%Y-%m-%dT%H-%M-%SZ").replace(tzinfo=timezone.utc)


def rsync_argv(target: Target, *, filters: list[str], link_dest: str | None, delete: bool,
               dry_run: bool = False) -> list[str]:
    # -a keeps symlinks as symlinks, times and modes; rsync ignores CACHEDIR.TAG, and no option here honours it.
    # --sparse: runs of zeros land as holes, so a sparse file does not fill the target with zeros.
    argv = ["rsync", "-a", "--sparse", "--no-inc-recursive", "--info=progress2", "--stats"]
    if dry_run:
        # folder times are not content: a restaged state folder must not count as a change
        argv += ["--dry-run", "--itemize-changes", "--omit-dir-times"]
    if delete:
        # the destination is this run's own .partial folder: clears what a killed run left that is gone now;
        # excluded paths (the other pass's half of the tree) are spared
        argv.append("--delete")
    if target.bwlimit_kib_s:
        argv.append(f"--bwlimit={target.bwlimit_kib_s}")
    if target.is_ssh:
        argv += ["-e", shlex.join(target.ssh_argv())]
    if link_dest:
        argv.append(f"--link-dest={link_dest}")
    return argv + [f"--filter={rule}" for rule in filters]


def run_rsync(argv: list[str], *, progress: Progress | None = None, label: str = "", total: int = 0) -> RsyncStats:
    """Run rsync, reporting its `--info=progress2` lines; returns its `--stats` figures.

    rsync runs with a parent-death signal: if the backup's process is killed, rsync stops too instead of
    writing on into a .partial folder that the next run is continuing in.
    """
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", *argv], stdout=subprocess.PIPE, stderr=err)
        except FileNotFoundError:
            raise BackupError("setpriv (util-linux) not found. Fix: apt-get install util-linux.") from None
        tail = bytearray()
        items = 0
        sent: list[str] = []
        dirs: list[str] = []
        others: list[str] = []
        buf = b""
        while chunk := proc.stdout.read1(65536):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for line in lines:
                m = _PROGRESS.match(line)
                if m and progress is not None:
                    # rsync counts linked files too: never report more than the dry run said there is to copy
                    done = min(int(m[1].replace(b",", b"")), total) if total else int(m[1].replace(b",", b""))
                    progress(done, total, f"{label}: rsync at {m[2].decode()} %, {m[3].decode()}, "
                                          f"{m[4].decode()} elapsed")
                elif _ITEM.match(line):
                    items += 1
                    if line.startswith(b">f"):
                        sent.append(_name(line))
                    elif line.startswith(b"cd+++++++++"):
                        dirs.append(_name(line).rstrip("/"))
                    else:
                        others.append(_name(line))
                elif not m:
                    tail += line + b"\n"
        tail += buf
        code = proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    text = tail.decode(errors="replace")
    # 24: files vanished while rsync ran (a download finished, a temp file renamed): the rest is complete
    if code not in (0, 24):
        raise BackupError(f"rsync {label} failed (exit {code}): {stderr[-2000:] or text[-2000:]}")
    stats = RsyncStats(changes=items, to_send=sent, new_dirs=dirs, others=others)
    for key, rx in _STATS.items():
        if m := rx.search(text):
            setattr(stats, key, int(m[1].replace(",", "")))
    return stats


def _name(line: bytes) -> str:
    """The path of an itemized file or folder line (`%i %n%L`: `%L`, a link's target, is empty for these)."""
    return os.fsdecode(_ESCAPE.sub(lambda e: bytes([int(e[1], 8)]), line[12:]))


def make_snapshot(cache_dir: Path, target: Target, *, lock_path: Path, margin_bytes: int = 0,
                  state_dir: Path | None = None, keep_daily: int = 7, keep_weekly: int = 4,
                  progress: Progress | None = None, log: Callable[[str], None] = lambda m: None,
                  now: datetime | None = None, lock_timeout_s: float = 3600.0) -> SnapshotResult:
    """One complete snapshot of `cache_dir` (and `state_dir`'s staged copies) on `target`, then retention."""
    ensure_tools("rsync", *(["ssh"] if target.is_ssh else []))
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise BackupError(f"The model cache {cache_dir} does not exist: nothing to back up. Fix: check "
                          "model_cache.path in lab.yaml, or materialise hub_model first.")
    with file_lock(lock_path, timeout_s=lock_timeout_s, what="the backup lock", holder="cache_backup",
                   on_wait=log, error=BackupError,
                   fix="only one backup runs at a time; let the running one finish."):
        return _make_snapshot(cache_dir, target, margin_bytes, state_dir, keep_daily, keep_weekly, progress, log,
                              now or datetime.now(timezone.utc))


def _make_snapshot(cache_dir: Path, target: Target, margin_bytes: int, state_dir: Path | None, keep_daily: int,
                   keep_weekly: int, progress: Progress | None, log: Callable[[str], None],
                   now: datetime) -> SnapshotResult:
    started = time.monotonic()
    has_state = state_dir is not None and state_dir.is_dir()
    # rsync -a gives the copies the owner of the cache, and of the staged state
    owners = [f"{st.st_uid}:{st.st_gid}" for st in [cache_dir.stat(), *([state_dir.stat()] if has_state else [])]]
    target.check_links(list(dict.fromkeys(owners)))
    names = target.names()
    for stale in (n for n in names if n.endswith(DELETING_SUFFIX)):
        log(f"finishing the deletion of {stale} (a run was stopped while deleting it)")
        target.remove_tree(stale)
    complete = [n for n in names if SNAPSHOT_RE.match(n)]
    partials = sorted(n for n in names if n.endswith(PARTIAL_SUFFIX) and SNAPSHOT_RE.match(n[:-len(PARTIAL_SUFFIX)]))
    name = snapshot_name(now)
    while name in complete:  # two runs within one second (tests, a manual run beside the schedule)
        now = datetime.fromtimestamp(now.timestamp() + 1, timezone.utc)
        name = snapshot_name(now)
    previous = complete[-1] if complete else None
    partial = name + PARTIAL_SUFFIX
    resumed = None
    if partials:
        resumed = partials[-1]
        for old in partials[:-1]:
            target.remove_tree(old)
        if resumed != partial:
            target.rename(resumed, partial)
        log(f"continuing the snapshot a stopped run left in {resumed}: what it copied is kept")

    def link(sub: str) -> str | None:
        return target.join(previous, sub) if previous else None

    jobs = [("cache", f"{cache_dir}/", f"{partial}/cache/", link("cache"))]
    if has_state:
        jobs.append(("state", f"{state_dir}/", f"{partial}/state/", link("state")))

    # One dry run against the newest snapshot says what must be copied (for the free-space check) and
    # whether anything changed at all: if nothing did, the newest snapshot already is today's.
    dry: dict[str, RsyncStats] = {}
    for label, src, dest, _link_dest in jobs:
        against = f"{previous}/{label}/" if previous and resumed is None else dest
        dry[label] = run_rsync(rsync_argv(target, filters=EXCLUDES, link_dest=None, delete=True, dry_run=True)
                               + [src, target.remote(against)], label=f"{label} (dry run)")
    changes = sum(d.changes for d in dry.values())
    if previous and resumed is None and changes == 0:
        log(f"nothing changed since snapshot {previous}: it stays the newest (no new snapshot made)")
        return _unchanged(target, previous, complete, keep_daily, keep_weekly, time.monotonic() - started, log)
    needed = sum(d.bytes_sent for d in dry.values())
    free = target.free_bytes()
    if needed + margin_bytes > free:
        raise BackupError(
            f"Not enough space on the backup target {target.describe()}: this snapshot needs {_gb(needed + margin_bytes)} "
            f"({_gb(needed)} to copy + {_gb(margin_bytes)} backup.free_space_margin_gb) and {_gb(free)} is free. "
            "Nothing was copied. Fix: free space on the target (lower backup.keep_daily / keep_weekly), or use a "
            "larger target.")
    log(f"snapshot {name} of {cache_dir} to {target.describe()}: {_gb(needed)} to copy, {_gb(free)} free"
        + (f", unchanged files linked to {previous}" if previous else " (the first snapshot: a full copy)"))
    target.sh('mkdir -p "$1/cache" "$1/state"', target.join(partial), what="creating the snapshot folder")

    # A folder here without a bandwidth limit: cp copies the new files first (backup/seed.py), rsync then
    # finds them up to date. Only against a dry run that compared with the newest complete snapshot:
    # continuing a .partial, the dry run did not see which files rsync will hard-link instead.
    cp_first = not target.is_ssh and not target.bwlimit_kib_s and resumed is None
    # The first snapshot, into an empty .partial: nothing to link to and nothing to delete, so once cp has
    # copied every content file and folder the dry run listed (the folders with the cache's owner, mode and
    # time), rsync's pass leaves the content folders out instead of walking 10 000s of files it would find
    # up to date. Not when the content holds anything else (a symlink into a shared store): rsync makes it.
    # A later snapshot's pass walks the content: that is where it hard-links the unchanged files.
    fresh = cp_first and previous is None
    stats = RsyncStats()
    cp_copied = 0
    skipped_content = False  # the shortcut taken: rsync's pass left the content folders out
    try:
        with _Flusher(target, partial) as flusher:  # the disk writes the snapshot while it is copied
            for label, src, dest, ld in jobs:
                done, by_cp, skipped = _copy_job(label, src, dest, ld, target, dry[label], cp_first, fresh, progress,
                                                  log, flusher.check)
                stats.add(done)
                cp_copied += by_cp
                skipped_content |= skipped

        entries = target.listing(partial)
        if skipped_content and (dangling := _dangling(entries, "cache", cache_dir)):
            # a download finished while cp copied: its blob came after the dry run, its symlink before rsync's
            # pass. rsync walks the content too, so the snapshot holds no link to a blob it lacks.
            log(f"cache: {len(dangling):,} symlinks point at content the dry run did not list (e.g. {dangling[0]}: a "
                "download finished during the copy); rsync copies the content that came since")
            stats.add(run_rsync(rsync_argv(target, filters=EXCLUDES, link_dest=None, delete=True)
                                + [f"{cache_dir}/", target.remote(f"{partial}/cache/")], progress=progress,
                                label="cache (what came during the copy)"))
            entries = target.listing(partial)
        files = [e for e in entries.values() if e.kind == "f"]
        manifest = {
            "name": name, "created": now.isoformat(timespec="seconds"), "previous": previous,
            "cache": str(cache_dir),
            "files": {e.path: e.size for e in files},
            "links": {e.path: e.link_to for e in entries.values() if e.kind == "l"},
        }
        if state_dir is not None and (state_dir / "state-sha256.json").is_file():
            manifest["state_sha256"] = json.loads((state_dir / "state-sha256.json").read_text())
        target.write_file(f"{partial}/{MANIFEST}", json.dumps(manifest, sort_keys=True).encode())
        # A power cut must not leave a snapshot named complete whose files never reached the disk: ext4 and xfs
        # write a new file's data up to 30 s later, and may put the rename on disk first (a complete snapshot of
        # empty files). So the copy is flushed before the rename, and the rename before retention deletes an
        # older snapshot (the newest complete one on disk must be the one kept).
        target.sync(partial)
    except FlushError as exc:
        raise _discard(target, partial, exc, log) from None
    target.rename(partial, name)
    target.sync()
    seconds = time.monotonic() - started

    keep, delete = plan_retention([*complete, name], keep_daily=keep_daily, keep_weekly=keep_weekly)
    for old in delete:
        log(f"retention: deleting snapshot {old} (keeping {keep_daily} daily, {keep_weekly} weekly)")
        target.remove_tree(old)
    return SnapshotResult(
        name=name, previous=previous, resumed=resumed, files=len(files), files_sent=stats.files_sent,
        bytes_sent=stats.bytes_sent, seconds=seconds,
        own_bytes=sum(e.size for e in files if e.links == 1), apparent_bytes=sum(e.size for e in files),
        free_before=free, needed=needed, state=sorted(p.name for p in state_dir.iterdir() if p.is_dir())
        if has_state else [],
        deleted=delete, kept=keep, cp_copied=cp_copied)


class _Flusher:
    """Flushes a local target's filesystem (`Target.sync`) while the snapshot is copied, in a thread of its own,
    each time the host holds DIRTY_BYTES more unwritten data than after its last flush (`Dirty:` in
    /proc/meminfo, read every POLL_S; other programs' dirty data is the baseline, not a reason to flush
    again). The disk writes the copy while cp and rsync work instead of after them, in the flush before the
    rename, and a first snapshot of 500 GB does not pile gigabytes of dirty pages into the host's memory.
    The kernel reports a failed write to one flush only: a failure here is raised by `check()` between the
    copy's steps and on leaving the block. Not over SSH (a connection per flush; the NAS writes back on its
    own)."""

    POLL_S = 0.1
    DIRTY_BYTES = 64 * 1024 * 1024

    def __init__(self, target: Target, sub: str) -> None:
        self.target, self.sub = target, sub
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="backup-flush", daemon=True)
        self.error: Exception | None = None

    def _run(self) -> None:
        try:
            base = _dirty_bytes()
            while not self.stop.wait(self.POLL_S):
                dirty = _dirty_bytes()
                base = min(base, dirty)
                if dirty - base >= self.DIRTY_BYTES:
                    self.target.sync(self.sub)
                    base = _dirty_bytes()
        except Exception as exc:  # noqa: BLE001 - raised in the run's thread by check() and __exit__
            self.error = exc

    def check(self) -> None:
        """Raise what made a flush fail: a FlushError (the disk failed a write), or why it could not run."""
        if isinstance(self.error, FlushError):
            raise self.error
        if self.error is not None:
            raise BackupError(f"Flushing the backup target {self.target.describe()} while copying could not run: "
                              f"{type(self.error).__name__}: {self.error}") from self.error

    def __enter__(self) -> _Flusher:
        if not self.target.is_ssh:
            self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.stop.set()
        if self.thread.is_alive():  # leaving on an error (a cancelled run): not held up by a slow flush
            self.thread.join(timeout=None if exc_type is None else 10)
        if exc is None:
            self.check()
        elif self.error is not None and self.error is not exc:
            exc.add_note(f"A flush of the target failed too: {self.error}")


def _discard(target: Target, partial: str, exc: FlushError, log: Callable[[str], None]) -> FlushError:
    """A flush failed: a file the disk failed to write keeps its size and time, which rsync's next run would take
    as copied (and a next flush would not report the failure again). The partial snapshot goes."""
    try:
        target.remove_tree(partial)
        what = f"{partial} is deleted and the next run starts the snapshot over"
    except BackupError as gone:
        what = f"{partial} could not be deleted ({gone}); delete it, or the next run continues it"
    log(f"the target's disk failed a write: {what}")
    return FlushError(f"{exc} A file the disk failed to write keeps its size and time, and a next run would take it "
                      f"as copied: {what}. Fix: check the target's disk (dmesg, smartctl) and its free space.")


def _dirty_bytes() -> int:
    """Data this host holds that is not on its disks yet (`Dirty:` in /proc/meminfo)."""
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def _copy_job(label: str, src: str, dest: str, ld: str | None, target: Target, dry: RsyncStats, cp_first: bool,
              fresh: bool, progress: Progress | None, log: Callable[[str], None],
              check: Callable[[], None]) -> tuple[RsyncStats, int, bool]:
    """One job of the snapshot (the cache, or the staged state) copied into `dest` of the .partial, as its dry
    run `dry` said: (what was copied, files cp copied, whether rsync's pass left the content folders out)."""
    stats = RsyncStats()
    cp_copied = 0
    skipped_content = False
    # progress over the whole job (both passes of the cache), against what the dry run said to copy
    total, base = dry.bytes_sent, [0]  # bytes of this job done by earlier steps (cp, passes)

    def report(done: int, _total: int, message: str) -> None:
        if progress is not None:
            # below the total until the job says "copied": rsync confirming what cp copied is not
            # a finished copy, and a report at the total is logged as the last one
            progress(min(base[0] + done, max(total - 1, 0)), total, message)

    passes = [("cache content", EXCLUDES + CONTENT_FIRST), ("cache", EXCLUDES + CONTENT_DONE)] \
        if label == "cache" else [(label, EXCLUDES)]
    content = [p for p in dry.to_send if is_content(p)] if label == "cache" else []
    if cp_first and content:
        shortcut = fresh and not any(is_content(p) for p in dry.others)
        dirs = [d for d in dry.new_dirs if is_content_dir(d)] if shortcut else []
        seeded = seed(Path(src), Path(target.join(dest)), content, dirs=dirs, total_bytes=total,
                      progress=report, label=f"{label}: copying")
        stats.files_sent += seeded.files
        cp_copied += seeded.files
        stats.bytes_sent += seeded.bytes
        base[0] += seeded.bytes
        if seeded.left:
            log(f"{label}: {seeded.left:,} files not copied by cp, left to rsync"
                + (f" (first complaint: {seeded.error})" if seeded.error else ""))
        elif shortcut:  # all content is in place, the folders finished: rsync makes the rest
            passes = [(label, EXCLUDES + CONTENT_DONE)]
            skipped_content = True
            log(f"{label}: cp copied all {seeded.files:,} content files; rsync's pass leaves the content "
                "folders out (nothing to link to or delete in a first snapshot)")
        else:  # all new content is in place: no symlink can point at a missing blob
            passes = [(label, EXCLUDES)]
    for what, filters in passes:
        check()  # a flush failed meanwhile: no use copying on
        # --delete: what a stopped run copied that the cache no longer holds (and rsync's own temp files);
        # each pass spares the other's half, which its filters exclude
        done = run_rsync(rsync_argv(target, filters=filters, link_dest=ld, delete=True)
                         + [src, target.remote(dest)], progress=report, label=what, total=total)
        stats.add(done)
        base[0] += done.bytes_sent
    if progress is not None:
        progress(total, total, f"{label}: copied")
    return stats, cp_copied, skipped_content


def _dangling(entries: dict[str, Entry], root: str, source: Path) -> list[str]:
    """Symlinks under `root` whose relative target, inside `root`, is not in `entries` but is in `source` (the
    folder `root` is a copy of): a link the cache itself leaves dangling is copied as it is."""
    out = []
    for e in entries.values():
        if e.kind == "l" and e.path.startswith(f"{root}/") and not e.link_to.startswith("/"):
            to = os.path.normpath(os.path.join(os.path.dirname(e.path), e.link_to))
            if to.startswith(f"{root}/") and to not in entries and os.path.lexists(source / to[len(root) + 1:]):
                out.append(e.path)
    return out


def _unchanged(target: Target, name: str, complete: list[str], keep_daily: int, keep_weekly: int, seconds: float,
               log: Callable[[str], None]) -> SnapshotResult:
    manifest = manifest_of(target, name)
    keep, delete = plan_retention(complete, keep_daily=keep_daily, keep_weekly=keep_weekly)
    for old in delete:
        log(f"retention: deleting snapshot {old} (keeping {keep_daily} daily, {keep_weekly} weekly)")
        target.remove_tree(old)
    return SnapshotResult(
        name=name, previous=manifest.get("previous"), resumed=None, files=len(manifest["files"]), files_sent=0,
        bytes_sent=0, seconds=seconds, own_bytes=0, apparent_bytes=sum(manifest["files"].values()), free_before=0,
        needed=0, state=sorted({p.split("/")[1] for p in manifest["files"] if p.startswith("state/")}),
        deleted=delete, kept=keep, unchanged=True)


def newest(target: Target) -> str | None:
    snaps = target.snapshots()
    return snaps[-1] if snaps else None


def newest_or_fail(target: Target) -> str:
    """The newest complete snapshot; what to do when there is none yet."""
    name = newest(target)
    if name is None:
        raise BackupError(f"No complete snapshot on {target.describe()}. Fix: materialise cache_backup first.")
    return name


def manifest_of(target: Target, name: str) -> dict:
    raw = target.read_file(f"{name}/{MANIFEST}")
    if raw is None:
        raise BackupError(f"Snapshot {name} on {target.describe()} has no {MANIFEST}: it was not made by this "
                          "project, or the file was deleted. Fix: make a new snapshot (materialise cache_backup).")
    return json.loads(raw)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e7 else f"{n / 1e6:,.2f} MB"


__all__ = ["Entry", "SnapshotResult", "make_snapshot", "manifest_of", "newest", "rsync_argv", "run_rsync",
           "snapshot_name", "snapshot_time"]
