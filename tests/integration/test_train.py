"""Training is point in time, repeatable, and never leaves a night without a model it could use."""

from datetime import timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from jobs import lake, registry, workdir
from jobs.dev.generate import generate, write_dataset
from jobs.errors import MissingDataError
from jobs.settings import Settings
from jobs.steps import candidates, features, ingest, train
from jobs.steps.features import FEATURES
from tests.support.batches import ScoredLake, ingest_and_prepare
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE

pytestmark = pytest.mark.integration


def test_examples_ignore_everything_from_the_cutoff_on(tmp_path: Path, sample_source: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var", ingest_feedback=False)
    cutoff = lake.day_end(SAMPLE_DATE) - timedelta(days=settings.label_days)
    # a new item that everyone suddenly loves, but only from the cutoff on
    base = pl.read_parquet(sample_source / "interactions.parquet")
    users = base["user_id"].unique().sort().head(100)
    future = pl.DataFrame(
        {
            "user_id": users,
            "item_id": ["brand-new"] * users.len(),
            "timestamp": [cutoff + timedelta(hours=1)] * users.len(),
            "rating": pl.Series([5.0] * users.len(), dtype=pl.Float32),
        }
    )
    source = tmp_path / "src"
    source.mkdir()
    pl.concat([base, future.cast(base.schema)]).write_parquet(source / "interactions.parquet")
    (source / "items.parquet").write_bytes((sample_source / "items.parquet").read_bytes())
    ingest.ingest(settings, source, SAMPLE_DATE)

    events = lake.scan_interactions(settings.lake_dir, SAMPLE_DATE)
    window = train.time_window(events, cutoff, lake.day_end(SAMPLE_DATE), settings)
    examples = train.build_examples(window, lake.read_catalogue(settings.lake_dir, SAMPLE_DATE), settings)
    assert "brand-new" in examples.relevant["item_id"].to_list()  # it is a label...
    assert "brand-new" not in examples.frame["item_id"].to_list()  # ...but no feature or candidate saw it
    # no feature may count anything at or after the cutoff: recompute one by hand
    history = lake.scan_interactions(settings.lake_dir, SAMPLE_DATE).filter(pl.col("timestamp") < cutoff).collect()
    counts = dict(history.group_by("item_id").len().iter_rows())
    for item_id, item_count in examples.frame.select("item_id", "item_count").unique().iter_rows():
        assert item_count == counts[item_id]


def test_the_same_data_trains_the_same_model(tmp_path: Path, sample_source: Path, database_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    ingest_and_prepare(settings, sample_source, SAMPLE_DATE)
    first = train.train(settings, SAMPLE_DATE)
    second = train.train(settings, SAMPLE_DATE)
    assert first.model_id == second.model_id
    # the second run also compares the model with itself as production; everything else is identical
    assert {k: v for k, v in first.metrics.items() if k not in ("production", "gate")} == {
        k: v for k, v in second.metrics.items() if k not in ("production", "gate")
    }
    assert second.metrics["production"]["ndcg@10"] == first.metrics["ndcg@10"]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, features, metrics->'baselines' ? 'recent-popular' FROM overnight.model_versions"
        ).fetchall()
    assert row == [("production", list(FEATURES), True)]


def test_a_night_that_cannot_retrain_keeps_the_model_it_has(batch_settings: Settings, scored_lake: ScoredLake) -> None:
    unlabelled = batch_settings.model_copy(update={"label_days": 100})  # longer than all the history
    kept = train.train_if_due(unlabelled, SAMPLE_DATE)
    assert not kept.trained
    assert kept.model_id == scored_lake.model.model_id
    assert "could not retrain" in kept.reason
    not_due = train.train_if_due(batch_settings.model_copy(update={"retrain_days": 7}), SAMPLE_DATE)
    assert not not_due.trained and "retraining every 7 day(s)" in not_due.reason
    assert (SAMPLE_DATE - PREVIOUS_DATE).days == 1


def test_without_any_model_a_night_that_cannot_train_fails(
    tmp_path: Path, sample_source: Path, database_url: str
) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, label_days=100)
    ingest.ingest(settings, sample_source, SAMPLE_DATE)
    with pytest.raises(MissingDataError, match="shorten OVERNIGHT_LABEL_DAYS"):
        train.train_if_due(settings, SAMPLE_DATE)


