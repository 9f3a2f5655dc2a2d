"""The hot path: one live-batch snapshot, a bounded cache, at most one pooled round trip per lookup.

A lookup first asks the cache, keyed by (batch id, user id) so that a batch switch invalidates it by
construction. Misses do not each take a connection: concurrent misses are coalesced, and every database
trip answers all users waiting at that moment with one ``user_id = ANY(...)`` query. With little load a
trip carries one user and costs what a single query does; under load a trip carries many.

Every database wait is bounded by ``db_timeout_seconds``: checkout and query share one deadline, and
running out of it is a `DatabaseUnavailableError`. A lookup that finds the table of its batch gone (a
switch or canary refresh whose NOTIFY has not arrived) reloads the rollout, routes its users again and
makes one more trip, with a deadline of its own.
"""

import asyncio
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

import orjson
import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

import sql
from serving.errors import (
    DatabaseUnavailableError,
    InvalidRequestError,
    NoLiveBatchError,
    ServingError,
    first_line,
)
from serving.live import LiveBatch, LiveView, Rollout, read_rollout
from serving.settings import ServingSettings
from serving.variants import CANARY, PRODUCTION

logger = logging.getLogger(__name__)

POOL_APPLICATION_NAME = "overnight-serving"
DEFAULT_K = 10
Source = Literal["personalized", "fallback"]
Loc = tuple[str | int, ...]
T = TypeVar("T")
# A user's published list as the cache holds it: the item ids joined by NUL (which Postgres text cannot
# hold) into one string, and the scores packed as doubles into bytes. Neither is a container the
# garbage collector tracks or traverses: 50,000 cached lists of tracked objects made every full pass
# a stall of tens of milliseconds under load, and even tuples of floats, untracked after their first
# pass, cost a 25-30 ms young collection every few seconds. One string instead of fifty ids also takes
# a fifth of the memory, and joining costs a tenth of interning the ids one by one (10 µs a row under
# load). A lookup splits off only the k ids it returns.
Row = tuple[str, bytes]
ITEM_SEPARATOR = "\x00"


class _DeadConnectionError(Exception):
    """A pooled connection turned out to be closed by the server or the network when a lookup used it."""

    def __init__(self, cause: psycopg.OperationalError) -> None:
        super().__init__(str(cause))
        self.cause = first_line(cause)


class ThrottledLog:
    """A warning logged at most once per `every` seconds, with how many were held back in between: under
    an outage every lookup fails the same way, and one line per request would flood the log."""

    def __init__(self, log: logging.Logger, every: float = 10.0) -> None:
        self.log = log
        self.every = every
        self._next = 0.0
        self._held_back = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held_back += 1
            return
        if self._held_back:
            message += f" (and {self._held_back} more in the last {self.every:g} s)"
        self._held_back = 0
        self._next = now + self.every
        self.log.warning(message, *args)


_database_trouble = ThrottledLog(logger)


class BatchDroppedError(DatabaseUnavailableError):
    """The table of the batch a lookup was routed to is gone, and the rollout has been reloaded: route the
    lookup again. If that happens again at once, it is the client's 503."""


@dataclass(frozen=True, slots=True)
class UserRecs:
    user_id: str
    item_ids: list[str]
    scores: list[float]
    source: Source


@dataclass(frozen=True, slots=True)
class Answer:
    """What one lookup served: the batch it came from, the variant, every user's list, and how."""

    batch: LiveBatch
    variant: str
    results: list[UserRecs]
    cache_hits: int


@dataclass(frozen=True, slots=True)
class Answers:
    """A batch lookup's answer: one `Answer` per arm that served some of the users (production first),
    and every requested user's list in request order with the answer it belongs to."""

    parts: list[Answer]
    in_order: list[tuple[Answer, UserRecs]]


# An observer sees every answer after it is computed (served-prediction logging, ...). It runs on the
# request path, so it must only hand the answer off (to a bounded queue, a counter), never wait.
AnswerObserver = Callable[[Answer], None]


