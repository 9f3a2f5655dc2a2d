"""OVERNIGHT_EVENT_WEIGHTS: how it is read, refused, and turned into event weights and graded labels."""

import polars as pl
import pytest
from pydantic import ValidationError

from jobs.event_weights import EVENT_WEIGHT, grade_levels, label_of_grade, with_event_weight
from jobs.settings import Settings

EVENTS = pl.DataFrame({"event_type": ["view", "cart", "purchase", "rating"]})


def test_weights_are_read_as_type_equals_weight_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_EVENT_WEIGHTS", " view=1, cart = 3,purchase=8.5 ")
    assert Settings().event_weights == {"view": 1.0, "cart": 3.0, "purchase": 8.5}
    monkeypatch.setenv("OVERNIGHT_EVENT_WEIGHTS", "")
    assert Settings().event_weights is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("view=1,cart", "'cart' is not type=weight"),
        ("view", "'view' is not type=weight"),
        ("=2", "'=2' is not type=weight"),
        ("view=one", "'view=one' is not type=weight"),
        ("view=0", "'view=0' is not type=weight"),
        ("view=-1", "'view=-1' is not type=weight"),
        ("view=nan", "'view=nan' is not type=weight"),
        ("view=1,view=2", "event type 'view' is given twice"),
    ],
)
def test_bad_weights_are_refused_saying_what_is_wrong_and_the_form(
    monkeypatch: pytest.MonkeyPatch, text: str, reason: str
) -> None:
    monkeypatch.setenv("OVERNIGHT_EVENT_WEIGHTS", text)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert reason in str(raised.value) and "e.g. view=1,cart=3,purchase=8" in str(raised.value)
    with pytest.raises(ValidationError, match=r"event type 'view' weighs 0\.0"):
        Settings(event_weights={"view": 0.0})


def test_without_weights_every_event_weighs_one_and_relevance_is_binary() -> None:
    settings = Settings()
    assert with_event_weight(EVENTS, settings.event_weights)[EVENT_WEIGHT].to_list() == [1.0] * 4
    assert grade_levels(settings.event_weights) is None
    assert pl.select(label_of_grade(pl.lit(3.0), settings.event_weights)).item() == 1


def test_weights_weigh_events_by_type_and_grade_labels_by_level() -> None:
    settings = Settings(event_weights={"view": 1.0, "cart": 3.0, "purchase": 8.0})
    # a type not listed weighs 1
    assert with_event_weight(EVENTS, settings.event_weights)[EVENT_WEIGHT].to_list() == [1.0, 3.0, 8.0, 1.0]
    assert grade_levels(settings.event_weights) == [1.0, 3.0, 8.0]
    grades = pl.DataFrame({"grade": pl.Series([1.0, 8.0, 3.0], dtype=pl.Float32)})
    assert grades.select(label_of_grade(pl.col("grade"), settings.event_weights))["grade"].to_list() == [1, 3, 2]
    fractional = Settings(event_weights={"view": 0.3, "purchase": 2.0}).event_weights
    assert grade_levels(fractional) == [0.3, 1.0, 2.0]
    weighted = with_event_weight(pl.DataFrame({"event_type": ["view", "other"]}), fractional)
    assert weighted.select(label_of_grade(pl.col(EVENT_WEIGHT), fractional))[EVENT_WEIGHT].to_list() == [1, 2]
