"""Monitoring end to end on generated data whose ratings drift on a known day.

A model is trained the night before the drift; three nights into it, the drift report must flag
exactly the features built from ratings, a fail threshold must block the publish (production
keeps the last good batch), the run history must say so, the model must be due for retraining,
and the webhook must get one message per problem however often the night is re-run.
"""

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import psycopg
import pytest

from jobs import nightly
from jobs.dev.generate import GeneratedData, generate, write_dataset
from jobs.errors import BatchValidationError, MissingDataError
from jobs.monitoring import drift
from jobs.settings import Settings
from jobs.steps import publish
from jobs.steps.features import FEATURES
from tests.support.commands import overnight, overnight_env
from tests.support.webhooks import Webhook, recording_webhook

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAINED_ON = date(2026, 11, 15)
DRIFT_FROM = TRAINED_ON + timedelta(days=1)
TONIGHT = DRIFT_FROM + timedelta(days=3)
RATING_FEATURES = {"item_mean_weight", "user_mean_weight"}


def drifting_source(folder: Path) -> Path:
    """The generator's data, with items released over the period (so item ages and counts are not
    all alike) and every rating from DRIFT_FROM on collapsed to 0 (a broken rating widget)."""
    days = 120
    # ends after TONIGHT so that activity does not taper off towards the nights we look at
    data = generate(1500, 600, days, end_date=TONIGHT + timedelta(days=30), seed=3, events_per_user=30)
    start = data.interactions["timestamp"].min()
    release = np.random.default_rng(5).random(600) * days * 0.8
    releases = pl.DataFrame(
        {"item_id": data.items["item_id"], "released": [start + timedelta(days=float(d)) for d in release]}
    ).with_columns(pl.col("released").cast(pl.Datetime("us", "UTC")))
    drift_start = datetime.combine(DRIFT_FROM, time(), tzinfo=UTC)
    interactions = (
        data.interactions.join(releases, on="item_id")
        .filter(pl.col("timestamp") >= pl.col("released"))
        .drop("released")
        .with_columns(
            pl.when(pl.col("timestamp") >= drift_start)
            .then(0.0)
            .otherwise(pl.col("rating"))
            .cast(pl.Float32)
            .alias("rating")
        )
    )
    return write_dataset(GeneratedData(interactions, data.items), folder)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    with recording_webhook() as webhook:
        yield webhook


