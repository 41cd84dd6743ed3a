"""Read commits with the git CLI: raw bytes, NUL separators, never a shell, never GitPython.

One `git log -z --numstat -M` per range reads every field and every file change of many commits in a
single process, as bytes. git itself re-encodes a commit whose `encoding` header it can convert to
UTF-8 (a user format always goes through UTF-8, whatever --encoding says) and passes the raw bytes through
when it cannot. So bytes are decoded as UTF-8, then with the commit's declared encoding, then as Latin-1
(which cannot fail): a badly encoded commit is readable, never a crash.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path


class GitError(RuntimeError):
    """A git command failed (the message names the repo, the command and git's own words)."""


class RepoUnavailable(GitError):
    """The repo is missing, not a git repo, refused (ownership, permissions) or does not answer in time."""


_SHA = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_HEADER = b"\x1e"  # marks the first field of each commit; a numstat entry starts with a digit or '-'
# fields of one commit, NUL-separated; the raw message (%B) is last because it is the only free text
_FORMAT = "%x1e%H%x00%P%x00%e%x00%an%x00%ae%x00%ad%x00%cn%x00%ce%x00%cd%x00%B"
_NFIELDS = 10
# git reads its config; these keep a user's settings from changing what we parse
_CONFIG = ["-c", "log.showSignature=false", "-c", "core.quotePath=false", "-c", "diff.renameLimit=1000",
           "-c", "color.ui=never"]


@dataclass(frozen=True)
class FileChange:
    path: str
    insertions: int | None  # None for a binary file
    deletions: int | None
    old_path: str | None = None  # set when the change is a rename

    def to_json(self) -> dict:
        d = {"path": self.path, "insertions": self.insertions, "deletions": self.deletions}
        if self.old_path is not None:
            d["old_path"] = self.old_path
        return d


@dataclass(frozen=True)
class Commit:
    sha: str
    parents: tuple[str, ...]
    author_name: str
    author_email: str
    author_time: datetime  # aware, in the author's own zone
    committer_name: str
    committer_email: str
    commit_time: datetime
    subject: str
    body: str
    encoding: str | None = None
    files: tuple[FileChange, ...] = ()

    @property
    def author_tz(self) -> str:
        return _tz_text(self.author_time)

    @property
    def commit_tz(self) -> str:
        return _tz_text(self.commit_time)

    @property
    def insertions(self) -> int:
        return sum(f.insertions or 0 for f in self.files)

    @property
    def deletions(self) -> int:
        return sum(f.deletions or 0 for f in self.files)


def _tz_text(t: datetime) -> str:
    off = t.utcoffset() or timedelta(0)
    minutes = int(off.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


# ------------------------------------------------------------------------------------------------ git


def _env() -> dict[str, str]:
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
    cmd = ["git", "-C", str(path), *_CONFIG, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RepoUnavailable(f"git {args[0]} in {path} did not answer within {timeout:.0f} s (repo locked or "
                              f"on a stalled disk?)") from None
    except OSError as exc:
        raise RepoUnavailable(f"cannot run git in {path}: {exc}. Fix: install git (make install does).") from None
    if proc.returncode not in ok:
        err = proc.stderr.decode("utf-8", "replace").strip()
        cls = RepoUnavailable if _unavailable(err) else GitError
        raise cls(f"git {' '.join(args[:3])} in {path} failed ({proc.returncode}): {err[:500]}")
    return proc.stdout


def _unavailable(err: str) -> bool:
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
    rc = subprocess.run(cmd, capture_output=True, timeout=60.0, env=_env(), stdin=subprocess.DEVNULL).returncode
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


# ------------------------------------------------------------------------------------------ moves


@dataclass(frozen=True)
class Move:
    """How a branch got from `old` to `new`: first, none, fast-forward, rewrite or cursor-missing."""

    kind: str
    old: str | None
    new: str | None
    merge_base: str | None = None

    @property
    def exclude(self) -> list[str]:
        """What a read of the new commits can exclude."""
        if self.kind == "fast-forward":
            return [self.old]
        if self.kind == "rewrite" and self.merge_base:
            return [self.merge_base]
        return []


def classify_move(repo: str | os.PathLike[str], old: str | None, new: str | None) -> Move:
    """Compare a remembered head with the current one (only called when they differ, so ticks stay cheap)."""
    if new is None:
        return Move("branch-missing", old, None)
    if old is None:
        return Move("first", None, new)
    if old == new:
        return Move("none", old, new)
    if not exists(repo, old):
        return Move("cursor-missing", old, new)
    if is_ancestor(repo, old, new):
        return Move("fast-forward", old, new)
    return Move("rewrite", old, new, merge_base(repo, old, new))


# --------------------------------------------------------------------------------------- reading


def decode(raw: bytes, encoding: str | None = None) -> str:
    """UTF-8 (what git converted to), then the commit's declared encoding, then Latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if encoding:
        try:
            codecs.lookup(encoding)
            return raw.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            pass
    return raw.decode("latin-1", "replace")


def _when(raw: bytes) -> datetime:
    """git's raw date ('1700000000 +0200') as an aware datetime in that zone."""
    try:
        secs, _, tz = raw.decode("ascii").partition(" ")
        sign = -1 if tz.startswith("-") else 1
        off = timedelta(hours=int(tz[1:3]), minutes=int(tz[3:5])) * sign
        return datetime.fromtimestamp(int(secs), timezone(off))
    except (ValueError, IndexError, OverflowError):
        return datetime.fromtimestamp(0, timezone.utc)


def _split_message(msg: str) -> tuple[str, str]:
    """Subject as git's %s (first paragraph, lines joined), body the rest."""
    msg = msg.strip("\n")
    head, sep, rest = msg.partition("\n\n")
    subject = " ".join(line.strip() for line in head.splitlines())
    return subject, rest.strip("\n")


def _num(raw: bytes) -> int | None:
    return None if raw == b"-" else int(raw)


def parse_log(out: bytes) -> list[Commit]:
    """Parse `git log -z --numstat -M --format=_FORMAT` output."""
    return list(parse_tokens(iter(out.split(b"\0"))))


def _stream_tokens(stream, chunk: int = 1 << 20) -> Iterator[bytes]:
    """NUL-separated tokens of a pipe, as git writes it (parsing overlaps git's own work)."""
    rest = b""
    while data := stream.read1(chunk):
        parts = (rest + data).split(b"\0")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def parse_tokens(tokens: Iterator[bytes]) -> Iterator[Commit]:
    """Commits from the NUL-separated tokens of `git log -z --numstat -M --format=_FORMAT`."""
    tok = next(tokens, None)
    while tok is not None:
        if not tok.startswith(_HEADER):
            tok = next(tokens, None)  # trailing newline / empty token
            continue
        f = [tok]
        for _ in range(_NFIELDS - 1):
            nxt = next(tokens, None)
            if nxt is None:
                raise GitError("git log output was cut off (truncated read)")
            f.append(nxt)
        enc = f[2].decode("ascii", "replace") or None
        subject, body = _split_message(decode(f[9], enc))
        files: list[FileChange] = []
        tok = next(tokens, None)
        # numstat follows the commit's terminator as "\n<ins>\t<del>\t<path>" or, for a rename,
        # "<ins>\t<del>\t" then the old and new paths as two more tokens
        if tok is not None and tok.startswith(b"\n"):
            tok = tok[1:]
            while tok and not tok.startswith(_HEADER):
                parts = tok.split(b"\t", 2)
                if len(parts) != 3:
                    break
                ins, dels, path = parts
                if path:
                    files.append(FileChange(decode(path), _num(ins), _num(dels)))
                else:
                    old, new = next(tokens, b""), next(tokens, b"")
                    files.append(FileChange(decode(new), _num(ins), _num(dels), decode(old)))
                tok = next(tokens, None)
        yield Commit(
            sha=f[0][1:].decode("ascii"),
            parents=tuple(p.decode("ascii") for p in f[1].split()),
            encoding=enc,
            author_name=decode(f[3], enc), author_email=decode(f[4], enc), author_time=_when(f[5]),
            committer_name=decode(f[6], enc), committer_email=decode(f[7], enc), commit_time=_when(f[8]),
            subject=subject, body=body, files=tuple(files),
        )


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Building 100k small objects triggers the cyclic GC again and again; none of them form cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def log_args(include: Sequence[str], exclude: Sequence[str] = (), max_count: int | None = None) -> list[str]:
    args = ["log", "-z", "--encoding=UTF-8", "--date=raw", f"--format={_FORMAT}", "--numstat", "-M",
            "--no-ext-diff", "--no-textconv", "--topo-order"]
    if max_count:
        args.append(f"--max-count={max_count}")
    return [*args, *include, *(f"^{x}" for x in exclude), "--"]


def read_commits(repo: str | os.PathLike[str], include: Sequence[str], exclude: Sequence[str] = (),
                 max_count: int | None = None) -> list[Commit]:
    """Commits reachable from `include` but not `exclude`, newest first, with their file changes.

    Parsed while git writes, from its pipe: on two cores the parse mostly hides behind git's diffing.
    """
    if not include:
        return []
    path = Path(repo)
    if not path.is_dir():
        raise RepoUnavailable(f"git repo {path} does not exist. Fix: correct git_repos[].path in the lab inventory.")
    cmd = ["git", "-C", str(path), *_CONFIG, *log_args(include, exclude, max_count)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=_env())
        try:
            with _no_gc():
                commits = list(parse_tokens(_stream_tokens(proc.stdout)))
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip()
            cls = RepoUnavailable if _unavailable(text) else GitError
            raise cls(f"git log in {path} failed ({rc}): {text[:500]}")
    return commits


# ------------------------------------------------------------------------------------------- sync


@dataclass
class Sync:
    """What one repo sync found: new commits, branch membership, rewritten-away shas, new heads."""

    commits: list[Commit] = field(default_factory=list)
    members: dict[str, list[str]] = field(default_factory=dict)  # branch -> shas new on that branch
    rewritten: list[str] = field(default_factory=list)  # no longer reachable from any watched head
    heads: dict[str, str] = field(default_factory=dict)
    moves: dict[str, Move] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def sync_repo(repo: str | os.PathLike[str], branches: Sequence[str], old_heads: dict[str, str],
              *, max_new: int | None = None) -> Sync:
    """Read what is new on each watched branch since `old_heads` (from the warehouse).

    Each commit's diff is read once even when several branches share it; branch membership comes from
    `git rev-list` (no diffs, cheap). On a rewrite (force-push) the commits between the merge base and
    the old head that no watched branch still reaches are returned in `rewritten`. A remembered head
    that no longer exists (gc, shallow clone) means re-reading from the new head; the caller drops
    commits it already has.
    """
    sync = Sync()
    current = resolve_refs(repo, branches)
    live = [h for h in current.values() if h]
    for branch in branches:
        new, old = current[branch], old_heads.get(branch)
        move = classify_move(repo, old, new)
        sync.moves[branch] = move
        if move.kind == "branch-missing":
            sync.messages.append(f"branch {branch!r} does not exist in {repo}; skipped")
            continue
        sync.heads[branch] = new
        if move.kind == "none":
            continue
        if move.kind == "cursor-missing":
            shallow = " (shallow clone)" if is_shallow(repo) else ""
            sync.messages.append(f"{branch}: last synced head {old[:12]} is no longer in the repo{shallow}; "
                                 f"re-reading from {new[:12]}, already known commits are kept as they are")
        if move.kind == "rewrite":
            gone = rev_list(repo, [old], exclude=live)
            sync.rewritten.extend(gone)
            base = (move.merge_base or "none")[:12]
            sync.messages.append(f"{branch}: history rewritten (force-push) from {old[:12]} to {new[:12]}, merge "
                                 f"base {base}; {len(gone)} commit(s) rewritten away are kept, marked rewritten")
        sync.members[branch] = []
    # each commit's diff is read once: the first moved branch with one `git log` (its shas are its
    # members), later branches (which often share most of it) list their range with the cheap
    # rev-list and read only the shas not read yet
    seen: set[str] = set()
    for branch in list(sync.members):
        move = sync.moves[branch]
        limit = max_new if move.kind in ("first", "cursor-missing") else None
        if not seen:
            got = read_commits(repo, [move.new], move.exclude, max_count=limit)
            shas = [c.sha for c in got]
        else:
            shas = rev_list(repo, [move.new], move.exclude)[:limit]
            got = _read_listed(repo, [s for s in shas if s not in seen])
        if limit and len(shas) >= limit:
            sync.messages.append(f"{branch}: read at most the newest {limit} commits (max_new_commits)")
        sync.members[branch] = shas
        sync.commits.extend(got)
        seen.update(c.sha for c in got)
    return sync


def _read_listed(repo, shas: list[str]) -> list[Commit]:
    """Read exactly these commits, in one git call (the shas go to git's stdin)."""
    if not shas:
        return []
    cmd = ["git", "-C", str(repo), *_CONFIG, *log_args([], [])[:-1], "--no-walk=unsorted", "--stdin", "--"]
    proc = subprocess.run(cmd, input="\n".join(shas).encode() + b"\n", capture_output=True, timeout=3600.0,
                          env=_env())
    if proc.returncode != 0:
        raise GitError(f"git log --stdin in {repo} failed ({proc.returncode}): "
                       f"{proc.stderr.decode('utf-8', 'replace')[:500]}")
    with _no_gc():
        return parse_log(proc.stdout)
