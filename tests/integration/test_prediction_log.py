"""Served-prediction logging: rows land in Postgres in bulk, a full queue drops and counts, never blocks."""

import asyncio
import inspect
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import sql as pgsql

import sql
from jobs.database import upgrade
from jobs.rollouts import online
from jobs.settings import Settings
from serving.prediction_log import (
    _SLICE_ROWS,
    EncodedBatch,
    PredictionLog,
    WriterCollector,
    request_id_for,
)
from tests.support.databases import create_database, drop_database
from tests.support.serving import losing_the_first_reply

pytestmark = pytest.mark.integration
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LoopTurns:
    """A task standing in for the lookups: counts the turns it gets on the event loop, and the longest wait
    between two."""

    def __init__(self, every: float) -> None:
        self.count = 0
        self.longest_wait = 0.0
        self._task = asyncio.create_task(self._run(every))

    async def _run(self, every: float) -> None:
        last = time.perf_counter()
        while True:
            self.count += 1
            now = time.perf_counter()
            self.longest_wait = max(self.longest_wait, now - last)
            last = now
            await asyncio.sleep(every)

    def stop(self) -> None:
        self._task.cancel()


def logged_rows(url: str) -> list[tuple[str, str, int, str, str, int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT p.request_id, p.user_id, p.batch_id, p.variant, p.source, shown.position, shown.item_id "
            "FROM overnight.served_predictions AS p, "
            "json_array_elements_text(p.item_ids) WITH ORDINALITY AS shown (item_id, position) "
            "ORDER BY p.request_id, shown.position"
        ).fetchall()


def test_answers_land_in_postgres_in_bulk_with_item_positions(database_url: str) -> None:
    async def scenario() -> PredictionLog:
        log = PredictionLog(database_url, queue_size=5000, batch_size=500)
        log.start()
        for n in range(2500):
            variant = "canary" if n % 10 == 0 else "production"
            assert log.record(
                f"r{n:05d}",
                f"u{n % 300}",
                7 if variant == "production" else 8,
                variant,
                "personalized",
                [f"i{n}", f"i{n + 1}", f"i{n + 2}"],
            )
        await log.stop()
        return log

    log = asyncio.run(scenario())
    rows = logged_rows(database_url)
    assert len(rows) == 2500 * 3
    assert rows[:3] == [
        ("r00000", "u0", 8, "canary", "personalized", 1, "i0"),
        ("r00000", "u0", 8, "canary", "personalized", 2, "i1"),
        ("r00000", "u0", 8, "canary", "personalized", 3, "i2"),
    ]
    assert log.writer.written == 2500 and log.writer.refused == 0 and log.writer.lost == 0
    with psycopg.connect(database_url) as conn:
        times = conn.execute("SELECT min(served_at), max(served_at) FROM overnight.served_predictions").fetchone()
    assert times is not None and times[0] <= times[1] <= datetime.now(UTC)


def test_a_full_queue_drops_and_counts_and_never_blocks(database_url: str) -> None:
    """The writer stuck on a table lock, its queue full: recording stays a sub-microsecond append or drop,
    and the event loop the lookups share keeps turning. Once the lock goes, what was queued is written."""
    assert not inspect.iscoroutinefunction(PredictionLog.record), "record() must not be awaitable"

    async def scenario() -> tuple[PredictionLog, float, float, LoopTurns]:
        log = PredictionLog(database_url, queue_size=100, batch_size=10, linger_seconds=0)
        log.start()
        async with await psycopg.AsyncConnection.connect(database_url) as blocker:
            await blocker.execute("LOCK TABLE overnight.served_prediction_chunks IN ACCESS EXCLUSIVE MODE")
            heartbeat = LoopTurns(every=0.001)
            slowest = total = 0.0
            for n in range(20_000):
                started = time.perf_counter()
                log.record(f"r{n}", "u", 1, "production", "personalized", ["a", "b"])
                took = time.perf_counter() - started
                slowest, total = max(slowest, took), total + took
                if n % 1000 == 0:
                    await asyncio.sleep(0.01)  # let the writer and the heartbeat run, as between requests
            heartbeat.stop()
            assert log.writer.written == 0  # the writer was stuck all along
            await blocker.rollback()
        await log.stop()
        return log, slowest, total, heartbeat

    log, slowest, total, heartbeat = asyncio.run(scenario())
    writer = log.writer
    print(f"20,000 records against a full queue: {total / 20_000 * 1e6:.2f} µs each, slowest {slowest * 1e3:.2f} ms")
    # Bounds far above what a record takes (about a microsecond), far below a write waiting on the lock.
    assert slowest < 0.05 and total / 20_000 < 20e-6, (slowest, total)
    assert heartbeat.count > 20 and heartbeat.longest_wait < 0.2, (heartbeat.count, heartbeat.longest_wait)
    assert writer.accepted + writer.refused == 20_000
    assert writer.accepted <= 100 + 10  # the queue plus at most one batch taken out by the writer
    assert writer.refused >= 20_000 - 110
    assert (writer.written, writer.lost) == (writer.accepted, 0)

    registry = CollectorRegistry()
    registry.register(WriterCollector([writer]))
    text = generate_latest(registry).decode()
    assert f'overnight_bulk_rows_dropped_total{{writer="served_predictions"}} {float(writer.refused)}' in text


def test_sampling_keeps_the_configured_share(database_url: str) -> None:
    async def scenario() -> PredictionLog:
        log = PredictionLog(database_url, sample_rate=0.1, queue_size=20_000)
        log.start()
        for n in range(10_000):
            log.record(f"r{n}", "u", 1, "production", "fallback", ["x"])
        await log.stop()
        return log

    log = asyncio.run(scenario())
    kept = len(logged_rows(database_url))
    assert kept == log.writer.written
    assert abs(kept - 1000) < 4 * math.sqrt(10_000 * 0.1 * 0.9)


def test_a_lost_connection_is_retried_without_losing_rows(database_url: str) -> None:
    async def scenario() -> PredictionLog:
        log = PredictionLog(database_url, batch_size=50, linger_seconds=0)
        log.start()
        for n in range(100):
            log.record(f"a{n}", "u", 1, "production", "personalized", ["x"])
        await log.writer.flush()
        with psycopg.connect(database_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'overnight-serving-served_predictions'"
            ).fetchone()
        assert killed == (1,)
        for n in range(100):
            log.record(f"b{n}", "u", 1, "production", "personalized", ["x"])
        await log.stop()
        return log

    log = asyncio.run(scenario())
    assert log.writer.write_failures >= 1
    assert len(logged_rows(database_url)) == 200


def test_a_retried_write_whose_commit_reply_was_lost_is_stored_once(
    serving_login: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As the service's role, which may only insert: the retry claims the same write id and inserts nothing."""

    async def scenario() -> PredictionLog:
        log = PredictionLog(serving_login, linger_seconds=0.05)
        losing_the_first_reply(log.writer)
        log.start()
        for n in range(30):
            log.record(f"r{n}", f"u{n}", 1, "production", "personalized", [f"i{n}"])
        await asyncio.wait_for(log.writer.flush(), 10)
        log.record("after", "u", 1, "production", "personalized", ["j"])  # the next batch: a new id
        await log.stop()
        return log

    log = asyncio.run(scenario())
    assert sorted(row[0] for row in logged_rows(database_url)) == sorted([f"r{n}" for n in range(30)] + ["after"])
    assert (log.writer.written, log.writer.write_failures, log.writer.lost) == (31, 1, 0)
    with psycopg.connect(database_url) as conn:
        claims = conn.execute("SELECT writer, row_count FROM overnight.bulk_writes ORDER BY row_count").fetchall()
        chunks = conn.execute("SELECT count(*) FROM overnight.served_prediction_chunks").fetchone()
    assert claims == [("served_predictions", 1), ("served_predictions", 30)] and chunks == (2,)
    assert "were stored already, by an attempt whose reply was lost" in caplog.text


def last_write_gauge(log: PredictionLog) -> float:
    registry = CollectorRegistry()
    registry.register(WriterCollector([log.writer]))
    value = registry.get_sample_value("overnight_bulk_last_write_timestamp_seconds", {"writer": log.writer.name})
    assert value is not None
    return value


def test_a_write_stuck_on_a_lock_times_out_is_retried_and_loses_nothing(database_url: str) -> None:
    async def scenario() -> tuple[PredictionLog, int, bool]:
        log = PredictionLog(database_url, batch_size=50, linger_seconds=0, write_timeout=0.3)
        log.start()
        for n in range(10):
            log.record(f"a{n}", "u", 1, "production", "personalized", ["x"])
        await log.writer.flush()
        before = last_write_gauge(log)
        async with await psycopg.AsyncConnection.connect(database_url) as blocker:
            await blocker.execute("LOCK TABLE overnight.served_prediction_chunks IN ACCESS EXCLUSIVE MODE")
            for n in range(100):
                log.record(f"b{n}", "u", 1, "production", "personalized", ["x"])
            await asyncio.sleep(1.5)  # the writes wait for the lock, and give up
            assert log.writer.written == 10 and log.writer.queued == 100
            failures = log.writer.write_failures
            stuck = last_write_gauge(log) == before
            await blocker.rollback()
        await asyncio.wait_for(log.writer.flush(), 10)
        advanced = last_write_gauge(log) > before
        await log.stop()
        return log, failures, stuck and advanced

    log, failures_while_locked, gauge_told = asyncio.run(scenario())
    assert failures_while_locked >= 2
    assert gauge_told  # the last-write time stood still while the writer was stuck, and moved after
    assert (log.writer.written, log.writer.lost) == (110, 0)
    assert len(logged_rows(database_url)) == 110


def test_a_writer_that_fails_unexpectedly_is_restarted_and_keeps_its_rows(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> PredictionLog:
        log = PredictionLog(database_url, linger_seconds=0)
        encode = log.writer._encode
        failed = []

        def encode_failing_once(rows: list[Any]) -> tuple[bytes, int]:
            if not failed:
                failed.append(True)
                raise RuntimeError("a bug")
            return encode(rows)

        log.writer._encode = encode_failing_once  # type: ignore[method-assign]
        log.start()
        for n in range(20):
            log.record(f"r{n}", "u", 1, "production", "personalized", ["x"])
        await asyncio.wait_for(log.writer.flush(), 10)
        await log.stop()
        return log

    log = asyncio.run(scenario())
    assert (log.writer.restarts, log.writer.written, log.writer.lost) == (1, 20, 0)
    assert len(logged_rows(database_url)) == 20
    assert "the writer failed; restarting it" in caplog.text


def test_a_large_batch_is_encoded_a_slice_at_a_time_and_lookups_run_between_slices() -> None:
    async def scenario() -> tuple[PredictionLog, EncodedBatch, int]:
        log = PredictionLog("postgresql://never-connected", queue_size=5000, batch_size=1000)
        for n in range(1500):
            log.record(f"r{n:04d}", f"u{n}", 7, "production", "personalized", [f"i{n}", f"i{n + 1}"])
        lookups = LoopTurns(every=0)
        await asyncio.sleep(0)
        before = lookups.count
        batch = EncodedBatch()
        assert await log.writer._encode_queued(batch)  # full
        lookups.stop()
        return log, batch, lookups.count - before

    log, batch, turns = asyncio.run(scenario())
    assert batch.count == 1000 and log.writer.queued == 500
    assert batch.slices == math.ceil(1000 / _SLICE_ROWS) and turns >= batch.slices - 1
    assert [row[1] for row in orjson.loads(batch.json)] == [f"r{n:04d}" for n in range(1000)]
    assert batch.first <= batch.last


def test_a_lingering_batch_encodes_rows_as_they_come_and_counts_them_until_written() -> None:
    async def scenario() -> tuple[PredictionLog, int, int, bool]:
        log = PredictionLog("postgresql://never-connected", queue_size=100, linger_seconds=30)
        log.start()
        for n in range(100):
            log.record(f"r{n}", f"u{n}", 7, "production", "personalized", [f"i{n}"])
        await asyncio.sleep(0.2)  # well within the linger: nothing is written, all is encoded
        in_queue, held = len(log.writer._queue), log.writer.queued
        # The batch's rows still wait to be written: they count against the queue's size.
        one_more = log.record("r100", "u100", 7, "production", "personalized", ["i100"])
        await log.stop(timeout=0.1)
        return log, in_queue, held, one_more

    log, in_queue, held, one_more = asyncio.run(scenario())
    assert (in_queue, held, one_more) == (0, 100, False)
    assert (log.writer.written, log.writer.refused) == (0, 1)
    assert log.writer.lost == 100  # an unwritten batch is counted at shutdown like queued rows


def test_odd_text_round_trips_and_a_row_json_cannot_carry_is_dropped_alone(database_url: str) -> None:
    odd_user, odd_item = "u\"\\ '; DROP TABLE x; -- é 😀", 'i\t"[1]"\\n'

    async def scenario() -> PredictionLog:
        log = PredictionLog(database_url, linger_seconds=0.2)
        log.start()
        log.record("r1", odd_user, 1, "production", "personalized", [odd_item, "plain"])
        log.record("r2", "u\ud800", 1, "production", "personalized", ["x"])  # a lone surrogate: not UTF-8
        log.record("r3", "u3", 1, "production", "personalized", ["y"])
        await log.stop()
        return log

    log = asyncio.run(scenario())
    assert [(row[0], row[1], row[6]) for row in logged_rows(database_url)] == [
        ("r1", odd_user, odd_item),
        ("r1", odd_user, "plain"),
        ("r3", "u3", "y"),
    ]
    assert log.writer.written == 2 and log.writer.lost == 1


def test_request_ids_are_echoed_when_sane_and_made_up_otherwise() -> None:
    assert request_id_for("abc-123") == "abc-123"
    for bad in (None, "", "has space", "x" * 129, "ünicode", "new\nline", "trailing\n"):
        made = request_id_for(bad)
        assert made != bad and len(made) == 32
    assert request_id_for(None) != request_id_for(None)


def test_daily_partitions_are_made_ahead_take_stray_rows_and_expire(database_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=database_url, data_dir=tmp_path, online_keep_days=30)
    later = datetime.now(UTC).date() + timedelta(days=20)
    stray = datetime.combine(later, datetime.min.time(), UTC) + timedelta(hours=23, minutes=59)
    with psycopg.connect(database_url) as conn:
        # A day without its partition yet: the chunk waits in the default partition.
        conn.execute(
            "INSERT INTO overnight.served_prediction_chunks VALUES (%s, %s, 1, %s)",
            (stray, stray, f'[["{stray.isoformat()}", "r", "u", 1, "production", "personalized", ["a"]]]'),
        )
    result = online.maintain_tables(settings, today=later)
    assert result["created_partitions"] == {"served_prediction_chunks": 9, "feedback_events": 9}
    # The migration's partitions (around today) are more than 30 days before `later + 30`.
    expired = online.maintain_tables(settings, today=later + timedelta(days=30))
    assert expired["dropped_partitions"]["served_prediction_chunks"] >= 4
    name = f"served_prediction_chunks_{later:%Y%m%d}"
    with psycopg.connect(database_url) as conn:
        moved = conn.execute(
            pgsql.SQL("SELECT first_served_at FROM overnight.{}").format(pgsql.Identifier(name))
        ).fetchall()
        left = conn.execute("SELECT count(*) FROM overnight.served_prediction_chunks_default").fetchone()
        partitions = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'overnight.served_prediction_chunks'::regclass ORDER BY 1"
            )
        ]
        storage = conn.execute(
            "SELECT a.attstorage, a.attcompression FROM pg_attribute a "
            "WHERE a.attrelid = %s::regclass AND a.attname = 'answers'",
            (f"overnight.{name}",),
        ).fetchone()
        served = conn.execute(
            "SELECT served_at, request_id, item_ids::text FROM overnight.served_predictions"
        ).fetchall()
    assert moved == [(stray,)] and left == (0,)
    assert served == [(stray, "r", '["a"]')]
    assert partitions[0] == f"served_prediction_chunks_{later:%Y%m%d}"  # every older day is gone
    assert partitions[-1] == "served_prediction_chunks_default"
    # A partition made later stores its chunks as the parent does: never pglz-compressed.
    assert storage in {("x", "l"), ("e", "")}
    assert online.maintain_tables(settings, today=later + timedelta(days=30))["created_partitions"] == {
        "served_prediction_chunks": 0,
        "feedback_events": 0,
    }


def test_write_ids_are_kept_two_days(database_url: str, tmp_path: Path) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO overnight.bulk_writes (write_id, writer, row_count, written_at) VALUES "
            "('old', 'feedback_events', 3, now() - interval '2 days 1 minute'), "
            "('recent', 'served_predictions', 5, now() - interval '1 day 23 hours'), "
            "('new', 'served_predictions', 1, DEFAULT)"
        )
    result = online.maintain_tables(Settings(database_url=database_url, data_dir=tmp_path))
    with psycopg.connect(database_url) as conn:
        kept = conn.execute("SELECT write_id FROM overnight.bulk_writes ORDER BY write_id").fetchall()
    assert result["deleted_write_ids"] == 1
    assert kept == [("new",), ("recent",)]


