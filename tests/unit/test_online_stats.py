"""The online report's statistics: Wilson and Newcombe intervals, propensity models."""

import pytest

from jobs.errors import BadInputError
from jobs.online import newcombe, propensities, wilson


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
