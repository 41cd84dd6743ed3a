"""Restores from a snapshot, and the weekly restore drill that proves a snapshot is a usable cache.

A restore copies with rsync -a: modification times come back as they were, which matters because the
cache's verified record trusts a blob by its size and mtime (a restore that reset times would make the
next hub_model re-hash everything). It never deletes anything at the destination, and it refuses to
overwrite a file whose content differs unless asked to (`overwrite=True`): a restore must not destroy
the newer copy of something by accident.
"""

from __future__ import annotations

import random
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from idp_pipelines.backup.errors import BackupError
from idp_pipelines.backup.snapshot import run_rsync
from idp_pipelines.backup.target import Target, ensure_tools
from idp_pipelines.backup.verify import repo_id_of
from idp_pipelines.files import hash_file


@dataclass(frozen=True)
class RestoreResult:
    snapshot: str
    source: str  # the folder of the snapshot restored from, e.g. cache/models--org--name
    dest: Path
    files: int
    bytes: int
    seconds: float
    overwritten: list[str] = field(default_factory=list)


def _rsync_base(target: Target, *, reports: bool = True) -> list[str]:
    argv = ["rsync", "-a", "--sparse"] + (["--no-inc-recursive", "--info=progress2", "--stats"] if reports else [])
    return argv + (["-e", shlex.join(target.ssh_argv())] if target.is_ssh else [])


def differing_files(target: Target, source: str, dest: Path) -> list[str]:
    """Files that exist at `dest` with another content (or symlink target) than in the snapshot."""
    if not dest.exists():
        return []
    argv = _rsync_base(target, reports=False) + [
        "--dry-run", "--checksum", "--existing", "--itemize-changes", target.remote(source) + "/", f"{dest}/"]
    proc = subprocess.run(argv, capture_output=True, timeout=24 * 3600)
    if proc.returncode not in (0, 24):
        raise BackupError(f"rsync could not compare {target.describe()}/{source} with {dest}: "
                          f"{proc.stderr.decode(errors='replace').strip()}")
    out = []
    for line in proc.stdout.decode(errors="surrogateescape").splitlines():
        flags, _, path = line.partition(" ")
        # YXcstpoguax: c = content differs (checksum / symlink target), s = size differs; t alone is harmless
        if len(flags) >= 4 and flags[1] in "fL" and flags[0] in "><.c" and ("c" == flags[2] or "s" == flags[3]):
            out.append(path)
    return out


def restore(target: Target, snapshot: str, source: str, dest: Path, *, overwrite: bool = False,
            progress: Callable[[int, int, str], None] | None = None,
            log: Callable[[str], None] = lambda m: None) -> RestoreResult:
    """Copy `<snapshot>/<source>/` of the target into `dest` (created if needed), times kept."""
    ensure_tools("rsync", *(["ssh"] if target.is_ssh else []))
    if snapshot not in target.snapshots():
        raise BackupError(f"No snapshot {snapshot!r} on {target.describe()} (it has {target.snapshots()}). "
                          "Fix: choose one of those, or 'newest'.")
    if not target.listing(f"{snapshot}/{source}"):
        raise BackupError(f"Snapshot {snapshot} on {target.describe()} holds nothing under {source}. Fix: check "
                          "the model name (its repo must have been in the cache at that snapshot) or the state item.")
    started = time.monotonic()
    differ = differing_files(target, f"{snapshot}/{source}", dest)
    if differ and not overwrite:
        shown = ", ".join(differ[:10]) + (f" and {len(differ) - 10} more" if len(differ) > 10 else "")
        raise BackupError(f"Restoring {source} from snapshot {snapshot} would overwrite {len(differ)} file(s) in {dest} "
                          f"that differ from the backup: {shown}. Nothing was changed. Fix: restore into an empty "
                          "folder (dest), or run the restore again with overwrite: true to replace them.")
    if differ:
        log(f"overwriting {len(differ)} differing file(s) in {dest}: {', '.join(differ[:10])}")
    dest.mkdir(parents=True, exist_ok=True)
    stats = run_rsync(_rsync_base(target) + [target.remote(f"{snapshot}/{source}") + "/", f"{dest}/"],
                      progress=progress, label=f"restore {source}")
    Target(str(dest)).sync()  # restored means on the disk: a power cut now would leave empty files in the cache
    log(f"restored {source} from {snapshot} into {dest}: {stats.files_sent} file(s), {stats.bytes_sent:,} bytes")
    return RestoreResult(snapshot, source, dest, stats.files_sent, stats.bytes_sent, time.monotonic() - started,
                         differ)


