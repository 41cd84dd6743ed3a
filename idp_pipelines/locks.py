"""Cross-process file locks (flock) that wait politely: they say who holds them and give up with a fix.

Used for the DuckDB warehouse (one writer, many readers) and for a host's measurement slot (one
benchmark or latency probe per host, whether Dagster or `idp bench` started it). A lock is released
when its file descriptor closes, so a process that dies never leaves one behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path


class LockTimeout(RuntimeError):
    """Waited too long for a lock; the message names the lock file, its holder if known, and the fix."""


@contextlib.contextmanager
def file_lock(path: Path, *, exclusive: bool = True, timeout_s: float, what: str, fix: str,
              on_wait: Callable[[str], None] | None = None, holder: str | None = None,
              error: type[Exception] = LockTimeout) -> Iterator[None]:
    """Hold `path` locked (exclusive or shared) for the block; wait up to `timeout_s`, telling `on_wait`
    after 5 s and then every 30 s. An exclusive holder that gives `holder` writes it (with its pid and
    start time) into the file, for those who wait to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        start = time.monotonic()
        next_note = start + 5.0
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - start > timeout_s:
                    raise error(f"Waited {timeout_s:.0f} s for {what} {path}{_held_by(path)}. Fix: {fix}") from None
                if on_wait and now > next_note:
                    on_wait(f"waiting for {what} {path}{_held_by(path)}")
                    next_note = now + 30.0
                time.sleep(0.02 if now - start < 5 else 0.25)
        if exclusive and holder:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(),
                                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _held_by(path: Path) -> str:
    """', held by <what> (pid N) since <time>' when the holder wrote itself into the file."""
    try:
        info = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or "holder" not in info:
        return ""
    return f", held by {info['holder']} (pid {info.get('pid')}) since {info.get('since')}"
