"""Time MLflow logging of benchmark runs (not a test): one run with its artefacts, then a backfill.

    .venv/bin/python benchmarks/bench_mlflow.py [--runs 1000] [--requests-per-step 8] [--steps 4]

Starts its own `mlflow server` on 127.0.0.1 (SQLite store copied from a migrated template, as `make up`
runs it: --workers 1, job execution off) and a DuckDB warehouse of synthetic benchmark runs in a temp
folder. Prints the time to log one benchmark run with its artefacts (first one in the process, with
matplotlib's import, and warm), then the time to backfill --runs runs into an empty MLflow, runs/s, and
the time of a second sync that finds nothing to do. Fewer requests per run than a real benchmark keep
the warehouse small; the per-run cost is dominated by HTTP calls and the two PNGs, not by the parquet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idp_pipelines.tracking import MLflowLogger  # noqa: E402
from idp_pipelines.embedded.mlflow_server import local_mlflow_server, migrated_template  # noqa: E402
from idp_pipelines.warehouse import Warehouse  # noqa: E402
from tests.tracking.synthetic import T0, insert_benchmark_run  # noqa: E402


def log_one(logger: MLflowLogger, run_id: str) -> None:
    """Log (or resume, or just find) one benchmark run and record its link: a sync's per-run work, alone."""
    (spec,) = logger.benchmark_specs([run_id])
    logged = logger.runs.log(spec, logger.runs.existing([spec]).get(run_id, []))
    logger.links.write([logged])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--requests-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="load steps per run (concurrency 1, 2, 4, ...)")
    args = ap.parse_args(argv)
    concs = tuple(2 ** i for i in range(args.steps))
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        template = migrated_template(Path(tempfile.gettempdir()) / "idp-mlflow-template")
        print(f"migrated store template:          {time.perf_counter() - t:6.2f} s (cached after the first time)")
        t = time.perf_counter()
        with local_mlflow_server(tmp / "mlflow", template=template) as url:
            print(f"mlflow server up:                 {time.perf_counter() - t:6.2f} s ({url})")
            client = MlflowClient(url)

            single = Warehouse(tmp / "single.duckdb")
            with single.write() as con:
                for i in range(6):
                    insert_benchmark_run(con, f"one-{i}", "vllm-one", seed=i, concurrencies=concs,
                                         requests_per_step=args.requests_per_step,
                                         started_at=T0 + timedelta(hours=i))
            logger = MLflowLogger(client, single, url, dagster_run_id="bench")
            logger.runs.check_reachable()
            per_run = []
            for i in range(6):
                t = time.perf_counter()
                log_one(logger, f"one-{i}")
                per_run.append(time.perf_counter() - t)
            print(f"log one run with artefacts:       {per_run[0]:6.2f} s first in the process (imports), "
                  f"then median {statistics.median(per_run[1:]):.3f} s (min {min(per_run[1:]):.3f}, "
                  f"max {max(per_run[1:]):.3f}); {len(concs)} steps, {len(concs) * args.requests_per_step} requests")

            wh = Warehouse(tmp / "backfill.duckdb")
            t = time.perf_counter()
            with wh.write() as con:
                for i in range(args.runs):
                    insert_benchmark_run(con, f"run-{i:05d}", f"ep-{i % 4}", seed=i, concurrencies=concs,
                                         requests_per_step=args.requests_per_step,
                                         started_at=T0 + timedelta(minutes=10 * i))
            print(f"synthetic warehouse ({args.runs} runs):   {time.perf_counter() - t:6.2f} s (not part of the figure)")

            last = [time.perf_counter()]

            def progress(msg: str) -> None:
                print(f"  {time.perf_counter() - last[0]:7.1f} s  {msg}", flush=True)

            logger = MLflowLogger(client, wh, url, dagster_run_id="bench", progress=progress, progress_every_s=30)
            t = time.perf_counter()
            report = logger.sync()
            took = time.perf_counter() - t
            n = len(report.logged)
            print(f"backfill {n} runs into 4 experiments: {took:6.1f} s = {n / took:.1f} runs/s "
                  f"({1000 * took / n:.0f} ms/run)")
            t = time.perf_counter()
            again = logger.sync()
            print(f"second sync (nothing to do):      {time.perf_counter() - t:6.2f} s, "
                  f"{len(again.logged)} logged, {again.up_to_date} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
