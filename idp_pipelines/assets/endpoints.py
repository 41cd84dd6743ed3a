"""The inference endpoints of the lab, probed: up or down, models served, round-trip latency."""

import dagster as dg

from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource

ENDPOINTS_UP = "required_endpoints_up"


def build(inventory: Lab) -> dg.Definitions:
    """The probe asset: one for the whole inventory, unpartitioned, so it reads the endpoints when it runs
    (`inventory` is taken for the same signature as every domain's build)."""

    @dg.asset(
        group_name="benchmarks",
        kinds={"duckdb", "python"},
        description="Every endpoint of the lab inventory probed: health, served models, round-trip latency.",
        check_specs=[dg.AssetCheckSpec(ENDPOINTS_UP, asset="inference_endpoints",
                                       description="Every endpoint marked required in lab.yaml answers.")],
    )
    def inference_endpoints(context: dg.AssetExecutionContext, lab: LabResource,
                            warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.probe import probe_all, store_probes

        current = lab.load()
        context.log.info(f"Probing {len(current.endpoints)} endpoint(s) of lab {current.name!r}")
        results = probe_all(current.endpoints)
        rows = store_probes(warehouse.get(context.log), results, context.run.run_id)
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
                "lab": current.name,
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

    return dg.Definitions(assets=[inference_endpoints])
