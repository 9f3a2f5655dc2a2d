"""Publish a date's scores to Postgres and move the live pointer (docs/architecture.md#the-publish-protocol): one
loader for every kind of batch, then production's batch made live (:func:`publish_nightly`), a shadow batch or a
canary's batch, never live here. A failure marks the batch failed and leaves production untouched.
"""

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from typing import Any

import polars as pl
import psycopg
import pyarrow as pa
from psycopg.copy import QueuedLibpqWriter
from upath import UPath

import sql
from jobs import batches, copy_binary, lake, workdir
from jobs.database import connect, database_url, upgrade
from jobs.errors import BatchValidationError, MissingDataError
from jobs.jsonable import jsonb
from jobs.monitoring import gate, outputs
from jobs.outcome import Outcome
from jobs.settings import Settings
from sql.contract import CANARY_BATCH, NIGHTLY_BATCH, SHADOW_BATCH, BatchKind

logger = logging.getLogger(__name__)

COPY_BLOCK_ROWS = 50_000  # rows encoded at a time: bounds the memory of a shard's COPY


@dataclass(frozen=True)
class PublishResult:
    logical_date: str
    batch_id: int
    model_id: str
    users: int
    live: bool
    reason: str
    dropped_batches: list[int] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # load, primary_key, extras, validate, monitor, switch
    accepted: gate.Acceptance | None = None  # the failing checks accepted to publish it
    acceptance_offered: bool = False  # an operator gave a reason to accept failing checks (--accept-checks)

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_out=self.users, batch_id=self.batch_id, model_id=self.model_id)

    def summary(self) -> str:
        state = "live" if self.live else f"not live: {self.reason}"
        accepted = f"; {self.accepted.summary()}" if self.accepted else ""
        if self.acceptance_offered and not self.accepted:
            accepted = "; no check failed, nothing was accepted"
        return f"batch {self.batch_id}, {self.users:,} users, {state}{accepted}"


Encoder = Callable[[pl.DataFrame], pa.Buffer]


def copy_frame(copy: psycopg.Copy, frame: pl.DataFrame, encode: Encoder = copy_binary.encode_rows) -> None:
    """Send ``frame`` as one binary COPY stream, encoded a block at a time by ``encode`` (by default as
    (user_id, item_ids, scores) rows)."""
    copy.write(copy_binary.SIGNATURE)
    for block in frame.iter_slices(COPY_BLOCK_ROWS):
        try:
            copy.write(encode(block))
        except copy_binary.EncodingError as error:
            raise BatchValidationError(str(error)) from error
    copy.write(copy_binary.TRAILER)


def copy_into(
    url: str, query: psycopg.sql.Composed, frame: pl.DataFrame, encode: Encoder = copy_binary.encode_rows
) -> int:
    """COPY ``frame`` on a connection of its own; a writer thread sends one block while the next is encoded.
    Returns the rows the server says it loaded."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(query, writer=QueuedLibpqWriter(cur)) as copy:
            copy_frame(copy, frame, encode)
        return cur.rowcount


@dataclass(frozen=True)
class ShardCheck:
    """What validation needs of one shard: counted on the very rows sent, with the server's row count."""

    rows: int
    empty_lists: int
    length_mismatches: int
    non_finite_scores: int
    null_elements: int
    reason_mismatches: int  # rows without two bytes of reason per item (in a night published with reasons)
    item_ids: pl.Series  # distinct

    @classmethod
    def of(cls, frame: pl.DataFrame, rows_loaded: int) -> "ShardCheck":
        items, scores = pl.col("item_ids"), pl.col("scores")

        def has_nulls(lists: pl.Expr) -> pl.Expr:
            return lists.list.len() != lists.list.drop_nulls().list.len()

        counts = frame.select(
            empty_lists=(items.list.len() == 0).sum(),
            length_mismatches=(items.list.len() != scores.list.len()).sum(),
            non_finite_scores=scores.list.eval(pl.element().is_finite().not_()).list.any().sum(),
            null_elements=(has_nulls(items) | has_nulls(scores)).sum(),
            reason_mismatches=(
                (pl.col("reason_codes").bin.size() != 2 * items.list.len()).sum()
                if "reason_codes" in frame.columns
                else pl.lit(0)
            ),
        ).row(0, named=True)
        return cls(rows=rows_loaded, **counts, item_ids=frame["item_ids"].explode().drop_nulls().unique())


