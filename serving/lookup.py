"""The hot path: one live-batch snapshot, a cache keyed by (batch id, id), at most one pooled round trip per lookup
(concurrent misses coalesced into one ``= ANY(...)`` query); the rest of an answer comes from the batch's
`Catalogue` in memory. Why: docs/serving.md#how-a-lookup-is-served.
"""

import asyncio
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Literal, NoReturn, TypeVar

import orjson
import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

import sql
from common.session import blend_session
from common.text import first_line
from serving.catalogue import EMPTY_CATALOGUE, Filter, FilterError
from serving.errors import (
    DatabaseUnavailableError,
    InvalidRequestError,
    NoLiveBatchError,
    ServingError,
)
from serving.live import LiveBatch, LiveView, Rollout, Table
from serving.settings import ServingSettings
from serving.variants import CANARY, PRODUCTION
from sql.contract import MAX_ID_LENGTH, decode_reasons

logger = logging.getLogger(__name__)

POOL_APPLICATION_NAME = "overnight-serving"
DEFAULT_K = 10
# personalized: the user's list; similar: the item's neighbours; session: blended from the session's
# items' neighbours; fallback: a segment's or the batch's popular list (or an unknown item's genres').
Source = Literal["personalized", "fallback", "similar", "session"]
SOURCES: tuple[Source, ...] = ("personalized", "fallback", "similar", "session")
Where = Literal["query", "body"]
Loc = tuple[str | int, ...]
T = TypeVar("T")
# A user's published list as the cache holds it: the item ids joined by NUL (which Postgres text cannot
# hold) into one string, and the scores packed as doubles into bytes. Neither is a container the
# garbage collector tracks or traverses: a full cache of tracked objects makes every full pass stall
# the requests in flight, and even tuples of floats, untracked after their first pass, make young
# collections long. One string instead of fifty ids also takes less memory, and joining is cheaper
# than interning the ids one by one. A lookup splits off only the k ids it returns.
Row = tuple[str, bytes]
# A user's list with its reasons (`?explain=true`): the row, then the reason codes and the names they point
# to joined like the ids (sql.contract.decode_reasons). Read and cached apart from the plain rows.
ExplainedRow = tuple[str, bytes, bytes, str]
# What the cache holds for an id: its row; for a user the batch did not score, their segment (text) when
# the batch knows it, else None.
Cached = Row | ExplainedRow | str | None
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
class Recs:
    """One list as served: a user's, an item's neighbours, or a session's."""

    # Whom it was served to: the user asked for, or the request's optional user ("" for none).
    user_id: str
    item_ids: list[str]
    scores: list[float]
    source: Source
    # The segment whose popular list answered (None: no segment's list did).
    segment: str | None = None
    # Items filled in from the fallback because too few passed the filter.
    filled: int = 0
    # Similar items: the item whose neighbours these are.
    item_id: str | None = None
    # With `explain`: why each item is listed (None where the batch has no reasons); else None.
    reasons: list[dict[str, str] | None] | None = None
    # The segment whose popular list the first `filled_from_segment` of the filled items came from.
    fill_segment: str | None = None
    filled_from_segment: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """What one lookup served: the batch it came from, the variant, every list, and how."""

    batch: LiveBatch
    variant: str
    results: list[Recs]
    cache_hits: int

    @property
    def filled(self) -> int:
        return sum(recs.filled for recs in self.results)


@dataclass(frozen=True, slots=True)
class Answers:
    """A batch lookup's answer: one `Answer` per arm that served some of the users (production first),
    and every requested user's list in request order with the answer it belongs to."""

    parts: list[Answer]
    in_order: list[tuple[Answer, Recs]]

    @property
    def filled(self) -> int:
        return sum(answer.filled for answer in self.parts)


# An observer sees every answer after it is computed (served-prediction logging, ...). It runs on the
# request path, so it must only hand the answer off (to a bounded queue, a counter), never wait.
AnswerObserver = Callable[[Answer], None]


