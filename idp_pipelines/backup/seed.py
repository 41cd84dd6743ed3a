"""The bytes of a snapshot on a local target, copied by the kernel before rsync makes the snapshot.

rsync copies a local file through two of its own processes and a socket between them: every byte is
read into one process, written to the socket, read by the other and written out. That costs about
2.2 s of system time per GB here, where `cp -a` (one `copy_file_range` per file, no byte in user space)
needs 0.9 s, so a first snapshot ran at under half of `cp -a`'s speed. For a target that is a folder on
this host (a local disk or a mounted share, with no `--bwlimit`), the files rsync's dry run said it
would send are copied here first, two at a time, with `copy_file_range` (a reflink on btrfs/XFS, a
server-side copy on NFS 4.2), keeping mode and modification time. rsync then runs as always and finds
them up to date: it still decides what the snapshot holds (filters, hard links to the previous
snapshot, symlinks, deletions, ownership), and anything not copied here is copied by rsync.

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

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, message)

# copy_file_range cannot do this pair (another filesystem on an old kernel, a FUSE share): sendfile can
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}
SEED_SUFFIX = ".idp-seed"  # no backup filter matches it: rsync's --delete removes one a crash left


@dataclass(frozen=True)
class Seeded:
    files: int  # copied here, complete, with mode and time set
    bytes: int
    left: int  # not copied here (vanished, not a regular file, an error): rsync copies them


def seed(src_root: Path, dest_root: Path, paths: Sequence[str], *, total_bytes: int = 0,
         progress: Progress | None = None, label: str = "", workers: int = 2) -> Seeded:
    """Copy `paths` (relative to both roots; regular files) from `src_root` to `dest_root`.

    Each worker thread takes every `workers`-th path (copy_file_range releases the GIL); this thread
    reports progress, at once after the first file and then at most ten times a second. One future
    per file cost more than the copies of 10 000 small files (the pool's locks, 220 000 futex calls).
    """
    started = time.monotonic()
    made: set[Path] = set()
    for rel in paths:  # the folders first, from this thread: workers never race to create one
        parent = (dest_root / rel).parent
        if parent not in made:
            parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
    src, dest = os.fspath(src_root), os.fspath(dest_root)
    n = max(1, min(workers, len(paths)))
    counts = [[0, 0, 0] for _ in range(n)]  # per worker: files, bytes, left to rsync
    failed: list[BaseException] = []
    stop = threading.Event()
    changed = threading.Event()

    def work(i: int) -> None:
        c = counts[i]
        try:
            for rel in paths[i::n]:
                if stop.is_set():
                    return
                copied = _copy(os.path.join(src, rel), os.path.join(dest, rel))
                if copied is None:
                    c[2] += 1
                else:
                    c[0] += 1
                    c[1] += copied
                changed.set()
        except BaseException as exc:  # not an OSError of one file (those are left to rsync): a bug
            failed.append(exc)
            stop.set()
            changed.set()

    threads = [threading.Thread(target=work, args=(i,), name=f"backup-copy-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        reported: tuple[int, int] | None = None
        while any(t.is_alive() for t in threads):
            changed.wait(0.5)
            changed.clear()
            files, done = sum(c[0] for c in counts), sum(c[1] for c in counts)
            if progress is not None and (files, done) != reported and files:
                rate = done / 1e6 / max(time.monotonic() - started, 1e-6)
                progress(min(done, total_bytes) if total_bytes else done, total_bytes,
                         f"{label}: {files:,}/{len(paths):,} files, {done / 1e6:,.0f} MB copied, {rate:,.0f} MB/s")
                reported = (files, done)
                time.sleep(0.1)
    finally:
        stop.set()  # the caller stopped (an exception from progress): the workers finish their file and stop
        for t in threads:
            t.join()
    if failed:
        raise failed[0]
    return Seeded(files=sum(c[0] for c in counts), bytes=sum(c[1] for c in counts), left=sum(c[2] for c in counts))


def _copy(src: str, dest: str) -> int | None:
    """Bytes copied, or None when this file is left to rsync."""
    try:
        fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # vanished since the dry run (a download finished, a temp file renamed), or now a symlink
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
                copied = _copy_bytes(fin, fout, st.st_size)
                if copied != st.st_size:  # the file changed while it was copied: rsync takes it from here
                    raise OSError(errno.EAGAIN, "changed while copied")
                os.fchmod(fout, stat.S_IMODE(st.st_mode))
                if os.geteuid() == 0:
                    with contextlib.suppress(OSError):
                        os.fchown(fout, st.st_uid, st.st_gid)
                os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fout)
            os.rename(tmp, dest)  # only now under its name: whole, with the cache's time
            return copied
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
    finally:
        os.close(fin)


def _copy_bytes(fin: int, fout: int, size: int) -> int:
    copied = 0
    use_cfr = True
    while copied < size:
        want = min(size - copied, 1 << 30)
        if use_cfr:
            try:
                n = os.copy_file_range(fin, fout, want)
            except OSError as exc:
                if exc.errno not in _NO_CFR or copied:
                    raise
                use_cfr = False
                continue
        else:
            n = os.sendfile(fout, fin, None, want)
        if n == 0:  # the source is shorter than it was
            break
        copied += n
    return copied


__all__ = ["Seeded", "seed"]
