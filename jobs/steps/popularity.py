"""Popularity beyond the one global list, published with each batch: every catalogue item's popularity and the
attributes request-time filters ask about and, with ``segment_attribute``, each user segment's popular list and the
segment of each user the batch does not score; counted as the popular list counts it (``popularity_counts``).
"""

import json
from datetime import date, datetime, timedelta

import polars as pl
from upath import UPath

# Only the shared leaves: jobs.steps.candidates imports this module (its popular list counts with `popularity_counts`).
from jobs.errors import BadInputError, MissingDataError
from jobs.event_weights import EVENT_WEIGHT, with_event_weight
from jobs.settings import Settings
from sql.contract import MAX_ID_LENGTH

SEGMENTS_SCHEMA: dict[str, pl.DataType] = {
    "segment": pl.String(),
    "item_ids": pl.List(pl.String()),
    "scores": pl.List(pl.Float32()),
}
USER_SEGMENTS_SCHEMA: dict[str, pl.DataType] = {"user_id": pl.String(), "segment": pl.String()}


def popularity_counts(
    events: pl.LazyFrame, cutoff: datetime, settings: Settings, by: tuple[str, ...] = ()
) -> pl.LazyFrame:
    """(*by, item_id, popular_score, all_time): each item's interactions in the last ``recent_days`` before
    ``cutoff`` and in all, each by its event type's weight with ``event_weights``. More recent ones, then more
    in all, make an item more popular; ``by`` counts per group (a user segment) instead of over everyone."""
    since = cutoff - timedelta(days=settings.recent_days)
    if not settings.event_weights:
        return events.group_by(*by, "item_id").agg(
            popular_score=(pl.col("timestamp") >= since).sum().cast(pl.Float32),
            all_time=pl.len(),
        )
    weighted = with_event_weight(events, settings.event_weights).with_columns(pl.col(EVENT_WEIGHT).cast(pl.Float64))
    return weighted.group_by(*by, "item_id").agg(
        popular_score=pl.col(EVENT_WEIGHT).filter(pl.col("timestamp") >= since).sum().round(6).cast(pl.Float32),
        all_time=pl.col(EVENT_WEIGHT).sum().round(6),
    )


def item_attributes(
    events: pl.LazyFrame, catalogue: pl.DataFrame, extra: list[str], cutoff: datetime, settings: Settings
) -> pl.DataFrame:
    """(item_id, popularity, attributes) for every catalogue item, by item id.

    popularity is the recent count plus the all-time count as a fraction below one, so that one real orders
    items as the popular list does (items never touched have 0). attributes is a JSON object: ``genre``
    (the item's genres), ``available``, and each of the catalogue's attribute columns ``extra``
    (``lake.item_attribute_columns``) the item has a value of.
    """
    counts = popularity_counts(events, cutoff, settings).collect(engine="streaming")
    most = int(counts["all_time"].max() or 0)  # type: ignore[arg-type]
    rows = catalogue.select(
        "item_id",
        pl.col("genres").fill_null([]).alias("genre"),
        pl.col("available").fill_null(True),
        *extra,
    ).sort("item_id")
    attributes = [
        json.dumps({name: value for name, value in row.items() if value is not None}, ensure_ascii=False)
        for row in rows.drop("item_id").iter_rows(named=True)
    ]
    return (
        rows.select("item_id")
        .with_columns(attributes=pl.Series(attributes, dtype=pl.String))
        .join(counts, on="item_id", how="left")
        .select(
            "item_id",
            popularity=(
                pl.col("popular_score").cast(pl.Float64).fill_null(0.0)
                + pl.col("all_time").cast(pl.Float64).fill_null(0.0) / (most + 1)
            ).cast(pl.Float32),
            attributes=pl.col("attributes"),
        )
        .sort("item_id")
    )


def read_user_segments(path: UPath | None, logical_date: date, attribute: str) -> pl.DataFrame:
    """(user_id, segment) of every user of the users table at ``path`` (the latest on or before the date)
    whose ``attribute`` has a value (as text, at most MAX_ID_LENGTH characters); one row per user, the last
    one listed."""
    if path is None:
        raise MissingDataError(
            f"segment_attribute is {attribute!r} but the lake has no users table on or before {logical_date}: "
            "ingest a source with a users file, or unset OVERNIGHT_SEGMENT_ATTRIBUTE"
        )
    columns = pl.read_parquet_schema(str(path))
    if attribute not in columns:
        raise BadInputError(
            f"segment_attribute {attribute!r} is not a column of the users table {path} (it has {', '.join(columns)})"
        )
    if isinstance(columns[attribute], pl.List | pl.Struct | pl.Array):
        raise BadInputError(f"users table {path}: column {attribute!r} holds {columns[attribute]}, not one value")
    segment = pl.col(attribute).cast(pl.String).str.strip_chars()
    return (
        pl.read_parquet(str(path), columns=["user_id", attribute])
        .select("user_id", segment.alias("segment"))
        .filter(pl.col("segment").str.len_chars().is_between(1, MAX_ID_LENGTH))
        .unique("user_id", keep="last", maintain_order=True)
    )


def build_segments(
    events: pl.LazyFrame,
    catalogue: pl.DataFrame,
    scored_users: pl.DataFrame,
    users_path: UPath | None,
    logical_date: date,
    cutoff: datetime,
    settings: Settings,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(segments, user_segments) as of ``cutoff``, the end of ``logical_date``: (segment, item_ids, scores),
    each segment's ``top_k`` most popular available items among its own users, counted as the popular list
    counts them; and (user_id, segment) for the users of those segments not in ``scored_users`` (the date's
    users with history). ``users_path`` is the latest users table (``lake.latest_snapshot``), if any.

    Without ``segment_attribute`` both are empty.
    """
    if settings.segment_attribute is None:
        return pl.DataFrame(schema=SEGMENTS_SCHEMA), pl.DataFrame(schema=USER_SEGMENTS_SCHEMA)
    members = read_user_segments(users_path, logical_date, settings.segment_attribute)
    since = cutoff - timedelta(days=settings.recent_days)
    kept = (
        events.filter(pl.col("timestamp") >= since)
        .select("user_id")
        .unique()
        .join(members.lazy(), on="user_id")
        .group_by("segment")
        .agg(active=pl.len())
        .filter(pl.col("active") >= settings.segment_min_users)
        .select("segment")
        .collect(engine="streaming")
    )
    members = members.join(kept, on="segment", how="semi")
    available = catalogue.lazy().filter(pl.col("available")).select("item_id")
    counts = (
        popularity_counts(events.join(members.lazy(), on="user_id"), cutoff, settings, by=("segment",))
        .join(available, on="item_id", how="semi")
        .collect(engine="streaming")
    )
    segments = (
        counts.sort(["segment", "popular_score", "all_time", "item_id"], descending=[False, True, True, False])
        .group_by("segment", maintain_order=True)
        .agg(item_ids=pl.col("item_id").head(settings.top_k), scores=pl.col("popular_score").head(settings.top_k))
        .cast(SEGMENTS_SCHEMA)  # type: ignore[arg-type]
    )
    user_segments = (
        members.join(segments.select("segment"), on="segment", how="semi")
        .join(scored_users.select("user_id"), on="user_id", how="anti")
        .sort("user_id")
    )
    return segments, user_segments