@dataclass(frozen=True)
class Served:
    user_id: str
    item_ids: list[str]
    source: str


def test_a_batch_answer_is_logged_under_one_request_id_and_one_sampling_decision(database_url: str) -> None:
    answer = [Served("u1", ["a", "b"], "personalized"), Served("u2", ["p"], "fallback")]

    async def scenario() -> tuple[int, int]:
        log = PredictionLog(database_url)
        log.start()
        kept = log.record_answer("req-1", 9, "canary", answer)
        skipped = PredictionLog(database_url, sample_rate=0.0).record_answer("req-2", 9, "canary", answer)
        await log.stop()
        return kept, skipped

    assert asyncio.run(scenario()) == (2, 0)
    assert sorted(logged_rows(database_url), key=lambda row: (row[1], row[5])) == [
        ("req-1", "u1", 9, "canary", "personalized", 1, "a"),
        ("req-1", "u1", 9, "canary", "personalized", 2, "b"),
        ("req-1", "u2", 9, "canary", "fallback", 1, "p"),
    ]


def around_next_midnight(*milliseconds: int) -> tuple[datetime, list[datetime]]:
    midnight = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    return midnight, [midnight + timedelta(milliseconds=ms) for ms in milliseconds]


def log_answers_served_at(database_url: str, times: list[datetime]) -> None:
    """Answers r0, r1, ... served at `times`, all queued before the writer takes any, then written."""

    async def scenario() -> None:
        log = PredictionLog(database_url, batch_size=100, linger_seconds=0.01)
        for n, served_at in enumerate(times):
            micros = (served_at - EPOCH) // timedelta(microseconds=1)
            assert log.writer.offer((micros, f"r{n}", "u", 1, "production", "personalized", [f"i{n}"]))
        log.start()
        await log.stop()

    asyncio.run(scenario())


