"""The model cache's check judgements and texts (plain Python; the asset shell turns them into checks)."""

from __future__ import annotations

from typing import Iterable, Mapping

from .inventory import CacheInventory, human_bytes
from .records import ExpectedSnapshot
from .rehash import RehashReport
from idp_pipelines.checks import Judgement

CACHE_BUDGET = "within_budget"
CACHE_ORPHANS = "no_orphaned_blobs"
CACHE_INCOMPLETE = "no_incomplete_downloads"
CACHE_UNUSED = "no_unused_revisions"
CACHE_COMPLETE = "models_complete"
REHASH_INTACT = "no_bit_rot"


def _listing(rows: list[dict], key: str, size: str = "bytes") -> str:
    shown = [f"{r[key]} ({human_bytes(r[size])})" for r in rows[:10]]
    return "; ".join(shown) + (f"; and {len(rows) - 10} more" if len(rows) > 10 else "")


def missing_files(cache: CacheInventory, expected: Mapping[str, ExpectedSnapshot],
                  models: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Per model (name, repo_id) of the inventory: the files its latest planned download lists that the
    cache lacks at that commit, or holds with another size or hash. Models never planned are left out."""
    have = {(f["repo_id"], f["commit"], f["path"]): f for f in cache.files}
    out: dict[str, list[str]] = {}
    for name, repo_id in models:
        snap = expected.get(name)
        if snap is None or snap.repo_id != repo_id:
            continue
        bad = []
        for path, (size, digest) in sorted(snap.files.items()):
            f = have.get((repo_id, snap.commit_sha, path))
            if f is None:
                bad.append(path)
            elif f["size"] != size or (f["hash"] is not None and f["hash"] != digest):
                bad.append(f"{path} (size {f['size']} or hash differs from the Hub's {size} bytes)")
        if bad:
            out[name] = bad
    return out


def judge_cache(cache: CacheInventory, expected: Mapping[str, ExpectedSnapshot],
                models: Iterable[tuple[str, str]], lab_file: str = "lab.yaml") -> list[Judgement]:
    """The model_cache_inventory checks: budget, orphans, incomplete downloads, unused revisions, and
    whether each model holds every file its latest download planned."""
    models = list(models)
    budget = cache.budget_bytes or 0
    pct = 100 * cache.budget_used if cache.budget_used is not None else 0.0
    missing = missing_files(cache, expected, models)
    never = [name for name, repo in models if name not in expected or expected[name].repo_id != repo]
    if missing:
        complete = "; ".join(
            f"{name} ({expected[name].repo_id}@{expected[name].commit_sha[:12]}) lacks {len(files)} of "
            f"{len(expected[name].files)} file(s): {', '.join(files[:10])}"
            + (f" and {len(files) - 10} more" if len(files) > 10 else "")
            for name, files in missing.items()
        ) + ". Fix: materialise hub_model for " + ", ".join(missing) + " (a failed or interrupted download)."
    else:
        complete = f"every downloaded model holds all its files ({len(models) - len(never)} model(s))"
        if never:
            complete += f"; not downloaded yet: {', '.join(never)}"
    return [
        Judgement(CACHE_BUDGET, not cache.over_budget,
                  f"{human_bytes(cache.total_bytes)} of {human_bytes(budget)} ({pct:.1f} %)"
                  + (f". Fix: delete unused revisions or raise `model_cache.budget_gb` in {lab_file}"
                     if cache.over_budget else "")),
        Judgement(CACHE_ORPHANS, not cache.orphaned_blobs,
                  (f"{len(cache.orphaned_blobs)} orphaned blob(s) hold {human_bytes(cache.orphaned_bytes)}: "
                   + _listing(cache.orphaned_blobs, "path")) if cache.orphaned_blobs else "none", "WARN"),
        Judgement(CACHE_INCOMPLETE, not cache.incomplete_downloads,
                  (f"{len(cache.incomplete_downloads)} incomplete download(s) hold "
                   f"{human_bytes(cache.incomplete_bytes)}: " + _listing(cache.incomplete_downloads, "path"))
                  if cache.incomplete_downloads else "none", "WARN"),
        Judgement(CACHE_UNUSED, not cache.unused_revisions,
                  (f"{len(cache.unused_revisions)} revision(s) no model uses hold {human_bytes(cache.unused_bytes)}: "
                   + "; ".join(f"{r['repo_id']}@{r['commit'][:12]} ({human_bytes(r['bytes'])})"
                               for r in cache.unused_revisions[:10])) if cache.unused_revisions else "none", "WARN"),
        Judgement(CACHE_COMPLETE, not missing, complete),
    ]


def judge_rehash(report: RehashReport, models_by_repo: Mapping[str, list[str]]) -> Judgement:
    """Bit rot found by a re-hash slice fails the check, naming each file, both hashes and the repair."""
    s = report.slice
    scope = (f"re-hashed {len(report.checked)} blob(s), {human_bytes(s.bytes)} of {human_bytes(s.total_bytes)} "
             f"in the cache (every blob within {report.period_days} day(s))")
    if not report.findings:
        return Judgement(REHASH_INTACT, True, f"{scope}: every hash matches")
    parts, repair = [], set()
    for f in report.findings:
        parts.append(f"{', '.join(f['files'])}: expected {f['algo']} {f['expected']}, got {f['actual']}")
        for name in f["files"]:
            repair.update(models_by_repo.get(name.split("@", 1)[0], []))
    fix = (f"materialise hub_model for {', '.join(sorted(repair))}: it re-hashes the file and fetches a good copy"
           if repair else "no model of the inventory uses these files: delete them from the cache")
    return Judgement(REHASH_INTACT, False,
                     f"{scope}: {len(report.findings)} mismatch(es) (bit rot or an edit behind the cache's back): "
                     + "; ".join(parts) + f". Fix: {fix}.")
