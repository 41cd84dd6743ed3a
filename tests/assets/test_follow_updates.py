"""FOLLOW_UPDATES, the automation condition of every asset that follows its inputs (tuning, findings, the
MLflow sync, the notes, rendered configs), evaluated tick by tick as the daemon's sensor would, with real
materialisations in a real (ephemeral) instance. The chain through the real daemon is tests/test_automation.py;
the race below is rare there (two updates within one 30 s tick), so it is pinned here."""

from __future__ import annotations

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES

ENDPOINTS = dg.StaticPartitionsDefinition(["gpu", "cpu"])


@dg.asset(partitions_def=ENDPOINTS)
def bench() -> None:
    """Stands for benchmark_runs: one partition per endpoint."""


@dg.asset(deps=[bench], automation_condition=FOLLOW_UPDATES)
def sync() -> None:
    """Stands for mlflow_experiments: logs every benchmark the warehouse holds."""


class Ticks:
    def __init__(self) -> None:
        self.defs = dg.Definitions(assets=[bench, sync])
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor = None

    def tick(self) -> int:
        """One evaluation of the automation sensor: how many runs of `sync` it requests."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        return result.get_num_requested(sync.key)

    def benchmark(self, endpoint: str) -> None:
        assert dg.materialize([bench], partition_key=endpoint, instance=self.instance).success

    def synced(self) -> None:
        assert dg.materialize([sync], instance=self.instance).success


def test_a_benchmark_is_followed_once():
    t = Ticks()
    assert t.tick() == 0  # nothing yet, nothing to follow
    t.benchmark("gpu")
    assert t.tick() == 1
    t.synced()
    assert t.tick() == 0 and t.tick() == 0  # followed: no second run, no loop


def test_a_benchmark_that_lands_while_the_sync_ends_is_followed_too():
    t = Ticks()
    t.tick()
    t.benchmark("gpu")
    assert t.tick() == 1
    # the requested sync reads the warehouse; the cpu benchmark lands; the sync ends without it. The sensor
    # sees both updates at its next tick: eager() alone takes the sync's update as handling the benchmark's
    t.benchmark("cpu")
    t.synced()
    assert t.tick() == 1  # run once more: the cpu benchmark reaches MLflow
    t.synced()
    assert t.tick() == 0
