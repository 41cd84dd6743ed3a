"""The content of a snapshot on a local target, copied by GNU cp in parallel before rsync makes the snapshot.

rsync copies a local file through two of its own processes and a socket between them: every byte is
read into one process, written to the socket, read by the other and written out. That costs about
2.2 s of system time per GB here, where `cp -a` (one `copy_file_range` per file, no byte in user space)
needs 0.9 s, so a first snapshot ran at under half of `cp -a`'s speed. For a target that is a folder on
this host (a local disk or a mounted share, with no `--bwlimit`), the files rsync's dry run said it would
send are copied here first by coreutils' `cp`, two processes at once: in-kernel (`copy_file_range`;
between two folders of one btrfs/XFS filesystem a reflink, whose blocks the cache shares), falling back to
read/write where the kernel refuses the pair (a local cache to an NFS or FUSE target), keeping owner,
mode, modification time and holes (`--sparse=auto`). rsync then runs as always and finds them up to
date: it still decides what the snapshot holds (filters, hard links to the previous snapshot, symlinks,
deletions, ownership), and anything not copied here is copied by rsync. (In a first snapshot, rsync's
pass leaves out the content folders filled here: see `snapshot.py`.)

Processes, not threads: this module's own copier, two Python threads calling `copy_file_range`, took as
long with two threads as with one on 10 000 small files (about 1.0 s for 1 GB in memory: the GIL, taken
and given back around a dozen calls per file), where two `cp` processes took 0.39 s.

Safe to kill: `cp` writes into a staging folder (`.idp-seed/` in the job's root, the cache's folders
below it) and runs with a parent-death signal, so it stops with the backup. A file is renamed into its
place only when cp exited 0 for its batch, the staged copy has the cache's size, modification time
(compared to the second, as rsync compares times, so a target that keeps whole seconds loses nothing),
mode and (as root) owner, and the cache's file did not change while it was copied: a file under its
final name is always a whole copy with the cache's time and mode (a whole copy with the copying time
could pass rsync's check for up to date; cp sets the owner and mode after the time, so a cp killed or
refused at its last step leaves a whole file with the cache's time that is 0600 and ours). The
run that continues a killed `.partial` (rsync alone, with `--delete`) removes a leftover staging folder,
which no backup filter shields.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from idp_pipelines.backup.errors import BackupError

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, message)

STAGING = ".idp-seed"  # in the job's root on the target; no backup filter matches it
# as rsync -a: no xattrs, symlinks as symlinks (one difference: --preserve=mode keeps a POSIX ACL, which
# rsync -a does not; a Hugging Face cache has one only under a folder with a default ACL)
CP = ["cp", "--no-dereference", "--preserve=mode,ownership,timestamps", "--sparse=auto", "--reflink=auto"]
BATCH_FILES = 1000  # per cp process: one process start per thousand small files ...
BATCH_BYTES = 256 << 20  # ... and progress at least every 256 MB per worker (a larger file is a batch alone)


@dataclass(frozen=True)
class Seeded:
    files: int  # copied here, complete, with mode and time set
    bytes: int
    left: int  # not copied here (vanished, changed while copied, not a regular file, an error): rsync copies them
    error: str = ""  # cp's first complaint, if any (for the log)


@dataclass(frozen=True)
class _File:
    name: str
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # permission bits
    owner: tuple[int, int]


class _Copier:
    """The state the worker threads share: one queue of batches (a batch is files of one folder), the cp
    processes running, a stop flag and the counts."""

    def __init__(self, src: str, dest: str, batches: list[tuple[str, list[_File]]], workers: int) -> None:
        self.src, self.dest = src, dest
        self.queue = iter(batches)
        self.stop = threading.Event()
        self.changed = threading.Event()
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.counts = [[0, 0, 0] for _ in range(workers)]  # per worker: files, bytes, left to rsync
        self.large: list[tuple[str, _File] | None] = [None] * workers  # per worker: the one large file it copies
        self.seen = [0] * workers  # ... and how much of it was staged when last looked at
        self.errors: list[str] = []
        self.root = os.geteuid() == 0  # the owner is kept (as root) or not (as rsync -a does not either)
        self.failed: list[BaseException] = []

    def work(self, i: int) -> None:
        c = self.counts[i]
        try:
            while not self.stop.is_set():
                batch = next(self.queue, None)  # one C call under the GIL: no two threads get the same batch
                if batch is None:
                    return
                with self.lock:
                    self.large[i] = (batch[0], batch[1][0]) if len(batch[1]) == 1 else None
                    self.seen[i] = 0
                files, done, left = self.copy(*batch)
                with self.lock:  # the counts and the large file together: progress never counts it twice
                    c[0] += files
                    c[1] += done
                    c[2] += left
                    self.large[i] = None
                self.changed.set()
        except BaseException as exc:  # not a failed copy (those are left to rsync): a bug
            self.failed.append(exc)
            self.stop.set()
            self.changed.set()

    def totals(self) -> tuple[int, int, int]:
        return (sum(c[0] for c in self.counts), sum(c[1] for c in self.counts), sum(c[2] for c in self.counts))

    def done(self) -> tuple[int, int]:
        """Files and bytes in place, plus the bytes staged so far of the large files being copied (a batch of
        one file: a GGUF or a shard of gigabytes would otherwise show no progress until it is whole). Never
        less than the last figure: a staged file renamed into place counts what was last seen of it until
        the worker counts it whole."""
        with self.lock:
            files, done, _left = self.totals()
            for i, entry in enumerate(self.large):
                if entry is not None:
                    with contextlib.suppress(OSError):  # not there yet, or just renamed into place
                        staged = os.lstat(os.path.join(self.dest, STAGING, entry[0], entry[1].name)).st_size
                        self.seen[i] = max(self.seen[i], min(staged, entry[1].size))
                    done += self.seen[i]
        return files, done

    def copy(self, folder: str, files: list[_File]) -> tuple[int, int, int]:
        """Copy one folder's batch through the staging folder; (files, bytes) in place, files left to rsync."""
        src = os.path.join(self.src, folder)
        staged = os.path.join(self.dest, STAGING, folder)
        final = os.path.join(self.dest, folder)
        try:
            proc = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", *CP, "-t", staged, "--",
                                     *(f.name for f in files)], cwd=src, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:  # the cache's folder vanished since the dry run
            self.errors.append(f"{folder}: {exc}")
            return 0, 0, len(files)
        with self.lock:
            self.running.add(proc)
            if self.stop.is_set():  # a stop came while this one started: do not wait for it
                proc.kill()
        try:
            err = proc.communicate()[1]
        finally:
            with self.lock:
                self.running.discard(proc)
        # cp sets the time before the owner and the mode: a file it failed on (or was killed at) can have the
        # cache's size and time and still be 0600 and ours. A batch cp did not finish with 0 is rsync's whole.
        finished = proc.returncode == 0
        if not finished:
            self.errors.append(err.decode(errors="replace").strip().splitlines()[0] if err.strip()
                               else f"cp exited {proc.returncode}")
        copied = done = 0
        fds: list[int] = []
        try:
            try:  # the folders by descriptor: no path walked three times per file
                for d in (staged, src, final):
                    fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as exc:
                self.errors.append(f"{folder}: {exc}")
                return 0, 0, len(files)
            fs, fc, ff = fds
            for f in files:
                try:
                    got, now = os.lstat(f.name, dir_fd=fs), os.lstat(f.name, dir_fd=fc)
                    # the cache's time to the second, as rsync compares it: a target that keeps whole seconds
                    # (ext4 with 128-byte inodes) truncates it, and that copy is as good as rsync's
                    if (finished and stat.S_ISREG(got.st_mode) and got.st_size == f.size
                            and got.st_mtime_ns // 10**9 == f.mtime_ns // 10**9
                            and stat.S_IMODE(got.st_mode) == f.mode
                            and (not self.root or (got.st_uid, got.st_gid) == f.owner)
                            and (now.st_size, now.st_mtime_ns, now.st_ctime_ns) == (f.size, f.mtime_ns, f.ctime_ns)):
                        # only now under its name: whole, with the cache's time, mode and owner
                        os.rename(f.name, f.name, src_dir_fd=fs, dst_dir_fd=ff)
                        copied += 1
                        done += f.size
                        continue
                except OSError:
                    pass
                with contextlib.suppress(OSError):  # cut short, unfinished, changed while copied: rsync's
                    os.unlink(f.name, dir_fd=fs)
        finally:
            for fd in fds:
                os.close(fd)
        return copied, done, len(files) - copied

    def kill(self) -> None:
        with self.lock:
            self.stop.set()
            for proc in self.running:
                with contextlib.suppress(OSError):
                    proc.kill()


