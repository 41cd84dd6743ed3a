"""The one git runner of the project: the git CLI with raw bytes, no shell, no GitPython, a clear error.

Shared by the knowledge domain (its log parser and sync build on it) and the benchmarks (provenance:
the heads of the lab's repos at the time of a run). GitPython leaks in a long-running process (its
README says so), which a sensor is; the CLI does not.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path


class GitError(RuntimeError):
    """A git command failed (the message names the repo, the command and git's own words)."""


class RepoUnavailable(GitError):
    """The repo is missing, not a git repo, refused (ownership, permissions) or does not answer in time."""


# git reads its config; these keep a user's settings from changing what we parse
CONFIG_ARGS = ["-c", "log.showSignature=false", "-c", "core.quotePath=false", "-c", "diff.renameLimit=1000",
           "-c", "color.ui=never"]


def git_env() -> dict[str, str]:
    """The environment every git call runs in: C locale, no prompt, no lock taken for a read, no pager."""
    env = dict(os.environ)
    env.update(LC_ALL="C", LANG="C", GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0", GIT_PAGER="cat",
               GIT_NO_REPLACE_OBJECTS="1")
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_CEILING_DIRECTORIES"):
        env.pop(var, None)
    return env


def git(repo: str | os.PathLike[str], *args: str, timeout: float = 120.0, ok: Sequence[int] = (0,)) -> bytes:
    """Run `git -C repo args...` (no shell) and return stdout; RepoUnavailable/GitError say what failed."""
    path = Path(repo)
    if not path.is_dir():
        raise RepoUnavailable(f"git repo {path} does not exist. Fix: correct git_repos[].path in the lab inventory.")
    cmd = ["git", "-C", str(path), *CONFIG_ARGS, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=git_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RepoUnavailable(f"git {args[0]} in {path} did not answer within {timeout:.0f} s (repo locked or "
                              f"on a stalled disk?)") from None
    except OSError as exc:
        raise RepoUnavailable(f"cannot run git in {path}: {exc}. Fix: install git (make install does).") from None
    if proc.returncode not in ok:
        err = proc.stderr.decode("utf-8", "replace").strip()
        cls = RepoUnavailable if is_unavailable(err) else GitError
        raise cls(f"git {' '.join(args[:3])} in {path} failed ({proc.returncode}): {err[:500]}")
    return proc.stdout


def is_unavailable(err: str) -> bool:
    """Whether git's error text means the repo cannot be read at all (rather than a bad command)."""
    return any(s in err for s in ("not a git repository", "dubious ownership", "Permission denied",
                                  "cannot change to", "Unable to read", "index.lock", ".lock': File exists"))


def resolve_refs(repo: str | os.PathLike[str], branches: Iterable[str]) -> dict[str, str | None]:
    """The commit sha of each branch (None when it does not exist), in one cheap git call."""
    branches = list(branches)
    out = git(repo, "for-each-ref", "--format=%(objectname)%00%(refname)", "--",
              *(f"refs/heads/{b}" for b in branches), timeout=20.0)
    found: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, ref = line.partition(b"\0")
        found[ref.decode("utf-8", "surrogateescape").removeprefix("refs/heads/")] = sha.decode()
    return {b: found.get(b) for b in branches}


def exists(repo: str | os.PathLike[str], sha: str) -> bool:
    """Whether `sha` is a commit present in the repo (gc'd or outside a shallow clone: False)."""
    out = git(repo, "cat-file", "-t", sha, ok=(0, 1, 128), timeout=20.0)
    return out.strip() == b"commit"


def is_ancestor(repo: str | os.PathLike[str], old: str, new: str) -> bool:
    cmd = ["git", "-C", str(repo), "merge-base", "--is-ancestor", old, new]
    rc = subprocess.run(cmd, capture_output=True, timeout=60.0, env=git_env(), stdin=subprocess.DEVNULL).returncode
    if rc not in (0, 1):
        raise GitError(f"git merge-base --is-ancestor {old[:12]} {new[:12]} in {repo} failed ({rc})")
    return rc == 0


def merge_base(repo: str | os.PathLike[str], a: str, b: str) -> str | None:
    out = git(repo, "merge-base", a, b, ok=(0, 1), timeout=60.0).strip()
    return out.decode() or None


def is_shallow(repo: str | os.PathLike[str]) -> bool:
    return git(repo, "rev-parse", "--is-shallow-repository", timeout=20.0).strip() == b"true"


def rev_list(repo: str | os.PathLike[str], include: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Shas reachable from `include` and not from `exclude` (no diffs: cheap even for 100k commits)."""
    if not include:
        return []
    args = ["rev-list", "--topo-order", *include, *(f"^{x}" for x in exclude), "--"]
    return [s.decode() for s in git(repo, *args).split()]
