"""The knowledge domain's plumbing between DuckDB, git and the vault (no Dagster)."""

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from idp_pipelines.lab import Lab
from idp_pipelines.notes.git import BATCH_COMMITS, CommitBatch, Sync, no_gc, sync_repo
from idp_pipelines.settings import dagster_url


def sync_to_warehouse(wh, repo: str, path, branches: Sequence[str], *, run_id: Optional[str] = None,
                      max_new: Optional[int] = None, batch_size: int = BATCH_COMMITS,
                      progress: Optional[Callable[[int, int], None]] = None) -> tuple[Sync, int]:
    """Read what is new in a repo with git and store it; returns the sync and the commits inserted.

    A writer thread inserts and commits each batch of commits while git reads the next: DuckDB's work
    (checkpoints included) hides behind git's, and memory stays bounded on any history. The warehouse
    lock is taken when the first batch arrives and held until the end (a no-change sync holds it for
    milliseconds, the first sync of a 100k-commit repo for the few seconds git takes). Branch membership,
    rewrites and heads are written last, in the final transaction: after a crash the stored batches stay
    (nothing read is lost) and the next sync, starting from the old heads, reads the same range again
    and skips what is stored. `progress(read, stored)` is called from this thread after each batch.
    """
    with wh.read() as con:
        old = dict(con.execute("SELECT branch, head_sha FROM git_branch_heads WHERE repo = ?", [repo]).fetchall())
    writer = _Writer(wh, repo, run_id)
    read = 0

    def sink(branch: str, batch: CommitBatch) -> None:
        nonlocal read
        writer.put(("batch", (branch, batch)))
        read += len(batch)
        if progress is not None:
            progress(read, writer.stored)

    try:
        sync = sync_repo(path, branches, old, max_new=max_new, sink=sink, batch_size=batch_size)
        writer.put(("refs", sync))
    except BaseException:
        writer.abort()
        raise
    writer.join()
    return sync, writer.inserted


