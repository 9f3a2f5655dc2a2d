"""Candidate generators (``popular``, ``covisit``, ``knn``, ``genre``; docs/architecture.md#2-features-and-candidates):
cheap sources of items worth ranking for each user, each also a ranker feature. The item-level tables are built once
per cutoff by :func:`prepare`, per-user candidates per chunk of users by :func:`generate`.
"""

import json
import logging
from dataclasses import dataclass
from datetime import date, datetime

import polars as pl
from upath import UPath

from jobs import kernels, lake, registry, workdir
from jobs.database import connect
from jobs.event_weights import EVENT_WEIGHT, with_event_weight
from jobs.outcome import Outcome
from jobs.settings import Settings
from jobs.steps import similar
from jobs.steps.popularity import build_segments, item_attributes, popularity_counts

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0
KEY = ["user_id", "item_id"]
GENRES_PER_USER = 3  # the genre source proposes items of the user's few favourite genres only
# name of each source: (score column, rank column), in the order they are merged
SOURCES: dict[str, tuple[str, str]] = {
    "knn": ("knn_score", "knn_rank"),
    "covisit": ("covisit_score", "covisit_rank"),
    "genre": ("genre_score", "genre_rank"),
    "popular": ("popular_score", "popular_rank"),
}


# The settings that shape the tables and the lists. A tuned model's may differ from the night's (jobs.tuning):
# prepare records their values beside the tables, so scoring can tell whether the tables fit its model.
SHAPING_SETTINGS = (
    "recent_days",
    "popular_candidates",
    "covisit_history",
    "covisit_neighbours",
    "covisit_candidates",
    "covisit_half_life_days",
    "similarity_history",
    "similarity_neighbours",
    "similarity_min_support",
    "knn_candidates",
    "genre_candidates",
    "max_candidates",
)
# What a source proposed an item for: the user's item that added the most to its knn or co-visitation sum
# (item ids), the favourite genre that added the most to its genre score (text). Not ranker features.
ITEM_REASONS = ("knn_because", "covisit_because")
REASONS = (*ITEM_REASONS, "genre_because")


def shaping_values(settings: Settings) -> dict[str, float | int]:
    return {name: getattr(settings, name) for name in SHAPING_SETTINGS}


def settings_for_date(settings: Settings, logical_date: date) -> Settings:
    """The settings the date's tables are built with: those the model that scores the date was tuned with
    (see ``jobs.tuning``), else the night's own (no model yet, or an untuned one)."""
    with connect(settings) as conn:
        model = registry.model_for_date(conn, logical_date)
    return settings if model is None else registry.tuned_settings(settings, model)


def tables_fit(settings: Settings, logical_date: date, model: registry.ModelVersion) -> bool:
    """Whether the date's tables were built with the candidate settings ``model`` scores with (a tuned
    model's own, else the night's); tables from before the step recorded them count as the night's."""
    return tables_built_with(settings, logical_date, registry.tuned_settings(settings, model))


def tables_built_with(settings: Settings, logical_date: date, wanted: Settings) -> bool:
    """Whether the date's tables were built with ``wanted``'s candidate settings (``settings``: the night's)."""
    record = workdir.candidate_settings_path(settings, logical_date)
    built = json.loads(record.read_text()) if record.exists() else shaping_values(settings)
    return bool(built == shaping_values(wanted))


def source_limits(settings: Settings) -> dict[str, int]:
    """How many candidates each source proposes per user."""
    return {
        "knn": settings.knn_candidates,
        "covisit": settings.covisit_candidates,
        "genre": settings.genre_candidates,
        "popular": settings.popular_candidates,
    }


def stable_sum(expr: pl.Expr) -> pl.Expr:
    """A float sum rounded to 6 decimals: parallel aggregation adds in varying order, and the last
    bits must not decide a ranking or change the trained model from one run to the next."""
    return expr.cast(pl.Float64).sum().round(6).cast(pl.Float32)


def decode(codes: pl.Expr, enum: pl.Enum) -> pl.Expr:
    """Enum values from their physical codes (as ``to_physical`` gives them)."""
    physical = pl.Series(dtype=enum).to_physical().dtype
    return codes.cast(physical).cat.to(enum)


ITEM_COLUMNS = ("item_id", "neighbour_id")


def sorted_enum(*ids: pl.Series) -> pl.Enum:
    """An enum over the distinct ids, in sorted order: its values compare as the strings do."""
    return pl.Enum(pl.concat([i.cast(pl.String) for i in ids]).unique().sort())


