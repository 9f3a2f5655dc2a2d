"""Feedback events into ingest on a real Postgres: read by when they were received, kept exactly once,
validated like a source, never adding items to the catalogue, and their drops watched by monitoring."""

import json
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest

from jobs import lake, nightly
from jobs.monitoring import checks, drift
from jobs.settings import Settings
from jobs.steps import ingest
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration

D = SAMPLE_DATE
DAY = lake.day_start(D)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", database_url=database_url)


def store(settings: Settings, *events: tuple[datetime, datetime, str, str, str]) -> None:
    """(occurred_at, received_at, user_id, item_id, event_type) rows, as the service writes them."""
    with psycopg.connect(str(settings.database_url)) as conn:
        for event in events:
            conn.execute("INSERT INTO overnight.feedback_events VALUES (%s, %s, %s, %s, %s, NULL)", event)


def lake_rows(settings: Settings, as_of: date, user: str) -> list[tuple[object, ...]]:
    return (
        lake.scan_interactions(settings.lake_dir, as_of)
        .filter(pl.col("user_id") == user)
        .select("item_id", "timestamp", "event_type")
        .sort("timestamp")
        .collect()
        .rows()
    )


def test_an_event_received_days_after_it_happened_is_ingested_once(settings: Settings, sample_source: Path) -> None:
    # Within the service's 7 days, beyond OVERNIGHT_FEEDBACK_LATE_DAYS (2): a window by event time missed it.
    happened = DAY - timedelta(days=5) + timedelta(hours=12)
    ingest.ingest(settings, sample_source, D)  # an earlier run of D, before the event arrived
    store(settings, (happened, DAY + timedelta(hours=10), "u-late", "5", "click"))

    on_d = ingest.ingest(settings, sample_source, D)
    assert (on_d.feedback_read, on_d.feedback_used, on_d.feedback_dropped_by_reason) == (1, 1, {})
    assert lake_rows(settings, D, "u-late") == [("5", happened, "click")]
    # In the partition of the day it happened, with its own time.
    partition = pl.read_parquet(lake.partition_path(settings.lake_dir, happened.date()))
    assert partition.filter(pl.col("user_id") == "u-late").height == 1

    on_next = ingest.ingest(settings, sample_source, D + timedelta(days=1))
    assert on_next.feedback_read == 1  # read again (received within the late days), merged as already held
    assert lake_rows(settings, D + timedelta(days=1), "u-late") == [("5", happened, "click")]


def test_a_rerun_of_d_does_not_take_what_arrived_after_d(settings: Settings, sample_source: Path) -> None:
    on_time = (DAY + timedelta(hours=9), DAY + timedelta(hours=9), "u-rerun", "3", "click")
    store(settings, on_time)
    first = ingest.ingest(settings, sample_source, D)
    late = (DAY + timedelta(hours=20), DAY + timedelta(days=1, minutes=30), "u-rerun", "4", "conversion")
    store(settings, late)

    rerun = ingest.ingest(settings, sample_source, D)
    assert (rerun.feedback_read, rerun.feedback_used) == (first.feedback_read, first.feedback_used) == (1, 1)
    assert lake_rows(settings, D, "u-rerun") == [("3", on_time[0], "click")]

    ingest.ingest(settings, sample_source, D + timedelta(days=1))  # the next night takes it, at its own time
    assert lake_rows(settings, D + timedelta(days=1), "u-rerun") == [
        ("3", on_time[0], "click"),
        ("4", late[0], "conversion"),
    ]


def test_an_event_stamped_after_d_waits_for_its_own_night_even_without_late_days(
    settings: Settings, sample_source: Path
) -> None:
    settings = settings.model_copy(update={"feedback_late_days": 0})
    # The service allows 5 minutes of client clock skew: received on D, happened on D + 1.
    ahead = (DAY + timedelta(days=1, minutes=2), DAY + timedelta(days=1) - timedelta(minutes=1), "u-skew", "6", "click")
    store(settings, ahead)
    assert ingest.ingest(settings, sample_source, D).feedback_read == 0
    assert ingest.ingest(settings, sample_source, D + timedelta(days=1)).feedback_used == 1
    assert lake_rows(settings, D + timedelta(days=1), "u-skew") == [("6", ahead[0], "click")]


