"""Canary rollouts: serve a published batch to a stable slice of users, then promote it or stop it. Each change
is a few rows of ``overnight.canary`` changed under the live lock, recorded and NOTIFYed like a publish; a
registered model's canary, which scores a batch first, is `jobs.rollouts.model_canary` (docs/rollouts.md#canary).
"""

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

import sql
from jobs import batches, registry
from jobs.database import connect, upgrade
from jobs.errors import MissingDataError, RolloutError
from jobs.settings import Settings
from sql.contract import SHADOW_BATCH

logger = logging.getLogger(__name__)

CANARY_STATUSES = ("ready", "retired")


def check_canary_batch(conn: psycopg.Connection, batch_id: int, production: int | None) -> None:
    with conn.cursor(row_factory=dict_row) as cur:
        batch = cur.execute(sql.query("batch_for_rollout"), (batch_id,)).fetchone()
    if batch is None:
        raise MissingDataError(f"batch {batch_id} does not exist")
    if batch["kind"] == SHADOW_BATCH:
        raise RolloutError(f"batch {batch_id} is a shadow batch: shadow batches are never served")
    if production is None:
        raise RolloutError("nothing is live: publish a production batch before starting a canary")
    if batch_id == production or batch["status"] == "live":
        raise RolloutError(f"batch {batch_id} is already live (production); a canary must be another batch")
    if batch["status"] not in (*CANARY_STATUSES, "canary"):
        raise RolloutError(
            f"batch {batch_id} is {batch['status']}; only a published batch (ready or retired) can be a canary"
        )
    if not batch["has_table"]:
        raise RolloutError(f"the table of batch {batch_id} was dropped; publish it again")
    with conn.cursor(row_factory=dict_row) as cur:
        live = cur.execute(sql.query("batch_by_id"), (production,)).fetchone()
    assert live is not None
    if batch["k"] < live["k"]:
        raise RolloutError(
            f"batch {batch_id} has k={batch['k']} but production serves k={live['k']}: "
            f"canary users asking for more than {batch['k']} items would be refused"
        )


def check_request(traffic: float, salt: str | None) -> None:
    if not 0.0 < traffic < 1.0:
        raise RolloutError(f"--traffic must be between 0 and 1 (exclusive), got {traffic:g}")
    if salt is not None and not salt.strip():
        raise RolloutError("--salt must not be empty")


def _check_ramp(running: dict[str, Any], traffic: float, allow_shrink: bool) -> None:
    """A ramp up keeps every canary user in the canary; a ramp down sends the users between the two
    shares back to production mid-experiment, so it must be asked for by name."""
    if traffic >= running["traffic"] or allow_shrink:
        return
    raise RolloutError(
        f"batch {running['batch_id']} is the canary for {running['traffic']:.2%} of users; lowering it to "
        f"{traffic:.2%} moves the users between the two shares ({running['traffic'] - traffic:.2%} of all users) "
        "back to production, so they change arm mid-experiment: pass --allow-shrink to do it anyway, "
        "or stop the canary with `overnight canary stop`"
    )


_NONE_RUNNING = (
    "no canary is running: start one with `overnight canary start batch B --traffic T` "
    "or `overnight canary start model M --traffic T`"
)


def already_running(running: dict[str, Any], also: str = "") -> RolloutError:
    return RolloutError(
        f"batch {running['batch_id']} is already the canary ({running['traffic']:.2%} of users): change its share "
        "with `overnight canary ramp --traffic T`, or stop it with `overnight canary stop` before starting "
        f"another{also}"
    )


def _serve(
    conn: psycopg.Connection, action: str, batch_id: int, traffic: float, salt: str, production: int | None
) -> batches.CanaryState:
    """Inside the caller's transaction, under the live lock, the batch checked: serve `batch_id` to the
    `traffic` share of users `salt` picks, mark the batch a canary, record `action` and tell the lookup
    services. A ramp updates the running row (same batch and salt), which keeps its start time."""
    conn.execute(sql.query("upsert_canary"), (batch_id, traffic, salt))
    conn.execute(sql.query("mark_batch_canary"), (batch_id,))
    conn.execute(sql.query("record_canary_event"), (action, batch_id, traffic, salt, production))
    batches.notify(conn, f"canary:{batch_id}")
    row = batches.canary_row(conn)
    assert row is not None and row["batch_id"] == batch_id
    return batches.canary_state(row, production)