def as_enums(frame: pl.DataFrame, items: pl.Enum, users: pl.Enum | None = None) -> pl.DataFrame:
    """``frame`` with its item (and user) id columns cast to enums."""
    casts = [pl.col(c).cast(items) for c in ITEM_COLUMNS if c in frame.columns]
    if users is not None and "user_id" in frame.columns:
        casts.append(pl.col("user_id").cast(users))
    return frame.with_columns(casts)


def days_before(cutoff: datetime, column: str | pl.Expr) -> pl.Expr:
    expr = pl.col(column) if isinstance(column, str) else column
    return (pl.lit(cutoff) - expr).dt.total_seconds() / SECONDS_PER_DAY


def decay(cutoff: datetime, half_life_days: float, column: str = "timestamp") -> pl.Expr:
    """1 at the cutoff, halving every ``half_life_days`` before it."""
    return (-days_before(cutoff, column) * (0.6931471805599453 / half_life_days)).exp()


@dataclass(frozen=True)
class CandidateTables:
    """The item-level tables every chunk of users shares."""

    popular: pl.DataFrame  # item_id, popular_score, popular_rank
    neighbours: pl.DataFrame  # item_id, neighbour_id, covisit_weight
    similar: pl.DataFrame  # item_id, neighbour_id, similarity
    genre_popular: pl.DataFrame  # genre, item_id, genre_popularity (1 = the genre's most popular)
    genres: pl.DataFrame  # item_id, genre

    def frames(self) -> dict[str, pl.DataFrame]:
        frames = (self.popular, self.neighbours, self.similar, self.genre_popular, self.genres)
        return dict(zip(workdir.CANDIDATE_TABLES, frames, strict=True))

    @classmethod
    def load(cls, folder: UPath) -> "CandidateTables":
        return cls(*(pl.read_parquet(str(workdir.table_in(folder, name))) for name in workdir.CANDIDATE_TABLES))


@dataclass(frozen=True)
class CandidatesResult:
    logical_date: str
    users: int
    popular_items: int
    neighbour_pairs: int
    similar_pairs: int
    path: str
    segments: int = 0  # segments with a popular list of their own (segment_attribute)

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_out=self.users)

    def summary(self) -> str:
        segments = f", {self.segments} segment lists" if self.segments else ""
        return (
            f"{self.users:,} users, {self.popular_items} popular items, {self.neighbour_pairs:,} co-visitation "
            f"and {self.similar_pairs:,} similarity pairs{segments}"
        )


def item_genres(catalogue: pl.DataFrame) -> pl.DataFrame:
    """(item_id, genre), one row per genre of each item."""
    return (
        catalogue.select("item_id", pl.col("genres").alias("genre")).explode("genre").drop_nulls("genre").sort(KEY[1:])
    )


def build_popular(events: pl.LazyFrame, catalogue: pl.DataFrame, cutoff: datetime, settings: Settings) -> pl.DataFrame:
    """(item_id, popular_score, popular_rank): counts in the recent window; all-time counts break ties."""
    available = catalogue.lazy().filter(pl.col("available")).select("item_id")
    return (
        popularity_counts(events, cutoff, settings)
        .join(available, on="item_id", how="semi")
        .sort(["popular_score", "all_time", "item_id"], descending=[True, True, False])
        .head(settings.popular_candidates)
        .with_row_index("popular_rank", offset=1)
        .select("item_id", "popular_score", pl.col("popular_rank").cast(pl.Int32))
        .collect(engine="streaming")
    )


def build_genre_popular(
    events: pl.LazyFrame, catalogue: pl.DataFrame, cutoff: datetime, settings: Settings
) -> pl.DataFrame:
    """(genre, item_id, genre_popularity): each genre's most popular available items, by counts that
    halve every ``recent_days``, scaled so that the genre's first item has 1."""
    available = catalogue.filter(pl.col("available"))
    decayed = (
        with_event_weight(events, settings.event_weights)
        .group_by("item_id")
        .agg(weight=stable_sum(decay(cutoff, settings.recent_days) * pl.col(EVENT_WEIGHT)))
        .join(item_genres(available).lazy(), on="item_id")
    )
    top = top_per_group(decayed, "genre", "weight", "item_id", settings.genre_candidates)
    return (
        top.with_columns(genre_popularity=(pl.col("weight") / pl.col("weight").max().over("genre")).cast(pl.Float32))
        .select("genre", "item_id", "genre_popularity")
        .sort("genre", "genre_popularity", "item_id", descending=[False, True, False])
        .collect(engine="streaming")
    )


