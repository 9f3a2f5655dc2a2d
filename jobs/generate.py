"""Synthetic interaction data with structure a ranker can learn, deterministic by seed.

Items have a category and a power-law popularity; every user has one or two favourite
categories and draws most events from them, in sessions spread over the period. Used by
`overnight demo`, the tests and the benchmarks; it writes the same formats ingest reads.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import polars as pl

CATEGORIES = (
    "Action", "Comedy", "Drama", "Documentary", "Horror", "Romance",
    "Sci-Fi", "Thriller", "Animation", "Western", "Musical", "Crime",
)  # fmt: skip


@dataclass(frozen=True)
class GeneratedData:
    interactions: pl.DataFrame
    items: pl.DataFrame


def generate(
    users: int, items: int, days: int, *, end_date: date, seed: int = 42, events_per_user: float = 30.0
) -> GeneratedData:
    if users <= 0 or items <= 0 or days <= 0:
        raise ValueError("users, items and days must be positive")
    rng = np.random.default_rng(seed)
    n_categories = min(len(CATEGORIES), max(2, items // 20))

    item_category = rng.integers(0, n_categories, size=items)
    popularity = 1.0 / np.arange(1, items + 1) ** 1.1
    rng.shuffle(popularity)

    favourite = rng.integers(0, n_categories, size=(users, 2))
    activity = np.maximum(2, rng.lognormal(np.log(events_per_user), 0.8, size=users).astype(np.int64))
    user_of_event = np.repeat(np.arange(users), activity)
    n_events = user_of_event.size

    # Each category's items sampled by popularity, via one cumulative table per category.
    order = np.argsort(item_category, kind="stable")
    sorted_category = item_category[order]
    bounds = np.searchsorted(sorted_category, np.arange(n_categories + 1))
    cumulative = np.zeros(items)
    for c in range(n_categories):
        lo, hi = bounds[c], bounds[c + 1]
        if hi > lo:
            weights = popularity[order[lo:hi]]
            cumulative[lo:hi] = np.cumsum(weights) / weights.sum()

    in_taste = rng.random(n_events) < 0.8
    second = rng.random(n_events) < 0.35
    taste_category = favourite[user_of_event, second.astype(np.int64)]
    random_category = rng.integers(0, n_categories, size=n_events)
    category = np.where(in_taste, taste_category, random_category)
    empty = bounds[category + 1] == bounds[category]
    category = np.where(empty, sorted_category[0], category)
    lo, hi = bounds[category], bounds[category + 1]
    u = rng.random(n_events)
    position = np.empty(n_events, dtype=np.int64)
    for c in np.unique(category):
        mask = category == c
        segment = cumulative[bounds[c] : bounds[c + 1]]
        position[mask] = bounds[c] + np.minimum(np.searchsorted(segment, u[mask]), hi[mask] - lo[mask] - 1)
    item_of_event = order[position]

    # Each user arrives on some day and comes back in a few sessions after it.
    period = days * 86_400
    start = datetime.combine(end_date - timedelta(days=days - 1), time(), tzinfo=UTC)
    arrival = rng.random(users) * period * 0.9
    session_offset = rng.exponential(period * 0.15, size=n_events)
    within_session = rng.random(n_events) * 3_600
    seconds = arrival[user_of_event] + session_offset + within_session
    rating = np.clip(np.round(rng.normal(3.6, 1.0, size=n_events)), 1, 5)
    inside = seconds < period  # sessions that would fall after the end date are not generated
    user_of_event, item_of_event = user_of_event[inside], item_of_event[inside]
    seconds, rating = seconds[inside], rating[inside]

    interactions = pl.DataFrame(
        {
            "user_id": pl.Series(user_of_event + 1).cast(pl.String),
            "item_id": pl.Series(item_of_event + 1).cast(pl.String),
            "timestamp": pl.Series((start.timestamp() + seconds) * 1e6).cast(pl.Int64).cast(pl.Datetime("us", "UTC")),
            "rating": pl.Series(rating, dtype=pl.Float32),
        }
    ).sort("timestamp", "user_id")
    items_frame = pl.DataFrame(
        {
            "item_id": pl.Series(np.arange(1, items + 1)).cast(pl.String),
            "title": [f"Item {i}" for i in range(1, items + 1)],
            "genres": [[CATEGORIES[c]] for c in item_category],
        }
    )
    return GeneratedData(interactions=interactions, items=items_frame)


def write_dataset(data: GeneratedData, out: Path, fmt: str = "parquet") -> Path:
    """Write ``interactions.<fmt>`` and ``items.<fmt>`` into the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        data.interactions.write_parquet(out / "interactions.parquet")
        data.items.write_parquet(out / "items.parquet")
    elif fmt == "csv":
        data.interactions.with_columns(pl.col("timestamp").dt.epoch("s")).write_csv(out / "interactions.csv")
        data.items.with_columns(pl.col("genres").list.join("|")).write_csv(out / "items.csv")
    else:
        raise ValueError(f"unknown format {fmt!r}: parquet or csv")
    return out
