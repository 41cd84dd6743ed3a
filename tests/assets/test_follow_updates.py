"""FOLLOW_UPDATES, the automation condition of every asset that follows its inputs (tuning, findings, the
MLflow sync, the notes, rendered configs), evaluated tick by tick as the daemon's sensor evaluates it, with
real runs in a real Dagster instance: the sensor's requests are launched as the daemon launches them (the
asset selection, the `dagster/from_automation_condition` tag), other runs as a backfill or a click would.
The chain through the real daemon is tests/test_automation.py; the races below are rare there (they need
two benchmarks to end close together), so they are pinned here."""

from __future__ import annotations

import threading

import dagster as dg
import pytest

from idp_pipelines.assets.common import FOLLOW_UPDATES

ENDPOINTS = dg.StaticPartitionsDefinition(["gpu", "cpu"])
SYNC_STARTED, SYNC_RELEASE = threading.Event(), threading.Event()


@dg.asset(partitions_def=ENDPOINTS)
def bench() -> None:
    """Stands for benchmark_runs: one partition per endpoint."""


@dg.asset(deps=[bench], automation_condition=FOLLOW_UPDATES)
def sync() -> None:
    """Stands for mlflow_experiments: logs every benchmark the warehouse holds (read when it starts)."""
    SYNC_STARTED.set()
    assert SYNC_RELEASE.wait(60), "the test never let the sync end"


class Lab:
    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.defs = dg.Definitions(assets=[bench, sync])
        self.job = self.defs.resolve_implicit_global_asset_job_def()
        self.instance = instance
        self.cursor = None

    def tick(self) -> int:
        """One evaluation of the automation sensor: how many runs of `sync` it requests."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        return result.get_num_requested(sync.key)

    def run(self, asset: dg.AssetsDefinition, partition: str | None = None, *, by_automation: bool) -> None:
        tags = {"dagster/from_automation_condition": "true"} if by_automation else None
        result = self.job.execute_in_process(instance=self.instance, partition_key=partition,
                                             asset_selection=[asset.key], tags=tags)
        assert result.success

    def benchmark(self, endpoint: str) -> None:
        self.run(bench, endpoint, by_automation=False)  # a schedule's run, or a click in the UI

    def synced(self) -> None:
        self.run(sync, by_automation=True)  # what the daemon launches for a request


@pytest.fixture
def lab(tmp_path):
    SYNC_STARTED.clear()
    SYNC_RELEASE.set()  # by default a sync ends at once
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        yield Lab(instance)
    SYNC_RELEASE.set()


def test_a_benchmark_is_followed_once(lab):
    assert lab.tick() == 0  # nothing yet, nothing to follow
    lab.benchmark("gpu")
    assert lab.tick() == 1
    lab.synced()
    assert lab.tick() == 0 and lab.tick() == 0  # followed: no second run, no loop


def test_a_benchmark_that_lands_while_the_sync_ends_is_followed_too(lab):
    lab.tick()
    lab.benchmark("gpu")
    assert lab.tick() == 1
    # the sync reads the warehouse, the cpu benchmark lands, the sync ends: the sensor sees both updates at its
    # next tick, and eager() takes the sync's for having handled the benchmark's
    lab.benchmark("cpu")
    lab.synced()
    assert lab.tick() == 1  # once more: the cpu benchmark reaches MLflow
    lab.synced()
    assert lab.tick() == 0


def test_a_benchmark_that_lands_while_the_sync_runs_across_a_tick_is_followed_too(lab):
    lab.tick()
    lab.benchmark("gpu")
    assert lab.tick() == 1
    SYNC_RELEASE.clear()
    running = threading.Thread(target=lab.synced)
    running.start()
    try:
        assert SYNC_STARTED.wait(60)
        lab.benchmark("cpu")
        assert lab.tick() == 0  # never beside a run of itself
    finally:
        SYNC_RELEASE.set()
        running.join(60)
    assert not running.is_alive()
    assert lab.tick() == 1  # the cpu benchmark landed after the sync had read its inputs
    lab.synced()
    assert lab.tick() == 0


def test_a_backfill_that_materialises_both_is_not_followed_again(lab):
    lab.tick()
    lab.benchmark("gpu")
    lab.benchmark("cpu")
    lab.run(sync, by_automation=False)  # the backfill's own run of the sync, after the benchmarks
    assert lab.tick() == 0 and lab.tick() == 0
