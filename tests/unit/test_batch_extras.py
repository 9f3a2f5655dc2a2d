"""What a batch publishes besides its user lists, as the candidates step builds it: the catalogue's
attributes (and the item columns ingest keeps for them), segment lists and the segments of unscored users."""

import json
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from jobs import lake
from jobs.errors import BadInputError, MissingDataError
from jobs.settings import Settings
from jobs.steps import popularity
from jobs.steps.ingest import ingest

DAY = date(2026, 11, 20)
CUTOFF = lake.day_end(DAY)
RECENT = CUTOFF - timedelta(days=1)
OLD = CUTOFF - timedelta(days=30)  # outside the default 14-day recent window


def events_of(rows: list[tuple[str, str, datetime]]) -> pl.LazyFrame:
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    return frame.with_columns(pl.col("timestamp").dt.replace_time_zone("UTC")).lazy()


def catalogue_of(**extra: list[object]) -> pl.DataFrame:
    base = pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["A", "B", "C", "D"],
            "genres": [["Comedy", "Drama"], ["Horror"], [], ["Comedy"]],
            "available": [True, True, True, False],
        },
        schema=lake.ITEMS_SCHEMA,
    )
    return base.with_columns(**{name: pl.Series(values) for name, values in extra.items()})


def test_item_columns_of_a_storefront_are_kept_through_ingest_and_bounded(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    pl.DataFrame({"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "timestamp": [RECENT, RECENT]}).write_parquet(
        source / "interactions.parquet"
    )
    pl.DataFrame(
        {
            "item_id": ["i1", "i2"],
            "genres": [["Comedy"], ["Horror"]],
            "category": ["shoes", " "],  # blank text is no value
            "in_stock": [True, False],
            "sizes": [["S", "M"], ["L"]],
            "on_sale": ["TRUE", "false"],  # text that only says true or false is a flag
            "description": ["short", "x" * (lake.MAX_ATTRIBUTE_LENGTH + 1)],  # free text: left out
            "price": [9.5, 3.0],  # a number: left out
            "Bad Name": ["x", "y"],  # not a name a filter can say: left out
        }
    ).write_parquet(source / "items.parquet")
    settings = Settings(data_dir=tmp_path / "var", ingest_feedback=False)
    ingest(settings, source, DAY)
    catalogue = lake.read_catalogue(settings.lake_dir, DAY).sort("item_id")
    assert lake.item_attribute_columns(catalogue) == ["category", "in_stock", "sizes", "on_sale"]
    assert catalogue.select("category", "in_stock", "sizes", "on_sale").rows() == [
        ("shoes", True, ["S", "M"], True),
        (None, False, ["L"], False),
    ]
    # the next day's item file without the columns: earlier snapshots' columns stay, its items have none
    pl.DataFrame({"item_id": ["i3"], "genres": [["Drama"]]}).write_parquet(source / "items.parquet")
    ingest(settings, source, DAY + timedelta(days=1))
    later = lake.read_catalogue(settings.lake_dir, DAY + timedelta(days=1)).sort("item_id")
    assert later["item_id"].to_list() == ["i1", "i2", "i3"]
    assert later["category"].to_list() == ["shoes", None, None]


def test_item_attributes_cover_the_catalogue_in_popular_order_with_json_attributes() -> None:
    events = events_of(
        [
            ("u1", "b", RECENT),
            ("u2", "b", RECENT),
            ("u1", "a", RECENT),
            ("u2", "a", OLD),  # a ties b on recent counts, wins on all-time ones
            ("u3", "a", OLD),
            ("u3", "c", OLD),
        ]
    )
    catalogue = catalogue_of(category=["x", None, "y", "z"], in_stock=[True, False, None, True])
    table = popularity.item_attributes(events, catalogue, lake.item_attribute_columns(catalogue), CUTOFF, Settings())
    assert table["item_id"].to_list() == ["a", "b", "c", "d"]
    by_item = dict(zip(table["item_id"], table["popularity"], strict=True))
    assert by_item["b"] > by_item["a"] > by_item["c"] > by_item["d"] == 0.0
    attributes = [json.loads(text) for text in table["attributes"]]
    assert attributes[0] == {"genre": ["Comedy", "Drama"], "available": True, "category": "x", "in_stock": True}
    assert attributes[1] == {"genre": ["Horror"], "available": True, "in_stock": False}  # no null values
    assert attributes[3]["available"] is False and attributes[2]["genre"] == []


def write_users(settings: Settings, users: pl.DataFrame) -> None:
    lake.write_parquet_atomically(users, lake.snapshot_path(settings.lake_dir, "users", DAY))


def segmented_lists(
    events: pl.LazyFrame, scored: pl.DataFrame, settings: Settings
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What the candidates step builds of the lake as of DAY."""
    users_table = lake.latest_snapshot(settings.lake_dir, "users", DAY)
    return popularity.build_segments(events, catalogue_of(), scored, users_table, DAY, CUTOFF, settings)


def segmented(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"segment_attribute": "country", "segment_min_users": 2, "top_k": 2, **overrides}
    return Settings(data_dir=tmp_path / "var", **values)  # type: ignore[arg-type]


def test_segments_get_their_own_users_popular_list_and_unscored_users_their_segment(tmp_path: Path) -> None:
    settings = segmented(tmp_path)
    users = pl.DataFrame(
        {
            "user_id": ["fr1", "fr2", "de1", "de2", "jp1", "fr-new", "de-new", "jp-new", "nowhere"],
            "country": ["FR", "FR", "DE", "DE", "JP", "FR", "DE", "JP", None],
        }
    )
    write_users(settings, users)
    events = events_of(
        [
            ("fr1", "a", RECENT),
            ("fr2", "a", RECENT),
            ("fr2", "c", RECENT),
            ("de1", "b", RECENT),
            ("de2", "b", RECENT),
            ("de2", "d", RECENT),  # d is unavailable: in no list
            ("de1", "c", OLD),
            ("jp1", "c", RECENT),  # JP has one active user: below segment_min_users
        ]
    )
    scored = events.select("user_id").unique().collect()
    lists, user_segments = segmented_lists(events, scored, settings)
    assert lists.rows() == [("DE", ["b", "c"], [2.0, 0.0]), ("FR", ["a", "c"], [2.0, 1.0])]
    assert lists.schema == pl.Schema(popularity.SEGMENTS_SCHEMA)
    # only users the batch did not score, of segments with a list
    assert user_segments.rows() == [("de-new", "DE"), ("fr-new", "FR")]


def test_a_segment_needs_enough_recently_active_users(tmp_path: Path) -> None:
    settings = segmented(tmp_path, segment_min_users=3)
    write_users(settings, pl.DataFrame({"user_id": ["u1", "u2", "u3", "u4"], "country": ["FR"] * 4}))
    # three users, but one active only before the recent window
    events = events_of([("u1", "a", RECENT), ("u2", "a", RECENT), ("u3", "b", OLD)])
    scored = events.select("user_id").unique().collect()
    lists, user_segments = segmented_lists(events, scored, settings)
    assert lists.is_empty() and user_segments.is_empty()


def test_without_a_segment_attribute_there_are_no_segments(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")  # and no users table either
    events = events_of([("u1", "a", RECENT)])
    lists, user_segments = segmented_lists(events, pl.DataFrame({"user_id": ["u1"]}), settings)
    assert lists.is_empty() and user_segments.is_empty()
    assert user_segments.schema == pl.Schema(popularity.USER_SEGMENTS_SCHEMA)


def test_a_missing_attribute_or_users_table_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    settings = segmented(tmp_path, segment_attribute="platform")
    events = events_of([("u1", "a", RECENT)])
    scored = pl.DataFrame({"user_id": ["u1"]})
    with pytest.raises(MissingDataError, match="'platform' but the lake has no users table") as missing:
        segmented_lists(events, scored, settings)
    write_users(settings, pl.DataFrame({"user_id": ["u1"], "country": ["FR"]}))
    with pytest.raises(
        BadInputError, match=r"'platform' is not a column of the users table .* \(it has user_id, country\)"
    ) as error:
        segmented_lists(events, scored, settings)
    assert "\n" not in str(error.value) and "\n" not in str(missing.value)


def test_the_synthetic_world_has_skewed_countries_that_tilt_tastes_and_users_without_history() -> None:
    from jobs.dev import generate as gen

    world = gen.generate(3_000, 300, 30, end_date=DAY, seed=5)
    assert world.users is not None
    active = world.interactions["user_id"].unique()
    assert world.users.height == 3_000 + 150 and active.len() <= 3_000  # 5% signed up, nothing done yet
    shares = world.users["country"].value_counts(normalize=True).sort("proportion", descending=True)
    assert shares["country"][0] == "US" and shares["proportion"][0] > 2 * shares["proportion"][-1]

    def top(events: pl.DataFrame) -> list[str]:
        return (
            events.group_by("item_id")
            .len()
            .sort(["len", "item_id"], descending=[True, False])["item_id"]
            .head(10)
            .to_list()
        )

    everyone = top(world.interactions)
    by_country = world.interactions.join(world.users, on="user_id").partition_by("country", as_dict=True)
    differ = [country for (country,), events in by_country.items() if len(set(top(events)) & set(everyone)) < 8]
    assert len(differ) >= 3  # several countries' popular lists are not the global one
