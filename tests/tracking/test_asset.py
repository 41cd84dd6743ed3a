"""The mlflow_experiments asset: a backfill of what MLflow lacks, links both ways, a clear failure when down."""

from __future__ import annotations

import dagster as dg

from idp_pipelines.assets import tracking
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource, MLflowResource, WarehouseResource
from idp_pipelines.embedded.processes import free_port
from tests.support import write_lab
from tests.tracking.synthetic import T0, insert_benchmark_run


def _materialize(tmp_path, uri, prefix, instance):
    lab_file = write_lab(tmp_path / "lab.yaml", mlflow_url=uri)
    lab = LabResource(path=str(lab_file))
    (asset,) = tracking.build(load_lab(lab_file)).assets
    res = {"lab": lab, "warehouse": WarehouseResource(path=str(tmp_path / "warehouse.duckdb")),
           "mlflow": MLflowResource(lab=lab, experiment_prefix=prefix)}
    return dg.materialize([asset], resources=res, instance=instance, raise_on_error=False)


def test_asset_logs_what_mlflow_lacks_and_links_both_ways(mlflow_server, client, warehouse, prefix, tmp_path):
    with warehouse.write() as con:
        insert_benchmark_run(con, "r1", "vllm-a", seed=1, concurrencies=(1, 2))
        insert_benchmark_run(con, "r2", "vllm-a", seed=2, concurrencies=(1, 2), started_at=T0.replace(day=21))
    instance = dg.DagsterInstance.ephemeral()

    first = _materialize(tmp_path, mlflow_server, prefix, instance)
    assert first.success
    (mat,) = first.asset_materializations_for_node("mlflow_experiments")
    md = mat.metadata
    assert md["benchmark_runs_logged"].value == 2 and md["already_logged"].value == 0
    url = md["latest_mlflow_run_url"].value
    assert url.startswith(f"{mlflow_server}/#/experiments/") and url in md["logged_this_time"].value
    run = client.get_run(url.rsplit("/", 1)[-1])
    assert run.data.tags["idp.logged_by_dagster_run_url"] == f"http://127.0.0.1:3000/runs/{first.run_id}"
    assert run.data.tags["idp.complete"] == "true"

    again = _materialize(tmp_path, mlflow_server, prefix, instance)
    (mat,) = again.asset_materializations_for_node("mlflow_experiments")
    assert mat.metadata["benchmark_runs_logged"].value == 0 and mat.metadata["already_logged"].value == 2
    exp = client.get_experiment_by_name(prefix + "benchmarks/vllm-a")
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_asset_fails_naming_the_tracking_uri_when_mlflow_is_down(mlflow_server, client, warehouse, prefix,
                                                                  tmp_path):
    with warehouse.write() as con:
        insert_benchmark_run(con, "r1", "vllm-a", seed=1, concurrencies=(1, 2))
    instance = dg.DagsterInstance.ephemeral()
    down = f"http://127.0.0.1:{free_port()}"

    failed = _materialize(tmp_path, down, prefix, instance)
    assert not failed.success
    (event,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    error = event.step_failure_data.error
    assert error.cause.cls_name == "TrackingError"
    assert f"MLflow tracking server {down} is not reachable" in error.cause.message
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM benchmark_runs").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM mlflow_runs").fetchone()[0] == 0

    back = _materialize(tmp_path, mlflow_server, prefix, instance)
    (mat,) = back.asset_materializations_for_node("mlflow_experiments")
    assert mat.metadata["benchmark_runs_logged"].value == 1
