"""Each published item's reason: chosen from the sources that proposed it, packed two bytes an item beside the
names they point to, and read back by the contract's decoder."""

import numpy as np
import polars as pl

from jobs.steps.score import rank_top_k
from sql.contract import decode_reasons

USERS = pl.Enum(["u1", "u2"])
ITEMS = pl.Enum(["a", "b", "c", "d", "e", "f"])


def test_the_item_to_item_source_ranking_the_item_higher_explains_it_then_genre_then_trending() -> None:
    frame = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u2", "u2"],
            "item_id": ["c", "d", "e", "f", "a", "b"],
            # c: co-visitation ranks it 3rd, knn 1st: knn's reason; d: co-visitation only; e: genre; f: trending
            "covisit_rank": [3, 1, 9, 9, 2, 9],
            "knn_rank": [1, 9, 9, 9, 2, 9],
            "covisit_because": ["a", "b", None, None, "f", None],
            "knn_because": ["b", None, None, None, "e", None],
            "genre_because": [None, "Drama", "Comedy", None, None, None],
        }
    ).with_columns(
        pl.col("user_id").cast(USERS),
        pl.col(["item_id", "covisit_because", "knn_because"]).cast(ITEMS),
    )
    scores = np.array([4.0, 3.0, 2.0, 1.0, 2.0, 1.0])
    lists = rank_top_k(frame, scores, k=4)
    assert lists.columns == ["user_id", "item_ids", "scores", "reason_refs", "reason_codes"]
    explained = {
        user: list(zip(items, decode_reasons(codes, refs), strict=True))
        for user, items, refs, codes in lists.select("user_id", "item_ids", "reason_refs", "reason_codes").rows()
    }
    assert explained == {
        "u1": [
            ("c", {"source": "knn", "item_id": "b"}),
            ("d", {"source": "covisit", "item_id": "b"}),
            ("e", {"source": "genre", "genre": "Comedy"}),
            ("f", {"source": "trending"}),
        ],
        # a: both rank it 2nd, co-visitation goes first on a tie
        "u2": [("a", {"source": "covisit", "item_id": "f"}), ("b", {"source": "trending"})],
    }
    assert lists.filter(pl.col("user_id") == "u1")["reason_refs"].to_list() == [["Comedy", "b"]]  # each name once


def test_without_the_sources_reasons_the_lists_are_as_before() -> None:
    frame = pl.DataFrame({"user_id": ["u1", "u1"], "item_id": ["a", "b"]}).with_columns(
        pl.col("user_id").cast(USERS), pl.col("item_id").cast(ITEMS)
    )
    lists = rank_top_k(frame, np.array([1.0, 2.0]), k=2)
    assert lists.columns == ["user_id", "item_ids", "scores"]
    assert lists["item_ids"].to_list() == [["b", "a"]]
