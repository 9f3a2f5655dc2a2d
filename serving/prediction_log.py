"""Writing rows to Postgres in bulk, off the request path: what was served (`PredictionLog`), and the
writer it shares with the feedback endpoint (`BulkWriter`).

A request only appends a tuple to a bounded in-memory queue and never awaits: when the queue is full
the row is refused (the prediction log drops it and counts the drop; the feedback endpoint answers
503). One background task drains the queue in batches and writes each as one statement with one JSON
array, over its own connection, so logging never takes a connection from the lookup pool. A batch is
encoded by one orjson call (C, well under a microsecond a row) rather than row by row in Python: the
encoding runs on the event loop the lookups share. What was served is stored as that JSON text, one
row per batch: Postgres then does no per-answer work on the lookups' cores. A failed write is
retried with back-off (the queue fills meanwhile and refuses rows, bounded memory); `stop()` drains
what is left. Rows are lost only if the process is killed or Postgres stays down through `stop()`;
both are logged with the count.
"""

import asyncio
import contextlib
import itertools
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from operator import itemgetter
from typing import Any, Generic, LiteralString, Protocol, TypeVar

import orjson
import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import sql

logger = logging.getLogger(__name__)

Row = TypeVar("Row", bound=tuple[Any, ...])  # a row's first field is its time

_FIRST_RETRY_SECONDS = 0.2
_MAX_RETRY_SECONDS = 5.0
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


