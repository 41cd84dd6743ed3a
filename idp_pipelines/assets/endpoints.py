"""The inference endpoints of the lab, probed: up or down, models served, round-trip latency."""

import os
from datetime import datetime, timezone

import dagster as dg

from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource

ENDPOINTS_UP = "required_endpoints_up"


@dg.asset(
    group_name="benchmarks",
    kinds={"duckdb", "python"},
    description="Every endpoint of the lab inventory probed: health, served models, round-trip latency.",
    check_specs=[dg.AssetCheckSpec(ENDPOINTS_UP, asset="inference_endpoints",
                                   description="Every endpoint marked required in lab.yaml answers.")],
)
def inference_endpoints(context: dg.AssetExecutionContext, lab: LabResource,
                        warehouse: WarehouseResource) -> dg.MaterializeResult:
    from idp_pipelines.probe import probe_all

    inventory = lab.load()
    keys = {ep.name: os.environ.get(ep.api_key_env) if ep.api_key_env else None for ep in inventory.endpoints}
    context.log.info(f"Probing {len(inventory.endpoints)} endpoint(s) of lab {inventory.name!r}")
    results = probe_all(inventory.endpoints, keys)
    probed_at = datetime.now(timezone.utc)
    rows = [r.row() for r in results]
    with warehouse.get(context.log).write() as con:
        for row in rows:
            con.execute(
                "INSERT INTO endpoint_probes BY NAME SELECT ?::TIMESTAMPTZ AS probed_at, ? AS dagster_run_id, "
                "? AS endpoint, ? AS kind, ? AS host, ? AS base_url, ? AS required, ? AS up, ? AS status_code, "
                "? AS error, ? AS expected_model, ?::VARCHAR[] AS served_models, ? AS model_served, ? AS probes, "
                "? AS rtt_min_ms, ? AS rtt_p50_ms, ? AS rtt_max_ms",
                [probed_at, context.run.run_id, row["endpoint"], row["kind"], row["host"], row["base_url"],
                 row["required"], row["up"], row["status_code"], row["error"], row["expected_model"],
                 row["served_models"], row["model_served"], row["probes"], row["rtt_min_ms"],
                 row["rtt_p50_ms"], row["rtt_max_ms"]],
            )
    for r in results:
        (context.log.info if r.up else context.log.warning)(
            f"{r.endpoint}: {'up' if r.up else 'DOWN'}"
            + (f", rtt p50 {r.rtt_p50_ms:.1f} ms" if r.rtt_p50_ms is not None else "")
            + (f" ({r.error})" if r.error else "")
        )
    down = [r for r in results if r.required and not r.up]
    table = md_table(rows, ["endpoint", "kind", "host", "up", "status_code", "served_models", "model_served",
                             "rtt_p50_ms", "error"])
    return dg.MaterializeResult(
        metadata={
            "lab": inventory.name,
            "endpoints": len(results),
            "up": sum(r.up for r in results),
            "down": [r.endpoint for r in results if not r.up],
            "probes": dg.MetadataValue.md(table),
            "warehouse": dg.MetadataValue.path(str(warehouse.path)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=ENDPOINTS_UP,
                passed=not down,
                severity=dg.AssetCheckSeverity.ERROR,
                description=("all required endpoints answer" if not down else
                             "; ".join(f"{r.endpoint}: {r.error}" for r in down)),
                metadata={"down": [r.endpoint for r in down]},
            )
        ],
    )


def defs() -> dg.Definitions:
    return dg.Definitions(assets=[inference_endpoints])
