"""The MMR re-ranking, the beyond-accuracy metrics, and the tuning's search space."""

import math

import numpy as np
import polars as pl
import pytest

from jobs import diversity, tuning
from jobs.settings import Settings
from jobs.steps import candidates, score
from jobs.steps.ranking_metrics import novelty

# a and b are both dramas; c is a comedy; d has no genre; e is a drama in the "film" category
CATALOGUE = pl.DataFrame(
    {
        "item_id": ["a", "b", "c", "d", "e"],
        "title": ["A", "B", "C", "D", "E"],
        "genres": [["drama"], ["drama"], ["comedy"], [], ["drama"]],
        "available": [True] * 5,
        "category": [None, None, None, None, "film"],
    }
)


def _frame(users: list[str], items: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": pl.Series(users, dtype=pl.Enum(sorted(set(users)))),
            "item_id": pl.Series(items, dtype=pl.Enum(list("abcde"))),
        }
    )


def test_tokens_are_genres_and_text_attributes() -> None:
    tokens = diversity.item_tokens(CATALOGUE)
    assert tokens.filter(pl.col("item_id") == "e")["token"].to_list() == ["category=film", "drama"]
    assert "d" not in tokens["item_id"].to_list()


def test_strength_zero_keeps_the_rankers_order_and_scores() -> None:
    frame = _frame(["u"] * 4 + ["v"] * 3, ["a", "b", "c", "d", "e", "c", "a"])
    predicted = np.array([4.0, 3.0, 2.0, 1.0, 3.0, 2.0, 1.0])
    plain = score.rank_top_k(frame, predicted, 3)
    rescored = score.rank_top_k(frame, predicted, 3, score.Diversifier(CATALOGUE, 0.0))
    assert rescored.equals(plain)
    assert plain.row(0) == ("u", ["a", "b", "c"], [4.0, 3.0, 2.0])


def test_mmr_lifts_an_item_unlike_those_above_it_and_keeps_scores_falling() -> None:
    frame = _frame(["u"] * 4, ["a", "b", "c", "d"])
    predicted = np.array([4.0, 3.5, 3.0, 1.0])
    (row,) = score.rank_top_k(frame, predicted, 3, score.Diversifier(CATALOGUE, 0.3)).iter_rows()
    _, items, scores = row
    # b is nearly as good as a but the same genre; c is a comedy
    assert items == ["a", "c", "b"]
    assert scores == sorted(scores, reverse=True) == [4.0, 3.5, 3.0]
    # at full strength, the item without genres (similar to nothing) comes before the second drama
    (row,) = score.rank_top_k(frame, predicted, 3, score.Diversifier(CATALOGUE, 1.0)).iter_rows()
    assert row[1] == ["a", "c", "d"]


def test_intra_list_diversity_averages_pairwise_jaccard_distances_per_user() -> None:
    tokens = diversity.item_tokens(CATALOGUE)
    recs = pl.DataFrame(
        {
            "user_id": ["u", "u", "u", "v", "v", "w"],
            "item_id": ["a", "b", "c", "a", "e", "a"],
            "rank": [1, 2, 3, 1, 2, 1],
        }
    )
    # u: (a,b) 0, (a,c) 1, (b,c) 1 -> 2/3; v: (a,e) share drama of 2 tokens -> 1/2; w has one item: left out
    assert diversity.intra_list_diversity(recs, tokens) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert diversity.intra_list_diversity(recs, tokens, k=1) == 0.0


def test_novelty_is_the_mean_self_information_of_the_listed_items() -> None:
    history = pl.DataFrame({"user_id": ["u", "v", "w", "u"], "item_id": ["a", "a", "a", "b"]})
    recs = pl.DataFrame({"user_id": ["x", "x"], "item_id": ["a", "c"], "rank": [1, 2]})
    expected = (-math.log2(4 / 4) - math.log2(1 / 4)) / 2  # a: all 3 users; c: none (smoothed)
    assert novelty(recs, history) == pytest.approx(expected)


def test_the_search_space_names_settings_and_covers_the_candidate_generators() -> None:
    assert set(tuning.SPACE) <= set(Settings.model_fields)
    assert set(tuning.CANDIDATE_SPACE) <= set(candidates.SHAPING_SETTINGS)
    defaults = tuning.current_values(Settings())
    for name, value in defaults.items():
        assert tuning.SPACE[name].clip(value) == value, f"{name}'s default is outside its search range"
    assert tuning.SPACE["num_leaves"].clip(1000) == 127
    assert tuning.SPACE["learning_rate"].clip(0.0) == 0.01
