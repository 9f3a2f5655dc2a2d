"""Lake interactions written out by hand, for the evaluation's cases worked out on paper."""

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import polars as pl

START = datetime(2026, 1, 1, tzinfo=UTC)


def interactions(rows: Iterable[tuple[str, str, datetime]]) -> pl.DataFrame:
    """(user, item, timestamp) rows as lake interactions: each an "interaction" that weighs 1."""
    rows = list(rows)
    return pl.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "item_id": [i for _, i, _ in rows],
            "timestamp": [t for _, _, t in rows],
            "weight": [1.0] * len(rows),
            "event_type": ["interaction"] * len(rows),
        },
        schema_overrides={"weight": pl.Float32, "timestamp": pl.Datetime("us", "UTC")},
    )


def on_days(rows: Iterable[tuple[str, str, int]]) -> pl.DataFrame:
    """(user, item, day) rows as lake interactions, the day counted from START."""
    return interactions((user, item, START + timedelta(days=day)) for user, item, day in rows)


def at_minutes(rows: Iterable[tuple[str, str, int]]) -> pl.DataFrame:
    """(user, item, minute) rows as lake interactions, the minute counted from START."""
    return interactions((user, item, START + timedelta(minutes=minute)) for user, item, minute in rows)