def create_pool(settings: ServingSettings) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """The lookup pool, not yet open. Autocommit, so a lookup is one round trip with no COMMIT after it."""
    statement_timeout_ms = str(max(1, round(settings.db_timeout_seconds * 1000)))

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # Server side too, so an abandoned query stops using Postgres when the client gives up on it.
        await conn.execute(sql.query("serving_session"), (statement_timeout_ms,))
        # Prepare the lookup statements on their first use rather than their fifth.
        conn.prepare_threshold = 0

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


class RecsCache:
    """A bounded LRU map of (batch id, user id) to the user's row, or None for a user the batch lacks."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[tuple[int, str], Row | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, batch_id: int, user_id: str) -> Row | Literal[False] | None:
        """The cached row, None for a cached unknown user, False when not cached."""
        key = (batch_id, user_id)
        try:
            row = self._rows[key]
        except KeyError:
            self.misses += 1
            return False
        self._rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, batch_id: int, user_id: str, row: Row | None) -> None:
        if self.entries:
            self._rows[(batch_id, user_id)] = row
            if len(self._rows) > self.entries:
                self._rows.popitem(last=False)


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
        self.cache = RecsCache(settings.cache_entries)
        self.observers: list[AnswerObserver] = []
        # users per database trip, for the metrics
        self.trips = 0
        self.trip_users = 0
        self._waiting: dict[LiveBatch, dict[str, asyncio.Future[Row | ServingError | None]]] = {}
        self._trips_running = 0
        self._background: set[asyncio.Task[None]] = set()
        self._pool_check: asyncio.Future[None] | None = None
        self.dead_connection_retries = 0

    def rollout(self) -> Rollout:
        """What is served now: production and the canary, if one runs."""
        rollout = self.view.rollout
        if rollout is None:
            if self.view.problem:
                raise NoLiveBatchError("no live batch loaded: cannot read the live pointer", self.view.problem)
            raise NoLiveBatchError("no batch is live yet")
        return rollout

    def live(self) -> LiveBatch:
        return self.rollout().production

    async def recommend(self, user_id: str, k: int | None, exclude: frozenset[str]) -> Answer:
        self._check_user_id(user_id, ("path", "user_id"))
        self._check_exclude(exclude, ("query", "exclude"))
        rollout = self.rollout()
        # k is checked against production, so whether a k is valid does not depend on the user's arm
        # (a canary has at least production's K).
        k = self._resolve_k(k, rollout.production, ("query", "k"))
        variant, batch = rollout.route(user_id)
        cached = self.cache.get(batch.batch_id, user_id)
        if cached is False:
            try:
                row = await self._coalesced(batch, user_id)
            except BatchDroppedError:
                # Route again with the rollout just reloaded: a canary user whose batch the refresh replaced
                # stays in the canary, on its new batch.
                variant, batch = self.rollout().route(user_id)
                row = await self._coalesced(batch, user_id)
            hits = 0
        else:
            row, hits = cached, 1
        answer = Answer(batch, variant, [pick(batch, user_id, row, k, exclude)], hits)
        self._observe(answer)
        return answer

    async def recommend_many(self, user_ids: Sequence[str], k: int | None, exclude: frozenset[str]) -> Answers:
        if len(user_ids) > self.settings.max_batch_users:
            raise InvalidRequestError(
                ("body", "user_ids"),
                f"at most {self.settings.max_batch_users} user ids per request, got {len(user_ids)}",
            )
        for index, user_id in enumerate(user_ids):
            self._check_user_id(user_id, ("body", "user_ids", index))
        self._check_exclude(exclude, ("body", "exclude"))
        rollout = self.rollout()
        k = self._resolve_k(k, rollout.production, ("body", "k"))
        try:
            answers = await self._answers(rollout, user_ids, k, exclude)
        except BatchDroppedError:
            # As in `recommend`: every user routed again with the rollout just reloaded.
            answers = await self._answers(self.rollout(), user_ids, k, exclude)
        for answer in answers.parts:
            self._observe(answer)
        return answers

    async def _answers(self, rollout: Rollout, user_ids: Sequence[str], k: int, exclude: frozenset[str]) -> Answers:
        canary = rollout.canary
        if canary is None:
            answer = await self._answer_from(rollout.production, PRODUCTION, user_ids, k, exclude)
            return Answers([answer], [(answer, recs) for recs in answer.results])
        # Each user from their own arm; each arm wholly from one batch, both arms at once.
        arms = [canary.split.variant(user_id) for user_id in user_ids]
        batches = {PRODUCTION: rollout.production, CANARY: canary.batch}
        users: dict[str, list[str]] = {PRODUCTION: [], CANARY: []}
        for user_id, arm in zip(user_ids, arms, strict=True):
            users[arm].append(user_id)
        asked = [arm for arm in (PRODUCTION, CANARY) if users[arm]]
        parts = await asyncio.gather(*(self._answer_from(batches[arm], arm, users[arm], k, exclude) for arm in asked))
        results = {arm: (part, iter(part.results)) for arm, part in zip(asked, parts, strict=True)}
        in_order = []
        for arm in arms:
            part, remaining = results[arm]
            in_order.append((part, next(remaining)))
        return Answers(list(parts), in_order)

    async def _answer_from(
        self, batch: LiveBatch, variant: str, user_ids: Sequence[str], k: int, exclude: frozenset[str]
    ) -> Answer:
        """Every user's list from one batch."""
        rows: dict[str, Row | None] = {}
        missing = []
        for user_id in dict.fromkeys(user_ids):
            cached = self.cache.get(batch.batch_id, user_id)
            if cached is False:
                missing.append(user_id)
            else:
                rows[user_id] = cached
        hits = len(rows)
        if missing:
            fetched = await self._within_deadline(self._fetch(batch, missing))
            for user_id in missing:
                rows[user_id] = row = fetched.get(user_id)
                self.cache.put(batch.batch_id, user_id, row)
        return Answer(batch, variant, [pick(batch, user_id, rows[user_id], k, exclude) for user_id in user_ids], hits)

    async def ping(self) -> Rollout | None:
        """What the database says is served, read through the lookup pool (readiness)."""

        async def read() -> Rollout | None:
            async with self.pool.connection() as conn:
                return await read_rollout(conn)

        return await self._within_deadline(read())

    # ------------------------------------------------------------------------ coalescing

    async def _coalesced(self, batch: LiveBatch, user_id: str) -> Row | None:
        """Wait for the next database trip to bring this user's row; start a trip if none is running."""
        waiting = self._waiting.setdefault(batch, {})
        future = waiting.get(user_id)
        if future is None:
            future = waiting[user_id] = asyncio.get_running_loop().create_future()
        if self._trips_running < self.settings.pool_max_size:
            self._trips_running += 1
            task = asyncio.create_task(self._trips())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        # asyncio.wait, not wait_for: the future may be shared with other requests and must not be cancelled.
        timeout = self.settings.db_timeout_seconds
        done, _ = await asyncio.wait((future,), timeout=timeout)
        if not done:
            raise DatabaseUnavailableError(f"the database did not answer within {timeout:g} s")
        result = future.result()
        if isinstance(result, ServingError):
            raise result
        return result

    async def _trips(self) -> None:
        """Make database trips until nobody is waiting: each trip takes everyone waiting when it starts."""
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, {}
                for batch, futures in waiting.items():
                    try:
                        rows = await self._within_deadline(self._fetch(batch, list(futures)))
                    except ServingError as error:
                        for future in futures.values():
                            if not future.done():
                                future.set_result(error)
                        continue
                    for user_id, future in futures.items():
                        row = rows.get(user_id)
                        self.cache.put(batch.batch_id, user_id, row)
                        if not future.done():
                            future.set_result(row)
        finally:
            self._trips_running -= 1

    async def _fetch(self, batch: LiveBatch, user_ids: list[str]) -> dict[str, Row]:
        self.trips += 1
        self.trip_users += len(user_ids)
        try:
            return await self._fetch_once(batch, user_ids)
        except _DeadConnectionError as dead:
            # The connection died while it sat idle in the pool (a restarted or failed-over Postgres, an
            # operator's pg_terminate_backend, a proxy's idle timeout): the pool's other idle connections
            # likely died with it. Weed them out, then ask once more on a live one; a lookup is a read,
            # so asking twice is safe. If Postgres itself is gone, the retry fails like the first try.
            self.dead_connection_retries += 1
            _database_trouble.warning("a pooled connection was dead (%s): retrying the lookup once", dead.cause)
            await self._check_pool()
            return await self._fetch_once(batch, user_ids)

    async def _fetch_once(self, batch: LiveBatch, user_ids: list[str]) -> dict[str, Row]:
        async with self.pool.connection() as conn:
            try:
                cur = await conn.execute(batch.recs_for_users, (user_ids,))
            except pgerrors.UndefinedTable:
                await self._reload_after_drop(batch, conn)
            except psycopg.OperationalError as error:
                if conn.broken:
                    raise _DeadConnectionError(error) from error
                raise
            rows = await cur.fetchall()
        return {user_id: cache_row(item_ids, scores) for user_id, item_ids, scores in rows}

    async def _check_pool(self) -> None:
        """`pool.check()` once for all the lookups that found a dead connection at the same moment."""
        if self._pool_check is None or self._pool_check.done():
            self._pool_check = asyncio.ensure_future(self.pool.check())
        await asyncio.shield(self._pool_check)

    async def _reload_after_drop(self, batch: LiveBatch, conn: psycopg.AsyncConnection[Any]) -> NoReturn:
        # The batch we hold was dropped after a switch or canary refresh we have not heard of yet (a missed
        # or late NOTIFY): read the rollout now instead of waiting for the next poll. Which batch replaces
        # it depends on the user (the dropped one may have been the canary's), so the caller routes again.
        rollout = await self.view.replace_stale(batch, conn)
        if rollout is None:
            raise NoLiveBatchError("no batch is live yet")
        canary = rollout.canary
        if batch.batch_id == rollout.production.batch_id or (canary and batch.batch_id == canary.batch.batch_id):
            raise DatabaseUnavailableError(f"the table of batch {batch.batch_id} is missing, yet it is still served")
        logger.info("batch %d was dropped under a lookup; routing it again", batch.batch_id)
        raise BatchDroppedError(f"the table of batch {batch.batch_id} was dropped under the lookup")

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
        except ServingError:
            raise
        except PoolTimeout:
            raise DatabaseUnavailableError(f"no database connection free within {timeout:g} s") from None
        except pgerrors.QueryCanceled:
            raise DatabaseUnavailableError(f"the database query took longer than {timeout:g} s") from None
        except (psycopg.OperationalError, _DeadConnectionError) as error:
            _database_trouble.warning("lookup: database unavailable: %s", first_line(error))
            raise DatabaseUnavailableError("the database is unavailable") from None
        except psycopg.Error:
            logger.exception("lookup failed in the database")
            raise DatabaseUnavailableError("the database failed the lookup", "database_error") from None

    # ------------------------------------------------------------------------ input checks

    def _observe(self, answer: Answer) -> None:
        for observer in self.observers:
            try:
                observer(answer)
            except Exception:
                logger.exception("answer observer %r failed", observer)

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


