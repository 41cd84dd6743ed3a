"""The deploy group materialised by Dagster on a real instance: checks, tuned values, keys kept out of events."""

from __future__ import annotations

import json

import dagster as dg
from dagster._serdes import serialize_value

from idp_pipelines.assets import deploy
from idp_pipelines.deploy.keys import host_keys
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource
from idp_pipelines.settings import reports_dir
from tests.deploy.conftest import artifacts_for, lab_with


def _lab(tmp_path):
    def keyed(data):
        data["endpoints"][0]["api_key_env"] = "LOCAL_LLAMA_KEY"
    return lab_with(tmp_path, "local", keyed)


def _report_models(instance, lab, tmp_path):
    """What hub_model and gguf_model record when they run (their own tests cover them)."""
    for (asset, model), art in artifacts_for(lab, tmp_path / "cache").items():
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=asset, partition=model, metadata={"path": dg.MetadataValue.path(str(art.path))}))


def _materialize(instance, lab_file, names, partition=None, run_config=None):
    assets = {a.key.to_user_string(): a for a in deploy.build(load_lab(lab_file)).assets}
    return dg.materialize([assets[n] for n in names], partition_key=partition, instance=instance,
                          run_config=run_config, resources={"lab": LabResource(path=str(lab_file))}, raise_on_error=False)


def _meta(result, key):
    mats = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == key]
    return mats[-1].materialization.metadata


def _checks(result):
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _write_tuning(recommended, run_id):
    path = reports_dir() / "benchmark_tuning.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"local-llamacpp": {"setting": "parallel", "recommended": recommended, "current": 4,
                                                   "run_id": run_id, "reason": "highest concurrency meeting the SLOs"}}))


def test_the_group_materialises_with_tuned_values_and_passing_checks_and_no_key_in_any_event(tmp_path):
    lab_file = _lab(tmp_path)
    lab = load_lab(lab_file)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        _report_models(instance, lab, tmp_path)
        _write_tuning(8, "bench-run-42")
        first = _materialize(instance, lab_file, ["service_secrets", "service_configs"], "localhost")
        assert first.success
        checks = _checks(first)
        assert all(c.passed for c in checks.values()), {n: c.description for n, c in checks.items()}
        assert set(checks) == {deploy.ENV_PRIVATE, deploy.COMPOSE_SCHEMA, deploy.MOUNTS_PRODUCED, deploy.KEYS_IN_ENV}
        assert _meta(first, "service_secrets")["created"].value == "LOCAL_LLAMA_KEY"
        key = host_keys("localhost")["LOCAL_LLAMA_KEY"]
        tuned = _meta(first, "service_configs")["tuned_values"].value["local-llamacpp"]
        assert (tuned["value"], tuned["source"], tuned["run_id"]) == (8, "benchmark_tuning", "bench-run-42")
        assert "bench-run-42" in _meta(first, "service_configs")["tuned"].value

        # a recommendation within the hysteresis of what is deployed changes nothing
        _write_tuning(9, "bench-run-43")
        second = _materialize(instance, lab_file, ["service_secrets", "service_configs"], "localhost")
        tuned = _meta(second, "service_configs")["tuned_values"].value["local-llamacpp"]
        assert (tuned["value"], tuned["source"], tuned["run_id"]) == (8, "kept", "bench-run-43")
        assert _meta(second, "service_secrets")["kept"].value == "LOCAL_LLAMA_KEY"
        assert host_keys("localhost")["LOCAL_LLAMA_KEY"] == key

        rest = _materialize(instance, lab_file, ["gateway_config", "monitoring_config"])
        assert rest.success
        checks = _checks(rest)
        assert all(c.passed for c in checks.values()), {n: c.description for n, c in checks.items()}
        assert {deploy.NGINX_T, deploy.UPSTREAMS, deploy.PROM_CONFIG, deploy.PROM_RULES, deploy.GRAFANA,
                deploy.SCRAPE_TARGETS} == set(checks)

        rotated = _materialize(instance, lab_file, ["service_secrets"], "localhost",
                               run_config={"ops": {"service_secrets": {"config": {"rotate": ["LOCAL_LLAMA_KEY"]}}}})
        assert _meta(rotated, "service_secrets")["rotated"].value == "LOCAL_LLAMA_KEY"
        new_key = host_keys("localhost")["LOCAL_LLAMA_KEY"]
        assert new_key != key

        env = tmp_path / "idp-home" / "deploy" / "localhost" / ".env"
        assert env.stat().st_mode & 0o777 == 0o600
        runs = instance.get_runs()
        assert len(runs) == 4
        for run in runs:
            for event in instance.all_logs(run.run_id):
                blob = serialize_value(event)
                assert key not in blob and new_key not in blob, f"a key reached an event of run {run.run_id}"


def test_service_configs_without_a_model_materialisation_says_what_to_run(tmp_path):
    lab_file = _lab(tmp_path)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = _materialize(instance, lab_file, ["service_secrets", "service_configs"], "localhost")
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert ("service 'local-llamacpp' serves model 'tiny-llama', but gguf_model[tiny-llama] has no materialisation"
            in failure.event_specific_data.error.cause.message)
