"""The online report's counts on a handful of answers and events, worked out by hand: lists of different
lengths, feedback on some items, feedback that matches nothing, a batch the registry does not know."""

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from jobs.rollouts import online
from jobs.settings import Settings
from serving.prediction_log import PredictionLog

pytestmark = pytest.mark.integration


def test_counts_by_position_match_the_hand_count_and_stray_feedback_is_counted_apart(
    database_url: str, tmp_path: Path
) -> None:
    async def log_answers() -> None:
        log = PredictionLog(database_url)
        log.start()
        log.record("r1", "u1", 7, "production", "personalized", ["a", "b", "c"])
        log.record("r2", "u2", 7, "production", "personalized", ["a", "b"])
        log.record("r3", "u3", 7, "canary", "personalized", ["x"])
        log.record("r4", "u1", 8, "production", "personalized", ["d"])  # u1 again, from another batch
        await log.stop()

    asyncio.run(log_answers())
    now = datetime.now(UTC)
    events = [
        ("u1", "c", "impression", "r1"),
        ("u1", "c", "click", "r1"),  # position 3 of r1
        ("u2", "a", "impression", "r2"),  # seen, not clicked
        ("u2", "z", "click", "r2"),  # an item r2 did not serve
        ("u3", "x", "conversion", "r3"),  # a conversion: seen, though no impression was sent
        ("u9", "a", "click", None),  # names no request
    ]
    with psycopg.connect(database_url) as conn:
        for user, item, kind, request in events:
            conn.execute(
                "INSERT INTO overnight.feedback_events VALUES (%s, %s, %s, %s, %s, %s)",
                (now, now, user, item, kind, request),
            )

    today = now.date()
    report = online.online_report(Settings(database_url=database_url, data_dir=tmp_path), today, today)

    production, canary = report["variants"]["production"], report["variants"]["canary"]
    assert (production["requests"], production["served"], production["impressions"], production["clicks"]) == (
        3,
        6,
        2,
        1,
    )
    # u1 was served by batches 7 and 8: one user of production (and of the unknown model), not two.
    assert (production["users"], canary["users"]) == (2, 1)
    assert [(b["batch_id"], b["users"]) for b in report["batches"] if b["variant"] == "production"] == [(7, 2), (8, 1)]
    assert report["models"][online.UNKNOWN_MODEL]["users"] == 3
    assert (canary["served"], canary["impressions"], canary["clicks"], canary["conversions"]) == (1, 1, 0, 1)
    assert production["ctr"]["value"] == 0.5
    # IPS with theta_p = 1/p: the click at position 3 weighs 3, over the 2 impressions (not the 5 served
    # pairs: an item never shown could not be clicked). Propensities are those of the impressed positions.
    assert production["ips_click_rate"]["value"] == pytest.approx(3 / 2)
    assert report["propensity"]["by_position"] == {"1": 1.0, "3": pytest.approx(1 / 3, abs=1e-6)}
    # The intervals take the user as the unit: production's two users (u1: 1 click in 1 impression, u2: 0
    # in 1) give Var(CTR) = (0.5² + 0.5²) / (2·1·1²) = 0.25, so n_eff = 0.25/0.25 = 1 impression.
    assert production["impressed_users"] == 2
    assert production["ctr"] == online.wilson(0.5, 1)
    assert canary["ips_click_rate"] == {"value": 0.0, "low": None, "high": None}  # one user: no spread
    assert report["unattributed_feedback"] == {"click": 2}
    # No canary was ever started (overnight.canary_history is empty): no time in which the arms split users.
    assert "canary_minus_production" not in report
    # Batch 7 has no row in overnight.batches: its model is unknown and it has no offline metrics.
    assert [(b["variant"], b["batch_id"], b["model_id"]) for b in report["batches"]] == [
        ("canary", 7, online.UNKNOWN_MODEL),
        ("production", 7, online.UNKNOWN_MODEL),
        ("production", 8, online.UNKNOWN_MODEL),
    ]
    assert set(report["batches"][0]["offline"].values()) == {None}
    assert report["models"][online.UNKNOWN_MODEL]["served"] == 7

    # The nightly summary stores the day's per-model rows of the same report; recording again replaces them.
    settings = Settings(database_url=database_url, data_dir=tmp_path)
    grace_ends = datetime.combine(today + timedelta(days=2), datetime.min.time(), UTC)  # a day after the day's end
    assert online.record_day(settings, today, now=grace_ends - timedelta(microseconds=1))["complete"] is False
    recorded = online.record_day(settings, today, now=grace_ends)
    assert recorded == {"day": today.isoformat(), "models": [online.UNKNOWN_MODEL], "complete": True}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT day, model_id, summary, complete FROM overnight.online_daily").fetchall()
    expected = {key: value for key, value in report["models"][online.UNKNOWN_MODEL].items() if key != "offline"}
    assert rows == [(today, online.UNKNOWN_MODEL, expected, True)]


