"""The similar-items and session protocols (jobs.evaluation.item_quality) on cases worked out by hand."""

import math
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from jobs.evaluation.evaluate import session_split
from jobs.evaluation.item_quality import (
    SESSION_ITEMS,
    list_answers,
    next_item_metrics,
    next_item_pairs,
    segment_answers,
    session_answers,
)
from jobs.settings import Settings
from jobs.steps.candidates import build_neighbours, build_similar
from jobs.steps.similar import similar_items
from tests.support.interactions import START, at_minutes, on_days


def neighbours(lists: dict[str, list[tuple[str, float]]]) -> pl.DataFrame:
    """A similar_items table: (item_id, item_ids, scores), best first."""
    return pl.DataFrame(
        {
            "item_id": list(lists),
            "item_ids": [[i for i, _ in ranked] for ranked in lists.values()],
            "scores": [[s for _, s in ranked] for ranked in lists.values()],
        },
        schema_overrides={"scores": pl.List(pl.Float32)},
    )


def triples(pairs: pl.DataFrame) -> list[tuple[str, ...]]:
    return [tuple(row) for row in pairs.select("user_id", "previous_id", "item_id").iter_rows()]


def test_next_item_pairs_follow_each_user_in_time_and_keep_only_new_items() -> None:
    history = at_minutes([("a", "x", 0), ("a", "y", 1), ("b", "old", 0), ("c", "never-later", 0)])
    # a: z after y; x again (not new, but it is what w follows); w after x. b: only p's successor q counts
    # after its history's last item; p at the same minute as b's history item comes after it.
    later = at_minutes([("a", "x", 3), ("a", "z", 2), ("a", "w", 4), ("b", "p", 0), ("b", "q", 5), ("d", "s", 1)])
    later = pl.concat([later, at_minutes([("d", "t", 2)])])
    pairs = next_item_pairs(history.lazy(), later.lazy())
    assert triples(pairs) == [("a", "y", "z"), ("a", "x", "w"), ("b", "old", "p"), ("b", "p", "q"), ("d", "s", "t")]
    assert pairs["pair"].to_list() == [0, 1, 2, 3, 4]


def test_next_item_metrics_score_one_query_per_pair() -> None:
    history = at_minutes([("a", "x", 0), ("a", "y", 1), ("b", "p", 0)])
    later = at_minutes([("a", "z", 2), ("a", "w", 3), ("b", "q", 1)])
    pairs = next_item_pairs(history.lazy(), later.lazy())  # y -> z, z -> w, p -> q
    table = neighbours({"y": [("x", 0.9), ("z", 0.5)], "z": [("x", 1.0)]})  # p has no neighbours: a miss
    metrics = next_item_metrics(pairs, table, catalogue_size=8)
    assert metrics["users"] == 3
    assert metrics["hit_rate@10"] == pytest.approx(1 / 3)  # only z, second among y's neighbours
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(3) / 3)
    assert metrics["coverage@10"] == pytest.approx(2 / 8)  # x and z were listed


def test_next_item_metrics_count_only_the_first_ten_neighbours() -> None:
    pairs = next_item_pairs(at_minutes([("a", "x", 0)]).lazy(), at_minutes([("a", "target", 1)]).lazy())
    eleven = [(f"n{i:02d}", 1.0 - i / 100) for i in range(10)] + [("target", 0.5)]
    assert next_item_metrics(pairs, neighbours({"x": eleven}), 20)["hit_rate@10"] == 0.0
    assert next_item_metrics(pairs, neighbours({"x": eleven[:9] + eleven[10:]}), 20)["ndcg@10"] == pytest.approx(
        1 / math.log2(11)
    )


VISITORS = pl.Series(["v"])


def test_session_split_holds_out_whole_users_and_their_last_fifth() -> None:
    visitor, other = "v", "u"
    # the visitor: 10 events, the last 2 held out; "b" comes back in the held-out part (not new), "a" twice before
    rows = [(visitor, item, minute) for minute, item in enumerate(["a", "b", "c", "a", "d", "e", "f", "g", "b", "h"])]
    rows += [(other, "a", 0), (other, "h", 30)]
    sessions = session_split(at_minutes(rows), VISITORS)
    assert sessions is not None
    assert sessions.items.rows() == [(visitor, ["g", "f", "e", "d", "a", "c", "b"])]  # distinct, latest first
    assert sessions.relevant.rows() == [(visitor, "h")]
    training = sessions.training.collect()
    assert set(training["user_id"]) == {other}  # the neighbours never see a visitor
    assert sessions.cutoff == START + timedelta(minutes=30, microseconds=1)