def _load_shard(url: str, batch_id: int, path: UPath, explained: bool) -> ShardCheck:
    frame = pl.read_parquet(str(path))
    if explained:
        query = sql.batch_query("copy_explained_recs", batch_id)
        loaded = copy_into(url, query, frame, partial(copy_binary.encode_rows, reasons=True))
    else:
        loaded = copy_into(url, sql.batch_query("copy_recs", batch_id), frame)
    return ShardCheck.of(frame, loaded)


def _explained(files: list[UPath]) -> bool:
    """Whether the shards carry their lists' reasons (scored with ``explanations``); all of them or none."""
    with_reasons = {"reason_codes" in pl.scan_parquet(str(path)).collect_schema() for path in files}
    if len(with_reasons) > 1:
        raise BatchValidationError("some shards of the night have reasons and some not: score the date again")
    return with_reasons == {True}


# ShardCheck's counts of bad rows, and how a validation failure names them
_BAD_ROWS = {
    "empty_lists": "empty lists",
    "length_mismatches": "item/score length mismatches",
    "non_finite_scores": "rows with non-finite scores",
    "null_elements": "rows with null elements",
    "reason_mismatches": "rows whose reasons do not match their items",
}


def validate(
    shards: list[ShardCheck],
    fallback_items: list[str],
    users_scored: int,
    active_users: int,
    catalogue: list[str],
    settings: Settings,
) -> tuple[dict[str, Any], list[str]]:
    """(measurements, problems) of a loaded batch; no problem means it may go live.

    The lists are checked as they are sent (a COPY loads exactly what it is sent, or fails), so
    the server is not asked to unnest fifty million elements again; the row count is the server's.
    """
    rows = sum(s.rows for s in shards)
    published = pl.concat([*(s.item_ids for s in shards), pl.Series(fallback_items, dtype=pl.String)]).unique()
    unknown = published.filter(published.is_in(pl.Series(catalogue, dtype=pl.String).implode()).not_()).sort()
    coverage = rows / active_users if active_users else 0.0
    counts = {name: sum(getattr(s, name) for s in shards) for name in _BAD_ROWS}
    measured = {
        "rows": rows,
        "users_scored": users_scored,
        "active_users": active_users,
        "coverage": round(coverage, 6),
        **counts,
        "unknown_items": unknown.len(),
    }
    problems = []
    if rows != users_scored:
        problems.append(f"table has {rows} rows but {users_scored} users were scored")
    if coverage < settings.min_coverage:
        problems.append(f"covers {coverage:.1%} of {active_users} active users (minimum {settings.min_coverage:.0%})")
    problems += [f"{counts[name]} {label}" for name, label in _BAD_ROWS.items() if counts[name]]
    if unknown.len():
        problems.append(f"{unknown.len()} item ids not in the catalogue (e.g. {', '.join(unknown.head(5).to_list())})")
    return measured, problems


@dataclass(frozen=True)
class _Extra:
    """How one of the tables the candidates step makes beside the user lists becomes one of the batch's."""

    table: str  # the batch's table (sql.BATCH_TABLES): its create_<table>_table and copy_<table> queries
    label: str  # how a validation failure names it
    encode: Encoder
    primary_key: str | None = None  # the query that keys it once loaded (None: created with its key)


EXTRAS = {
    workdir.SIMILAR_ITEMS: _Extra(
        "similar", "similar items", partial(copy_binary.encode_rows, key="item_id"), "add_similar_primary_key"
    ),
    workdir.ITEM_ATTRIBUTES: _Extra(
        "items",
        "item attributes",
        partial(copy_binary.encode_fields, kinds={"item_id": "text", "popularity": "real", "attributes": "jsonb"}),
    ),
    workdir.SEGMENTS: _Extra("segments", "segment lists", partial(copy_binary.encode_rows, key="segment")),
    workdir.USER_SEGMENTS: _Extra(
        "user_segments",
        "user segments",
        partial(copy_binary.encode_fields, kinds={"user_id": "text", "segment": "text"}),
        "add_user_segments_primary_key",
    ),
}


