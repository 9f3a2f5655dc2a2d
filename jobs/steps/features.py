"""Ranker features for (user, candidate item) pairs, computed point in time: every table is built from events
strictly before a cutoff, and nothing reads the clock. Item tables are built once per cutoff and shared by all
users; user tables per shard, from that shard's users' events.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import polars as pl
from upath import UPath

from jobs import kernels, lake, workdir
from jobs.event_weights import with_event_weight
from jobs.outcome import Outcome
from jobs.settings import Settings
from jobs.steps import candidates
from jobs.steps.candidates import (
    ITEM_COLUMNS,
    KEY,
    REASONS,
    SOURCES,
    as_enums,
    days_before,
    item_genres,
    sorted_enum,
    source_limits,
    stable_sum,
    user_genre_shares,
)

logger = logging.getLogger(__name__)

# what candidates and features read of a user's history: scoring reads only these from the lake
HISTORY_COLUMNS = ("user_id", "item_id", "timestamp", "weight", "event_type")
FEATURES: tuple[str, ...] = (
    # candidate sources: scores and ranks (an unproposed item has score 0 and rank limit + 1)
    "knn_score",
    "knn_rank",
    "knn_max",
    "knn_recent",
    "covisit_score",
    "covisit_hits",
    "covisit_rank",
    "genre_score",
    "genre_rank",
    "popular_score",
    "popular_rank",
    "sources",
    # the item
    "item_count",
    "item_count_7d",
    "item_count_30d",
    "item_trend",
    "item_age_days",
    "item_days_since_last",
    "item_mean_weight",
    # the user
    "user_count",
    "user_days_since_last",
    "user_tenure_days",
    "user_mean_weight",
    # the user and the item
    "genre_affinity",
    "time_gap_days",
)


@dataclass(frozen=True)
class FeatureTables:
    """The item-level feature tables every chunk of users shares."""

    items: pl.DataFrame  # item_id and the item features
    genres: pl.DataFrame  # item_id, genre

    @classmethod
    def load(cls, folder: UPath) -> "FeatureTables":
        return cls(*(pl.read_parquet(str(workdir.table_in(folder, name))) for name in workdir.FEATURE_TABLES))


@dataclass(frozen=True)
class EncodedTables:
    """The shared tables with every item id an enum over the sorted ids they name: joins, group-bys
    and sorts of a chunk then run on integers (the kernels index arrays by their codes) while
    orders and tie-breaks stay those of the strings."""

    items: pl.Enum
    candidate_tables: candidates.CandidateTables
    feature_tables: FeatureTables


def encode_tables(
    candidate_tables: candidates.CandidateTables, feature_tables: FeatureTables, *extra_items: pl.Series
) -> EncodedTables:
    """The tables encoded (``EncodedTables``) over the items they name and ``extra_items``."""
    frames = [*candidate_tables.frames().values(), feature_tables.items, feature_tables.genres]
    items = sorted_enum(*(f[c] for f in frames for c in ITEM_COLUMNS if c in f.columns), *extra_items)
    return EncodedTables(
        items=items,
        candidate_tables=candidates.CandidateTables(*(as_enums(f, items) for f in candidate_tables.frames().values())),
        feature_tables=FeatureTables(as_enums(feature_tables.items, items), as_enums(feature_tables.genres, items)),
    )


def for_users(
    events: pl.DataFrame, tables: EncodedTables, cutoff: datetime, settings: Settings, reasons: bool = False
) -> pl.DataFrame:
    """Candidates and their features for the users of ``events`` (their history before ``cutoff``, with
    none of its items unknown to ``tables``): ``assemble``'s frame (with ``reasons``: theirs too), ids as enums."""
    history = as_enums(events, tables.items, sorted_enum(events["user_id"])).lazy()
    history = with_event_weight(history, settings.event_weights)
    shares = user_genre_shares(history, tables.feature_tables.genres).collect()
    proposed = candidates.generate(history, shares, tables.candidate_tables, settings)
    return assemble(proposed, history, shares, tables.feature_tables, cutoff, settings, reasons)


def candidate_features(
    settings: Settings, logical_date: date, reasons: bool = False
) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """chunk events -> (user_id, item_id, FEATURES..., with ``reasons`` REASONS...): the seam between the
    candidate generators, the features and the ranker, with the date's shared tables read (and their ids
    encoded) once.

    The frame returned keeps the ids as enums (see ``encode_tables``).
    """
    folder = workdir.require_tables(settings, logical_date)
    string_tables = (candidates.CandidateTables.load(folder), FeatureTables.load(folder))
    cutoff = lake.day_end(logical_date)
    encoded = encode_tables(*string_tables)

    def build(events: pl.DataFrame) -> pl.DataFrame:
        nonlocal encoded
        if not events["item_id"].is_in(encoded.items.categories.implode()).all():
            # an item none of the tables knows (the lake changed since they were built): widen the enum
            encoded = encode_tables(*string_tables, events["item_id"])
        return for_users(events, encoded, cutoff, settings, reasons)

    return build


