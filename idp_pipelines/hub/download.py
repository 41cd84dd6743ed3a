"""Download a model snapshot from the Hugging Face Hub, pinned to a commit and verified file by file.

huggingface_hub is imported inside the functions: importing it costs a noticeable fraction of a second
and the Dagster code server re-imports the definitions often.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from idp_pipelines.files import atomic_write, hash_file

from .errors import HubError, hub_errors
from .verify import VerifiedRecord

Progress = Callable[[int, int, str], None]
"""progress(bytes_done, bytes_total, message); may be called from worker threads. done <= total always."""
Warn = Callable[[str], None]
"""warn(message): something the user must see (a hash mismatch repaired); never throttled by the caller."""

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_GLOB_CHARS = set("*?[")


# -- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int
    hash: str  # sha256 of the content for LFS files, git blob sha1 for regular files
    algo: str  # "sha256" | "git-sha1"

    @property
    def lfs(self) -> bool:
        return self.algo == "sha256"


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    sha: str
    files: tuple[PlannedFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def missing(self, cache_dir: str | Path) -> tuple[PlannedFile, ...]:
        """Files whose blob is not in the cache yet (blobs are named by the same hash the plan holds)."""
        blobs = _storage_folder(Path(cache_dir), self.repo_id) / "blobs"
        out = []
        for f in self.files:
            try:
                present = (blobs / f.hash).stat().st_size == f.size
            except OSError:
                present = False
            if not present:
                out.append(f)
        return tuple(out)

    def missing_bytes(self, cache_dir: str | Path) -> int:
        return sum(f.size for f in self.missing(cache_dir))


@dataclass(frozen=True)
class DownloadedFile:
    path: str
    size: int
    hash: str
    algo: str
    verified: bool
    local_path: Path  # inside the snapshot (a symlink to the blob on most systems)
    hashed_now: bool  # False: matched the verified record, not re-read
    redownloaded: bool
    bad_hash: str | None = None  # what the copy that failed verification hashed to (or "<missing>", "<size n>")
    bad_copy: str | None = None  # "cache": the copy found in the cache was bad; "download": the fresh one was


@dataclass(frozen=True)
class DownloadResult:
    repo_id: str
    revision: str  # as asked: branch, tag or sha
    sha: str
    snapshot_path: Path
    files: tuple[DownloadedFile, ...]
    bytes_downloaded: int
    seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def files_hashed(self) -> int:
        return sum(f.hashed_now for f in self.files)

    @property
    def repaired_files(self) -> tuple[DownloadedFile, ...]:
        """Files whose copy failed verification and were fetched again (and then verified)."""
        return tuple(f for f in self.files if f.redownloaded)


# -- helpers ---------------------------------------------------------------------------------------


def _token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def _endpoint(endpoint: str | None) -> str:
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def _storage_folder(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10_000_000 else f"{n / 1e9:.2f} GB ({n} bytes)"


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cache_size(cache_dir: str | Path) -> int:
    """Bytes used by regular files under the cache (symlinks are not followed)."""
    total = 0
    for root, _dirs, files in os.walk(cache_dir):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


class _Meter:
    """Counts bytes received through huggingface_hub's `tqdm_class` hook and reports progress.

    `done` never exceeds `total`: a file fetched again (after a hash mismatch) first gives back the share
    it already counted, or, if it came from the cache, adds its size to the total. `received` counts
    every byte that crossed the wire, retries included.
    """

    def __init__(self, progress: Progress | None, total: int, label: str) -> None:
        self.progress, self.total, self.label = progress, total, label
        self.done = 0
        self.received = 0
        self._lock = threading.Lock()
        self._last_report = 0.0

    def add(self, n: int) -> None:
        with self._lock:
            self.done = max(0, self.done + n)  # huggingface_hub rewinds (n < 0) when a resume restarts at 0
            self.received += max(n, 0)
            now = time.monotonic()
            due = now - self._last_report >= 1.0 or self.done >= self.total
            if due:
                self._last_report = now
            done, total = min(self.done, self.total), self.total
        if due and self.progress is not None:
            self.progress(done, total, self.label)

    def restart_file(self, size: int, counted: bool) -> None:
        """A file is fetched again: reset its share (counted: its bytes were part of this run's total)."""
        with self._lock:
            if counted:
                self.done = max(0, self.done - size)
            else:
                self.total += size

    def bar_class(self) -> type:
        meter = self

        class _Bar:
            """Quacks like the tqdm bars huggingface_hub drives; forwards byte counts to the meter."""

            def __init__(self, *args, **kwargs) -> None:
                self.desc = kwargs.get("desc") or ""
                self.total = kwargs.get("total")
                self.n = kwargs.get("initial") or 0
                # snapshot_download feeds each chunk to a "transfer" and a "reconstruct" bar: count one.
                self._counts = kwargs.get("unit") == "B" and not str(self.desc).startswith("Reconstruct")

            def update(self, n: int | float | None = 1) -> None:
                n = int(n or 0)
                self.n += n
                if self._counts:
                    meter.add(n)

            @property
            def format_dict(self) -> dict:
                return {"rate": None, "n": self.n, "total": self.total}

            def refresh(self, *args, **kwargs) -> None: ...
            def close(self) -> None: ...
            def clear(self, *args, **kwargs) -> None: ...
            def set_description(self, desc: str | None = None, refresh: bool = True) -> None: ...
            def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None: ...
            def set_postfix(self, *args, **kwargs) -> None: ...
            def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

            def __enter__(self) -> _Bar:
                return self

            def __exit__(self, *exc: object) -> None: ...

        return _Bar


# -- API -------------------------------------------------------------------------------------------


def resolve_revision(
    repo_id: str, revision: str | None, *, endpoint: str | None = None, token: str | None = None,
    lab_file: str = "lab.yaml",
) -> str:
    """The 40-hex commit sha of `revision` (branch, tag or sha; None means "main"), checked on the Hub."""
    from huggingface_hub import HfApi

    token, endpoint = _token(token), _endpoint(endpoint)
    with hub_errors(
        action="resolving the revision of", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token,
        lab_file=lab_file,
    ):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision or "main")
    sha = info.sha or ""
    if not _SHA_RE.fullmatch(sha):
        raise HubError(
            f"{endpoint} returned no commit sha for '{repo_id}' at revision '{revision}' (got {sha!r}). "
            f"Check that the `hub.endpoint` field of {lab_file} points to a Hugging Face Hub."
        )
    if revision and _SHA_RE.fullmatch(revision) and sha != revision:
        raise HubError(
            f"Asked for commit {revision} of '{repo_id}' but {endpoint} answered with {sha}. "
            f"Check the model's `revision` in {lab_file}."
        )
    return sha


