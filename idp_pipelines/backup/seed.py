"""The bytes of a snapshot on a local target, copied by the kernel before rsync makes the snapshot.

rsync copies a local file through two of its own processes and a socket between them: every byte is
read into one process, written to the socket, read by the other and written out. That costs about
2.2 s of system time per GB here, where `cp -a` (one `copy_file_range` per file, no byte in user space)
needs 0.9 s, so a first snapshot ran at under half of `cp -a`'s speed. For a target that is a folder on
this host (a local disk or a mounted share, with no `--bwlimit`), the files rsync's dry run said it
would send are copied here first by two threads with `copy_file_range` (in-kernel; between two folders
of one btrfs/XFS filesystem a reflink, whose blocks the cache shares: no second physical copy on that
disk), or `sendfile` where the kernel refuses the pair (a local cache to an NFS or FUSE target),
keeping owner, mode, modification time and holes (only the data segments are copied). rsync then runs
as always and finds them up to date: it still decides what the snapshot holds (filters, hard links to
the previous snapshot, symlinks, deletions, ownership), and anything not copied here is copied by rsync.

Safe to kill: a file is written as `.<name>.idp-seed` beside its place and renamed once whole, with the
cache's mode and time set. A file under its final name is always a whole copy: rsync compares times to
the second, so a whole copy with the copying time (a kill between the last byte and the time being set)
would pass for up to date. The run that continues the `.partial` snapshot (rsync alone, with `--delete`)
removes the leftover `.idp-seed` files, so only the content folders (blobs, GGUF), where no filter
shields such a file from deletion, are copied this way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from idp_pipelines.backup.errors import BackupError

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, message)

# copy_file_range cannot do this pair (another filesystem on an old kernel, a FUSE share): sendfile can
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
SEED_SUFFIX = ".idp-seed"  # no backup filter matches it: rsync's --delete removes one a crash left


@dataclass(frozen=True)
class Seeded:
    files: int  # copied here, complete, with mode and time set
    bytes: int
    left: int  # not copied here (vanished, changed while copied, not a regular file, an error): rsync copies them


CHUNK = 64 << 20  # bytes per copy_file_range call: a stop request waits for one chunk, not for a whole GGUF


class _Copier:
    """The state the worker threads share: one queue of paths (a thread never waits while the other still
    has a large file to do), a stop flag, and whether copy_file_range works between the two folders."""

    def __init__(self, src: str, dest: str, paths: Sequence[str], workers: int) -> None:
        self.src, self.dest = src, dest
        self.queue = iter(list(paths))
        self.stop = threading.Event()
        self.changed = threading.Event()
        self.use_cfr = True  # EXDEV once (a local cache to an NFS or FUSE target): sendfile for the rest
        self.ids = (os.geteuid(), os.getegid())  # a new file's owner: chown only where the cache's differs
        self.counts = [[0, 0, 0] for _ in range(workers)]  # per worker: files, bytes, left to rsync
        self.failed: list[BaseException] = []

    def work(self, i: int) -> None:
        c = self.counts[i]
        try:
            while not self.stop.is_set():
                rel = next(self.queue, None)  # one C call under the GIL: no two threads get the same path
                if rel is None:
                    return
                copied = self.copy(os.path.join(self.src, rel), os.path.join(self.dest, rel))
                if copied is None:
                    c[2] += 1
                else:
                    c[0] += 1
                    c[1] += copied
                self.changed.set()
        except BaseException as exc:  # not an OSError of one file (those are left to rsync): a bug
            self.failed.append(exc)
            self.stop.set()
            self.changed.set()

    def totals(self) -> tuple[int, int, int]:
        return (sum(c[0] for c in self.counts), sum(c[1] for c in self.counts), sum(c[2] for c in self.counts))

    def copy(self, src: str, dest: str) -> int | None:
        """Bytes copied, or None when this file is left to rsync."""
        try:
            fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # vanished since the dry run (a download finished, a temp file renamed), or a symlink now
            return None
        try:
            st = os.fstat(fin)
            if not stat.S_ISREG(st.st_mode):
                return None
            folder, name = os.path.split(dest)
            tmp = os.path.join(folder, f".{name}{SEED_SUFFIX}")
            try:
                fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
            try:
                try:
                    copied = self.copy_bytes(fin, fout, st.st_size)
                    after = os.fstat(fin)
                    if copied != st.st_size or (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                            st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                        return self.drop(tmp)  # changed while copied (or a stop): rsync takes it from here
                    if (st.st_uid, st.st_gid) != self.ids:  # the owner before the mode: chown clears setuid
                        with contextlib.suppress(OSError):  # not root: rsync sets what it may
                            os.fchown(fout, st.st_uid, st.st_gid)
                    os.fchmod(fout, stat.S_IMODE(st.st_mode))
                    # the time last (Linux's NFS client writes cached data back before it sets a time)
                    os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(fout)
                os.rename(tmp, dest)  # only now under its name: whole, with the cache's time
                return copied
            except OSError:
                return self.drop(tmp)
        finally:
            os.close(fin)

    @staticmethod
    def drop(tmp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None

    def copy_bytes(self, fin: int, fout: int, size: int) -> int:
        """How much of the file's `size` is done: its data copied, its holes left holes (as `cp` does), so a
        sparse file costs the target what it costs the cache. Less than `size` when the source is shorter
        than it was or a stop came. A dense file costs two lseek calls more than a plain copy."""
        pos = 0  # of both files: fout's position follows the data written
        while pos < size:
            try:
                data = os.lseek(fin, pos, os.SEEK_DATA)
                end = min(os.lseek(fin, data, os.SEEK_HOLE), size)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole (a source that shrank
                    break                     # fails the caller's size and ctime check instead)
                data, end = pos, size  # no hole support on this filesystem: the rest is data
            if data >= size:
                break
            if data != pos:
                os.lseek(fout, data, os.SEEK_SET)  # skip the hole: nothing written, nothing allocated
            got = self.copy_range(fin, fout, data, end - data)
            if got < end - data:
                return data + got
            pos = end
        if pos < size:
            if self.stop.is_set():
                return pos
            os.ftruncate(fout, size)  # a trailing hole: the length without writing it
        return size

    def copy_range(self, fin: int, fout: int, offset: int, size: int) -> int:
        """Copy `size` bytes of fin from `offset` to fout's position; fewer when the source ends first or a
        stop came."""
        copied = 0
        while copied < size and not self.stop.is_set():
            want = min(size - copied, CHUNK)
            if self.use_cfr:
                try:
                    n = os.copy_file_range(fin, fout, want, offset + copied)
                except OSError as exc:
                    if exc.errno not in _NO_CFR or copied:
                        raise
                    self.use_cfr = False
                    continue
            else:
                n = os.sendfile(fout, fin, offset + copied, want)
            if n == 0:  # the source is shorter than it was
                break
            copied += n
        return copied


def seed(src_root: Path, dest_root: Path, paths: Sequence[str], *, total_bytes: int = 0,
         progress: Progress | None = None, label: str = "", workers: int = 2) -> Seeded:
    """Copy `paths` (relative to both roots; regular files) from `src_root` to `dest_root`.

    Worker threads take the paths from one queue (copy_file_range releases the GIL); this thread reports
    progress as files complete, at most ten times a second, and once at the end. One future per file cost
    more than the copies of 10 000 small files (the pool's locks: 220 000 futex calls).
    """
    started = time.monotonic()
    made: set[Path] = set()
    for rel in paths:  # the folders first, from this thread: workers never race to create one
        parent = (dest_root / rel).parent
        if parent not in made:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackupError(f"cannot create {parent} on the backup target: {exc}. Fix: check that the "
                                  "target is mounted, writable by this user and not full.") from None
            made.add(parent)
    n = max(1, min(workers, len(paths)))
    copier = _Copier(os.fspath(src_root), os.fspath(dest_root), paths, n)

    def report() -> None:
        files, done, _left = copier.totals()
        rate = done / 1e6 / max(time.monotonic() - started, 1e-6)
        progress(min(done, total_bytes) if total_bytes else done, total_bytes,
                 f"{label}: {files:,}/{len(paths):,} files, {done / 1e6:,.0f} MB copied, {rate:,.0f} MB/s")

    threads = [threading.Thread(target=copier.work, args=(i,), name=f"backup-copy-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    try:
        if progress is None:  # nothing to report: wait for the workers, not wake at each file they finish
            for t in threads:
                t.join()
        reported = (0, 0)
        while any(t.is_alive() for t in threads):
            copier.changed.wait(0.5)
            copier.changed.clear()
            now = copier.totals()[:2]
            if progress is not None and now != reported and now[0]:
                report()
                reported = now
                time.sleep(0.1)
    finally:
        copier.stop.set()  # the caller stopped (an exception from progress): the workers stop within a chunk
        for t in threads:
            t.join()
    if copier.failed:
        raise copier.failed[0]
    files, done, left = copier.totals()
    if progress is not None and files:
        report()
    return Seeded(files=files, bytes=done, left=left)


__all__ = ["CHUNK", "Seeded", "seed"]