def test_answers_around_midnight_are_stored_by_day_and_read_back_by_window(database_url: str) -> None:
    midnight, times = around_next_midnight(-3, -2, -1, 0, 1, 2)
    log_answers_served_at(database_url, times)
    with psycopg.connect(database_url) as conn:
        chunks = conn.execute(
            "SELECT tableoid::regclass::text, first_served_at, last_served_at, answer_count "
            "FROM overnight.served_prediction_chunks ORDER BY first_served_at"
        ).fetchall()
        window = conn.execute(
            "SELECT request_id FROM overnight.served_predictions_between(%s, %s) ORDER BY served_at",
            (times[1], times[4]),
        ).fetchall()
        everything = conn.execute("SELECT count(*) FROM overnight.served_predictions").fetchone()
    # Six answers queued together become one chunk per UTC day, each in its day's partition.
    assert chunks == [
        (f"overnight.served_prediction_chunks_{times[0]:%Y%m%d}", times[0], times[2], 3),
        (f"overnight.served_prediction_chunks_{midnight:%Y%m%d}", times[3], times[5], 3),
    ]
    assert window == [("r1",), ("r2",), ("r3",)]  # [start, end)
    assert everything == (6,)


def test_a_clock_stepping_back_over_midnight_never_mixes_days_in_a_chunk(database_url: str) -> None:
    # The first and the last are of one day: only the earliest and the latest show the other day.
    _, times = around_next_midnight(-2, 1, 2, -1)
    log_answers_served_at(database_url, times)
    with psycopg.connect(database_url) as conn:
        chunks = conn.execute(
            "SELECT first_served_at, last_served_at, answer_count FROM overnight.served_prediction_chunks "
            "ORDER BY first_served_at, last_served_at"
        ).fetchall()
        logged = conn.execute("SELECT request_id, served_at FROM overnight.served_predictions ORDER BY 1").fetchall()
    # Each run of one day's answers, in queue order, is a chunk of its own.
    assert chunks == [(times[0], times[0], 1), (times[3], times[3], 1), (times[1], times[2], 2)]
    assert logged == [(f"r{n}", served_at) for n, served_at in enumerate(times)]


