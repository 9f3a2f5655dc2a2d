"""Publish a date's scores to Postgres (DESIGN §5) and move the live pointer.

1. Register the batch ('loading') and create ``overnight.recs_<batch_id>`` without a key.
2. COPY every shard in binary, in parallel; build the primary key after the load.
3. Validate (row count, coverage, empty lists, unknown items, non-finite scores; the lists are
   checked as they are sent, the row count is the server's); a failure marks the batch 'failed',
   drops its table and leaves production untouched.
4. In one transaction point ``overnight.live`` at the batch and NOTIFY the lookup services.
5. Drop batches beyond the newest few, and earlier batches of the same date (a re-run replaces).

A batch monitoring holds back is published with ``accept_checks`` (``overnight publish --accept-checks
"why"``): the fails are accepted, recorded and alerted, and the batch goes on as any other.
A batch of a date older than the live one (a backfill) is kept ready but not made live unless asked.
A batch scored with a chosen model (``score.score(..., model_id=M)``) is published either as a shadow
(never served) or, with ``model_id``, as a serving batch that never goes live here: a canary's batch.
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
from psycopg.copy import QueuedLibpqWriter
from psycopg.types.json import Jsonb

import sql
from jobs import copy_binary, lake, registry
from jobs.database import connect, database_url, upgrade
from jobs.errors import BatchValidationError, MissingDataError
from jobs.jsonable import jsonb
from jobs.monitoring import history, outputs
from jobs.settings import Settings
from jobs.steps import score
from sql.contract import CANARY_BATCH, SHADOW_BATCH

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
    seconds: dict[str, float] = field(default_factory=dict)  # load, primary_key, validate, monitor, switch
    accepted: outputs.Acceptance | None = None  # the failing checks accepted to publish it

    def summary(self) -> str:
        state = "live" if self.live else f"not live: {self.reason}"
        accepted = f"; {self.accepted.summary()}" if self.accepted else ""
        return f"batch {self.batch_id}, {self.users:,} users, {state}{accepted}"


@dataclass(frozen=True)
class SwitchResult:
    batch_id: int
    previous_batch_id: int | None
    # A rollback also makes the batch's model the registry's production model (the one before it here).
    model_id: str | None = None
    previous_model_id: str | None = None

    def summary(self) -> str:
        switched = f"live batch is now {self.batch_id} (was {self.previous_batch_id})"
        if self.model_id is None or self.model_id == self.previous_model_id:
            return switched
        return f"{switched}; model {self.model_id} is the production model again (was {self.previous_model_id})"


def copy_frame(copy: psycopg.Copy, frame: pl.DataFrame) -> None:
    """Send (user_id, item_ids, scores) rows as one binary COPY stream, encoded a block at a time."""
    copy.write(copy_binary.SIGNATURE)
    for block in frame.iter_slices(COPY_BLOCK_ROWS):
        try:
            copy.write(copy_binary.encode_rows(block))
        except copy_binary.EncodingError as error:
            raise BatchValidationError(str(error)) from error
    copy.write(copy_binary.TRAILER)


def copy_into(url: str, query: psycopg.sql.Composed, frame: pl.DataFrame) -> int:
    """COPY ``frame`` on a connection of its own; a writer thread sends one block while the next is encoded.
    Returns the rows the server says it loaded."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(query, writer=QueuedLibpqWriter(cur)) as copy:
            copy_frame(copy, frame)
        return cur.rowcount


@dataclass(frozen=True)
class ShardCheck:
    """What validation needs of one shard: counted on the very rows sent, with the server's row count."""

    rows: int
    empty_lists: int
    length_mismatches: int
    non_finite_scores: int
    null_elements: int
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
        ).row(0, named=True)
        return cls(rows=rows_loaded, **counts, item_ids=frame["item_ids"].explode().drop_nulls().unique())


def _load_shard(url: str, batch_id: int, path: Path) -> ShardCheck:
    frame = pl.read_parquet(path)
    loaded = copy_into(url, sql.batch_query("copy_recs", batch_id), frame)
    return ShardCheck.of(frame, loaded)


