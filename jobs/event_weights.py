"""What each event type means (``OVERNIGHT_EVENT_WEIGHTS``): an event's weight in the candidate signals, and the
graded relevance of the ranker's labels and of graded NDCG; without the setting every event weighs 1 (binary).
"""

# A leaf, taking the weights rather than the settings, so that steps low in the import chain can use it.
from typing import TypeVar

import polars as pl

EVENT_WEIGHT = "event_weight"
GRADE = "grade"  # a relevant item's grade: the largest weight among the user's events on it
Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def with_event_weight(frame: Frame, weights: dict[str, float] | None) -> Frame:
    """``frame`` (events with an event_type) with each event's weight as EVENT_WEIGHT, unless it has one;
    a type the setting does not list weighs 1."""
    if EVENT_WEIGHT in frame.collect_schema().names():
        return frame
    if not weights:
        return frame.with_columns(pl.lit(1.0, pl.Float32).alias(EVENT_WEIGHT))
    weight = pl.col("event_type").replace_strict(weights, default=1.0, return_dtype=pl.Float32)
    return frame.with_columns(weight.alias(EVENT_WEIGHT))


def grade_levels(weights: dict[str, float] | None) -> list[float] | None:
    """The distinct grades, ascending, that LambdaRank's integer labels 1, 2, ... stand for (0: not
    relevant); None for binary relevance."""
    if not weights:
        return None
    return sorted({1.0, *weights.values()})


def label_of_grade(grade: pl.Expr, weights: dict[str, float] | None) -> pl.Expr:
    """The integer label of a grade (1 for every relevant item without event weights)."""
    levels = grade_levels(weights)
    if levels is None:
        return pl.lit(1, pl.Int8)
    # compared as the float32 event weights are stored
    old = pl.Series(levels, dtype=pl.Float32)
    return grade.cast(pl.Float32).replace_strict(old, pl.Series(range(1, len(levels) + 1), dtype=pl.Int8))
