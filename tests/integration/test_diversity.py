"""Diversity in the batch: the re-ranked lists of a night, and the diversity monitoring records per night."""

import polars as pl
import psycopg
import pytest

from jobs import diversity, lake
from jobs.monitoring import checks
from jobs.settings import Settings
from jobs.steps import score
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE

pytestmark = pytest.mark.integration


def _scored_lists(settings: Settings) -> pl.DataFrame:
    manifests = score.score(settings, SAMPLE_DATE)
    return pl.concat([pl.read_parquet(m.path) for m in manifests]).sort("user_id")


def _top_10(lists: pl.DataFrame) -> pl.DataFrame:
    return (
        lists.select("user_id", pl.col("item_ids").list.head(10).alias("item_id"))
        .explode("item_id")
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("user_id"))
    )


def test_a_diversified_night_publishes_more_varied_lists_to_the_same_users(batch_settings: Settings) -> None:
    plain = _scored_lists(batch_settings)
    varied = _scored_lists(batch_settings.model_copy(update={"diversity": 0.8}))

    assert varied["user_id"].to_list() == plain["user_id"].to_list()
    assert varied["item_ids"].list.len().to_list() == plain["item_ids"].list.len().to_list()
    assert (varied["item_ids"] != plain["item_ids"]).any()
    assert varied["scores"].list.eval(pl.element().diff().fill_null(0) <= 0).list.all().all()  # still falling
    tokens = diversity.item_tokens(lake.read_catalogue(batch_settings.lake_dir, SAMPLE_DATE))
    assert diversity.intra_list_diversity(_top_10(varied), tokens) > diversity.intra_list_diversity(
        _top_10(plain), tokens
    )


def test_every_published_night_records_the_intra_list_diversity_of_its_lists(
    batch_settings: Settings, two_batches: tuple[int, int]
) -> None:
    with psycopg.connect(batch_settings.database_url or "") as conn:
        reports = [checks.stored_reports(conn, day)["output"]["report"] for day in (PREVIOUS_DATE, SAMPLE_DATE)]
    for report in reports:
        assert 0.0 < report["intra_list_diversity"] <= 1.0