def _plan(src_root: str, paths: Sequence[str]) -> tuple[list[tuple[str, list[_File]]], int]:
    """Batches of files of one folder (at most BATCH_FILES, or BATCH_BYTES unless one file is larger), and
    how many paths are not regular files now (vanished, a symlink now): those are rsync's."""
    folders: dict[str, list[_File]] = {}
    skipped = 0
    for rel in paths:
        folder, name = os.path.split(rel)
        try:
            st = os.lstat(os.path.join(src_root, rel))
        except OSError:
            skipped += 1
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped += 1
            continue
        folders.setdefault(folder, []).append(_File(name, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                         stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)))
    batches: list[tuple[str, list[_File]]] = []
    for folder, files in folders.items():
        batch: list[_File] = []
        size = 0
        for f in files:
            if batch and (len(batch) >= BATCH_FILES or size + f.size > BATCH_BYTES):
                batches.append((folder, batch))
                batch, size = [], 0
            batch.append(f)
            size += f.size
        batches.append((folder, batch))
    return batches, skipped


def copy_dir_attrs(src_root: Path, dest_root: Path, dirs: Sequence[str]) -> None:
    """Give `dirs` (relative to both roots) on the target the cache's owner, mode and modification time, as
    rsync -a would, the deepest first (setting a folder's time after its subfolders are done)."""
    ids = (os.geteuid(), os.getegid())
    for rel in sorted(dirs, key=lambda d: (-d.count("/"), d)):
        st = os.lstat(os.path.join(src_root, rel))
        dest = os.path.join(dest_root, rel)
        if (st.st_uid, st.st_gid) != ids:
            try:
                os.lchown(dest, st.st_uid, st.st_gid)
            except PermissionError:  # not root: rsync -a keeps the group where it may, not the owner
                with contextlib.suppress(PermissionError):
                    os.lchown(dest, -1, st.st_gid)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def seed(src_root: Path, dest_root: Path, paths: Sequence[str], *, dirs: Sequence[str] = (), total_bytes: int = 0,
         progress: Progress | None = None, label: str = "", workers: int = 2) -> Seeded:
    """Copy `paths` (relative to both roots; regular files) from `src_root` to `dest_root`.

    `dirs`: folders to make on the target whatever `paths` holds (an empty one too) and to give the cache's
    owner, mode and time once every file is in place; left to rsync (counted in `left`) if that fails.
    Worker threads each run one cp at a time, taking batches from one queue; this thread reports progress
    as batches complete and every half second while a large file is copied, at most ten times a second, and
    once at the end.
    """
    started = time.monotonic()
    src, dest = os.fspath(src_root), os.fspath(dest_root)
    batches, skipped = _plan(src, paths)
    try:
        for folder in {*dirs, *(folder for folder, _ in batches)}:  # from this thread: workers never race
            os.makedirs(os.path.join(dest, folder), exist_ok=True)
        for folder, _ in batches:
            os.makedirs(os.path.join(dest, STAGING, folder), exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create {exc.filename} on the backup target: {exc.strerror}. Fix: check that "
                          "the target is mounted, writable by this user and not full.") from None
    n = max(1, min(workers, len(batches)))
    copier = _Copier(src, dest, batches, n)
    count = sum(len(files) for _, files in batches)

    def report(now: tuple[int, int]) -> None:
        files, done = now
        rate = done / 1e6 / max(time.monotonic() - started, 1e-6)
        progress(min(done, total_bytes) if total_bytes else done, total_bytes,
                 f"{label}: {files:,}/{count:,} files, {done / 1e6:,.0f} MB copied, {rate:,.0f} MB/s")

    threads = [threading.Thread(target=copier.work, args=(i,), name=f"backup-copy-{i}", daemon=True)
               for i in range(n)] if batches else []
    for t in threads:
        t.start()
    try:
        reported = (0, 0)
        while any(t.is_alive() for t in threads):
            copier.changed.wait(0.5)  # a batch done, or half a second of a large file's copy
            copier.changed.clear()
            if progress is not None:
                now = copier.done()
                if now != reported and now[1]:
                    report(now)
                    reported = now
                    time.sleep(0.1)
    finally:
        copier.kill()  # stops what runs when the caller stopped (an exception from progress); no-op when done
        for t in threads:
            t.join()
        shutil.rmtree(os.path.join(dest, STAGING), ignore_errors=True)
    if copier.failed:
        raise copier.failed[0]
    files, done, left = copier.totals()
    left += skipped
    if os.path.lexists(os.path.join(dest, STAGING)):  # rsync's --delete removes it, in a pass over everything
        copier.errors.append(f"cannot remove {os.path.join(dest, STAGING)}")
        left += 1
    if dirs and not left:
        try:
            copy_dir_attrs(src_root, dest_root, dirs)
        except OSError as exc:
            copier.errors.append(f"{exc.filename}: {exc.strerror}")
            left += 1
    if progress is not None and files:
        report(copier.done())
    return Seeded(files=files, bytes=done, left=left, error=copier.errors[0] if copier.errors else "")


__all__ = ["STAGING", "Seeded", "copy_dir_attrs", "seed"]
