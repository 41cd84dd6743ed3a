"""What the model cache holds: files, revisions, bytes, and what could be freed (no Dagster here).

The walking is huggingface_hub's `scan_cache_dir`; on top of it this module adds what that scan does not
report: blobs no snapshot points to (orphaned), the revisions the lab inventory no longer uses, the
bytes each of those alone holds, and whether a blob is in this project's verified record.

Nothing here reads file contents: a blob's file name is its hash (sha256 for LFS files, the git blob
sha1 for regular files), so a cache of hundreds of GB scans in well under a second. Nothing here deletes
anything either: `delete_plan` only lists what could go.

Sizes are physical: a blob that several revisions (or, with huggingface_hub's cache-wide shared blob
store, several repos) point to is counted once.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

from .errors import HubError
from .verify import VerifiedRecord

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_DIR_RE = re.compile(r"^(models|datasets|spaces|kernels)--.+")
# huggingface_hub's cache-wide store for Xet blobs: <cache>/blobs/<2 hex>/<64 hex>, marked by this file.
_SHARED_STORE = "blobs"
_SHARED_MARKER = ".huggingface-shared-blobs"

DELETE_KINDS = ("orphaned", "incomplete", "unused")
_MD_MAX_REVISIONS = 50

# DuckDB column types of the row lists, in row order (every row dict has exactly these keys).
SCHEMAS: dict[str, dict[str, str]] = {
    "files": {
        "repo_id": "VARCHAR",
        "repo_type": "VARCHAR",
        "commit": "VARCHAR",
        "refs": "VARCHAR[]",
        "path": "VARCHAR",
        "size": "BIGINT",
        "blob_path": "VARCHAR",
        "hash": "VARCHAR",  # NULL when the snapshot holds a copy instead of a symlink (no-symlink caches)
        "algo": "VARCHAR",  # "sha256" | "git-sha1" | NULL
        "verified": "BOOLEAN",  # in idp-verified.json with the blob's current size and mtime
        "last_modified": "TIMESTAMPTZ",
        "last_accessed": "TIMESTAMPTZ",
    },
    "revisions": {
        "repo_id": "VARCHAR",
        "repo_type": "VARCHAR",
        "commit": "VARCHAR",
        "refs": "VARCHAR[]",
        "n_files": "INTEGER",
        "bytes": "BIGINT",
        "snapshot_path": "VARCHAR",
        "last_modified": "TIMESTAMPTZ",
        "used": "BOOLEAN",
    },
    "orphaned_blobs": {"path": "VARCHAR", "bytes": "BIGINT", "hash": "VARCHAR", "last_modified": "TIMESTAMPTZ"},
    "incomplete_downloads": {
        "repo_dir": "VARCHAR",
        "path": "VARCHAR",
        "bytes": "BIGINT",
        "age_seconds": "DOUBLE",
        "last_modified": "TIMESTAMPTZ",
    },
    "unused_revisions": {
        "repo_id": "VARCHAR",
        "repo_type": "VARCHAR",
        "commit": "VARCHAR",
        "refs": "VARCHAR[]",
        "n_files": "INTEGER",
        "bytes": "BIGINT",
        "exclusive_bytes": "BIGINT",
        "repo_in_inventory": "BOOLEAN",
        "snapshot_path": "VARCHAR",
    },
}


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInventory:
    """The result of `scan_model_cache`. Row lists hold dicts of plain types (str, int, float, bool,
    None, list[str], datetime) so they can go straight into DuckDB."""

    cache_dir: Path
    files: list[dict] = field(default_factory=list)
    revisions: list[dict] = field(default_factory=list)
    total_bytes: int = 0
    snapshot_bytes: int = 0
    budget_bytes: int | None = None
    orphaned_blobs: list[dict] = field(default_factory=list)
    incomplete_downloads: list[dict] = field(default_factory=list)
    unused_revisions: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unused_bytes: int = 0  # freed by deleting every unused revision (blobs a used revision shares stay)
    used_known: bool = False  # False when scanned without `used`: nothing can be called unused
    exists: bool = True
    # For delete_plan: per unused revision, the paths that removing it would delete.
    _unused_paths: dict[tuple[str, str, str], list[Path]] = field(default_factory=dict, repr=False)

    @property
    def over_budget(self) -> bool:
        return self.budget_bytes is not None and self.total_bytes > self.budget_bytes

    @property
    def budget_used(self) -> float | None:
        """total_bytes / budget_bytes (1.0 = full), None without a budget."""
        if self.budget_bytes is None:
            return None
        return self.total_bytes / self.budget_bytes if self.budget_bytes > 0 else float("inf")

    @property
    def repos(self) -> list[str]:
        return sorted({r["repo_id"] for r in self.revisions})

    @property
    def orphaned_bytes(self) -> int:
        return sum(b["bytes"] for b in self.orphaned_blobs)

    @property
    def incomplete_bytes(self) -> int:
        return sum(b["bytes"] for b in self.incomplete_downloads)

    @property
    def reclaimable_bytes(self) -> int:
        return self.orphaned_bytes + self.incomplete_bytes + self.unused_bytes

    def to_markdown(self) -> str:
        budget = "no budget"
        if self.budget_bytes is not None:
            pct = self.budget_used
            over = ", OVER BUDGET" if self.over_budget else ""
            budget = f"{human_bytes(self.budget_bytes)} ({pct * 100:.1f}% used{over})"
        n_unused = str(len(self.unused_revisions)) if self.used_known else "n/a (no inventory given)"
        rows = [
            ("Cache", f"`{self.cache_dir}`" + ("" if self.exists else " (does not exist)")),
            ("Repos", str(len(self.repos))),
            ("Revisions", str(len(self.revisions))),
            ("Files", str(len(self.files))),
            ("Size on disk", human_bytes(self.total_bytes)),
            ("Budget", budget),
            ("Unused revisions", f"{n_unused} ({human_bytes(self.unused_bytes)} reclaimable)"),
            ("Orphaned blobs", f"{len(self.orphaned_blobs)} ({human_bytes(self.orphaned_bytes)})"),
            ("Incomplete downloads", f"{len(self.incomplete_downloads)} ({human_bytes(self.incomplete_bytes)})"),
            ("Warnings", str(len(self.warnings))),
        ]
        lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
        if self.revisions:
            lines += ["", "| Repo | Commit | Refs | Files | Size | Used |", "|---|---|---|---|---|---|"]
            for r in self.revisions[:_MD_MAX_REVISIONS]:
                used = "?" if r["used"] is None else ("yes" if r["used"] else "**no**")
                refs = ", ".join(r["refs"]) or "-"
                lines.append(
                    f"| {r['repo_id']} | `{r['commit'][:12]}` | {refs} | {r['n_files']} "
                    f"| {human_bytes(r['bytes'])} | {used} |"
                )
            if len(self.revisions) > _MD_MAX_REVISIONS:
                lines.append(f"\n({len(self.revisions) - _MD_MAX_REVISIONS} more revisions not shown)")
        for w in self.warnings:
            lines.append(f"\n> warning: {w}")
        return "\n".join(lines)


def human_bytes(n: int | float) -> str:
    """Decimal units, as `hf cache` and disk vendors count: 1.5 GB = 1.5e9 bytes."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"  # pragma: no cover