# ShardCheck's counts of bad rows, and how a validation failure names them
_BAD_ROWS = {
    "empty_lists": "empty lists",
    "length_mismatches": "item/score length mismatches",
    "non_finite_scores": "rows with non-finite scores",
    "null_elements": "rows with null elements",
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


def switch_live(conn: psycopg.Connection, batch_id: int, action: str) -> SwitchResult:
    """Point ``live`` at the batch and notify the lookup services, in one transaction."""
    with conn.transaction():
        conn.execute(sql.query("lock_live"))
        row = conn.execute(sql.query("live_batch_id")).fetchone()
        previous = row[0] if row else None
        if previous is not None and previous != batch_id:
            conn.execute(sql.query("mark_batch_retired"), (previous,))
        conn.execute(sql.query("set_live"), (batch_id,))
        conn.execute(sql.query("mark_batch_live"), (batch_id,))
        conn.execute(sql.query("record_switch"), (batch_id, previous, action))
        conn.execute(sql.query("notify_live"), (sql.LIVE_CHANNEL, str(batch_id)))
    return SwitchResult(batch_id=batch_id, previous_batch_id=previous)


def drop_batch(conn: psycopg.Connection, batch_id: int, *, mark_dropped: bool = True) -> bool:
    """Drop a batch's table; a lookup still reading it holds the drop back for at most a few seconds.

    The batch's status is read again under the live lock, in the drop's transaction: a batch that
    became live (a rollback) or the canary since the caller chose it is left alone.
    """
    try:
        with conn.transaction():
            conn.execute(sql.query("set_drop_lock_timeout"))
            conn.execute(sql.query("lock_live"))
            status = conn.execute(sql.query("batch_status"), (batch_id,)).fetchone()
            if status is not None and status[0] in ("live", "canary"):
                logger.info("batch %d is %s now; not dropping it", batch_id, status[0])
                return False
            conn.execute(sql.batch_query("drop_recs_table", batch_id))
            if mark_dropped:
                conn.execute(sql.query("mark_batch_dropped"), (batch_id,))
    except psycopg.errors.LockNotAvailable:
        logger.warning("batch %d is still being read; its table will be dropped by a later publish", batch_id)
        return False
    return True


def _drop_listed(conn: psycopg.Connection, query: str, *params: object) -> list[int]:
    with conn.transaction():
        listed = [r[0] for r in conn.execute(sql.query(query), params)]
    return [b for b in listed if drop_batch(conn, b)]


def apply_retention(conn: psycopg.Connection, settings: Settings, logical_date: date, batch_id: int) -> list[int]:
    """Drop earlier batches of the same date, kept batches beyond the newest ``keep_batches``, and
    canaries' never-live batches beyond the newest ``keep_batches`` of those."""
    return (
        _drop_listed(conn, "same_date_batches", logical_date, batch_id)
        + _drop_listed(conn, "expired_batches", settings.keep_batches - 1)
        + _drop_listed(conn, "expired_candidate_batches", settings.keep_batches)
    )


def _apply_shadow_retention(
    conn: psycopg.Connection, settings: Settings, logical_date: date, batch_id: int
) -> list[int]:
    """Shadow batches have their own retention: a newer one of the same date replaces, the newest few are kept."""
    return _drop_listed(conn, "same_date_shadow_batches", logical_date, batch_id) + _drop_listed(
        conn, "expired_shadow_batches", settings.keep_batches
    )


def clean_orphans(conn: psycopg.Connection) -> list[int]:
    """Batches whose publish died mid-way (killed between COPY and switch): mark failed, drop their table."""
    orphans = [r[0] for r in conn.execute(sql.query("orphan_loading_batches"))]
    conn.commit()
    for batch_id in orphans:
        logger.warning("batch %d was left loading by a publish that died; dropping it", batch_id)
        conn.execute(sql.query("mark_batch_failed"), (None, "publish died before finishing", batch_id))
        conn.commit()
        drop_batch(conn, batch_id, mark_dropped=False)
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


def publish(
    settings: Settings,
    logical_date: date,
    make_live: bool | None = None,
    shadow: bool = False,
    model_id: str | None = None,
    accept_checks: str | None = None,
    accepted_by: str | None = None,
) -> PublishResult:
    """Publish the date's scores: production's, or with `model_id` those of that chosen model
    (``score.score(..., model_id=M)``): with `shadow`, as a batch that is never served; without, as a
    serving batch kept ready for a canary, never made live here. A chosen model's batch never records
    the date's monitoring, which is production's.

    `accept_checks`: the reason an operator accepts the date's failing checks (refused when empty), so
    that monitoring does not hold production's batch back; `accepted_by` who (default: this process's
    user at its host)."""
    chosen = model_id is not None
    if shadow and not chosen:
        raise ValueError("a shadow batch is of a chosen model: pass its model_id")
    if accept_checks is not None:
        accept_checks = outputs.given_reason(accept_checks)
        if chosen:
            raise outputs.AcceptanceError("failing checks are accepted for production's batch of a date only")
    manifests = score.read_manifests(settings, logical_date, model_id)
    files = [score.shard_path(settings, logical_date, m.shard, m.shards, model_id) for m in manifests]
    folder = settings.work_dir_for(logical_date)
    users_scored = sum(m.users for m in manifests)
    active_users = pl.scan_parquet(folder / "users.parquet").select(pl.len()).collect().item()
    fallback_items, fallback_scores = score.fallback(settings, logical_date)
    if not fallback_items:
        raise MissingDataError(f"no popular items to serve as the fallback list for {logical_date}")
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)["item_id"].to_list()
    model_id = manifests[0].model_id  # production's, or the chosen model's (its folder holds only its scores)
    generated_at = min(datetime.fromisoformat(m.generated_at) for m in manifests)
    url = database_url(settings)

    with connect(settings) as conn:
        upgrade(conn)
        clean_orphans(conn)
        batch_id = conn.execute(
            sql.query("insert_batch"),
            {
                "logical_date": logical_date,
                "model_id": model_id,
                "k": settings.top_k,
                "users_scored": users_scored,
                "active_users": active_users,
                "fallback_item_ids": fallback_items,
                "fallback_scores": fallback_scores,
                "generated_at": generated_at,
            },
        ).fetchone()[0]  # type: ignore[index]
        if chosen:
            conn.execute(sql.query("mark_batch_kind"), (SHADOW_BATCH if shadow else CANARY_BATCH, batch_id))
        conn.execute(sql.batch_query("create_recs_table", batch_id))
        conn.commit()
        logger.info("publish: batch %d for %s: loading %d shards", batch_id, logical_date, len(manifests))

        measured: dict[str, Any] | None = None
        accepted: outputs.Acceptance | None = None
        seconds: dict[str, float] = {}
        started = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal started
            now = time.perf_counter()
            seconds[name] = round(now - started, 3)
            started = now

        try:
            with ThreadPoolExecutor(max_workers=settings.publish_workers) as pool:
                shard_checks = list(pool.map(lambda path: _load_shard(url, batch_id, path), files))
            logger.info(
                "publish: batch %d: %d rows loaded; building the primary key",
                batch_id,
                sum(c.rows for c in shard_checks),
            )
            lap("load")
            try:
                with conn.transaction():
                    conn.execute(sql.batch_query("add_recs_primary_key", batch_id))
                    conn.execute(sql.batch_query("analyze_recs", batch_id))
            except psycopg.errors.UniqueViolation as error:
                raise BatchValidationError(
                    f"batch {batch_id}: duplicate user ids across shards ({error.diag.message_detail})"
                ) from error
            lap("primary_key")
            measured, problems = validate(shard_checks, fallback_items, users_scored, active_users, catalogue, settings)
            lap("validate")
            if problems:
                raise BatchValidationError(
                    f"batch {batch_id} for {logical_date} failed validation: {'; '.join(problems)}"
                )
            if chosen:
                # The date's monitoring record and alerts are production's: a chosen model's output
                # checks are kept with its batch only. They never hold a shadow back; they do hold back a
                # canary's batch, which real users would be served.
                measured["output"] = outputs.unrecorded_checks(settings, logical_date, batch_id, model_id)
                failed = [c["message"] for c in measured["output"]["checks"] if c["level"] == "fail"]
                if failed and not shadow:
                    raise BatchValidationError(
                        f"batch {batch_id} for {logical_date} (model {model_id}) failed output checks: "
                        + "; ".join(failed)
                    )
            else:
                accepted = outputs.check_batch(  # monitoring's publish gate
                    settings, logical_date, batch_id, model_id, accept_checks, accepted_by
                )
            lap("monitor")
        except Exception as error:
            conn.rollback()
            conn.execute(sql.query("mark_batch_failed"), (Jsonb(measured) if measured else None, str(error), batch_id))
            conn.commit()
            drop_batch(conn, batch_id, mark_dropped=False)
            raise

        if shadow:
            conn.execute(sql.query("mark_shadow_ready"), (jsonb(measured), batch_id))
            conn.commit()
            dropped = _apply_shadow_retention(conn, settings, logical_date, batch_id)
            return PublishResult(
                logical_date.isoformat(), batch_id, model_id, users_scored, False, "shadow batch", dropped, measured
            )
        conn.execute(sql.query("mark_batch_ready"), (jsonb(measured), batch_id))
        conn.commit()
        if chosen:
            # A canary's batch (kind 'candidate'): never live by publish, and it replaces none of the
            # date's batches (production's, kept for rollback).
            dropped = _drop_listed(conn, "expired_candidate_batches", settings.keep_batches)
            lap("switch")
            logger.info("publish: batch %d of model %s is ready for a canary", batch_id, model_id)
            return PublishResult(
                logical_date.isoformat(),
                batch_id,
                model_id,
                users_scored,
                False,
                f"scored with a chosen model ({model_id}): start a canary on it",
                dropped,
                measured,
                seconds,
            )
        # Decide and switch under the live lock: two dates published at once (a backfill with
        # several active runs) must not both see an older live batch and both go live.
        with conn.transaction():
            conn.execute(sql.query("lock_live"))
            go_live, reason = _should_go_live(conn, logical_date, make_live)
            if go_live:
                switched = switch_live(conn, batch_id, "publish")
        if go_live:
            logger.info("publish: batch %d is live (was %s)", batch_id, switched.previous_batch_id)
        else:
            logger.info("publish: batch %d is ready but not live: %s", batch_id, reason)
        dropped = apply_retention(conn, settings, logical_date, batch_id)
        lap("switch")
    logger.info("publish: batch %d: seconds %s", batch_id, seconds)
    return PublishResult(
        logical_date=logical_date.isoformat(),
        batch_id=batch_id,
        model_id=model_id,
        users=users_scored,
        live=go_live,
        reason=reason,
        dropped_batches=dropped,
        validation=measured,
        seconds=seconds,
        accepted=accepted,
    )


