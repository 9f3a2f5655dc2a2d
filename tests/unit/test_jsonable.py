"""JSON-ready values: what jsonb columns, XCom, --json output, the dashboard's data and 422 bodies get."""

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

from common.text import jsonable


@dataclass
class Result:
    when: date
    share: float


def test_non_finite_numbers_dates_decimals_and_dataclasses_become_json() -> None:
    assert jsonable({"a": float("inf"), "b": [float("nan"), 1.5], "c": "x"}) == {"a": None, "b": [None, 1.5], "c": "x"}
    assert jsonable({1: (Decimal("0.25"), datetime(2026, 11, 20, 1, tzinfo=UTC))}) == {
        "1": [0.25, "2026-11-20T01:00:00+00:00"]
    }
    assert jsonable([Result(date(2026, 11, 20), float("nan"))]) == [{"when": "2026-11-20", "share": None}]


def test_non_finite_numbers_can_be_text_and_lone_surrogates_are_escaped() -> None:
    value = {"a": [float("nan"), float("inf"), -float("inf"), Decimal("-Infinity")], "u\ud800": "x\udfff"}
    assert jsonable(value, non_finite="text") == {
        "a": ["NaN", "Infinity", "-Infinity", "-Infinity"],
        "u\\ud800": "x\\udfff",
    }
    assert jsonable(value)["a"] == [None, None, None, None]
    text = "ünïcødé"
    assert jsonable(text) is text and jsonable((1, True, None)) == [1, True, None]