def plan_download(
    repo_id: str,
    sha: str,
    *,
    allow_patterns: str | Sequence[str] | None = None,
    ignore_patterns: str | Sequence[str] | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    lab_file: str = "lab.yaml",
) -> DownloadPlan:
    """List the files of `repo_id` at commit `sha` that the patterns select, with sizes and hashes (a dry run)."""
    from huggingface_hub import HfApi, RepoFile
    from huggingface_hub.utils import filter_repo_objects

    if not _SHA_RE.fullmatch(sha):
        raise HubError(
            f"plan_download needs a 40-hex commit sha for '{repo_id}', got {sha!r}: call resolve_revision first."
        )
    token, endpoint = _token(token), _endpoint(endpoint)
    with hub_errors(action="listing the files of", repo_id=repo_id, revision=sha, endpoint=endpoint, token=token,
                    lab_file=lab_file):
        entries = [
            e
            for e in HfApi(endpoint=endpoint, token=token).list_repo_tree(repo_id, revision=sha, recursive=True)
            if isinstance(e, RepoFile)
        ]
    selected = filter_repo_objects(
        entries,
        allow_patterns=_as_list(allow_patterns),
        ignore_patterns=_as_list(ignore_patterns),
        key=lambda e: e.path,
    )
    files = tuple(
        PlannedFile(e.path, e.size, e.lfs.sha256, "sha256")
        if e.lfs is not None
        else PlannedFile(e.path, e.size, e.blob_id, "git-sha1")
        for e in sorted(selected, key=lambda e: e.path)
    )
    return _checked_plan(DownloadPlan(repo_id, sha, files), entries, allow_patterns, ignore_patterns, lab_file)


