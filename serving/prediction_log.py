"""Writing rows to Postgres in bulk, off the request path: what was served (`PredictionLog`), and the writer it
shares with the feedback endpoint (`BulkWriter`): a bounded queue requests never wait on, encoded a slice at a time,
each batch one statement retried until Postgres takes it, and stored once by its write id. Why it is built this way:
docs/serving.md#the-prediction-log-and-feedback-writers."""

import asyncio
import contextlib
import itertools
import logging
import os
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from operator import itemgetter
from typing import Any, Generic, LiteralString, Protocol, TypeVar

import orjson
import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg import postgres
from psycopg.adapt import Buffer, Dumper

import sql
from common.text import first_line

logger = logging.getLogger(__name__)

Row = TypeVar("Row", bound=tuple[Any, ...])  # a row's first field is its time

_FIRST_RETRY_SECONDS = 0.2
_MAX_RETRY_SECONDS = 5.0
_RESTART_SECONDS = 1.0
# Past the statement timeout Postgres has given up on the write; the client's own deadline, later, only
# catches a reply that never comes (a silent network).
_CLIENT_GRACE_SECONDS = 5.0
_SLICE_ROWS = 200  # encoded and released in one go: some 30 microseconds of the event loop
_ENCODE_EVERY_SECONDS = 0.01  # while a batch lingers: rows still in the CPU's caches
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


class EncodedBatch:
    """Rows taken from the queue until they are written: their JSON, their count and times, and the id
    every attempt to write them carries (see the module's notes)."""

    __slots__ = ("count", "first", "json", "last", "slices", "write_id")

    def __init__(self) -> None:
        # Random, drawn per batch (a few a second): unique across workers, forks and restarts without
        # anything to renew, where a per-process prefix and a counter would have to be redrawn after a fork.
        self.write_id = uuid.uuid4().hex
        # One JSON array of every row so far, grown a slice at a time while the slice is in the CPU's
        # caches: joining the slices at write time would hold the event loop for the whole copy at once.
        self.json = bytearray()
        self.slices = 0
        self.count = 0
        self.first: Any = None
        self.last: Any = None

    def add(self, encoded: bytes, count: int, earliest: Any, latest: Any) -> None:
        """Append a slice's rows (`encoded`: their own JSON array)."""
        if not count:
            return
        if self.json:
            self.json[-1:] = b","  # the array's closing bracket becomes the separator, in place
            self.json += memoryview(encoded)[1:]
        else:
            self.json += encoded
        self.slices += 1
        self.count += count
        self.first = earliest if self.first is None else min(self.first, earliest)
        self.last = latest if self.last is None else max(self.last, latest)


class JsonText:
    """JSON already encoded, sent as a ``text`` parameter: stored as is into a text column, or cast
    (``::jsonb``). As a ``json`` parameter Postgres would first parse every byte of it, only to
    check it."""

    __slots__ = ("data",)

    def __init__(self, data: Buffer) -> None:
        self.data = data


class _JsonTextDumper(Dumper):
    oid = postgres.types["text"].oid

    def dump(self, obj: JsonText) -> Buffer:
        return obj.data


