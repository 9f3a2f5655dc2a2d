"""The column-wise binary COPY encoder against a real Postgres: what goes in comes back out."""

import math
from functools import partial

import polars as pl
import psycopg
import pytest

from jobs import copy_binary
from jobs.steps import publish

pytestmark = pytest.mark.integration

SCHEMA = {"user_id": pl.String, "item_ids": pl.List(pl.String), "scores": pl.List(pl.Float32)}


def load(url: str, frame: pl.DataFrame) -> list[tuple[str, list[str | None], list[float | None]]]:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE recs (user_id text NOT NULL, item_ids text[] NOT NULL, scores real[] NOT NULL)")
        with conn.cursor() as cur, cur.copy("COPY recs (user_id, item_ids, scores) FROM STDIN (FORMAT BINARY)") as copy:
            publish.copy_frame(copy, frame)
        return conn.execute("SELECT user_id, item_ids, scores FROM recs ORDER BY user_id").fetchall()  # type: ignore[return-value]


def test_every_kind_of_value_survives_the_trip(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "COPY_BLOCK_ROWS", 2)  # several blocks in one stream
    frame = pl.DataFrame(
        {
            "user_id": ["a", "b-ü→", "c", "d", "e"],
            "item_ids": [["x", "yy"], ["ünï", None, ""], [], ["z"], ["q" * 300]],
            "scores": [[1.5, -2.25], [0.0, None, 3.0], [], [float("nan")], [float("inf")]],
        },
        schema=SCHEMA,
    )
    rows = load(database_url, frame.slice(1))  # a sliced frame: Arrow offsets do not start at 0
    assert rows[0] == ("b-ü→", ["ünï", None, ""], [0.0, None, 3.0])
    assert rows[1] == ("c", [], [])
    assert rows[2][1] == ["z"] and math.isnan(rows[2][2][0])
    assert rows[3] == ("e", ["q" * 300], [math.inf])


def test_a_generated_batch_loads_exactly(database_url: str) -> None:
    users = 2_000
    frame = pl.DataFrame({"user_id": pl.int_range(users, eager=True).cast(pl.String)}).with_columns(
        item_ids=pl.concat_list([pl.format("item-{}-{}", "user_id", pl.lit(j)) for j in range(7)]),
        scores=pl.concat_list([(pl.col("user_id").cast(pl.Float32) / (j + 1)) for j in range(7)]),
    )
    rows = load(database_url, frame)
    expected = sorted(frame.rows())
    assert len(rows) == users
    assert [(u, i, [pytest.approx(s) for s in sc]) for u, i, sc in rows] == expected


def test_rows_the_table_cannot_take_are_refused_before_loading() -> None:
    with pytest.raises(copy_binary.EncodingError, match="null user id"):
        copy_binary.encode_rows(
            pl.DataFrame({"user_id": [None], "item_ids": [["a"]], "scores": [[1.0]]}, schema=SCHEMA)
        )
    with pytest.raises(copy_binary.EncodingError, match="different lengths"):
        copy_binary.encode_rows(
            pl.DataFrame({"user_id": ["u"], "item_ids": [["a", "b"]], "scores": [[1.0]]}, schema=SCHEMA)
        )


def test_lists_with_their_reasons_survive_the_trip(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "COPY_BLOCK_ROWS", 2)
    frame = pl.DataFrame(
        {
            "user_id": ["a", "b", "c"],
            "item_ids": [["x", "y"], ["z"], []],
            "scores": [[2.0, 1.0], [0.5], []],
            "reason_refs": [["Comedy", "ü"], [], []],
            "reason_codes": [b"\xc0\x00\x40\x01", b"\x00\x00", b""],
        },
        schema={**SCHEMA, "reason_refs": pl.List(pl.String), "reason_codes": pl.Binary},
    )
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TABLE recs (user_id text, item_ids text[], scores real[], reason_codes bytea, reason_refs text[])"
        )
        query = "COPY recs (user_id, item_ids, scores, reason_codes, reason_refs) FROM STDIN (FORMAT BINARY)"
        with conn.cursor() as cur, cur.copy(query) as copy:
            publish.copy_frame(copy, frame.slice(0), partial(copy_binary.encode_rows, reasons=True))
        rows = conn.execute("SELECT user_id, reason_codes, reason_refs FROM recs ORDER BY user_id").fetchall()
    assert rows == [("a", b"\xc0\x00\x40\x01", ["Comedy", "ü"]), ("b", b"\x00\x00", []), ("c", b"", [])]
