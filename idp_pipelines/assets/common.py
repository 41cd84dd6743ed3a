"""Pieces the domain asset modules share."""

import time
from collections.abc import Callable
from typing import Any

import dagster as dg

from idp_pipelines.checks import Judgement

# Downstream of partitioned assets some partitions may never be materialised (an endpoint that is off,
# a model not downloaded yet): eager() would wait for them forever, so follow any update of a
# dependency instead, still never while one is in progress.
FOLLOW_UPDATES = (
    dg.AutomationCondition.eager()
    .without(~dg.AutomationCondition.any_deps_missing())
    .with_label("eager, even with upstream partitions missing")
)


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
