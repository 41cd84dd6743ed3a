"""The one home of basic file helpers every domain shares: atomic writes and content hashes.

Plain Python, no Dagster, no I/O at import. A domain core never re-implements these.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

CHUNK_SIZE = 1024 * 1024


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None,
                 fsync: bool = True, gid: int | None = None) -> None:
    """Write `data` to `path` through a temp file in the same folder, renamed into place.

    A crash leaves either the old file or the new one, never half of it. `mode` sets the permissions
    before the rename (a secret never exists world-readable, even for an instant); without it an
    existing file keeps its mode. `gid` sets the group before the mode, also before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".idp-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if gid is not None:
                os.fchown(f.fileno(), -1, gid)
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.fchmod(f.fileno(), path.stat().st_mode & 0o7777)
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def hash_file(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """sha256 of the content (`algo="sha256"`) or its git blob sha1 (`algo="git-sha1"`), in 1 MiB chunks."""
    path = Path(path)
    if algo == "sha256":
        h = hashlib.sha256()
    elif algo == "git-sha1":
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        raise ValueError(f"unknown hash algorithm {algo!r}")
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    return hash_file(path, "sha256")
