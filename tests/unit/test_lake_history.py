"""Reading the lake's history in parts gives what one pass over all of it gives."""

import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from upath import UPath

from jobs import lake

AS_OF = date(2026, 3, 20)
DAYS = 20  # more partitions than lake.PARTITIONS_AT_ONCE, and windows that must widen several times


@pytest.fixture
def lake_dir(tmp_path: Path) -> UPath:
    """Users active over different spans of 20 days, a few only long ago, ties on the last timestamp, and
    one event after AS_OF (invisible on it)."""
    rng = random.Random(3)
    rows = []
    for user in range(300):
        first = rng.randrange(DAYS)
        last = min(DAYS - 1, first + rng.randrange(6)) if user % 7 else first  # some users seen once, early
        for day in range(first, last + 1):
            for _ in range(rng.randrange(1, 4)):
                at = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(days=day, minutes=rng.choice((0, 30, 720)))
                rows.append((f"u{user:03d}", f"i{rng.randrange(40)}", at, 1.0, None))
    rows.append(("late", "i1", datetime(2026, 3, 21, 5, tzinfo=UTC), 1.0, None))
    events = pl.DataFrame(rows, schema=lake.INTERACTIONS_SCHEMA, orient="row")
    root = UPath(tmp_path / "lake")
    for (day,), part in events.group_by(pl.col("timestamp").dt.date()):
        lake.write_parquet_atomically(part, lake.partition_path(root, day))
    return root


def test_users_as_of_are_every_user_seen_by_then_sorted(lake_dir: UPath) -> None:
    everyone = lake.scan_interactions(lake_dir, AS_OF).select("user_id").unique().collect().sort("user_id")
    found = lake.users_as_of(lake_dir, AS_OF)
    assert len(lake.interaction_partitions(lake_dir, AS_OF)) > lake.PARTITIONS_AT_ONCE
    assert found.equals(everyone) and "late" not in found["user_id"]


@pytest.mark.parametrize("limit", [1, 5, 40, 150, 299, 1000])
def test_most_recent_users_are_the_whole_historys_latest(lake_dir: UPath, limit: int) -> None:
    events = lake.scan_interactions(lake_dir, AS_OF)
    expected = (
        events.group_by("user_id")
        .agg(last_seen=pl.col("timestamp").max())
        .sort(["last_seen", "user_id"], descending=[True, False])
        .head(limit)
        .collect()["user_id"]
    )
    chosen = lake.most_recent_users(events, limit).collect()
    assert set(chosen["user_id"]) == set(expected)
    assert chosen.height == events.filter(pl.col("user_id").is_in(expected.implode())).collect().height
