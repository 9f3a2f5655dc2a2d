"""The lake (``OVERNIGHT_DATA_DIR/lake``: ``interactions/event_date=D/``, ``items/``, ``users/`` and ``quarantine/``
``date=D/``) and how to read it as of a logical date D: only events with ``timestamp < D + 1 day``, so nothing of
the future leaks into a backfill.
"""

import fcntl
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Literal

import polars as pl
from upath import UPath

from jobs import storage
from jobs.errors import MissingDataError
from jobs.storage import is_local

INTERACTIONS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "item_id": pl.String(),
    "timestamp": pl.Datetime("us", "UTC"),
    "weight": pl.Float32(),
    "event_type": pl.String(),
}
ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String(),
    "title": pl.String(),
    "genres": pl.List(pl.String()),
    "available": pl.Boolean(),
}
# Besides ITEMS_SCHEMA a catalogue snapshot keeps the item file's attribute columns (a storefront's
# `category`, `in_stock`): text, lists of text or true/false, what request-time filters ask about. Ingest
# keeps at most MAX_ITEM_ATTRIBUTES of them, named like ATTRIBUTE_NAME, none with a value longer than
# MAX_ATTRIBUTE_LENGTH characters or a list longer than MAX_ATTRIBUTE_VALUES (free text is not an attribute).
MAX_ITEM_ATTRIBUTES = 16
MAX_ATTRIBUTE_LENGTH = 64
MAX_ATTRIBUTE_VALUES = 32
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def day_end(logical_date: date) -> datetime:
    """The first instant after the logical date: runs for D see events strictly before it."""
    return datetime.combine(logical_date + timedelta(days=1), time(), tzinfo=UTC)


def day_start(logical_date: date) -> datetime:
    return datetime.combine(logical_date, time(), tzinfo=UTC)


def interactions_dir(lake_dir: UPath) -> UPath:
    return lake_dir / "interactions"


# Partitions are by event time: an event ingested late (``jobs.steps.feedback_interactions``) joins its own day's.
def partition_path(lake_dir: UPath, event_date: date) -> UPath:
    return interactions_dir(lake_dir) / f"event_date={event_date.isoformat()}" / "part-0.parquet"


def snapshot_path(lake_dir: UPath, kind: str, logical_date: date) -> UPath:
    return lake_dir / kind / f"date={logical_date.isoformat()}" / f"{kind}.parquet"


def quarantine_dir(lake_dir: UPath, logical_date: date) -> UPath:
    return lake_dir / "quarantine" / f"date={logical_date.isoformat()}"


