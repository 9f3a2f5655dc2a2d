"""Published batches as Postgres holds them: what is live, the canary beside it, and the few writes that need no
scoring (switching the live pointer, rolling back, dropping a batch's table). Operator commands and the freshness
DAG come here, never to a step module, so they load no data or model library.
"""

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

import sql
from jobs import registry
from jobs.database import connect, upgrade
from jobs.errors import MissingDataError
from jobs.settings import Settings

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class CanaryState:
    batch_id: int
    traffic: float
    salt: str
    started_at: str
    updated_at: str
    production_batch_id: int | None

    def summary(self) -> str:
        return (
            f"canary batch {self.batch_id} serves {self.traffic:.2%} of users (salt {self.salt!r}); "
            f"production is batch {self.production_batch_id}"
        )


def canary_row(conn: psycopg.Connection) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.query("canary_state")).fetchone()


def live_status(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The live batch with its date, model, size, active users and age, or None before the first publish."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.query("live_status")).fetchone()


def live_batch_id(conn: psycopg.Connection) -> int | None:
    row = conn.execute(sql.query("live_batch_id")).fetchone()
    return int(row[0]) if row else None


def canary_state(row: dict[str, Any], production: int | None) -> CanaryState:
    def iso(value: datetime) -> str:
        return value.isoformat()

    return CanaryState(
        batch_id=row["batch_id"],
        traffic=row["traffic"],
        salt=row["salt"],
        started_at=iso(row["started_at"]),
        updated_at=iso(row["updated_at"]),
        production_batch_id=production,
    )


def notify(conn: psycopg.Connection, what: str) -> None:
    conn.execute(sql.query("notify_live"), (sql.LIVE_CHANNEL, what))


def running_canary(conn: psycopg.Connection) -> CanaryState | None:
    """The canary being served, with the production batch beside it; None when there is none."""
    running = canary_row(conn)
    return canary_state(running, live_batch_id(conn)) if running else None


def canary_status(settings: Settings, history: int = 10) -> dict[str, Any]:
    """The running canary (or None) and its latest history."""
    with connect(settings) as conn:
        upgrade(conn)
        running = running_canary(conn)
        production = live_batch_id(conn)
        conn.commit()
        with conn.cursor(row_factory=dict_row) as cur:
            events = cur.execute(sql.query("canary_history"), (history,)).fetchall()
    return {
        "canary": running.__dict__ if running else None,
        "production_batch_id": production,
        "history": [{**event, "happened_at": event["happened_at"].isoformat()} for event in events],
    }
