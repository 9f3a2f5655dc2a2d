"""Feedback events (``overnight.feedback_events``, from POST /v1/events) as interactions for ingest.

Ingest of a date D merges them into the lake like any source, so tomorrow's model learns from
today's clicks. Each event type gets its weight from OVERNIGHT_FEEDBACK_WEIGHTS; types without a
weight (impressions, by default: being shown an item is not a sign of interest) are left out.
Events of the days before D are read again (OVERNIGHT_FEEDBACK_LATE_DAYS) to pick up late
arrivals; the lake merge drops the ones it already holds, so re-reading changes nothing.
"""

from datetime import date, timedelta

import polars as pl

import sql
from jobs import lake
from jobs.database import connect, upgrade
from jobs.settings import Settings

SOURCE_NAME = "overnight.feedback_events"


def feedback_interactions(settings: Settings, logical_date: date) -> pl.DataFrame:
    """Feedback that happened in [D - late days, D + 1 day), in the lake's interaction schema (DESIGN §3)."""
    weights = {kind: weight for kind, weight in settings.feedback_weights.items() if weight}
    empty = pl.DataFrame(schema=lake.INTERACTIONS_SCHEMA)
    if not weights:
        return empty
    start = lake.day_start(logical_date - timedelta(days=settings.feedback_late_days))
    with connect(settings) as conn:
        upgrade(conn)
        rows = conn.execute(
            sql.query("feedback_interactions"), (start, lake.day_end(logical_date), list(weights))
        ).fetchall()
    if not rows:
        return empty
    frame = pl.DataFrame(
        rows,
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.Datetime("us", "UTC"),
            "event_type": pl.String,
        },
        orient="row",
    )
    return frame.with_columns(
        weight=pl.col("event_type").replace_strict(weights, return_dtype=pl.Float32),
    ).select(list(lake.INTERACTIONS_SCHEMA))
