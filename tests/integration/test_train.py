"""Training is point in time, repeatable, and never leaves a night without a model it could use."""

from datetime import timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest

from jobs import ingest, lake, train
from jobs.errors import MissingDataError
from jobs.features import FEATURES
from jobs.settings import Settings
from tests.conftest import SAMPLE_DATE
from tests.integration.conftest import PREVIOUS_DATE, ScoredLake

pytestmark = pytest.mark.integration


def test_examples_ignore_everything_from_the_cutoff_on(tmp_path: Path, sample_source: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
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

    examples = train.build_examples(settings, SAMPLE_DATE, cutoff)
    assert "brand-new" in examples.relevant["item_id"].to_list()  # it is a label...
    assert "brand-new" not in examples.frame["item_id"].to_list()  # ...but no feature or candidate saw it
    # no feature may count anything at or after the cutoff: recompute one by hand
    history = lake.scan_interactions(settings.lake_dir, SAMPLE_DATE).filter(pl.col("timestamp") < cutoff).collect()
    counts = dict(history.group_by("item_id").len().iter_rows())
    for item_id, item_count in examples.frame.select("item_id", "item_count").unique().iter_rows():
        assert item_count == counts[item_id]


def test_the_same_data_trains_the_same_model(tmp_path: Path, sample_source: Path, database_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    ingest.ingest(settings, sample_source, SAMPLE_DATE)
    first = train.train(settings, SAMPLE_DATE)
    second = train.train(settings, SAMPLE_DATE)
    assert first.model_id == second.model_id
    assert first.metrics == second.metrics
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, features, metrics->'baselines' ? 'recent_popular' FROM overnight.model_versions"
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