def top_per_group(
    frame: pl.LazyFrame, group: str | list[str], by: str, tie: str, limit: int, rank_name: str | None = None
) -> pl.LazyFrame:
    """The ``limit`` rows with the largest ``by`` per group; ties go by ``tie`` so runs repeat exactly.

    Rows keep their order (sort afterwards if it matters): each group ranks its own rows, which is
    several times faster than sorting the whole frame and numbering the sorted rows.
    """
    groups = [group] if isinstance(group, str) else group
    positions = pl.int_range(pl.len(), dtype=pl.UInt32)
    rank = (positions.sort_by([by, tie], descending=[True, False]).arg_sort() + 1).cast(pl.Int32)
    ranked = frame.with_columns(rank.over(groups).alias("_rank")).filter(pl.col("_rank") <= limit)
    return ranked.rename({"_rank": rank_name}) if rank_name else ranked.drop("_rank")


def latest_items(events: pl.LazyFrame, limit: int) -> pl.LazyFrame:
    """Each user's ``limit`` most recently touched distinct items, with recency 1 = latest and strength, the
    largest weight of the user's events on the item (``events`` have EVENT_WEIGHT)."""
    touched = events.group_by("user_id", "item_id").agg(
        last_seen=pl.col("timestamp").max(), strength=pl.col(EVENT_WEIGHT).max()
    )
    return top_per_group(touched, "user_id", "last_seen", "item_id", limit, rank_name="recency")


def build_neighbours(events: pl.LazyFrame, cutoff: datetime, settings: Settings) -> pl.DataFrame:
    """(item_id, neighbour_id, covisit_weight): co-visits in users' recent histories.

    Two items touched closer in time weigh more, and so do co-visits closer to the cutoff and neighbours
    the co-visitor engaged with more strongly (event weights).
    """
    recent = latest_items(with_event_weight(events, settings.event_weights), settings.covisit_history)
    collected = recent.select("user_id", "item_id", "last_seen", "strength").collect(engine="streaming")
    return kernels.covisitation(collected, cutoff, settings.covisit_half_life_days, settings.covisit_neighbours)


def build_similar(events: pl.LazyFrame, settings: Settings) -> pl.DataFrame:
    """(item_id, neighbour_id, similarity): cosine similarity of items over the user-item matrix
    (each user's latest ``similarity_history`` items, a cell the user's strength on the item: 1 without
    event weights), the top ``similarity_neighbours`` per item; pairs need ``similarity_min_support`` users."""
    history = latest_items(with_event_weight(events, settings.event_weights), settings.similarity_history)
    collected = history.select("user_id", "item_id", "strength").collect(engine="streaming")
    return kernels.item_similarity(collected, settings.similarity_min_support, settings.similarity_neighbours)


def build_tables(
    events: pl.LazyFrame, catalogue: pl.DataFrame, cutoff: datetime, settings: Settings
) -> CandidateTables:
    """Every item-level table the generators need, from ``events`` (all before ``cutoff``)."""
    events = with_event_weight(events, settings.event_weights)
    # Item-to-item tables cost users x history squared: count them over a fixed-size sample of recent users.
    return CandidateTables(
        popular=build_popular(events, catalogue, cutoff, settings),
        neighbours=build_neighbours(lake.most_recent_users(events, settings.covisit_max_users), cutoff, settings),
        similar=build_similar(lake.most_recent_users(events, settings.similarity_max_users), settings),
        genre_popular=build_genre_popular(events, catalogue, cutoff, settings),
        genres=item_genres(catalogue),
    )


def user_genre_shares(events: pl.LazyFrame, genres: pl.DataFrame) -> pl.LazyFrame:
    """(user_id, genre, share): the share of the user's events (by EVENT_WEIGHT, which ``events`` have) on
    items of each genre."""
    totals = events.group_by("user_id").agg(total=pl.col(EVENT_WEIGHT).cast(pl.Float64).sum())
    return (
        events.select("user_id", "item_id", EVENT_WEIGHT)
        .join(genres.lazy(), on="item_id")
        .group_by("user_id", "genre")
        .agg(n=pl.col(EVENT_WEIGHT).cast(pl.Float64).sum())
        .join(totals, on="user_id")
        .select("user_id", "genre", share=(pl.col("n") / pl.col("total")).cast(pl.Float32))
    )


