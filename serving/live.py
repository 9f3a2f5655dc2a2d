"""What the service serves (the live batch and, while one runs, the canary), and the task that keeps it current
(LISTEN plus polling). A request reads `LiveView.rollout` once, so each answer comes from exactly one batch.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql as pgsql

import sql
from common.text import first_line
from serving.catalogue import Catalogue, load_catalogue
from serving.settings import ServingSettings
from serving.variants import CANARY, PRODUCTION, TrafficSplit, Variant

logger = logging.getLogger(__name__)

WATCHER_APPLICATION_NAME = "overnight-serving-live"
# `LiveView.problem` while the pointer cannot be read: shown to clients (X-Stale, 503s); the cause is logged.
LIVE_POINTER_UNREADABLE = "live_pointer_unreadable"
_FIRST_BACKOFF_SECONDS = 0.5
# Reading a new batch's catalogue (every item and its attributes) may take longer than a lookup's
# deadline; the live pointer itself is read within that deadline.
CATALOGUE_LOAD_SECONDS = 60.0
# The per-id lists a lookup reads from a batch: users' lists, items' neighbour lists, users' lists with their
# reasons (`?explain=true`).
Table = Literal["recs", "similar", "explained"]


# eq=False: a batch is compared and hashed by identity (cheap, and each read is its own snapshot).
@dataclass(frozen=True, slots=True, eq=False)
class LiveBatch:
    batch_id: int
    model_id: str
    k: int
    generated_at: datetime
    switched_at: datetime
    fallback_item_ids: tuple[str, ...]
    fallback_scores: tuple[float, ...]
    # Rendered once per batch, so a lookup only binds the user ids and copies the text.
    recs_for_users: bytes
    generated_at_text: str
    # Neighbours per item; None for a batch published before similar items (it has no extra tables).
    similar_k: int | None = None
    # The user attribute its segments come from; None: no segments.
    segment_attribute: str | None = None
    # Its items, attributes and segments' lists, held while the batch is served (None: no extras).
    catalogue: Catalogue | None = None
    similar_for_items: bytes | None = None
    recs_and_segments_for_users: bytes | None = None
    # Users' lists with their reasons; None for a batch published without them.
    explained_recs_for_users: bytes | None = None

    def age_seconds(self, now: float | None = None) -> int:
        """Whole seconds since the batch was generated (never negative, even with clock skew)."""
        current = time.time() if now is None else now
        return max(0, int(current - self.generated_at.timestamp()))

    def rows_query(self, table: Table, ids: list[str]) -> tuple[bytes, Sequence[Any] | Mapping[str, Any]]:
        """The statement and parameters that read `ids`' rows of `table` in one round trip: a user the
        batch did not score comes back with their segment when the batch has segments."""
        if table == "similar":
            assert self.similar_for_items is not None, "a batch without similar items has no neighbour lists"
            return self.similar_for_items, (ids,)
        if table == "explained":
            assert self.explained_recs_for_users is not None, "a batch published without reasons has none to read"
            if self.recs_and_segments_for_users is not None:
                return self.explained_recs_for_users, {"user_ids": ids}
            return self.explained_recs_for_users, (ids,)
        if self.recs_and_segments_for_users is not None:
            return self.recs_and_segments_for_users, {"user_ids": ids}
        return self.recs_for_users, (ids,)


def live_batch_from_row(
    batch_id: int,
    model_id: str,
    k: int,
    generated_at: datetime,
    fallback_item_ids: list[str],
    fallback_scores: list[float],
    switched_at: datetime,
    similar_k: int | None = None,
    segment_attribute: str | None = None,
    catalogue: Catalogue | None = None,
    explained: bool = False,
) -> LiveBatch:
    generated = generated_at.astimezone(UTC)
    extras = similar_k is not None
    segments = extras and segment_attribute is not None
    explained_query = "explained_recs_and_segments_for_users" if segments else "explained_recs_for_users"
    return LiveBatch(
        batch_id=batch_id,
        model_id=model_id,
        k=k,
        generated_at=generated,
        switched_at=switched_at.astimezone(UTC),
        fallback_item_ids=tuple(fallback_item_ids),
        fallback_scores=tuple(fallback_scores),
        recs_for_users=sql.batch_query("recs_for_users", batch_id).as_bytes(None),
        generated_at_text=generated.isoformat().replace("+00:00", "Z"),
        similar_k=similar_k,
        segment_attribute=segment_attribute if segments else None,
        catalogue=catalogue,
        similar_for_items=sql.batch_query("similar_for_items", batch_id).as_bytes(None) if extras else None,
        recs_and_segments_for_users=(
            sql.batch_query("recs_and_segments_for_users", batch_id).as_bytes(None) if segments else None
        ),
        explained_recs_for_users=sql.batch_query(explained_query, batch_id).as_bytes(None) if explained else None,
    )


@dataclass(frozen=True, slots=True)
class Canary:
    batch: LiveBatch
    split: TrafficSplit


@dataclass(frozen=True, slots=True)
class Rollout:
    """What is served: production and, while one runs, the canary. A lookup takes one snapshot of it."""

    production: LiveBatch
    canary: Canary | None = None

    def route(self, user_id: str) -> tuple[Variant, LiveBatch]:
        """The arm of this user and the batch that answers them (one hash, and only while a canary runs)."""
        canary = self.canary
        if canary is not None and canary.split.variant(user_id) == CANARY:
            return CANARY, canary.batch
        return PRODUCTION, self.production


async def read_rollout(
    conn: psycopg.AsyncConnection[Any], known: Rollout | None = None, timeout: float | None = None
) -> Rollout | None:
    """Production and canary as the database has them now, read in one statement (one snapshot, so a
    promote or stop is seen whole); None while nothing is live.

    A batch's catalogue is read when the batch is new to `known` (what is served now), and taken over
    from `known` otherwise: a batch's tables never change, and reading 50,000 items takes a while.
    A canary without a live production batch is not served: every user needs a production answer.
    `timeout` bounds the pointer's read; a catalogue's, CATALOGUE_LOAD_SECONDS.
    """
    cur = await asyncio.wait_for(conn.execute(sql.query("serving_batches")), timeout)
    rows = await cur.fetchall()
    production: LiveBatch | None = None
    canary: Canary | None = None
    held = {} if known is None else {batch.batch_id: batch.catalogue for batch in _batches(known)}
    for (
        variant,
        batch_id,
        model_id,
        k,
        generated_at,
        fallback_item_ids,
        fallback_scores,
        switched_at,
        similar_k,
        segment_attribute,
        explained,
        traffic,
        salt,
    ) in rows:
        catalogue = held.get(batch_id)
        if catalogue is None and similar_k is not None:
            load = load_catalogue(conn, batch_id, with_segments=segment_attribute is not None)
            catalogue = await asyncio.wait_for(load, CATALOGUE_LOAD_SECONDS)
        batch = live_batch_from_row(
            batch_id,
            model_id,
            k,
            generated_at,
            fallback_item_ids,
            fallback_scores,
            switched_at,
            similar_k,
            segment_attribute,
            catalogue,
            explained,
        )
        if variant == PRODUCTION:
            production = batch
        else:
            canary = Canary(batch=batch, split=TrafficSplit(salt, traffic))
    if production is None:
        return None
    return Rollout(production=production, canary=canary)


def _batches(rollout: Rollout) -> list[LiveBatch]:
    return [rollout.production] + ([] if rollout.canary is None else [rollout.canary.batch])


class LiveView:
    """What is served now (None until it is read) and, as a reason code, why it could not be read.

    `batch` is the production batch; `rollout` adds the canary. Both are replaced, never changed, so a
    reader that took them once has a consistent snapshot.
    """

    def __init__(self) -> None:
        self.batch: LiveBatch | None = None
        self.rollout: Rollout | None = None
        self.problem: str | None = None
        # Reloads are serialised so that an older read can never overwrite a newer one.
        self._lock = asyncio.Lock()

    async def reload(self, conn: psycopg.AsyncConnection[Any], timeout: float | None = None) -> Rollout | None:
        async with self._lock:
            self._swap(await read_rollout(conn, self.rollout, timeout))
            return self.rollout

    async def replace_stale(self, stale: LiveBatch, conn: psycopg.AsyncConnection[Any]) -> Rollout | None:
        """Reload because `stale` turned out to be gone, unless a concurrent reload already moved on;
        the rollout after it (route again with it: `stale` may have been either arm's batch)."""
        async with self._lock:
            rollout = self.rollout
            if rollout is not None and (
                rollout.production is stale or (rollout.canary is not None and rollout.canary.batch is stale)
            ):
                self._swap(await read_rollout(conn, rollout))
            return self.rollout

    def _swap(self, rollout: Rollout | None) -> None:
        previous = self.rollout
        self.problem = None
        if rollout is None:
            self.batch = self.rollout = None
            if previous is not None:
                logger.warning("no batch is live any more (was batch %d)", previous.production.batch_id)
            return
        # Keep the objects of batches that did not change: lookups waiting on one stay valid.
        production = _same_or_new(None if previous is None else previous.production, rollout.production)
        canary = rollout.canary
        if canary is not None:
            before = None if previous is None or previous.canary is None else previous.canary.batch
            canary = Canary(batch=_same_or_new(before, canary.batch), split=canary.split)
        if previous is not None and production is previous.production and _same_canary(previous.canary, canary):
            return
        self.rollout = Rollout(production=production, canary=canary)
        self.batch = production
        if previous is None or production is not previous.production:
            logger.info(
                "serving batch %d (model %s, k=%d, generated %s)",
                production.batch_id,
                production.model_id,
                production.k,
                production.generated_at.isoformat(),
            )
        if not _same_canary(None if previous is None else previous.canary, canary):
            if canary is None:
                logger.info("no canary any more: every user gets batch %d", production.batch_id)
            else:
                logger.info(
                    "canary: batch %d for %.4g%% of users (salt %r)",
                    canary.batch.batch_id,
                    100 * canary.split.traffic,
                    canary.split.salt,
                )


def _same_or_new(previous: LiveBatch | None, current: LiveBatch) -> LiveBatch:
    if previous is not None and (previous.batch_id, previous.switched_at) == (current.batch_id, current.switched_at):
        return previous
    return current


def _same_canary(previous: Canary | None, current: Canary | None) -> bool:
    if previous is None or current is None:
        return previous is current
    return previous.batch is current.batch and (previous.split.salt, previous.split.traffic) == (
        current.split.salt,
        current.split.traffic,
    )


class LiveWatcher:
    """Keeps a `LiveView` current: LISTENs on its own connection, re-reads on every NOTIFY and every
    `live_poll_seconds` (a missed NOTIFY costs at most that long), and reconnects with jittered back-off."""

    def __init__(self, settings: ServingSettings, view: LiveView) -> None:
        self.settings = settings
        self.view = view
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._backoff = _FIRST_BACKOFF_SECONDS

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="overnight-live-watcher")

    async def first_read(self) -> None:
        """Wait until the pointer has been read once, or the first attempt failed (at most as long as
        that attempt may take). A worker then starts with the live batch loaded: with several workers on
        one port, one worker's /readyz says nothing of the others, which would answer 503 meanwhile."""
        timeout = self.settings.db_timeout_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), _connect_timeout(timeout) + 2 * timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        while True:
            try:
                await self._listen()
            except Exception as error:
                reason = first_line(error)
                self.view.problem = LIVE_POINTER_UNREADABLE
                self._first_attempt.set()
                delay = self._backoff * random.uniform(0.5, 1.0)
                # Database trouble is expected now and then; anything else is a bug worth a traceback.
                expected = isinstance(error, psycopg.Error | OSError | TimeoutError)
                logger.warning("live watcher: %s; reconnecting in %.1f s", reason, delay, exc_info=not expected)
                await asyncio.sleep(delay)
                self._backoff = min(self._backoff * 2, max(self.settings.live_poll_seconds, _FIRST_BACKOFF_SECONDS))

    async def _listen(self) -> None:
        timeout = self.settings.db_timeout_seconds
        conn = await psycopg.AsyncConnection.connect(
            self.settings.database_url,
            autocommit=True,
            connect_timeout=_connect_timeout(timeout),
            application_name=WATCHER_APPLICATION_NAME,
            # A silently dead peer would otherwise leave the LISTEN waiting forever.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        async with conn:
            listen = pgsql.SQL("LISTEN {}").format(pgsql.Identifier(sql.LIVE_CHANNEL))
            await asyncio.wait_for(conn.execute(listen), timeout)
            # Read after LISTEN: a switch committed in between is then seen by this read or notified.
            await self.view.reload(conn, timeout)
            self._first_attempt.set()
            # Back and current: the next lost connection starts over from the first back-off. (`_listen`
            # only ever ends by raising, so `run` cannot tell a long-lived connection from a failed attempt.)
            self._backoff = _FIRST_BACKOFF_SECONDS
            while True:
                async for _ in conn.notifies(timeout=self.settings.live_poll_seconds, stop_after=1):
                    pass
                await self.view.reload(conn, timeout)


def _connect_timeout(db_timeout: float) -> int:
    return max(2, round(db_timeout))  # libpq takes whole seconds, and less than 2 is not honoured
