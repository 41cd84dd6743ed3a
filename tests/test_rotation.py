"""idp_pipelines.rotation: a slice per run, everything covered within the period."""

from __future__ import annotations

import random

import pytest

from idp_pipelines.rotation import pick_slice


def _walk(items: dict[str, int], period: int, runs: int) -> list:
    cursor, out = None, []
    for _ in range(runs):
        s = pick_slice(items, cursor, period)
        out.append(s)
        cursor = s.cursor
    return out


@pytest.mark.parametrize("period", [1, 2, 7, 30])
def test_every_item_is_covered_within_the_period_whatever_the_sizes(period):
    rng = random.Random(period)
    # Sizes over six orders of magnitude, some empty: a cache of a 40 GB model, configs and empty files.
    items = {f"blob-{i:03d}": rng.choice([0, 59, 4_096, 2_000_000, 40_000_000]) for i in range(97)}
    slices = _walk(items, period, 3 * period)
    for start in range(2 * period):  # any `period` consecutive runs, not only the first ones
        window = slices[start:start + period]
        assert set().union(*(s.keys for s in window)) == set(items), start
    budget = -(-sum(items.values()) // period)
    for s in slices:
        assert s.budget_bytes == budget and s.total_items == 97 and s.total_bytes == sum(items.values())
        assert s.bytes >= min(budget, s.total_bytes) and len(s.keys) >= -(-97 // period)
        assert s.bytes == sum(items[k] for k in s.keys)


def test_the_walk_follows_the_cursor_and_says_when_it_starts_over():
    items = {"a": 10, "b": 0, "c": 50, "d": 5, "e": 35}
    first, second, third = _walk(items, 3, 3)
    assert (first.keys, first.bytes, first.wrapped, first.cursor) == (["a", "b", "c"], 60, False, "c")
    assert (second.keys, second.cursor_from, second.wrapped) == (["d", "e"], "c", False)
    assert (third.keys, third.wrapped) == (["a", "b", "c"], True)
    # A new item behind the cursor waits for the walk to come round; one ahead is taken on the way.
    grown = pick_slice({**items, "bb": 1, "f": 1}, "c", 3)
    assert grown.keys == ["d", "e", "f"] and not grown.wrapped


def test_edges():
    assert pick_slice({}, None, 30).keys == []
    assert pick_slice({"only": 5}, "only", 30).keys == ["only"]
    one_run = pick_slice({"a": 1, "b": 2}, None, 1)
    assert one_run.keys == ["a", "b"] and not one_run.wrapped
    with pytest.raises(ValueError, match="period must be at least 1 run, got 0"):
        pick_slice({"a": 1}, None, 0)
