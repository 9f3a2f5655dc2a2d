"""A batch's tables besides its user lists against a real Postgres: similar items, item attributes,
segment lists and users' segments are loaded, keyed, validated, recorded and dropped with the batch."""

import json
import math
from collections.abc import Callable

import polars as pl
import psycopg
import pytest

import sql
from jobs import batches, copy_binary, lake, workdir
from jobs.errors import BatchValidationError, MissingDataError
from jobs.settings import Settings
from jobs.steps import candidates, publish, score
from tests.support.batches import register_challenger
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE

pytestmark = pytest.mark.integration


@pytest.fixture
def segmented(batch_settings: Settings) -> Settings:
    """The batch settings with country segments, and SAMPLE_DATE's candidates step run again with them."""
    settings = batch_settings.model_copy(update={"segment_attribute": "country", "segment_min_users": 5})
    candidates.prepare(settings, SAMPLE_DATE)
    return settings


def existing_tables(settings: Settings, batch_id: int) -> list[str]:
    with psycopg.connect(str(settings.database_url)) as conn:
        return [
            table
            for table in sql.BATCH_TABLES
            if conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{sql.SCHEMA}.{sql.batch_table_name(batch_id, table)}",)
            ).fetchone()
            == (True,)
        ]


def extra(settings: Settings, name: str) -> pl.DataFrame:
    return pl.read_parquet(workdir.table_path(settings, SAMPLE_DATE, name))


def test_plain_fields_survive_the_binary_copy(database_url: str) -> None:
    frame = pl.DataFrame(
        {
            "item_id": ["a", "b-ü→", ""],
            "popularity": [1.5, 0.0, -3.25],
            "attributes": ['{"genre": ["Comedy"], "available": true}', '{"x": "ü"}', "{}"],
        },
        schema={"item_id": pl.String, "popularity": pl.Float32, "attributes": pl.String},
    )
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE items (item_id text, popularity real, attributes jsonb)")
        conn.commit()
    query = psycopg.sql.SQL("COPY items (item_id, popularity, attributes) FROM STDIN (FORMAT BINARY)")
    kinds: dict[str, copy_binary.FieldKind] = {"item_id": "text", "popularity": "real", "attributes": "jsonb"}
    loaded = publish.copy_into(
        database_url, query.format(), frame, lambda block: copy_binary.encode_fields(block, kinds)
    )
    assert loaded == 3
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT item_id, popularity, attributes FROM items ORDER BY item_id").fetchall()
    assert rows == [
        ("", -3.25, {}),
        ("a", 1.5, {"genre": ["Comedy"], "available": True}),
        ("b-ü→", 0.0, {"x": "ü"}),
    ]
    with pytest.raises(copy_binary.EncodingError, match="null popularity"):
        copy_binary.encode_fields(frame.with_columns(popularity=pl.lit(None, pl.Float32)), kinds)


def test_a_published_batch_holds_all_five_tables(segmented: Settings) -> None:
    result = publish.publish_nightly(segmented, SAMPLE_DATE)
    assert existing_tables(segmented, result.batch_id) == list(sql.BATCH_TABLES)
    similar, items = extra(segmented, workdir.SIMILAR_ITEMS), extra(segmented, workdir.ITEM_ATTRIBUTES)
    segment_lists, user_segments = extra(segmented, workdir.SEGMENTS), extra(segmented, workdir.USER_SEGMENTS)
    assert similar.height and segment_lists.height and user_segments.height  # the sample has all of them
    assert {k: result.validation[k] for k in workdir.BATCH_EXTRAS} == {
        workdir.SIMILAR_ITEMS: similar.height,
        workdir.ITEM_ATTRIBUTES: lake.read_catalogue(segmented.lake_dir, SAMPLE_DATE).height,
        workdir.SEGMENTS: segment_lists.height,
        workdir.USER_SEGMENTS: user_segments.height,
    }
    assert "extras" in result.seconds
    batch_id = result.batch_id
    with psycopg.connect(str(segmented.database_url)) as conn:
        assert conn.execute(
            "SELECT similar_k, segment_attribute FROM overnight.batches WHERE batch_id = %s", (batch_id,)
        ).fetchone() == (segmented.similar_k, "country")
        first = similar.row(0, named=True)  # lists come as Python lists
        (item_id, item_ids, scores), *_ = conn.execute(
            sql.batch_query("similar_for_items", batch_id), ([first["item_id"]],)
        ).fetchall()
        assert (item_id, item_ids) == (first["item_id"], first["item_ids"])
        assert scores == pytest.approx(first["scores"])
        published = {row[0]: row[1:] for row in conn.execute(sql.batch_query("batch_items", batch_id))}
        assert published.keys() == set(items["item_id"])
        popularity, attributes = published[items["item_id"][0]]
        assert attributes == json.loads(items["attributes"][0]) and math.isfinite(popularity)
        assert set(attributes) >= {"genre", "available"}
        lists = {row[0]: row[1] for row in conn.execute(sql.batch_query("batch_segments", batch_id))}
        assert lists == dict(zip(segment_lists["segment"], segment_lists["item_ids"].to_list(), strict=True))
        newcomer, scored = user_segments["user_id"][0], _a_scored_user(segmented)
        rows = conn.execute(
            sql.batch_query("recs_and_segments_for_users", batch_id), {"user_ids": [newcomer, scored]}
        ).fetchall()
        by_user = {row[0]: row for row in rows}
        assert by_user[newcomer][1:] == (None, None, user_segments["segment"][0])
        assert by_user[scored][1] and by_user[scored][3] is None


