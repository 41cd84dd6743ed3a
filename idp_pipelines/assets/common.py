"""Pieces the domain asset modules share."""

import time
from collections.abc import Callable
from typing import Any

import dagster as dg

from idp_pipelines.checks import Judgement

# Downstream of partitioned assets some partitions may never be materialised (an endpoint that is off,
# a model not downloaded yet): eager() would wait for them forever, so follow any update of a
# dependency instead, still never while one is in progress.
#
# And not eager()'s idea of "handled". eager() counts this asset's own update as having handled every
# dependency update its sensor (one tick every 30 s) has seen, which is wrong when this asset's run read its
# inputs before the dependency landed (dagster-io/dagster#24650): a benchmark that ended while the previous
# benchmark's MLflow sync was still running never reached MLflow. Here a run the automation launched
# handles what its request saw: the request resets, unless a dependency landed since the tick before it,
# and that run's own update resets nothing. An update from any other run (a backfill, `make up`'s main
# job, a click in the UI) handles everything, as in eager(), so no run follows a backfill twice.
_AC = dg.AutomationCondition
_LAUNCHED_BY_AUTOMATION = _AC.executed_with_tags(tag_keys={"dagster/from_automation_condition"})
_HANDLED = (
    (_AC.newly_requested() & ~_AC.any_deps_updated())
    | (_AC.newly_updated() & ~_LAUNCHED_BY_AUTOMATION)
    | _AC.initial_evaluation()
).with_label("handled: requested with nothing new since, or updated by a run automation did not launch")
FOLLOW_UPDATES = (
    (_AC.newly_missing() | _AC.any_deps_updated()).since(_HANDLED)
    & ~_AC.any_deps_in_progress()
    & ~_AC.in_progress()
).with_label("a dependency updated since this asset last handled one, even with upstream partitions missing")


def check_result(j: Judgement, **metadata: Any) -> dg.AssetCheckResult:
    """A core's Judgement as Dagster's check result (one conversion for every domain)."""
    return dg.AssetCheckResult(check_name=j.check, passed=j.passed, description=j.description,
                               severity=dg.AssetCheckSeverity[j.severity], metadata={**j.metadata, **metadata})


class Throttle:
    """Routine progress every `every_s` seconds, and always its last step, not every chunk.

    Only routine progress is ever dropped: `warning()` and `error()` always reach the log (through `warn`
    and `error`, or `emit` when those are not given), and they do not reset the progress interval.
    """

    def __init__(self, emit: Callable[[str], None], every_s: float = 10.0, *,
                 warn: Callable[[str], None] | None = None, error: Callable[[str], None] | None = None) -> None:
        self.emit, self.every_s, self.last = emit, every_s, float("-inf")
        self._warn, self._error = warn or emit, error or emit

    def __call__(self, message: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.every_s:
            self.last = now
            self.emit(message)

    def warning(self, message: str) -> None:
        self._warn(message)

    def error(self, message: str) -> None:
        self._error(message)
