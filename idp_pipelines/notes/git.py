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
import fcntl
import gc
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

# the runner is shared (gitcli); this module keeps what reading and syncing history needs
from idp_pipelines.gitcli import (
    CONFIG_ARGS,
    GitError,
    RepoUnavailable,
    exists,
    git_env,
    is_ancestor,
    is_shallow,
    is_unavailable,
    merge_base,
    resolve_refs,
    rev_list,
)

__all__ = ["BATCH_COMMITS", "Commit", "CommitBatch", "FileChange", "GitError", "Move", "RepoUnavailable", "Sync",
           "classify_move", "iter_log", "log_args", "no_gc", "sync_repo"]

_HEADER = b"\x1e"  # marks the first field of each commit; a numstat entry starts with a digit or '-'
# fields of one commit, NUL-separated; the raw message (%B) is last because it is the only free text
_FORMAT = "%x1e%H%x00%P%x00%e%x00%an%x00%ae%x00%ad%x00%cn%x00%ce%x00%cd%x00%B"
_NFIELDS = 10


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


_RAW_TZ = re.compile(rb"[+-][0-9]{4}")
_MIN_EPOCH, _MAX_EPOCH = -62_135_596_800 + 86_400, 253_402_300_799 - 86_400  # years 1-9999 in any zone


def _raw_date(raw: bytes) -> tuple[int, str]:
    """git's raw date ('1700000000 +0200') as epoch seconds and zone; a malformed one is the epoch in UTC."""
    secs, _, tz = raw.partition(b" ")
    try:
        s = int(secs)
    except ValueError:
        return 0, "+0000"
    if not _MIN_EPOCH <= s <= _MAX_EPOCH or not _RAW_TZ.fullmatch(tz):
        return 0, "+0000"
    return s, tz.decode("ascii")


def _when(epoch: int, tz: str) -> datetime:
    """Epoch seconds and a '+0200' zone as an aware datetime in that zone."""
    sign = -1 if tz.startswith("-") else 1
    return datetime.fromtimestamp(epoch, timezone(timedelta(hours=int(tz[1:3]), minutes=int(tz[3:5])) * sign))


# git's isspace(): space, tab, LF and CR; not \v or \f (a line of those is not blank to git)
_GIT_SPACE = " \t\n\r"


def _split_message(msg: str) -> tuple[str, str]:
    """Subject and body as git's %s and %b (pretty.c): blank lines first are skipped, the subject is the
    first paragraph with each line's trailing whitespace cut and the lines joined by a space; a line of
    only whitespace ends it. The body is the rest from its first non-blank line, trailing whitespace cut.

    Lines are split at "\n" only, as git does (str.splitlines would also split at \x1c-\x1e, \x85...).
    """
    # the common shape, a one-line subject then a blank line (or nothing), without walking the lines:
    # it runs for every commit of a first sync
    first, _, rest = msg.partition("\n")
    subject = first.rstrip(_GIT_SPACE)
    if subject:
        second, _, after = rest.partition("\n")
        if not second.strip(_GIT_SPACE):
            return subject, _body(after)
    n = len(msg)
    pos = 0
    subject = None
    while pos < n:
        end = msg.find("\n", pos)
        if end < 0:
            end = n
        line = msg[pos:end].rstrip(_GIT_SPACE)
        pos = end + 1
        if line:
            subject = line if subject is None else f"{subject} {line}"
        elif subject is not None:
            break
    return subject or "", _body(msg[pos:]) if pos < n else ""


def _body(rest: str) -> str:
    """The text from its first non-blank line (whose indentation stays), trailing whitespace cut."""
    text = rest.lstrip(_GIT_SPACE)
    if len(text) != len(rest):
        text = rest[rest.rfind("\n", 0, len(rest) - len(text)) + 1:]
    return text.rstrip(_GIT_SPACE)


