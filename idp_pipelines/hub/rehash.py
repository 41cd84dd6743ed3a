"""Re-hash a rotating slice of the model cache, so bit rot in a trusted file is found within N days.

A cached blob whose size and mtime match the verified record is trusted without reading it (hub_model on
500 GB every day could not afford more). Bit rot changes neither, so once a day this reads a slice of the
cache (idp_pipelines.rotation) and compares each blob with the hash that names it. A mismatch is removed
from the verified record: the next hub_model of that model hashes the file, sees the mismatch and fetches
a good copy. Nothing is deleted here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from idp_pipelines.files import hash_file
from idp_pipelines.rotation import Slice, pick_slice

from .inventory import scan_model_cache
from .verify import VerifiedRecord


@dataclass(frozen=True)
class RehashReport:
    cache_dir: Path
    period_days: int
    slice: Slice
    checked: list[dict] = field(default_factory=list)  # {"blob", "size", "files"}: what was read
    findings: list[dict] = field(default_factory=list)  # {"blob", "expected", "actual", "algo", "size", "files"}
    seconds: float = 0.0


def rehash_slice(cache_dir: str | Path, *, period_days: int, cursor: str | None,
                 progress: Callable[[int, int, str], None] | None = None) -> RehashReport:
    """Hash today's slice of the cache's blobs; `cursor` is the previous run's `slice.cursor`."""
    started = time.monotonic()
    cache = scan_model_cache(cache_dir)
    blobs: dict[str, dict] = {}  # blob path relative to the cache -> what it holds
    for f in cache.files:
        if not f["algo"]:
            continue  # a copy in the snapshot (no-symlink cache): nothing names its hash
        rel = os.path.relpath(f["blob_path"], cache.cache_dir)
        entry = blobs.setdefault(rel, {"blob": f["blob_path"], "size": f["size"], "hash": f["hash"],
                                       "algo": f["algo"], "files": []})
        entry["files"].append(f"{f['repo_id']}@{f['commit'][:12]}/{f['path']}")
    chosen = pick_slice({k: v["size"] for k, v in blobs.items()}, cursor, period_days)
    record = VerifiedRecord(cache.cache_dir)
    checked, findings, done = [], [], 0
    try:
        for key in chosen.keys:
            b = blobs[key]
            path = Path(os.path.realpath(b["blob"]))  # the verified record keys blobs by their real path
            try:
                actual = hash_file(path, b["algo"])
            except FileNotFoundError:
                continue  # removed since the scan (a cache clean-up): nothing left to rot
            checked.append({"blob": key, "size": b["size"], "files": b["files"]})
            if actual == b["hash"]:
                record.add(path, b["algo"], actual)
            else:
                record.forget(path)
                findings.append({"blob": key, "expected": b["hash"], "actual": actual, "algo": b["algo"],
                                 "size": b["size"], "files": b["files"]})
            done += b["size"]
            if progress is not None:
                progress(done, chosen.bytes, f"re-hashed {key}")
    finally:
        record.save()
    return RehashReport(cache.cache_dir, period_days, chosen, checked, findings, time.monotonic() - started)
