"""Ranking metrics against cases computed by hand."""

import math

import polars as pl
import pytest

from jobs.steps.ranking_metrics import candidate_recall, ranking_metrics


def recs(rows: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(user, item, rank) for user, items in rows.items() for rank, item in enumerate(items, start=1)],
        schema={"user_id": pl.String, "item_id": pl.String, "rank": pl.Int64},
        orient="row",
    )


def pairs(rows: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(user, item) for user, items in rows.items() for item in items],
        schema={"user_id": pl.String, "item_id": pl.String},
        orient="row",
    )


RELEVANT = pairs({"a": ["x", "y"], "b": ["w"], "c": ["q"]})
RECOMMENDED = recs({"a": ["x", "z", "y"], "b": ["x", "y"], "stranger": ["v", "u"]})


def test_metrics_match_hand_computation() -> None:
    result = ranking_metrics(RECOMMENDED, RELEVANT, catalogue_size=10, k=10)
    # user a: hits at ranks 1 and 3 of two relevant items
    ndcg_a = (1 / math.log2(2) + 1 / math.log2(4)) / (1 / math.log2(2) + 1 / math.log2(3))
    ap_a = (1 / 1 + 2 / 3) / 2
    # users b (no hit) and c (no list at all) count as zeros
    assert result["ndcg@10"] == pytest.approx(ndcg_a / 3)
    assert result["recall@10"] == pytest.approx(1 / 3)
    assert result["map@10"] == pytest.approx(ap_a / 3)
    assert result["hit_rate@10"] == pytest.approx(1 / 3)
    # x, y, z are recommended to evaluated users; the stranger's v and u do not count
    assert result["coverage@10"] == pytest.approx(0.3)
    assert result["users"] == 3


def test_metrics_cut_lists_at_k() -> None:
    result = ranking_metrics(RECOMMENDED, pairs({"a": ["x", "y"]}), catalogue_size=10, k=2)
    # only x (hit) and z are in the top 2; the ideal DCG is over min(2, 2) items
    assert result["ndcg@2"] == pytest.approx(1.0 / (1 + 1 / math.log2(3)))
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["map@2"] == pytest.approx(0.5)
    assert result["coverage@2"] == pytest.approx(0.2)


def test_ideal_dcg_is_capped_at_k() -> None:
    many = pairs({"a": [f"i{n}" for n in range(20)]})
    perfect = recs({"a": [f"i{n}" for n in range(10)]})
    result = ranking_metrics(perfect, many, catalogue_size=20, k=10)
    assert result["ndcg@10"] == pytest.approx(1.0)
    assert result["map@10"] == pytest.approx(1.0)
    assert result["recall@10"] == pytest.approx(0.5)


def test_duplicate_relevant_rows_count_once() -> None:
    doubled = pl.concat([pairs({"a": ["x"]}), pairs({"a": ["x"]})])
    result = ranking_metrics(recs({"a": ["x"]}), doubled, catalogue_size=1, k=10)
    assert result["recall@10"] == pytest.approx(1.0)


def test_no_evaluated_users_gives_zeros() -> None:
    result = ranking_metrics(RECOMMENDED, pairs({}), catalogue_size=10)
    assert result["users"] == 0
    assert result["ndcg@10"] == 0.0


def test_candidate_recall_is_the_share_of_relevant_pairs_proposed() -> None:
    proposed = pairs({"a": ["x", "z"], "b": ["w"], "c": ["nothing"]})
    assert candidate_recall(proposed, RELEVANT) == pytest.approx(2 / 4)


def test_graded_ndcg_gains_each_relevant_item_its_grade_and_equals_ndcg_without_grades() -> None:
    graded = RELEVANT.with_columns(grade=pl.Series([1.0, 8.0, 3.0, 1.0]))  # a: x=1, y=8; b: w=3; c: q=1
    result = ranking_metrics(RECOMMENDED, graded, catalogue_size=10, k=10)
    # user a: x (grade 1) at rank 1, y (grade 8) at rank 3; the ideal puts y first
    graded_a = (1 / math.log2(2) + 8 / math.log2(4)) / (8 / math.log2(2) + 1 / math.log2(3))
    assert result["graded_ndcg@10"] == pytest.approx(graded_a / 3)
    assert result["ndcg@10"] == ranking_metrics(RECOMMENDED, RELEVANT, catalogue_size=10, k=10)["ndcg@10"]
    binary = ranking_metrics(RECOMMENDED, RELEVANT, catalogue_size=10, k=10)
    assert binary["graded_ndcg@10"] == binary["ndcg@10"]
