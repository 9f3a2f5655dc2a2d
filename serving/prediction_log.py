"""Writing rows to Postgres in bulk, off the request path: what was served (`PredictionLog`), and the
writer it shares with the feedback endpoint (`BulkWriter`).

A request only appends to a bounded in-memory queue and never awaits: when the queue is full the
row is refused (the prediction log drops it and counts the drop; the feedback endpoint answers 503).
One background task drains the queue in batches and writes each with one binary COPY over its own
connection, so logging never takes a connection from the lookup pool. A failed write is retried
with back-off (the queue fills meanwhile and refuses rows, bounded memory); `stop()` drains what is
left. Rows are lost only if the process is killed or Postgres stays down through `stop()`; both are
logged with the count.
"""

import asyncio
import contextlib
import itertools
import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, LiteralString, Protocol, TypeVar

import orjson
import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg.types.json import Json

import sql

logger = logging.getLogger(__name__)

Row = TypeVar("Row", bound=tuple[Any, ...])

_FIRST_RETRY_SECONDS = 0.2
_MAX_RETRY_SECONDS = 5.0
# Rows encoded between two yields to the event loop: psycopg encodes a whole COPY without yielding
# unless the socket blocks, and a thousand logged lists (milliseconds) would stall every lookup behind them.
_ROWS_PER_YIELD = 32
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class BulkWriter(Generic[Row]):
    """A bounded queue of rows and the task that COPYs them into one table in batches.

    `offer` and `offer_all` are the request side: synchronous, O(1), never blocking. `start` and
    `stop` belong to the app's lifespan.
    """

    def __init__(
        self,
        name: str,
        database_url: str,
        copy_query: LiteralString,
        column_types: Sequence[str],
        *,
        queue_size: int = 10_000,
        batch_size: int = 1_000,
        linger_seconds: float = 0.05,
        connect_timeout: float = 5.0,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        self.name = name
        self._url = database_url
        self._copy = copy_query
        self._types = list(column_types)
        self._batch_size = batch_size
        self._linger = linger_seconds
        self._connect_timeout = connect_timeout
        self._queue: asyncio.Queue[Row] = asyncio.Queue(maxsize=queue_size)
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
        if self._queue.full():  # cheaper than raising QueueFull on every row while Postgres is away
            self.refused += 1
            return False
        self._queue.put_nowait(row)
        self.accepted += 1
        return True

    def offer_all(self, rows: Sequence[Row]) -> bool:
        """Queue every row or none (so a client can retry the whole request without duplicates)."""
        if self._queue.maxsize - self._queue.qsize() < len(rows):
            self.refused += len(rows)
            return False
        for row in rows:
            self._queue.put_nowait(row)
        self.accepted += len(rows)
        return True

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._pending)

    @property
    def capacity(self) -> int:
        return self._queue.maxsize

    # ------------------------------------------------------------------ lifespan

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"overnight-{self.name}-writer")

    async def flush(self) -> None:
        """Wait until every row queued so far is written (tests, and `stop`)."""
        while self._queue.qsize() or self._pending:
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
                self._idle.set()
                self._pending.append(await self._queue.get())
                self._take_available()
                if len(self._pending) < self._batch_size and self._linger > 0:
                    # A short wait turns a trickle of rows into fewer, larger COPYs.
                    await asyncio.sleep(self._linger)
                    self._take_available()
            try:
                await self._write(self._pending)
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
        while len(self._pending) < self._batch_size:
            try:
                self._pending.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _write(self, rows: list[Row]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(2, round(self._connect_timeout)),
                application_name=f"overnight-serving-{self.name}",
            )
        async with self._conn.cursor() as cur, cur.copy(self._copy) as copy:
            copy.set_types(self._types)
            for start in range(0, len(rows), _ROWS_PER_YIELD):
                for row in rows[start : start + _ROWS_PER_YIELD]:
                    await copy.write_row(row)
                await asyncio.sleep(0)

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
            "lost": ("overnight_bulk_rows_lost", "Queued rows not written before shutdown, by writer."),
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

ServedRow = tuple[datetime, str, str, int, str, str, Json]


class ServedList(Protocol):
    """One user's answer as the lookup returns it (`serving.lookup.UserRecs`)."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_ids(self) -> Sequence[str]: ...
    @property
    def source(self) -> str: ...


# item_ids is a JSON array: one document costs a third of what fifty text[] elements do to encode
# and to store (sql/migrations/0007), on the cores the lookups share.
SERVED_COLUMN_TYPES = ("timestamptz", "text", "text", "int8", "text", "text", "json")


class PredictionLog:
    """Records a sampled share of answers into ``overnight.served_predictions``; never blocks a lookup."""

    def __init__(self, database_url: str, *, sample_rate: float = 1.0, **writer_options: Any) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate}")
        self.sample_rate = sample_rate
        self.writer: BulkWriter[ServedRow] = BulkWriter(
            "served_predictions",
            database_url,
            sql.query("copy_served_predictions"),
            SERVED_COLUMN_TYPES,
            **writer_options,
        )

    def record(
        self, request_id: str, user_id: str, batch_id: int, variant: str, source: str, item_ids: Sequence[str]
    ) -> bool:
        """Queue one answer (True), or skip it: not sampled, or the queue is full (counted as dropped)."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return False
        return self.writer.offer((datetime.now(UTC), request_id, user_id, batch_id, variant, source, _json(item_ids)))

    def record_answer(self, request_id: str, batch_id: int, variant: str, results: Iterable[ServedList]) -> int:
        """Queue every list of one answer (a batch lookup has many) under one sampling decision; how many."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return 0
        served_at = datetime.now(UTC)
        return sum(
            self.writer.offer(
                (served_at, request_id, recs.user_id, batch_id, variant, recs.source, _json(recs.item_ids))
            )
            for recs in results
        )

    def start(self) -> None:
        self.writer.start()

    async def stop(self, timeout: float = 10.0) -> None:
        await self.writer.stop(timeout)


def _json(item_ids: Sequence[str]) -> Json:
    return Json(item_ids, dumps=orjson.dumps)


def request_id_for(incoming: str | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane token (1-128 visible ASCII), else a new one.

    The response echoes it, and the client sends it back with its feedback events, which is how the
    online report pairs a click with the list it came from.
    """
    if incoming and _REQUEST_ID.match(incoming):
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
