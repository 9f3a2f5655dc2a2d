"""Feedback events (``overnight.feedback_events``) as interactions for ingest, weighted by OVERNIGHT_FEEDBACK_WEIGHTS,
read by when the service *received* them (D and the OVERNIGHT_FEEDBACK_LATE_DAYS days before), so late arrivals are
not missed and a re-run of a past date takes in nothing newer (docs/rollouts.md#feedback-into-training).
"""

from datetime import date, timedelta
from io import BytesIO

import polars as pl

import sql
from jobs import lake
from jobs.database import connect, upgrade
from jobs.errors import OvernightError
from jobs.settings import Settings
from sql.contract import FEEDBACK_EVENT_TYPES

SOURCE_NAME = "overnight.feedback_events"
_CSV_SCHEMA = {"user_id": pl.String, "item_id": pl.String, "occurred_us": pl.Int64, "event_type": pl.String}


def feedback_interactions(settings: Settings, logical_date: date) -> pl.DataFrame:
    """Feedback of ingest of D's window (see above), as ``lake.INTERACTIONS_SCHEMA`` rows, unvalidated."""
    unknown = sorted(set(settings.feedback_weights) - set(FEEDBACK_EVENT_TYPES))
    if unknown:  # a misspelt type would match no event: its feedback would be left out without a word
        raise OvernightError(
            f"OVERNIGHT_FEEDBACK_WEIGHTS names {', '.join(map(repr, unknown))}: "
            f"the feedback event types are {', '.join(FEEDBACK_EVENT_TYPES)}"
        )
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