def cache_row(item_ids: Sequence[str], scores: Sequence[float]) -> Row:
    return ITEM_SEPARATOR.join(item_ids), array("d", scores).tobytes()


def pick(batch: LiveBatch, user_id: str, row: Row | None, k: int, exclude: frozenset[str]) -> UserRecs:
    if row is None:
        item_ids: Sequence[str] = batch.fallback_item_ids
        scores: Sequence[float] = batch.fallback_scores
        source: Source = "fallback"
    else:
        joined, packed = row
        scores = memoryview(packed).cast("d")
        source = "personalized"
        # Without exclusions only the first k ids are needed: split off just those.
        item_ids = joined.split(ITEM_SEPARATOR, -1 if exclude else k) if joined else []
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


# ---------------------------------------------------------------------------- rendering


def render(answer: Answer, recs: UserRecs) -> dict[str, Any]:
    """One user's answer as the JSON object of DESIGN §7 (`Recommendations` in serving.schemas)."""
    batch = answer.batch
    return {
        "user_id": recs.user_id,
        "items": [
            {"item_id": item_id, "score": score} for item_id, score in zip(recs.item_ids, recs.scores, strict=True)
        ],
        "source": recs.source,
        "model_id": batch.model_id,
        "batch_id": batch.batch_id,
        "generated_at": batch.generated_at_text,
        "variant": answer.variant,
    }


def encode(document: Any) -> bytes:
    return orjson.dumps(document)


def _forget(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("abandoned lookup ended with %r", task.exception())
