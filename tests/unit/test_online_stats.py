"""The online report's statistics: Wilson and Newcombe intervals, the user-clustered (delta-method)
variance, propensity models."""

import numpy as np
import pytest

from jobs.errors import BadInputError
from jobs.rollouts.online import (
    UserSums,
    clustered_difference,
    clustered_normal,
    clustered_wilson,
    newcombe,
    propensities,
    ratio_variance,
    wilson,
)


def test_wilson_matches_published_values() -> None:
    # Newcombe (1998), table I: 81/263 → 0.2553 to 0.3662; 0/10 → 0 to 0.2775.
    interval = wilson(81, 263)
    assert (round(interval["low"], 4), round(interval["high"], 4)) == (0.2553, 0.3662)  # type: ignore[arg-type]
    assert wilson(0, 10)["low"] == 0.0
    assert round(wilson(0, 10)["high"], 4) == 0.2775  # type: ignore[arg-type]
    assert wilson(0, 0) == {"value": None, "low": None, "high": None}


def test_newcombe_difference_matches_published_values() -> None:
    # Newcombe (1998), example (56/70 - 48/80): 0.0524 to 0.3339 by the hybrid score method.
    difference = newcombe(wilson(56, 70), wilson(48, 80))
    assert round(difference["value"], 4) == 0.2  # type: ignore[arg-type]
    assert (round(difference["low"], 3), round(difference["high"], 3)) == (0.052, 0.334)  # type: ignore[arg-type]


def test_power_propensities_fall_with_position_and_are_floored() -> None:
    theta = propensities("power", 1.0, {p: (100, 1) for p in (1, 2, 4, 50)})
    assert theta == {1: 1.0, 2: 0.5, 4: 0.25, 50: 0.05}
    assert propensities("power", 0.0, {3: (1, 0)}) == {3: 1.0}


def test_estimated_propensities_are_relative_ctr_made_non_increasing() -> None:
    served_clicks = {1: (1000, 100), 2: (1000, 50), 3: (1000, 60), 4: (1000, 1)}
    theta = propensities("estimated", 1.0, served_clicks)
    assert theta == {1: 1.0, 2: 0.5, 3: 0.5, 4: 0.05}
    with pytest.raises(BadInputError, match="no clicks at position 1"):
        propensities("estimated", 1.0, {1: (10, 0), 2: (10, 1)})


def user_sums(impressions: np.ndarray, clicks: np.ndarray) -> UserSums:
    n, y = impressions.astype(float), clicks.astype(float)
    return UserSums(len(n), n.sum(), y.sum(), (n * n).sum(), (y * y).sum(), (y * n).sum())


def test_delta_method_variance_matches_the_hand_computation() -> None:
    # Three users (impressions, clicks): (2, 1), (3, 0), (5, 4). R = 5/10 = 0.5; residuals y - R n:
    # 0, -1.5, 1.5, so their squares sum to 4.5; m(m-1) n̄² = 3·2·(10/3)² = 200/3; Var = 4.5·3/200.
    sums = user_sums(np.array([2, 3, 5]), np.array([1, 0, 4]))
    assert (sums.nn, sums.yy, sums.yn) == (38, 17, 22)
    assert ratio_variance(sums) == pytest.approx(0.0675)
    # n_eff = p(1-p)/Var = 0.25/0.0675 ≈ 3.7 of 10 impressions: the interval is Wilson's for 1.85/3.7.
    assert clustered_wilson(sums) == wilson(0.5 * 0.25 / 0.0675, 0.25 / 0.0675)
    assert clustered_normal(sums) == pytest.approx(
        {"value": 0.5, "low": 0.5 - 1.959964 * 0.0675**0.5, "high": 0.5 + 1.959964 * 0.0675**0.5}, abs=1e-6
    )
    # One user: no between-user spread to measure, so Wilson on that one user, and no IPS bounds.
    single = user_sums(np.array([4]), np.array([1]))
    assert ratio_variance(single) is None
    assert clustered_wilson(single) == wilson(0.25, 1)
    assert clustered_wilson(user_sums(np.array([1000]), np.array([100]))) == wilson(0.1, 1)
    assert clustered_normal(single) == {"value": 0.25, "low": None, "high": None}
    # Users who each saw one impression are independent trials: n_eff is (nearly) the impressions.
    independent = user_sums(np.ones(100, dtype=int), np.array([1] * 30 + [0] * 70))
    assert clustered_wilson(independent)["low"] == pytest.approx(wilson(30, 100)["low"], abs=2e-3)


def test_aa_false_positive_rate_is_nominal_with_users_as_the_unit() -> None:
    """400 A/A experiments: 1,000 users split 50/50 between identical arms, each with their own click
    propensity (Beta(0.3, 3), mean 0.09) and number of impressions (geometric, mean 20). Treating every
    impression as independent (Wilson + Newcombe on the pooled counts) declares a difference in about
    half of them; with the user as the unit it does so in about 5%, as a 95% interval should."""
    rng = np.random.default_rng(7)
    experiments = 400
    false_positives = {"per impression": 0, "users, Wilson n_eff": 0, "users, normal": 0}
    for _ in range(experiments):
        canary = rng.random(1000) < 0.5
        propensity = rng.beta(0.3, 3, 1000)
        impressions = rng.geometric(1 / 20, 1000)
        clicks = rng.binomial(impressions, propensity)
        a, b = user_sums(impressions[canary], clicks[canary]), user_sums(impressions[~canary], clicks[~canary])
        intervals = {
            "per impression": newcombe(wilson(a.y, a.n), wilson(b.y, b.n)),
            "users, Wilson n_eff": newcombe(clustered_wilson(a), clustered_wilson(b)),
            "users, normal": clustered_difference(a, b),
        }
        for method, interval in intervals.items():
            assert interval["low"] is not None and interval["high"] is not None
            false_positives[method] += interval["low"] > 0 or interval["high"] < 0
    rate = {method: count / experiments for method, count in false_positives.items()}
    assert rate["per impression"] > 0.3, rate  # the old method: the test fails without clustering
    assert 0.01 <= rate["users, Wilson n_eff"] <= 0.09, rate
    assert 0.01 <= rate["users, normal"] <= 0.09, rate
