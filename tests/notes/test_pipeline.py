"""Commits into DuckDB: batches stored while git reads, every field kept, a failure midway loses nothing."""

from __future__ import annotations

import json

import pytest

from idp_pipelines.notes import pipeline
from idp_pipelines.notes.git import GitError
from idp_pipelines.notes.pipeline import sync_to_warehouse
from idp_pipelines.warehouse import Warehouse
from tests.notes.gitutil import BASE_TIME, Repo

COLUMNS = ("sha, parents, author_name, author_email, epoch(author_time)::BIGINT, author_tz, committer_name, "
           "committer_email, epoch(commit_time)::BIGINT, commit_tz, subject, body, files::VARCHAR, files_changed, "
           "insertions, deletions, encoding, branches, rewritten")


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "lab-configs")


def _history(repo: Repo) -> dict[str, str]:
    """Three branches, a merge, a rename, a binary file, an empty commit and a Latin-1 message."""
    shas = {"add": repo.commit("Add compose\n", {"compose.yaml": "a\nb\nc\n"}, tz="-0530")}
    repo.git("checkout", "-q", "-b", "dev")
    shas["dev"] = repo.commit("Dev tuning\n", {"dev.env": "X=1\n"})
    repo.git("checkout", "-q", "-b", "exp")
    shas["exp"] = repo.commit("Experiment, never merged\n", {"exp.yaml": "try: 1\n"})  # read by sha, not by walk
    repo.git("checkout", "-q", "main")
    shas["move"] = repo.commit("Move compose, add logo\n",
                               {"compose.yaml": None, "deploy/compose.yaml": "a\nb\nc\nd\n", "logo.png": b"\x89PNG\0"})
    shas["empty"] = repo.commit("Nothing but a note\n")
    shas["latin"] = repo.commit("Caf\xe9 tuning\n".encode("latin-1"), {"t.txt": "1\n"}, encoding="ISO-8859-1")
    repo.clock += 60
    repo.git("merge", "-q", "--no-ff", "-m", "Merge dev", "dev")
    shas["merge"] = repo.head()
    return shas


def _rows(wh: Warehouse) -> dict[str, tuple]:
    """Stored commits by sha; a commit stored twice fails here rather than vanishing into the dict."""
    with wh.read() as con:
        rows = con.execute(f"SELECT {COLUMNS} FROM git_commits WHERE repo = 'lab'").fetchall()
    by_sha = {r[0]: r for r in rows}
    assert len(by_sha) == len(rows), f"{len(rows) - len(by_sha)} duplicate commit row(s)"
    return by_sha


def test_batches_of_one_store_exactly_what_one_batch_stores(tmp_path, repo):
    shas = _history(repo)
    one = Warehouse(tmp_path / "one.duckdb")
    many = Warehouse(tmp_path / "many.duckdb")
    seen = []
    branches = ["main", "dev", "exp"]
    sync, inserted = sync_to_warehouse(one, "lab", repo.path, branches, batch_size=1,
                                       progress=lambda read, stored: seen.append(read))
    _, inserted_many = sync_to_warehouse(many, "lab", repo.path, branches, batch_size=1000)
    assert inserted == inserted_many == 7 and seen == [1, 2, 3, 4, 5, 6, 7]
    rows = _rows(one)
    assert rows == _rows(many)

    add, move, empty = rows[shas["add"]], rows[shas["move"]], rows[shas["empty"]]
    assert add[5] == "-0530" and add[4] == BASE_TIME + 3600  # the instant, whatever the zone
    assert json.loads(add[12]) == [{"path": "compose.yaml", "insertions": 3, "deletions": 0}]
    files = {f["path"]: f for f in json.loads(move[12])}
    assert files["deploy/compose.yaml"]["old_path"] == "compose.yaml" and files["logo.png"]["insertions"] is None
    assert (move[13], move[14], move[15]) == (2, 1, 0)
    assert (json.loads(empty[12]), empty[13], empty[14]) == ([], 0, 0)
    assert rows[shas["latin"]][10] == "Café tuning" and rows[shas["latin"]][16] == "ISO-8859-1"
    assert sorted(rows[shas["merge"]][1]) == sorted([shas["latin"], shas["dev"]])
    # read once for main, then found on dev too: both branches, in the inventory's order
    assert rows[shas["add"]][17] == ["main", "dev", "exp"] and rows[shas["dev"]][17] == ["main", "dev", "exp"]
    assert rows[shas["move"]][17] == ["main"] and rows[shas["exp"]][17] == ["exp"]
    assert json.loads(rows[shas["exp"]][12]) == [{"path": "exp.yaml", "insertions": 1, "deletions": 0}]
    with one.read() as con:
        assert dict(con.execute("SELECT branch, head_sha FROM git_branch_heads").fetchall()) == \
            {"main": shas["merge"], "dev": shas["dev"], "exp": shas["exp"]}
    assert sync.heads == {"main": shas["merge"], "dev": shas["dev"], "exp": shas["exp"]}


