"""Input monitoring's statistics of a night, against the same figures computed the plain way."""

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from jobs import lake
from jobs.dev.generate import generate, write_dataset
from jobs.monitoring.drift import input_statistics
from jobs.settings import Settings
from jobs.steps import ingest
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration


def test_new_user_and_item_shares_are_those_first_seen_on_the_date(database_url: str, tmp_path: Path) -> None:
    data = generate(users=400, items=150, days=20, end_date=SAMPLE_DATE, seed=5, events_per_user=20)
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    ingest.ingest(settings, write_dataset(data, tmp_path / "source"), SAMPLE_DATE)

    measured = input_statistics(settings, SAMPLE_DATE)

    day_start = lake.day_start(SAMPLE_DATE)
    events = data.interactions.filter(pl.col("timestamp") < day_start + timedelta(days=1))
    for column, share, count in (
        ("user_id", "new_user_share", "users_today"),
        ("item_id", "new_item_share", "items_today"),
    ):
        first_seen = events.group_by(column).agg(first=pl.col("timestamp").min())
        today = events.filter(pl.col("timestamp") >= day_start).select(column).unique().join(first_seen, on=column)
        new = today.filter(pl.col("first") >= day_start).height
        assert measured[count] == today.height > 0
        assert 0 < new < today.height, "the generated night must have new and returning ids"
        assert measured[share] == pytest.approx(new / today.height)
