"""The feedback timestamps' pattern in the OpenAPI document: what it matches, the server accepts."""

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, TypeAdapter

from serving.feedback import EVENT_PATTERN_VALIDITY, MAX_CLOCK_SKEW, MAX_EVENT_AGE, event_timestamp_pattern

AWARE = TypeAdapter(AwareDatetime)

NOWS = [
    datetime(2026, 12, 7, 0, 0, 0, tzinfo=UTC),  # midnight: today contributes nothing
    datetime(2026, 12, 7, 0, 59, 59, 999_999, tzinfo=UTC),
    datetime(2026, 12, 7, 12, 16, 46, 123_456, tzinfo=UTC),
    datetime(2026, 12, 7, 23, 0, 0, tzinfo=UTC),
    datetime(2026, 12, 7, 23, 59, 59, 999_999, tzinfo=UTC),  # the window's oldest end is near midnight
    datetime(2027, 1, 3, 5, 30, tzinfo=UTC),  # the window spans a new year
    datetime(2028, 3, 2, 9, 0, tzinfo=UTC),  # and a leap day
    datetime(2026, 12, 7, 1, 30, tzinfo=timezone(timedelta(hours=2))),  # another offset: 23:30 UTC the day before
]


def accepted(parsed: datetime, now: datetime) -> bool:
    """What `FeedbackIntake.rows` accepts at server time `now`."""
    return now - MAX_EVENT_AGE <= parsed <= now + MAX_CLOCK_SKEW


def inside_while_valid(text: str, now: datetime) -> bool:
    """`text` is an aware date-time (as a JSON body carries it) the server accepts from `now` for as long
    as the pattern is said to hold."""
    parsed = AWARE.validate_json(json.dumps(text))
    return all(accepted(parsed, at) for at in (now, now + EVENT_PATTERN_VALIDITY))


@pytest.mark.parametrize("now", NOWS, ids=str)
def test_every_hour_the_pattern_matches_is_inside_the_window(now: datetime) -> None:
    pattern = event_timestamp_pattern(now)
    start = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=9)
    matched = []
    for hours in range(10 * 24):
        hour = start + timedelta(hours=hours)
        first, last = hour.strftime("%Y-%m-%dT%H:00:00"), hour.strftime("%Y-%m-%dT%H:59:59.999999")
        if re.fullmatch(pattern, f"{first}Z"):
            matched.append(hour)
            for text in (f"{first}Z", f"{first}+00:00", f"{last}Z", f"{last}+00:00", f"{first}.5Z"):
                assert re.fullmatch(pattern, text), text
                assert inside_while_valid(text, now), text
        else:
            assert not re.fullmatch(pattern, f"{last}Z"), last
    # It states most of the window: every hour from 7 days back, bar the margin, up to the current one.
    assert len(matched) >= 7 * 24 - 3, matched
    assert matched == [matched[0] + timedelta(hours=index) for index in range(len(matched))]
    assert matched[-1] + timedelta(hours=1) == now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@pytest.mark.parametrize("now", NOWS, ids=str)
def test_timestamps_outside_the_window_do_not_match(now: datetime) -> None:
    pattern = event_timestamp_pattern(now)
    utc = now.astimezone(UTC)
    outside = [
        utc - MAX_EVENT_AGE - timedelta(seconds=1),
        utc - MAX_EVENT_AGE,  # accepted right now, but not a moment later
        utc - timedelta(days=8),
        utc + MAX_CLOCK_SKEW + timedelta(seconds=1),
        utc + timedelta(hours=1),
        utc.replace(minute=0, second=0, microsecond=0),  # the current hour is left out
    ]
    for moment in outside:
        for text in (moment.isoformat(), moment.isoformat().replace("+00:00", "Z")):
            assert not re.fullmatch(pattern, text), text


def test_at_midnight_today_contributes_nothing_and_yesterday_all_of_it() -> None:
    pattern = event_timestamp_pattern(datetime(2026, 12, 7, 0, 10, tzinfo=UTC))
    assert not re.fullmatch(pattern, "2026-12-07T00:00:00Z")
    assert re.fullmatch(pattern, "2026-12-06T00:00:00Z") and re.fullmatch(pattern, "2026-12-06T23:59:59Z")


def test_only_precise_utc_date_times_match() -> None:
    pattern = event_timestamp_pattern(datetime(2026, 12, 7, 12, 0, tzinfo=UTC))
    assert re.fullmatch(pattern, "2026-12-06T10:20:30.123456Z")
    for text in (
        "2026-12-06T10:20:30+01:00",  # accepted by the server, but not stated
        "2026-12-06T10:20:30",  # no time zone: refused by the server
        "2026-12-06T10:20:60Z",
        "2026-12-06T10:60:30Z",
        "2026-12-06T24:20:30Z",
        "2026-12-06T10:20:30.1234567Z",
        "2026-12-06T10:20:30.Z",
        "2026-12-06 10:20:30Z",
        "2026-12-06T10:20:30z",
        "2026-12-06T10:20:30Z\n",
        "2026-12-06T10:20Z",
    ):
        assert not re.fullmatch(pattern, text), text


def test_no_whole_hour_certainly_inside_matches_nothing() -> None:
    pattern = event_timestamp_pattern(datetime(2026, 12, 7, 12, 0, tzinfo=UTC), max_age=timedelta(hours=1))
    assert not re.search(pattern, "2026-12-07T11:30:00Z")


@pytest.mark.parametrize("now", NOWS[::2], ids=str)
def test_generated_matches_parse_and_are_inside_the_window(now: datetime) -> None:
    pattern = event_timestamp_pattern(now)

    @given(st.from_regex(pattern, fullmatch=True))
    @settings(max_examples=200, deadline=None, database=None)
    def check(text: str) -> None:
        assert inside_while_valid(text, now), text

    check()
