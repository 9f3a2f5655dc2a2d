"""Ingest: readers, the data contract's validation, quarantine and the lake it writes."""

import logging
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from jobs import lake, workdir
from jobs.errors import BadInputError
from jobs.settings import Settings
from jobs.steps.ingest import (
    MAX_WEIGHT,
    detect_format,
    first_of_keys,
    ingest,
    read_source,
    source_chunks,
    validate_interactions,
)
from tests.support.sources import settings_for, write_bytes

DAY = date(2026, 11, 20)


def write_csv(folder: Path, text: str, name: str = "interactions.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


GOOD_ROWS = "".join(f"u{n % 7},i{n % 11},2026-11-{10 + n % 10:02d}T12:00:00Z,{1 + n % 5}\n" for n in range(200))


def test_each_kind_of_bad_row_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "src",
        "user_id,item_id,timestamp,rating\n"
        + GOOD_ROWS
        + ",i1,2026-11-10T00:00:00Z,3\n"  # missing user
        + "u1,,2026-11-10T00:00:00Z,3\n"  # missing item
        + "u1,i1,yesterday,3\n"  # unparseable timestamp
        + "u1,i1,2026-11-25T00:00:00Z,3\n"  # after the logical date
        + "u1,i1,2026-11-10T00:00:00Z,lots\n"  # unparseable rating
        + "u0,i0,2026-11-10T12:00:00Z,1\n",  # duplicate of the first good row
    )
    valid, quarantined = validate_interactions(read_source(path), DAY)
    reasons = dict(quarantined.group_by("reason").len().iter_rows())
    assert reasons == {
        "missing_user_id": 1,
        "missing_item_id": 1,
        "bad_timestamp": 1,
        "after_logical_date": 1,
        "bad_weight": 1,
        "duplicate": 1,
    }
    assert valid.height == 200
    assert valid.schema == pl.Schema(lake.INTERACTIONS_SCHEMA)
    # quarantined rows keep what the source said, as text, and where it was
    bad_time = quarantined.filter(pl.col("reason") == "bad_timestamp").row(0, named=True)
    assert bad_time["timestamp"] == "yesterday"
    assert bad_time["row"] == 202


def test_too_many_bad_rows_fail_with_file_column_and_count(tmp_path: Path) -> None:
    bad = "".join(f"u{n},i1,not-a-time,3\n" for n in range(30))
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,rating\n" + GOOD_ROWS + bad)
    settings = settings_for(tmp_path, max_bad_fraction=0.1)
    with pytest.raises(BadInputError) as failure:
        ingest(settings, path, DAY)
    message = str(failure.value)
    assert "interactions.csv" in message
    assert "30 bad_timestamp in column timestamp" in message
    assert "13.0% of 230 rows" in message
    assert "\n" not in message
    # nothing reached the lake, but the bad rows are set aside for inspection
    assert not lake.interaction_partitions(settings.lake_dir, DAY)
    assert pl.read_parquet(lake.quarantine_dir(settings.lake_dir, DAY) / "interactions.csv.parquet").height == 30


def test_rows_after_the_logical_date_do_not_count_as_bad(tmp_path: Path) -> None:
    later = "".join(f"u{n},i1,2026-12-{1 + n % 20:02d}T00:00:00Z,3\n" for n in range(100))
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,rating\n" + GOOD_ROWS + later)
    result = ingest(settings_for(tmp_path, max_bad_fraction=0.01), path, DAY)
    assert result.rows_valid == 200
    assert result.quarantined_by_reason == {"after_logical_date": 100}
    assert result.bad_fraction == 0.0


def test_missing_column_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "src", "user_id,item_id,when\nu1,i1,2026-11-01\n")
    with pytest.raises(BadInputError, match=r"interactions.csv: missing required column timestamp \(found: user_id"):
        read_and_validate(path)


def test_wrong_id_type_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [1.5], "item_id": ["a"], "timestamp": [datetime(2026, 11, 1, tzinfo=UTC)]}).write_parquet(
        path
    )
    with pytest.raises(BadInputError, match="column user_id has type Float64; expected text or integer ids"):
        read_and_validate(path)