class _Writer:
    """A thread holding the warehouse: each queued batch is inserted and committed, ("refs", sync) ends.

    At most two batches wait in the queue, so a slow disk slows the read instead of filling memory.
    """

    _ABORT = ("abort", None)

    def __init__(self, wh, repo: str, run_id: Optional[str]) -> None:
        self._wh, self._repo, self._run_id = wh, repo, run_id
        self._now = datetime.now(timezone.utc)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None
        self.inserted = self.stored = 0
        self._thread = threading.Thread(target=self._run, name=f"git-commits-writer[{repo}]", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        item = self._queue.get()
        if item is self._ABORT:
            return
        try:
            with self._wh.write() as con:
                # checkpoint at each batch's commit (in this thread, while git works), not all at the end
                con.execute("SET checkpoint_threshold = '1MB'")
                while item is not self._ABORT:
                    kind, payload = item
                    if kind == "refs":
                        con.execute("RESET checkpoint_threshold")
                        store_refs(con, self._repo, payload, self._run_id, self._now)
                        return  # commits
                    branch, batch = payload
                    self.inserted += insert_commits(con, self._repo, batch, branch, self._run_id, self._now)
                    con.execute("COMMIT; BEGIN")  # DuckDB checkpoints as it goes, while git still reads
                    self.stored += len(batch)
                    item = self._queue.get()
                # aborted: every batch in hand was committed, the open transaction is empty
        except BaseException as exc:  # handed to the reading thread
            self.error = exc
            while item[0] == "batch":  # drain, so that put() never blocks forever
                item = self._queue.get()

    def put(self, item: tuple) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(item)

    def abort(self) -> None:
        """Stop after the batch in hand (pending ones are dropped); never wait long: the run is failing."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(self._ABORT)
        self._thread.join(timeout=5.0)  # a writer still waiting for the warehouse lock ends on its own

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


def insert_commits(con, repo: str, batch: CommitBatch, branch: str, run_id: Optional[str], now: datetime) -> int:
    """Insert a batch of commits read for `branch`; those already stored are kept as they are."""
    # The parser's columns go to DuckDB as NumPy arrays, which it scans directly (no pandas, whose import
    # alone costs ~0.5 s). Each commit's files JSON and line counts are built by DuckDB from the flat file
    # columns; parents travel space-joined (git forbids spaces in shas).
    import numpy as np

    if not len(batch):
        return 0

    def text(values) -> np.ndarray:
        return np.array(values, dtype=object)

    n = len(batch)
    file_end = np.array(batch.file_end, dtype=np.int64)
    con.register("new_commits", {
        "idx": np.arange(n, dtype=np.int64),
        **{name: text(getattr(batch, name)) for name in (
            "sha", "parents", "author_name", "author_email", "author_tz", "committer_name", "committer_email",
            "commit_tz", "subject", "body", "encoding")},
        "author_s": np.array(batch.author_epoch, dtype=np.int64),
        "commit_s": np.array(batch.commit_epoch, dtype=np.int64),
    })
    con.register("new_files", {
        "idx": np.repeat(np.arange(n, dtype=np.int64), np.diff(file_end, prepend=0)),
        "pos": np.arange(len(batch.file_path), dtype=np.int64),
        "path": text(batch.file_path),
        "ins": text(batch.file_insertions),  # None (binary) becomes NULL
        "dels": text(batch.file_deletions),
        "old_path": text(batch.file_old_path),
    })
    try:
        # DuckDB answers an INSERT with the number of rows it inserted
        return con.execute(
            """
            WITH f AS (
                SELECT idx, count(*) AS files_changed, sum(coalesce(ins, 0)) AS insertions,
                    sum(coalesce(dels, 0)) AS deletions,
                    to_json(list(CASE WHEN old_path IS NULL
                        THEN json_object('path', path, 'insertions', ins, 'deletions', dels)
                        ELSE json_object('path', path, 'insertions', ins, 'deletions', dels, 'old_path', old_path)
                        END ORDER BY pos)) AS files
                FROM new_files GROUP BY idx)
            INSERT INTO git_commits (repo, sha, parents, author_name, author_email, author_time, author_tz,
                committer_name, committer_email, commit_time, commit_tz, subject, body, files, files_changed,
                insertions, deletions, encoding, branches, rewritten, first_seen_at, dagster_run_id)
            SELECT ?, n.sha, CASE WHEN n.parents = '' THEN []::VARCHAR[] ELSE string_split(n.parents, ' ') END,
                n.author_name, n.author_email, make_timestamptz(n.author_s * 1000000), n.author_tz, n.committer_name,
                n.committer_email, make_timestamptz(n.commit_s * 1000000), n.commit_tz, n.subject, n.body,
                coalesce(f.files, '[]'::JSON), coalesce(f.files_changed, 0), coalesce(f.insertions, 0),
                coalesce(f.deletions, 0), n.encoding, [?]::VARCHAR[], false, ?, ?
            FROM new_commits n LEFT JOIN f ON f.idx = n.idx
            ANTI JOIN (SELECT sha FROM git_commits WHERE repo = ?) g ON g.sha = n.sha
            """,
            [repo, branch, now, run_id, repo],
        ).fetchone()[0]
    finally:
        con.unregister("new_commits")
        con.unregister("new_files")


def store_refs(con, repo: str, sync: Sync, run_id: Optional[str], now: datetime) -> None:
    """Branch membership of the new commits, commits rewritten away, and the new heads."""
    import numpy as np

    for branch, shas in sync.members.items():
        if not shas:
            continue
        con.register("branch_shas", {"sha": np.array(shas, dtype=object)})
        # commits stored before and now on this branch too (or read for another branch); one seen again
        # on a watched branch is not rewritten (any more)
        con.execute(
            """
            UPDATE git_commits SET
                branches = CASE WHEN list_contains(branches, ?) THEN branches ELSE list_append(branches, ?) END,
                rewritten = false, rewritten_at = NULL
            WHERE repo = ? AND (rewritten OR NOT list_contains(branches, ?)) AND sha IN (SELECT sha FROM branch_shas)
            """,
            [branch, branch, repo, branch],
        ).fetchall()
        con.unregister("branch_shas")
    if sync.rewritten:
        con.register("gone", {"sha": np.array(list(sync.rewritten), dtype=object)})
        con.execute("UPDATE git_commits SET rewritten = true, rewritten_at = ? "
                    "WHERE repo = ? AND NOT rewritten AND sha IN (SELECT sha FROM gone)", [now, repo]).fetchall()
        con.unregister("gone")
    for branch, head in sync.heads.items():
        con.execute("INSERT OR REPLACE INTO git_branch_heads (repo, branch, head_sha, synced_at, dagster_run_id) "
                    "VALUES (?, ?, ?, ?, ?)", [repo, branch, head, now, run_id]).fetchall()


# Cheap SQL prefilter for commits that may touch a service config; render.is_service_config decides.
_CONFIG_HINT = r"(\.ya?ml|\.env|\.conf|nginx|prometheus|dockerfile|\.service|triton|deploy/|vllm|llama)"


@no_gc()
def load_note_data(con, inv: Lab) -> dict:
    """Rows for the notes: commits, benchmark runs with their steps and MLflow links, synced heads."""
    from zoneinfo import ZoneInfo

    from idp_pipelines.notes.render import BenchRun, CommitRow, RepoInfo, is_service_config

    con.execute("SET TimeZone = 'UTC'")
    rows = con.execute(
        "SELECT repo, sha, coalesce(author_name, ''), epoch(author_time), epoch(commit_time), coalesce(subject, ''), "
        "coalesce(insertions, 0), coalesce(deletions, 0), coalesce(files_changed, 0), len(parents), rewritten "
        "FROM git_commits").fetchall()
    configs: dict[tuple[str, str], tuple[str, ...]] = {}
    hinted = con.execute(
        "SELECT repo, sha, files FROM git_commits WHERE regexp_matches(lower(files::VARCHAR), ?)",
        [_CONFIG_HINT]).fetchall()
    for repo, sha, files in hinted:
        paths = tuple(f["path"] for f in json.loads(files) if is_service_config(f["path"]))
        if paths:
            configs[(repo, sha)] = paths
    utc = ZoneInfo("UTC")
    # times in the lab's zone from the start, so rendering them in that zone costs nothing more
    tz = layout_for(inv).tz
    at = datetime.fromtimestamp

    def aware(t):
        return t if t is None or t.tzinfo else t.replace(tzinfo=utc)

    commits = [CommitRow(r[0], r[1], r[2], at(r[3], tz), at(r[4], tz), r[5], r[6], r[7], r[8], r[9] or 0,
                         bool(r[10]), configs.get((r[0], r[1]), ()))
               for r in rows]
    steps: dict[str, list[dict]] = {}
    cols = ["run_id", "step_index", "step", "concurrency", "n_requests", "n_errors", "requests_per_s",
            "output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p95", "goodput_fraction"]
    for r in con.execute(f"SELECT {', '.join(cols)} FROM benchmark_steps ORDER BY run_id, step_index").fetchall():
        steps.setdefault(r[0], []).append(dict(zip(cols, r)))
    runs = [
        BenchRun(run_id=r[0], endpoint=r[1], started_at=aware(r[2]), status=r[3], model=r[4], quantization=r[5],
                 finished_at=aware(r[6]), dagster_run_id=r[7], trigger=r[8], error=r[9], mlflow_url=r[10],
                 mlflow_experiment=r[11], steps=tuple(steps.get(r[0], ())))
        for r in con.execute(
            "SELECT b.run_id, b.endpoint, b.started_at, b.status, b.model, b.quantization, b.finished_at, "
            "b.dagster_run_id, b.trigger, b.error, m.run_url, m.experiment_name FROM benchmark_runs b "
            "LEFT JOIN mlflow_runs m ON m.kind = 'benchmark' AND m.source_id = b.run_id").fetchall()
    ]
    heads: dict[str, dict[str, str]] = {}
    for repo, branch, sha in con.execute("SELECT repo, branch, head_sha FROM git_branch_heads").fetchall():
        heads.setdefault(repo, {})[branch] = sha
    repos = [RepoInfo(r.name, str(r.path), {b: heads.get(r.name, {}).get(b) for b in r.branches})
             for r in inv.git_repos]
    return {"commits": commits, "runs": runs, "repos": repos}


# ------------------------------------------------------------------------------------------ notes


def layout_for(inv: Lab):
    from zoneinfo import ZoneInfo

    from idp_pipelines.notes.render import Layout

    return Layout(daily_folder=inv.vault.daily_folder, date_format=inv.vault.date_format,
                  tz=ZoneInfo(inv.schedules.timezone),
                  dagster_url=dagster_url())


@no_gc()
def generate_notes(inv: Lab, data: dict, *, recreate: bool = False, fsync: bool = True) -> dict:
    from idp_pipelines.notes.render import iter_notes
    from idp_pipelines.notes.vault import write_notes
    from idp_pipelines.secrets import Redactor

    count = 0
    redactor = Redactor.for_lab(inv)

    def counted(notes):
        nonlocal count
        for note in notes:
            count += 1
            yield redacted(note, redactor) if redactor.secrets else note

    if redactor.secrets:
        data = redacted_data(data, redactor)
    # rendered one at a time and written at once: the vault never holds a rendered copy of all notes
    notes = iter_notes(data["commits"], data["runs"], data["repos"], layout_for(inv))
    report = write_notes(inv.vault.path, counted(notes), recreate=recreate, fsync=fsync)
    outside = [p for p in report.written if not _inside(inv.vault.path, p)]
    return {"report": report, "notes": count, "outside": outside}


def redacted_data(data: dict, redactor) -> dict:
    """The rows with every secret value replaced before rendering: a commit message, an author, an error
    or a URL that carries a token must not carry it into the vault (which Obsidian may sync anywhere).
    Raw text, because rendering escapes it (`hf\\_...`) and truncates it, and a rendered secret no longer
    matches the secret."""
    import dataclasses

    text, hit = redactor.text, redactor.leaks
    commits = [c._replace(author_name=text(c.author_name), subject=text(c.subject),
                          config_files=tuple(text(p) for p in c.config_files))
               if hit(c.subject) or hit(c.author_name) or (c.config_files and any(map(hit, c.config_files)))
               else c for c in data["commits"]]
    runs = [dataclasses.replace(r, **{f: text(v) for f in ("endpoint", "status", "model", "quantization", "error",
                                                         "mlflow_url", "mlflow_experiment", "trigger")
                                      if isinstance(v := getattr(r, f), str)}) for r in data["runs"]]
    repos = [dataclasses.replace(r, name=text(r.name), path=text(r.path)) for r in data["repos"]]
    return {**data, "commits": commits, "runs": runs, "repos": repos}


def redacted(note, redactor):
    """The rendered note with every secret value that still appears in it replaced (the rows were
    redacted already; this catches what came from elsewhere, such as the Dagster URL)."""
    import dataclasses

    from idp_pipelines.notes.vault import GeneratedFile

    if isinstance(note, GeneratedFile):
        return note if not redactor.leaks(note.content) else dataclasses.replace(
            note, content=redactor.text(note.content.decode("utf-8", "surrogateescape")).encode(
                "utf-8", "surrogateescape"))

    def clean(value):
        if isinstance(value, str):
            return redactor.text(value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return dataclasses.replace(
        note, path=redactor.text(note.path), preamble=redactor.text(note.preamble),
        properties={k: clean(v) for k, v in note.properties.items()},
        blocks=tuple((bid, redactor.text(text)) for bid, text in note.blocks))


def _inside(vault: Path, rel: str) -> bool:
    root = Path(os.path.realpath(vault))
    real = Path(os.path.realpath(root / rel))
    return root in real.parents