def generate(events: pl.LazyFrame, shares: pl.DataFrame, tables: CandidateTables, settings: Settings) -> pl.DataFrame:
    """Candidates for every user in ``events`` (their history, and ``shares``: its ``user_genre_shares``),
    one row per (user, item).

    Columns: user_id, item_id, then per source its score and rank (``SOURCES``) and the extra
    scores knn_max, knn_recent, covisit_hits; a source that did not propose the item leaves its
    columns null. ``REASONS`` say what each source proposed the item for (``kernels.merge_sources``).
    Items the user already interacted with are left out when ``exclude_seen`` is set.
    Rows come in no particular order. Ids must be enums, the same items enum in ``events`` and
    ``tables`` (``features.encode_tables``).
    """
    schema = events.collect_schema()
    users, items = schema["user_id"], schema["item_id"]
    if not (isinstance(users, pl.Enum) and isinstance(items, pl.Enum)):
        raise TypeError(f"candidate generation needs enum ids, got {users} and {items}")
    limits = source_limits(settings)
    events = with_event_weight(events, settings.event_weights)
    latest = latest_items(events, max(settings.similarity_history, settings.covisit_history)).collect()
    seen = events.select(KEY).unique().collect() if settings.exclude_seen else None

    def over_neighbours(
        table: pl.DataFrame, value: str, history: int, limit: int, rank_by: kernels.RankBy
    ) -> pl.DataFrame:
        return kernels.top_neighbours(latest.filter(pl.col("recency") <= history), seen, table, value, limit, rank_by)

    # knn ranks by the plain sum of similarities, co-visitation by its sum with the latest items counting most
    merged = kernels.merge_sources(
        knn=over_neighbours(tables.similar, "similarity", settings.similarity_history, limits["knn"], "total"),
        covisit=over_neighbours(
            tables.neighbours, "covisit_weight", settings.covisit_history, limits["covisit"], "recent"
        ),
        favourite=top_per_group(shares.lazy(), "user_id", "share", "genre", GENRES_PER_USER).collect(),
        genre_popular=tables.genre_popular,
        popular=tables.popular.head(limits["popular"]),
        seen=seen,
        genre_limit=limits["genre"],
        most=settings.max_candidates,
    )
    return merged.select(
        decode(pl.col("user_code"), users).alias("user_id"),
        decode(pl.col("item_code"), items).alias("item_id"),
        pl.exclude("user_code", "item_code", *ITEM_REASONS),
        *(decode(pl.col(column), items).alias(column) for column in ITEM_REASONS),
    )


def prepare(settings: Settings, logical_date: date) -> CandidatesResult:
    """Build the shared candidate tables as of the end of ``logical_date`` for the score shards, and what
    publish loads beside the user lists (``workdir.BATCH_EXTRAS``)."""
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    cutoff = lake.day_end(logical_date)
    tables = build_tables(events, catalogue, cutoff, settings)
    users = lake.users_as_of(settings.lake_dir, logical_date)
    published = {workdir.SIMILAR_ITEMS: similar.similar_items(tables.neighbours, tables.similar, catalogue, settings)}
    attributes = lake.item_attribute_columns(catalogue)
    published[workdir.ITEM_ATTRIBUTES] = item_attributes(events, catalogue, attributes, cutoff, settings)
    users_table = lake.latest_snapshot(settings.lake_dir, "users", logical_date)
    published[workdir.SEGMENTS], published[workdir.USER_SEGMENTS] = build_segments(
        events, catalogue, users, users_table, logical_date, cutoff, settings
    )
    for name, frame in {**tables.frames(), workdir.USERS: users, **published}.items():
        lake.write_parquet_atomically(frame, workdir.table_path(settings, logical_date, name))
    lake.write_json_atomically(shaping_values(settings), workdir.candidate_settings_path(settings, logical_date))
    result = CandidatesResult(
        logical_date=logical_date.isoformat(),
        users=users.height,
        popular_items=tables.popular.height,
        neighbour_pairs=tables.neighbours.height,
        similar_pairs=tables.similar.height,
        path=str(workdir.folder(settings, logical_date)),
        segments=published[workdir.SEGMENTS].height,
    )
    logger.info("candidates as of %s: %s", logical_date, result.summary())
    return result
