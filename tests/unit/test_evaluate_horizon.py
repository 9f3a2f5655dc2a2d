"""The global protocol widens a horizon that holds too few users, and says so: on cases worked out by hand."""

from datetime import timedelta

import polars as pl

from jobs.evaluation.evaluate import (
    MAX_WIDENED_HORIZON_DAYS,
    MIN_EVALUATED_USERS,
    Evaluation,
    choose_horizon,
    widened_horizons,
)
from jobs.settings import Settings
from tests.support.interactions import START, interactions

CUTOFF = START + timedelta(days=30)


def events(new_item_days: list[int]) -> pl.DataFrame:
    """One user per entry: an old item on day 0, a label for the ranker's window before the cutoff on
    day 20, and a new item on the given day (counted from the cutoff)."""
    rows = []
    for number, day in enumerate(new_item_days):
        user = f"u{number}"
        rows += [
            (user, "old", START),
            (user, "mid", START + timedelta(days=20)),
            (user, "new", CUTOFF + timedelta(days=day)),
        ]
    return interactions(rows)


def test_the_horizon_doubles_up_to_the_limit() -> None:
    assert MAX_WIDENED_HORIZON_DAYS == 90
    assert widened_horizons(7) == [7, 14, 28, 56, 90]
    assert widened_horizons(60) == [60, 90]
    assert widened_horizons(120) == [120]  # already past the limit: never narrowed, never widened


def test_enough_users_in_the_requested_horizon_change_nothing() -> None:
    horizon = choose_horizon(events([2] * MIN_EVALUATED_USERS), Settings(), CUTOFF, 7)
    assert (horizon.days, horizon.requested_days, horizon.users) == (7, 7, MIN_EVALUATED_USERS)
    assert horizon.users_by_days == {7: MIN_EVALUATED_USERS}  # nothing wider was even tried
    assert horizon.warning is None


def test_too_few_users_widen_the_horizon_until_enough_fall_in_it() -> None:
    # 40 users in the first week, 80 more in the second: 14 days reach 120
    horizon = choose_horizon(events([2] * 40 + [10] * 80), Settings(), CUTOFF, 7)
    assert (horizon.days, horizon.requested_days, horizon.users) == (14, 7, 120)
    assert horizon.users_by_days == {7: 40, 14: 120}
    assert horizon.warning is not None
    assert "only 40 users fell in the requested 7-day horizon, fewer than 100" in horizon.warning
    assert "widened it to 14 days, which evaluates 120 users" in horizon.warning


def test_too_few_users_even_at_the_widest_horizon_are_still_reported_with_a_warning() -> None:
    # 10 users in the first week, 20 more after five weeks: the most there are is 30, from 56 days on
    horizon = choose_horizon(events([2] * 10 + [40] * 20), Settings(), CUTOFF, 7)
    assert horizon.users_by_days == {7: 10, 14: 10, 28: 10, 56: 30, 90: 30}
    assert (horizon.days, horizon.users) == (56, 30)  # the narrowest with the most users
    assert horizon.warning is not None
    assert "only 30 users evaluated even with the horizon widened up to 90 days, fewer than 100" in horizon.warning
    assert "used 56 days" in horizon.warning and "too noisy" in horizon.warning


def test_a_default_cutoff_moves_back_with_the_horizon_but_not_past_the_rankers_label_window() -> None:
    # 20 users with a new item every 5 days up to day 65; no cutoff given: it is the horizon's length
    # before the data's end (day 66), so wider horizons test earlier days. 56 days back (day 10), the
    # ranker's 14-day label window would have no history before it: the widening stops at 28 days.
    rows = [(f"u{user}", f"i{day}", START + timedelta(days=day)) for user in range(20) for day in range(0, 70, 5)]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    horizon = choose_horizon(frame, Settings(), None, 7)
    assert horizon.users_by_days == {7: 20, 14: 20, 28: 20}
    assert horizon.days == 7  # no wider horizon found anyone more
    assert horizon.warning is not None and "widened up to 28 days" in horizon.warning


def test_the_table_leads_with_the_warning() -> None:
    def first_lines(warning: str | None) -> list[str]:
        result = Evaluation(
            source="s", protocol="global", cutoff="2026-01-31T00:00:00+00:00", horizon_days=14,
            requested_horizon_days=7, events=1, users=1, items=1, training_windows=[], seconds={}, warning=warning,
        )  # fmt: skip
        return result.table().splitlines()[:2]

    warned = first_lines("only 3 users evaluated")
    assert warned[0] == "warning: only 3 users evaluated" and warned[1].startswith("model")
    assert first_lines(None)[0].startswith("model")
