"""The DuckDB reads of the tracking domain: which runs are complete, their rows, the requests of one run.

Reads only; the link table `mlflow_runs` is written by `links`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _dicts(cur) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def complete_benchmark_runs(con) -> list[tuple[str, str]]:
    """(run id, endpoint) of every complete benchmark run, oldest first."""
    return con.execute("SELECT run_id, endpoint FROM benchmark_runs WHERE status = 'complete' "
                       "ORDER BY started_at, run_id").fetchall()


def quantization_ids(con) -> list[str]:
    """The output sha256 of every quantized artefact, by when it was first made."""
    return [sha for sha, _ in con.execute("SELECT output_sha256, min(quantized_at) FROM quantizations "
                                          "GROUP BY output_sha256 ORDER BY 2, 1").fetchall()]


def benchmark_rows(con, run_ids: Sequence[str]) -> tuple[dict[str, dict], dict[str, list[dict]], dict[str, str]]:
    """The runs by id, their steps in order, and the quantized artefact each one served (when known)."""
    marks = ",".join("?" * len(run_ids))
    runs = {r["run_id"]: r for r in _dicts(con.execute(f"SELECT * FROM benchmark_runs WHERE run_id IN ({marks})",
                                                       list(run_ids)))}
    steps: dict[str, list[dict]] = {}
    for d in _dicts(con.execute(f"SELECT * FROM benchmark_steps WHERE run_id IN ({marks}) "
                                f"ORDER BY run_id, step_index", list(run_ids))):
        steps.setdefault(d["run_id"], []).append(d)
    quant = dict(con.execute(
        f"""SELECT b.run_id, min(q.output_sha256) FROM benchmark_runs b JOIN quantizations q
            ON q.model = b.model AND q.quant_type = b.quantization
           AND (b.model_commit_sha IS NULL OR q.commit_sha = b.model_commit_sha)
           WHERE b.run_id IN ({marks}) GROUP BY b.run_id""", list(run_ids)).fetchall())
    return runs, steps, quant


def quantization_rows(con, shas: Sequence[str]) -> dict[str, dict]:
    """Each artefact's first `quantizations` row (a reused row repeats an older one), by output sha256."""
    marks = ",".join("?" * len(shas))
    return {r["output_sha256"]: r for r in _dicts(con.execute(
        f"""SELECT * FROM quantizations WHERE output_sha256 IN ({marks})
            QUALIFY row_number() OVER (PARTITION BY output_sha256 ORDER BY reused, quantized_at) = 1""",
        list(shas)))}


def used_by(con, shas: Sequence[str]) -> dict[str, list[str]]:
    """The complete benchmark runs that served each quantized artefact after it was made."""
    marks = ",".join("?" * len(shas))
    out: dict[str, list[str]] = {}
    for sha, rid in con.execute(
        f"""SELECT DISTINCT q.output_sha256, b.run_id FROM quantizations q JOIN benchmark_runs b
            ON b.model = q.model AND b.quantization = q.quant_type
           AND (b.model_commit_sha IS NULL OR b.model_commit_sha = q.commit_sha)
           AND b.started_at >= q.quantized_at
           WHERE q.output_sha256 IN ({marks}) AND b.status = 'complete'
           ORDER BY 1, 2""", list(shas)).fetchall():
        out.setdefault(sha, []).append(rid)
    return out


def requests_table(con, run_id: str):
    """Every request of one run as an Arrow table, in step and request order."""
    return con.sql("SELECT * FROM benchmark_requests WHERE run_id = ? ORDER BY step_index, request_id",
                   params=[run_id]).to_arrow_table()