def _load_extras(
    conn: psycopg.Connection, url: str, batch_id: int, frames: dict[str, pl.DataFrame], settings: Settings
) -> dict[str, int]:
    """Create the batch's other tables, COPY each of ``frames`` into its own (in parallel), key them and
    record the batch's similar_k and segment_attribute. Returns the rows the server loaded into each."""
    with conn.transaction():
        for extra in EXTRAS.values():
            conn.execute(sql.batch_query(f"create_{extra.table}_table", batch_id))

    @contextmanager
    def duplicates_named(extra: _Extra) -> Iterator[None]:
        try:
            yield
        except psycopg.errors.UniqueViolation as error:
            raise BatchValidationError(
                f"batch {batch_id}: duplicate keys in the {extra.label} ({error.diag.message_detail})"
            ) from error

    def load(name: str) -> int:
        extra = EXTRAS[name]
        with duplicates_named(extra):  # a table created with its key refuses them as they come
            return copy_into(url, sql.batch_query(f"copy_{extra.table}", batch_id), frames[name], extra.encode)

    with ThreadPoolExecutor(max_workers=settings.publish_workers) as pool:
        loaded = dict(zip(EXTRAS, pool.map(load, EXTRAS), strict=True))
    for extra in EXTRAS.values():
        if extra.primary_key:
            with duplicates_named(extra), conn.transaction():
                conn.execute(sql.batch_query(extra.primary_key, batch_id))
    with conn.transaction():
        conn.execute(sql.query("set_batch_extras"), (settings.similar_k, settings.segment_attribute, batch_id))
    return loaded


def validate_extras(
    frames: dict[str, pl.DataFrame], loaded: dict[str, int], catalogue: list[str], settings: Settings
) -> tuple[dict[str, Any], list[str]]:
    """(measurements, problems) of the batch's other tables, checked on the very frames sent: every table
    holds what was sent; neighbour and segment lists are non-empty, of finite scores (neighbours' above 0,
    at most similar_k of them) and name catalogue items; every catalogue item has its attributes; every
    user's segment has a list."""
    known = pl.Series(catalogue, dtype=pl.String).implode()
    measured: dict[str, Any] = dict(loaded)
    problems = []
    for name, extra in EXTRAS.items():
        if loaded[name] != frames[name].height:
            problems.append(f"{extra.label}: table has {loaded[name]} rows but {frames[name].height} were sent")

    def unknown_items(label: str, ids: pl.Series) -> None:
        distinct = ids.drop_nulls().unique()
        unknown = distinct.filter(distinct.is_in(known).not_()).sort()
        if unknown.len():
            problems.append(
                f"{label}: {unknown.len()} item ids not in the catalogue (e.g. {', '.join(unknown.head(5).to_list())})"
            )

    for name in (workdir.SIMILAR_ITEMS, workdir.SEGMENTS):
        check = ShardCheck.of(frames[name], loaded[name])
        label = EXTRAS[name].label
        problems += [f"{label}: {getattr(check, bad)} {text}" for bad, text in _BAD_ROWS.items() if getattr(check, bad)]
        unknown_items(label, check.item_ids)
    similar = frames[workdir.SIMILAR_ITEMS]
    scores = pl.col("scores")
    below, too_long = similar.select(
        below=(scores.list.min() <= 0).sum(),
        too_long=(scores.list.len() > settings.similar_k).sum(),
    ).row(0)
    if below:
        problems.append(f"similar items: {below} rows with scores not above 0")
    if too_long:
        problems.append(f"similar items: {too_long} lists longer than similar_k ({settings.similar_k})")
    unknown_items("similar items", similar["item_id"])
    items = frames[workdir.ITEM_ATTRIBUTES]
    unknown_items("item attributes", items["item_id"])
    if items.height != len(catalogue):
        problems.append(f"item attributes: {items.height} items but the catalogue has {len(catalogue)}")
    if not items["popularity"].is_finite().all():
        problems.append("item attributes: non-finite popularity")
    users = frames[workdir.USER_SEGMENTS]
    listless = users.filter(users["segment"].is_in(frames[workdir.SEGMENTS]["segment"].implode()).not_())
    if listless.height:
        problems.append(f"user segments: {listless.height} users of a segment without a list")
    return measured, problems


