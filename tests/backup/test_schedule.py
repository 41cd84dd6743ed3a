"""The freshness bound from the backup cron, and the new-artefact trigger's decisions (no Dagster)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from idp_pipelines.backup.schedule import decide_trigger, longest_gap


@pytest.mark.parametrize(("cron", "gap"), [
    ("0 4 * * *", timedelta(days=1)),
    ("0 4 * * 0", timedelta(days=7)),
    ("*/15 * * * *", timedelta(minutes=15)),
    ("0 4,16 * * mon-fri", timedelta(days=2, hours=12)),  # Friday 16:00 to Monday 04:00
    ("30 2 1 * *", timedelta(days=31)),
])
def test_longest_gap_of_a_cron(cron, gap):
    assert longest_gap(cron) == gap


def test_a_bad_cron_says_what_is_expected():
    with pytest.raises(ValueError, match=r"'0 4 \* \*' is not a 5-field cron expression. Fix: e.g. '0 4 \* \* \*'"):
        longest_gap("0 4 * *")


def test_the_trigger_waits_for_quiet_and_for_a_running_backup():
    assert decide_trigger([100.0, 160.0], now=200.0, debounce_s=60, backup_running=False).reason == (
        "2 new model artefact(s); waiting for 20 s more without a new one (backup.debounce_s 60)")
    busy = decide_trigger([100.0], now=1000.0, debounce_s=60, backup_running=True)
    assert not busy.run and "a backup is running" in busy.reason
    go = decide_trigger([100.0, 160.0], now=1000.0, debounce_s=60, backup_running=False)
    assert go.run and go.reason == "2 new model artefact(s), the last 840 s ago"
