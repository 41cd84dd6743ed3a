from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import duckdb
import pytest

from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import MIGRATIONS, Warehouse, WarehouseError

ROWS_PER_WRITER = 150


def _writer(path: str, writer: int, barrier) -> None:
    wh = Warehouse(path)
    barrier.wait()  # both processes start writing at the same moment
    for i in range(ROWS_PER_WRITER):
        with wh.write() as con:  # one short-lived connection per row: maximal contention
            con.execute(
                "INSERT INTO endpoint_probes (probed_at, endpoint, kind, host, base_url, required, up, probes) "
                "VALUES (now(), ?, 'openai', 'h', 'http://x', true, true, ?)",
                [f"writer-{writer}", i],
            )


def test_two_processes_writing_at_once_lose_no_rows(tmp_path):
    path = str(tmp_path / "wh.duckdb")
    ctx = mp.get_context("spawn")  # like two Dagster run workers: separate interpreters
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, w, barrier)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    with Warehouse(path).read() as con:
        counts = con.execute("SELECT endpoint, count(*), count(DISTINCT probes) FROM endpoint_probes "
                             "GROUP BY 1 ORDER BY 1").fetchall()
    # every row once: none lost, none written twice
    assert counts == [("writer-1", ROWS_PER_WRITER, ROWS_PER_WRITER), ("writer-2", ROWS_PER_WRITER, ROWS_PER_WRITER)]


def test_schema_created_once_and_readers_are_read_only(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    assert wh.schema_version() == MIGRATIONS[-1][0]
    with wh.read() as con:
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("DELETE FROM endpoint_probes")
        applied = con.execute("SELECT version, applied_at FROM schema_migrations ORDER BY 1").fetchall()
    # a second process finds the schema in place and migrates nothing (every migration keeps its first time)
    code = ("import sys; from idp_pipelines.warehouse import Warehouse; wh = Warehouse(sys.argv[1]); "
            "print(wh.schema_version())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "wh.duckdb")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == MIGRATIONS[-1][0]
    with wh.read() as con:
        assert con.execute("SELECT version, applied_at FROM schema_migrations ORDER BY 1").fetchall() == applied
    assert len(applied) == len(MIGRATIONS)


def test_failed_write_rolls_back_and_keeps_earlier_rows(tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    insert = ("INSERT INTO endpoint_probes (probed_at, endpoint, kind, host, base_url, required, up, probes) "
              "VALUES (now(), 'a', 'openai', 'h', 'http://x', true, true, 1)")
    with wh.write() as con:
        con.execute(insert)
    with pytest.raises(RuntimeError, match="boom"):
        with wh.write() as con:
            con.execute(insert)
            raise RuntimeError("boom")
    with wh.read() as con:
        assert con.execute("SELECT count(*) FROM endpoint_probes").fetchone()[0] == 1


def test_lock_timeout_names_the_lock_file(tmp_path):
    import fcntl
    import os

    wh = Warehouse(tmp_path / "wh.duckdb", lock_timeout_s=0.3)
    with wh.write():
        pass
    fd = os.open(wh.lock_path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another holder
    try:
        with pytest.raises(WarehouseError, match=r"Waited 0 s for the warehouse lock .*wh\.duckdb\.lock"):
            with wh.write():
                pass
    finally:
        os.close(fd)