class CommitBatch(Sequence[Commit]):
    """Commits as columns: what the parser fills and DuckDB scans, without an object per commit or file.

    Indexing or iterating gives `Commit` views (built on demand, for callers that want rows). A commit's
    file changes are the slice `file_end[i-1]:file_end[i]` of the flat file columns.
    """

    def __init__(self) -> None:
        self.sha: list[str] = []
        self.parents: list[str] = []  # space-separated, as git prints them
        self.encoding: list[str | None] = []
        self.author_name: list[str] = []
        self.author_email: list[str] = []
        self.author_epoch: list[int] = []
        self.author_tz: list[str] = []  # '+0200'
        self.committer_name: list[str] = []
        self.committer_email: list[str] = []
        self.commit_epoch: list[int] = []
        self.commit_tz: list[str] = []
        self.subject: list[str] = []
        self.body: list[str] = []
        self.file_end: list[int] = []
        self.file_path: list[str] = []
        self.file_insertions: list[int | None] = []  # None for a binary file
        self.file_deletions: list[int | None] = []
        self.file_old_path: list[str | None] = []  # set when the change is a rename

    _COMMIT_COLUMNS = ("sha", "parents", "encoding", "author_name", "author_email", "author_epoch", "author_tz",
                       "committer_name", "committer_email", "commit_epoch", "commit_tz", "subject", "body")
    _FILE_COLUMNS = ("file_path", "file_insertions", "file_deletions", "file_old_path")

    def __len__(self) -> int:
        return len(self.sha)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = (self.file_end[i - 1] if i else 0), self.file_end[i]
        files = tuple(FileChange(self.file_path[k], self.file_insertions[k], self.file_deletions[k],
                                 self.file_old_path[k]) for k in range(lo, hi))
        return Commit(sha=self.sha[i], parents=tuple(self.parents[i].split()), encoding=self.encoding[i],
                      author_name=self.author_name[i], author_email=self.author_email[i],
                      author_time=_when(self.author_epoch[i], self.author_tz[i]),
                      committer_name=self.committer_name[i], committer_email=self.committer_email[i],
                      commit_time=_when(self.commit_epoch[i], self.commit_tz[i]),
                      subject=self.subject[i], body=self.body[i], files=files)

    def extend(self, other: CommitBatch) -> None:
        offset = self.file_end[-1] if self.file_end else 0
        for name in self._COMMIT_COLUMNS + self._FILE_COLUMNS:
            getattr(self, name).extend(getattr(other, name))
        self.file_end.extend(e + offset for e in other.file_end)

    def parse(self, toks: list[bytes], i: int = 0, *, eof: bool = True, limit: int | None = None) -> int:
        """Append commits from `toks[i:]`, the NUL-separated tokens of `git log -z --numstat -M
        --format=_FORMAT`; return the index of the first token not consumed.

        Stops after `limit` commits, or (unless `eof`) before a commit whose end is not in `toks` yet:
        its numstat may go on in git's next write. Fields are taken by position and a numstat entry
        always starts with a digit or '-', so a message or path that looks like a header cannot
        shift the parse.
        """
        n = len(toks)
        stop = len(self.sha) + limit if limit else -1
        n_files = self.file_end[-1] if self.file_end else 0
        while i < n:
            if len(self.sha) == stop:
                return i
            if not toks[i].startswith(_HEADER):
                i += 1  # the newline / empty token between commits
                continue
            j = i + _NFIELDS
            if j > n:
                if eof:
                    raise GitError("git log output was cut off (truncated read)")
                return i
            # numstat follows the commit's fields as "\n<ins>\t<del>\t<path>" or, for a rename,
            # "<ins>\t<del>\t" then the old and new paths as two more tokens; it ends at a token
            # that is no entry (the next header, an empty token) or at the end of the output
            entries = []
            if j < n and toks[j].startswith(b"\n"):
                tok = toks[j][1:]
                while tok and not tok.startswith(_HEADER):
                    parts = tok.split(b"\t", 2)
                    if len(parts) != 3:
                        break
                    if parts[2]:
                        entries.append((parts[0], parts[1], parts[2], None))
                        j += 1
                    elif j + 3 <= n:
                        entries.append((parts[0], parts[1], toks[j + 2], toks[j + 1]))
                        j += 3
                    elif eof:
                        entries.append((parts[0], parts[1], toks[j + 2] if j + 2 < n else b"",
                                        toks[j + 1] if j + 1 < n else b""))
                        j = n
                    else:
                        return i
                    if j >= n:
                        break
                    tok = toks[j]
            if j >= n and not eof:
                return i  # more numstat may follow in the next read
            self._append(toks[i:i + _NFIELDS], entries)
            n_files += len(entries)
            self.file_end.append(n_files)
            i = j
        return i

    def _append(self, f: list[bytes], entries: list[tuple[bytes, bytes, bytes, bytes | None]]) -> None:
        enc = f[2].decode("ascii", "replace") or None
        subject, body = _split_message(decode(f[9], enc))
        self.sha.append(f[0][1:].decode("ascii"))
        self.parents.append(f[1].decode("ascii"))
        self.encoding.append(enc)
        self.author_name.append(decode(f[3], enc))
        self.author_email.append(decode(f[4], enc))
        t, z = _raw_date(f[5])
        self.author_epoch.append(t)
        self.author_tz.append(z)
        self.committer_name.append(decode(f[6], enc))
        self.committer_email.append(decode(f[7], enc))
        t, z = _raw_date(f[8])
        self.commit_epoch.append(t)
        self.commit_tz.append(z)
        self.subject.append(subject)
        self.body.append(body)
        for ins, dels, path, old in entries:
            self.file_path.append(decode(path))
            self.file_old_path.append(None if old is None else decode(old))
            self.file_insertions.append(None if ins == b"-" else int(ins))
            self.file_deletions.append(None if dels == b"-" else int(dels))