class BulkWriter(Generic[Row]):
    """A bounded queue of rows and the task that inserts them into one table in batches.

    `insert_query` takes named parameters: ``rows``, the batch as the text of one JSON array (each row
    a JSON array: the tuple as orjson encodes it, datetimes as RFC 3339), ``count``, and ``first`` and
    ``last``, the earliest and latest of the rows' first fields (their times). `batch_key`, a function
    of a row's time that never decreases as the time grows (its day, say), keeps rows whose keys
    differ out of one batch. `offer` and `offer_all` are the request side: synchronous, O(1), never
    blocking. `start` and `stop` belong to the app's lifespan.
    """

    def __init__(
        self,
        name: str,
        database_url: str,
        insert_query: LiteralString,
        *,
        queue_size: int = 10_000,
        batch_size: int = 1_000,
        linger_seconds: float = 0.25,
        connect_timeout: float = 5.0,
        batch_key: Callable[[Any], Hashable] | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        self.name = name
        self._url = database_url
        self._insert = insert_query
        self._batch_size = batch_size
        self._linger = linger_seconds
        self._connect_timeout = connect_timeout
        self._batch_key = batch_key
        self._capacity = queue_size
        self._queue: deque[Row] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._pending: list[Row] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepted = 0
        self.refused = 0
        self.written = 0
        self.write_failures = 0
        self.lost = 0

    # ------------------------------------------------------------------ request side

    def offer(self, row: Row) -> bool:
        """Queue one row; False (and counted as refused) when the queue is full."""
        if len(self._queue) >= self._capacity:
            self.refused += 1
            return False
        self._queue.append(row)
        self.accepted += 1
        self._arrived.set()
        return True

    def offer_all(self, rows: Sequence[Row]) -> bool:
        """Queue every row or none (so a client can retry the whole request without duplicates)."""
        if self._capacity - len(self._queue) < len(rows):
            self.refused += len(rows)
            return False
        self._queue.extend(rows)
        self.accepted += len(rows)
        self._arrived.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._pending)

    @property
    def capacity(self) -> int:
        return self._capacity

    # ------------------------------------------------------------------ lifespan

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"overnight-{self.name}-writer")

    async def flush(self) -> None:
        """Wait until every row queued so far is written (tests, and `stop`)."""
        while self._queue or self._pending:
            self._idle.clear()
            await self._idle.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then close the connection."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        left = self.queued
        if left:
            self.lost += left
            logger.error("%s: %d rows were not written before shutdown and are lost", self.name, left)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ background task

    async def _run(self) -> None:
        backoff = _FIRST_RETRY_SECONDS
        while True:
            if not self._pending:
                if not self._queue:
                    self._idle.set()
                    self._arrived.clear()
                    await self._arrived.wait()
                self._take_available()
                if len(self._pending) < self._batch_size and self._linger > 0:
                    # A wait turns a trickle of rows into fewer, larger writes: a write costs Postgres
                    # about half a millisecond of CPU besides its rows, on the cores lookups use too.
                    await asyncio.sleep(self._linger)
                    self._take_available()
            payload = self._encode_pending()
            if not self._pending:  # none of them could be encoded (counted as lost)
                continue
            try:
                await self._write(payload)
            except (psycopg.Error, OSError) as error:
                self.write_failures += 1
                delay = backoff * random.uniform(0.5, 1.0)
                logger.warning(
                    "%s: writing %d rows failed (%s); retrying in %.1f s",
                    self.name,
                    len(self._pending),
                    _first_line(error),
                    delay,
                )
                await self._close_broken()
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, _MAX_RETRY_SECONDS)
            else:
                self.written += len(self._pending)
                self._pending = []
                backoff = _FIRST_RETRY_SECONDS

    def _take_available(self) -> None:
        queue = self._queue
        rows = list(itertools.islice(queue, min(self._batch_size - len(self._pending), len(queue))))
        if rows and self._batch_key is not None:
            key_of = self._batch_key
            key = key_of((self._pending or rows)[0][0])
            times = list(map(_time_of, rows))
            # The key never decreases with the time, so when the earliest and the latest row have the
            # batch's key, all do; only a batch that reaches past (say) midnight is walked row by row.
            if key_of(min(times)) != key or key_of(max(times)) != key:
                rows = list(itertools.takewhile(lambda row: key_of(row[0]) == key, rows))
        if len(rows) == len(queue):
            queue.clear()
        else:
            for _ in range(len(rows)):
                queue.popleft()
        self._pending.extend(rows)

    async def _write(self, payload: bytes) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(2, round(self._connect_timeout)),
                application_name=f"overnight-serving-{self.name}",
            )
        times = list(map(_time_of, self._pending))
        await self._conn.execute(
            self._insert,
            {"rows": payload.decode(), "count": len(self._pending), "first": min(times), "last": max(times)},
        )

    def _encode_pending(self) -> bytes:
        """The pending rows as one JSON array. A row JSON cannot carry (a lone surrogate in a string,
        say) could never be written and would block every row behind it: it is dropped and counted lost."""
        try:
            return orjson.dumps(self._pending)
        except orjson.JSONEncodeError:
            encodable = []
            for row in self._pending:
                with contextlib.suppress(orjson.JSONEncodeError):
                    orjson.dumps(row)
                    encodable.append(row)
            self.lost += len(self._pending) - len(encodable)
            logger.error("%s: %d rows cannot be encoded and are lost", self.name, len(self._pending) - len(encodable))
            self._pending = encodable
            return orjson.dumps(encodable)

    async def _close_broken(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


class WriterCollector(Collector):
    """The writers' counters for /metrics: ``registry.register(WriterCollector([log.writer, ...]))``."""

    def __init__(self, writers: Sequence[BulkWriter[Any]]) -> None:
        self.writers = list(writers)

    def collect(self) -> Any:
        counters = {
            "accepted": ("overnight_bulk_rows_accepted", "Rows queued for writing, by writer."),
            "refused": ("overnight_bulk_rows_dropped", "Rows refused because the queue was full, by writer."),
            "written": ("overnight_bulk_rows_written", "Rows written to Postgres, by writer."),
            "write_failures": ("overnight_bulk_write_failures", "Failed bulk writes (retried), by writer."),
            "lost": ("overnight_bulk_rows_lost", "Queued rows never written (at shutdown, or unencodable), by writer."),
        }
        for attribute, (name, documentation) in counters.items():
            family = CounterMetricFamily(name, documentation, labels=["writer"])
            for writer in self.writers:
                family.add_metric([writer.name], getattr(writer, attribute))
            yield family
        queued = GaugeMetricFamily("overnight_bulk_rows_queued", "Rows waiting to be written.", labels=["writer"])
        for writer in self.writers:
            queued.add_metric([writer.name], writer.queued)
        yield queued


# ---------------------------------------------------------------------------- served predictions

# Served at (microseconds since the Unix epoch: cheaper to take and to encode than a datetime, on
# the request path), request id, user, batch, variant, source, item ids.
ServedRow = tuple[int, str, str, int, str, str, Sequence[str]]
MICROSECONDS_PER_DAY = 86_400_000_000


class ServedList(Protocol):
    """One user's answer as the lookup returns it (`serving.lookup.UserRecs`)."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_ids(self) -> Sequence[str]: ...
    @property
    def source(self) -> str: ...


class PredictionLog:
    """Records a sampled share of answers into ``overnight.served_predictions``; never blocks a lookup."""

    def __init__(self, database_url: str, *, sample_rate: float = 1.0, **writer_options: Any) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate}")
        self.sample_rate = sample_rate
        self.writer: BulkWriter[ServedRow] = BulkWriter(
            "served_predictions",
            database_url,
            sql.query("insert_served_predictions"),
            batch_key=_utc_day,
            **writer_options,
        )

    def record(
        self, request_id: str, user_id: str, batch_id: int, variant: str, source: str, item_ids: Sequence[str]
    ) -> bool:
        """Queue one answer (True), or skip it: not sampled, or the queue is full (counted as dropped)."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return False
        return self.writer.offer((time.time_ns() // 1000, request_id, user_id, batch_id, variant, source, item_ids))

    def record_answer(self, request_id: str, batch_id: int, variant: str, results: Iterable[ServedList]) -> int:
        """Queue every list of one answer (a batch lookup has many) under one sampling decision; how many."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return 0
        served_at = time.time_ns() // 1000
        offer = self.writer.offer
        queued = 0
        for recs in results:  # a loop, not sum() over a generator: a third less time on every request
            queued += offer((served_at, request_id, recs.user_id, batch_id, variant, recs.source, recs.item_ids))
        return queued

    def start(self) -> None:
        self.writer.start()

    async def stop(self, timeout: float = 10.0) -> None:
        await self.writer.stop(timeout)


def request_id_for(incoming: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token (1-128 visible ASCII), else a new one.

    The response echoes it, and the client sends it back with its feedback events, which is how the
    online report pairs a click with the list it came from.
    """
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_request_ids.prefix}{next(_request_ids.counter):016x}"


class _RequestIds:
    """New request ids: 32 hex digits, a random half drawn once per process (again in a forked
    worker) and a counter. A uuid4 per request costs a getrandom system call on the hot path."""

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.renew()

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex()


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.renew)


def _utc_day(served_at: int) -> int:
    """A batch of served answers is stored whole in its first answer's day partition."""
    return served_at // MICROSECONDS_PER_DAY


_time_of = itemgetter(0)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