def test_the_migration_moves_answers_logged_one_row_each_into_chunks(postgres_admin_url: str) -> None:
    url = create_database(postgres_admin_url)
    try:
        with psycopg.connect(url) as conn:
            # The schema as of migration 0007, with answers logged the old way.
            with conn.transaction():
                conn.execute(sql.query("create_migrations_table"))
                for migration in sql.migrations():
                    if migration.version < 8:
                        conn.execute(migration.text.encode())
                        conn.execute(sql.query("record_migration"), (migration.version, migration.name))
            now = datetime.now(UTC).replace(microsecond=500_000)
            old_rows = [
                (now - timedelta(seconds=s), f"r{s}", f"u{s}", 3, "canary" if s % 2 else "production", "personalized")
                for s in range(5)
            ]
            for row in old_rows:
                conn.execute(
                    "INSERT INTO overnight.served_predictions VALUES (%s, %s, %s, %s, %s, %s, %s::json)",
                    (*row, f'["a{row[1]}", "b{row[1]}"]'),
                )
            conn.commit()
            # 0008 moves them into chunks, with RFC 3339 times; the readers of 0009 and 0010 (which decodes
            # them as jsonb) take those and integers.
            assert upgrade(conn) == [m.version for m in sql.migrations() if m.version >= 8]
            moved = conn.execute(
                "SELECT served_at, request_id, user_id, batch_id, variant, source, item_ids::text "
                "FROM overnight.served_predictions ORDER BY served_at DESC"
            ).fetchall()
            chunks = conn.execute("SELECT count(*) FROM overnight.served_prediction_chunks").fetchone()
        assert moved == [(*row, f'["a{row[1]}", "b{row[1]}"]') for row in old_rows]
        assert chunks == (5,)  # one per second
    finally:
        drop_database(postgres_admin_url, url)
