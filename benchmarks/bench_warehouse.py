"""Trend queries on a warehouse with 10 million request rows (goal: interactive, well under a second).

Builds a throwaway warehouse with the real schema: 10 000 runs x 1 000 requests over a year for four
endpoints (chunk arrays left empty: they are not read by trend queries), then times the queries the
findings, tuning and regression checks run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from idp_pipelines.warehouse import Warehouse

RUNS, PER_RUN = 10_000, 1_000


def timed(con, sql: str, params=None, n: int = 5) -> tuple[float, list]:
    times, rows = [], []
    for _ in range(n):
        t = time.perf_counter()
        rows = con.execute(sql, params or []).fetchall()
        times.append(time.perf_counter() - t)
    return statistics.median(times), rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(Path(tmp) / "wh.duckdb")
        t0 = time.perf_counter()
        with wh.write() as con:
            con.execute(f"""
                INSERT INTO benchmark_runs (run_id, endpoint, kind, host, base_url, load_model, harness_version,
                                            trigger, started_at, status)
                SELECT 'r' || i, 'ep-' || (i % 4), 'vllm', 'h', 'http://x', 'sweep', '1',
                       CASE WHEN i % 3 = 0 THEN 'sensor' ELSE 'nightly' END,
                       TIMESTAMPTZ '2026-01-01' + to_minutes(i * 52), 'complete'
                FROM range({RUNS}) t(i)""")
            con.execute(f"""
                INSERT INTO benchmark_steps (run_id, step_index, step, mode, concurrency, started_at, n_requests,
                                             n_ok, n_errors, ttft_ms_p50, ttft_ms_p95, output_tokens_per_s)
                SELECT 'r' || i, s, 'c' || (1 << s), 'concurrency', 1 << s, TIMESTAMPTZ '2026-01-01', 200, 200, 0,
                       80 + random() * 40, 120 + random() * 60, 60 * (1 << s) * (0.8 + random() * 0.4)
                FROM range({RUNS}) t(i), range(5) u(s)""")
            con.execute(f"""
                INSERT INTO benchmark_requests (run_id, step_index, request_id, ttft_ms, tpot_ms, e2e_ms,
                                                completion_tokens, max_tokens, server_reported_tokens)
                SELECT 'r' || (j // {PER_RUN}), (j % 5)::INTEGER, (j % {PER_RUN})::INTEGER, 80 + random() * 60,
                       10 + random() * 5, 1000 + random() * 500, 100, 100, true
                FROM range({RUNS * PER_RUN}) t(j)""")
        print(f"built {RUNS * PER_RUN:,} request rows, {RUNS:,} runs in {time.perf_counter() - t0:.1f} s "
              f"({(Path(tmp) / 'wh.duckdb').stat().st_size / 1e6:,.0f} MB)")
        queries = {
            "daily TTFT p95 per endpoint over 10M requests (raw rows)": """
                SELECT r.endpoint, date_trunc('day', r.started_at) AS day, quantile_cont(q.ttft_ms, 0.95)
                FROM benchmark_requests q JOIN benchmark_runs r USING (run_id)
                GROUP BY ALL ORDER BY 1, 2""",
            "same, approx_quantile (t-digest)": """
                SELECT r.endpoint, date_trunc('day', r.started_at) AS day, approx_quantile(q.ttft_ms, 0.95)
                FROM benchmark_requests q JOIN benchmark_runs r USING (run_id)
                GROUP BY ALL ORDER BY 1, 2""",
            "weekly throughput trend per endpoint (steps)": """
                SELECT r.endpoint, date_trunc('week', r.started_at), median(s.output_tokens_per_s)
                FROM benchmark_steps s JOIN benchmark_runs r USING (run_id)
                WHERE s.concurrency = 16 GROUP BY ALL ORDER BY 1, 2""",
            "regression baseline (last 7 nightly runs of one endpoint)": """
                WITH recent AS (SELECT run_id FROM benchmark_runs WHERE endpoint = 'ep-1' AND status = 'complete'
                                AND trigger = 'nightly' ORDER BY started_at DESC LIMIT 7)
                SELECT median(output_tokens_per_s) FROM benchmark_steps JOIN recent USING (run_id)""",
            "all requests of one run": "SELECT count(*), avg(ttft_ms) FROM benchmark_requests WHERE run_id = 'r4242'",
        }
        with wh.read() as con:
            for name, sql in queries.items():
                seconds, rows = timed(con, sql)
                print(f"{seconds * 1000:9.1f} ms  {name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
