"""Reading commits with the git CLI from real repos: history shapes, encodings, rewrites, shallow clones."""

from __future__ import annotations

import io
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from idp_pipelines import gitcli
from idp_pipelines.notes import git
from idp_pipelines.notes.git import RepoUnavailable, sync_repo
from tests.notes.gitutil import Repo


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "lab-configs")


def read_commits(repo: Repo, branch: str = "main") -> git.CommitBatch:
    """What a first sync of the branch reads (the path the git_commits asset takes), newest first."""
    return sync_repo(repo.path, [branch], {}).commits


def test_linear_history_with_rename_binary_and_zone(repo):
    first = repo.commit("Add compose file\n\nFirst version of the\nvLLM service.\n",
                       {"compose.yaml": "a\nb\nc\n"}, tz="-0530")
    second = repo.commit("Move compose file, add logo\n",
                         {"compose.yaml": None, "deploy/compose.yaml": "a\nb\nc\nd\n", "logo.png": b"\x89PNG\x00\x01"})
    c2, c1 = read_commits(repo)
    assert (c1.sha, c2.sha, c2.parents, c1.parents) == (first, second, (first,), ())
    assert c1.subject == "Add compose file" and c1.body == "First version of the\nvLLM service."
    assert (c1.author_name, c1.author_email, c1.author_tz) == ("Ada Lovelace", "ada@example.org", "-0530")
    assert c1.author_time.utcoffset() == -timedelta(hours=5, minutes=30)
    assert c1.author_time.timestamp() == repo.clock - 3600
    assert [(f.path, f.insertions, f.deletions) for f in c1.files] == [("compose.yaml", 3, 0)]
    files = {f.path: f for f in c2.files}
    assert files["deploy/compose.yaml"].old_path == "compose.yaml"  # -M: one rename, not delete + add
    assert (files["deploy/compose.yaml"].insertions, files["deploy/compose.yaml"].deletions) == (1, 0)
    assert files["logo.png"].insertions is None  # binary
    assert (c2.insertions, c2.deletions, len(c2.files)) == (1, 0, 2)


def test_merge_commit_has_both_parents(repo):
    base = repo.commit("base\n", {"a.txt": "a\n"})
    repo.git("checkout", "-q", "-b", "feature")
    feat = repo.commit("feature work\n", {"b.txt": "b\n"})
    repo.git("checkout", "-q", "main")
    main = repo.commit("main work\n", {"c.txt": "c\n"})
    repo.clock += 60
    repo.git("merge", "-q", "--no-ff", "-m", "Merge feature", "feature")
    merge = read_commits(repo)[0]
    assert merge.subject == "Merge feature" and set(merge.parents) == {main, feat}
    assert {c.sha for c in read_commits(repo)} == {base, feat, main, merge.sha}


MESSAGES = {
    "separator of spaces": "Tune vLLM for the 5070 Ti\n   \nRaise max_num_seqs to 48.\nKeep the rest.\n",
    "separator of a tab": "Tune vLLM\n\t\nbody after a tab line\n",
    "crlf": "Fix the compose file\r\n\r\nThe healthcheck\r\nwas wrong.\r\n",
    "no body": "Only a subject\n",
    "no newline at all": "Only a subject, no newline",
    "subject on two lines": "Subject that goes on\non a second line  \n \nbody\n",
    "blank lines first": "\n  \nLate subject\n\n\n\n  indented body\n\n",
    "form feed is no space to git": "a\n\x0c\nb\n",
}


@pytest.mark.parametrize("name", MESSAGES)
def test_subject_and_body_split_as_git_splits_them(repo, name):
    """%s is the first paragraph, lines joined by a space; a line of only whitespace (spaces, a tab, a
    CR) ends it. git itself is the reference: its own %s and %b for the same commit."""
    sha = repo.commit(MESSAGES[name].encode(), {"a.txt": name})
    (c,) = read_commits(repo)
    subject, body = gitcli.git(repo.path, "log", "-1", "--format=%s%x00%b", sha).split(b"\0")
    assert c.subject == subject.decode().removesuffix("\n")
    assert c.body == body.decode().rstrip(" \t\r\n")