def start_canary(settings: Settings, batch_id: int, traffic: float, salt: str | None = None) -> batches.CanaryState:
    """Serve `batch_id` to a `traffic` share of users beside production, as a new canary.

    Refused while a canary runs (`ramp_canary` changes its share, `stop_canary` ends it). Without a salt
    the canary gets a random one: a fresh slice of users.
    """
    check_request(traffic, salt)
    with connect(settings) as conn:
        upgrade(conn)
        with conn.transaction():
            conn.execute(sql.query("lock_live"))
            running = batches.canary_row(conn)
            if running is not None:
                raise already_running(running)
            production = batches.live_batch_id(conn)
            check_canary_batch(conn, batch_id, production)
            started = _serve(conn, "start", batch_id, traffic, salt or secrets.token_hex(8), production)
    logger.info("canary start: batch %d at %.2f%% of users", batch_id, traffic * 100)
    return started


def ramp_canary(settings: Settings, traffic: float, allow_shrink: bool = False) -> batches.CanaryState:
    """Change the running canary's share of users, whichever batch it serves now (a nightly refresh moves
    a model canary to a new batch each night). The salt stays, so a ramp up keeps every canary user in it;
    a ramp down moves users back to production and is refused unless `allow_shrink`."""
    check_request(traffic, None)
    with connect(settings) as conn:
        upgrade(conn)
        with conn.transaction():
            conn.execute(sql.query("lock_live"))
            running = batches.canary_row(conn)
            if running is None:
                raise RolloutError(_NONE_RUNNING)
            _check_ramp(running, traffic, allow_shrink)
            production = batches.live_batch_id(conn)
            check_canary_batch(conn, running["batch_id"], production)
            ramped = _serve(conn, "ramp", running["batch_id"], traffic, running["salt"], production)
    logger.info("canary ramp: batch %d at %.2f%% of users", ramped.batch_id, traffic * 100)
    return ramped


def _end_canary(conn: psycopg.Connection, action: str, none_running: str) -> tuple[dict[str, Any], int | None]:
    """Inside the caller's transaction, under the live lock: remove the running canary and record why."""
    conn.execute(sql.query("lock_live"))
    running = batches.canary_row(conn)
    if running is None:
        raise RolloutError(none_running)
    production = batches.live_batch_id(conn)
    conn.execute(sql.query("delete_canary"))
    conn.execute(
        sql.query("record_canary_event"),
        (action, running["batch_id"], running["traffic"], running["salt"], production),
    )
    return running, production


def stop_canary(settings: Settings) -> batches.CanaryState:
    """End the canary: every user gets production again; the batch stays kept (status 'ready')."""
    with connect(settings) as conn:
        upgrade(conn)
        with conn.transaction():
            running, production = _end_canary(conn, "stop", "no canary is running")
            conn.execute(sql.query("mark_canary_batch_ready"), (running["batch_id"],))
            batches.notify(conn, "canary:stop")
    logger.info("canary stopped: batch %d", running["batch_id"])
    return batches.canary_state(running, production)


@dataclass(frozen=True)
class Promotion:
    batch_id: int
    previous_batch_id: int | None
    model_id: str  # the promoted batch's model: the registry's production model from now on
    previous_model_id: str | None  # the registry's production model before
    model_changed: bool

    def summary(self) -> str:
        model = (
            f"model {self.model_id} is now the production model (was {self.previous_model_id})"
            if self.model_changed
            else f"production model stays {self.model_id}"
        )
        return f"canary batch {self.batch_id} is now production (was {self.previous_batch_id}); {model}"


def promote_canary(settings: Settings) -> Promotion:
    """Make the canary production for everyone, in one transaction with the switch of ``live`` and,
    when its model is not the registry's production model, the promotion of that model (the one it
    replaces retired), so the next nightly publish does not silently go back to the old model."""
    with connect(settings) as conn:
        upgrade(conn)
        with conn.transaction():
            running, _ = _end_canary(conn, "promote", _NONE_RUNNING)
            switched = batches.switch_live(conn, running["batch_id"], "promote")
            with conn.cursor(row_factory=dict_row) as cur:
                batch = cur.execute(sql.query("batch_for_rollout"), (switched.batch_id,)).fetchone()
            assert batch is not None
            previous_model = registry.make_production(
                conn, batch["model_id"], f"canary promotion of batch {switched.batch_id}"
            )
    promotion = Promotion(
        batch_id=switched.batch_id,
        previous_batch_id=switched.previous_batch_id,
        model_id=batch["model_id"],
        previous_model_id=previous_model,
        model_changed=previous_model != batch["model_id"],
    )
    logger.info("%s", promotion.summary())
    return promotion
