"""When a backup is due: the longest gap the backup cron allows, and the new-artefact trigger's debounce."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from datetime import datetime, timedelta, timezone

_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "jan": 1, "feb": 2, "mar": 3,
          "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12}


def _field(text: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in text.lower().split(","):
        step, stepped = 1, "/" in part
        if stepped:
            part, s = part.split("/")
            step = int(s)
        if part == "*":
            a, b = lo, hi
        elif "-" in part:
            a, b = (int(_NAMES.get(x, x)) for x in part.split("-"))
        else:
            a = int(_NAMES.get(part, part))
            b = hi if stepped else a
        out.update(range(a, b + 1, step))
    return out


def longest_gap(cron: str, *, start: datetime | None = None, days: int = 62) -> timedelta:
    """The longest time between two consecutive firings of a 5-field cron expression (over `days`)."""
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"{cron!r} is not a 5-field cron expression. Fix: e.g. '0 4 * * *'.")
    minutes, hours, dom, months, dow = (_field(f, lo, hi) for f, (lo, hi) in zip(fields, _RANGES, strict=True))
    dow = {d % 7 for d in dow}
    any_dom, any_dow = fields[2] == "*", fields[4] == "*"
    day = (start or datetime(2026, 1, 1, tzinfo=timezone.utc)).replace(hour=0, minute=0, second=0, microsecond=0)
    fires: list[datetime] = []
    for _ in range(days):
        wd = (day.weekday() + 1) % 7  # cron: 0 = Sunday
        # cron's rule: with both day fields restricted, a day matching either one fires
        on = (day.day in dom if any_dow else wd in dow if any_dom else day.day in dom or wd in dow)
        if day.month in months and on:
            fires += [day + timedelta(hours=h, minutes=m) for h in sorted(hours) for m in sorted(minutes)]
        day += timedelta(days=1)
    if len(fires) < 2:
        return timedelta(days=days)
    return max(b - a for a, b in pairwise(fires))


@dataclass(frozen=True)
class Trigger:
    run: bool
    reason: str


def decide_trigger(new_event_times: list[float], now: float, debounce_s: float, backup_running: bool) -> Trigger:
    """Whether new model artefacts (their materialisation times) should start a backup now.

    Debounced: a burst of downloads and quantizations gives one backup, `debounce_s` after the last of
    them; and never while a backup runs (its artefacts wait for the next tick).
    """
    if not new_event_times:
        return Trigger(False, "no new model artefact since the last backup request")
    quiet = now - max(new_event_times)
    if quiet < debounce_s:
        return Trigger(False, f"{len(new_event_times)} new model artefact(s); waiting for {debounce_s - quiet:.0f} s "
                              f"more without a new one (backup.debounce_s {debounce_s:.0f})")
    if backup_running:
        return Trigger(False, f"{len(new_event_times)} new model artefact(s), but a backup is running: the next "
                              "tick requests one after it")
    return Trigger(True, f"{len(new_event_times)} new model artefact(s), the last {quiet:.0f} s ago")