def _connection_options(settings: ServingSettings) -> dict[str, Any]:
    """How every lookup connection is opened: autocommit, so a lookup is one round trip with no COMMIT."""
    return {
        "autocommit": True,
        "application_name": POOL_APPLICATION_NAME,
        "connect_timeout": max(2, round(settings.db_timeout_seconds)),
    }


def _configure_for(settings: ServingSettings) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    statement_timeout_ms = str(max(1, round(settings.db_timeout_seconds * 1000)))

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # Server side too, so an abandoned query stops using Postgres when the client gives up on it.
        await conn.execute(sql.query("serving_session"), (statement_timeout_ms,))
        # Prepare the lookup statements on their first use rather than their fifth.
        conn.prepare_threshold = 0

    return configure


def create_pool(settings: ServingSettings) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """The lookup pool, not yet open."""
    return AsyncConnectionPool(
        settings.database_url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs=_connection_options(settings),
        configure=_configure_for(settings),
        timeout=settings.db_timeout_seconds,
        open=False,
        name=POOL_APPLICATION_NAME,
    )


class RecsCache:
    """A bounded LRU map of (batch id, id) to the id's row, its segment, or None for an id the batch lacks."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[tuple[int, str], Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, batch_id: int, key: str) -> Cached | Literal[False]:
        """The cached row (or segment), None for a cached unknown id, False when not cached."""
        cache_key = (batch_id, key)
        try:
            row = self._rows[cache_key]
        except KeyError:
            self.misses += 1
            return False
        self._rows.move_to_end(cache_key)
        self.hits += 1
        return row

    def put(self, batch_id: int, key: str, row: Cached) -> None:
        if self.entries:
            self._rows[(batch_id, key)] = row
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
        self.caches: dict[Table, RecsCache] = {
            "recs": RecsCache(settings.cache_entries),
            "similar": RecsCache(settings.cache_entries),
            "explained": RecsCache(settings.cache_entries),
        }
        self.cache = self.caches["recs"]
        self.observers: list[AnswerObserver] = []
        # ids per database trip, for the metrics
        self.trips = 0
        self.trip_users = 0
        self._waiting: dict[tuple[LiveBatch, Table], dict[str, asyncio.Future[Cached | ServingError]]] = {}
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

    async def recommend(
        self,
        user_id: str,
        k: int | None,
        exclude: frozenset[str],
        filter_text: str | None = None,
        segment: str | None = None,
        explain: bool = False,
    ) -> Answer:
        self._check_user_id(user_id, ("path", "user_id"))
        self._check_segment(segment, ("query", "segment"))
        rollout = self.rollout()
        # k is checked against production, so whether a k is valid does not depend on the user's arm
        # (a canary has at least production's K).
        k = self._resolve_k(k, rollout.production, ("query", "k"))
        variant, batch = rollout.route(user_id)
        wanted = self._filter(batch, filter_text, ("query", "filter"))
        table = _lists_table(batch, explain)
        cached = self.caches[table].get(batch.batch_id, user_id)
        if cached is False:
            try:
                row = await self._coalesced(batch, table, user_id)
            except BatchDroppedError:
                # Route again with the rollout just reloaded: a canary user whose batch the refresh replaced
                # stays in the canary, on its new batch.
                variant, batch = self.rollout().route(user_id)
                wanted = self._filter(batch, filter_text, ("query", "filter"))
                table = _lists_table(batch, explain)
                row = await self._coalesced(batch, table, user_id)
            hits = 0
        else:
            row, hits = cached, 1
        recs = pick(batch, user_id, row, k, exclude, wanted, segment)
        answer = Answer(batch, variant, [explained(recs, row) if explain else recs], hits)
        self._observe(answer)
        return answer

    async def recommend_many(
        self,
        user_ids: Sequence[str],
        k: int | None,
        exclude: frozenset[str],
        filter_text: str | None = None,
        segment: str | None = None,
        explain: bool = False,
    ) -> Answers:
        if len(user_ids) > self.settings.max_batch_users:
            raise InvalidRequestError(
                ("body", "user_ids"),
                f"at most {self.settings.max_batch_users} user ids per request, got {len(user_ids)}",
            )
        for index, user_id in enumerate(user_ids):
            self._check_user_id(user_id, ("body", "user_ids", index))
        self._check_segment(segment, ("body", "segment"))
        rollout = self.rollout()
        k = self._resolve_k(k, rollout.production, ("body", "k"))
        ask = _Ask(k, exclude, filter_text, segment, explain)
        try:
            answers = await self._answers(rollout, user_ids, ask)
        except BatchDroppedError:
            # As in `recommend`: every user routed again with the rollout just reloaded.
            answers = await self._answers(self.rollout(), user_ids, ask)
        for answer in answers.parts:
            self._observe(answer)
        return answers

    async def similar(
        self,
        item_ids: Sequence[str],
        k: int | None,
        exclude: frozenset[str],
        filter_text: str | None = None,
        user_id: str | None = None,
        where: Where = "query",
    ) -> Answer:
        """Each item's neighbours from the batch `user_id` is routed to (production without one); an item
        without neighbours gets the popular items of its genres, else the batch's fallback list."""
        if len(item_ids) > self.settings.max_batch_items:
            raise InvalidRequestError(
                (where, "item_ids"),
                f"at most {self.settings.max_batch_items} item ids per request, got {len(item_ids)}",
            )
        for index, item_id in enumerate(item_ids):
            self._check_item_id(item_id, ("path", "item_id") if where == "query" else ("body", "item_ids", index))
        if user_id is not None:
            self._check_user_id(user_id, (where, "user_id"))
        rollout = self.rollout()
        production = rollout.production
        k = self._resolve_k(k, production, (where, "k"), production.similar_k or production.k, "similar_k")

        async def answer(rollout: Rollout) -> Answer:
            variant, batch = (PRODUCTION, rollout.production) if user_id is None else rollout.route(user_id)
            wanted = self._filter(batch, filter_text, (where, "filter"))
            rows, hits = await self._rows(batch, "similar", item_ids)
            results = [
                pick_similar(batch, item_id, rows[item_id], user_id or "", k, exclude, wanted) for item_id in item_ids
            ]
            return Answer(batch, variant, results, hits)

        served = await self._rerouted(rollout, answer)
        self._observe(served)
        return served

    async def session(
        self,
        items: Sequence[str],
        k: int | None,
        exclude: frozenset[str],
        filter_text: str | None = None,
        user_id: str | None = None,
        segment: str | None = None,
    ) -> Answer:
        """The session's items' neighbour lists blended by `common.session.blend_session` (with the user's own
        list when the batch scored them), leaving out the session's and the excluded items. When no item
        has neighbours, what the user lookup would answer (the segment's or the global fallback for a
        visitor)."""
        if len(items) > self.settings.max_session_items:
            raise InvalidRequestError(
                ("body", "items"), f"at most {self.settings.max_session_items} session items, got {len(items)}"
            )
        for index, item_id in enumerate(items):
            self._check_item_id(item_id, ("body", "items", index))
        self._check_segment(segment, ("body", "segment"))
        if user_id is not None:
            self._check_user_id(user_id, ("body", "user_id"))
        rollout = self.rollout()
        k = self._resolve_k(k, rollout.production, ("body", "k"))
        leave_out = exclude.union(items)

        async def answer(rollout: Rollout) -> Answer:
            variant, batch = (PRODUCTION, rollout.production) if user_id is None else rollout.route(user_id)
            wanted = self._filter(batch, filter_text, ("body", "filter"))
            user_row: Cached = None
            if user_id is None:
                neighbour_rows, hits = await self._rows(batch, "similar", items)
            else:
                (neighbour_rows, hits), (user_rows, user_hits) = await asyncio.gather(
                    self._rows(batch, "similar", items), self._rows(batch, "recs", [user_id])
                )
                user_row, hits = user_rows[user_id], hits + user_hits
            neighbours = [_ranked(neighbour_rows[item_id]) for item_id in items]
            if any(ranked is not None for ranked in neighbours):
                user_list = _ranked(user_row)
                blended = blend_session(neighbours, leave_out, () if user_list is None else user_list[0])
                # A filtered session runs short into the segment asked for, else the one stored for the user.
                stored = user_row if isinstance(user_row, str) else None
                recs = _take(batch, user_id or "", k, leave_out, wanted, "session", blended, segment or stored)
            else:
                recs = pick(batch, user_id or "", user_row, k, leave_out, wanted, segment)
            return Answer(batch, variant, [recs], hits)

        served = await self._rerouted(rollout, answer)
        self._observe(served)
        return served

    async def _rerouted(self, rollout: Rollout, answer: Callable[[Rollout], Coroutine[Any, Any, Answer]]) -> Answer:
        """`answer` from `rollout`; once more from the rollout just reloaded if its batch was dropped under it."""
        try:
            return await answer(rollout)
        except BatchDroppedError:
            return await answer(self.rollout())

    async def _answers(self, rollout: Rollout, user_ids: Sequence[str], ask: "_Ask") -> Answers:
        canary = rollout.canary
        if canary is None:
            answer = await self._answer_from(rollout.production, PRODUCTION, user_ids, ask)
            return Answers([answer], [(answer, recs) for recs in answer.results])
        # Each user from their own arm; each arm wholly from one batch, both arms at once.
        arms = [canary.split.variant(user_id) for user_id in user_ids]
        batches = {PRODUCTION: rollout.production, CANARY: canary.batch}
        users: dict[str, list[str]] = {PRODUCTION: [], CANARY: []}
        for user_id, arm in zip(user_ids, arms, strict=True):
            users[arm].append(user_id)
        asked = [arm for arm in (PRODUCTION, CANARY) if users[arm]]
        parts = await asyncio.gather(*(self._answer_from(batches[arm], arm, users[arm], ask) for arm in asked))
        results = {arm: (part, iter(part.results)) for arm, part in zip(asked, parts, strict=True)}
        in_order = []
        for arm in arms:
            part, remaining = results[arm]
            in_order.append((part, next(remaining)))
        return Answers(list(parts), in_order)

    async def _answer_from(self, batch: LiveBatch, variant: str, user_ids: Sequence[str], ask: "_Ask") -> Answer:
        """Every user's list from one batch."""
        wanted = self._filter(batch, ask.filter_text, ("body", "filter"))
        rows, hits = await self._rows(batch, _lists_table(batch, ask.explain), user_ids)
        results = [pick(batch, user_id, rows[user_id], ask.k, ask.exclude, wanted, ask.segment) for user_id in user_ids]
        if ask.explain:
            results = [explained(recs, rows[recs.user_id]) for recs in results]
        return Answer(batch, variant, results, hits)

    async def ping(self) -> None:
        """Read what the database says is served, through the lookup pool (readiness)."""

        async def read(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(sql.query("serving_batches"))

        await self._within_deadline(self._on_live_connection(read))

    # ------------------------------------------------------------------------ coalescing

    async def _rows(self, batch: LiveBatch, table: Table, ids: Sequence[str]) -> tuple[dict[str, Cached], int]:
        """Each id's row (or segment, or None) of one table of `batch`, and how many came from the cache.
        The uncached ones go in the next database trip together; a batch without similar items has no
        neighbour lists to read."""
        rows: dict[str, Cached] = {}
        if table == "similar" and batch.similar_for_items is None:
            return dict.fromkeys(ids), 0
        cache = self.caches[table]
        missing = []
        for key in dict.fromkeys(ids):
            cached = cache.get(batch.batch_id, key)
            if cached is False:
                missing.append(key)
            else:
                rows[key] = cached
        hits = len(rows)
        if missing:
            futures = [self._wait_for(batch, table, key) for key in missing]
            self._start_trip()
            timeout = self.settings.db_timeout_seconds
            _, pending = await asyncio.wait(futures, timeout=timeout)
            if pending:
                raise DatabaseUnavailableError(f"the database did not answer within {timeout:g} s")
            for key, future in zip(missing, futures, strict=True):
                result = future.result()
                if isinstance(result, ServingError):
                    raise result
                rows[key] = result
        return rows, hits

    async def _coalesced(self, batch: LiveBatch, table: Table, key: str) -> Cached:
        """Wait for the next database trip to bring this id's row; start a trip if none is running."""
        future = self._wait_for(batch, table, key)
        self._start_trip()
        # asyncio.wait, not wait_for: the future may be shared with other requests and must not be cancelled.
        timeout = self.settings.db_timeout_seconds
        done, _ = await asyncio.wait((future,), timeout=timeout)
        if not done:
            raise DatabaseUnavailableError(f"the database did not answer within {timeout:g} s")
        result = future.result()
        if isinstance(result, ServingError):
            raise result
        return result

    def _wait_for(self, batch: LiveBatch, table: Table, key: str) -> "asyncio.Future[Cached | ServingError]":
        waiting = self._waiting.setdefault((batch, table), {})
        future = waiting.get(key)
        if future is None:
            future = waiting[key] = asyncio.get_running_loop().create_future()
        return future

    def _start_trip(self) -> None:
        if self._trips_running < self.settings.pool_max_size:
            self._trips_running += 1
            task = asyncio.create_task(self._trips())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _trips(self) -> None:
        """Make database trips until nobody is waiting: each trip takes everyone waiting when it starts."""
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, {}
                for (batch, table), futures in waiting.items():
                    try:
                        rows = await self._within_deadline(self._fetch(batch, table, list(futures)))
                    except ServingError as error:
                        for future in futures.values():
                            if not future.done():
                                future.set_result(error)
                        continue
                    cache = self.caches[table]
                    for key, future in futures.items():
                        row = rows.get(key)
                        cache.put(batch.batch_id, key, row)
                        if not future.done():
                            future.set_result(row)
        finally:
            self._trips_running -= 1

    async def _fetch(self, batch: LiveBatch, table: Table, ids: list[str]) -> dict[str, Cached]:
        self.trips += 1
        self.trip_users += len(ids)

        async def read(conn: psycopg.AsyncConnection[Any]) -> dict[str, Cached]:
            return await self._read_rows(conn, batch, table, ids)

        return await self._on_live_connection(read)

    async def _on_live_connection(self, read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """`read` on a pooled connection; if that connection turns out dead, once more on a fresh one.

        A connection can die while it sits idle in the pool (a restarted or failed-over Postgres, an
        operator's pg_terminate_backend, a proxy's idle timeout), and the pool only learns of it when it is
        used. A lookup is a read, so asking again is safe; a fresh connection, opened for this one retry,
        cannot have died idle, so if it fails too, Postgres itself is unavailable. The pool's other idle
        connections likely died at the same moment: a check weeds them out in the background.
        """
        try:
            async with self.pool.connection() as conn:
                return await _unless_dead(read, conn)
        except _DeadConnectionError as dead:
            self.dead_connection_retries += 1
            _database_trouble.warning("a pooled connection was dead (%s): retrying on a fresh one", dead.cause)
            self._check_pool()
        async with await psycopg.AsyncConnection.connect(
            self.settings.database_url, **_connection_options(self.settings)
        ) as conn:
            await _configure_for(self.settings)(conn)
            return await read(conn)

    async def _read_rows(
        self, conn: psycopg.AsyncConnection[Any], batch: LiveBatch, table: Table, ids: list[str]
    ) -> dict[str, Cached]:
        statement, parameters = batch.rows_query(table, ids)
        try:
            cur = await conn.execute(statement, parameters)
            rows = await cur.fetchall()
        except pgerrors.UndefinedTable:
            await self._reload_after_drop(batch, conn)
        found: dict[str, Cached] = {}
        for key, item_ids, scores, *rest in rows:
            if item_ids is None:  # a user the batch did not score, with the segment their attributes put them in
                found.setdefault(key, rest[-1])
            elif table == "explained":
                codes, refs = rest[0], rest[1]
                found[key] = (*cache_row(item_ids, scores), bytes(codes), ITEM_SEPARATOR.join(refs))
            else:
                found[key] = cache_row(item_ids, scores)
        return found

    def _check_pool(self) -> None:
        """`pool.check()` once for all the lookups that found a dead connection at the same moment."""
        if self._pool_check is None or self._pool_check.done():
            self._pool_check = asyncio.ensure_future(self.pool.check())
            self._pool_check.add_done_callback(_forget)

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
        except psycopg.OperationalError as error:
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

    @staticmethod
    def _check_item_id(item_id: str, loc: Loc) -> None:
        # Like a user id's checks: an id the batch side could not have published is refused, not looked up.
        if len(item_id) > MAX_ID_LENGTH:
            raise InvalidRequestError(loc, f"item id is longer than {MAX_ID_LENGTH} characters")
        if not item_id:
            raise InvalidRequestError(loc, "item id is empty")
        if "\x00" in item_id:
            raise InvalidRequestError(loc, "item id contains a NUL character")
        if not item_id.isascii():
            try:
                item_id.encode()
            except UnicodeEncodeError:
                raise InvalidRequestError(loc, "item id is not valid Unicode text") from None

    @staticmethod
    def _check_segment(segment: str | None, loc: Loc) -> None:
        if segment is not None and len(segment) > MAX_ID_LENGTH:
            raise InvalidRequestError(loc, f"segment is longer than {MAX_ID_LENGTH} characters")

    def _filter(self, batch: LiveBatch, text: str | None, loc: Loc) -> Filter | None:
        """The filter `text` compiled over `batch`'s catalogue (None: no filter); parsing is cached."""
        if text is None:
            return None
        if len(text) > self.settings.max_filter_length:
            raise InvalidRequestError(loc, f"filter is longer than {self.settings.max_filter_length} characters")
        try:
            return (batch.catalogue or EMPTY_CATALOGUE).filter(text)
        except FilterError as error:
            raise InvalidRequestError(loc, str(error), text) from None

    @staticmethod
    def _resolve_k(k: int | None, batch: LiveBatch, loc: Loc, limit: int | None = None, name: str = "k") -> int:
        """k, or the default, within 1..`limit` (the batch's k unless given; `name` says which it is)."""
        limit = batch.k if limit is None else limit
        if k is None:
            return min(DEFAULT_K, limit)
        if not 1 <= k <= limit:
            raise InvalidRequestError(
                loc, f"k must be between 1 and {limit} (the {name} of live batch {batch.batch_id})", k
            )
        return k


@dataclass(frozen=True, slots=True)
class _Ask:
    """What a batch request asks of every user's list."""

    k: int
    exclude: frozenset[str]
    filter_text: str | None
    segment: str | None
    explain: bool = False


def _lists_table(batch: LiveBatch, explain: bool) -> Table:
    """Where a user's list is read: with its reasons when they are asked for and the batch has them."""
    return "explained" if explain and batch.explained_recs_for_users is not None else "recs"


def explained(recs: Recs, row: Cached) -> Recs:
    """`recs` with each item's reason: for an item of the user's own list, its stored reason
    (`sql.contract.decode_reasons`; None when the batch was published without reasons); for an item from a
    popular list (the answer's own, or filled in after a filter), "popular", naming the segment when the
    list was a segment's."""
    popular = {"source": "popular"}
    own = recs.item_ids[: len(recs.item_ids) - recs.filled]
    reasons: list[dict[str, str] | None]
    if isinstance(row, tuple):
        stored: dict[str, dict[str, str]] = {}
        if len(row) == 4:
            joined, _, codes, refs = row
            listed = joined.split(ITEM_SEPARATOR) if joined else []
            stored = dict(zip(listed, decode_reasons(codes, refs.split(ITEM_SEPARATOR) if refs else []), strict=True))
        reasons = [stored.get(item_id) for item_id in own]
    else:
        reasons = [{"source": "popular", "segment": recs.segment} if recs.segment else popular] * len(own)
    if recs.fill_segment is not None:
        reasons += [{"source": "popular", "segment": recs.fill_segment}] * recs.filled_from_segment
    reasons += [popular] * (recs.filled - recs.filled_from_segment)
    return replace(recs, reasons=reasons)


def cache_row(item_ids: Sequence[str], scores: Sequence[float]) -> Row:
    return ITEM_SEPARATOR.join(item_ids), array("d", scores).tobytes()


def _ranked(row: Cached) -> tuple[list[str], Sequence[float]] | None:
    """A cached row as its item ids and scores; None for a segment or an unknown id."""
    if not isinstance(row, tuple):
        return None
    joined, packed = row[0], row[1]
    return (joined.split(ITEM_SEPARATOR) if joined else []), memoryview(packed).cast("d").tolist()


def pick(
    batch: LiveBatch,
    user_id: str,
    row: Cached,
    k: int,
    exclude: frozenset[str],
    wanted: Filter | None = None,
    segment: str | None = None,
) -> Recs:
    """A user's answer from their cached row: their list, else their segment's (`segment` asked for, else
    the one the batch stored for them), else the batch's fallback; filtered and filled when `wanted`."""
    if not isinstance(row, tuple):
        listed, answered = _fallback(batch, segment or row)
        return _take(
            batch, user_id, k, exclude, wanted, "fallback", listed, None, answered, fallback_is_global=answered is None
        )
    joined, packed = row[0], row[1]
    scores = memoryview(packed).cast("d")
    if wanted is not None:
        item_ids = joined.split(ITEM_SEPARATOR) if joined else []
        return _take(batch, user_id, k, exclude, wanted, "personalized", zip(item_ids, scores, strict=True), segment)
    # Without exclusions only the first k ids are needed: split off just those.
    item_ids = joined.split(ITEM_SEPARATOR, -1 if exclude else k) if joined else []
    if not exclude:
        return Recs(user_id, item_ids[:k], list(scores[:k]), "personalized")
    # Exclude before cutting to k, so excluded items leave room for the next ones in rank order.
    kept_items: list[str] = []
    kept_scores: list[float] = []
    for item_id, score in zip(item_ids, scores, strict=False):
        if item_id not in exclude:
            kept_items.append(item_id)
            kept_scores.append(score)
            if len(kept_items) == k:
                break
    return Recs(user_id, kept_items, kept_scores, "personalized")


def pick_similar(
    batch: LiveBatch, item_id: str, row: Cached, user_id: str, k: int, exclude: frozenset[str], wanted: Filter | None
) -> Recs:
    """An item's neighbours; without any, the popular items of its genres, then the batch's fallback list.
    The item itself is never among them."""
    leave_out = exclude | {item_id}
    ranked = _ranked(row)
    if ranked is not None:
        neighbours = zip(*ranked, strict=True)
        recs = _take(batch, user_id, k, leave_out, wanted, "similar", neighbours, None, genres_of=item_id)
    else:
        catalogue = batch.catalogue or EMPTY_CATALOGUE
        fallback = _unique_items(chain(catalogue.genre_fallback(item_id, wanted), _global(batch)))
        recs = _take(batch, user_id, k, leave_out, wanted, "fallback", fallback, None, fallback_is_global=True)
    return Recs(recs.user_id, recs.item_ids, recs.scores, recs.source, None, recs.filled, item_id)


def _take(
    batch: LiveBatch,
    user_id: str,
    k: int,
    leave_out: frozenset[str],
    wanted: Filter | None,
    source: Source,
    ranked: Iterable[tuple[str, float]],
    segment: str | None,
    answered_segment: str | None = None,
    *,
    genres_of: str | None = None,
    fallback_is_global: bool = False,
) -> Recs:
    """The first k items of `ranked` (no item twice) not left out and passing `wanted`. With a filter, too
    few are filled from the filtered fallback: `genres_of`'s genres (similar items), the segment's list,
    the batch's fallback list, then the catalogue by popularity (available items only); `filled` counts
    them."""
    items: list[str] = []
    scores: list[float] = []
    passes = None if wanted is None else wanted.passes
    for item_id, score in ranked:
        if item_id not in leave_out and (passes is None or passes(item_id)):
            items.append(item_id)
            scores.append(score)
            if len(items) == k:
                break
    own = len(items)
    fill_segment = None
    filled_from_segment = 0
    if wanted is not None and own < k:
        passes = wanted.passes
        catalogue = batch.catalogue or EMPTY_CATALOGUE
        taken = set(items)

        def fill_from(listed: Iterable[tuple[str, float]]) -> None:
            if len(items) == k:
                return
            for item_id, score in listed:
                if item_id not in leave_out and item_id not in taken and passes(item_id):
                    items.append(item_id)
                    scores.append(score)
                    taken.add(item_id)
                    if len(items) == k:
                        return

        # The genres' and the catalogue's lists come from the filter with only its passing items: a filter
        # that passes few would otherwise walk the whole catalogue for every list of a batch request.
        if genres_of is not None:
            fill_from(catalogue.genre_fallback(genres_of, wanted))
        if answered_segment is None and segment is not None and segment in catalogue.segments:
            before = len(items)
            fill_from(zip(*catalogue.segments[segment], strict=True))
            fill_segment, filled_from_segment = segment, len(items) - before
        if not fallback_is_global:
            fill_from(_global(batch))
        fill_from(wanted.popular())
    filled = len(items) - own
    return Recs(
        user_id,
        items,
        scores,
        source,
        answered_segment,
        filled,
        fill_segment=fill_segment,
        filled_from_segment=filled_from_segment,
    )


def _unique_items(ranked: Iterable[tuple[str, float]]) -> Iterator[tuple[str, float]]:
    """`ranked` without the items it already gave (with their first score)."""
    seen: set[str] = set()
    for item_id, score in ranked:
        if item_id not in seen:
            seen.add(item_id)
            yield item_id, score


def _fallback(batch: LiveBatch, segment: str | None) -> tuple[Iterator[tuple[str, float]], str | None]:
    """The segment's popular list and its name when the batch has one for it, else the batch's fallback list."""
    catalogue = batch.catalogue
    if segment is not None and catalogue is not None and segment in catalogue.segments:
        item_ids, scores = catalogue.segments[segment]
        return zip(item_ids, scores, strict=True), segment
    return _global(batch), None


def _global(batch: LiveBatch) -> Iterator[tuple[str, float]]:
    return zip(batch.fallback_item_ids, batch.fallback_scores, strict=True)


# ---------------------------------------------------------------------------- rendering


def render(answer: Answer, recs: Recs) -> dict[str, Any]:
    """One user's answer as the JSON object of docs/serving.md (`Recommendations` in serving.schemas)."""
    return _rendered({"user_id": recs.user_id}, answer, recs)


def render_similar(answer: Answer, recs: Recs) -> dict[str, Any]:
    """One item's neighbours (`SimilarItems` in serving.schemas)."""
    return _rendered({"item_id": recs.item_id}, answer, recs)


def render_session(answer: Answer, recs: Recs) -> dict[str, Any]:
    """A session's answer (`SessionRecommendations` in serving.schemas); user_id null without a user."""
    return _rendered({"user_id": recs.user_id or None}, answer, recs)


def _rendered(document: dict[str, Any], answer: Answer, recs: Recs) -> dict[str, Any]:
    batch = answer.batch
    document["items"] = [
        {"item_id": item_id, "score": score} for item_id, score in zip(recs.item_ids, recs.scores, strict=True)
    ]
    if recs.reasons is not None:
        for item, reason in zip(document["items"], recs.reasons, strict=True):
            item["reason"] = reason
    document["source"] = recs.source
    if recs.segment is not None:
        document["segment"] = recs.segment
    document["model_id"] = batch.model_id
    document["batch_id"] = batch.batch_id
    document["generated_at"] = batch.generated_at_text
    document["variant"] = answer.variant
    return document


def encode(document: Any) -> bytes:
    return orjson.dumps(document)


async def _unless_dead(
    read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], conn: psycopg.AsyncConnection[Any]
) -> T:
    """`read(conn)`, with a failure that left the connection broken raised as `_DeadConnectionError`."""
    try:
        return await read(conn)
    except psycopg.OperationalError as error:
        if conn.broken:
            raise _DeadConnectionError(error) from error
        raise


def _forget(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("abandoned lookup ended with %r", task.exception())