def dated_dirs(folder: Path, prefix: str) -> list[tuple[date, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name.startswith(prefix):
            try:
                found.append((date.fromisoformat(entry.name.removeprefix(prefix)), entry))
            except ValueError:
                continue
    return sorted(found)


def dated_files(folder: UPath, prefix: str, name: str) -> list[tuple[date, UPath]]:
    """Each ``<prefix><date>/<name>`` under ``folder``, by date: one listing, on object storage too."""
    found = []
    for path in storage.glob(folder, f"{prefix}*/{name}"):
        try:
            found.append((date.fromisoformat(path.parent.name.removeprefix(prefix)), path))
        except ValueError:
            continue
    return sorted(found, key=lambda dated: dated[0])


# Day partitions read together where a step goes through the history in parts (``users_as_of``).
PARTITIONS_AT_ONCE = 6


def interaction_partitions(lake_dir: UPath, as_of: date) -> list[UPath]:
    partitions = dated_files(interactions_dir(lake_dir), "event_date=", "part-0.parquet")
    return [path for event_date, path in partitions if event_date <= as_of]


def scan_interactions(lake_dir: UPath, as_of: date) -> pl.LazyFrame:
    """Every validated interaction visible on ``as_of`` (timestamp before the end of that day)."""
    return _scan(_partitions_or_fail(lake_dir, as_of), as_of)


def users_as_of(lake_dir: UPath, as_of: date) -> pl.DataFrame:
    """(user_id): every user with an interaction visible on ``as_of``, sorted.

    A few day partitions at a time, keeping the users not seen in earlier ones: memory holds the users
    rather than every interaction's id, as one ``unique`` over the whole history would.
    """
    files = _partitions_or_fail(lake_dir, as_of)
    seen = pl.DataFrame(schema={"user_id": INTERACTIONS_SCHEMA["user_id"]})
    for start in range(0, len(files), PARTITIONS_AT_ONCE):
        users = _scan(files[start : start + PARTITIONS_AT_ONCE], as_of).select("user_id").unique()
        seen = pl.concat([seen, users.join(seen.lazy(), on="user_id", how="anti").collect(engine="streaming")])
    return seen.sort("user_id")


def _partitions_or_fail(lake_dir: UPath, as_of: date) -> list[UPath]:
    files = interaction_partitions(lake_dir, as_of)
    if not files:
        raise MissingDataError(
            f"no interactions in the lake at {interactions_dir(lake_dir)} on or before {as_of}; "
            "run `overnight ingest` first"
        )
    return files


def _scan(files: list[UPath], as_of: date) -> pl.LazyFrame:
    return pl.scan_parquet([str(f) for f in files], schema=INTERACTIONS_SCHEMA).filter(
        pl.col("timestamp") < day_end(as_of)
    )


def most_recent_users(events: pl.LazyFrame, limit: int) -> pl.LazyFrame:
    """The events of the ``limit`` users seen most recently (ties by user id).

    A sample of fixed size for item-to-item tables, whose cost grows with users times history squared when
    computed over everyone; co-visitation statistics settle long before a million users. The filter is
    an ``is_in`` so that it runs inside the Parquet scan.

    Only the latest days are grouped by user, widened until they hold ``limit`` users: a user last seen
    inside the window is last seen at the same time in the whole history, and everyone outside it was
    last seen earlier, so the answer is the same as over all of it without holding every user at once.
    """
    bounds = events.select(first=pl.col("timestamp").min(), last=pl.col("timestamp").max())
    first, last = bounds.collect(engine="streaming").row(0)
    if first is None:
        return events.filter(pl.lit(value=False))
    days = 1
    while True:
        start = last - timedelta(days=days)
        recent = (
            events.filter(pl.col("timestamp") >= start).group_by("user_id").agg(last_seen=pl.col("timestamp").max())
        )
        seen = recent.collect(engine="streaming")
        if seen.height >= limit or start <= first:
            break
        days *= 4
    users = seen.sort(["last_seen", "user_id"], descending=[True, False]).head(limit)["user_id"]
    return events.filter(pl.col("user_id").is_in(users.implode()))


def latest_snapshot(lake_dir: UPath, kind: str, as_of: date) -> UPath | None:
    candidates = [
        path
        for snapshot_date, path in dated_files(lake_dir / kind, "date=", f"{kind}.parquet")
        if snapshot_date <= as_of
    ]
    return candidates[-1] if candidates else None


def read_catalogue(lake_dir: UPath, as_of: date) -> pl.DataFrame:
    """The item catalogue as known on ``as_of``: the latest snapshot written on or before it."""
    path = latest_snapshot(lake_dir, "items", as_of)
    if path is None:
        raise MissingDataError(f"no item catalogue in the lake on or before {as_of}; run `overnight ingest` first")
    return pl.read_parquet(str(path))


def item_attribute_columns(catalogue: pl.DataFrame) -> list[str]:
    """The catalogue's attribute columns besides genres and availability, in their order."""
    return [name for name in catalogue.columns if name not in ITEMS_SCHEMA]


def write_atomically(path: Path | UPath, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename over `path`: readers see the old file or the new one, never half of one,
    a writer killed midway leaves the old file, and concurrent writers (a shadow and a canary of one
    model scoring the same folder) do not collide.

    On object storage `tmp` is a local file uploaded as one object (``storage.upload``), which readers
    see whole or not at all too. Where a set of objects must be complete together, the one written
    last says so (a shard's manifest after its shard)."""
    if not is_local(path):
        storage.upload(path, write)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exclusive_writes(lake_dir: Path | UPath) -> Iterator[None]:
    """Hold the lake's write lock around read-modify-write merges of its partitions: two ingests at once (a
    backfill of two dates, each merging into the same event days) would otherwise lose one's rows. A local
    lake only (an flock between this machine's processes); an object store has no lock: there, one
    ingest at a time (docs/operations.md)."""
    if not is_local(lake_dir):
        yield
        return
    lock_file = Path(lake_dir) / ".write.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_parquet_atomically(
    frame: pl.DataFrame, path: Path | UPath, compression: Literal["zstd", "lz4"] = "zstd"
) -> None:
    """`frame` as `path`, written atomically. A step's scratch files, read back once, may take lz4: quicker
    to write and read than the lake's zstd, for about 40% more bytes."""
    write_atomically(path, lambda tmp: frame.write_parquet(tmp, compression=compression, statistics=True))


def write_json_atomically(value: object, path: Path | UPath) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))