def test_a_write_failing_midway_keeps_what_was_stored_and_the_next_sync_completes(tmp_path, repo, monkeypatch):
    shas = repo.linear(5)
    wh = Warehouse(tmp_path / "wh.duckdb")
    real = pipeline.insert_commits
    calls = []

    def disk_full_on_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(pipeline, "insert_commits", disk_full_on_the_second_batch)
    with pytest.raises(OSError, match="No space left"):
        sync_to_warehouse(wh, "lab", repo.path, ["main"], batch_size=2)
    stored = _rows(wh)
    assert set(stored) == set(shas[-2:])  # the newest two, committed before the failure
    with wh.read() as con:
        assert con.execute("SELECT count(*) FROM git_branch_heads").fetchone()[0] == 0  # heads stay put

    monkeypatch.setattr(pipeline, "insert_commits", real)
    sync, inserted = sync_to_warehouse(wh, "lab", repo.path, ["main"], batch_size=2)
    assert inserted == 3 and set(_rows(wh)) == set(shas) and sync.heads == {"main": shas[-1]}
    with wh.read() as con:  # the two stored before the failure were read again and skipped, not added twice
        assert con.execute("SELECT count(*) FROM git_commits").fetchone()[0] == 5
    with wh.read() as con:
        assert con.execute("SELECT head_sha FROM git_branch_heads").fetchall() == [(shas[-1],)]


def test_a_git_failure_stops_the_sync_and_advances_no_head(tmp_path, repo):
    repo.linear(3)
    wh = Warehouse(tmp_path / "wh.duckdb")
    sync_to_warehouse(wh, "lab", repo.path, ["main"])
    new = repo.commit("Fourth\n", {"d.txt": "d\n"})
    # the new commit's tree object is gone: git log fails while reading it
    tree = repo.git("rev-parse", f"{new}^{{tree}}")
    obj = repo.path / ".git" / "objects" / tree[:2] / tree[2:]
    obj.chmod(0o644)
    obj.unlink()
    with pytest.raises(GitError, match="git log in .* failed"):
        sync_to_warehouse(wh, "lab", repo.path, ["main"])
    with wh.read() as con:
        assert con.execute("SELECT head_sha FROM git_branch_heads").fetchone()[0] != new
        assert con.execute("SELECT count(*) FROM git_commits").fetchone()[0] == 3


def test_a_failing_read_does_not_wait_for_a_writer_that_is_stuck(tmp_path, repo, monkeypatch):
    import threading

    shas = repo.linear(6)
    tree = repo.git("rev-parse", f"{shas[0]}^{{tree}}")  # the oldest commit's tree: git log fails late
    obj = repo.path / ".git" / "objects" / tree[:2] / tree[2:]
    obj.chmod(0o644)
    obj.unlink()
    release, writer_returned = threading.Event(), threading.Event()

    def stuck(*args):  # a writer stuck on the disk or on another process's warehouse lock
        try:
            release.wait(300)
            raise OSError("released by the test")
        finally:
            writer_returned.set()

    monkeypatch.setattr(pipeline, "insert_commits", stuck)
    wh = Warehouse(tmp_path / "wh.duckdb")
    try:
        with pytest.raises(GitError, match="git log in .* failed"):
            # two batches of two fit in the writer's hands and its queue; git fails on the third
            sync_to_warehouse(wh, "lab", repo.path, ["main"], batch_size=2)
        # the run failed with git's error while the writer was still stuck: it did not wait for it
        assert not writer_returned.is_set()
    finally:
        release.set()