class BulkWriter(Generic[Row]):
    """A bounded queue of rows and the task that inserts them into one table in batches.

    `insert_query` takes named parameters: ``rows``, the batch as one JSON array passed as ``text``
    (cast it, ``::jsonb``, or store it in a text column as is; each row is a JSON array: the tuple as orjson
    encodes it, datetimes as RFC 3339), ``count``, ``first`` and ``last``, the earliest and latest
    of the rows' first fields (their times), and ``write_id``, the batch's id, the same on every retry.
    The query stores the batch only if it has not stored that id before (claiming it in
    ``overnight.bulk_writes`` in the same statement), and inserts no row when it has: a write whose rows
    were all stored already, by an attempt whose reply was lost. `batch_key`, a function of a row's time that never
    decreases as the time grows (its day, say), keeps rows whose keys differ out of one batch.
    `offer` and `offer_all` are the request side: synchronous, O(1), never blocking. `start` and
    `stop` belong to the app's lifespan.
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
        write_timeout: float = 5.0,
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
        self._write_timeout = write_timeout
        self._batch_key = batch_key
        self._capacity = queue_size
        self._queue: deque[Row] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._batch: EncodedBatch | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepted = 0
        self.refused = 0
        self.written = 0
        self.write_failures = 0
        self.lost = 0
        self.restarts = 0
        self.last_write = time.time()  # of the last successful write, or the start

    # ------------------------------------------------------------------ request side

    def offer(self, row: Row) -> bool:
        """Queue one row; False (and counted as refused) when `capacity` rows already wait to be written."""
        if self.queued >= self._capacity:
            self.refused += 1
            return False
        self._queue.append(row)
        self.accepted += 1
        self._arrived.set()
        return True

    def offer_all(self, rows: Sequence[Row]) -> bool:
        """Queue every row or none (so a client can retry the whole request without duplicates)."""
        if self._capacity - self.queued < len(rows):
            self.refused += len(rows)
            return False
        self._queue.extend(rows)
        self.accepted += len(rows)
        self._arrived.set()
        return True

    @property
    def queued(self) -> int:
        """Rows waiting to be written: in the queue, and in the batch being filled or written."""
        return len(self._queue) + (self._batch.count if self._batch else 0)

    @property
    def capacity(self) -> int:
        return self._capacity

    # ------------------------------------------------------------------ lifespan

    def start(self) -> None:
        if self._task is None:
            self.last_write = time.time()
            self._task = asyncio.create_task(self._run_until_stopped(), name=f"overnight-{self.name}-writer")

    async def flush(self) -> None:
        """Wait until every row queued so far is written (tests, and `stop`)."""
        while self._queue or self._batch:
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

    async def _run_until_stopped(self) -> None:
        """`_run`, restarted if it fails unexpectedly (a bug): the rows it holds stay queued for the next
        run, and `overnight_bulk_last_write_timestamp_seconds` shows a writer that keeps failing."""
        while True:
            try:
                await self._run()
            except Exception:
                self.restarts += 1
                logger.exception("%s: the writer failed; restarting it in %.0f s", self.name, _RESTART_SECONDS)
                await self._close_broken()
                await asyncio.sleep(_RESTART_SECONDS)

    async def _run(self) -> None:
        backoff = _FIRST_RETRY_SECONDS
        while True:
            if self._batch is not None and not self._batch.count:  # left by a failed run
                self._batch = None
            if self._batch is None:
                if not self._queue:
                    self._idle.set()
                    self._arrived.clear()
                    await self._arrived.wait()
                self._batch = batch = EncodedBatch()
                await self._fill(batch)
                if not batch.count:  # none of them could be encoded (counted as lost)
                    self._batch = None
                    continue
            try:
                stored = await self._write(self._batch)
            except (psycopg.Error, OSError) as error:  # OSError: TimeoutError too
                self.write_failures += 1
                delay = backoff * random.uniform(0.5, 1.0)
                logger.warning(
                    "%s: writing %d rows failed (%s); retrying in %.1f s",
                    self.name,
                    self._batch.count,
                    first_line(error),
                    delay,
                )
                await self._close_broken()
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, _MAX_RETRY_SECONDS)
            else:
                if not stored:
                    logger.warning(
                        "%s: the %d rows of write %s were stored already, by an attempt whose reply was lost",
                        self.name,
                        self._batch.count,
                        self._batch.write_id,
                    )
                self.written += self._batch.count
                self.last_write = time.time()
                self._batch = None
                backoff = _FIRST_RETRY_SECONDS

    async def _fill(self, batch: EncodedBatch) -> None:
        """Encode rows into `batch` as they arrive (see the module's notes) until it is full, or
        `linger` seconds have passed."""
        deadline = asyncio.get_running_loop().time() + self._linger
        while not await self._encode_queued(batch):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.sleep(min(_ENCODE_EVERY_SECONDS, left))

    async def _encode_queued(self, batch: EncodedBatch) -> bool:
        """Move the queued rows (as many as `batch` takes) into it, encoded, a slice at a time; True
        when it takes no more: it is full, or the next row's `batch_key` differs.

        Between slices the lookups run, so one that arrives meanwhile waits for one slice (tens of
        microseconds), not for all. A slice's rows are let go once encoded: the batch keeps only their
        JSON, for its retries.
        """
        queue = self._queue
        key_of = self._batch_key
        while queue:
            if batch.count >= self._batch_size:
                return True
            rows = list(itertools.islice(queue, min(_SLICE_ROWS, self._batch_size - batch.count, len(queue))))
            times = list(map(_time_of, rows))
            cut = False
            if key_of is not None:
                key = key_of(times[0] if batch.first is None else batch.first)
                # The key never decreases with the time, so when the earliest and the latest row have
                # the batch's key, all do; only a slice that reaches past (say) midnight is walked.
                if key_of(min(times)) != key or key_of(max(times)) != key:
                    keep = 0
                    while key_of(times[keep]) == key:
                        keep += 1
                    rows, times, cut = rows[:keep], times[:keep], True
            if rows:
                encoded, count = self._encode(rows)
                for _ in range(len(rows)):
                    queue.popleft()
                batch.add(encoded, count, min(times), max(times))
                del rows
            if cut:
                return True
            await asyncio.sleep(0)
        return batch.count >= self._batch_size

    def _encode(self, rows: list[Row]) -> tuple[bytes, int]:
        """The rows as one JSON array, and how many it holds. A row JSON cannot carry (a lone surrogate
        in a string, say) could never be written and would block every row behind it: it is dropped
        and counted lost."""
        try:
            return orjson.dumps(rows), len(rows)
        except orjson.JSONEncodeError:
            encodable = []
            for row in rows:
                with contextlib.suppress(orjson.JSONEncodeError):
                    orjson.dumps(row)
                    encodable.append(row)
            self.lost += len(rows) - len(encodable)
            logger.error("%s: %d rows cannot be encoded and are lost", self.name, len(rows) - len(encodable))
            return orjson.dumps(encodable), len(encodable)

    async def _write(self, batch: EncodedBatch) -> bool:
        """Write the batch; False when its write id was stored before (and so were its rows)."""
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(2, round(self._connect_timeout)),
                application_name=f"overnight-serving-{self.name}",
                # A peer gone silent (a dead host, a dropped route) breaks the connection in seconds,
                # instead of leaving the write waiting for the kernel's default of hours.
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                tcp_user_timeout=round((self._write_timeout + _CLIENT_GRACE_SECONDS) * 1000),
            )
            self._conn.adapters.register_dumper(JsonText, _JsonTextDumper)
            # A write stuck on a lock gives up, so it is retried and the writer reports it.
            timeout_ms = str(max(1, round(self._write_timeout * 1000)))
            await asyncio.wait_for(self._conn.execute(sql.query("serving_session"), (timeout_ms,)), self._deadline)
        parameters = {
            "rows": JsonText(batch.json),
            "count": batch.count,
            "first": batch.first,
            "last": batch.last,
            "write_id": batch.write_id,
        }
        cursor = await asyncio.wait_for(self._conn.execute(self._insert, parameters), self._deadline)
        return cursor.rowcount > 0

    @property
    def _deadline(self) -> float:
        return self._write_timeout + _CLIENT_GRACE_SECONDS

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
            "refused": (
                "overnight_bulk_rows_dropped",
                "Rows refused because the queue was full, by writer "
                "(feedback_events: the events of requests answered 503, for the client to retry).",
            ),
            "written": ("overnight_bulk_rows_written", "Rows written to Postgres, by writer."),
            "write_failures": ("overnight_bulk_write_failures", "Failed bulk writes (retried), by writer."),
            "lost": ("overnight_bulk_rows_lost", "Queued rows never written (at shutdown, or unencodable), by writer."),
            "restarts": (
                "overnight_bulk_writer_restarts",
                "Writer tasks restarted after an unexpected error, by writer.",
            ),
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
        last_write = GaugeMetricFamily(
            "overnight_bulk_last_write_timestamp_seconds",
            "Unix time of the last successful write (or the writer's start), by writer; "
            "old while rows are queued: the writer is stuck.",
            labels=["writer"],
        )
        for writer in self.writers:
            last_write.add_metric([writer.name], writer.last_write)
        yield last_write


# ---------------------------------------------------------------------------- served predictions

# Served at (microseconds since the Unix epoch: cheaper to take and to encode than a datetime, on
# the request path), request id, user, batch, variant, source, item ids.
ServedRow = tuple[int, str, str, int, str, str, Sequence[str]]
MICROSECONDS_PER_DAY = 86_400_000_000


class ServedList(Protocol):
    """One user's answer as the lookup returns it (`serving.lookup.Recs`)."""

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
        for recs in results:  # a loop, not sum() over a generator: cheaper on every request
            queued += offer((served_at, request_id, recs.user_id, batch_id, variant, recs.source, recs.item_ids))
        return queued

    def record_answers(self, request_id: str, answers: Iterable[tuple[int, str, Iterable[ServedList]]]) -> int:
        """`record_answer` for a request answered from several batches, (batch id, variant, lists) each (a
        batch lookup with users in both arms): one sampling decision for the whole request; how many."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return 0
        served_at = time.time_ns() // 1000
        offer = self.writer.offer
        queued = 0
        for batch_id, variant, results in answers:
            for recs in results:
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
