"""A canary of a registered model: score a date with it into a batch that does not go live and serve
that batch to a share of users (`start_model_canary`); `refresh_canary` moves the canary to each night's
date. The canary's state changes themselves are `jobs.rollouts.canary`'s."""

import logging
from dataclasses import dataclass, replace
from datetime import date

from psycopg.rows import dict_row

import sql
from jobs import batches
from jobs.database import connect, upgrade
from jobs.errors import FutureModelError, RolloutError, UnfitCandidatesError
from jobs.outcome import Outcome
from jobs.rollouts import canary
from jobs.settings import Settings
from jobs.steps import publish, score

logger = logging.getLogger(__name__)


def start_model_canary(
    settings: Settings,
    model_id: str,
    traffic: float,
    logical_date: date | None = None,
    salt: str | None = None,
    shards: int | None = None,
) -> batches.CanaryState:
    """Canary a registered model: score `logical_date` (default: the live batch's date) with it into a
    new batch that does not go live, then serve that batch to a `traffic` share of users.

    The batch is of that one date; the nightly DAG moves the canary to each new night's batch of the
    model (`refresh_canary`), and `overnight canary refresh` does it by hand.
    """
    canary.check_request(traffic, salt)
    with connect(settings) as conn:
        upgrade(conn)
        running = batches.canary_row(conn)
        with conn.cursor(row_factory=dict_row) as cur:
            live = cur.execute(sql.query("live_status")).fetchone()
    if running is not None:  # before minutes of scoring; `start_canary` checks again under the live lock
        raise canary.already_running(running, " (`overnight canary refresh` renews its lists for the same users)")
    if live is None:
        raise RolloutError("nothing is live: publish a production batch before starting a canary")
    day = logical_date or live["logical_date"]
    try:
        score.score(settings, day, shards, model_id=model_id)
    except FutureModelError as error:
        if error.trained_for is None:
            raise
        raise FutureModelError(
            f"{error}; canary it on a date it may score: "
            f"`overnight canary start model {model_id} --traffic {traffic} --date {error.trained_for}`",
            error.trained_for,
        ) from None
    published = publish.publish_canary_batch(settings, day, model_id)
    return canary.start_canary(settings, published.batch_id, traffic, salt)


@dataclass(frozen=True)
class CanaryRefresh:
    """What `refresh_canary` did: moved the canary to a batch of the date, or why not."""

    logical_date: str
    refreshed: bool
    reason: str
    canary_model: str | None = None
    canary_batch: int | None = None  # the batch the canary serves now
    previous_canary_batch: int | None = None

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), batch_id=self.canary_batch, model_id=self.canary_model, production=False)

    def summary(self) -> str:
        if not self.refreshed:
            return f"canary not refreshed for {self.logical_date}: {self.reason}"
        return (
            f"canary refreshed: batch {self.canary_batch} (model {self.canary_model}, {self.logical_date}) "
            f"replaces batch {self.previous_canary_batch} for the same users"
        )


def refresh_canary(settings: Settings, logical_date: date | None = None, shards: int | None = None) -> CanaryRefresh:
    """Score `logical_date` (default: the live batch's date) with the running canary's model and move the
    canary to that batch, keeping its salt and traffic. The nightly DAG calls it after publish.

    Nothing is done (and `refreshed` is False, with the reason) when no canary runs, when its batch is
    of that date or a later one, when its model is production's (the lists would be production's), or
    when the date is newer than production's (the arms would be compared on lists of different days).
    The scoring takes minutes; if the canary was stopped, promoted or replaced meanwhile, the new batch
    is kept ready and the canary is left as it is.
    """
    with connect(settings) as conn:
        upgrade(conn)
        running = batches.canary_row(conn)
        with conn.cursor(row_factory=dict_row) as cur:
            live = cur.execute(sql.query("live_status")).fetchone()
            current = (
                cur.execute(sql.query("batch_for_rollout"), (running["batch_id"],)).fetchone() if running else None
            )
    day = logical_date or (live["logical_date"] if live else None)
    when = day.isoformat() if day else "the live date"
    if running is None or current is None:
        return CanaryRefresh(when, False, "no canary is running")
    if live is None or day is None:
        return CanaryRefresh(when, False, "nothing is live")
    skipped = CanaryRefresh(when, False, "", current["model_id"], current["batch_id"])
    if current["logical_date"] >= day:
        return replace(skipped, reason=f"canary batch {current['batch_id']} is of {current['logical_date']} already")
    if current["model_id"] == live["model_id"]:
        return replace(
            skipped,
            reason=f"the canary's model {current['model_id']} is production's: its lists would be production's",
        )
    if day > live["logical_date"]:
        return replace(
            skipped,
            reason=f"production serves {live['logical_date']}: a canary of {day} would be compared on newer lists",
        )
    try:
        score.score(settings, day, shards, model_id=current["model_id"])
    except UnfitCandidatesError as error:
        return replace(skipped, reason=str(error))
    published = publish.publish_canary_batch(settings, day, current["model_id"])
    with connect(settings) as conn:
        with conn.transaction():
            conn.execute(sql.query("lock_live"))
            now_running = batches.canary_row(conn)
            if now_running is None or now_running["batch_id"] != current["batch_id"]:
                changed = "stopped" if now_running is None else f"moved to batch {now_running['batch_id']}"
                return replace(
                    skipped,
                    canary_batch=None if now_running is None else now_running["batch_id"],
                    reason=f"the canary was {changed} while {day} was scored; batch {published.batch_id} is kept ready",
                )
            production = batches.live_batch_id(conn)
            canary.check_canary_batch(conn, published.batch_id, production)
            conn.execute(
                sql.query("move_canary_to_batch"),
                {"batch_id": published.batch_id, "previous_batch_id": current["batch_id"]},
            )
            conn.execute(sql.query("mark_batch_canary"), (published.batch_id,))
            conn.execute(sql.query("mark_canary_batch_ready"), (current["batch_id"],))
            conn.execute(
                sql.query("record_canary_event"),
                ("refresh", published.batch_id, now_running["traffic"], now_running["salt"], production),
            )
            batches.notify(conn, f"canary:{published.batch_id}")
        # Replaced, as a re-run's batch replaces the one before: kept, it would take a place among the
        # batches retention keeps for rollback every night. (Still being read, it is dropped by a later
        # publish; rollback never picks a canary that was never live.)
        batches.drop_batch(conn, current["batch_id"])
    refreshed = CanaryRefresh(
        when,
        True,
        f"scored {day} with model {current['model_id']}; batch {current['batch_id']} is dropped",
        current["model_id"],
        published.batch_id,
        current["batch_id"],
    )
    logger.info("%s", refreshed.summary())
    return refreshed