def test_feedback_on_unknown_items_or_with_bad_ids_is_dropped_and_counted(
    settings: Settings, sample_source: Path
) -> None:
    without = ingest.ingest(settings.model_copy(update={"ingest_feedback": False}), sample_source, D)
    at = DAY + timedelta(hours=9)
    store(
        settings,
        (at, at, "u-fb", "7", "click"),
        (at, at, "u-fb", "7", "click"),  # sent twice
        (at, at, "u-fb", "no-such-item", "click"),
        (at, at, "u-fb", "no-such-item", "conversion"),
        (at, at, "u\x01fb", "8", "click"),  # written past the service's checks
        (at, at, "u-fb", "9", "impression"),  # weight 0: not read
    )
    result = ingest.ingest(settings, sample_source, D)

    dropped = {"unknown_item": 2, "duplicate": 1, "bad_user_id": 1}
    assert (result.feedback_read, result.feedback_used, result.feedback_dropped_by_reason) == (5, 1, dropped)
    assert result.items_in_catalogue == without.items_in_catalogue == 120
    catalogue = lake.read_catalogue(settings.lake_dir, D)
    assert "no-such-item" not in catalogue["item_id"].to_list()
    assert lake_rows(settings, D, "u-fb") == [("7", at, "click")]
    # The source's own counts are untouched: feedback drops never fail a night.
    assert (result.rows_read, result.rows_quarantined) == (without.rows_read, without.rows_quarantined)
    assert result.feedback_quarantine_path is not None
    set_aside = pl.read_parquet(result.feedback_quarantine_path)
    assert dict(set_aside.group_by("reason").len().iter_rows()) == dropped
    report = json.loads(Path(result.report_path).read_text())
    assert report["feedback_dropped_by_reason"] == dropped and report["feedback_used"] == 1
    assert "1 of 5 feedback events, 4 dropped" in result.summary()


def feedback_check(settings: Settings) -> dict[str, object]:
    with psycopg.connect(str(settings.database_url)) as conn:
        stored = checks.stored_checks(conn, D)
    return next(c for c in stored if c["statistic"] == "feedback_dropped_share")


def test_a_client_sending_mostly_unknown_items_warns_and_the_night_still_publishes(
    settings: Settings, sample_source: Path
) -> None:
    at = DAY + timedelta(hours=9)
    store(settings, *[(at, at, f"u-sku{n}", str(n), "click") for n in (1, 2)])
    store(settings, *[(at, at, f"u-sku{n}", f"SKU-{n:05d}", "click") for n in range(8)])  # the client's own ids

    night = nightly.run(nightly.night_of(settings, D, sample_source))

    check = feedback_check(settings)
    assert (check["level"], check["value"], check["warn_at"], check["fail_at"]) == ("warn", 0.8, 0.05, None)
    assert check["details"] == {"feedback_read": 10, "feedback_dropped_by_reason": {"unknown_item": 8}}
    with psycopg.connect(str(settings.database_url)) as conn:
        live = conn.execute("SELECT batch_id FROM overnight.live").fetchone()
        report = checks.stored_reports(conn, D)["input"]["report"]
    assert live == (night.batch_id,)  # a warn, and no fail threshold by default: the batch went live
    assert (report["feedback_read"], report["feedback_dropped"], report["feedback_dropped_share"]) == (10, 8, 0.8)


def test_clean_feedback_is_ok_and_a_night_without_feedback_is_not_measured(
    settings: Settings, sample_source: Path
) -> None:
    at = DAY + timedelta(hours=9)
    store(settings, *[(at, at, f"u-clean{n}", str(n), "click") for n in range(1, 6)])

    nightly.run(nightly.night_of(settings, D, sample_source))
    check = feedback_check(settings)
    assert (check["level"], check["value"]) == ("ok", 0.0)

    without = settings.model_copy(update={"ingest_feedback": False})
    ingest.ingest(without, sample_source, D)
    drift.monitor_input(without, D)
    check = feedback_check(settings)
    assert (check["level"], check["value"], check["message"]) == ("ok", None, "feedback_dropped_share: not measured")