def read_and_validate(path: Path) -> pl.DataFrame:
    return validate_interactions(read_source(path), DAY)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1795176000", datetime(2026, 11, 20, 12, tzinfo=UTC)),  # epoch seconds
        ("1795176000000", datetime(2026, 11, 20, 12, tzinfo=UTC)),  # epoch milliseconds
        ("2026-11-20T12:00:00Z", datetime(2026, 11, 20, 12, tzinfo=UTC)),
        ("2026-11-20T14:00:00+02:00", datetime(2026, 11, 20, 12, tzinfo=UTC)),
        ("2026-11-20 12:00:00", datetime(2026, 11, 20, 12, tzinfo=UTC)),
        ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
    ],
)
def test_timestamps_in_common_forms_parse_to_utc(tmp_path: Path, text: str, expected: datetime) -> None:
    path = write_csv(tmp_path / "src", f"user_id,item_id,timestamp\nu1,i1,{text}\n")
    valid = read_and_validate(path)
    assert valid["timestamp"].to_list() == [expected]
    assert valid["weight"].to_list() == [1.0]


def test_typed_parquet_with_integer_ids_and_naive_datetimes(tmp_path: Path) -> None:
    path = tmp_path / "interactions.parquet"
    pl.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": [10, 20],
            "timestamp": [datetime(2026, 11, 1), datetime(2026, 11, 2)],
            "weight": [0.5, 2.0],
        }
    ).write_parquet(path)
    valid = read_and_validate(path)
    assert valid["user_id"].to_list() == ["1", "2"]
    assert valid["timestamp"].dtype == pl.Datetime("us", "UTC")
    assert valid["weight"].to_list() == [0.5, 2.0]