def _as_list(patterns: str | Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _checked_plan(plan: DownloadPlan, entries: list, allow_patterns, ignore_patterns,
                  lab_file: str = "lab.yaml") -> DownloadPlan:
    """Refuse plans that cannot be what was meant: nothing selected, or a named file that does not exist."""
    from huggingface_hub.utils import filter_repo_objects

    paths = [e.path for e in entries]
    allow = _as_list(allow_patterns) or []
    # A pattern without wildcards names one file: if it matches nothing, the file is missing (a 404).
    absent = [
        p for p in allow if not (_GLOB_CHARS & set(p)) and not any(filter_repo_objects(paths, allow_patterns=[p]))
    ]
    if absent or not plan.files:
        listing = ", ".join(paths[:12]) + (f", ... ({len(paths) - 12} more)" if len(paths) > 12 else "")
        what = (
            f"file(s) {', '.join(repr(p) for p in absent)} do not exist"
            if absent
            else "no file matches "
            + " and ".join(
                f"{name}={_as_list(value)!r}"
                for name, value in (("allow_patterns", allow_patterns), ("ignore_patterns", ignore_patterns))
                if value is not None
            )
        )
        raise HubError(
            f"In '{plan.repo_id}' at commit {plan.sha}, {what}. The repo has: {listing or 'no files'}. "
            f"Fix the files / allow_patterns of this model in {lab_file}."
        )
    return plan


def check_space(plan: DownloadPlan, cache_dir: str | Path, budget_bytes: int | None = None,
                lab_file: str = "lab.yaml") -> None:
    """Raise HubError if the missing files do not fit on the disk or in the cache's size budget."""
    cache_dir = Path(cache_dir)
    needed = plan.missing_bytes(cache_dir)
    if needed == 0:
        return
    where = f"'{plan.repo_id}' at {plan.sha[:12]}"
    disk = _existing_parent(cache_dir)
    free = shutil.disk_usage(disk).free
    if needed > free:
        raise HubError(
            f"Not enough disk space for {where}: needs {_gb(needed)}, {_gb(free)} free on {disk}. "
            f"Free some space, move `model_cache.path` in {lab_file} to a bigger disk, or narrow allow_patterns."
        )
    if budget_bytes is not None:
        used = cache_size(cache_dir) if cache_dir.exists() else 0
        if used + needed > budget_bytes:
            left = max(budget_bytes - used, 0)
            raise HubError(
                f"The model cache budget does not fit {where}: needs {_gb(needed)}, {_gb(left)} available "
                f"({_gb(used)} of {_gb(budget_bytes)} used in {cache_dir}). Delete unused models "
                f"(`hf cache rm`), raise `model_cache.budget_gb` in {lab_file}, or narrow allow_patterns."
            )


def download_model(
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | Path,
    allow_patterns: str | Sequence[str] | None = None,
    ignore_patterns: str | Sequence[str] | None = None,
    max_workers: int = 4,
    token: str | None = None,
    endpoint: str | None = None,
    budget_bytes: int | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
    on_plan: Callable[[DownloadPlan], None] | None = None,
    lab_file: str = "lab.yaml",
) -> DownloadResult:
    """Download `repo_id` at `revision` into the HF cache, pinned to one commit, every file hash-checked.

    The revision is resolved to a sha once and everything after uses that sha, so a branch moving
    mid-download cannot mix two commits. Files whose blobs were verified before (same size and mtime)
    are not read again; a rerun with nothing new makes no file request and hashes nothing. A file that
    fails verification is reported through `warn` (file, both hashes), fetched again and verified again.
    `on_plan(plan)` is called once the file list is known and fits, before any byte is fetched: the
    caller records what a complete snapshot holds, so a download that fails half-way is seen as such.
    """
    from huggingface_hub import snapshot_download

    started = time.monotonic()
    token, endpoint = _token(token), _endpoint(endpoint)
    cache_dir = Path(cache_dir).expanduser().absolute()

    sha = resolve_revision(repo_id, revision, endpoint=endpoint, token=token, lab_file=lab_file)
    plan = plan_download(
        repo_id, sha, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, endpoint=endpoint, token=token,
        lab_file=lab_file,
    )
    check_space(plan, cache_dir, budget_bytes, lab_file)
    if on_plan is not None:
        on_plan(plan)

    missing = plan.missing(cache_dir)
    meter = _Meter(progress, sum(f.size for f in missing), f"downloading {repo_id}@{sha[:12]}")
    with hub_errors(action="downloading", repo_id=repo_id, revision=sha, endpoint=endpoint, token=token,
                    lab_file=lab_file):
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=sha,
                cache_dir=str(cache_dir),
                allow_patterns=_as_list(allow_patterns),
                ignore_patterns=_as_list(ignore_patterns),
                max_workers=max_workers,
                token=token,
                endpoint=endpoint,
                tqdm_class=meter.bar_class(),
            )
        )

    fetched = {f.path for f in missing}
    files = _verify_snapshot(plan, snapshot, cache_dir, meter, max_workers, endpoint, token, progress, warn,
                             fetched, lab_file)
    if revision and revision != sha:
        _write_ref(_storage_folder(cache_dir, repo_id), revision, sha)
    return DownloadResult(
        repo_id=repo_id,
        revision=revision or "main",
        sha=sha,
        snapshot_path=snapshot,
        files=files,
        bytes_downloaded=meter.received,
        seconds=time.monotonic() - started,
    )


