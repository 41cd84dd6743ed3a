"""Pieces the domain asset modules share."""

import time
from collections.abc import Callable

import dagster as dg

# Downstream of partitioned assets some partitions may never be materialised (an endpoint that is off,
# a model not downloaded yet): eager() would wait for them forever, so follow any update of a
# dependency instead, still never while one is in progress.
FOLLOW_UPDATES = (
    dg.AutomationCondition.eager()
    .without(~dg.AutomationCondition.any_deps_missing())
    .with_label("eager, even with upstream partitions missing")
)


class Throttle:
    """Long work reports progress every `every_s` seconds, and always its last step, not every chunk."""

    def __init__(self, emit: Callable[[str], None], every_s: float = 10.0) -> None:
        self.emit, self.every_s, self.last = emit, every_s, float("-inf")

    def __call__(self, message: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.every_s:
            self.last = now
            self.emit(message)