def test_a_whitespace_separator_keeps_the_body_out_of_the_subject(repo):
    repo.commit("Tune vLLM for the 5070 Ti\n   \nRaise max_num_seqs to 48 because the\nKV cache has room.\n")
    repo.commit("Fix the compose file\r\n\r\nThe healthcheck was wrong.\r\n")
    repo.commit("No body at all\n")
    crlf_and_none, spaces = read_commits(repo)[:2], read_commits(repo)[2]
    assert (spaces.subject, spaces.body) == ("Tune vLLM for the 5070 Ti",
                                             "Raise max_num_seqs to 48 because the\nKV cache has room.")
    assert [(c.subject, c.body) for c in crlf_and_none] == [("No body at all", ""),
                                                           ("Fix the compose file", "The healthcheck was wrong.")]


def test_latin1_and_invalid_utf8_messages_decode_without_error(repo):
    latin = repo.commit("Caf\xe9 \xfcber Stra\xdfe\n".encode("latin-1"), {"a": "1"}, encoding="ISO-8859-1",
                        author="Ren\xe9")
    broken = repo.commit(b"bad \xff\xfe bytes \xc3(\n\nbody \x80\n", {"b": "2"})
    rows = {c.sha: c for c in read_commits(repo)}
    assert rows[latin].encoding == "ISO-8859-1"
    assert rows[latin].subject == "Café über Straße"
    assert rows[broken].encoding is None
    assert rows[broken].subject == "bad \xff\xfe bytes \xc3("  # UTF-8 failed: Latin-1, never an exception
    assert rows[broken].body == "body \x80"


def test_sync_is_incremental_and_reads_each_shared_commit_once(repo):
    shas = repo.linear(3)
    repo.git("branch", "dev")
    first = sync_repo(repo.path, ["main", "dev"], {})
    assert [c.sha for c in first.commits] == shas[::-1]  # read once, though on both branches
    assert first.members == {"main": shas[::-1], "dev": shas[::-1]}
    assert first.moves["main"].kind == "first"

    nothing = sync_repo(repo.path, ["main", "dev"], first.heads)
    assert len(nothing.commits) == 0 and {m.kind for m in nothing.moves.values()} == {"none"}

    new = repo.commit("new on main\n", {"x": "1"})
    ff = sync_repo(repo.path, ["main", "dev", "gone"], first.heads)
    assert [c.sha for c in ff.commits] == [new] and ff.moves["main"].kind == "fast-forward"
    assert ff.moves["gone"].kind == "branch-missing" and "'gone' does not exist" in ff.messages[0]


def test_force_push_keeps_rewritten_commits_and_reads_from_the_merge_base(repo):
    base = repo.linear(2)[-1]
    old = [repo.commit("wip 1\n", {"w": "1"}), repo.commit("wip 2\n", {"w": "2"})]
    before = sync_repo(repo.path, ["main"], {})
    repo.git("reset", "-q", "--hard", base)  # what a force-push leaves on the remote
    fixed = repo.commit("wip, squashed\n", {"w": "12"})
    after = sync_repo(repo.path, ["main"], before.heads)
    move = after.moves["main"]
    assert (move.kind, move.merge_base) == ("rewrite", base)
    assert [c.sha for c in after.commits] == [fixed]
    assert sorted(after.rewritten) == sorted(old)
    assert "history rewritten" in after.messages[0]


def test_head_missing_from_a_shallow_clone_rereads_from_the_new_head(repo, tmp_path):
    shas = repo.linear(12)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "5", "--branch", "main", f"file://{repo.path}", str(clone)],
                   check=True, capture_output=True)
    assert gitcli.is_shallow(clone) and not gitcli.exists(clone, shas[3])
    sync = sync_repo(clone, ["main"], {"main": shas[3]})  # our cursor lies outside the clone
    assert sync.moves["main"].kind == "cursor-missing"
    assert [c.sha for c in sync.commits] == shas[:-6:-1]  # the five in the clone
    assert "shallow clone" in sync.messages[0]
    assert sync.commits[-1].parents == ()  # the shallow boundary shows no parents


def test_max_new_bounds_a_first_sync(repo):
    shas = repo.linear(6)
    sync = sync_repo(repo.path, ["main"], {}, max_new=2)
    assert [c.sha for c in sync.commits] == shas[:-3:-1] and sync.heads == {"main": shas[-1]}


