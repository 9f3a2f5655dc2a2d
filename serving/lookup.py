"""The hot path: one live-batch snapshot, one pooled round trip per lookup, the fallback for unknown users.

Every database wait is bounded by ``db_timeout_seconds``: checkout, query and the retry after a batch
table vanished all share one deadline, and running out of it is a `DatabaseUnavailableError`.
"""

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

import sql
from serving.errors import DatabaseUnavailableError, InvalidRequestError, NoLiveBatchError
from serving.live import LiveBatch, LiveView, read_live_batch
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)

POOL_APPLICATION_NAME = "overnight-serving"
DEFAULT_K = 10
# Only one model serves today; a canary slice would answer with its own variant name.
PRODUCTION_VARIANT = "production"

Source = Literal["personalized", "fallback"]
Loc = tuple[str | int, ...]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UserRecs:
    user_id: str
    item_ids: list[str]
    scores: list[float]
    source: Source


def create_pool(settings: ServingSettings) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """The lookup pool, not yet open. Autocommit, so a lookup is one round trip with no COMMIT after it."""
    statement_timeout_ms = str(max(1, round(settings.db_timeout_seconds * 1000)))

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # Server side too, so an abandoned query stops using Postgres when the client gives up on it.
        await conn.execute(sql.query("serving_session"), (statement_timeout_ms,))

    return AsyncConnectionPool(
        settings.database_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs={
            "autocommit": True,
            "application_name": POOL_APPLICATION_NAME,
            "connect_timeout": max(2, round(settings.db_timeout_seconds)),
        },
        configure=configure,
        timeout=settings.db_timeout_seconds,
        open=False,
        name=POOL_APPLICATION_NAME,
    )