def _drop_listed(conn: psycopg.Connection, query: str, *params: object) -> list[int]:
    with conn.transaction():
        listed = [r[0] for r in conn.execute(sql.query(query), params)]
    return [b for b in listed if batches.drop_batch(conn, b)]


def apply_retention(conn: psycopg.Connection, settings: Settings, logical_date: date, batch_id: int) -> list[int]:
    """Drop earlier batches of the same date, kept batches beyond the newest ``keep_batches``, and
    canaries' never-live batches beyond the newest ``keep_batches`` of those."""
    return (
        _drop_listed(conn, "same_date_batches", logical_date, batch_id)
        + _drop_listed(conn, "expired_batches", settings.keep_batches - 1)
        + _drop_listed(conn, "expired_canary_batches", settings.keep_batches)
    )


def clean_orphans(conn: psycopg.Connection) -> list[int]:
    """Batches whose publish died mid-way (killed between COPY and switch): mark failed, drop their table."""
    orphans = [r[0] for r in conn.execute(sql.query("orphan_loading_batches"))]
    conn.commit()
    for batch_id in orphans:
        logger.warning("batch %d was left loading by a publish that died; dropping it", batch_id)
        conn.execute(sql.query("mark_batch_failed"), (None, "publish died before finishing", batch_id))
        conn.commit()
        batches.drop_batch(conn, batch_id, mark_dropped=False)
    return orphans


def _should_go_live(conn: psycopg.Connection, logical_date: date, make_live: bool | None) -> tuple[bool, str]:
    if make_live is not None:
        return make_live, "asked to go live" if make_live else "asked not to go live"
    row = conn.execute(sql.query("newest_live_date")).fetchone()
    if row is not None and row[0] > logical_date:
        return False, (
            f"live batch is of a newer date ({row[0]}); to make this one live anyway, pass --live "
            "(publish_live in the DAG)"
        )
    return True, "newest date"


def fallback(settings: Settings, logical_date: date) -> tuple[list[str], list[float]]:
    """The list for users the batch does not know: the most popular available items."""
    popular = pl.read_parquet(str(workdir.table_path(settings, logical_date, "popular"))).head(settings.top_k)
    return popular["item_id"].to_list(), popular["popular_score"].cast(pl.Float64).to_list()


@dataclass
class _Loaded:
    """A batch loaded and validated, its table keyed, what each kind of publish goes on from."""

    batch_id: int
    model_id: str
    users: int
    measured: dict[str, Any]
    seconds: dict[str, float]
    accepted: gate.Acceptance | None


# A check run once the batch is loaded and validated, given what output monitoring measured of its lists
# meanwhile: raises to hold the batch back (it is then marked failed and dropped), else returns what an
# operator accepted, if anything.
BatchCheck = Callable[[int, str, dict[str, Any], outputs.ListMeasures], "gate.Acceptance | None"]


