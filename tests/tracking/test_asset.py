"""The mlflow_experiments asset: a backfill of what MLflow lacks, links both ways, a clear failure when down."""

from __future__ import annotations

import json

import dagster as dg

from idp_pipelines.assets import tracking
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource, MLflowResource, WarehouseResource
from idp_pipelines.tracking.specs import TUNED_BY_SLO
from idp_pipelines.processes import free_port
from tests.support import write_lab
from tests.tracking.synthetic import T0, insert_benchmark_run


def _materialize(tmp_path, uri, prefix, instance, lab_file=None):
    lab_file = lab_file or write_lab(tmp_path / "lab.yaml", mlflow_url=uri)
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


def test_asset_logs_a_real_sweep_of_llama_server(mlflow_server, client, warehouse, prefix, tmp_path, llama_base_url):
    """Not synthetic rows: the harness sweeps the real llama-server into DuckDB, the asset logs that run."""
    import pyarrow.parquet as pq

    from idp_pipelines.bench.suite import run_endpoint
    from idp_pipelines.bench.tuning import recommend_concurrency

    lab_file = write_lab(tmp_path / "lab.yaml", endpoint_url=llama_base_url, mlflow_url=mlflow_server)
    inv = load_lab(lab_file)
    outcome = run_endpoint(inv, "local-llamacpp", warehouse, trigger="test", concurrency=[1, 2],
                           requests_per_step=12, max_tokens=8)  # enough requests for a bounded p50
    assert outcome.status == "complete", outcome.error

    result = _materialize(tmp_path, mlflow_server, prefix, dg.DagsterInstance.ephemeral(), lab_file)
    assert result.success
    (mat,) = result.asset_materializations_for_node("mlflow_experiments")
    assert mat.metadata["benchmark_runs_logged"].value == 1
    exp = client.get_experiment_by_name(prefix + "benchmarks/local-llamacpp")
    (run,) = client.search_runs([exp.experiment_id])
    p, t = run.data.params, run.data.tags
    assert (t["idp.benchmark_run_id"], t["idp.complete"], run.info.status) == (outcome.run_id, "true", "FINISHED")
    assert (p["engine"], p["base_url"], p["concurrencies"], p["served_model_name"]) == (
        "llamacpp", llama_base_url, "1,2", "tiny-llama")
    with warehouse.read() as con:
        lab_shas = json.loads(con.execute("SELECT lab_git_shas FROM benchmark_runs").fetchone()[0])
    assert lab_shas["idp-pipelines:main"] and t["idp.lab_git_sha.idp-pipelines:main"] == lab_shas["idp-pipelines:main"]

    with warehouse.read() as con:
        cur = con.execute("SELECT * FROM benchmark_steps WHERE run_id = ? ORDER BY step_index", [outcome.run_id])
        cols = [d[0] for d in cur.description]
        steps = [dict(zip(cols, r)) for r in cur.fetchall()]
        n_requests = con.execute("SELECT count(*) FROM benchmark_requests WHERE run_id = ?",
                                 [outcome.run_id]).fetchone()[0]
    # one point per measured step, at its concurrency, with the value DuckDB holds
    history = client.get_metric_history(run.info.run_id, "output_tokens_per_s")
    assert sorted((m.step, m.value) for m in history) == [(s["concurrency"], s["output_tokens_per_s"]) for s in steps]
    assert all(m.value > 0 for m in history)
    # tuned/* is the step benchmark_tuning recommends for the endpoint's SLOs
    rec = recommend_concurrency(steps, inv.endpoint("local-llamacpp").slo.model_dump())
    assert rec.recommended in (1, 2), rec.reason
    assert run.data.metrics["tuned/concurrency"] == rec.recommended and t["idp.tuned_by"] == TUNED_BY_SLO

    dst = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
    table = pq.read_table(f"{dst}/requests/requests.parquet")
    assert table.num_rows == n_requests >= 24 and set(table.column("run_id").to_pylist()) == {outcome.run_id}
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots")) == [
        "plots/latency_throughput.png", "plots/ttft_distribution.png"]