def drift_sample_users(settings: Settings, logical_date: date) -> pl.DataFrame:
    """Up to ``drift_sample_users`` of the date's users, chosen by a hash of their id: every night's
    feature sample (and a model's reference) is of the same slice of users."""
    return (
        pl.scan_parquet(str(workdir.table_path(settings, logical_date, workdir.USERS)))
        .sort(pl.col("user_id").hash(seed=7), "user_id")
        .head(settings.drift_sample_users)
        .collect()
    )


def sample_features(settings: Settings, logical_date: date) -> pl.DataFrame:
    """The ranker's features of the sampled users' candidates as scoring computes them on the date, ids as
    text: the reference a model keeps for drift (the score step writes the same for each night)."""
    build = candidate_features(settings, logical_date)
    users = drift_sample_users(settings, logical_date)
    events = lake.scan_interactions(settings.lake_dir, logical_date).join(users.lazy(), on="user_id", how="semi")
    return with_text_ids(build(events.select(HISTORY_COLUMNS).collect()))


def with_text_ids(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))


@dataclass(frozen=True)
class FeaturesResult:
    logical_date: str
    items: int
    path: str

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_out=self.items)

    def summary(self) -> str:
        return f"{self.items:,} items"


def build_item_features(events: pl.LazyFrame, cutoff: datetime) -> pl.DataFrame:
    return (
        events.group_by("item_id")
        .agg(
            item_count=pl.len().cast(pl.Float32),
            item_count_7d=(pl.col("timestamp") >= cutoff - timedelta(days=7)).sum().cast(pl.Float32),
            item_count_30d=(pl.col("timestamp") >= cutoff - timedelta(days=30)).sum().cast(pl.Float32),
            first_seen=pl.col("timestamp").min(),
            last_seen=pl.col("timestamp").max(),
            # when the item's audience was active, on average: compared with when the user was
            mean_seen=pl.col("timestamp").mean(),
            item_mean_weight=stable_sum(pl.col("weight")) / pl.len(),
        )
        .with_columns(
            # daily rate of the last week against that of the last month: above 1 is rising
            item_trend=((pl.col("item_count_7d") / 7.0) / ((pl.col("item_count_30d") + 1.0) / 30.0)).cast(pl.Float32),
            item_age_days=days_before(cutoff, "first_seen").cast(pl.Float32),
            item_days_since_last=days_before(cutoff, "last_seen").cast(pl.Float32),
            item_days_since_mean=days_before(cutoff, "mean_seen").cast(pl.Float32),
        )
        .drop("first_seen", "last_seen", "mean_seen")
        .sort("item_id")
        .collect(engine="streaming")
    )


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
            user_days_since_last=days_before(cutoff, "last_seen").cast(pl.Float32),
            user_tenure_days=days_before(cutoff, "first_seen").cast(pl.Float32),
        )
        .drop("last_seen", "first_seen")
    )


def assemble(
    proposed: pl.DataFrame,
    events: pl.LazyFrame,
    shares: pl.DataFrame,
    tables: FeatureTables,
    cutoff: datetime,
    settings: Settings,
    reasons: bool = False,
) -> pl.DataFrame:
    """Join every feature onto the ``proposed`` candidates; the result has user_id, item_id, FEATURES
    (no nulls) and, with ``reasons``, the sources' ``candidates.REASONS`` (null where a source did not
    propose the item), in no particular order (training sorts what it groups; scoring ranks each
    user's rows itself).

    ``events`` are the history of the candidates' users, all before ``cutoff``, ids as enums like
    those of ``proposed`` and ``tables``, which were built from events before the same cutoff;
    ``shares`` are the events' ``user_genre_shares``.
    """
    affinity = kernels.genre_affinity(proposed, shares, tables.genres)
    limits = source_limits(settings)
    frame = (
        proposed.lazy()
        .with_columns(affinity)
        .join(tables.items.lazy(), on="item_id", how="left")
        .join(build_user_features(events, cutoff), on="user_id", how="left")
        .with_columns(
            sources=pl.sum_horizontal(pl.col(rank).is_not_null() for _, rank in SOURCES.values()),
            time_gap_days=pl.col("item_days_since_mean") - pl.col("user_days_since_last"),
            **{rank: pl.col(rank).fill_null(limits[source] + 1) for source, (_, rank) in SOURCES.items()},
        )
        .select(*KEY, *[pl.col(f).cast(pl.Float32).fill_null(0.0) for f in FEATURES], *(REASONS if reasons else ()))
    )
    return frame.collect()


def build_tables(events: pl.LazyFrame, catalogue: pl.DataFrame, cutoff: datetime) -> FeatureTables:
    return FeatureTables(items=build_item_features(events, cutoff), genres=item_genres(catalogue))


def prepare(settings: Settings, logical_date: date) -> FeaturesResult:
    """Build the shared item tables as of the end of ``logical_date`` for the score shards."""
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    tables = build_tables(events, catalogue, lake.day_end(logical_date))
    for name, frame in zip(workdir.FEATURE_TABLES, (tables.items, tables.genres), strict=True):
        lake.write_parquet_atomically(frame, workdir.table_path(settings, logical_date, name))
    logger.info("features: %d items as of %s", tables.items.height, logical_date)
    return FeaturesResult(
        logical_date=logical_date.isoformat(),
        items=tables.items.height,
        path=str(workdir.folder(settings, logical_date)),
    )
