"""Explanations end to end: a real night scored with reasons, published, and served with `explain=true` on a
real socket; each reason checked against the lake it was computed from."""

from collections.abc import Iterator
from functools import partial

import polars as pl
import psycopg
import pytest
from psycopg import sql as pgsql

import sql
from jobs import lake, workdir
from jobs.settings import Settings
from jobs.steps import publish, score
from tests.support.data import SAMPLE_DATE
from tests.support.serving import (
    EXTRAS,
    RECS,
    SWITCH_DEADLINE,
    Publisher,
    Service,
    item_ids,
    lookup_service,
    running,
    service_settings,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def service(batch_settings: Settings, database_url: str) -> Iterator[Service]:
    with lookup_service(database_url, partial(publish.publish_nightly, batch_settings, SAMPLE_DATE)) as service:
        yield service


def history(settings: Settings) -> pl.DataFrame:
    return lake.scan_interactions(settings.lake_dir, SAMPLE_DATE).select("user_id", "item_id").unique().collect()


def test_every_item_of_a_users_list_says_why_and_the_reason_holds_in_the_lake(
    batch_settings: Settings, service: Service
) -> None:
    touched = history(batch_settings)
    genres = lake.read_catalogue(batch_settings.lake_dir, SAMPLE_DATE).select("item_id", "genres")
    genres_of = {item: set(names or ()) for item, names in genres.rows()}
    popular = set(pl.read_parquet(str(workdir.table_path(batch_settings, SAMPLE_DATE, "popular")))["item_id"])
    users = touched["user_id"].unique().sort().head(40).to_list()
    sources: set[str] = set()
    for user_id in users:
        plain = service.recs(user_id, k=10)
        explained = service.recs(user_id, k=10, explain="true")
        assert explained.status_code == 200, explained.text
        assert all("reason" not in item for item in plain.json()["items"])  # the contract, unless asked
        assert item_ids(explained) == item_ids(plain)
        mine = set(touched.filter(pl.col("user_id") == user_id)["item_id"])
        for item in explained.json()["items"]:
            reason = item["reason"]
            sources.add(reason["source"])
            if reason["source"] in ("covisit", "knn"):
                assert reason["item_id"] in mine, (user_id, item)  # one of the user's own items
            elif reason["source"] == "genre":
                assert reason["genre"] in genres_of[item["item_id"]], (user_id, item)
            else:
                assert reason == {"source": "trending"} and item["item_id"] in popular, (user_id, item)
    assert {"covisit", "knn"} & sources, sources  # item-to-item reasons, not only popularity


def test_reasons_follow_exclusions_the_batch_endpoint_and_unknown_users(service: Service) -> None:
    first = service.recs("1", k=5, explain="true").json()["items"]
    after = service.recs("1", k=4, explain="1", exclude=first[0]["item_id"]).json()["items"]
    assert after == first[1:]  # each item keeps its own reason when another is left out
    batch = service.client.post(
        "/v1/recommendations:batch", json={"user_ids": ["1", "nobody"], "k": 5, "explain": True}
    )
    assert batch.status_code == 200, batch.text
    known, unknown = batch.json()["results"]
    assert known["items"] == first
    assert unknown["source"] == "fallback"
    assert {item["reason"]["source"] for item in unknown["items"]} == {"popular"}
    bad = service.recs("1", explain="maybe")
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "explain"]


def test_a_night_without_explanations_publishes_lists_whose_reasons_are_null(
    batch_settings: Settings, database_url: str
) -> None:
    quiet = batch_settings.model_copy(update={"explanations": False})
    score.score(quiet, SAMPLE_DATE)
    result = publish.publish_nightly(quiet, SAMPLE_DATE)
    with psycopg.connect(database_url) as conn:
        explained = conn.execute("SELECT explained FROM overnight.batches WHERE batch_id = %s", (result.batch_id,))
        assert explained.fetchone() == (False,)
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        items = service.recs("1", k=3, explain="true").json()["items"]
    assert len(items) == 3 and all(item["reason"] is None for item in items)


def test_reasons_cost_two_bytes_an_item_beside_the_names_they_point_to(
    batch_settings: Settings, database_url: str
) -> None:
    result = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    with psycopg.connect(database_url) as conn:
        query = pgsql.SQL("SELECT cardinality(item_ids), length(reason_codes), cardinality(reason_refs) FROM {}")
        rows = conn.execute(query.format(sql.recs_table(result.batch_id))).fetchall()
    assert rows and all(codes == 2 * items and refs <= items for items, codes, refs in rows)


def test_items_filled_from_a_segments_list_name_the_segment_and_the_others_do_not(database_url: str) -> None:
    """Which popular list each filled item came from, whatever the batch (this one has no reasons)."""
    published = partial(Publisher(database_url).publish, RECS, extras=EXTRAS)
    with lookup_service(database_url, published) as service:
        # User 7's list is i5 i3 i9: only i3 is a Drama; FR's list adds i7 i10 i2, the fallback list p1 p4.
        user = service.recs("7", k=6, filter="genre:Drama", segment="FR", explain="true")
        assert (item_ids(user), user.headers["X-Filled-From-Fallback"]) == (["i3", "i7", "i10", "i2", "p1", "p4"], "5")
        from_fr = {"source": "popular", "segment": "FR"}
        popular = {"source": "popular"}
        assert [item["reason"] for item in user.json()["items"]] == [None, from_fr, from_fr, from_fr, popular, popular]
        # A visitor answered from FR's list (i7 i10 i2 are its Dramas), filled from the fallback list (p1).
        visitor = service.recs("anon-fr", k=4, filter="genre:Drama", explain="true")
        assert (item_ids(visitor), visitor.json()["segment"]) == (["i7", "i10", "i2", "p1"], "FR")
        assert [item["reason"] for item in visitor.json()["items"]] == [from_fr, from_fr, from_fr, popular]
