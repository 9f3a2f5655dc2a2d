"""Ranker features for (user, candidate item) pairs, computed point in time.

Every table here is built from events strictly before a cutoff; nothing reads the clock.
Item tables are shared by all users and built once per cutoff; user tables are built per
shard from that shard's users' events.
"""

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import polars as pl

from jobs import lake
from jobs.candidates import stable_sum
from jobs.settings import Settings

logger = logging.getLogger(__name__)

FEATURES: tuple[str, ...] = (
    "covisit_score",
    "covisit_hits",
    "covisit_rank",
    "popular_score",
    "popular_rank",
    "item_count",
    "item_count_7d",
    "item_count_30d",
    "item_trend",
    "item_age_days",
    "item_mean_weight",
    "user_count",
    "user_days_since_last",
    "user_tenure_days",
    "user_mean_weight",
    "genre_affinity",
)


@dataclass(frozen=True)
class FeaturesResult:
    logical_date: str
    items: int
    path: str

    def summary(self) -> str:
        return f"{self.items:,} items"


def _days_before(cutoff: datetime, column: str) -> pl.Expr:
    return (pl.lit(cutoff) - pl.col(column)).dt.total_seconds() / 86_400.0


def build_item_features(events: pl.LazyFrame, cutoff: datetime) -> pl.DataFrame:
    return (
        events.group_by("item_id")
        .agg(
            item_count=pl.len().cast(pl.Float32),
            item_count_7d=(pl.col("timestamp") >= cutoff - timedelta(days=7)).sum().cast(pl.Float32),
            item_count_30d=(pl.col("timestamp") >= cutoff - timedelta(days=30)).sum().cast(pl.Float32),
            first_seen=pl.col("timestamp").min(),
            item_mean_weight=stable_sum(pl.col("weight")) / pl.len(),
        )
        .with_columns(
            # daily rate of the last week against that of the last month: above 1 is rising
            item_trend=((pl.col("item_count_7d") / 7.0) / ((pl.col("item_count_30d") + 1.0) / 30.0)).cast(pl.Float32),
            item_age_days=_days_before(cutoff, "first_seen").cast(pl.Float32),
        )
        .drop("first_seen")
        .collect()
    )


def item_genres(catalogue: pl.DataFrame) -> pl.DataFrame:
    """(item_id, genre), one row per genre of each item."""
    return catalogue.select("item_id", pl.col("genres").alias("genre")).explode("genre").drop_nulls("genre")


def build_user_features(events: pl.LazyFrame, cutoff: datetime) -> pl.LazyFrame:
    return (
        events.group_by("user_id")
        .agg(
            user_count=pl.len().cast(pl.Float32),
            last_seen=pl.col("timestamp").max(),
            first_seen=pl.col("timestamp").min(),
            user_mean_weight=stable_sum(pl.col("weight")) / pl.len(),
        )
        .with_columns(
            user_days_since_last=_days_before(cutoff, "last_seen").cast(pl.Float32),
            user_tenure_days=_days_before(cutoff, "first_seen").cast(pl.Float32),
        )
        .drop("last_seen", "first_seen")
    )


def build_user_genres(events: pl.LazyFrame, genres: pl.DataFrame) -> pl.LazyFrame:
    """(user_id, genre, share): the share of the user's events on items of each genre."""
    totals = events.group_by("user_id").agg(total=pl.len())
    return (
        events.select("user_id", "item_id")
        .join(genres.lazy(), on="item_id")
        .group_by("user_id", "genre")
        .agg(n=pl.len())
        .join(totals, on="user_id")
        .select("user_id", "genre", share=(pl.col("n") / pl.col("total")).cast(pl.Float32))
    )


def assemble(
    candidates: pl.DataFrame,
    events: pl.LazyFrame,
    item_features: pl.DataFrame,
    genres: pl.DataFrame,
    cutoff: datetime,
    settings: Settings,
) -> pl.DataFrame:
    """Join every feature onto the candidates; the result has user_id, item_id and FEATURES, no nulls."""
    affinity = (
        candidates.lazy()
        .select("user_id", "item_id")
        .join(genres.lazy(), on="item_id")
        .join(build_user_genres(events, genres), on=["user_id", "genre"])
        .group_by("user_id", "item_id")
        .agg(genre_affinity=stable_sum(pl.col("share")))
    )
    frame = (
        candidates.lazy()
        .join(item_features.lazy(), on="item_id", how="left")
        .join(build_user_features(events, cutoff), on="user_id", how="left")
        .join(affinity, on=["user_id", "item_id"], how="left")
        .with_columns(
            pl.col("covisit_rank").fill_null(settings.covisit_candidates + 1),
            pl.col("popular_rank").fill_null(settings.popular_candidates + 1),
        )
        .select("user_id", "item_id", *[pl.col(f).cast(pl.Float32).fill_null(0.0) for f in FEATURES])
        .sort("user_id", "item_id")
    )
    return frame.collect()


def prepare(settings: Settings, logical_date: date) -> FeaturesResult:
    """Build the shared item tables as of the end of ``logical_date`` for the score shards."""
    cutoff = lake.day_end(logical_date)
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    out = settings.work_dir_for(logical_date)
    items = build_item_features(events, cutoff)
    lake.write_parquet_atomically(items, out / "item_features.parquet")
    lake.write_parquet_atomically(item_genres(catalogue), out / "item_genres.parquet")
    logger.info("features: %d items as of %s", items.height, logical_date)
    return FeaturesResult(logical_date=logical_date.isoformat(), items=items.height, path=str(out))
