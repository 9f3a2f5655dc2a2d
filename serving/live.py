"""What the service knows about the live batch, and the task that keeps it current (LISTEN plus polling).

Requests read `LiveView.batch` once and use that snapshot throughout, so each answer comes from exactly
one batch even while a new one is swapped in.
"""

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql as pgsql

import sql
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)

WATCHER_APPLICATION_NAME = "overnight-serving-live"
_FIRST_BACKOFF_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class LiveBatch:
    batch_id: int
    model_id: str
    k: int
    generated_at: datetime
    switched_at: datetime
    fallback_item_ids: tuple[str, ...]
    fallback_scores: tuple[float, ...]
    # The batch's queries rendered once, so a lookup only binds the user id.
    recs_for_user: bytes
    recs_for_users: bytes

    def age_seconds(self, now: float | None = None) -> int:
        """Whole seconds since the batch was generated (never negative, even with clock skew)."""
        current = time.time() if now is None else now
        return max(0, int(current - self.generated_at.timestamp()))


async def read_live_batch(conn: psycopg.AsyncConnection[Any]) -> LiveBatch | None:
    cur = await conn.execute(sql.query("live_batch"))
    row = await cur.fetchone()
    if row is None:
        return None
    batch_id, model_id, k, generated_at, fallback_item_ids, fallback_scores, switched_at = row
    return LiveBatch(
        batch_id=batch_id,
        model_id=model_id,
        k=k,
        generated_at=generated_at.astimezone(UTC),
        switched_at=switched_at.astimezone(UTC),
        fallback_item_ids=tuple(fallback_item_ids),
        fallback_scores=tuple(fallback_scores),
        recs_for_user=sql.batch_query("recs_for_user", batch_id).as_bytes(None),
        recs_for_users=sql.batch_query("recs_for_users", batch_id).as_bytes(None),
    )


class LiveView:
    """The current live batch (None until one is read) and why it could not be read, if it could not."""

    def __init__(self) -> None:
        self.batch: LiveBatch | None = None
        self.problem: str | None = None
        # Reloads are serialised so that an older read can never overwrite a newer one.
        self._lock = asyncio.Lock()

    async def reload(self, conn: psycopg.AsyncConnection[Any]) -> LiveBatch | None:
        async with self._lock:
            self._swap(await read_live_batch(conn))
            return self.batch

    async def replace_stale(self, stale: LiveBatch, conn: psycopg.AsyncConnection[Any]) -> LiveBatch | None:
        """Reload because `stale` turned out to be gone, unless a concurrent reload already moved on."""
        async with self._lock:
            if self.batch is stale:
                self._swap(await read_live_batch(conn))
            return self.batch

    def _swap(self, batch: LiveBatch | None) -> None:
        previous = self.batch
        self.problem = None
        if batch is None:
            self.batch = None
            if previous is not None:
                logger.warning("no batch is live any more (was batch %d)", previous.batch_id)
        elif previous is None or (previous.batch_id, previous.switched_at) != (batch.batch_id, batch.switched_at):
            self.batch = batch
            logger.info(
                "serving batch %d (model %s, k=%d, generated %s)",
                batch.batch_id,
                batch.model_id,
                batch.k,
                batch.generated_at.isoformat(),
            )


class LiveWatcher:
    """Keeps a `LiveView` current: LISTENs on its own connection, re-reads on every NOTIFY and every
    `live_poll_seconds` (a missed NOTIFY costs at most that long), and reconnects with jittered back-off."""

    def __init__(self, settings: ServingSettings, view: LiveView) -> None:
        self.settings = settings
        self.view = view
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="overnight-live-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        backoff = _FIRST_BACKOFF_SECONDS
        while True:
            try:
                await self._listen()
            except Exception as error:
                reason = _reason(error)
                self.view.problem = f"cannot read the live pointer: {reason}"
                delay = backoff * random.uniform(0.5, 1.0)
                # Database trouble is expected now and then; anything else is a bug worth a traceback.
                expected = isinstance(error, psycopg.Error | OSError | TimeoutError)
                logger.warning("live watcher: %s; reconnecting in %.1f s", reason, delay, exc_info=not expected)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, max(self.settings.live_poll_seconds, _FIRST_BACKOFF_SECONDS))
            else:
                backoff = _FIRST_BACKOFF_SECONDS

    async def _listen(self) -> None:
        timeout = self.settings.db_timeout_seconds
        conn = await psycopg.AsyncConnection.connect(
            self.settings.database_url,
            autocommit=True,
            connect_timeout=max(2, round(timeout)),
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
            await asyncio.wait_for(self.view.reload(conn), timeout)
            while True:
                async for _ in conn.notifies(timeout=self.settings.live_poll_seconds, stop_after=1):
                    pass
                await asyncio.wait_for(self.view.reload(conn), timeout)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
