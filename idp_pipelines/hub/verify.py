"""The record of blobs already verified (hashing itself is idp_pipelines.files.hash_file)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from idp_pipelines.files import atomic_write

# huggingface_hub's scan_cache_dir() reports any unknown entry at the top of the cache as a corrupted repo,
# but skips `.locks/`; the record lives there so `hf cache` tools stay quiet.
RECORD_NAME = os.path.join(".locks", "idp-verified.json")


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int
    algo: str
    hash: str


class VerifiedRecord:
    """Blobs whose hash was checked, keyed by path relative to the cache, stamped by size and mtime.

    A blob rewritten since (new mtime or size) no longer matches its stamp and is hashed again.
    Concurrent writers may drop each other's entries; that costs a rehash, never a wrong answer.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.path = cache_dir / RECORD_NAME
        self._entries: dict[str, _Stamp] = self._read()
        self._forgotten: set[str] = set()
        self._dirty = False

    def _read(self) -> dict[str, _Stamp]:
        try:
            raw = json.loads(self.path.read_text())
            return {k: _Stamp(*v) for k, v in raw.get("blobs", {}).items()}
        except (OSError, ValueError, TypeError):
            return {}  # missing or unreadable: everything is simply hashed again

    def _key(self, blob: Path) -> str:
        return os.path.relpath(blob, self.cache_dir)

    def is_verified(self, blob: Path, algo: str, expected: str) -> bool:
        stamp = self._entries.get(self._key(blob))
        if stamp is None or stamp.algo != algo or stamp.hash != expected:
            return False
        st = blob.stat()
        return st.st_size == stamp.size and st.st_mtime_ns == stamp.mtime_ns

    def add(self, blob: Path, algo: str, digest: str) -> None:
        st = blob.stat()
        key = self._key(blob)
        self._entries[key] = _Stamp(st.st_size, st.st_mtime_ns, algo, digest)
        self._forgotten.discard(key)
        self._dirty = True

    def forget(self, blob: Path) -> None:
        key = self._key(blob)
        self._entries.pop(key, None)
        self._forgotten.add(key)
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        # Merge with what another run may have written meanwhile, drop blobs that are gone, write atomically.
        merged = {**self._read(), **self._entries}
        merged = {k: v for k, v in merged.items() if k not in self._forgotten and (self.cache_dir / k).exists()}
        payload = {"version": 1, "blobs": {k: [v.size, v.mtime_ns, v.algo, v.hash] for k, v in sorted(merged.items())}}
        atomic_write(self.path, json.dumps(payload))
        self._entries = merged
        self._forgotten.clear()
        self._dirty = False