# -- verification ----------------------------------------------------------------------------------


def _blob_of(pointer: Path) -> Path:
    return pointer.resolve() if pointer.is_symlink() else pointer


def _check(f: PlannedFile, pointer: Path, record: VerifiedRecord) -> tuple[bool, str | None]:
    """(ok, actual hash or None if it was not computed because the record vouched for the blob)."""
    blob = _blob_of(pointer)
    if not blob.is_file():
        return False, "<missing>"
    if record.is_verified(blob, f.algo, f.hash):
        return True, None
    if blob.stat().st_size != f.size:
        return False, f"<size {blob.stat().st_size}, expected {f.size}>"
    actual = hash_file(blob, f.algo)
    return actual == f.hash, actual


def _discard(pointer: Path, record: VerifiedRecord) -> None:
    """Remove a bad file's blob and snapshot entry so neither this run nor a later one trusts it."""
    blob = _blob_of(pointer)
    record.forget(blob)
    for p in {blob, pointer}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _verify_snapshot(
    plan: DownloadPlan,
    snapshot: Path,
    cache_dir: Path,
    meter: _Meter,
    max_workers: int,
    endpoint: str,
    token: str | None,
    progress: Progress | None,
    warn: Warn | None = None,
    fetched: set[str] | frozenset[str] = frozenset(),
    lab_file: str = "lab.yaml",
) -> tuple[DownloadedFile, ...]:
    from huggingface_hub import hf_hub_download

    record = VerifiedRecord(cache_dir)
    hashed_bytes = 0
    lock = threading.Lock()

    def check(f: PlannedFile) -> tuple[PlannedFile, bool, str | None]:
        nonlocal hashed_bytes
        ok, actual = _check(f, snapshot / f.path, record)
        if actual is not None and progress is not None:
            with lock:
                hashed_bytes += f.size
                done = hashed_bytes
            progress(done, plan.total_bytes, f"{'verified' if ok else 'hash mismatch in'} {f.path}")
        return f, ok, actual

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        results = list(pool.map(check, plan.files))

    out: dict[str, DownloadedFile] = {}
    failures: list[str] = []
    try:
        for f, ok, actual in results:
            pointer = snapshot / f.path
            redownloaded, bad_hash, bad_copy = False, None, None
            if not ok:
                bad_hash = actual
                bad_copy = "download" if f.path in fetched else "cache"
                where = (f"as just downloaded from {endpoint}" if bad_copy == "download"
                         else f"in the model cache ({_blob_of(pointer)})")
                if warn is not None:
                    warn(f"hash mismatch: '{f.path}' of '{plan.repo_id}'@{plan.sha[:12]} {where}: expected "
                         f"{f.algo} {f.hash}, got {actual}; removing that copy and downloading it again")
                _discard(pointer, record)
                meter.restart_file(f.size, counted=f.path in fetched)
                with hub_errors(
                    action="re-downloading",
                    repo_id=plan.repo_id,
                    revision=plan.sha,
                    endpoint=endpoint,
                    token=token,
                    filename=f.path,
                    lab_file=lab_file,
                ):
                    hf_hub_download(
                        plan.repo_id,
                        f.path,
                        revision=plan.sha,
                        cache_dir=str(cache_dir),
                        force_download=True,
                        token=token,
                        endpoint=endpoint,
                        tqdm_class=meter.bar_class(),
                    )
                redownloaded = True
                first = actual
                ok, actual = _check(f, pointer, record)
                if not ok:
                    _discard(pointer, record)
                    failures.append(
                        f"'{f.path}': expected {f.algo} {f.hash}, got {first} and then {actual} after a fresh download"
                    )
                    continue
            if actual is not None:
                record.add(_blob_of(pointer), f.algo, f.hash)
            out[f.path] = DownloadedFile(
                path=f.path,
                size=f.size,
                hash=f.hash,
                algo=f.algo,
                verified=True,
                local_path=pointer,
                hashed_now=actual is not None,
                redownloaded=redownloaded,
                bad_hash=bad_hash,
                bad_copy=bad_copy,
            )
    finally:
        record.save()  # keep what did verify, even when some file failed
    if failures:
        raise HubError(
            f"Hash check failed for {len(failures)} file(s) of '{plan.repo_id}' at commit {plan.sha} from "
            f"{endpoint}: {'; '.join(failures)}. The bad copies were removed from the cache. Rerun; if it "
            "persists, the Hub copy or a proxy on the way is corrupt: report it to the repo owner."
        )
    return tuple(out[f.path] for f in plan.files)


def _write_ref(storage: Path, revision: str, sha: str) -> None:
    """Record branch/tag -> sha the way huggingface_hub does (refs/<name>), so offline loads by name work."""
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == sha:
            return
        atomic_write(ref, sha)
    except OSError:
        pass  # best effort, as in huggingface_hub: a read-only cache still serves the snapshot by sha


def local_snapshot(cache_dir: str | Path, repo_id: str, revision: str | None) -> tuple[str, Path]:
    """The (sha, snapshot folder) a finished download left in the cache, without asking the Hub."""
    storage = _storage_folder(Path(cache_dir).expanduser().absolute(), repo_id)
    revision = revision or "main"
    if _SHA_RE.match(revision):
        sha = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            raise HubError(
                f"'{repo_id}' at '{revision}' is not in the model cache {cache_dir} yet. "
                "Fix: materialise its hub_model partition first."
            )
        sha = ref.read_text().strip()
    snapshot = storage / "snapshots" / sha
    if not snapshot.is_dir():
        raise HubError(
            f"The snapshot {snapshot} of '{repo_id}'@{sha} is missing from the model cache. "
            "Fix: materialise its hub_model partition again."
        )
    return sha, snapshot
