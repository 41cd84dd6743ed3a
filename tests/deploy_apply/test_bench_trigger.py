"""The benchmark trigger sensor follows what the deploy job put in place (deployed_state), not the inventory."""

from __future__ import annotations

import time

import dagster as dg

from idp_pipelines.assets.benchmarks import evaluate_benchmark_triggers
from idp_pipelines.lab import load_lab
from idp_pipelines.settings import REPO_ROOT

EP = "local-llamacpp"


def _tick(lab, cursor, now, instance):
    with dg.build_sensor_context(cursor=cursor, instance=instance) as ctx:
        return evaluate_benchmark_triggers(ctx, lab, now)


def _deployed(instance, settings):
    instance.report_runless_asset_event(dg.AssetMaterialization(
        "deployed_state", partition="localhost", metadata={"endpoint_settings": dg.MetadataValue.json({EP: settings})}))


def test_a_deploy_of_the_inventorys_settings_triggers_nothing_a_tuned_deploy_triggers_one_benchmark():
    instance = dg.DagsterInstance.ephemeral()
    lab = load_lab(REPO_ROOT / "labs" / "local.yaml")
    t = time.time()
    cursor = _tick(lab, None, t, instance).cursor
    # the first deploy puts exactly the inventory's settings in place: nothing to measure again
    _deployed(instance, dict(lab.endpoint(EP).settings))
    same = _tick(lab, cursor, t + 100, instance)
    assert same.run_requests == [] and same.cursor == cursor
    # a deploy with benchmark_tuning's parallel slots (the inventory is unchanged): one run once settled
    _deployed(instance, {**lab.endpoint(EP).settings, "parallel": 8})
    pending = _tick(lab, cursor, t + 200, instance)
    assert pending.run_requests == []
    fired = _tick(lab, pending.cursor, t + 200 + lab.benchmarks.debounce_s + 1, instance)
    assert [r.partition_key for r in fired.run_requests] == [EP]
    assert _tick(lab, fired.cursor, t + 1000, instance).run_requests == []
