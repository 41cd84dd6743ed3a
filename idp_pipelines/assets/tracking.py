"""MLflow: every complete benchmark run and quantization in DuckDB as one comparable MLflow run each."""

import os
from pathlib import Path

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, MLflowResource, WarehouseResource

MAX_TABLE_ROWS = 50


def dagster_url() -> str:
    """The Dagster UI the MLflow runs link back to."""
    return os.environ.get("IDP_DAGSTER_URL", "http://127.0.0.1:3000").rstrip("/")


def findings_report(run_id: str) -> Path | None:
    """The hardware_findings report that first judged this run, once that asset has run."""
    from idp_pipelines.settings import findings_path

    path = findings_path(run_id)
    return path if path.is_file() else None


def build(lab: Lab) -> dg.Definitions:
    @dg.asset(
        group_name="benchmarks",
        kinds={"mlflow", "duckdb"},
        deps=[dg.AssetKey("benchmark_runs"), dg.AssetKey("gguf_model"), dg.AssetKey("hardware_findings")],
        # Every new benchmark run or quantization is logged without a click; each run is a backfill.
        automation_condition=FOLLOW_UPDATES,
        description="One MLflow run per complete benchmark run (experiment benchmarks/<endpoint>) and per "
                    "quantization (experiment quantizations): params, per-step metric curves, plots, requests.",
    )
    def mlflow_experiments(context: dg.AssetExecutionContext, lab: LabResource, warehouse: WarehouseResource,
                           mlflow: MLflowResource) -> dg.MaterializeResult:
        from idp_pipelines.tracking import BENCHMARK, QUANTIZATION, MLflowLogger, Redactor

        inv = lab.load()
        uri = mlflow.uri()
        logger = MLflowLogger(
            mlflow.client(), warehouse.get(context.log), uri,
            experiment_prefix=mlflow.experiment_prefix, dagster_url=dagster_url(),
            dagster_run_id=context.run.run_id, findings_for=findings_report,
            redactor=Redactor.for_lab(inv), run_url=mlflow.run_url, progress=context.log.info,
        )
        report = logger.sync()  # a TrackingError fails the run with the tracking URI in its message
        rows = [{"kind": r.kind, "source": r.source_id[:16] if r.kind == QUANTIZATION else r.source_id,
                 "name": r.label, "action": r.action,
                 "mlflow_run": f"[{r.mlflow_run_id[:8]}]({r.run_url})" if r.run_url else r.mlflow_run_id}
                for r in report.logged]
        table = md_table(rows[:MAX_TABLE_ROWS], ["kind", "source", "name", "action", "mlflow_run"])
        if len(rows) > MAX_TABLE_ROWS:
            table += f"\n…and {len(rows) - MAX_TABLE_ROWS} more (all in DuckDB table mlflow_runs).\n"
        context.log.info(f"MLflow {uri}: {len(report.logged)} run(s) logged ({report.relogged} of them again: "
                         f"gone from MLflow), {report.up_to_date} already there, {report.refreshed} refreshed, in "
                         f"{report.seconds:.1f} s")
        metadata = {
            "tracking_uri": dg.MetadataValue.url(uri) if uri.startswith("http") else uri,
            "benchmark_runs_logged": report.count(BENCHMARK),
            "quantizations_logged": report.count(QUANTIZATION),
            "resumed": sum(1 for r in report.logged if r.action == "resumed"),
            "found_complete_in_mlflow": sum(1 for r in report.logged if r.action == "found"),
            "already_logged": report.up_to_date,
            "refreshed": report.refreshed,
            "logged_again_gone_from_mlflow": report.relogged,
            "seconds": dg.MetadataValue.float(round(report.seconds, 2)),
            "logged_this_time": dg.MetadataValue.md(table if rows else "nothing new: MLflow has every run"),
        }
        last = next((r for r in reversed(report.logged) if r.kind == BENCHMARK and r.run_url), None)
        if last is not None:
            metadata["latest_mlflow_run_url"] = dg.MetadataValue.url(last.run_url)
        return dg.MaterializeResult(metadata=metadata)

    return dg.Definitions(assets=[mlflow_experiments])