def _load(settings: Settings, logical_date: date, model_id: str | None, kind: BatchKind, check: BatchCheck) -> _Loaded:
    """Steps 1-3 of the protocol for any kind of batch: register it, COPY every shard of the date's
    scores (production's, or `model_id`'s) into its table, key and validate it, run `check`, and mark it
    ready. A failure marks it failed and drops its table."""
    manifests = workdir.read_manifests(settings, logical_date, model_id)
    files = [workdir.shard_path(settings, logical_date, m.shard, m.shards, model_id) for m in manifests]
    users_scored = sum(m.users for m in manifests)
    users_path = workdir.table_in(workdir.require_tables(settings, logical_date), workdir.USERS)
    active_users = pl.scan_parquet(str(users_path)).select(pl.len()).collect().item()
    fallback_items, fallback_scores = fallback(settings, logical_date)
    if not fallback_items:
        raise MissingDataError(f"no popular items to serve as the fallback list for {logical_date}")
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)["item_id"].to_list()
    extras = {
        name: pl.read_parquet(str(path)) for name, path in workdir.require_batch_extras(settings, logical_date).items()
    }
    scored_by = manifests[0].model_id  # production's, or the chosen model's (its folder holds only its scores)
    generated_at = min(datetime.fromisoformat(m.generated_at) for m in manifests)
    url = database_url(settings)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name] = round(now - started, 3)
        started = now

    with connect(settings) as conn, ThreadPoolExecutor(max_workers=1) as monitoring:
        upgrade(conn)
        clean_orphans(conn)
        batch_id = conn.execute(
            sql.query("insert_batch"),
            {
                "logical_date": logical_date,
                "model_id": scored_by,
                "k": settings.top_k,
                "users_scored": users_scored,
                "active_users": active_users,
                "fallback_item_ids": fallback_items,
                "fallback_scores": fallback_scores,
                "generated_at": generated_at,
            },
        ).fetchone()[0]  # type: ignore[index]
        if kind != NIGHTLY_BATCH:
            conn.execute(sql.query("mark_batch_kind"), (kind, batch_id))
        conn.execute(sql.batch_query("create_recs_table", batch_id))
        explained = _explained(files)
        if explained:
            conn.execute(sql.batch_query("add_recs_reasons", batch_id))
            conn.execute(sql.query("mark_batch_explained"), (batch_id,))
        conn.commit()
        logger.info("publish: batch %d for %s: loading %d shards", batch_id, logical_date, len(manifests))
        measured: dict[str, Any] | None = None
        try:
            with ThreadPoolExecutor(max_workers=settings.publish_workers) as pool:
                shard_checks = list(pool.map(lambda path: _load_shard(url, batch_id, path, explained), files))
            logger.info(
                "publish: batch %d: %d rows loaded; building the primary key",
                batch_id,
                sum(c.rows for c in shard_checks),
            )
            lap("load")
            # Output monitoring's statistics of the lists need only their files: measured while the server keys
            # the table and loads the other ones. Not during the COPY: there it slowed the load about as much as
            # it saved, and held a second copy of a shard in memory.
            lists_measured = monitoring.submit(outputs.measure_lists, settings, logical_date, model_id)
            try:
                with conn.transaction():
                    conn.execute(sql.batch_query("add_recs_primary_key", batch_id))
                    conn.execute(sql.batch_query("analyze_recs", batch_id))
            except psycopg.errors.UniqueViolation as error:
                raise BatchValidationError(
                    f"batch {batch_id}: duplicate user ids across shards ({error.diag.message_detail})"
                ) from error
            lap("primary_key")
            extras_loaded = _load_extras(conn, url, batch_id, extras, settings)
            lap("extras")
            measured, problems = validate(shard_checks, fallback_items, users_scored, active_users, catalogue, settings)
            measured_extras, extra_problems = validate_extras(extras, extras_loaded, catalogue, settings)
            measured |= measured_extras
            problems += extra_problems
            lap("validate")
            if problems:
                raise BatchValidationError(
                    f"batch {batch_id} for {logical_date} failed validation: {'; '.join(problems)}"
                )
            accepted = check(batch_id, scored_by, measured, lists_measured.result())
            lap("monitor")
        except Exception as error:
            conn.rollback()
            conn.execute(sql.query("mark_batch_failed"), (jsonb(measured) if measured else None, str(error), batch_id))
            conn.commit()
            batches.drop_batch(conn, batch_id, mark_dropped=False)
            raise
        ready = "mark_shadow_ready" if kind == SHADOW_BATCH else "mark_batch_ready"
        conn.execute(sql.query(ready), (jsonb(measured), batch_id))
        conn.commit()
    return _Loaded(batch_id, scored_by, users_scored, measured, seconds, accepted)


