"""Candidate generators: cheap sources of items worth ranking for each user.

- recent popularity: the most interacted-with available items in the last ``recent_days``;
- item-to-item co-visitation: items that other users interacted with close in time to the
  items in this user's recent history.

Both are also features of the ranker (their scores and ranks). Shared tables (the popular list,
the neighbour table) are built once per cutoff; per-user candidates are generated per shard.
"""

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import polars as pl

from jobs import lake
from jobs.settings import Settings

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0


def stable_sum(expr: pl.Expr) -> pl.Expr:
    """A float sum rounded to 6 decimals: parallel aggregation adds in varying order, and the last
    bits must not decide a ranking or change the trained model from one run to the next."""
    return expr.cast(pl.Float64).sum().round(6).cast(pl.Float32)


@dataclass(frozen=True)
class CandidatesResult:
    logical_date: str
    users: int
    popular_items: int
    neighbour_pairs: int
    path: str

    def summary(self) -> str:
        return f"{self.users:,} users, {self.popular_items} popular items, {self.neighbour_pairs:,} neighbour pairs"


def build_popular(events: pl.LazyFrame, catalogue: pl.DataFrame, cutoff: datetime, settings: Settings) -> pl.DataFrame:
    """(item_id, popular_score, popular_rank): counts in the recent window; all-time counts break ties."""
    since = cutoff - timedelta(days=settings.recent_days)
    available = catalogue.lazy().filter(pl.col("available")).select("item_id")
    return (
        events.group_by("item_id")
        .agg(
            popular_score=(pl.col("timestamp") >= since).sum().cast(pl.Float32),
            all_time=pl.len(),
        )
        .join(available, on="item_id", how="semi")
        .sort(["popular_score", "all_time", "item_id"], descending=[True, True, False])
        .head(settings.popular_candidates)
        .with_row_index("popular_rank", offset=1)
        .select("item_id", "popular_score", pl.col("popular_rank").cast(pl.Int32))
        .collect()
    )


def top_per_group(
    frame: pl.LazyFrame, group: str, by: str, tie: str, limit: int, rank_name: str | None = None
) -> pl.LazyFrame:
    """The ``limit`` rows with the largest ``by`` per group; ties go by ``tie`` so runs repeat exactly."""
    ranked = frame.sort([group, by, tie], descending=[False, True, False]).with_columns(
        _rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(group)
    )
    ranked = ranked.filter(pl.col("_rank") <= limit)
    return ranked.rename({"_rank": rank_name}) if rank_name else ranked.drop("_rank")


def latest_items(events: pl.LazyFrame, limit: int) -> pl.LazyFrame:
    """Each user's ``limit`` most recently touched distinct items, with recency 1 = latest."""
    touched = events.group_by("user_id", "item_id").agg(last_seen=pl.col("timestamp").max())
    return top_per_group(touched, "user_id", "last_seen", "item_id", limit, rank_name="recency")


def build_neighbours(events: pl.LazyFrame, settings: Settings) -> pl.DataFrame:
    """(item_id, neighbour_id, covisit_weight): co-visits in users' recent histories.

    Two items touched closer in time weigh more.
    """
    recent = latest_items(events, settings.covisit_history).select("user_id", "item_id", "last_seen")
    pairs = (
        recent.join(recent, on="user_id", suffix="_other")
        .filter(pl.col("item_id") != pl.col("item_id_other"))
        .select(
            "item_id",
            pl.col("item_id_other").alias("neighbour_id"),
            weight=1.0
            / (1.0 + (pl.col("last_seen") - pl.col("last_seen_other")).dt.total_seconds().abs() / SECONDS_PER_DAY),
        )
        .group_by("item_id", "neighbour_id")
        .agg(covisit_weight=stable_sum(pl.col("weight")))
    )
    return top_per_group(pairs, "item_id", "covisit_weight", "neighbour_id", settings.covisit_neighbours).collect()


def generate(events: pl.LazyFrame, popular: pl.DataFrame, neighbours: pl.DataFrame, settings: Settings) -> pl.DataFrame:
    """Candidates for every user in ``events`` (their history), one row per (user, item).

    Columns: user_id, item_id, covisit_score, covisit_hits, covisit_rank, popular_score,
    popular_rank; a source that did not propose the item leaves its columns null.
    Items the user already interacted with are left out when ``exclude_seen`` is set.
    """
    recent = latest_items(events, settings.covisit_history)
    covisit = (
        recent.join(neighbours.lazy(), on="item_id")
        .group_by("user_id", pl.col("neighbour_id").alias("candidate"))
        .agg(
            covisit_score=stable_sum(pl.col("covisit_weight") / pl.col("recency").cast(pl.Float64).sqrt()),
            covisit_hits=pl.len().cast(pl.Int32),
        )
        .rename({"candidate": "item_id"})
    )
    users = events.select("user_id").unique()
    popular_for_all = users.join(popular.lazy(), how="cross")
    if settings.exclude_seen:
        seen = events.select("user_id", "item_id").unique()
        covisit = covisit.join(seen, on=["user_id", "item_id"], how="anti")
        popular_for_all = popular_for_all.join(seen, on=["user_id", "item_id"], how="anti")
    covisit = top_per_group(
        covisit, "user_id", "covisit_score", "item_id", settings.covisit_candidates, rank_name="covisit_rank"
    )
    return (
        covisit.join(popular_for_all, on=["user_id", "item_id"], how="full", coalesce=True)
        .sort("user_id", "item_id")
        .collect()
    )


def prepare(settings: Settings, logical_date: date) -> CandidatesResult:
    """Build the shared candidate tables as of the end of ``logical_date`` for the score shards."""
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    out = settings.work_dir_for(logical_date)
    out.mkdir(parents=True, exist_ok=True)
    popular = build_popular(events, catalogue, lake.day_end(logical_date), settings)
    neighbours = build_neighbours(events, settings)
    users = events.select("user_id").unique().sort("user_id").collect()
    lake.write_parquet_atomically(popular, out / "popular.parquet")
    lake.write_parquet_atomically(neighbours, out / "neighbours.parquet")
    lake.write_parquet_atomically(users, out / "users.parquet")
    logger.info(
        "candidates: %d users, %d popular items, %d neighbour pairs as of %s",
        users.height,
        popular.height,
        neighbours.height,
        logical_date,
    )
    return CandidatesResult(
        logical_date=logical_date.isoformat(),
        users=users.height,
        popular_items=popular.height,
        neighbour_pairs=neighbours.height,
        path=str(out),
    )
