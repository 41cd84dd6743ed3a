"""Pieces the domain asset modules share."""

import dagster as dg

# Downstream of partitioned assets some partitions may never be materialised (an endpoint that is off,
# a model not downloaded yet): eager() would wait for them forever, so follow any update of a
# dependency instead, still never while one is in progress.
FOLLOW_UPDATES = (
    dg.AutomationCondition.eager()
    .without(~dg.AutomationCondition.any_deps_missing())
    .with_label("eager, even with upstream partitions missing")
)
