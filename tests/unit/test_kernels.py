"""The compiled kernels (neighbour sums for knn and co-visitation, the merge of the candidate sources, genre
affinity, the top rows per user) against hand-computed cases."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from jobs.kernels import (
    RankBy,
    covisitation,
    genre_affinity,
    item_similarity,
    merge_sources,
    top_neighbours,
    top_rows,
)

USERS = pl.Enum(["u1", "u2", "u3"])
ITEMS = pl.Enum(["a", "b", "c", "d", "e"])


def ids(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("user_id").cast(USERS), pl.col("item_id").cast(ITEMS))


LATEST = ids(
    pl.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"], "recency": [1, 4, 1], "strength": [1.0] * 3}
    )
)
SEEN = ids(pl.DataFrame({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["a", "b", "e", "c"]}))
TABLE = pl.DataFrame(
    {
        "item_id": ["a", "a", "b", "b", "b", "c", "c"],
        "neighbour_id": ["c", "d", "c", "d", "e", "a", "b"],
        "similarity": [0.5, 0.25, 0.5, 1.0, 0.75, 0.4, 0.4],
    }
).with_columns(pl.col("item_id").cast(ITEMS), pl.col("neighbour_id").cast(ITEMS))


def rows(found: pl.DataFrame) -> list[tuple[object, ...]]:
    named = found.drop("because").with_columns(
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


def test_a_stronger_history_item_weighs_its_neighbours_by_its_strength() -> None:
    bought_a = LATEST.with_columns(strength=pl.when(pl.col("item_id") == "a").then(3.0).otherwise(1.0))
    found = top_neighbours(bought_a, SEEN, TABLE, "similarity", limit=5, rank_by="total")
    # u1 bought a (event weight 3): c = 3 x 0.5 + 0.5, d = 3 x 0.25 + 1.0; the largest value is weighted too
    assert rows(found)[:2] == [
        ("u1", "c", 2.0, 1.5, pytest.approx(1.5 + 0.5 / 2), 2, 1),
        ("u1", "d", 1.75, 1.0, pytest.approx(0.75 + 1.0 / 2), 2, 2),
    ]


def test_ranking_by_the_recency_weighted_sum_breaks_its_ties_by_item_and_keeps_the_limit() -> None:
    found = top_neighbours(LATEST, SEEN, TABLE, "similarity", limit=1, rank_by="recent")
    # u1: c and d both have 0.75 when b counts half; c comes first
    assert [(r[0], r[1], r[6]) for r in rows(found)] == [("u1", "c", 1), ("u2", "a", 1)]


def test_each_neighbour_names_the_users_item_that_adds_the_most_to_the_sum_it_is_ranked_by() -> None:
    def because(rank_by: RankBy) -> dict[tuple[str, str], str]:
        found = top_neighbours(LATEST, SEEN, TABLE, "similarity", limit=5, rank_by=rank_by)
        return {
            (USERS.categories[u], ITEMS.categories[i]): ITEMS.categories[b]
            for u, i, b in found.select("user_code", "item_code", "because").rows()
        }

    # u1's d: 0.25 from a, 1.0 from b; c: 0.5 from each (a tie), but b is u1's 4th latest item, so by the
    # recency-weighted sum a gives 0.5 and b 0.5 / sqrt(4), and d's b still gives the most (0.5 against 0.25)
    total, recent = because("total"), because("recent")
    assert total[("u1", "d")] == "b" and (total[("u2", "a")], total[("u2", "b")]) == ("c", "c")
    assert (recent[("u1", "c")], recent[("u1", "d")]) == ("a", "b")


def test_without_seen_items_every_neighbour_is_a_candidate() -> None:
    found = top_neighbours(LATEST, None, TABLE, "similarity", limit=5, rank_by="total")
    assert [(r[0], r[1]) for r in rows(found)] == [("u1", "d"), ("u1", "c"), ("u1", "e"), ("u2", "a"), ("u2", "b")]


def merged(most: int, reasons: bool = False) -> list[tuple[object, ...]]:
    knn = top_neighbours(LATEST, SEEN, TABLE, "similarity", limit=5, rank_by="total")
    covisit = top_neighbours(LATEST, SEEN, TABLE, "similarity", limit=1, rank_by="recent")
    favourite = pl.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "genre": ["x", "y", "y"], "share": [0.5, 0.25, 1.0]}
    ).with_columns(pl.col("user_id").cast(USERS), pl.col("share").cast(pl.Float32))
    genre_popular = pl.DataFrame(
        {"genre": ["x", "x", "y", "y"], "item_id": ["a", "c", "d", "c"], "genre_popularity": [1.0, 0.5, 1.0, 0.25]}
    ).with_columns(pl.col("item_id").cast(ITEMS), pl.col("genre_popularity").cast(pl.Float32))
    popular = pl.DataFrame({"item_id": ["e", "b", "d"], "popular_score": [5.0, 10.0, 5.0]}).with_columns(
        pl.col("item_id").cast(ITEMS), pl.col("popular_score").cast(pl.Float32)
    )
    found = merge_sources(knn, covisit, favourite, genre_popular, popular, SEEN, genre_limit=1, most=most)
    if reasons:
        found = found.select("user_code", "item_code", "knn_because", "covisit_because", "genre_because")
    else:
        found = found.drop("knn_because", "covisit_because", "genre_because")
    named = found.with_columns(
        pl.col("user_code").map_elements(USERS.categories.__getitem__, return_dtype=pl.String),
        pl.col("item_code").map_elements(ITEMS.categories.__getitem__, return_dtype=pl.String),
    )
    return [tuple(r) for r in named.sort("user_code", "item_code").rows()]


def test_merging_keeps_every_sources_score_and_rank_and_leaves_the_others_null() -> None:
    # columns: knn score, max, recent, rank; covisit score, hits, rank; genre score, rank; popular score, rank
    # genre, u1: a is seen, c = 0.5 x 0.5 (x) + 0.25 x 0.25 (y) = 0.3125 beats d = 0.25 x 1.0; u2: d, c is seen.
    # popular goes b, d, e (d before e on their tie); u1 has seen b and e, u2 nothing of it, u3 nothing at all.
    n = None
    point_four = pytest.approx(0.4)
    assert merged(most=10) == [
        ("u1", "c", 1.0, 0.5, 0.75, 2, 0.75, 2, 1, 0.3125, 1, n, n),
        ("u1", "d", 1.25, 1.0, 0.75, 1, n, n, n, n, n, 5.0, 1),
        ("u2", "a", point_four, point_four, point_four, 1, point_four, 1, 1, n, n, n, n),
        ("u2", "b", point_four, point_four, point_four, 2, n, n, n, n, n, 10.0, 1),
        ("u2", "d", n, n, n, n, n, n, n, 1.0, 1, 5.0, 2),
        ("u2", "e", n, n, n, n, n, n, n, n, n, 5.0, 3),
        ("u3", "b", n, n, n, n, n, n, n, n, n, 10.0, 1),
        ("u3", "d", n, n, n, n, n, n, n, n, n, 5.0, 2),
        ("u3", "e", n, n, n, n, n, n, n, n, n, 5.0, 3),
    ]


def test_merging_keeps_what_each_source_proposed_the_item_for() -> None:
    # (knn_because, covisit_because: item codes of the user's items; genre_because: the genre adding the most)
    # u1's c: by knn a and b tie, by co-visitation a gives the most; its genre score is 0.25 from x, 0.0625 from y.
    # u1's d: b (1.0 against 0.25), only knn proposes it. u2's a: c, both; u2's d: genre y only.
    found = {(r[0], r[1]): r[2:] for r in merged(most=10, reasons=True)}
    code = ITEMS.categories.to_list().index
    assert found[("u1", "c")][1:] == (code("a"), "x")
    assert found[("u1", "d")] == (code("b"), None, None)
    assert found[("u2", "a")] == (code("c"), code("c"), None)
    assert found[("u2", "d")] == (None, None, "y")
    assert found[("u3", "b")] == (None, None, None)


def test_past_the_most_candidates_the_best_rank_in_any_source_stays_and_ties_go_by_item() -> None:
    # u2: a, b and d are each first somewhere, e only third; u3: only popular ranks its items
    kept = [(r[0], r[1]) for r in merged(most=2)]
    assert kept == [("u1", "c"), ("u1", "d"), ("u2", "a"), ("u2", "b"), ("u3", "b"), ("u3", "d")]


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


def test_top_rows_are_each_users_best_scores_with_ties_by_item() -> None:
    frame = ids(
        pl.DataFrame(
            {
                "user_id": ["u1", "u2", "u1", "u1", "u2", "u2", "u1"],
                "item_id": ["c", "a", "a", "b", "b", "c", "d"],
                "score": [0.5, 1.0, 0.5, 0.9, -0.0, 0.0, -1.0],
            }
        )
    )
    # u1: b, then a before c on their tie; u2: a, then b before c (-0.0 ties with 0.0); u3 has no rows
    assert top_rows(frame["user_id"], frame["item_id"], frame["score"].to_numpy(), k=2).tolist() == [3, 2, 1, 4]


def polars_similarity(history: pl.DataFrame, min_support: int, limit: int) -> pl.DataFrame:
    """The cosine similarity as a polars self-join: what ``item_similarity`` computes without holding every pair."""
    norms = history.group_by("item_id").agg(n=(pl.col("strength") ** 2).sum())
    pairs = (
        history.join(history, on="user_id", suffix="_other")
        .filter(pl.col("item_id") != pl.col("item_id_other"))
        .group_by("item_id", pl.col("item_id_other").alias("neighbour_id"))
        .agg(support=pl.len(), both=(pl.col("strength") * pl.col("strength_other")).sum())
        .filter(pl.col("support") >= min_support)
        .join(norms, on="item_id")
        .join(norms.rename({"item_id": "neighbour_id", "n": "n_other"}), on="neighbour_id")
        .select(
            "item_id",
            "neighbour_id",
            similarity=(pl.col("both") / (pl.col("n") * pl.col("n_other")).sqrt()).round(6).cast(pl.Float32),
        )
    )
    return (
        pairs.sort(["item_id", "similarity", "neighbour_id"], descending=[False, True, False])
        .group_by("item_id", maintain_order=True)
        .head(limit)
    )


@pytest.mark.parametrize("strengths", [(1.0,), (1.0, 3.0, 8.0)])
def test_item_similarity_equals_the_self_join_it_replaces(strengths: tuple[float, ...]) -> None:
    rng = np.random.default_rng(5)
    users, items = 300, 60
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, users, 4_000), rng.zipf(1.3, 4_000) % items, strict=True)}
    history = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u, _ in sorted(pairs)],
            "item_id": [f"i{i:02d}" for _, i in sorted(pairs)],
            "strength": rng.choice(strengths, len(pairs)),
        }
    )
    found = item_similarity(history, min_support=2, limit=7)
    expected = polars_similarity(history, min_support=2, limit=7)
    assert found.height > 100 and found.columns == ["item_id", "neighbour_id", "similarity"]
    assert found.to_dicts() == expected.to_dicts()


def test_item_similarity_of_no_history_is_empty() -> None:
    empty = pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String, "strength": pl.Float64})
    assert item_similarity(empty, min_support=1, limit=5).height == 0


def polars_covisitation(recent: pl.DataFrame, cutoff: datetime, half_life_days: float, limit: int) -> pl.DataFrame:
    """Co-visitation as a polars self-join: what ``covisitation`` computes without holding every pair."""
    day = 86_400.0
    decay = (
        -((pl.lit(cutoff) - pl.col("last_seen")).dt.total_seconds() / day) * (0.6931471805599453 / half_life_days)
    ).exp()
    gap = (pl.col("last_seen") - pl.col("last_seen_other")).dt.total_seconds().abs() / day
    return (
        recent.join(recent, on="user_id", suffix="_other")
        .filter(pl.col("item_id") != pl.col("item_id_other"))
        .select(
            "item_id",
            pl.col("item_id_other").alias("neighbour_id"),
            weight=decay * pl.col("strength_other") / (1.0 + gap),
        )
        .group_by("item_id", "neighbour_id")
        .agg(covisit_weight=pl.col("weight").sum().round(6).cast(pl.Float32))
        .sort(["item_id", "covisit_weight", "neighbour_id"], descending=[False, True, False])
        .group_by("item_id", maintain_order=True)
        .head(limit)
    )


@pytest.mark.parametrize("strengths", [(1.0,), (1.0, 3.0, 8.0)])
def test_covisitation_equals_the_self_join_it_replaces(strengths: tuple[float, ...]) -> None:
    rng = np.random.default_rng(9)
    cutoff = datetime(2026, 11, 20, tzinfo=UTC)
    pairs = sorted(
        {(int(u), int(i)) for u, i in zip(rng.integers(0, 300, 3_000), rng.zipf(1.3, 3_000) % 60, strict=True)}
    )
    # sub-second times, before and after one another: the gaps are whole seconds, truncated
    micros = rng.integers(0, 30 * 86_400 * 1_000_000, len(pairs))
    recent = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u, _ in pairs],
            "item_id": [f"i{i:02d}" for _, i in pairs],
            "last_seen": [cutoff - timedelta(microseconds=int(m)) for m in micros],
            "strength": rng.choice(strengths, len(pairs)),
        }
    )
    found = covisitation(recent, cutoff, half_life_days=7.0, limit=6)
    expected = polars_covisitation(recent, cutoff, half_life_days=7.0, limit=6)
    assert found.height > 100 and found.columns == ["item_id", "neighbour_id", "covisit_weight"]
    assert found.to_dicts() == expected.to_dicts()