def test_a_session_holds_the_latest_items_only() -> None:
    rows = [("v", f"i{n:03d}", n) for n in range(100)] + [("u", "i000", 0)]
    sessions = session_split(at_minutes(rows), VISITORS)
    assert sessions is not None
    session = sessions.items["items"].to_list()[0]
    assert len(session) == SESSION_ITEMS
    assert session[0] == "i079" and session[-1] == "i030"  # the last 20 are held out


def test_session_split_is_none_without_a_visitor_to_answer() -> None:
    # the visitor's held-out item is one they had seen; a single event makes no session
    assert session_split(at_minutes([("v", "a", 0), ("v", "a", 1), ("u", "b", 0)]), VISITORS) is None
    assert session_split(at_minutes([("v", "a", 0), ("u", "b", 0)]), VISITORS) is None


def test_session_answers_blend_the_neighbours_and_leave_the_session_out() -> None:
    items = pl.DataFrame({"user_id": ["v"], "items": [["a", "b"]]})  # a is the most recent
    table = neighbours({"a": [("x", 1.0), ("y", 0.5)], "b": [("y", 2.0), ("a", 1.0)]})
    # y: 0.5 (from a) + decay * 1.0 (from b, scaled by its best) beats x's 1.0 for any decay above 0.5
    assert session_answers(items, table).rows() == [("v", "y", 1), ("v", "x", 2)]


def test_popular_lists_leave_the_session_out_and_segments_get_their_own() -> None:
    items = pl.DataFrame({"user_id": ["v", "w"], "items": [["p1"], ["q"]]})
    assert list_answers(items, ["p1", "p2", "p3"], k=2).rows() == [
        ("v", "p2", 1),
        ("v", "p3", 2),
        ("w", "p1", 1),
        ("w", "p2", 2),
    ]
    own = segment_answers(items, {"w": ["s1", "q", "s2"]}, ["p1", "p2"], k=2)
    assert own.rows() == [("v", "p2", 1), ("w", "s1", 1), ("w", "s2", 2)]


def test_similar_items_scale_each_signal_by_the_items_best_and_mix_them_by_the_share() -> None:
    covisits = pl.DataFrame({"item_id": ["a", "a"], "neighbour_id": ["b", "c"], "covisit_weight": [4.0, 2.0]})
    cosine = pl.DataFrame({"item_id": ["a", "a"], "neighbour_id": ["c", "d"], "similarity": [0.5, 0.25]})
    catalogue = pl.DataFrame({"item_id": ["a", "b", "c", "d", "e"], "available": [True, True, True, True, False]})
    cosine_e = pl.concat([cosine, pl.DataFrame({"item_id": ["a"], "neighbour_id": ["e"], "similarity": [0.5]})])
    table = similar_items(covisits, cosine_e, catalogue, Settings(), covisit_share=0.4)
    # c: 0.4 * 2/4 + 0.6 * 0.5/0.5 = 0.8; b: 0.4 * 4/4; d: 0.6 * 0.25/0.5 = 0.3; e is not available
    assert table.rows() == [("a", ["c", "b", "d"], [pytest.approx(0.8), pytest.approx(0.4), pytest.approx(0.3)])]
    assert similar_items(covisits, cosine, catalogue, Settings(similar_k=1), 1.0)["item_ids"].to_list() == [["b"]]
    with pytest.raises(ValueError, match=r"covisit_share must be between 0 and 1, got 1\.5"):
        similar_items(covisits, cosine, catalogue, Settings(), 1.5)


def test_items_whose_co_visits_decayed_to_nothing_get_no_nan_scores() -> None:
    """A night long after its data (steps run for 2099 on 2026's events): every co-visit decays to a weight
    of 0, and an item's best of 0 must not divide its neighbours' into NaN, which publish refuses."""
    events = on_days([("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 2), ("u2", "b", 3), ("u2", "c", 3)]).lazy()
    settings = Settings()
    covisits = build_neighbours(events, datetime(2099, 1, 1, tzinfo=UTC), settings)
    assert covisits.height == 6 and covisits["covisit_weight"].to_list() == [0.0] * 6
    cosine = build_similar(events, settings)  # a and b, which two users share
    catalogue = pl.DataFrame({"item_id": ["a", "b", "c"], "available": True})
    table = similar_items(covisits, cosine, catalogue, settings, covisit_share=0.4)
    # the cosine signal alone (0.6 of the blend); c, known to co-visitation only, has no neighbours
    assert table.rows() == [("a", ["b"], [pytest.approx(0.6)]), ("b", ["a"], [pytest.approx(0.6)])]
