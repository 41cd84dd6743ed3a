"""Verification of snapshots on the target (no source, no Hub) and coverage of the cache by the newest one.

A Hub blob is named by its hash (sha256 for LFS files, git's blob sha1 for the others), a GGUF output's
sha256 is in the warehouse's `quantizations` table, a state file's is in the snapshot's manifest. Every
run re-hashes a rotating slice (idp_pipelines.rotation, `backup.verify_days`) so the whole target is read
within that many runs; `full=True` reads all of it. Missing files and changed sizes are found on every
run, from a listing (cheap), not only in the slice.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from idp_pipelines.backup.target import Target
from idp_pipelines.rotation import Slice, pick_slice

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_WORK_FILES = re.compile(r"(^|/)\.[^/]*\.tmp$|\.idp-tmp$|\.incomplete$")


def expected_hash(path: str, gguf_sha256: Mapping[str, str], state_sha256: Mapping[str, str]) -> tuple[str, str] | None:
    """(algo, hex digest) a snapshot file must have, from its name or the records; None if nothing says."""
    if path in state_sha256:
        return "sha256", state_sha256[path]
    parts = path.split("/")
    if parts[0] != "cache":
        return None
    name = parts[-1]
    if "blobs" in parts[1:-1]:
        if _HEX64.match(name):
            return "sha256", name
        if _HEX40.match(name):
            return "git-sha1", name
        return None
    rel = "/".join(parts[1:])
    if rel in gguf_sha256:
        return "sha256", gguf_sha256[rel]
    return None


def repo_id_of(repo_dir: str) -> str:
    """`models--org--name` -> `org/name` (huggingface_hub's cache folder naming)."""
    return "/".join(repo_dir.split("--")[1:])


def users_of(files: list[str], links: Mapping[str, str], models_by_repo: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """{snapshot file: the inventory's models (or repo ids / snapshot paths) that use it}."""
    by_blob: dict[str, set[str]] = {}
    for link, to in links.items():
        blob = posixpath.normpath(posixpath.join(posixpath.dirname(link), to))
        by_blob.setdefault(blob, set()).add(link)
    out: dict[str, list[str]] = {}
    for f in files:
        parts = f.split("/")
        users: set[str] = set()
        if len(parts) > 2 and parts[0] == "cache" and parts[1] == "gguf":
            users.add(parts[2])
        elif len(parts) > 2 and parts[0] == "cache" and "--" in parts[1]:
            repo = repo_id_of(parts[1])
            # a blob no snapshot links to is used by nobody; a file of a snapshot folder by its repo
            if "blobs" not in parts or f in by_blob:
                users.update(models_by_repo.get(repo) or [repo])
        elif parts[0] == "state":
            users.add(f"state {parts[1]}" if len(parts) > 1 else "state")
        out[f] = sorted(users)
    return out


@dataclass(frozen=True)
class VerifyReport:
    snapshot: str
    slice: Slice
    full: bool
    hashed: int
    hashed_bytes: int
    unverifiable: int  # files nothing gives a hash for (refs, sidecars): checked for presence and size only
    findings: list[dict] = field(default_factory=list)  # {"file", "problem", "expected", "actual", "models"}
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.hashed_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def verify_snapshot(target: Target, name: str, manifest: dict, *, gguf_sha256: Mapping[str, str],
                    models_by_repo: Mapping[str, list[str]], cursor: str | None, period: int,
                    full: bool = False) -> VerifyReport:
    started = time.monotonic()
    files: dict[str, int] = manifest["files"]
    links: dict[str, str] = manifest.get("links", {})
    state = manifest.get("state_sha256", {})
    present = target.listing(name)
    problems: dict[str, dict] = {}
    for path, size in files.items():
        entry = present.get(path)
        if entry is None or entry.kind != "f":
            problems[path] = {"file": path, "problem": "missing", "expected": f"{size} bytes", "actual": "absent"}
        elif entry.size != size:
            problems[path] = {"file": path, "problem": "size changed", "expected": f"{size} bytes",
                              "actual": f"{entry.size} bytes"}
    for path, to in links.items():
        entry = present.get(path)
        if entry is None or entry.kind != "l" or entry.link_to != to:
            got = "absent" if entry is None else (f"-> {entry.link_to}" if entry.kind == "l" else "not a symlink")
            problems[path] = {"file": path, "problem": "symlink changed", "expected": f"-> {to}", "actual": got}
    hashable = {p: s for p, s in files.items() if expected_hash(p, gguf_sha256, state) is not None}
    chosen = pick_slice(hashable, cursor, 1 if full else period)
    todo = [(p, expected_hash(p, gguf_sha256, state)) for p in chosen.keys if p not in problems]
    digests = target.hash_files(name, [(p, algo) for p, (algo, _) in todo])
    hashed_bytes = 0
    for path, (algo, want) in todo:
        got = digests.get(path)
        if got is None:
            problems[path] = {"file": path, "problem": "missing", "expected": f"{algo} {want}", "actual": "absent"}
        elif got != want:
            problems[path] = {"file": path, "problem": "hash mismatch", "expected": f"{algo} {want}",
                              "actual": f"{algo} {got}"}
        else:
            hashed_bytes += files[path]
    users = users_of(sorted(problems), links, models_by_repo)
    findings = [dict(problems[p], models=users.get(p, [])) for p in sorted(problems)]
    return VerifyReport(name, chosen, full, len(todo), hashed_bytes, len(files) - len(hashable), findings,
                        time.monotonic() - started)


def cache_content(cache_dir: Path) -> dict[str, int]:
    """{path relative to the cache: size} of what must be in every snapshot: Hub blobs and GGUF files."""
    out: dict[str, int] = {}
    cache_dir = Path(cache_dir)
    for root, dirs, names in os.walk(cache_dir):
        rel_root = Path(root).relative_to(cache_dir)
        top = rel_root.parts[:1]
        in_content = (len(rel_root.parts) >= 1 and top[0] in ("gguf", "blobs")) or (
            len(rel_root.parts) >= 2 and rel_root.parts[1] == "blobs")
        if rel_root.parts and rel_root.parts[0] == ".locks":
            dirs.clear()
            continue
        if not in_content:
            continue
        for n in names:
            rel = (rel_root / n).as_posix()
            p = Path(root) / n
            if _WORK_FILES.search(rel) or p.is_symlink() or not p.is_file():
                continue
            out[rel] = p.stat().st_size
    return out


def snapshot_files(target: Target, name: str) -> dict[str, int]:
    """{path relative to the snapshot: size} of the files the snapshot holds now (a listing, no reading)."""
    return {p: e.size for p, e in target.listing(name).items() if e.kind == "f"}


def coverage(cache: Mapping[str, int], snapshot_files: Mapping[str, int]) -> list[dict]:
    """What the cache holds that the snapshot lacks or holds with another size."""
    gaps = []
    for rel, size in sorted(cache.items()):
        got = snapshot_files.get(f"cache/{rel}")
        if got is None:
            gaps.append({"file": rel, "problem": "not in the snapshot", "bytes": size})
        elif got != size:
            gaps.append({"file": rel, "problem": f"{got} bytes in the snapshot, {size} in the cache", "bytes": size})
    return gaps