def test_missing_and_refused_repos_raise_repo_unavailable(tmp_path, repo):
    with pytest.raises(RepoUnavailable, match="does not exist"):
        gitcli.resolve_refs(tmp_path / "nope", ["main"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepoUnavailable, match="not a git repository"):
        gitcli.resolve_refs(tmp_path / "plain", ["main"])
    repo.linear(1)
    if os.geteuid() == 0:  # root is not stopped by modes, but git refuses a repo owned by someone else
        os.chown(repo.path, 12345, 12345)
        with pytest.raises(RepoUnavailable, match="dubious ownership"):
            gitcli.resolve_refs(repo.path, ["main"])
    else:
        os.chmod(repo.path / ".git", 0)
        try:
            with pytest.raises(RepoUnavailable):
                gitcli.resolve_refs(repo.path, ["main"])
        finally:
            os.chmod(repo.path / ".git", 0o755)


def test_hostile_branch_and_path_names_are_data_not_arguments(repo):
    repo.commit("x\n", {"--help": "1", "a|b#c^[d].txt": "2"})
    heads = gitcli.resolve_refs(repo.path, ["main", "--all", "-h"])
    assert heads["--all"] is None and heads["-h"] is None and heads["main"]
    (c,) = read_commits(repo)
    assert sorted(f.path for f in c.files) == ["--help", "a|b#c^[d].txt"]


def test_streamed_parse_matches_the_whole_output_at_any_read_and_batch_size(repo):
    """git writes in pieces: a commit cut anywhere by a read, even inside a rename, parses the same."""
    repo.commit("\x1e" + "a" * 40 + "\n\nthe subject looks like a header\n", {"tab\there.txt": "same\n" * 5,
                                                                        "new\nline.txt": "2\n"})
    repo.commit("Rename a hostile path\n", {"tab\there.txt": None, "moved\there|[x].txt": "same\n" * 5})
    repo.commit("Nothing changed\n")
    repo.commit("Caf\xe9\n".encode("latin-1"), {"logo.png": b"\x89PNG\0\1"}, encoding="ISO-8859-1")
    out = gitcli.git(repo.path, *git.log_args(["main"]))
    whole = read_commits(repo)
    assert [c.subject for c in whole] == ["Café", "Nothing changed", "Rename a hostile path", "\x1e" + "a" * 40]
    assert [(f.path, f.old_path) for f in whole[2].files] == [("moved\there|[x].txt", "tab\there.txt")]
    assert sorted(f.path for f in whole[3].files) == ["new\nline.txt", "tab\there.txt"]
    for chunk in (1, 2, 3, 5, 8, 13, 64, 1000):
        for batch_size in (1, 3, 100):
            got = git.CommitBatch()
            for batch in git._parse_stream(io.BytesIO(out), batch_size, chunk=chunk):
                assert 0 < len(batch) <= batch_size
                got.extend(batch)
            assert list(got) == list(whole), (chunk, batch_size)
    with pytest.raises(git.GitError, match="cut off"):
        list(git._parse_stream(io.BytesIO(out[:30]), 10, chunk=7))


def _git_children() -> list[str]:
    """Command lines of this process's live git children (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and cmd and cmd[0].endswith(b"git"):
            out.append(b" ".join(cmd).decode(errors="replace"))
    return out


def test_a_sink_failing_stops_git_at_once(repo):
    # ~6 MB of git log output: far more than the pipe holds, so git is still writing when the sink fails
    stream = [b"reset refs/heads/main\n"]
    body = b"x" * 1000 + b"\n"
    for i in range(6000):
        msg = b"commit %d\n\n" % i + body
        stream.append(b"commit refs/heads/main\nmark :%d\ncommitter A <a@b> %d +0000\ndata %d\n%s"
                      % (i + 1, 1_700_000_000 + i, len(msg), msg) + (b"from :%d\n" % i if i else b""))
    subprocess.run(["git", "-C", str(repo.path), "fast-import", "--quiet"], input=b"".join(stream), check=True)

    def full_disk(branch, batch):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as failed:
        sync_repo(repo.path, ["main"], {}, sink=full_disk, batch_size=10)
    # the traceback (and the generator frames in it) stays alive, as in a run's error report: git must be
    # stopped by the sync itself, not by the frames being freed
    alive = failed.value.__traceback__
    assert _git_children() == []
    del alive