def test_tables_for_a_date_ignore_events_on_or_after_it(tmp_path: Path, sample_source: Path) -> None:
    """Ingesting a later date adds events after D to the lake; D's candidate and feature tables do not change."""
    early = SAMPLE_DATE - timedelta(days=5)
    only_until_d = Settings(data_dir=tmp_path / "until-d", ingest_feedback=False)
    everything = Settings(data_dir=tmp_path / "everything", ingest_feedback=False)
    ingest.ingest(only_until_d, sample_source, early)
    ingest.ingest(everything, sample_source, early)
    ingest.ingest(everything, sample_source, SAMPLE_DATE)  # the five days after D land in the lake too
    later = lake.scan_interactions(everything.lake_dir, SAMPLE_DATE).filter(pl.col("timestamp") >= lake.day_end(early))
    assert later.select(pl.len()).collect().item() > 0
    for settings in (only_until_d, everything):
        features.prepare(settings, early)
        candidates.prepare(settings, early)
    names = [*workdir.CANDIDATE_TABLES, *workdir.FEATURE_TABLES, workdir.USERS]
    for name in names:
        expected = pl.read_parquet(workdir.folder(only_until_d, early) / f"{name}.parquet")
        assert_frame_equal(pl.read_parquet(workdir.folder(everything, early) / f"{name}.parquet"), expected)


def test_the_gate_keeps_production_when_a_new_model_is_not_better(
    batch_settings: Settings, scored_lake: ScoredLake, database_url: str
) -> None:
    strict = batch_settings.model_copy(update={"promotion_margin": 10.0})  # nothing beats anything by 1000%
    result = train.train_if_due(strict, SAMPLE_DATE)
    assert result.trained and not result.promoted
    assert result.status == "rejected"
    assert result.reason.startswith("promotion skipped: ndcg@10")
    assert result.scoring_model_id == scored_lake.model.model_id
    assert result.metrics["production"]["model_id"] == scored_lake.model.model_id
    with psycopg.connect(database_url) as conn:
        production = registry.production_model(conn)
        rejected = registry.model_by_id(conn, result.model_id)
        for_date = registry.model_for_date(conn, SAMPLE_DATE)
    assert production is not None and production.model_id == scored_lake.model.model_id
    assert for_date is not None and for_date.model_id == scored_lake.model.model_id  # scoring D keeps the old one
    assert rejected is not None and rejected.status == "rejected"
    assert rejected.status_reason == result.reason
    assert rejected.params["feature_importance_gain"].keys() == set(FEATURES)
    assert rejected.metrics["gate"]["passed"] is False


def test_retrain_is_due_by_age(batch_settings: Settings, scored_lake: ScoredLake) -> None:
    with psycopg.connect(batch_settings.database_url) as conn:  # type: ignore[arg-type]
        assert train.retrain_due(batch_settings, conn, PREVIOUS_DATE) == (
            False,
            f"{scored_lake.model.model_id} is 0 day(s) old; retraining every 1 day(s)",
        )
        due, reason = train.retrain_due(batch_settings, conn, SAMPLE_DATE)
        assert due and "1 day(s) old" in reason
        due, reason = train.retrain_due(batch_settings, conn, PREVIOUS_DATE - timedelta(days=1))
        assert due and reason.startswith("no promoted model trained on or before")


SHOP_WEIGHTS = {"view": 1.0, "cart": 3.0, "purchase": 8.0}


def test_the_gate_judges_the_newest_windows_on_users_never_trained_on_and_event_weights_grade_labels(
    tmp_path: Path, database_url: str
) -> None:
    shop = generate(users=400, items=120, days=60, end_date=SAMPLE_DATE, seed=12, events_per_user=25, event_types=True)
    source = write_dataset(shop, tmp_path / "shop")
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, event_weights=SHOP_WEIGHTS)
    ingest_and_prepare(settings, source, SAMPLE_DATE)

    catalogue, windows, held_out = train.label_data(settings, SAMPLE_DATE)
    judged = train.gate_windows(windows, settings)
    assert len(judged) == train.GATE_DAYS // settings.label_days == 2 and judged == windows[:2]
    for window in windows:
        assert not train.training_users(window, held_out, settings).is_in(held_out.implode()).any()
    # labels are graded: a purchase outranks a cart, which outranks a view
    examples = train.build_examples(windows[0], catalogue, settings)
    grades = examples.frame.join(examples.relevant, on=["user_id", "item_id"]).select("label", "grade").unique()
    assert dict(grades.iter_rows()) == {1: 1.0, 2: 3.0, 3: 8.0}

    result = train.train(settings, SAMPLE_DATE)
    metrics = result.metrics
    assert metrics["gate_windows"] == [w.name for w in judged]
    judged_users = sum(
        w.relevant.filter(pl.col("user_id").is_in(held_out.implode()))["user_id"].n_unique() for w in judged
    )
    assert metrics["users"] == judged_users > 0
    assert metrics["horizon_days"] == 2 * settings.label_days
    for model in (metrics, *metrics["baselines"].values()):
        assert 0.0 <= model["graded_ndcg@10"] <= 1.0
    assert metrics["graded_ndcg@10"] != metrics["ndcg@10"]  # purchases count more than views
    with psycopg.connect(database_url) as conn:
        trained = registry.model_by_id(conn, result.model_id)
    assert trained is not None and trained.params["label_gain"] == [0.0, 1.0, 3.0, 8.0]