def publish_nightly(
    settings: Settings,
    logical_date: date,
    make_live: bool | None = None,
    accept_checks: str | None = None,
    accepted_by: str | None = None,
) -> PublishResult:
    """Publish production's scores of the date and, unless a newer date is live (or `make_live` says
    otherwise), make the batch live. Monitoring's gate holds it back on any failing check of the date,
    unless `accept_checks` gives the reason an operator accepts them (`accepted_by`: who; default this
    process's user at its host)."""
    if accept_checks is not None:
        accept_checks = gate.given_reason(accept_checks)

    def through_the_gate(
        batch_id: int, model_id: str, measured: dict[str, Any], lists: outputs.ListMeasures
    ) -> gate.Acceptance | None:
        return gate.check_batch(settings, logical_date, batch_id, model_id, accept_checks, accepted_by, lists)

    gate.require_input_checks(settings, logical_date, workdir.read_manifests(settings, logical_date, None)[0].model_id)
    loaded = _load(settings, logical_date, None, NIGHTLY_BATCH, through_the_gate)
    started = time.perf_counter()
    with connect(settings) as conn:
        # Decide and switch under the live lock: two dates published at once (a backfill with
        # several active runs) must not both see an older live batch and both go live.
        with conn.transaction():
            conn.execute(sql.query("lock_live"))
            go_live, reason = _should_go_live(conn, logical_date, make_live)
            if go_live:
                switched = batches.switch_live(conn, loaded.batch_id, "publish")
        if go_live:
            logger.info("publish: batch %d is live (was %s)", loaded.batch_id, switched.previous_batch_id)
        else:
            logger.info("publish: batch %d is ready but not live: %s", loaded.batch_id, reason)
        dropped = apply_retention(conn, settings, logical_date, loaded.batch_id)
    loaded.seconds["switch"] = round(time.perf_counter() - started, 3)
    logger.info("publish: batch %d: seconds %s", loaded.batch_id, loaded.seconds)
    return PublishResult(
        logical_date=logical_date.isoformat(),
        batch_id=loaded.batch_id,
        model_id=loaded.model_id,
        users=loaded.users,
        live=go_live,
        reason=reason,
        dropped_batches=dropped,
        validation=loaded.measured,
        seconds=loaded.seconds,
        accepted=loaded.accepted,
        acceptance_offered=accept_checks is not None,
    )


def _chosen_model_checks(settings: Settings, logical_date: date, *, blocking: bool) -> BatchCheck:
    """A chosen model's output checks: kept with its batch only (the date's monitoring record and alerts
    are production's). With `blocking` a failing check holds the batch back: real users are served it."""

    def check(batch_id: int, model_id: str, measured: dict[str, Any], lists: outputs.ListMeasures) -> None:
        measured["output"] = outputs.unrecorded_checks(settings, logical_date, batch_id, model_id, lists)
        failed = [c["message"] for c in measured["output"]["checks"] if c["level"] == "fail"]
        if failed and blocking:
            raise BatchValidationError(
                f"batch {batch_id} for {logical_date} (model {model_id}) failed output checks: " + "; ".join(failed)
            )

    return check


def publish_shadow(settings: Settings, logical_date: date, model_id: str) -> PublishResult:
    """Publish `model_id`'s scores of the date as a shadow batch: never served, kept for comparison."""
    loaded = _load(
        settings, logical_date, model_id, SHADOW_BATCH, _chosen_model_checks(settings, logical_date, blocking=False)
    )
    with connect(settings) as conn:
        dropped = _drop_listed(conn, "same_date_shadow_batches", logical_date, loaded.batch_id) + _drop_listed(
            conn, "expired_shadow_batches", settings.keep_batches
        )
    return PublishResult(
        logical_date.isoformat(),
        loaded.batch_id,
        model_id,
        loaded.users,
        False,
        "shadow batch",
        dropped,
        loaded.measured,
    )


def publish_canary_batch(settings: Settings, logical_date: date, model_id: str) -> PublishResult:
    """Publish `model_id`'s scores of the date as a batch a canary can serve: never made live here, and it
    replaces none of the date's production batches (kept for rollback)."""
    loaded = _load(
        settings, logical_date, model_id, CANARY_BATCH, _chosen_model_checks(settings, logical_date, blocking=True)
    )
    with connect(settings) as conn:
        dropped = _drop_listed(conn, "expired_canary_batches", settings.keep_batches)
    logger.info("publish: batch %d of model %s is ready for a canary", loaded.batch_id, model_id)
    return PublishResult(
        logical_date.isoformat(),
        loaded.batch_id,
        model_id,
        loaded.users,
        False,
        f"scored with a chosen model ({model_id}): start a canary on it",
        dropped,
        loaded.measured,
        loaded.seconds,
    )
