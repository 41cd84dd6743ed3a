"""Consistent copies of the lab's state (what cannot be downloaded again), staged for the snapshot.

- The DuckDB warehouse is copied while its lock is held shared: no writer can be inside, so the file is
  consistent (a file copied mid-write is not), and a restore is a plain file again.
- SQLite files (the MLflow store, Dagster's run/event/schedule storage) go through SQLite's online backup
  API, which copies a consistent database while the servers keep it open.
- Everything else (keys, artefacts, the vault) is copied with its mode: a key stays 0600.

The staged tree gets a sha256 of every file (state-sha256.json), which the snapshot's manifest keeps and
the verification compares with the target.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from idp_pipelines.files import atomic_write, sha256_file

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
HASHES = "state-sha256.json"


def _is_sqlite(path: Path) -> bool:
    if path.suffix not in SQLITE_SUFFIXES:
        return False
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _copy_sqlite(src: Path, dst: Path) -> None:
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(dst) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    shutil.copystat(src, dst)


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_file():
        dst.mkdir(parents=True, exist_ok=True)
        _copy_file(src, dst / src.name)
        return
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        shutil.copystat(root, dst / rel)
        for name in files:
            s = Path(root) / name
            if name.endswith(("-journal", "-wal", "-shm")) and _is_sqlite(s.with_name(name.rsplit("-", 1)[0])):
                continue  # the backup API has folded them into the copy
            _copy_file(s, dst / rel / name)
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                os.symlink(os.readlink(Path(root) / name), dst / rel / name)
                dirs.remove(name)


def _copy_file(s: Path, d: Path) -> None:
    if s.is_symlink():
        os.symlink(os.readlink(s), d)
    elif not s.is_file():
        return  # sockets and fifos (a server's runtime files) are not state
    elif _is_sqlite(s):
        _copy_sqlite(s, d)
    else:
        shutil.copy2(s, d)


def stage_state(sources: dict[str, Path], staging: Path, *, warehouse_copy: Callable[[Path], None] | None = None,
                log: Callable[[str], None] = lambda m: None) -> dict[str, str]:
    """Copy each present source into `staging/<name>/`; returns {name: "copied" | "absent: <path>"}.

    `warehouse_copy(dest_dir)` copies the warehouse under its lock (the shell passes the Warehouse's);
    without it the "warehouse" source is copied like any other file.
    """
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    outcome: dict[str, str] = {}
    for name, src in sources.items():
        dst = staging / name
        if not src.exists():
            outcome[name] = f"absent: {src}"
            log(f"state {name}: {src} does not exist yet, nothing to back up")
            continue
        if name == "warehouse" and warehouse_copy is not None:
            dst.mkdir(parents=True)
            warehouse_copy(dst)
        else:
            _copy_tree(src, dst)
        outcome[name] = "copied"
    hashes = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and not path.is_symlink():
            hashes[f"state/{path.relative_to(staging)}"] = sha256_file(path)
    atomic_write(staging / HASHES, json.dumps(hashes, sort_keys=True))
    return outcome


def copy_locked_file(src: Path, dest_dir: Path) -> None:
    """A plain copy (mode and times kept) of a file and of its write-ahead log if one is there."""
    shutil.copy2(src, dest_dir / src.name)
    wal = src.with_name(src.name + ".wal")
    if wal.exists():
        shutil.copy2(wal, dest_dir / wal.name)
