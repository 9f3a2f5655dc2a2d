"""The evaluation protocols' splits and the promotion gate, on cases worked out by hand."""

from datetime import timedelta
from typing import Any

import polars as pl
import pytest

from jobs.evaluation.evaluate import split, user_holdout_window
from jobs.settings import Settings
from jobs.steps.train import PRODUCTION, RANKER, promotion_gate
from tests.support.interactions import START, on_days


def pairs(frame: pl.DataFrame) -> set[tuple[str, str]]:
    return set(frame.select("user_id", "item_id").iter_rows())


def test_user_holdout_keeps_each_users_last_fifth_by_time() -> None:
    rows = [("a", f"i{n}", n) for n in range(10)]  # 10 events: the last 2 are held out
    rows += [("b", "x", 5), ("b", "y", 1), ("b", "z", 3)]  # 3 events: ceil(0.6) = the last 1, by time
    rows += [("c", "solo", 2)]  # a single interaction: training only
    window = user_holdout_window(on_days(rows), Settings(), "test")
    assert pairs(window.relevant) == {("a", "i8"), ("a", "i9"), ("b", "x")}
    history = window.history.collect()
    assert pairs(history) == {("a", f"i{n}") for n in range(8)} | {("b", "y"), ("b", "z"), ("c", "solo")}
    # features may see everything of the training part and nothing after it
    assert window.cutoff == START + timedelta(days=7, microseconds=1)


def test_user_holdout_drops_relevant_items_the_user_saw_in_training() -> None:
    rows = [("a", "x", 0), ("a", "y", 1), ("a", "x", 2)]  # x again at the end: not a new item
    window = user_holdout_window(on_days(rows), Settings(), "test")
    assert window.relevant.height == 0


def test_global_protocol_tests_the_horizon_after_the_cutoff() -> None:
    rows = [("a", "old", 0), ("a", "new", 10), ("a", "later", 20), ("b", "new", 11), ("c", "old", 1)]
    rows += [("d", "only-after", 12)]  # no history before the cutoff: not evaluated
    settings = Settings(label_days=5, label_windows=1)
    test, windows = split(on_days(rows), "global", settings, cutoff=START + timedelta(days=10), horizon_days=7)
    assert test.cutoff == START + timedelta(days=10)
    assert pairs(test.relevant) == {("a", "new")}  # b and d have no history, "later" is past the horizon
    assert pairs(test.history.collect()) == {("a", "old"), ("c", "old")}
    # the ranker's own label window ends at the cutoff: nothing from the test part
    assert windows == [] or all(w.cutoff <= test.cutoff for w in windows)


def results(ranker: float, best_baseline: float, production: float | None = None, **ranker_extra: Any) -> dict:
    found: dict[str, Any] = {
        RANKER: {"ndcg@10": ranker, "full_lists": 1.0, "finite_scores": True, **ranker_extra},
        "most-popular": {"ndcg@10": best_baseline / 2},
        "item-knn": {"ndcg@10": best_baseline},
    }
    if production is not None:
        found[PRODUCTION] = {"ndcg@10": production}
    return found


@pytest.mark.parametrize(
    ("case", "margin", "reason"),
    [
        (results(0.25, 0.20, 0.24), 0.0, None),
        (results(0.25, 0.20), 0.0, None),
        (results(0.25, 0.20, 0.24), 0.05, "does not beat the production model by 5.0%: it scores 0.2400 on the same"),
        (results(0.25, 0.24, 0.20), 0.05, "does not beat item-knn by 5.0%: it scores 0.2400 on the same"),
        (results(0.19, 0.20, 0.10), 0.0, "does not beat item-knn: it scores 0.2000 on the same held-out users"),
        (results(0.30, 0.20, finite_scores=False), 0.0, "non-finite scores"),
        (results(0.30, 0.20, full_lists=0.5), 0.0, "only 50.0% of evaluated users got 10 items"),
    ],
)
def test_promotion_gate(case: dict, margin: float, reason: str | None) -> None:
    found = promotion_gate(case, Settings(promotion_margin=margin))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found