def test_an_answer_logged_twice_under_one_request_id_counts_its_click_once(database_url: str, tmp_path: Path) -> None:
    """A client retrying with the same X-Request-Id gets (and logs) a second answer, here from the batch
    that went live in between: its click pairs with the first answer only."""

    async def log_answers() -> None:
        log = PredictionLog(database_url)
        log.start()
        log.record("r1", "u1", 7, "production", "personalized", ["a", "b"])
        await asyncio.sleep(0.01)
        log.record("r1", "u1", 8, "production", "personalized", ["b", "a"])
        await log.stop()

    asyncio.run(log_answers())
    now = datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO overnight.feedback_events VALUES (%s, %s, 'u1', 'a', 'click', 'r1')",
            (now, now),
        )
    report = online.online_report(Settings(database_url=database_url, data_dir=tmp_path), now.date(), now.date())
    production = report["variants"]["production"]
    assert (production["requests"], production["impressions"], production["clicks"]) == (2, 1, 1)
    assert [(b["batch_id"], b["impressions"], b["clicks"]) for b in report["batches"]] == [(7, 1, 1), (8, 0, 0)]
    assert report["propensity"]["by_position"] == {"1": 1.0}  # position 1 of the first answer, not 2 of the retry


def test_a_period_without_answers_says_so(database_url: str, tmp_path: Path) -> None:
    day = datetime.now(UTC).date() - timedelta(days=3)
    report = online.online_report(Settings(database_url=database_url, data_dir=tmp_path), day, day)
    assert report["variants"] == {} and report["batches"] == [] and "canary_minus_production" not in report
    lines = list(online.render(report))
    assert lines[1] == f"no logged answers between {day} and {day} (UTC days, both included)"
    assert len(lines) == 2


