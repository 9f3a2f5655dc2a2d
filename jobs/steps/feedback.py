"""Feedback events (``overnight.feedback_events``, from POST /v1/events) as interactions for ingest.

Ingest of a date D merges them into the lake like any source, so tomorrow's model learns from
today's clicks. Each event type gets its weight from OVERNIGHT_FEEDBACK_WEIGHTS; types without a
weight (impressions, by default: being shown an item is not a sign of interest) are left out.

Which events a night reads goes by when the service *received* them, not by when they happened:
the service accepts events up to 7 days old, so a window by event time would silently miss the
ones that arrived late, and a re-run of a past date would take in what arrived after it. Ingest of
D reads the events received before D + 1 day that happened before it too (one stamped a few minutes
into the next day waits for that night), and that became visible in [D - OVERNIGHT_FEEDBACK_LATE_DAYS,
D + 1 day). Each keeps its own time, so it lands in the lake partition of the day it happened, even
days before D; the lake merge drops rows it already holds, so reading an event again on the nights
after changes nothing. Ingest validates the rows like a source's and drops feedback on items
outside the catalogue (see ``jobs.steps.ingest``).

A click and a conversion of the same item are two interactions, weighted 1 + 3 by default: they
are two events (the lake's duplicate key includes the event type), and the weights are per type, so
a conversion, which nearly always follows a click, ends up worth both. Set the conversion weight
to what it should add to a click.
"""

from datetime import date, timedelta
from io import BytesIO

import polars as pl

import sql
from jobs import lake
from jobs.database import connect, upgrade
from jobs.settings import Settings

SOURCE_NAME = "overnight.feedback_events"
_CSV_SCHEMA = {"user_id": pl.String, "item_id": pl.String, "occurred_us": pl.Int64, "event_type": pl.String}


def feedback_interactions(settings: Settings, logical_date: date) -> pl.DataFrame:
    """Feedback of ingest of D's window (see above), in the lake's interaction schema (DESIGN §3), unvalidated."""
    weights = {kind: weight for kind, weight in settings.feedback_weights.items() if weight}
    if not weights:
        return pl.DataFrame(schema=lake.INTERACTIONS_SCHEMA)
    window = {
        "start": lake.day_start(logical_date - timedelta(days=settings.feedback_late_days)),
        "end": lake.day_end(logical_date),
        "types": list(weights),
    }
    body = BytesIO()
    with connect(settings) as conn:
        upgrade(conn)
        with conn.cursor() as cursor, cursor.copy(sql.query("feedback_interactions"), window) as copy:
            for block in copy:
                body.write(block)
    if not body.tell():
        return pl.DataFrame(schema=lake.INTERACTIONS_SCHEMA)
    frame = pl.read_csv(body.getvalue(), has_header=False, schema=_CSV_SCHEMA)
    return frame.select(
        "user_id",
        "item_id",
        pl.col("occurred_us").cast(pl.Datetime("us", "UTC")).alias("timestamp"),
        pl.col("event_type").replace_strict(weights, return_dtype=pl.Float32).alias("weight"),
        "event_type",
    )
