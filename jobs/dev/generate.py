"""Synthetic interaction data with the structure of a real product, deterministic by seed, in the formats ingest
reads (what the data holds: docs/scale.md#data-to-try-it-on).
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import polars as pl

logger = logging.getLogger(__name__)

CATEGORIES = (
    "Action", "Comedy", "Drama", "Documentary", "Horror", "Romance",
    "Sci-Fi", "Thriller", "Animation", "Western", "Musical", "Crime",
)  # fmt: skip
# Users are generated in chunks of this many, each chunk from its own seed, so the output depends only on the
# arguments and memory only on the chunk size.
CHUNK_USERS = 50_000
SECONDS_PER_DAY = 86_400
# Share of sessions per hour of the day (UTC): quiet nights, a lunch bump, an evening peak.
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 5, 4, 4, 5, 6, 8, 10, 11, 10, 7, 4], dtype=np.float64)
WEEKDAY_WEIGHTS = np.array([1.0, 0.95, 0.95, 1.0, 1.1, 1.3, 1.25])  # Monday first
REPEAT_SHARE = 0.1
EXPLORE_SHARE = 0.15
SECOND_TASTE_SHARE = 0.3
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "IN", "JP")
COUNTRY_SHARES = np.array([0.38, 0.14, 0.12, 0.10, 0.10, 0.10, 0.06])
PLATFORMS = ("ios", "android", "web")
PLATFORM_SHARES = np.array([0.45, 0.40, 0.15])
COUNTRY_TASTE_SHARE = 0.35  # users whose main genre is their country's favourite
SIGNED_UP_SHARE = 0.05  # users in the users table (beyond `users`) without any interaction yet
# Random streams beyond the catalogue's (0) and the users' interactions' (1 + chunk): user attributes, then
# the users who have only signed up.
ATTRIBUTE_STREAM = 1 << 30
# The funnel's draws (event types) come from a stream of their own per chunk, after the attributes': the
# views are the same events with or without event types.
FUNNEL_STREAM = 1 << 31
# Share of views that go to the cart, and of carts that are bought: an item of the user's taste (its main
# genre one of their two favourites) converts several times as often as another, as real funnels do.
CART_RATE = {True: 0.1, False: 0.02}
PURCHASE_RATE = {True: 0.4, False: 0.15}
CART_DELAY_SECONDS = 300.0  # mean minutes from a view to its cart, and from a cart to its purchase
PURCHASE_DELAY_SECONDS = 900.0
EVENT_TYPES = ("view", "cart", "purchase")


@dataclass(frozen=True)
class GeneratedData:
    interactions: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame | None = None  # user_id, country, platform


@dataclass(frozen=True)
class Catalogue:
    """Items in genre order, with one cumulative sampling table per (epoch, genre)."""

    genre: np.ndarray  # main genre of each item
    second_genre: np.ndarray  # -1 for items with one genre
    available: np.ndarray
    order: np.ndarray  # item indices sorted by genre
    bounds: np.ndarray  # order[bounds[g]:bounds[g+1]] are the items of genre g
    table: np.ndarray  # epoch * genres + within-genre cumulative share, flattened by (epoch, item in order)
    epoch_days: int
    genres: int


@dataclass(frozen=True)
class GenerateResult:
    users: int
    items: int
    interactions: int
    parts: int
    path: str

    def summary(self) -> str:
        return f"{self.interactions:,} interactions of {self.users:,} users over {self.items:,} items in {self.path}"


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def make_catalogue(items: int, days: int, seed: int) -> Catalogue:
    rng = _rng(seed, 0)
    genres = min(len(CATEGORIES), max(2, items // 20))
    genre = rng.integers(0, genres, size=items)
    second = np.where(rng.random(items) < 0.3, rng.integers(0, genres, size=items), -1)
    second = np.where(second == genre, -1, second)
    appeal = 1.0 / np.arange(1, items + 1) ** 1.05
    rng.shuffle(appeal)
    # A quarter of the items are released during the period; the rest were out before it.
    released_during = rng.random(items) < 0.25
    release_day = np.where(released_during, rng.random(items) * days, -rng.random(items) * 180.0)
    fade_days = rng.lognormal(np.log(90.0), 0.7, size=items)

    epoch_days = max(1, -(-days // 90))
    epochs = -(-days // epoch_days)
    order = np.argsort(genre, kind="stable")
    bounds = np.searchsorted(genre[order], np.arange(genres + 1))
    epoch_start = np.arange(epochs, dtype=np.float64)[:, None] * epoch_days
    age = epoch_start - release_day[order][None, :]
    weights = np.where(age >= 0, appeal[order][None, :] * np.exp(-np.maximum(age, 0) / fade_days[order]), 0.0)
    table = np.empty_like(weights)
    for g in range(genres):
        lo, hi = bounds[g], bounds[g + 1]
        cumulative = np.cumsum(weights[:, lo:hi], axis=1)
        totals = np.maximum(cumulative[:, -1:], 1e-300)
        table[:, lo:hi] = (np.arange(epochs)[:, None] * genres + g) + cumulative / totals * (1 - 1e-12)
    final_age = days - release_day
    available = np.exp(-np.maximum(final_age, 0) / fade_days) > 0.02
    return Catalogue(
        genre=genre,
        second_genre=second,
        available=available,
        order=order,
        bounds=bounds,
        table=table.ravel(),
        epoch_days=epoch_days,
        genres=genres,
    )


def _day_table(days: int, start: date) -> np.ndarray:
    """Cumulative weight of the days of the period: weekly rhythm and a slowly growing product."""
    weekday = (np.arange(days) + start.weekday()) % 7
    weights = WEEKDAY_WEIGHTS[weekday] * (1.0 + 0.3 * np.arange(days) / max(days, 1))
    return np.concatenate([[0.0], np.cumsum(weights)])


@dataclass(frozen=True)
class UserAttributes:
    country: np.ndarray  # index into COUNTRIES
    platform: np.ndarray  # index into PLATFORMS
    country_taste: np.ndarray  # whether the user's main genre is their country's


def user_attributes(first_user: int, users: int, seed: int) -> UserAttributes:
    """The attributes of users ``first_user + 1 ..``, from a stream of their own (per chunk of users), so
    that they leave the interactions' random draws as they were."""
    rng = _rng(seed, ATTRIBUTE_STREAM + first_user // CHUNK_USERS)
    return UserAttributes(
        country=rng.choice(len(COUNTRIES), size=users, p=COUNTRY_SHARES),
        platform=rng.choice(len(PLATFORMS), size=users, p=PLATFORM_SHARES),
        country_taste=rng.random(users) < COUNTRY_TASTE_SHARE,
    )


def country_genre(country: np.ndarray, genres: int) -> np.ndarray:
    """Each country's favourite genre: a different one for each while there are enough genres."""
    return (3 * country + 1) % genres


def users_frame(users: int, seed: int) -> pl.DataFrame:
    """The users table: (user_id, country, platform) of the ``users`` users with interactions (ids 1..users)
    and of ``SIGNED_UP_SHARE`` as many more who have none yet (ids after them)."""
    signed_up = int(users * SIGNED_UP_SHARE)
    parts = [(first, min(CHUNK_USERS, users - first)) for first in range(0, users, CHUNK_USERS)]
    attributes = [user_attributes(first, count, seed) for first, count in parts]
    newcomers = np.random.default_rng([seed, ATTRIBUTE_STREAM - 1])
    country = np.concatenate(
        [*(a.country for a in attributes), newcomers.choice(len(COUNTRIES), size=signed_up, p=COUNTRY_SHARES)]
    )
    platform = np.concatenate(
        [*(a.platform for a in attributes), newcomers.choice(len(PLATFORMS), size=signed_up, p=PLATFORM_SHARES)]
    )
    return pl.DataFrame(
        {
            "user_id": pl.Series(np.arange(1, users + signed_up + 1)).cast(pl.String),
            "country": np.array(COUNTRIES)[country],
            "platform": np.array(PLATFORMS)[platform],
        }
    )


def _user_chunk(
    first_user: int,
    users: int,
    catalogue: Catalogue,
    days: int,
    start: date,
    events_per_user: float,
    drift_day: int | None,
    seed: int,
    event_types: bool = False,
) -> pl.DataFrame:
    rng = _rng(seed, 1 + first_user // CHUNK_USERS)
    genres = catalogue.genres
    arrival = np.where(rng.random(users) < 0.6, 0.0, rng.random(users) * days * 0.95)
    sigma = 1.0
    activity = np.maximum(2, rng.lognormal(np.log(events_per_user) - sigma**2 / 2, sigma, size=users)).astype(np.int64)
    favourite = rng.integers(0, genres, size=(users, 2))
    attributes = user_attributes(first_user, users, seed)
    favourite[:, 0] = np.where(attributes.country_taste, country_genre(attributes.country, genres), favourite[:, 0])
    session_length = 1 + rng.poisson(3.0, size=users)

    user_of_event = np.repeat(np.arange(users), activity)
    n_events = user_of_event.size
    user_first_event = np.concatenate([[0], np.cumsum(activity)[:-1]])
    rank_in_user = np.arange(n_events) - user_first_event[user_of_event]
    session_in_user = rank_in_user // session_length[user_of_event]
    sessions_per_user = -(-activity // session_length)
    session_of_event = np.concatenate([[0], np.cumsum(sessions_per_user)[:-1]])[user_of_event] + session_in_user
    n_sessions = int(sessions_per_user.sum())
    user_of_session = np.repeat(np.arange(users), sessions_per_user)

    # When: a day in the user's active span by the weekly rhythm, an hour by the daily rhythm.
    day_table = _day_table(days, start)
    lo = day_table[np.floor(arrival[user_of_session]).astype(np.int64)]
    day = np.searchsorted(day_table, lo + rng.random(n_sessions) * (day_table[-1] - lo), side="right") - 1
    day = np.clip(day, 0, days - 1)
    hour_table = np.cumsum(HOUR_WEIGHTS) / HOUR_WEIGHTS.sum()
    hour = np.searchsorted(hour_table, rng.random(n_sessions), side="right")
    session_start = day * SECONDS_PER_DAY + hour * 3_600 + rng.random(n_sessions) * 3_600
    first_of_session = rank_in_user % session_length[user_of_event] == 0
    elapsed = np.cumsum(np.where(first_of_session, 0.0, rng.exponential(180.0, size=n_events)))
    session_first_event = np.maximum.accumulate(np.where(first_of_session, np.arange(n_events), 0))
    in_session = elapsed - elapsed[session_first_event]
    seconds = np.minimum(session_start[session_of_event] + in_session, days * SECONDS_PER_DAY - 1)

    # What: one genre per session from the user's taste (shifted after the drift day), items by appeal.
    taste = favourite[user_of_session, (rng.random(n_sessions) < SECOND_TASTE_SHARE).astype(np.int64)]
    if drift_day is not None:
        taste = np.where(day >= drift_day, (taste + genres // 2 + 1) % genres, taste)
    explore = rng.random(n_sessions) < EXPLORE_SHARE
    session_genre = np.where(explore, rng.integers(0, genres, size=n_sessions), taste)
    genre = session_genre[session_of_event]
    empty = catalogue.bounds[genre + 1] == catalogue.bounds[genre]
    genre = np.where(empty, catalogue.genre[catalogue.order[0]], genre)
    epoch = (seconds // (SECONDS_PER_DAY * catalogue.epoch_days)).astype(np.int64)
    group = epoch * genres + genre
    position = np.searchsorted(catalogue.table, group + rng.random(n_events), side="right")
    items = len(catalogue.order)
    position = (position - epoch * items).clip(catalogue.bounds[genre], catalogue.bounds[genre + 1] - 1)
    item = catalogue.order[position]

    # Repeats: some events go back to an item the user had earlier (in time).
    by_time = np.lexsort((seconds, user_of_event))
    user_sorted, item_sorted = user_of_event[by_time], item[by_time]
    rank_sorted = np.arange(n_events) - user_first_event[user_sorted]
    repeat = (rng.random(n_events) < REPEAT_SHARE) & (rank_sorted > 0)
    earlier = user_first_event[user_sorted] + np.floor(rng.random(n_events) * rank_sorted).astype(np.int64)
    item_sorted = np.where(repeat, item_sorted[earlier], item_sorted)
    in_taste = (catalogue.genre[item_sorted] == favourite[user_sorted, 0]) | (
        catalogue.genre[item_sorted] == favourite[user_sorted, 1]
    )
    rating = np.clip(np.round(rng.normal(np.where(in_taste | repeat, 4.0, 3.0), 0.9)), 1, 5)

    start_us = int(datetime.combine(start, time(), tzinfo=UTC).timestamp() * 1e6)

    def frame(users: np.ndarray, items: np.ndarray, at: np.ndarray) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "user_id": pl.Series(first_user + users + 1).cast(pl.String),
                "item_id": pl.Series(items + 1).cast(pl.String),
                "timestamp": pl.Series(start_us + (at * 1e6).astype(np.int64)).cast(pl.Datetime("us", "UTC")),
            }
        )

    seconds_sorted = seconds[by_time]
    if not event_types:
        return frame(user_sorted, item_sorted, seconds_sorted).with_columns(rating=pl.Series(rating, dtype=pl.Float32))
    funnel = _rng(seed, FUNNEL_STREAM + first_user // CHUNK_USERS)
    liked = in_taste | repeat
    carted = funnel.random(n_events) < np.where(liked, CART_RATE[True], CART_RATE[False])
    bought = carted & (funnel.random(n_events) < np.where(liked, PURCHASE_RATE[True], PURCHASE_RATE[False]))
    last_second = days * SECONDS_PER_DAY - 1
    cart_at = np.minimum(seconds_sorted + funnel.exponential(CART_DELAY_SECONDS, n_events), last_second)
    purchase_at = np.minimum(cart_at + funnel.exponential(PURCHASE_DELAY_SECONDS, n_events), last_second)
    steps = [(None, seconds_sorted), (carted, cart_at), (bought, purchase_at)]
    parts = [
        frame(user_sorted[mask], item_sorted[mask], at[mask])
        if mask is not None
        else frame(user_sorted, item_sorted, at)
        for mask, at in steps
    ]
    return pl.concat(
        [part.with_columns(event_type=pl.lit(name)) for part, name in zip(parts, EVENT_TYPES, strict=True)]
    ).sort("user_id", "timestamp", "event_type", maintain_order=True)


def items_frame(catalogue: Catalogue) -> pl.DataFrame:
    genre_names = np.array(CATEGORIES)
    return pl.DataFrame(
        {
            "item_id": np.arange(1, len(catalogue.genre) + 1),
            "main": genre_names[catalogue.genre],
            "second": genre_names[catalogue.second_genre],
            "has_second": catalogue.second_genre >= 0,
            "available": catalogue.available,
        }
    ).select(
        pl.col("item_id").cast(pl.String),
        pl.format("Item {}", "item_id").alias("title"),
        pl.concat_list("main", pl.when("has_second").then("second")).list.drop_nulls().alias("genres"),
        "available",
    )


def interaction_chunks(
    users: int,
    items: int,
    days: int,
    *,
    end_date: date,
    seed: int = 42,
    events_per_user: float = 50.0,
    drift_from: date | None = None,
    event_types: bool = False,
) -> tuple[Catalogue, Iterator[pl.DataFrame]]:
    """The catalogue and a lazy sequence of interaction frames, one per chunk of users."""
    if users <= 0 or items <= 0 or days <= 0:
        raise ValueError("users, items and days must be positive")
    if events_per_user < 2:
        raise ValueError("events per user must be at least 2")
    start = end_date - timedelta(days=days - 1)
    drift_day = None if drift_from is None else max(0, (drift_from - start).days)
    catalogue = make_catalogue(items, days, seed)

    def chunks() -> Iterator[pl.DataFrame]:
        for first in range(0, users, CHUNK_USERS):
            count = min(CHUNK_USERS, users - first)
            yield _user_chunk(first, count, catalogue, days, start, events_per_user, drift_day, seed, event_types)

    return catalogue, chunks()


def generate(
    users: int,
    items: int,
    days: int,
    *,
    end_date: date,
    seed: int = 42,
    events_per_user: float = 50.0,
    drift_from: date | None = None,
    event_types: bool = False,
) -> GeneratedData:
    """The whole dataset in memory (for small data: tests, the demo)."""
    catalogue, chunks = interaction_chunks(
        users,
        items,
        days,
        end_date=end_date,
        seed=seed,
        events_per_user=events_per_user,
        drift_from=drift_from,
        event_types=event_types,
    )
    interactions = pl.concat(list(chunks)).sort("timestamp", "user_id")
    return GeneratedData(interactions=interactions, items=items_frame(catalogue), users=users_frame(users, seed))


def _write_table(frame: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.write_parquet(path)
    elif fmt == "csv":
        if "timestamp" in frame.columns:
            frame = frame.with_columns(pl.col("timestamp").dt.epoch("s"))
        if "genres" in frame.columns:
            frame = frame.with_columns(pl.col("genres").list.join("|"))
        frame.write_csv(path)
    else:
        raise ValueError(f"unknown format {fmt!r}: parquet or csv")


def write_dataset(data: GeneratedData, out: Path, fmt: str = "parquet") -> Path:
    """Write ``interactions.<fmt>``, ``items.<fmt>`` and, with users, ``users.<fmt>`` into the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_table(data.interactions, out / f"interactions.{fmt}", fmt)
    _write_table(data.items, out / f"items.{fmt}", fmt)
    if data.users is not None:
        _write_table(data.users, out / f"users.{fmt}", fmt)
    return out


def write_generated(
    out: Path,
    users: int,
    items: int,
    days: int,
    *,
    end_date: date,
    seed: int = 42,
    events_per_user: float = 50.0,
    drift_from: date | None = None,
    event_types: bool = False,
    fmt: str = "parquet",
    progress: Callable[[str], None] = logger.info,
) -> GenerateResult:
    """Stream a dataset to ``out``: ``interactions/part-NNNNN.<fmt>`` (one per chunk of users), ``items.<fmt>``
    and ``users.<fmt>``.

    Memory depends on the chunk size, not on the number of users.
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"unknown format {fmt!r}: parquet or csv")
    parts_dir = out / "interactions"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in parts_dir.glob("part-*"):
        stale.unlink()
    catalogue, chunks = interaction_chunks(
        users,
        items,
        days,
        end_date=end_date,
        seed=seed,
        events_per_user=events_per_user,
        drift_from=drift_from,
        event_types=event_types,
    )
    _write_table(items_frame(catalogue), out / f"items.{fmt}", fmt)
    _write_table(users_frame(users, seed), out / f"users.{fmt}", fmt)
    total = parts = 0
    for parts, chunk in enumerate(chunks, start=1):
        _write_table(chunk, parts_dir / f"part-{parts - 1:05d}.{fmt}", fmt)
        total += chunk.height
        progress(f"generate: {min(parts * CHUNK_USERS, users):,} of {users:,} users, {total:,} interactions")
    return GenerateResult(users=users, items=items, interactions=total, parts=parts, path=str(out))