# -- helpers ---------------------------------------------------------------------------------------


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _algo(name: str) -> str | None:
    if _SHA256_RE.fullmatch(name):
        return "sha256"
    if _SHA1_RE.fullmatch(name):
        return "git-sha1"
    return None


class _Physical:
    """Resolves blob entries to the file that holds the bytes (following a shared-store symlink), cached."""

    def __init__(self) -> None:
        self._real: dict[Path, tuple[str, int] | None] = {}

    def of(self, entry: Path) -> tuple[str, int] | None:
        """(real path, size) of the regular file behind `entry`, or None when there is none."""
        if entry not in self._real:
            try:
                real = os.path.realpath(entry)
                st = os.stat(real)
                self._real[entry] = (real, st.st_size) if stat.S_ISREG(st.st_mode) else None
            except OSError:
                self._real[entry] = None
        return self._real[entry]


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _shared_store_payloads(cache_dir: Path) -> dict[str, tuple[Path, int, float]]:
    """Real path -> (path, size, mtime) of each payload in huggingface_hub's shared blob store, if marked."""
    store = cache_dir / _SHARED_STORE
    if not (store / _SHARED_MARKER).is_file():
        return {}
    out: dict[str, tuple[Path, int, float]] = {}
    for prefix in _list_dir(store):
        if not (len(prefix.name) == 2 and prefix.is_dir(follow_symlinks=False)):
            continue
        for entry in _list_dir(Path(prefix.path)):
            if _SHA256_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                    out[os.path.realpath(entry.path)] = (Path(entry.path), st.st_size, st.st_mtime)
                except OSError:
                    continue
    return out


def _is_used(repo_id: str, commit: str, refs: Iterable[str], used: Mapping[str, set[str]]) -> bool:
    wanted = used.get(repo_id)
    if not wanted:
        return False
    return commit in wanted or any(ref in wanted for ref in refs)


# -- API -------------------------------------------------------------------------------------------


