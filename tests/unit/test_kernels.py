"""The compiled kernels (neighbour sums for knn and co-visitation, genre affinity) against hand-computed cases."""

import polars as pl
import pytest

from jobs.kernels import genre_affinity, top_neighbours

USERS = pl.Enum(["u1", "u2", "u3"])
ITEMS = pl.Enum(["a", "b", "c", "d", "e"])


def ids(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("user_id").cast(USERS), pl.col("item_id").cast(ITEMS))


LATEST = ids(pl.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"], "recency": [1, 4, 1]}))
SEEN = ids(pl.DataFrame({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["a", "b", "e", "c"]}))
TABLE = pl.DataFrame(
    {
        "item_id": ["a", "a", "b", "b", "b", "c", "c"],
        "neighbour_id": ["c", "d", "c", "d", "e", "a", "b"],
        "similarity": [0.5, 0.25, 0.5, 1.0, 0.75, 0.4, 0.4],
    }
).with_columns(pl.col("item_id").cast(ITEMS), pl.col("neighbour_id").cast(ITEMS))


def rows(found: pl.DataFrame) -> list[tuple[object, ...]]:
    named = found.with_columns(
        pl.col("user_code").map_elements(USERS.categories.__getitem__, return_dtype=pl.String),
        pl.col("item_code").map_elements(ITEMS.categories.__getitem__, return_dtype=pl.String),
    )
    return [tuple(r) for r in named.sort("user_code", "rank").rows()]


def test_sums_largest_recency_weighted_and_counts_per_user_and_neighbour() -> None:
    found = top_neighbours(LATEST, SEEN, TABLE, "similarity", limit=5, rank_by="total")
    # u1: c = 0.5 (a) + 0.5 (b), d = 0.25 (a) + 1.0 (b); b is 4th latest, so it counts 1/sqrt(4) in "recent";
    # e is a neighbour of b but u1 has seen it. u2: a and b tie on 0.4 and go by item. u3 has no history.
    assert rows(found) == [
        ("u1", "d", 1.25, 1.0, pytest.approx(0.25 + 1.0 / 2), 2, 1),
        ("u1", "c", 1.0, 0.5, pytest.approx(0.5 + 0.5 / 2), 2, 2),
        ("u2", "a", pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.4), 1, 1),
        ("u2", "b", pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.4), 1, 2),
    ]


def test_ranking_by_the_recency_weighted_sum_breaks_its_ties_by_item_and_keeps_the_limit() -> None:
    found = top_neighbours(LATEST, SEEN, TABLE, "similarity", limit=1, rank_by="recent")
    # u1: c and d both have 0.75 when b counts half; c comes first
    assert [(r[0], r[1], r[6]) for r in rows(found)] == [("u1", "c", 1), ("u2", "a", 1)]


def test_without_seen_items_every_neighbour_is_a_candidate() -> None:
    found = top_neighbours(LATEST, None, TABLE, "similarity", limit=5, rank_by="total")
    assert [(r[0], r[1]) for r in rows(found)] == [("u1", "d"), ("u1", "c"), ("u1", "e"), ("u2", "a"), ("u2", "b")]


def test_genre_affinity_sums_the_users_shares_of_the_items_genres() -> None:
    candidates = ids(pl.DataFrame({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["a", "b", "e", "a"]}))
    shares = pl.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "genre": ["drama", "comedy", "horror"], "share": [0.625, 0.25, 1.0]}
    ).with_columns(pl.col("user_id").cast(USERS), pl.col("share").cast(pl.Float32))
    item_genres = pl.DataFrame(
        {"item_id": ["a", "a", "b", "c"], "genre": ["drama", "comedy", "comedy", "horror"]}
    ).with_columns(pl.col("item_id").cast(ITEMS))
    # a is drama and comedy (0.625 + 0.25 for u1); b comedy; e has no genre; u2 likes none of a's genres
    assert genre_affinity(candidates, shares, item_genres).to_list() == [0.875, 0.25, 0.0, 0.0]
