"""A user's list as the lookup cache holds it, and the k items a lookup takes from it."""

from datetime import UTC, datetime

import pytest

from serving.live import LiveBatch, live_batch_from_row
from serving.lookup import cache_row, pick

NOW = datetime(2026, 11, 23, tzinfo=UTC)
ITEMS = ["i1", "tenant/2", "ünï 3", "i,4", "i5"]
SCORES = [0.98, 0.5, 0.25, -1.5, -2.0]


def batch() -> LiveBatch:
    return live_batch_from_row(7, "m", 5, NOW, ["p1", "p2", "p3"], [3.0, 2.0, 1.0], NOW)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_the_first_k_items_come_back_as_published(k: int) -> None:
    recs = pick(batch(), "u", cache_row(ITEMS, SCORES), k, frozenset())
    assert (recs.item_ids, recs.scores, recs.source) == (ITEMS[:k], SCORES[:k], "personalized")


def test_excluded_items_leave_room_for_the_next_ones() -> None:
    recs = pick(batch(), "u", cache_row(ITEMS, SCORES), 3, frozenset({"tenant/2", "i,4"}))
    assert (recs.item_ids, recs.scores) == (["i1", "ünï 3", "i5"], [0.98, 0.25, -2.0])


def test_an_empty_list_stays_empty_and_an_unknown_user_gets_the_fallback() -> None:
    assert pick(batch(), "u", cache_row([], []), 3, frozenset()).item_ids == []
    fallback = pick(batch(), "nobody", None, 2, frozenset({"p1"}))
    assert (fallback.item_ids, fallback.scores, fallback.source) == (["p2", "p3"], [2.0, 1.0], "fallback")