def check_what(what: str, state_items: tuple[str, ...]) -> None:
    if what not in ("model", "cache", *state_items):
        raise BackupError(f"restore: what={what!r} is unknown. Fix: model (with model: <name>), cache, or one of "
                          f"{', '.join(state_items)}.")


def restore_plan(what: str, *, snapshot_files: list[str], cache: Path, state_home: Path, snapshot: str,
                 dest: Path | None, model: str | None = None, repo_id: str | None = None,
                 state_items: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(folder of the snapshot, destination) pairs for the restore job's `what`.

    A model is its Hub repo folder and, when the snapshot has them, its GGUF outputs; they go back into
    the cache unless `dest` is given. State goes to `state_home/<snapshot>/<item>` by default: a live
    warehouse or Dagster storage is never overwritten under a running lab.
    """
    check_what(what, state_items)
    if what == "model":
        if not model or not repo_id:
            raise BackupError("restore: what=model needs model: <name of a model of the inventory>.")
        repo_dir = "models--" + repo_id.replace("/", "--")
        root = dest or cache
        plan = [(f"cache/{repo_dir}", root / repo_dir)]
        if any(p.startswith(f"cache/gguf/{model}/") for p in snapshot_files):
            plan.append((f"cache/gguf/{model}", root / "gguf" / model))
        return plan
    if what == "cache":
        return [("cache", dest or cache)]
    return [(f"state/{what}", dest or state_home / snapshot / what)]


@dataclass(frozen=True)
class DrillReport:
    snapshot: str
    repo_id: str | None
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cached_repos(manifest: dict) -> list[str]:
    """The Hub repo folders (`models--org--name`) a snapshot's cache holds."""
    return sorted({p.split("/")[1] for p in [*manifest["files"], *manifest.get("links", {})]
                   if p.startswith("cache/models--") and p.count("/") >= 3})


def restore_drill(target: Target, snapshot: str, manifest: dict, *, rng: random.Random | None = None,
                  workdir: Path | None = None, log: Callable[[str], None] = lambda m: None) -> DrillReport:
    """Restore one random model into a temporary cache and prove it is a valid Hugging Face cache: scanned by
    huggingface_hub without errors, every blob with the hash its name says, every file loaded offline."""
    started = time.monotonic()
    repos = cached_repos(manifest)
    if not repos:
        return DrillReport(snapshot, None, problems=["the snapshot holds no Hub model to restore"])
    repo_dir = (rng or random.Random()).choice(repos)
    repo_id = repo_id_of(repo_dir)
    tmp = Path(tempfile.mkdtemp(prefix="idp-restore-drill-", dir=workdir))
    try:
        result = restore(target, snapshot, f"cache/{repo_dir}", tmp / repo_dir, log=log)
        problems = check_restored_cache(tmp, repo_dir)
        return DrillReport(snapshot, repo_id, result.files, result.bytes, problems, time.monotonic() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_restored_cache(cache: Path, repo_dir: str) -> list[str]:
    """What makes `cache` not a usable Hugging Face cache for `repo_dir` (empty: it is one)."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    problems: list[str] = []
    info = scan_cache_dir(cache)
    problems += [f"huggingface_hub's scan: {w}" for w in info.warnings]
    repos = [r for r in info.repos if r.repo_path.name == repo_dir]
    if not repos:
        return problems + [f"huggingface_hub finds no repo {repo_dir} in the restored cache"]
    repo = repos[0]
    for blob in sorted((cache / repo_dir / "blobs").iterdir()):
        algo = "sha256" if len(blob.name) == 64 else "git-sha1"
        actual = hash_file(blob, algo)
        if actual != blob.name:
            problems.append(f"{repo_dir}/blobs/{blob.name}: {algo} of the restored file is {actual}")
    for rev in repo.revisions:
        # local_files_only: the load must need nothing but the restored cache (no network, no Hub)
        revision = sorted(rev.refs)[0] if rev.refs else rev.commit_hash
        try:
            folder = Path(snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=revision,
                                            cache_dir=cache, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any failure to load is the drill's finding
            problems.append(f"{repo.repo_id}@{revision} does not load offline: {type(exc).__name__}: {exc}")
            continue
        for f in rev.files:
            if not (folder / Path(f.file_path).relative_to(rev.snapshot_path)).is_file():
                problems.append(f"{repo.repo_id}@{revision}: {f.file_path} is not readable after the offline load")
    return problems