def _parse_stream(stream, batch_size: int, chunk: int = 1 << 18) -> Iterator[CommitBatch]:
    """Batches of commits from git's pipe as it writes (parsing overlaps git's own work)."""
    carry: list[bytes] = []  # tokens of a commit whose end has not arrived yet
    rest = b""  # a token cut by the read
    batch = CommitBatch()
    while True:
        data = stream.read(chunk)  # blocks for a whole chunk: a wake-up per git write cost 0.8 s of CPU
        eof = not data
        if eof:
            toks = carry + [rest] if rest else carry
        else:
            toks = (rest + data).split(b"\0")
            rest = toks.pop()
            if carry:
                toks = carry + toks
        i = 0
        while True:
            with no_gc():
                i = batch.parse(toks, i, eof=eof, limit=batch_size - len(batch))
            if len(batch) < batch_size:
                break
            yield batch
            batch = CommitBatch()
        carry = toks[i:]
        if eof:
            break
    if len(batch):
        yield batch


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """For bulk work on 100k commits (parse, load, render): it allocates millions of small objects, none
    of which form cycles, so the cyclic GC would only rescan them again and again. Also a decorator."""
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


_F_SETPIPE_SZ = 1031
BATCH_COMMITS = 10_000  # commits per batch handed on while git log still runs (bounds memory)


