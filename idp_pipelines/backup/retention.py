"""Which snapshots to keep: the newest of each of the last N days and of the last M ISO weeks.

Days and weeks are counted over the days (weeks) that have a snapshot, not calendar days back from today:
a target that was off for a month still keeps N days of history. The newest complete snapshot is always
kept, whatever the settings say.
"""

from __future__ import annotations

from datetime import datetime, timezone


def _time(name: str) -> datetime:
    return datetime.strptime(name, "%Y-%m-%dT%H-%M-%SZ").replace(tzinfo=timezone.utc)


def plan_retention(names: list[str], *, keep_daily: int, keep_weekly: int) -> tuple[list[str], list[str]]:
    """(keep, delete) of complete snapshot names, both oldest first."""
    ordered = sorted(names, key=_time)
    keep: set[str] = set(ordered[-1:])
    days: dict[str, str] = {}
    weeks: dict[tuple[int, int], str] = {}
    for name in ordered:  # oldest first, so the newest of each day/week wins
        t = _time(name)
        days[t.date().isoformat()] = name
        weeks[tuple(t.isocalendar())[:2]] = name
    keep.update(days[d] for d in sorted(days)[-keep_daily:] if keep_daily)
    keep.update(weeks[w] for w in sorted(weeks)[-keep_weekly:] if keep_weekly)
    return [n for n in ordered if n in keep], [n for n in ordered if n not in keep]
