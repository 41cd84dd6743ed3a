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
# And one case eager() drops: its automation sensor sees updates once a tick (30 s), and when a dependency
# and this asset both updated since the last tick, it counts this asset's update as having handled the
# dependency's (dagster-io/dagster#24650). That is wrong when this asset's run read its inputs before the
# dependency landed: the second of two benchmarks finishing while the first one's MLflow sync was ending
# never reached MLflow. Run once more in that case; the assets that follow updates are idempotent (a sync,
# a note, a rendered config), so the cost of a run that was not needed is that run.
_BOTH_UPDATED = (
    dg.AutomationCondition.any_deps_updated()
    & dg.AutomationCondition.newly_updated()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("a dependency and this asset both updated since the last tick")
FOLLOW_UPDATES = (
    dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
    | _BOTH_UPDATED
).with_label("eager, even with upstream partitions missing, and once more after a race")


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
