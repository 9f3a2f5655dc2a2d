"""JSON-ready values: what jsonb columns, XCom and --json output get."""

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

from jobs.jsonable import jsonable


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