def publish_accepting_checks(
    settings: Settings,
    logical_date: date,
    reason: str,
    make_live: bool | None = None,
    accepted_by: str | None = None,
) -> PublishResult:
    """``overnight publish --accept-checks "why"``: publish the date's batch though monitoring fails
    it, accepting its failing checks for `reason`. A run of its own in the run history (one step,
    publish), so the acceptance shows beside the run that was blocked."""
    reason = outputs.given_reason(reason)
    with history.recording(settings, logical_date) as run_id, history.step(settings, run_id, "publish") as recorded:
        recorded.result = result = publish(
            settings, logical_date, make_live, accept_checks=reason, accepted_by=accepted_by
        )
    return result


def publish_model(
    settings: Settings, logical_date: date, model_id: str, shards: int | None = None, *, shadow: bool = False
) -> PublishResult:
    """Score the date with a chosen model, then publish it: a shadow batch, or (without `shadow`) a
    serving batch kept ready for a canary."""
    scored = score.score(settings, logical_date, shards, model_id=model_id)
    logger.info("%s of model %s: %s", "shadow" if shadow else "canary", model_id, score.summarise(scored))
    return publish(settings, logical_date, shadow=shadow, model_id=model_id)


def rollback(settings: Settings, to_batch: int | None = None) -> SwitchResult:
    """Point ``live`` back at the kept batch before it (or at ``to_batch``): instant, nothing is copied.

    The target's status is read under the live lock, in the switch's transaction: a canary started
    (or a retention run) at the same moment cannot make the batch both live and the canary. In the same
    transaction the batch's model becomes the registry's production model again (when it is registered),
    so the next night does not score with the model just rolled back from (a promoted canary's, or a
    weekly model's) and silently undo the rollback.
    """
    with connect(settings) as conn:
        upgrade(conn)
        with conn.transaction():
            conn.execute(sql.query("lock_live"))
            row = conn.execute(sql.query("live_batch_id")).fetchone()
            if row is None:
                raise MissingDataError("nothing is live, so there is nothing to roll back")
            current = row[0]
            if to_batch is None:
                target_row = conn.execute(sql.query("rollback_target"), (current,)).fetchone()
                if target_row is None:
                    raise MissingDataError(f"no kept batch before the live batch {current} to roll back to")
                to_batch = int(target_row[0])
            found = conn.execute(sql.query("batch_by_id"), (to_batch,)).fetchone()
            if found is None:
                raise MissingDataError(f"batch {to_batch} does not exist")
            status = found[3]
            if status not in ("ready", "retired", "live"):
                raise MissingDataError(
                    f"batch {to_batch} is {status}; only kept batches (ready or retired) can go live"
                )
            switched = switch_live(conn, to_batch, "rollback")
            model_id = found[2]
            if registry.model_by_id(conn, model_id) is None:
                logger.warning(
                    "rollback: model %s of batch %d is not registered; the registry is unchanged", model_id, to_batch
                )
                return switched
            previous_model = registry.make_production(conn, model_id, f"rollback to batch {to_batch}")
    result = replace(switched, model_id=model_id, previous_model_id=previous_model)
    logger.info("%s", result.summary())
    return result