class Lookup:
    def __init__(
        self,
        settings: ServingSettings,
        view: LiveView,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    ) -> None:
        self.settings = settings
        self.view = view
        self.pool = pool

    def live(self) -> LiveBatch:
        batch = self.view.batch
        if batch is None:
            if self.view.problem:
                raise NoLiveBatchError(f"no live batch loaded: {self.view.problem}")
            raise NoLiveBatchError("no batch is live yet")
        return batch

    async def recommend(self, user_id: str, k: int | None, exclude: frozenset[str]) -> tuple[LiveBatch, UserRecs]:
        self._check_user_id(user_id, ("path", "user_id"))
        self._check_exclude(exclude, ("query", "exclude"))
        batch = self.live()
        k = self._resolve_k(k, batch, ("query", "k"))
        batch, row = await self._within_deadline(self._fetch_one(batch, user_id))
        if row is None:
            return batch, _pick(user_id, batch.fallback_item_ids, batch.fallback_scores, "fallback", k, exclude)
        return batch, _pick(user_id, row[0], row[1], "personalized", k, exclude)

    async def recommend_many(
        self, user_ids: Sequence[str], k: int | None, exclude: frozenset[str]
    ) -> tuple[LiveBatch, list[UserRecs]]:
        if len(user_ids) > self.settings.max_batch_users:
            raise InvalidRequestError(
                ("body", "user_ids"),
                f"at most {self.settings.max_batch_users} user ids per request, got {len(user_ids)}",
            )
        for index, user_id in enumerate(user_ids):
            self._check_user_id(user_id, ("body", "user_ids", index))
        self._check_exclude(exclude, ("body", "exclude"))
        batch = self.live()
        k = self._resolve_k(k, batch, ("body", "k"))
        batch, rows = await self._within_deadline(self._fetch_many(batch, list(dict.fromkeys(user_ids))))
        results = []
        for user_id in user_ids:
            found = rows.get(user_id)
            if found is None:
                results.append(_pick(user_id, batch.fallback_item_ids, batch.fallback_scores, "fallback", k, exclude))
            else:
                results.append(_pick(user_id, found[0], found[1], "personalized", k, exclude))
        return batch, results

    async def ping(self) -> LiveBatch | None:
        """What the database says is live, read through the lookup pool (readiness)."""

        async def read() -> LiveBatch | None:
            async with self.pool.connection() as conn:
                return await read_live_batch(conn)

        return await self._within_deadline(read())

    async def _fetch_one(
        self, batch: LiveBatch, user_id: str
    ) -> tuple[LiveBatch, tuple[list[str], list[float]] | None]:
        async with self.pool.connection() as conn:
            try:
                cur = await conn.execute(batch.recs_for_user, (user_id,))
            except pgerrors.UndefinedTable:
                batch = await self._replace_dropped(batch, conn)
                cur = await conn.execute(batch.recs_for_user, (user_id,))
            return batch, await cur.fetchone()

    async def _fetch_many(
        self, batch: LiveBatch, user_ids: list[str]
    ) -> tuple[LiveBatch, dict[str, tuple[list[str], list[float]]]]:
        async with self.pool.connection() as conn:
            try:
                cur = await conn.execute(batch.recs_for_users, (user_ids,))
            except pgerrors.UndefinedTable:
                batch = await self._replace_dropped(batch, conn)
                cur = await conn.execute(batch.recs_for_users, (user_ids,))
            return batch, {user_id: (item_ids, scores) for user_id, item_ids, scores in await cur.fetchall()}

    async def _replace_dropped(self, batch: LiveBatch, conn: psycopg.AsyncConnection[Any]) -> LiveBatch:
        # The batch we hold was dropped after a switch we have not heard of yet (a missed NOTIFY):
        # read the pointer now instead of waiting for the next poll.
        fresh = await self.view.replace_stale(batch, conn)
        if fresh is None:
            raise NoLiveBatchError("no batch is live yet")
        if fresh.batch_id == batch.batch_id:
            raise DatabaseUnavailableError(f"the table of live batch {batch.batch_id} is missing")
        logger.info("batch %d was dropped under a lookup; retrying on batch %d", batch.batch_id, fresh.batch_id)
        return fresh

    async def _within_deadline(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work`, but give up after ``db_timeout_seconds`` without waiting for its clean-up.

        Cancelling a psycopg query waits for the server to confirm the cancel; with a dead network that
        can take many seconds, so the cancelled task finishes in the background instead.
        """
        timeout = self.settings.db_timeout_seconds
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_forget)
            raise DatabaseUnavailableError(f"the database did not answer within {timeout:g} s")
        try:
            return task.result()
        except PoolTimeout:
            raise DatabaseUnavailableError(f"no database connection free within {timeout:g} s") from None
        except pgerrors.QueryCanceled:
            raise DatabaseUnavailableError(f"the database query took longer than {timeout:g} s") from None
        except psycopg.OperationalError as error:
            raise DatabaseUnavailableError(f"database unavailable: {_first_line(error)}") from None
        except psycopg.Error as error:
            logger.exception("lookup failed in the database")
            raise DatabaseUnavailableError(f"database error: {type(error).__name__}") from None

    def _check_user_id(self, user_id: str, loc: Loc) -> None:
        if len(user_id) > self.settings.max_user_id_length:
            raise InvalidRequestError(loc, f"user id is longer than {self.settings.max_user_id_length} characters")
        if not user_id:
            raise InvalidRequestError(loc, "user id is empty")
        # Postgres text cannot hold NUL or unpaired surrogates: such an id cannot be in any batch.
        if "\x00" in user_id:
            raise InvalidRequestError(loc, "user id contains a NUL character")
        if not user_id.isascii():
            try:
                user_id.encode()
            except UnicodeEncodeError:
                raise InvalidRequestError(loc, "user id is not valid Unicode text") from None

    def _check_exclude(self, exclude: frozenset[str], loc: Loc) -> None:
        if len(exclude) > self.settings.max_exclude_items:
            raise InvalidRequestError(
                loc, f"at most {self.settings.max_exclude_items} excluded items, got {len(exclude)}"
            )

    @staticmethod
    def _resolve_k(k: int | None, batch: LiveBatch, loc: Loc) -> int:
        if k is None:
            return min(DEFAULT_K, batch.k)
        if not 1 <= k <= batch.k:
            raise InvalidRequestError(
                loc, f"k must be between 1 and {batch.k} (the k of live batch {batch.batch_id})", k
            )
        return k


def _pick(
    user_id: str,
    item_ids: Sequence[str],
    scores: Sequence[float],
    source: Source,
    k: int,
    exclude: frozenset[str],
) -> UserRecs:
    if not exclude:
        return UserRecs(user_id, list(item_ids[:k]), list(scores[:k]), source)
    # Exclude before cutting to k, so excluded items leave room for the next ones in rank order.
    kept_items: list[str] = []
    kept_scores: list[float] = []
    for item_id, score in zip(item_ids, scores, strict=False):
        if item_id not in exclude:
            kept_items.append(item_id)
            kept_scores.append(score)
            if len(kept_items) == k:
                break
    return UserRecs(user_id, kept_items, kept_scores, source)


def _forget(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("abandoned lookup ended with %r", task.exception())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