def write_movielens(folder: Path, variant: str) -> Path:
    folder.mkdir(parents=True)
    if variant == "movielens-100k":
        (folder / "u.data").write_text("1\t10\t4\t881250949\n2\t20\t3\t891717742\n")
        flags = ["0"] * 19
        flags[1] = flags[5] = "1"  # Action, Comedy
        (folder / "u.item").write_bytes(
            ("10|Caf\xe9 (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n").encode("latin-1")
            + ("20|Other (1996)|01-Jan-1996||http://y|" + "|".join(["1"] + ["0"] * 18) + "\n").encode("latin-1")
        )
    elif variant == "movielens-1m":
        (folder / "ratings.dat").write_text("1::10::4::978300760\n2::20::3::978302109\n")
        (folder / "movies.dat").write_bytes(
            "10::Caf\xe9: The Movie (1995)::Action|Comedy\n20::Other (1996)::unknown\n".encode("latin-1")
        )
    else:
        (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,20,3.5,964981247\n")
        (folder / "movies.csv").write_text(
            'movieId,title,genres\n10,"Café, The Movie (1995)",Action|Comedy\n20,Other,(no genres listed)\n'
        )
    return folder


@pytest.mark.parametrize("variant", ["movielens-100k", "movielens-1m", "movielens-latest"])
def test_movielens_folders_are_detected_and_read(tmp_path: Path, variant: str) -> None:
    folder = write_movielens(tmp_path / variant, variant)
    assert detect_format(folder) == "movielens"
    settings = settings_for(tmp_path)
    result = ingest(settings, folder, DAY)
    assert result.format == variant
    assert result.rows_valid == 2
    catalogue = lake.read_catalogue(settings.lake_dir, DAY).sort("item_id")
    assert catalogue["item_id"].to_list() == ["10", "20"]
    assert catalogue["genres"].to_list()[0] == ["Action", "Comedy"]
    assert catalogue["title"].to_list()[0].startswith("Caf\u00e9")
    events = lake.scan_interactions(settings.lake_dir, DAY).collect()
    assert set(events["event_type"]) == {"rating"}


def test_reingesting_a_date_changes_nothing(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,rating\n" + GOOD_ROWS)
    settings = settings_for(tmp_path)
    first = ingest(settings, path, DAY)
    before = lake.scan_interactions(settings.lake_dir, DAY).collect()
    second = ingest(settings, path, DAY)
    after = lake.scan_interactions(settings.lake_dir, DAY).collect()
    assert first.rows_valid == second.rows_valid == before.height == after.height
    assert before.equals(after)


def test_late_events_merge_into_their_day_without_duplicates(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    day_one = write_csv(tmp_path / "d1", "user_id,item_id,timestamp\nu1,i1,2026-11-19T10:00:00Z\n")
    ingest(settings, day_one, date(2026, 11, 19))
    # the next day's file repeats that event and brings a late one for the 19th
    day_two = write_csv(
        tmp_path / "d2",
        "user_id,item_id,timestamp\nu1,i1,2026-11-19T10:00:00Z\nu2,i2,2026-11-19T23:00:00Z\nu3,i3,2026-11-20T01:00:00Z\n",
    )
    ingest(settings, day_two, DAY)
    assert lake.scan_interactions(settings.lake_dir, DAY).collect().height == 3
    # reading as of the 19th sees the 19th's events only, late one included
    as_of_19 = lake.scan_interactions(settings.lake_dir, date(2026, 11, 19)).collect()
    assert sorted(as_of_19["user_id"]) == ["u1", "u2"]


def test_unknown_format_and_missing_path_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file or folder"):
        read_source(tmp_path / "nowhere")
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(BadInputError, match="pass --format parquet or csv"):
        read_source(odd)


def test_a_source_read_in_chunks_lands_as_if_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "src" / "interactions"
    write_csv(folder, "user_id,item_id,timestamp,rating\n" + GOOD_ROWS, name="part-0.csv")
    # a duplicate of a row of part 0, in another chunk: found across chunks, quarantined with its row
    write_csv(
        folder, "user_id,item_id,timestamp,rating\nu0,i0,2026-11-10T12:00:00Z,1\nu9,i9,2026-11-12,4\n", "part-1.csv"
    )
    whole = ingest(settings_for(tmp_path / "whole"), tmp_path / "src", DAY)
    monkeypatch.setattr("jobs.steps.ingest.CHUNK_ROWS", 7)
    chunked_settings = settings_for(tmp_path / "chunked")
    chunked = ingest(chunked_settings, tmp_path / "src", DAY)
    assert (chunked.rows_read, chunked.rows_valid, chunked.users) == (whole.rows_read, whole.rows_valid, whole.users)
    assert chunked.quarantined_by_reason == whole.quarantined_by_reason == {"duplicate": 1}
    quarantined = pl.read_parquet(chunked.quarantine_path)  # type: ignore[arg-type]
    assert quarantined["row"].to_list() == [200]
    lake_rows = pl.read_parquet(lake.interaction_partitions(chunked_settings.lake_dir, DAY))
    assert lake_rows.height == chunked.rows_valid == 201
    assert not list((workdir.scratch_root(chunked_settings) / f"date={DAY}").glob("ingest-staging*"))


# ---------------------------------------------------------------- null-looking text, bad weights, bad lines

NULL_LOOKING = ["NA", "N/A", "null", "NULL", "nan", "NaN", "-nan", "#N/A", "None", "n/a"]


def test_text_that_looks_like_a_null_is_a_real_id(tmp_path: Path) -> None:
    rows = "".join(f"{text},i{n},2026-11-10T00:00:00Z,3,click\n" for n, text in enumerate(NULL_LOOKING))
    rows += "".join(f"u{n},{text},2026-11-11T00:00:00Z,3,click\n" for n, text in enumerate(NULL_LOOKING))
    path = write_csv(
        tmp_path / "src",
        "user_id,item_id,timestamp,rating,event_type\n"
        + rows
        + ",i1,2026-11-12T00:00:00Z,3,click\n"  # only an empty field is missing ...
        + "u1,  ,2026-11-12T00:00:00Z,3,click\n"  # ... or a blank one
        + "u_blank,i2,2026-11-12T00:00:00Z,3,  \n",  # a blank event type is the source's default
    )
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert valid.filter(pl.col("timestamp").dt.day() == 10)["user_id"].to_list() == NULL_LOOKING
    assert valid.filter(pl.col("timestamp").dt.day() == 11)["item_id"].to_list() == NULL_LOOKING
    assert quarantined["reason"].to_list() == ["missing_user_id", "missing_item_id"]
    assert valid.filter(pl.col("user_id") == "u_blank")["event_type"].to_list() == ["interaction"]


def test_a_weight_that_is_not_a_finite_number_is_bad_and_an_empty_one_is_absent(tmp_path: Path) -> None:
    weights = [*NULL_LOOKING, "inf", "-inf", "lots"]
    rows = "".join(f"u{n},i{n},2026-11-10T00:00:00Z,{text}\n" for n, text in enumerate(weights))
    path = write_csv(
        tmp_path / "src",
        "user_id,item_id,timestamp,rating\n" + rows + "ue,ie,2026-11-10T00:00:00Z,\nub,ib,2026-11-10T00:00:00Z, \n",
    )
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert quarantined["rating"].to_list() == weights
    assert set(quarantined["reason"]) == {"bad_weight"}
    # no weight given: each interaction counts once
    assert valid.select("user_id", "weight").rows() == [("ue", 1.0), ("ub", 1.0)]


def test_negative_and_absurd_weights_are_quarantined(tmp_path: Path) -> None:
    weights = ["-1", "-0.5", f"{MAX_WEIGHT * 10:g}", "1e300", "0", "2.5", f"{MAX_WEIGHT:g}"]
    rows = "".join(f"u{n},i{n},2026-11-10T00:00:00Z,{text}\n" for n, text in enumerate(weights))
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,weight\n" + rows)
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert quarantined.select("weight", "reason").rows() == [(w, "bad_weight") for w in weights[:4]]
    assert valid["weight"].to_list() == [0.0, 2.5, MAX_WEIGHT]


def test_a_weight_of_minus_zero_is_stored_as_zero(tmp_path: Path) -> None:
    rows = "".join(f"u{n},i{n},2026-11-10T00:00:00Z,{text}\n" for n, text in enumerate(["-0", "-0.0", "0"]))
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,weight\n" + rows)
    ingest(settings_for(tmp_path), path, DAY)
    stored = pl.read_parquet(lake.partition_path(settings_for(tmp_path).lake_dir, date(2026, 11, 10)))
    assert stored["weight"].to_list() == [0.0, 0.0, 0.0]
    assert not np.signbit(stored["weight"].to_numpy()).any()


def test_a_weight_that_float32_cannot_hold_is_bad_whatever_the_limit(tmp_path: Path) -> None:
    """The lake stores weights as float32: 1e200 would be stored as infinity."""
    rows = "".join(f"u{n},i{n},2026-11-10T00:00:00Z,{text}\n" for n, text in enumerate(["1e200", "3e38", "2"]))
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,weight\n" + rows)
    valid, quarantined = validate_interactions(read_source(path), DAY, max_weight=1e300)
    assert quarantined.select("weight", "reason").rows() == [("1e200", "bad_weight")]
    assert valid["weight"].to_list() == [pytest.approx(3e38), 2.0]


@pytest.mark.parametrize("limit", ["inf", "nan", "1e300", "3.5e38"])
def test_the_largest_weight_setting_is_a_number_float32_holds(monkeypatch: pytest.MonkeyPatch, limit: str) -> None:
    monkeypatch.setenv("OVERNIGHT_MAX_WEIGHT", limit)
    with pytest.raises(ValidationError, match="max_weight"):
        Settings()
    monkeypatch.setenv("OVERNIGHT_MAX_WEIGHT", "3.4e38")
    assert Settings().max_weight == 3.4e38


def test_what_weight_is_absurd_is_the_sources_setting(tmp_path: Path) -> None:
    """OVERNIGHT_MAX_WEIGHT: a source of 1-5 ratings can call anything above 5 a mistake."""
    rows = "".join(f"u{n},i{n},2026-11-10T00:00:00Z,{weight}\n" for n, weight in enumerate([1, 5, 6, 50] * 25))
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,weight\n" + rows)
    assert ingest(settings_for(tmp_path / "default", max_bad_fraction=1.0), path, DAY).quarantined_by_reason == {}
    strict = ingest(settings_for(tmp_path / "strict", max_weight=5, max_bad_fraction=1.0), path, DAY)
    assert strict.quarantined_by_reason == {"bad_weight": 50} and strict.rows_valid == 50


def test_parquet_weights_are_checked_like_csv_ones(tmp_path: Path) -> None:
    path = tmp_path / "interactions.parquet"
    weights = [float("nan"), float("inf"), -1.0, MAX_WEIGHT * 10, None, 2.5]
    pl.DataFrame(
        {
            "user_id": [f"u{n}" for n in range(len(weights))],
            "item_id": "i1",
            "timestamp": datetime(2026, 11, 10),
            "weight": weights,
        }
    ).write_parquet(path)
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert quarantined.select("user_id", "reason").rows() == [(f"u{n}", "bad_weight") for n in range(4)]
    # a null weight is no weight given (1.0), never a NaN stored as 1.0
    assert valid.select("user_id", "weight").rows() == [("u4", 1.0), ("u5", 2.5)]


HEADER = b"user_id,item_id,timestamp,rating\n"


def good_lines(count: int, start: int = 0) -> bytes:
    return b"".join(f"u{n},i{n % 11},2026-11-10T12:00:00Z,3\n".encode() for n in range(start, start + count))


def test_an_undecodable_line_is_quarantined_not_the_whole_file(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path / "src",
        HEADER
        + good_lines(100)
        + b"u\xff\xfe,i1,2026-11-10T12:00:00Z,3\n"  # row 100: not UTF-8
        + good_lines(99, start=100)
        + b"u1,i1,yesterday,3\n",  # row 200: an ordinary bad row, still counted in place
    )
    settings = settings_for(tmp_path)
    result = ingest(settings, path, DAY)
    assert (result.rows_read, result.rows_valid) == (201, 199)
    assert result.quarantined_by_reason == {"bad_encoding": 1, "bad_timestamp": 1}
    quarantined = pl.read_parquet(result.quarantine_path).sort("row")  # type: ignore[arg-type]
    # line: the file's line, the header being line 1
    assert quarantined.select("row", "line", "reason", "raw_line").rows() == [
        (100, 102, "bad_encoding", r"u\xff\xfe,i1,2026-11-10T12:00:00Z,3"),
        (200, 202, "bad_timestamp", None),
    ]
    assert quarantined.row(0, named=True)["user_id"] is None


def test_lines_with_extra_or_too_few_fields_are_quarantined_in_place(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path / "src",
        HEADER
        + good_lines(10)
        + b"u1,i1,2026-11-10T12:00:00Z,3,surprise\n"  # row 10
        + b"u1,i1\n"  # row 11
        + b"u1,i1,2026-11-10T12:00:00Z,3,\x1b[2J\xff\r\n"  # row 12: not UTF-8 either, and a terminal escape
        + b"u1,i1,2026-11-10T12:00:00Z,3,\x1b[2J\r\n"  # row 13
        + good_lines(5, start=10)
        + b"u1,i1,yesterday,3\n",  # row 19: an ordinary bad row, still counted in place
    )
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert valid.height == 15
    assert quarantined.select("row", "line", "reason", "raw_line").rows() == [
        (10, 12, "extra_fields", "u1,i1,2026-11-10T12:00:00Z,3,surprise"),
        (11, 13, "too_few_fields", "u1,i1"),
        (12, 14, "bad_encoding", r"u1,i1,2026-11-10T12:00:00Z,3,\x1b[2J\xff"),
        (13, 15, "extra_fields", r"u1,i1,2026-11-10T12:00:00Z,3,\x1b[2J"),
        (19, 21, "bad_timestamp", None),
    ]


@pytest.mark.parametrize("block_bytes", [64 << 20, 64])  # 64: a few lines a block, records across blocks
def test_quarantined_rows_carry_the_line_they_start_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    monkeypatch.setattr("jobs.steps.ingest.CSV_BLOCK_BYTES", block_bytes)
    path = write_bytes(
        tmp_path / "src",
        b"user_id,item_id,timestamp,rating,note\n"  # line 1
        + b"u0,i0,2026-11-10T12:00:00Z,3,\n"  # line 2
        + b'u1,i"1,2026-11-10T12:00:00Z,3,"two\nlines"\n'  # lines 3-4: a quote inside a field opens nothing
        + b"\n"  # line 5: empty, no row
        + b'u2,i2,2026-11-10T12:00:00Z,3,"a ""quote"", then\r\nthree\r\nlines"\r\n'  # lines 6-8
        + b"u\xff,i1,2026-11-10T12:00:00Z,3,\n"  # line 9: row 3, not UTF-8
        + b'u3,i3,2026-11-10T12:00:00Z,3,"x\ny",extra\n'  # lines 10-11: rows 4-5, a field too many: a row a line
        + b'u4,"i\n4",2026-11-10T12:00:00Z,3,\n'  # lines 12-13: row 6, an id holding a line break
        + b'u5,i5,yesterday,3,"a,b"',  # line 14: row 7, and no line end
    )
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert valid["item_id"].to_list() == ["i0", 'i"1', "i2"]
    assert quarantined.select("row", "line", "reason", "raw_line").rows() == [
        (3, 9, "bad_encoding", r"u\xff,i1,2026-11-10T12:00:00Z,3,"),
        (4, 10, "extra_fields", 'u3,i3,2026-11-10T12:00:00Z,3,"x'),
        (5, 11, "in_quoted_field", 'y",extra'),
        (6, 12, "bad_item_id", None),
        (7, 14, "bad_timestamp", None),
    ]


@pytest.mark.parametrize("block_bytes", range(40, 90))
def test_a_crlf_file_is_read_to_its_end_whatever_the_block_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    # pyarrow ends the file at a block that is only the \n of a \r\n split from its \r
    monkeypatch.setattr("jobs.steps.ingest.CSV_BLOCK_BYTES", block_bytes)
    path = write_bytes(tmp_path / "src", (HEADER + good_lines(60)).replace(b"\n", b"\r\n"))
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert (valid.height, quarantined.height) == (60, 0)


def test_bad_lines_keep_their_row_numbers_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad_rows = {3, 4, 57, 58, 59, 140, 199, 200, 201}

    def line(n: int) -> bytes:
        if n not in bad_rows:
            return f"u{n},i{n},2026-11-10,3\n".encode()
        return b"u1,i1,2026-11-10,3,extra\n" if n % 2 else b"u\x80,i1,2026-11-10,3\n"

    path = write_bytes(tmp_path / "src", HEADER + b"".join(line(n) for n in range(202)))
    whole = validate_interactions(read_source(path), DAY)
    monkeypatch.setattr("jobs.steps.ingest.CSV_BLOCK_BYTES", 97)  # a few lines a block
    chunks = list(source_chunks(path))
    assert len(chunks) > 20
    valid, quarantined = validate_interactions(read_source(path), DAY)
    assert quarantined["row"].to_list() == sorted(bad_rows)
    assert set(quarantined["reason"]) == {"bad_encoding", "extra_fields"}
    assert valid["user_id"].to_list() == [f"u{n}" for n in range(202) if n not in bad_rows]
    assert valid.equals(whole[0]) and quarantined.equals(whole[1])


def test_bad_lines_count_toward_the_bad_fraction(tmp_path: Path) -> None:
    bad = b"u\xff,i1,2026-11-10,3\n" * 10 + b"u1,i1,2026-11-10,3,4\n" * 20
    path = write_bytes(tmp_path / "src", HEADER + good_lines(200) + bad)
    settings = settings_for(tmp_path, max_bad_fraction=0.1)
    with pytest.raises(BadInputError) as failure:
        ingest(settings, path, DAY)
    message = str(failure.value)
    assert "13.0% of 230 rows" in message
    assert "20 extra_fields (whole line), 10 bad_encoding (whole line)" in message
    assert ingest(settings_for(tmp_path / "lenient", max_bad_fraction=0.2), path, DAY).rows_quarantined == 30


def test_a_stray_quote_that_takes_the_rest_of_the_file_counts_each_line_it_took(tmp_path: Path) -> None:
    """A quote that no quote closes makes the rest of the file one quoted field: one bad record, read as one
    row, would have lost 500 rows for a bad fraction of 0.2%."""
    lines = [f"u{n},i{n % 7},2024-01-01T00:00:00,1" for n in range(1000)]
    lines[499] = 'u499x,"i3,2024-01-01T00:00:00,1'  # line 501, the header being line 1
    path = write_csv(tmp_path / "src", "user_id,item_id,timestamp,weight\n" + "\n".join(lines) + "\n")
    day = date(2024, 1, 1)

    with pytest.raises(BadInputError) as failure:
        ingest(settings_for(tmp_path / "default"), path, day)
    assert str(failure.value).startswith(
        "interactions.csv: 50.1% of 1,000 rows are bad (limit 5.0%): 500 in_quoted_field (whole line), "
        "1 too_few_fields (whole line); a quoted field opening on line 501 runs on to line 1,001 (a stray quote?): "
        "its 501 lines count as bad rows; rows set aside in "
    )

    result = ingest(settings_for(tmp_path / "lenient", max_bad_fraction=1.0), path, day)
    assert (result.rows_read, result.rows_valid) == (1000, 499)
    assert result.quarantined_by_reason == {"in_quoted_field": 500, "too_few_fields": 1}
    quarantined = pl.read_parquet(result.quarantine_path).sort("row")  # type: ignore[arg-type]
    # each line set aside with its own text: what the quote took can be read back
    assert quarantined["line"].to_list() == list(range(501, 1002))
    assert quarantined["raw_line"].to_list() == lines[499:]
    assert quarantined["reason"].to_list() == ["too_few_fields"] + ["in_quoted_field"] * 500


def test_an_item_file_with_a_bad_line_quarantines_the_line_not_the_file(tmp_path: Path) -> None:
    # more: tests/unit/test_ingest_bad_lines.py
    folder = tmp_path / "src"
    write_csv(folder, "user_id,item_id,timestamp\nu1,i1,2026-11-10\n")
    write_bytes(folder, b"item_id,title\ni1,One\ni2,Caf\xe9\n", name="items.csv")
    settings = settings_for(tmp_path, max_bad_fraction=0.5)
    result = ingest(settings, folder, DAY)
    assert result.items_quarantined_by_reason == {"bad_encoding": 1}
    assert pl.read_parquet(result.items_quarantine_path).select("line", "reason").rows() == [(3, "bad_encoding")]  # type: ignore[arg-type]
    assert lake.read_catalogue(settings.lake_dir, DAY).select("item_id", "title").rows() == [("i1", "One")]
    # the file's own limit: 1 bad line of 2 is more than the default 5%
    with pytest.raises(BadInputError, match=r"items.csv: 50.0% of 2 rows are bad \(limit 5.0%\): 1 bad_encoding"):
        ingest(settings_for(tmp_path / "strict"), folder, DAY)


def test_a_bad_line_in_a_folder_of_parts_says_which_part_it_is_in(tmp_path: Path) -> None:
    """Three parts with a bad line at the same line number: the quarantine tells them apart by file, the
    item parts' bad lines too, and a row repeated across two parts is set aside with its own part."""
    folder = tmp_path / "src"
    for part in range(3):
        write_bytes(
            folder / "interactions",
            HEADER + good_lines(30, start=30 * part) + f"u{part},i1,2026-11-10T12:00:00Z,3,extra\n".encode(),
            name=f"part-{part}.csv",
        )
    write_bytes(folder / "interactions", HEADER + good_lines(1), name="part-3.csv")  # part-0's first row again
    write_bytes(folder / "items", b"item_id,title\ni1,One\n", name="part-0.csv")
    write_bytes(folder / "items", b"item_id,title\ni2,Two\ni3,Caf\xe9\n", name="part-1.csv")
    result = ingest(settings_for(tmp_path, max_bad_fraction=0.5), folder, DAY)
    assert (result.rows_read, result.rows_valid, result.rows_quarantined) == (94, 90, 4)
    quarantined = pl.read_parquet(result.quarantine_path).sort("row")  # type: ignore[arg-type]
    assert quarantined.select("file", "line", "reason").rows() == [
        ("interactions/part-0.csv", 32, "extra_fields"),
        ("interactions/part-1.csv", 32, "extra_fields"),
        ("interactions/part-2.csv", 32, "extra_fields"),
        ("interactions/part-3.csv", 2, "duplicate"),
    ]
    items = pl.read_parquet(result.items_quarantine_path)  # type: ignore[arg-type]
    assert items.select("file", "line", "reason").rows() == [("items/part-1.csv", 3, "bad_encoding")]


def test_a_source_with_columns_named_like_the_quarantines_own_is_ingested(tmp_path: Path) -> None:
    """`file`, `line`, `row` and `reason` are what a quarantine adds: a source's own columns of those names
    are kept as source_<name> in the quarantine, and an item's stay its attributes."""
    folder = tmp_path / "src"
    write_csv(
        folder, "user_id,item_id,timestamp,file,row,reason\nu1,i1,2026-11-10,a.log,7,x\nu2,,2026-11-10,b.log,8,y\n"
    )
    write_csv(folder, "item_id,file,line\ni1,f.txt,3\n,g.txt,4\n", name="items.csv")
    settings = settings_for(tmp_path, max_bad_fraction=0.9)
    result = ingest(settings, folder, DAY)
    assert (result.rows_valid, result.rows_quarantined) == (1, 1)
    quarantined = pl.read_parquet(result.quarantine_path)  # type: ignore[arg-type]
    assert quarantined.select("file", "line", "source_file", "source_row", "source_reason", "reason").rows() == [
        ("interactions.csv", 3, "b.log", "8", "y", "missing_item_id")
    ]
    items = pl.read_parquet(result.items_quarantine_path)  # type: ignore[arg-type]
    assert items.select("file", "line", "source_file", "source_line").rows() == [("items.csv", 3, "g.txt", "4")]
    catalogue = lake.read_catalogue(settings.lake_dir, DAY)
    assert catalogue.select("item_id", "file", "line").rows() == [("i1", "f.txt", "3")]


def test_a_stray_quote_in_one_part_of_a_folder_is_named_with_its_part(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "interactions"
    write_bytes(folder, HEADER + good_lines(10), name="part-0.csv")
    write_bytes(folder, HEADER + good_lines(5) + b'u9,"i3,2026-11-10T12:00:00Z,3\n' + good_lines(4), name="part-1.csv")
    with pytest.raises(BadInputError, match=r"a quoted field opening on line 7 of interactions/part-1.csv runs on"):
        ingest(settings_for(tmp_path), folder.parent, DAY)


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        (b"user_id,item\x1b[31m_id,when\n", r"item\x1b[31m_id"),  # a terminal escape in a column name
        (b"user_id,item_id,tim\xffe\n", r"tim\xffe"),  # a header that is not UTF-8
    ],
)
def test_error_messages_escape_what_the_file_holds(tmp_path: Path, header: bytes, shown: str) -> None:
    path = write_bytes(tmp_path / "src", header + b"u1,i1,2026-11-10\n")
    with pytest.raises(BadInputError) as failure:
        read_and_validate(path)
    message = str(failure.value)
    assert shown in message
    assert message.isprintable()


def test_a_source_named_with_control_characters_reaches_no_log_or_summary_raw(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "src\x1b[2J"
    path = write_csv(folder, "user_id,item_id,timestamp,rating\n" + GOOD_ROWS)
    with caplog.at_level(logging.DEBUG, logger="jobs"):
        result = ingest(settings_for(tmp_path), path, DAY)
    assert "\x1b" not in result.summary() and r"\x1b[2J" in result.summary()
    assert caplog.records and not any("\x1b" in record.getMessage() for record in caplog.records)


INGEST_IN_A_PROCESS = """
import sys
from datetime import date
from pathlib import Path
from jobs.settings import Settings
from jobs.steps.ingest import ingest
settings = Settings(data_dir=Path(sys.argv[1]), ingest_feedback=False, max_bad_fraction=1.0)
print(ingest(settings, Path(sys.argv[2]), date.fromisoformat(sys.argv[3])).rows_valid)
"""


def test_two_ingests_at_once_lose_no_rows(tmp_path: Path) -> None:
    """A backfill of two dates at once: both merge into the same event-day partitions of one lake (under its
    write lock), and of one date twice at once, each with a staging folder of its own."""
    days = [date(2026, 8, 1) + timedelta(days=n) for n in range(100)]
    sources = {}
    for name in ("a", "b", "c"):
        rows = "".join(f"{name}{u},i{u % 97},{day}T12:00:00Z,1\n" for day in days for u in range(150))
        sources[name] = write_csv(tmp_path / name, "user_id,item_id,timestamp,rating\n" + rows)
    lake_root = tmp_path / "var"
    runs = [("a", "2026-11-20"), ("b", "2026-11-21"), ("c", "2026-11-21")]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", INGEST_IN_A_PROCESS, str(lake_root), str(sources[name]), day],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, day in runs
    ]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        assert out.strip() == str(len(days) * 150)
    lake_rows = pl.read_parquet(lake.interaction_partitions(lake_root / "lake", date(2026, 11, 21)))
    by_source = lake_rows.group_by(pl.col("user_id").str.head(1)).len().sort("user_id").rows()
    assert by_source == [(name, len(days) * 150) for name in "abc"]


HOLD_THE_LAKE = """
import sys, time
from pathlib import Path
from jobs import lake
with lake.exclusive_writes(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(1.5)
"""


def test_the_lakes_write_lock_is_held_across_processes(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LAKE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with lake.exclusive_writes(tmp_path):
            waited = time.monotonic() - started
    finally:
        holder.wait(timeout=30)
    assert waited > 1.0


def test_a_spark_output_folder_and_a_file_named_without_its_format_are_read(tmp_path: Path) -> None:
    """Spark writes part files beside a _SUCCESS marker and .crc files; --format says what a file is
    whatever its name."""
    frame = pl.DataFrame(
        {"user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i3"], "timestamp": [datetime(2026, 11, 10)] * 3}
    )
    folder = tmp_path / "spark" / "interactions"
    folder.mkdir(parents=True)
    frame.head(2).write_parquet(folder / "part-00000-abc.snappy.parquet")
    frame.tail(1).write_parquet(folder / "part-00001-abc.snappy.parquet")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00000-abc.snappy.parquet.crc").write_bytes(b"\x00")
    assert detect_format(tmp_path / "spark") == "parquet"
    assert read_source(tmp_path / "spark").interactions.height == 3

    unnamed = tmp_path / "export"
    frame.write_parquet(unnamed)
    with pytest.raises(BadInputError, match="cannot tell the format from the name"):
        read_source(unnamed)
    assert read_source(unnamed, "parquet").interactions["user_id"].to_list() == ["u1", "u2", "u3"]


def test_first_of_keys_marks_the_first_row_of_each_key_as_is_first_distinct_does() -> None:
    frame = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", None, None, "u1", "u2"],
            "item_id": ["i1", "i1", "i1", "i1", "i1", "i2", "i1"],
            "n": [1, 1, 1, None, None, 1, 2],
        }
    )
    keys = ["user_id", "item_id", "n"]
    first = first_of_keys(frame, keys)
    assert first.to_list() == [True, False, True, True, False, True, True]
    assert first.equals(frame.select(pl.struct(keys).is_first_distinct()).to_series())
    assert first_of_keys(frame.unique(keys, maintain_order=True), keys).all()