def test_canary_minus_production_counts_only_the_answers_served_while_the_canary_ran(
    database_url: str, tmp_path: Path
) -> None:
    """Production answers before the canary started and after it stopped count in production's totals but
    not in the comparison, whose arms must split the same users over the same hours."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO overnight.model_versions (model_id, logical_date, status, data_window, params, features,"
            " metrics, artifact_path, artifact_sha256) VALUES ('m', current_date, 'production', '{}', '{}', '{}',"
            " '{}', 'm.txt', repeat('0', 64))"
        )
        production_batch, canary_batch = (
            conn.execute(
                "INSERT INTO overnight.batches (logical_date, model_id, status, k, users_scored, active_users,"
                " fallback_item_ids, fallback_scores, generated_at)"
                " VALUES (current_date, 'm', %s, 10, 1, 1, '{}', '{}', now()) RETURNING batch_id",
                (status,),
            ).fetchone()[0]  # type: ignore[index]
            for status in ("live", "canary")
        )

    def canary_event(action: str) -> None:
        time.sleep(0.01)  # every answer logged so far is before the event, every one logged after is after it
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO overnight.canary_history (action, batch_id, traffic, salt, production_batch_id,"
                " happened_at) VALUES (%s, %s, 0.5, 's', %s, %s)",
                (action, canary_batch, production_batch, datetime.now(UTC)),
            )
        time.sleep(0.01)

    def log(answers: list[tuple[str, str, str, list[str]]], feedback: list[tuple[str, str, str, str]]) -> None:
        async def write() -> None:
            log = PredictionLog(database_url)
            log.start()
            for request, user, variant, items in answers:
                batch = canary_batch if variant == "canary" else production_batch
                log.record(request, user, batch, variant, "personalized", items)
            await log.stop()

        asyncio.run(write())
        now = datetime.now(UTC)
        with psycopg.connect(database_url) as conn:
            for user, item, kind, request in feedback:
                conn.execute(
                    "INSERT INTO overnight.feedback_events VALUES (%s, %s, %s, %s, %s, %s)",
                    (now, now, user, item, kind, request),
                )

    # Before the canary: production only, and its users clicked everything (3 impressions, 3 clicks).
    log(
        [("r1", "u1", "production", ["a", "b"]), ("r2", "u2", "production", ["a"])],
        [("u1", "a", "click", "r1"), ("u1", "b", "click", "r1"), ("u2", "a", "click", "r2")],
    )
    canary_event("start")
    # While it ran: production 3 impressions and 1 click (u3, u7); the canary 3 and 1 (u4, u5).
    log(
        [
            ("r3", "u3", "production", ["a", "b"]),
            ("r7", "u7", "production", ["b"]),
            ("r4", "u4", "canary", ["x", "y"]),
            ("r5", "u5", "canary", ["x"]),
        ],
        [
            ("u3", "a", "impression", "r3"),
            ("u3", "b", "impression", "r3"),
            ("u7", "b", "click", "r7"),
            ("u4", "x", "impression", "r4"),
            ("u4", "y", "click", "r4"),
            ("u5", "x", "impression", "r5"),
        ],
    )
    canary_event("stop")
    log([("r6", "u6", "production", ["a"])], [("u6", "a", "click", "r6")])  # after it: production again

    today = datetime.now(UTC).date()
    report = online.online_report(Settings(database_url=database_url, data_dir=tmp_path), today, today)

    production, canary = report["variants"]["production"], report["variants"]["canary"]
    # The per-variant totals keep every answer of the period, before, during and after the canary.
    assert (production["requests"], production["impressed_users"], production["impressions"]) == (5, 5, 7)
    assert production["clicks"] == 5
    assert (canary["requests"], canary["impressed_users"], canary["impressions"], canary["clicks"]) == (2, 2, 3, 1)
    # The comparison takes production's answers of the canary's running time only.
    comparison = report["canary_minus_production"]
    assert comparison["while_canary_ran"] == {
        "canary": {"impressed_users": 2, "impressions": 3},
        "production": {"impressed_users": 2, "impressions": 3},
    }
    # CTR 1/3 in both arms while the canary ran; over the whole day production's would be 5/7.
    assert comparison["ctr"]["value"] == pytest.approx(0.0)
    assert production["ctr"]["value"] == pytest.approx(5 / 7, abs=1e-6)
    assert "warning" not in comparison  # one canary model

    # A second canary, of another model, in the same period: the canary arm mixes them, and says so.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO overnight.model_versions (model_id, logical_date, status, data_window, params, features,"
            " metrics, artifact_path, artifact_sha256) SELECT 'm2', logical_date, 'trained', data_window, params,"
            " features, metrics, 'm2.txt', artifact_sha256 FROM overnight.model_versions WHERE model_id = 'm'"
        )
        conn.execute("UPDATE overnight.batches SET status = 'ready' WHERE batch_id = %s", (canary_batch,))
        (canary_batch,) = conn.execute(
            "INSERT INTO overnight.batches (logical_date, model_id, status, k, users_scored, active_users,"
            " fallback_item_ids, fallback_scores, generated_at)"
            " VALUES (current_date, 'm2', 'canary', 10, 1, 1, '{}', '{}', now()) RETURNING batch_id"
        ).fetchone()  # type: ignore[misc]
    canary_event("start")
    log([("r8", "u8", "canary", ["z"])], [("u8", "z", "click", "r8")])
    report = online.online_report(Settings(database_url=database_url, data_dir=tmp_path), today, today)
    assert "2 models (m, m2)" in report["canary_minus_production"]["warning"]
    assert any("warning: the canary arm pools" in line for line in online.render(report))
