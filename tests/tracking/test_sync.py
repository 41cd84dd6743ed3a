"""idp_pipelines.tracking.sync against a real `mlflow server`: each benchmark run logged once, resumable, no secret."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from idp_pipelines.assets.tracking import recommended_concurrency
from idp_pipelines.processes import free_port
from idp_pipelines.secrets import REDACTED, Redactor
from idp_pipelines.tracking import BENCHMARK, QUANTIZATION, MLflowLogger, TrackingError
from idp_pipelines.tracking.specs import TUNED_BY_SLO
from tests.tracking.synthetic import SECRET, T0, insert_benchmark_run, insert_quantization


def _seed(warehouse, *, leak: bool = False) -> None:
    with warehouse.write() as con:
        insert_benchmark_run(con, "r1", "vllm-a", seed=1, leak_secret=SECRET if leak else None)
        insert_benchmark_run(con, "r2", "vllm-a", seed=2, started_at=T0.replace(day=21))
        insert_benchmark_run(con, "r3", "vllm-a", seed=3, status="failed", started_at=T0.replace(day=22))
        insert_benchmark_run(con, "r4", "llama-b", kind="llamacpp", seed=4, concurrencies=(1, 2))
        insert_quantization(con)


def _logger(client, warehouse, uri, prefix, findings: dict[str, Path] | None = None, **kw) -> MLflowLogger:
    findings = findings or {}
    return MLflowLogger(client, warehouse, uri, experiment_prefix=prefix, dagster_run_id="logger-run-1",
                        findings_for=findings.get, redactor=kw.pop("redactor", None) or Redactor.from_env(),
                        recommend=kw.pop("recommend", recommended_concurrency), **kw)


def _runs(client, prefix, name, view="ALL"):
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(prefix + name)
    return client.search_runs([exp.experiment_id], run_view_type=getattr(ViewType, view)) if exp else []


def _steps(warehouse, run_id, col):
    with warehouse.read() as con:
        return con.execute(f"SELECT concurrency, {col} FROM benchmark_steps WHERE run_id = ? ORDER BY 1",
                           [run_id]).fetchall()


def test_each_complete_run_logged_once_with_params_curves_and_artefacts(mlflow_server, client, warehouse,
                                                                         prefix, tmp_path):
    _seed(warehouse)
    report = _logger(client, warehouse, mlflow_server, prefix).sync()
    assert (report.count(BENCHMARK, "created"), report.count(QUANTIZATION, "created")) == (3, 1)

    # Comparable in the UI: found by what was deployed, not by an id.
    exp = client.get_experiment_by_name(prefix + "benchmarks/vllm-a")
    found = client.search_runs([exp.experiment_id],
                               "params.engine = 'vllm' and params.`engine.max_num_seqs` = '64' "
                               "and params.prompt_set = 'chat-short-v1' and tags.`idp.complete` = 'true'")
    assert sorted(r.data.tags["idp.benchmark_run_id"] for r in found) == ["r1", "r2"]  # r3 failed: not logged
    r1 = next(r for r in found if r.data.tags["idp.benchmark_run_id"] == "r1")
    p, t = r1.data.params, r1.data.tags
    assert (p["endpoint"], p["quantization"], p["load_model"], p["concurrencies"], p["harness_version"]) == (
        "vllm-a", "Q4_K_M", "closed_loop", "1,2,4,8", "0.3.1")
    assert (p["model_repo_id"], p["engine.gpu_memory_utilization"], p["engine.max_num_batched_tokens"]) == (
        "idp-local/tiny-llama", "0.9", "8192")
    assert t["idp.dagster_run_url"] == "http://127.0.0.1:3000/runs/dagster-run-0001"
    assert t["idp.logged_by_dagster_run_id"] == "logger-run-1"
    assert (t["idp.asset_key"], t["idp.partition"]) == ("benchmark_runs", "vllm-a")
    assert t["mlflow.source.git.commit"] == "a" * 40 and t["idp.lab_git_sha.homelab-ansible:main"] == "b" * 40
    assert t["idp.quantization_id"] == "d" * 64

    # One point per load step, step = concurrency, values as in DuckDB.
    history = client.get_metric_history(r1.info.run_id, "output_tokens_per_s")
    assert sorted((m.step, m.value) for m in history) == _steps(warehouse, "r1", "output_tokens_per_s")
    assert sorted(m.step for m in client.get_metric_history(r1.info.run_id, "ttft_ms_p95")) == [1, 2, 4, 8]
    assert r1.data.metrics["server.gauges.vllm:num_requests_running"] == 8.0  # the latest step is the highest
    # tuned/* is the step benchmark_tuning recommends for these SLOs
    from idp_pipelines.bench.tuning import recommend_concurrency

    with warehouse.read() as con:
        cur = con.execute("SELECT * FROM benchmark_steps WHERE run_id = 'r1'")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    recommended = recommend_concurrency(rows, {"ttft_ms": 2000.0, "tpot_ms": 100.0}).recommended
    assert recommended is not None and r1.data.metrics["tuned/concurrency"] == recommended
    assert r1.data.tags["idp.tuned_by"] == TUNED_BY_SLO
    goodput = dict(_steps(warehouse, "r1", "goodput_requests_per_s"))
    assert r1.data.metrics["tuned/goodput_requests_per_s"] == pytest.approx(goodput[recommended])

    # Artefacts download; the parquet holds every request of the run.
    dst = Path(client.download_artifacts(r1.info.run_id, "", str(tmp_path / "dl")))
    files = sorted(str(f.relative_to(dst)) for f in dst.rglob("*") if f.is_file())
    assert files == ["plots/latency_throughput.png", "plots/ttft_distribution.png", "requests/requests.parquet",
                     "steps/steps.json"]
    assert (dst / "plots/latency_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with warehouse.read() as con:
        n = con.execute("SELECT count(*) FROM benchmark_requests WHERE run_id = 'r1'").fetchone()[0]
    assert pq.read_table(dst / "requests/requests.parquet").num_rows == n == 96

    # The quantization, with the benchmark runs that used its artefact afterwards.
    (q,) = _runs(client, prefix, "quantizations")
    assert (q.data.params["quant_type"], q.data.params["source_sha256"], q.data.metrics["size_ratio"]) == (
        "Q4_K_M", "e" * 64, 0.28)
    assert q.data.tags["idp.used_by_benchmark_runs"] == "r1,r2,r4"

    with warehouse.read() as con:
        links = con.execute("SELECT kind, source_id, mlflow_run_id, run_url, tracking_uri FROM mlflow_runs "
                            "ORDER BY 1, 2").fetchall()
    assert [(k, s) for k, s, *_ in links] == [("benchmark", "r1"), ("benchmark", "r2"), ("benchmark", "r4"),
                                              ("quantization", "d" * 64)]
    r1_link = next(x for x in links if x[1] == "r1")
    assert r1_link[2] == r1.info.run_id and r1_link[3].startswith(f"{mlflow_server}/#/experiments/")

    # Materialising again creates nothing.
    again = _logger(client, warehouse, mlflow_server, prefix).sync()
    assert again.logged == [] and again.up_to_date == 4
    assert len(_runs(client, prefix, "benchmarks/vllm-a")) == 2 and len(_runs(client, prefix, "quantizations")) == 1


def test_no_secret_in_params_tags_metric_keys_or_artefacts(mlflow_server, client, warehouse, prefix, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    _seed(warehouse, leak=True)  # the key is in engine settings, a CLI flag, an error text and the findings
    report_md = tmp_path / "r1.md"
    report_md.write_text(f"# r1\nThe server rejected key {SECRET} at c=8.\n")
    _logger(client, warehouse, mlflow_server, prefix, findings={"r1": report_md}).sync()

    runs = [r for name in ("benchmarks/vllm-a", "benchmarks/llama-b", "quantizations")
            for r in _runs(client, prefix, name)]
    assert len(runs) == 4
    seen = []
    for r in runs:
        seen += [*r.data.params.items(), *r.data.tags.items(), *r.data.metrics]
        dst = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / r.info.run_id)))
        for f in dst.rglob("*"):
            if f.is_file():
                seen.append(f.read_bytes().decode("latin-1"))
                if f.suffix == ".parquet":  # compressed on disk: look at the values too
                    seen.append(json.dumps(pq.read_table(f).to_pylist(), default=str))
    assert not [x for x in seen if SECRET in str(x)]
    # ...and it was there to leak: redacted where it stood.
    r1 = next(r for r in runs if r.data.tags.get("idp.benchmark_run_id") == "r1")
    assert r1.data.params["engine.api_key"] == REDACTED
    assert r1.data.params["engine.extra_args"] == f"--api-key {REDACTED} --disable-log-requests"
    assert any(f"invalid key {REDACTED}" in x for x in seen)
    assert any(f"rejected key {REDACTED}" in x for x in seen)


def test_a_crash_half_way_is_resumed_not_duplicated(mlflow_server, client, warehouse, prefix):
    from mlflow.exceptions import MlflowException

    with warehouse.write() as con:
        insert_benchmark_run(con, "r1", "vllm-a", seed=1)
    real = client.log_artifact
    calls = []

    def dies_on_second_upload(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise MlflowException("connection reset by peer (simulated crash)")
        return real(*args, **kwargs)

    client.log_artifact = dies_on_second_upload
    with pytest.raises(TrackingError, match=f"MLflow at {mlflow_server} failed while logging benchmark r1"):
        _logger(client, warehouse, mlflow_server, prefix).sync()
    (half,) = _runs(client, prefix, "benchmarks/vllm-a")
    assert "idp.complete" not in half.data.tags and half.data.params["endpoint"] == "vllm-a"
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM mlflow_runs").fetchone()[0] == 0

    client.log_artifact = real
    report = _logger(client, warehouse, mlflow_server, prefix).sync()
    assert [(r.source_id, r.action, r.mlflow_run_id) for r in report.logged] == [("r1", "resumed", half.info.run_id)]
    (run,) = _runs(client, prefix, "benchmarks/vllm-a")
    assert run.data.tags["idp.complete"] == "true" and run.info.status == "FINISHED"
    assert len(client.list_artifacts(run.info.run_id, "plots")) == 2
    assert len(client.get_metric_history(run.info.run_id, "output_tokens_per_s")) == 4  # re-sent, not doubled


def test_a_param_already_logged_with_another_value_is_kept_and_the_new_one_tagged(mlflow_server, client,
                                                                                   warehouse, prefix):
    with warehouse.write() as con:
        insert_benchmark_run(con, "r1", "vllm-a", seed=1)
    exp = client.create_experiment(prefix + "benchmarks/vllm-a")
    stale = client.create_run(exp, tags={"idp.kind": "benchmark", "idp.benchmark_run_id": "r1"})
    client.log_param(stale.info.run_id, "engine.max_num_seqs", "32")
    client.log_param(stale.info.run_id, "endpoint", "vllm-a")

    (logged,) = _logger(client, warehouse, mlflow_server, prefix).sync().logged
    assert (logged.action, logged.mlflow_run_id) == ("resumed", stale.info.run_id)
    run = client.get_run(stale.info.run_id)
    assert run.data.params["engine.max_num_seqs"] == "32"  # params are write-once
    assert run.data.tags["idp.param_conflict.engine.max_num_seqs"] == "64"
    assert "idp.param_conflict.endpoint" not in run.data.tags and run.data.tags["idp.complete"] == "true"


def test_findings_written_later_and_later_benchmark_runs_reach_logged_runs(mlflow_server, client, warehouse,
                                                                           prefix, tmp_path):
    with warehouse.write() as con:
        insert_benchmark_run(con, "r1", "vllm-a", seed=1, concurrencies=(1, 2))
        insert_quantization(con)
    findings: dict[str, Path] = {}
    _logger(client, warehouse, mlflow_server, prefix, findings=findings).sync()

    (tmp_path / "r1.md").write_text("# r1\nc=2 is the knee.\n")
    findings["r1"] = tmp_path / "r1.md"
    with warehouse.write() as con:
        insert_benchmark_run(con, "r2", "vllm-a", seed=2, concurrencies=(1, 2), started_at=T0.replace(day=23))
    report = _logger(client, warehouse, mlflow_server, prefix, findings=findings).sync()
    assert [r.source_id for r in report.logged] == ["r2"] and report.refreshed == 2

    (q,) = _runs(client, prefix, "quantizations")
    assert q.data.tags["idp.used_by_benchmark_runs"] == "r1,r2"
    r1 = next(r for r in _runs(client, prefix, "benchmarks/vllm-a") if r.data.tags["idp.benchmark_run_id"] == "r1")
    assert [a.path for a in client.list_artifacts(r1.info.run_id, "findings")] == ["findings/findings.md"]
    assert _logger(client, warehouse, mlflow_server, prefix, findings=findings).sync().refreshed == 0


def test_mlflow_down_names_the_uri_keeps_duckdb_and_the_next_sync_logs_each_run_once(mlflow_server, client,
                                                                                     warehouse, prefix):
    from mlflow import MlflowClient

    _seed(warehouse)
    with warehouse.read() as con:
        before = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("benchmark_runs", "benchmark_steps", "benchmark_requests", "quantizations")]
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"MLflow tracking server {down} is not reachable"):
        _logger(MlflowClient(down), warehouse, down, prefix).sync()
    with warehouse.read() as con:
        after = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("benchmark_runs", "benchmark_steps", "benchmark_requests", "quantizations")]
        assert con.execute("SELECT count(*) FROM mlflow_runs").fetchone()[0] == 0
    assert after == before

    back = _logger(client, warehouse, mlflow_server, prefix).sync()
    assert sorted(r.source_id for r in back.logged if r.kind == BENCHMARK) == ["r1", "r2", "r4"]
    assert _logger(client, warehouse, mlflow_server, prefix).sync().logged == []
    ids = [r.data.tags["idp.benchmark_run_id"] for r in _runs(client, prefix, "benchmarks/vllm-a")]
    assert sorted(ids) == ["r1", "r2"]


def test_a_wiped_store_behind_the_same_uri_is_logged_again_but_a_run_deleted_by_hand_is_not(
        tmp_path, warehouse, prefix, request):
    from mlflow import MlflowClient

    from idp_pipelines.embedded.mlflow_server import local_mlflow_server, migrated_template

    _seed(warehouse)
    cache = getattr(request.config, "cache", None)
    template = migrated_template(cache.mkdir("mlflow-store") if cache else tmp_path / "template")
    port = free_port()
    with local_mlflow_server(tmp_path / "first", template=template, port=port) as uri:
        client = MlflowClient(uri)
        first = _logger(client, warehouse, uri, prefix).sync()
        assert len(first.logged) == 4 and first.relogged == 0
        r1 = next(r.mlflow_run_id for r in first.logged if r.source_id == "r1")
        client.delete_run(r1)  # the owner's choice in the MLflow UI
        again = _logger(client, warehouse, uri, prefix).sync()
        assert (again.logged, again.relogged, again.up_to_date) == ([], 0, 4)
    # the same URI, an empty store (wiped, or a new machine without the old mlflow.db)
    with local_mlflow_server(tmp_path / "second", template=template, port=port) as same_uri:
        assert same_uri == uri
        client = MlflowClient(uri)
        back = _logger(client, warehouse, uri, prefix).sync()
        assert back.relogged == 4 and sorted(r.source_id for r in back.logged if r.kind == BENCHMARK) == ["r1", "r2", "r4"]
        assert len(_runs(client, prefix, "quantizations")) == 1
        assert sorted(r.data.tags["idp.benchmark_run_id"] for r in _runs(client, prefix, "benchmarks/vllm-a")) == \
            ["r1", "r2"]
        with warehouse.read() as con:
            linked = {s: run for s, run in con.execute("SELECT source_id, mlflow_run_id FROM mlflow_runs").fetchall()}
        assert linked == {r.source_id: r.mlflow_run_id for r in back.logged}
        assert _logger(client, warehouse, uri, prefix).sync().logged == []
