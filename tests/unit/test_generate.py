"""The synthetic generator: deterministic by seed, streamed in chunks, with the structure it promises."""

from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest

from jobs.dev import generate as gen
from jobs.steps.ingest import read_source

END = date(2026, 11, 20)


@pytest.fixture(scope="module")
def world() -> gen.GeneratedData:
    return gen.generate(3_000, 800, 60, end_date=END, seed=5, events_per_user=40)


def test_same_seed_same_data_and_another_seed_other_data() -> None:
    first = gen.generate(500, 200, 20, end_date=END, seed=3)
    again = gen.generate(500, 200, 20, end_date=END, seed=3)
    other = gen.generate(500, 200, 20, end_date=END, seed=4)
    assert first.interactions.equals(again.interactions) and first.items.equals(again.items)
    assert not first.interactions.equals(other.interactions)


def test_streamed_parts_hold_exactly_the_in_memory_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen, "CHUNK_USERS", 150)
    whole = gen.generate(400, 100, 15, end_date=END, seed=9)
    result = gen.write_generated(tmp_path, 400, 100, 15, end_date=END, seed=9, progress=lambda _: None)
    assert result.parts == 3 and result.interactions == whole.interactions.height
    streamed = pl.read_parquet(sorted((tmp_path / "interactions").glob("part-*.parquet")))
    assert streamed.sort("timestamp", "user_id").equals(whole.interactions)
    source = read_source(tmp_path)  # what ingest reads
    assert source.interactions.height == whole.interactions.height and source.items is not None


def test_events_fall_inside_the_period_with_an_evening_peak(world: gen.GeneratedData) -> None:
    events = world.interactions
    first, last = events["timestamp"].min(), events["timestamp"].max()
    assert first.date() >= END - timedelta(days=59) and last.date() <= END  # type: ignore[union-attr]
    by_hour = events.group_by(pl.col("timestamp").dt.hour().alias("hour")).len()
    hours = dict(by_hour.iter_rows())
    assert hours[20] > 3 * hours[4]


def test_popularity_is_heavy_tailed_and_users_keep_to_their_tastes(world: gen.GeneratedData) -> None:
    events = world.interactions
    counts = events.group_by("item_id").len()["len"].sort(descending=True)
    top_share = counts.head(len(counts) // 100 or 1).sum() / counts.sum()
    assert top_share > 0.1  # the top 1% of items take far more than 1% of events
    with_genre = events.join(world.items.select("item_id", pl.col("genres").list.first().alias("genre")), on="item_id")
    main_share = (
        with_genre.group_by("user_id", "genre")
        .len()
        .group_by("user_id")
        .agg(share=pl.col("len").max() / pl.col("len").sum(), n=pl.col("len").sum())
        .filter(pl.col("n") >= 20)["share"]
        .median()
    )
    assert main_share is not None and main_share > 0.35  # 12 genres: uniform taste would give ~0.15


def test_sessions_repeats_and_items_that_appear_and_fade(world: gen.GeneratedData) -> None:
    events = world.interactions.sort("user_id", "timestamp")
    gaps = events.select(gap=(pl.col("timestamp").diff().dt.total_seconds()).over("user_id"))["gap"].drop_nulls()
    assert (gaps < 1_800).mean() > 0.5  # most next events come minutes later, in the same session
    repeats = events.height - events.unique(["user_id", "item_id"]).height
    assert 0.03 < repeats / events.height < 0.7
    first_seen = events.group_by("item_id").agg(pl.col("timestamp").min())["timestamp"]
    assert (first_seen.dt.date() > END - timedelta(days=40)).sum() > 20  # new items keep arriving
    assert 0 < world.items["available"].sum() < world.items.height  # faded items are unavailable


def test_drift_moves_tastes_from_the_given_day() -> None:
    drift = END - timedelta(days=10)
    steady = gen.generate(2_000, 400, 40, end_date=END, seed=2)
    drifted = gen.generate(2_000, 400, 40, end_date=END, seed=2, drift_from=drift)

    def genre_mix(data: gen.GeneratedData) -> pl.DataFrame:
        late = data.interactions.filter(pl.col("timestamp").dt.date() >= drift)
        genres = data.items.select("item_id", pl.col("genres").list.first().alias("genre"))
        return late.join(genres, on="item_id").group_by("genre").len().sort("genre")

    early = lambda d: d.interactions.filter(pl.col("timestamp").dt.date() < drift)  # noqa: E731
    assert early(steady).equals(early(drifted))
    assert not genre_mix(steady).equals(genre_mix(drifted))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        gen.generate(0, 10, 10, end_date=END)
    with pytest.raises(ValueError, match="at least 2"):
        gen.generate(10, 10, 10, end_date=END, events_per_user=1)


def test_event_types_are_a_funnel_over_the_same_views_and_the_rarer_events_follow_taste() -> None:
    plain = gen.generate(2_000, 300, 40, end_date=END, seed=6, events_per_user=30)
    shop = gen.generate(2_000, 300, 40, end_date=END, seed=6, events_per_user=30, event_types=True)
    events = shop.interactions
    assert "rating" not in events.columns and set(events["event_type"]) == {"view", "cart", "purchase"}
    views = events.filter(pl.col("event_type") == "view").drop("event_type")
    assert views.sort("user_id", "timestamp").equals(plain.interactions.drop("rating").sort("user_id", "timestamp"))
    counts = dict(events.group_by("event_type").len().iter_rows())
    assert 0.02 < counts["cart"] / counts["view"] < 0.15  # a shop's funnel narrows at each step
    assert 0.2 < counts["purchase"] / counts["cart"] < 0.6
    # every purchase follows a cart of the same item by the same user, and every cart a view
    for later, earlier in (("purchase", "cart"), ("cart", "view")):
        steps = events.filter(pl.col("event_type") == later).join(
            events.filter(pl.col("event_type") == earlier), on=["user_id", "item_id"], suffix="_before"
        )
        followed = steps.group_by("user_id", "item_id", "timestamp").agg(
            (pl.col("timestamp_before") <= pl.col("timestamp")).any().alias("ok")
        )
        assert followed.height == counts[later] and followed["ok"].all()
    # users buy what they like far more than what they merely look at: the main genre's share rises
    genre = shop.items.select("item_id", pl.col("genres").list.first().alias("genre"))
    typed = events.join(genre, on="item_id")
    favourite = typed.group_by("user_id", "genre").len().sort("len", descending=True).unique("user_id", keep="first")
    on_favourite = typed.join(favourite.select("user_id", "genre"), on=["user_id", "genre"], how="semi")
    share = {
        kind: on_favourite.filter(pl.col("event_type") == kind).height
        / typed.filter(pl.col("event_type") == kind).height
        for kind in ("view", "purchase")
    }
    assert share["purchase"] > share["view"] + 0.05
