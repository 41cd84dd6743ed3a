"""Rotating slices: check a little of a large set every run so that all of it is checked within N runs.

Plain and generic (no Dagster, no I/O): the model cache's re-hash uses it with `model_cache.rehash_days`,
backup verification with its own setting. The caller keeps the cursor (the last key of the previous
slice) wherever it records its runs.

Why a cursor and not "day number modulo N": buckets computed from the day shift whenever an item is added
or removed, so an item can be skipped for a whole cycle; walking a sorted order from a cursor only ever
delays a new item until the walk reaches it, at most one cycle.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    keys: list[str]  # what to check this run, in walking order
    bytes: int  # their total size
    budget_bytes: int  # ceil(total / period): a slice takes at least this much (or everything)
    cursor_from: str | None  # the cursor this slice started after
    cursor: str | None  # the next slice starts after this key
    wrapped: bool  # the walk passed the end of the order and started again at the beginning
    total_items: int
    total_bytes: int

    def describe(self) -> str:
        return (f"{len(self.keys)} of {self.total_items} item(s), {self.bytes:,} of {self.total_bytes:,} bytes"
                f"{' (the walk started over)' if self.wrapped else ''}")


def pick_slice(items: Mapping[str, int], cursor: str | None, period: int) -> Slice:
    """This run's slice of `items` (key -> size) so that a stable set is covered within `period` runs.

    Keys are walked in sorted order, starting after `cursor` and wrapping around. A slice takes items until
    it holds at least ceil(total bytes / period) bytes AND at least ceil(count / period) items (so empty
    files are covered too), never more than the whole set. Since every slice takes at least 1/period of
    the set, contiguous in the cyclic order, `period` consecutive slices cover every item.
    """
    if period < 1:
        raise ValueError(f"pick_slice: period must be at least 1 run, got {period}")
    keys = sorted(items)
    n, total = len(keys), sum(items.values())
    budget = math.ceil(total / period)
    min_items = math.ceil(n / period)
    if n == 0:
        return Slice([], 0, budget, cursor, cursor, False, 0, 0)
    start = bisect.bisect_right(keys, cursor) if cursor is not None else 0
    taken: list[str] = []
    size = 0
    while len(taken) < n and (size < budget or len(taken) < min_items):
        key = keys[(start + len(taken)) % n]
        taken.append(key)
        size += items[key]
    wrapped = start + len(taken) > n
    return Slice(taken, size, budget, cursor, taken[-1], wrapped, n, total)