def test_drift_on_a_known_day_is_flagged_and_blocks_the_publish(
    database_url: str, tmp_path: Path, webhook: Webhook
) -> None:
    source = drifting_source(tmp_path / "source")
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        label_days=7,
        retrain_days=30,  # the model of the night before the drift stays in production
        num_boost_round=30,
        monitor_thresholds={"feature_psi": {"fail": 0.25}},
        drift_reference_rows=1_000_000,  # every row: no sampling noise this close to the threshold
        alert_webhook_url=webhook.url,
        dashboard_url="http://dash.example/dashboard",
    )

    good = nightly.run(nightly.night_of(settings, TRAINED_ON, source))
    with pytest.raises(BatchValidationError, match="blocked by monitoring") as blocked:
        nightly.run(nightly.night_of(settings, TONIGHT, source))

    found = drift.report(settings, TONIGHT)
    # reading a report never measures one: a date the monitor step has not seen names that step
    unmeasured = TONIGHT + timedelta(days=1)
    with pytest.raises(MissingDataError, match=rf"^{unmeasured} has no monitoring report yet; run `overnight monitor"):
        drift.report(settings, unmeasured)
    checks = found["checks"]
    # The generator's items fade with age, so a time-based feature may drift a little for real (a warn);
    # only the injected drift may fail.
    failed = {c["subject"] for c in checks if c["stage"] == "drift" and c["level"] == "fail"}
    assert failed == RATING_FEATURES, [c["message"] for c in checks if c["level"] != "ok"]
    features = found["stages"]["drift"]["report"]["features"]
    assert set(features) == set(FEATURES)  # every ranker feature
    for name, values in features.items():
        if name not in RATING_FEATURES:
            assert values["psi"] < 0.25 and values["ks"] < 0.2, (name, values)
    assert features["item_mean_weight"]["psi"] > 0.25
    weight = next(c for c in checks if c["statistic"] == "weight_psi")
    assert weight["level"] == "warn" and weight["value"] > 1.0  # tonight's ratings are all 1

    # the fail threshold held the batch back; production still serves the night before
    assert "feature_psi of item_mean_weight" in str(blocked.value)
    assert "http://dash.example/dashboard?date=2026-11-19" in str(blocked.value)
    with psycopg.connect(database_url) as conn:
        live = conn.execute("SELECT batch_id FROM overnight.live").fetchone()
        tonight = conn.execute(
            "SELECT status, failure_reason FROM overnight.batches WHERE logical_date = %s", (TONIGHT,)
        ).fetchone()
        runs = conn.execute("SELECT run_id, logical_date, status, error FROM overnight.runs ORDER BY run_id").fetchall()
        steps = conn.execute(
            "SELECT run_id, step, status, seconds, peak_memory_bytes, rows_in, rows_out "
            "FROM overnight.run_steps ORDER BY run_id, started_at"
        ).fetchall()
        retrain_tomorrow = drift.drift_requires_retrain(conn, TONIGHT + timedelta(days=1))
        retrain_before = drift.drift_requires_retrain(conn, TONIGHT - timedelta(days=1))
    assert live == (good.batch_id,)
    assert tonight is not None and tonight[0] == "failed" and "blocked by monitoring" in tonight[1]

    # run history: one successful run, one blocked at publish, every step measured
    assert [(r[1], r[2]) for r in runs] == [(TRAINED_ON, "success"), (TONIGHT, "blocked")]
    assert "item_mean_weight" in runs[1][3]
    first = [s for s in steps if s[0] == runs[0][0]]
    assert [s[1] for s in first] == [
        "ingest", "features", "candidates", "train", "refit-candidates", "score", "monitor", "publish",
        "check-freshness", "shadow", "refresh-canary", "online",
    ]  # fmt: skip
    assert all(s[2] == "success" and s[3] >= 0 and s[4] > 0 for s in first)
    ingest_step = first[0]
    assert ingest_step[5] > ingest_step[6] > 0  # rows read, rows valid (events after the date set aside)
    # the blocked run stops at publish; only the online upkeep, which runs even after a failure, follows
    assert [s[1:3] for s in steps if s[0] == runs[1][0]][-2:] == [("publish", "blocked"), ("online", "success")]

    # drift past OVERNIGHT_DRIFT_RETRAIN_PSI makes the model due, from tonight on, until a new one
    assert retrain_tomorrow is not None and "item_mean_weight" in retrain_tomorrow
    assert retrain_before is None

    # one message per problem: the drift fail and the retrain; a re-run of publish sends nothing new
    titles = sorted(str(m["title"]) for m in webhook.received)
    assert len(titles) == 2, titles
    assert any("feature_psi fail" in t for t in titles)
    assert any("due for retraining" in t for t in titles)
    message = next(m for m in webhook.received if "feature_psi" in str(m["title"]))
    assert message["threshold"] == 0.25
    assert message["dashboard"] == "http://dash.example/dashboard?date=2026-11-19"
    assert "item_mean_weight" in str(message["text"])
    with pytest.raises(BatchValidationError, match="blocked by monitoring"):
        publish.publish_nightly(settings, TONIGHT)
    assert len(webhook.received) == 2

    # the CLI prints the same report
    env = overnight_env(database_url, settings.data_dir)
    shown = overnight("drift", "--date", TONIGHT.isoformat(), env=env).stdout
    assert "monitoring of 2026-11-19: FAIL" in shown
    assert "item_mean_weight" in shown and "retrain due:" in shown
    as_json = json.loads(overnight("drift", "--date", TONIGHT.isoformat(), "--json", env=env).stdout)
    assert as_json["verdict"] == "fail"
    failing = {c["subject"] for c in as_json["checks"] if c["stage"] == "drift" and c["level"] == "fail"}
    assert "item_mean_weight" in failing and failing <= RATING_FEATURES
