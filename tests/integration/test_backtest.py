"""`overnight backtest` as a user runs it: the real nightly steps at two cutoffs, each against a scratch
database on the real Postgres, the published lists read back and scored beside every baseline."""

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest

from jobs.evaluation.backtest import BASELINES, COVERAGE, DIVERSITY, MODELS, NOVELTY, PER_USER, SCRATCH_DATABASE_PREFIX
from jobs.steps.ingest import read_source
from tests.support.commands import overnight, overnight_env
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration

HORIZON_DAYS = 7


def _expected_users(events: pl.DataFrame, cutoff: date) -> int:
    """Users with events before the cutoff who touched an item new to them in the horizon after it."""
    start = datetime.combine(cutoff, datetime.min.time(), tzinfo=UTC)
    before = events.filter(pl.col("timestamp") < start)
    after = events.filter(pl.col("timestamp").is_between(start, start + timedelta(days=HORIZON_DAYS), closed="left"))
    new = after.join(before.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="anti")
    return new.join(before.select("user_id").unique(), on="user_id", how="semi")["user_id"].n_unique()


def _check_summary(summary: dict, users: int) -> None:
    assert summary["users"] == users
    assert list(summary["models"]) == list(MODELS)
    for model, metrics in summary["models"].items():
        assert list(metrics) == [*PER_USER, COVERAGE, DIVERSITY, NOVELTY], model
        for name in PER_USER:
            estimate = metrics[name]
            assert 0.0 <= estimate["low"] <= estimate["value"] <= estimate["high"] <= 1.0, (model, name, estimate)
        assert 0.0 < metrics[COVERAGE]["value"] <= 1.0 and metrics[COVERAGE]["low"] is None
        assert 0.0 < metrics[DIVERSITY]["value"] <= 1.0 and metrics[NOVELTY]["value"] > 0.0, model
    assert list(summary["ratios"]) == list(BASELINES)
    best = summary["best_baseline"]
    assert summary["models"][best]["ndcg@10"]["value"] == max(
        summary["models"][name]["ndcg@10"]["value"] for name in BASELINES
    )
    ratio = summary["ratio_to_best_baseline"]
    assert ratio == summary["ratios"][best]
    assert ratio["low"] <= ratio["value"] <= ratio["high"]
    published, baseline = (
        summary["models"]["published"]["ndcg@10"]["value"],
        summary["models"][best]["ndcg@10"]["value"],
    )
    assert ratio["value"] == pytest.approx(published / baseline, rel=1e-4)


def test_backtest_runs_the_nightly_steps_at_each_cutoff_and_scores_what_they_published(
    database_url: str, postgres_admin_url: str, sample_source: Path, tmp_path: Path
) -> None:
    env = overnight_env(database_url, tmp_path / "var")
    out = tmp_path / "backtest.json"
    run = overnight(
        "backtest", "--source", str(sample_source), "--windows", "2", "--horizon-days", str(HORIZON_DAYS),
        "--json", str(out), env=env,
    )  # fmt: skip
    report = json.loads(out.read_text())
    events = read_source(sample_source).interactions

    cutoffs = [SAMPLE_DATE - timedelta(days=HORIZON_DAYS - 1), SAMPLE_DATE - timedelta(days=2 * HORIZON_DAYS - 1)]
    assert [w["cutoff"] for w in report["windows"]] == [c.isoformat() for c in cutoffs]
    for number, (window, cutoff) in enumerate(zip(report["windows"], cutoffs, strict=True), 1):
        assert window["number"] == number
        assert window["run_date"] == (cutoff - timedelta(days=1)).isoformat()
        assert window["horizon_end"] == (cutoff + timedelta(days=HORIZON_DAYS)).isoformat()
        assert f"window {number}/2 [8/12] publish done in" in run.stderr  # the real steps, with progress
        # The run saw every event before its cutoff and none at or after it.
        start = datetime.combine(cutoff, datetime.min.time(), tzinfo=UTC)
        assert window["run_events"] == events.filter(pl.col("timestamp") < start).height
        assert datetime.fromisoformat(window["run_last_event"]) < start
        # The published lists were read back from the batch it made live.
        assert window["batch_id"] == 1 and window["model_id"].startswith(f"ranker-{cutoff - timedelta(days=1):%Y%m%d}")
        assert window["fallback_users"] == 0  # every evaluated user has history, so the batch knows them all
        _check_summary(window["scores"], _expected_users(events, cutoff))

    _check_summary(report["pooled"], sum(w["scores"]["users"] for w in report["windows"]))
    assert report["horizon_days"] == HORIZON_DAYS and report["resamples"] == 1000 and report["events"] == events.height

    # The scratch databases and work folders are gone; the configured database was left alone.
    scratch = [w["scratch_database"] for w in report["windows"]]
    assert all(name.startswith(SCRATCH_DATABASE_PREFIX) for name in scratch) and len(set(scratch)) == 2
    with psycopg.connect(postgres_admin_url) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (scratch,)).fetchall()
    assert left == []
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM overnight.batches").fetchone() == (0,)
    assert not list((tmp_path / "var" / "work").glob("backtest-*"))

    assert run.stdout.startswith("pooled over 2 windows of 7 days")
    for model in MODELS:
        assert f"\n{model} " in run.stdout


def test_backtest_refuses_bad_input_with_one_line(database_url: str, sample_source: Path, tmp_path: Path) -> None:
    env = overnight_env(database_url, tmp_path / "var")
    missing = overnight("backtest", "--source", str(tmp_path / "nowhere"), env=env, check=False)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1] == f"overnight: error: {tmp_path / 'nowhere'}: no such file or folder"
    )
    too_many = overnight(
        "backtest", "--source", str(sample_source), "--windows", "5", "--horizon-days", "7", env=env, check=False
    )
    assert too_many.returncode == 1
    last = too_many.stderr.strip().splitlines()[-1]
    assert last.startswith("overnight: error: 45 days of events (") and "too few for 5 windows of 7 days" in last
    zero = overnight("backtest", "--source", str(sample_source), "--windows", "0", env=env, check=False)
    assert zero.returncode == 2 and "Invalid value for '--windows'" in zero.stderr
