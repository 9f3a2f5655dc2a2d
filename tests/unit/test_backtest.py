"""The backtest's window arithmetic and its bootstrap, on hand-made numbers."""

import itertools
from datetime import date, timedelta

import numpy as np
import pytest

from jobs.errors import BadInputError
from jobs.evaluation.backtest import (
    BASELINES,
    COVERAGE,
    MODELS,
    PER_USER,
    PUBLISHED,
    RESAMPLES,
    ScoredWindow,
    percentile_interval,
    plan_windows,
    resample_counts,
    summarise,
)

ML_100K_FIRST, ML_100K_LAST = date(1997, 9, 20), date(1998, 4, 22)


def test_the_newest_cutoff_leaves_a_whole_horizon_and_each_older_one_steps_back_a_horizon() -> None:
    windows = plan_windows(ML_100K_FIRST, ML_100K_LAST, 6, 28, label_days=14)
    assert [w.number for w in windows] == [1, 2, 3, 4, 5, 6]
    assert [w.cutoff for w in windows] == [
        date(1998, 3, 26), date(1998, 2, 26), date(1998, 1, 29), date(1998, 1, 1), date(1997, 12, 4), date(1997, 11, 6),
    ]  # fmt: skip
    assert windows[0].horizon_end == ML_100K_LAST + timedelta(days=1)  # the horizon ends with the data
    assert windows[0].run_date == date(1998, 3, 25)  # `overnight run --date C-1` sees the events before C
    for newer, older in itertools.pairwise(windows):
        assert older.horizon_end == newer.cutoff  # the horizons tile the scored span, none overlaps
    assert all((w.horizon_end - w.cutoff).days == 28 for w in windows)


def test_too_few_days_for_the_windows_is_a_one_line_reason() -> None:
    first = date(2026, 1, 1)
    enough = first + timedelta(days=2 * 7 + 14)  # 29 days: 2 x 7 scored, a 14-day label window, a day of history
    assert len(plan_windows(first, enough, 2, 7, label_days=14)) == 2
    with pytest.raises(BadInputError) as raised:
        plan_windows(first, enough - timedelta(days=1), 2, 7, label_days=14)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("28 days of events (2026-01-01 to 2026-01-28) are too few for 2 windows of 7 days")
    assert "at least 29 days" in message and "fewer --windows or a shorter --horizon-days" in message
    with pytest.raises(BadInputError, match="--windows must be at least 1, got 0"):
        plan_windows(first, enough, 0, 7, label_days=14)
    with pytest.raises(BadInputError, match="--horizon-days must be at least 1, got -3"):
        plan_windows(first, enough, 2, -3, label_days=14)


def test_resamples_draw_as_many_users_as_there_are_and_repeat_for_the_same_seed() -> None:
    counts = resample_counts(50, 200, np.random.default_rng(7))
    assert counts.shape == (200, 50)
    assert (counts.sum(axis=1) == 50).all()
    assert (counts == resample_counts(50, 200, np.random.default_rng(7))).all()
    assert not (counts == resample_counts(50, 200, np.random.default_rng(8))).all()


def test_a_percentile_interval_holds_the_mean_and_narrows_with_more_users() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for users in (100, 2_500):
        values = rng.random(users)
        counts = resample_counts(users, 1000, rng)
        estimate = percentile_interval(counts @ values / users, float(values.mean()))
        assert estimate.low is not None and estimate.high is not None
        assert estimate.low < estimate.value < estimate.high
        widths.append(estimate.high - estimate.low)
    assert widths[1] < widths[0] * 0.3  # about 1 / sqrt(25) as wide
    constant = percentile_interval(np.full(1000, 0.25), 0.25)
    assert (constant.value, constant.low, constant.high) == (0.25, 0.25, 0.25)


def _window(values: np.ndarray, seed: int, coverage: float = 0.5) -> ScoredWindow:
    users = values.shape[0]
    return ScoredWindow(
        values, {model: coverage for model in MODELS}, resample_counts(users, RESAMPLES, np.random.default_rng(seed))
    )


def test_summary_pools_user_windows_and_pairs_the_ratio() -> None:
    rng = np.random.default_rng(5)
    first = rng.random((40, len(MODELS), len(PER_USER)))
    second = rng.random((60, len(MODELS), len(PER_USER)))
    first[:, MODELS.index("item-knn")] = 2 * first[:, 0] + 0.1  # every user: published < item-knn
    second[:, MODELS.index("item-knn")] = 2 * second[:, 0] + 0.1
    pooled = summarise([_window(first, 1, coverage=0.2), _window(second, 2, coverage=0.4)])
    assert pooled.users == 100
    assert list(pooled.models) == list(MODELS)
    both = np.concatenate([first, second])
    for m, model in enumerate(MODELS):
        for j, metric in enumerate(PER_USER):
            estimate = pooled.models[model][metric]
            assert estimate.value == pytest.approx(both[:, m, j].mean(), abs=1e-6)  # a mean over user-windows
            assert estimate.low is not None and estimate.high is not None
            assert estimate.low <= estimate.value <= estimate.high
        assert pooled.models[model][COVERAGE].value == pytest.approx(0.3)  # the windows' mean, no interval
        assert pooled.models[model][COVERAGE].low is None
    assert pooled.best_baseline == "item-knn"
    assert list(pooled.ratios) == list(BASELINES)
    ratio = pooled.ratio_to_best_baseline
    assert ratio is not None and ratio == pooled.ratios["item-knn"]
    assert ratio.low is not None and ratio.high is not None
    assert ratio.low <= ratio.value <= ratio.high < 1.0  # paired: published loses in every resample


def test_a_model_against_itself_is_exactly_one_in_every_resample() -> None:
    values = np.random.default_rng(9).random((30, len(MODELS), len(PER_USER)))
    values[:, 1:] = values[:, :1]  # every baseline lists what was published
    summary = summarise([_window(values, 4)])
    for ratio in summary.ratios.values():
        assert ratio is not None and (ratio.value, ratio.low, ratio.high) == (1.0, 1.0, 1.0)
    assert summary.best_baseline == BASELINES[0]  # the first of equals
    zero = summarise([_window(np.zeros((30, len(MODELS), len(PER_USER))), 4)])
    assert zero.ratio_to_best_baseline is None  # 0 / 0 is no ratio
    assert zero.models[PUBLISHED]["ndcg@10"].high == 0.0