def _a_scored_user(settings: Settings) -> str:
    return str(pl.read_parquet(workdir.shard_path(settings, SAMPLE_DATE, 0, 2), n_rows=1)["user_id"][0])


def test_without_segments_the_batch_has_empty_segment_tables_and_no_attribute(batch_settings: Settings) -> None:
    result = publish.publish_nightly(batch_settings, SAMPLE_DATE)
    assert result.validation[workdir.SEGMENTS] == result.validation[workdir.USER_SEGMENTS] == 0
    assert result.validation[workdir.SIMILAR_ITEMS] > 0
    with psycopg.connect(str(batch_settings.database_url)) as conn:
        assert conn.execute(
            "SELECT similar_k, segment_attribute FROM overnight.batches WHERE batch_id = %s", (result.batch_id,)
        ).fetchone() == (batch_settings.similar_k, None)


def test_retention_drops_every_table_of_a_batch_and_rollback_keeps_them(segmented: Settings) -> None:
    first = publish.publish_nightly(segmented, SAMPLE_DATE)
    second = publish.publish_nightly(segmented, SAMPLE_DATE)  # replaces the date's batch
    assert second.dropped_batches == [first.batch_id]
    assert existing_tables(segmented, first.batch_id) == []
    older = publish.publish_nightly(segmented, PREVIOUS_DATE, make_live=True)
    publish.publish_nightly(segmented, SAMPLE_DATE, make_live=True)
    assert batches.rollback(segmented).batch_id == older.batch_id
    assert existing_tables(segmented, older.batch_id) == list(sql.BATCH_TABLES)


def test_shadow_and_canary_batches_get_the_tables_too(segmented: Settings) -> None:
    register_challenger(segmented)
    score.score(segmented, SAMPLE_DATE, model_id="challenger")
    for published in (
        publish.publish_shadow(segmented, SAMPLE_DATE, "challenger"),
        publish.publish_canary_batch(segmented, SAMPLE_DATE, "challenger"),
    ):
        assert existing_tables(segmented, published.batch_id) == list(sql.BATCH_TABLES)
        assert published.validation[workdir.USER_SEGMENTS] > 0


def _first_row(frame: pl.DataFrame, **values: object) -> pl.DataFrame:
    first = pl.int_range(pl.len()) == 0
    return frame.with_columns(
        **{
            name: pl.when(first).then(pl.lit(value, dtype=frame.schema[name])).otherwise(pl.col(name))
            for name, value in values.items()
        }
    )


CORRUPTIONS: dict[str, tuple[str, Callable[[pl.DataFrame], pl.DataFrame], str]] = {
    "empty neighbour list": (
        workdir.SIMILAR_ITEMS,
        lambda f: _first_row(f, item_ids=[], scores=[]),
        "similar items: 1 empty lists",
    ),
    "zero neighbour score": (
        workdir.SIMILAR_ITEMS,
        lambda f: f.with_columns(pl.col("scores").list.eval(pl.element() * 0)),
        "similar items: .* rows with scores not above 0",
    ),
    "unknown neighbour": (
        workdir.SIMILAR_ITEMS,
        lambda f: _first_row(f, item_ids=["no-such-item"], scores=[1.0]),
        r"similar items: 1 item ids not in the catalogue \(e.g. no-such-item\)",
    ),
    "duplicate similar item": (
        workdir.SIMILAR_ITEMS,
        lambda f: pl.concat([f, f.head(1)]),
        "duplicate keys in the similar items",
    ),
    "unknown segment item": (
        workdir.SEGMENTS,
        lambda f: _first_row(f, item_ids=["no-such-item"], scores=[1.0]),
        r"segment lists: 1 item ids not in the catalogue",
    ),
    "empty segment list": (workdir.SEGMENTS, lambda f: _first_row(f, item_ids=[], scores=[]), "segment lists: 1 empty"),
    "item without attributes": (workdir.ITEM_ATTRIBUTES, lambda f: f.slice(1), "item attributes: .* but the catalogue"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_bad_extra_table_fails_the_batch_and_leaves_production_alone(segmented: Settings, corruption: str) -> None:
    good = publish.publish_nightly(segmented, PREVIOUS_DATE)
    name, change, expected = CORRUPTIONS[corruption]
    path = workdir.table_path(segmented, SAMPLE_DATE, name)
    pl.read_parquet(path).pipe(change).write_parquet(path)
    with pytest.raises(BatchValidationError, match=expected):
        publish.publish_nightly(segmented, SAMPLE_DATE)
    with psycopg.connect(str(segmented.database_url)) as conn:
        assert conn.execute("SELECT batch_id FROM overnight.live").fetchone() == (good.batch_id,)
        failed, status = conn.execute(
            "SELECT batch_id, status FROM overnight.batches ORDER BY batch_id DESC"
        ).fetchone()  # type: ignore[misc]
    assert status == "failed"
    assert existing_tables(segmented, failed) == []


def test_publish_names_the_candidates_step_when_its_tables_are_missing(segmented: Settings) -> None:
    workdir.table_path(segmented, SAMPLE_DATE, workdir.USER_SEGMENTS).unlink()
    with pytest.raises(MissingDataError, match=r"\(user_segments\).*run the candidates step first"):
        publish.publish_nightly(segmented, SAMPLE_DATE)
    with psycopg.connect(str(segmented.database_url)) as conn:
        assert conn.execute("SELECT count(*) FROM overnight.batches").fetchone() == (0,)