def scan_model_cache(
    cache_dir: str | Path,
    *,
    used: Mapping[str, set[str]] | None = None,
    budget_bytes: int | None = None,
) -> CacheInventory:
    """Inventory of a huggingface_hub cache directory.

    `used` maps repo_id -> the commit shas the lab inventory uses (a branch or tag name in the set also
    marks the revision that ref points to in the cache). Without it, revisions' `used` is None and no
    revision is reported unused. A missing cache dir gives an empty inventory; a file raises HubError.
    """
    cache_dir = Path(cache_dir).expanduser().absolute()
    if not cache_dir.exists():
        return CacheInventory(
            cache_dir=cache_dir, budget_bytes=budget_bytes, used_known=used is not None, exists=False
        )
    if not cache_dir.is_dir():
        raise HubError(
            f"The model cache path {cache_dir} is not a directory (it is a file). Point `model_cache.path` in "
            "lab.yaml at a directory holding a huggingface_hub cache (models--<org>--<name>/...), or remove "
            "the file."
        )

    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir)
    except OSError as error:
        raise HubError(
            f"Could not scan the model cache {cache_dir}: {error}. Check that the directory is readable by "
            "this process (permissions, mount)."
        ) from error

    record = VerifiedRecord(cache_dir)
    physical = _Physical()
    now = time.time()

    files: list[dict] = []
    revisions: list[dict] = []
    # per revision: its physical blobs {real path: size} and repo-level blob entries
    rev_blobs: dict[tuple[str, str, str], dict[str, int]] = {}
    rev_entries: dict[tuple[str, str, str], set[Path]] = {}
    rev_info: dict[tuple[str, str, str], object] = {}
    referenced_entries: set[Path] = set()
    referenced_real: dict[str, int] = {}
    scanned_repo_paths: list[Path] = []

    for repo in sorted(info.repos, key=lambda r: (r.repo_type, r.repo_id)):
        scanned_repo_paths.append(Path(repo.repo_path))
        for rev in sorted(repo.revisions, key=lambda r: (-r.last_modified, r.commit_hash)):
            key = (repo.repo_type, repo.repo_id, rev.commit_hash)
            refs = sorted(rev.refs)
            blobs: dict[str, int] = {}
            entries: set[Path] = set()
            for f in sorted(rev.files, key=lambda f: f.file_path.as_posix()):
                blob_entry = Path(f.blob_path)
                symlinked = blob_entry != Path(f.file_path)
                phys = physical.of(blob_entry)
                real, size = phys if phys is not None else (str(blob_entry), f.size_on_disk)
                blobs[real] = size
                entries.add(blob_entry)
                name = blob_entry.name if symlinked else None
                algo = _algo(name) if name else None
                try:
                    verified = bool(algo) and record.is_verified(Path(real), algo, name)  # type: ignore[arg-type]
                except OSError:
                    verified = False
                files.append(
                    {
                        "repo_id": repo.repo_id,
                        "repo_type": repo.repo_type,
                        "commit": rev.commit_hash,
                        "refs": refs,
                        "path": Path(f.file_path).relative_to(rev.snapshot_path).as_posix(),
                        "size": size,
                        "blob_path": str(blob_entry),
                        "hash": name,
                        "algo": algo,
                        "verified": verified,
                        "last_modified": _ts(f.blob_last_modified),
                        "last_accessed": _ts(f.blob_last_accessed),
                    }
                )
            rev_blobs[key], rev_entries[key], rev_info[key] = blobs, entries, rev
            referenced_entries |= entries
            referenced_real.update(blobs)
            revisions.append(
                {
                    "repo_id": repo.repo_id,
                    "repo_type": repo.repo_type,
                    "commit": rev.commit_hash,
                    "refs": refs,
                    "n_files": len(rev.files),
                    "bytes": sum(blobs.values()),
                    "snapshot_path": str(rev.snapshot_path),
                    "last_modified": _ts(rev.last_modified),
                    "used": None if used is None else _is_used(repo.repo_id, rev.commit_hash, refs, used),
                }
            )

    # Blob entries no snapshot points to, and partial downloads. Only repos the scan accepted are walked
    # for orphans: in a repo it reported as corrupted every blob would look orphaned.
    orphaned: list[dict] = []
    incomplete: list[dict] = []
    all_real: dict[str, int] = dict(referenced_real)
    orphan_candidates: list[tuple[Path, tuple[str, int] | None, float]] = []
    repo_dirs = [e for e in _list_dir(cache_dir) if _REPO_DIR_RE.match(e.name) and e.is_dir()]
    for repo_dir in sorted(repo_dirs, key=lambda e: e.name):
        accepted = Path(repo_dir.path) in scanned_repo_paths
        for entry in sorted(_list_dir(Path(repo_dir.path) / "blobs"), key=lambda e: e.name):
            path = Path(entry.path)
            try:
                lst = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.name.endswith(".incomplete"):
                incomplete.append(
                    {
                        "repo_dir": repo_dir.name,
                        "path": str(path),
                        "bytes": lst.st_size,
                        "age_seconds": max(0.0, now - lst.st_mtime),
                        "last_modified": _ts(lst.st_mtime),
                    }
                )
                all_real[os.path.realpath(path)] = lst.st_size
                continue
            phys = physical.of(path)
            if phys is not None:
                all_real[phys[0]] = phys[1]
            if accepted and path not in referenced_entries:
                orphan_candidates.append((path, phys, lst.st_mtime))
    for path, phys, mtime in orphan_candidates:
        # A repo entry pointing into the shared store frees its payload only if nothing else uses it.
        freed = phys[1] if phys is not None and phys[0] not in referenced_real else 0
        orphaned.append(
            {
                "path": str(path),
                "bytes": freed,
                "hash": path.name,
                "last_modified": _ts(mtime),
            }
        )
    orphan_targets = {phys[0] for _p, phys, _m in orphan_candidates if phys is not None}
    for real, (path, size, mtime) in sorted(_shared_store_payloads(cache_dir).items()):
        all_real.setdefault(real, size)
        if real not in referenced_real and real not in orphan_targets:
            orphaned.append({"path": str(path), "bytes": size, "hash": path.name, "last_modified": _ts(mtime)})

    # Revisions the lab no longer uses and the bytes that deleting them would free.
    unused: list[dict] = []
    unused_paths: dict[tuple[str, str, str], list[Path]] = {}
    unused_total = 0
    if used is not None:
        used_keys = {k for k, r in zip(rev_blobs, revisions) if r["used"]}
        used_real = {real for k in used_keys for real in rev_blobs[k]}
        used_entries = {e for k in used_keys for e in rev_entries[k]}
        unused_real: dict[str, int] = {}
        for key, row in zip(rev_blobs, revisions):
            if row["used"]:
                continue
            others = {real for k, b in rev_blobs.items() if k != key for real in b}
            blobs = rev_blobs[key]
            freed = {real: s for real, s in blobs.items() if real not in used_real}
            unused_real.update(freed)
            rev = rev_info[key]
            unused.append(
                {
                    "repo_id": row["repo_id"],
                    "repo_type": row["repo_type"],
                    "commit": row["commit"],
                    "refs": row["refs"],
                    "n_files": row["n_files"],
                    "bytes": sum(freed.values()),
                    "exclusive_bytes": sum(s for real, s in blobs.items() if real not in others),
                    "repo_in_inventory": row["repo_id"] in used,
                    "snapshot_path": row["snapshot_path"],
                }
            )
            repo_path = Path(rev.snapshot_path).parent.parent  # type: ignore[attr-defined]
            paths = [Path(rev.snapshot_path)]  # type: ignore[attr-defined]
            paths += [repo_path / "refs" / ref for ref in row["refs"]]
            snapshot = Path(rev.snapshot_path)  # type: ignore[attr-defined]
            # Entries inside the snapshot are plain copies (no-symlink caches): they go with the snapshot dir.
            paths += sorted(e for e in rev_entries[key] if e not in used_entries and snapshot not in e.parents)
            unused_paths[key] = paths
        unused_total = sum(unused_real.values())

    return CacheInventory(
        cache_dir=cache_dir,
        files=files,
        revisions=revisions,
        total_bytes=sum(all_real.values()),
        snapshot_bytes=sum(referenced_real.values()),
        budget_bytes=budget_bytes,
        orphaned_blobs=orphaned,
        incomplete_downloads=incomplete,
        unused_revisions=unused,
        warnings=[str(w) for w in info.warnings],
        unused_bytes=unused_total,
        used_known=used is not None,
        _unused_paths=unused_paths,
    )


def delete_plan(inv: CacheInventory, which: Iterable[str] = DELETE_KINDS) -> list[Path]:
    """The paths whose removal would free what the inventory reports (nothing is deleted here).

    "orphaned": blob entries no snapshot points to; "incomplete": partial downloads; "unused": for each
    unused revision its snapshot dir, the refs pointing at it, and its blob entries no used revision
    shares. Removing them leaves a cache huggingface_hub still reads as valid.
    """
    kinds = [which] if isinstance(which, str) else list(which)
    unknown = [k for k in kinds if k not in DELETE_KINDS]
    if unknown:
        raise ValueError(f"delete_plan: unknown kind(s) {unknown}; choose from {list(DELETE_KINDS)}")
    out: list[Path] = []
    if "orphaned" in kinds:
        out += [Path(b["path"]) for b in inv.orphaned_blobs]
    if "incomplete" in kinds:
        out += [Path(b["path"]) for b in inv.incomplete_downloads]
    if "unused" in kinds:
        for paths in inv._unused_paths.values():
            out += paths
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]