def iter_log(repo: str | os.PathLike[str], include: Sequence[str] = (), exclude: Sequence[str] = (),
             max_count: int | None = None, *, listed: Sequence[str] | None = None,
             batch_size: int = BATCH_COMMITS) -> Iterator[CommitBatch]:
    """Commits reachable from `include` but not `exclude` (or exactly the `listed` shas), newest first,
    with their file changes, in batches of `batch_size` as git writes them.

    Parsed from git's pipe while it works: on two cores the parse hides behind git's diffing, and a
    caller can store one batch while the next is read. Stopping early stops git.
    """
    if not include and not listed:
        return
    path = Path(repo)
    if not path.is_dir():
        raise RepoUnavailable(f"git repo {path} does not exist. Fix: correct git_repos[].path in the lab inventory.")
    if listed is not None:
        # git reads all of stdin before it writes anything, so writing it first cannot deadlock
        args = [*log_args([], [])[:-1], "--no-walk=unsorted", "--stdin", "--"]
    else:
        args = log_args(include, exclude, max_count)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["git", "-C", str(path), *CONFIG_ARGS, *args], stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.PIPE if listed is not None else subprocess.DEVNULL, env=git_env())
        try:
            if listed is not None:
                try:
                    proc.stdin.write("".join(f"{sha}\n" for sha in listed).encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # git failed early; its exit status and stderr say why
            with contextlib.suppress(OSError):  # Linux: a 1 MiB pipe, fewer wake-ups for git and us
                fcntl.fcntl(proc.stdout.fileno(), _F_SETPIPE_SZ, 1 << 20)
            yield from _parse_stream(proc.stdout, batch_size)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # the caller stopped early (or the parse failed): stop git too
                proc.kill()
            proc.stdout.close()
            proc.wait()
        if rc != 0:
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip()
            cls = RepoUnavailable if is_unavailable(text) else GitError
            raise cls(f"git log in {path} failed ({rc}): {text[:500]}")


# ------------------------------------------------------------------------------------------- sync


Sink = Callable[[str, CommitBatch], None]


@dataclass
class Sync:
    """What one repo sync found: new commits, branch membership, rewritten-away shas, new heads."""

    batches: list[tuple[str, CommitBatch]] = field(default_factory=list)  # (branch read, commits), kept
    # only when no sink took them
    read: int = 0  # commits read from git (stored or not)
    members: dict[str, list[str]] = field(default_factory=dict)  # branch -> shas new on that branch
    rewritten: list[str] = field(default_factory=list)  # no longer reachable from any watched head
    heads: dict[str, str] = field(default_factory=dict)
    moves: dict[str, Move] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def commits(self) -> CommitBatch:
        out = CommitBatch()
        for _, batch in self.batches:
            out.extend(batch)
        return out


def sync_repo(repo: str | os.PathLike[str], branches: Sequence[str], old_heads: dict[str, str],
              *, max_new: int | None = None, sink: Sink | None = None,
              batch_size: int = BATCH_COMMITS) -> Sync:
    """Read what is new on each watched branch since `old_heads` (from the warehouse).

    Each commit's diff is read once even when several branches share it; branch membership comes from
    `git rev-list` (no diffs, cheap). On a rewrite (force-push) the commits between the merge base and
    the old head that no watched branch still reaches are returned in `rewritten`. A remembered head
    that no longer exists (gc, shallow clone) means re-reading from the new head; the caller drops
    commits it already has. With a `sink`, each batch of commits goes to it (with the branch it was
    read for) as soon as it is parsed, and is not kept: memory stays bounded on any history.
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
        walk = not seen  # this branch's own `git log` lists its members
        if walk:
            shas: list[str] = []
            batches = iter_log(repo, [move.new], move.exclude, max_count=limit, batch_size=batch_size)
        else:
            shas = rev_list(repo, [move.new], move.exclude)[:limit]
            todo = [s for s in shas if s not in seen]
            batches = iter_log(repo, listed=todo, batch_size=batch_size) if todo else iter_log(repo)
        # closed at once when the sink fails: git is stopped now, not whenever the traceback is freed
        with contextlib.closing(batches):
            for batch in batches:
                if walk:
                    shas.extend(batch.sha)
                seen.update(batch.sha)
                sync.read += len(batch)
                if sink is not None:
                    sink(branch, batch)
                else:
                    sync.batches.append((branch, batch))
        if limit and len(shas) >= limit:
            sync.messages.append(f"{branch}: read at most the newest {limit} commits (max_new_commits)")
        sync.members[branch] = shas
    return sync
