"""Ingest: a bad line in a MovieLens ratings file or in an item or user file is quarantined with its
file, line and reason, like a bad line of an interactions CSV, instead of refusing the whole file."""

import logging
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from jobs import lake
from jobs.errors import BadInputError
from jobs.steps.ingest import ingest, read_source, validate_interactions
from tests.support.sources import settings_for, write_bytes

DAY = date(2026, 11, 20)


def interactions(count: int = 40) -> bytes:
    return b"user_id,item_id,timestamp\n" + b"".join(
        f"u{n},i{n % 20},2026-11-10T12:00:00Z\n".encode() for n in range(count)
    )


# ---------------------------------------------------------------- MovieLens ratings


def movielens_ratings(variant: str) -> tuple[str, bytes, list[tuple[int, str, str]]]:
    """(file name, content, expected (line, reason, raw_line) of the quarantine) for a ratings file of
    ``variant`` with 40 good rows around a line with a field too many and a line that is not UTF-8."""

    separator = {"movielens-100k": b"\t", "movielens-1m": b"::", "movielens-latest": b","}[variant]

    def line(*fields: bytes) -> bytes:
        return separator.join(fields)

    good = [line(b"%d" % n, b"%d" % (10 + n % 7), b"4", b"964982703") for n in range(40)]
    extra = line(b"1", b"11", b"4", b"964982703", b"surprise")
    undecodable = line(b"2", b"\xff20", b"3", b"964981247")
    lines = [*good[:10], extra, *good[10:25], undecodable, *good[25:]]
    header = {"movielens-latest": [b"userId,movieId,rating,timestamp"]}.get(variant, [])
    name = {"movielens-100k": "u.data", "movielens-1m": "ratings.dat", "movielens-latest": "ratings.csv"}[variant]
    first = len(header) + 1  # the line of the first rating
    expected = [  # raw_line: the line's text, escaped (u.data's tabs included)
        (first + 10, "extra_fields", extra.decode().replace("\t", r"\t")),
        (first + 26, "bad_encoding", undecodable.decode("utf-8", "backslashreplace").replace("\t", r"\t")),
    ]
    return name, b"\n".join([*header, *lines]) + b"\n", expected


@pytest.mark.parametrize("block_bytes", [64 << 20, 50])  # 50: a few lines a block
@pytest.mark.parametrize("variant", ["movielens-100k", "movielens-1m", "movielens-latest"])
def test_a_bad_movielens_rating_line_is_quarantined_with_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str, block_bytes: int
) -> None:
    monkeypatch.setattr("jobs.steps.ingest.CSV_BLOCK_BYTES", block_bytes)
    name, content, expected = movielens_ratings(variant)
    folder = tmp_path / "ml"
    write_bytes(folder, content, name)
    settings = settings_for(tmp_path, max_bad_fraction=0.1)
    result = ingest(settings, folder, DAY)
    assert result.format == variant
    assert (result.rows_read, result.rows_valid) == (42, 40)
    assert result.quarantined_by_reason == {"bad_encoding": 1, "extra_fields": 1}
    quarantined = pl.read_parquet(str(lake.quarantine_dir(settings.lake_dir, DAY) / f"{name}.parquet")).sort("line")
    assert quarantined.select("line", "reason", "raw_line").rows() == expected
    assert quarantined["row"].to_list() == [10, 26]


def test_movielens_1m_lines_with_too_few_fields_are_quarantined_as_such(tmp_path: Path) -> None:
    folder = tmp_path / "ml"
    write_bytes(folder, b"1::10::4::978300760\n2::20::3\n3::30::5::978300760\n", "ratings.dat")
    valid, quarantined = validate_interactions(read_source(folder), DAY)
    assert valid["user_id"].to_list() == ["1", "3"]
    assert quarantined.select("row", "line", "reason", "raw_line").rows() == [(1, 2, "too_few_fields", "2::20::3")]


# ---------------------------------------------------------------- item and user files: messages


@pytest.mark.parametrize(
    ("name", "header", "shown"),
    [
        ("items.csv", b"item\x1b[31m_id,title\x07\ni1,One\n", r"items.csv: item file has no item_id column"),
        ("users.csv", b"user\x1b[31m_id,country\x07\nu1,FR\n", r"users.csv: user file has no user_id column"),
    ],
)
def test_an_item_or_user_file_without_its_id_column_is_an_escaped_error_naming_it(
    tmp_path: Path, name: str, header: bytes, shown: str
) -> None:
    folder = tmp_path / "src"
    write_bytes(folder, interactions(), "interactions.csv")
    write_bytes(folder, header, name)
    settings = settings_for(tmp_path)
    with pytest.raises(BadInputError) as failure:
        ingest(settings, folder, DAY)
    message = str(failure.value)
    assert message.startswith(shown)
    assert r"_id, " in message and r"\x1b[31m" in message and r"\x07" in message
    assert message.isprintable()
    assert "interactions.csv" not in message
    # refused before anything reached the lake
    assert not lake.interaction_partitions(settings.lake_dir, DAY)


def test_an_item_attribute_left_out_is_logged_against_the_item_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "src"
    write_bytes(folder, interactions(), "interactions.csv")
    write_bytes(folder, b"item_id,Bad Name\ni1,x\n", "items.csv")
    with caplog.at_level(logging.WARNING, logger="jobs.steps.ingest"):
        ingest(settings_for(tmp_path), folder, DAY)
    assert "items.csv: item column 'Bad Name' is not kept" in caplog.text


# ---------------------------------------------------------------- item and user files: bad lines


def test_bad_lines_of_item_and_user_files_are_quarantined_and_the_rest_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    write_bytes(folder, interactions(), "interactions.csv")
    items = [f"i{n},Title {n},Drama".encode() for n in range(40)]
    items[5] = b"i5,Caf\xe9,Drama"  # line 7: not UTF-8
    items[8] = b"i8,Title 8,Drama,surprise"  # line 10: a field too many
    items[9] = b" ,Nobody,Drama"  # line 11: no id
    items[12] = b"i12\x1b,Escape,Drama"  # line 14: a control character in the id
    write_bytes(folder, b"item_id,title,genres\n" + b"\n".join(items) + b"\n", "items.csv")
    users = [f"u{n},FR".encode() for n in range(40)]
    users[3] = b"u3,\xffR"  # line 5
    users[4] = b",DE"  # line 6
    write_bytes(folder, b"user_id,country\n" + b"\n".join(users) + b"\n", "users.csv")
    settings = settings_for(tmp_path, max_bad_fraction=0.1)

    result = ingest(settings, folder, DAY)

    assert result.rows_quarantined == 0  # the interactions' own counts are unchanged
    assert result.items_quarantined_by_reason == {
        "bad_encoding": 1,
        "bad_item_id": 1,
        "extra_fields": 1,
        "missing_item_id": 1,
    }
    assert result.users_quarantined_by_reason == {"bad_encoding": 1, "missing_user_id": 1}
    quarantine = lake.quarantine_dir(settings.lake_dir, DAY)
    assert result.items_quarantine_path == str(quarantine / "items.csv.parquet")
    assert result.users_quarantine_path == str(quarantine / "users.csv.parquet")
    item_lines = pl.read_parquet(str(result.items_quarantine_path))
    assert item_lines.select("row", "line", "reason", "raw_line").rows() == [
        (5, 7, "bad_encoding", r"i5,Caf\xe9,Drama"),
        (8, 10, "extra_fields", "i8,Title 8,Drama,surprise"),
        (9, 11, "missing_item_id", None),
        (12, 14, "bad_item_id", None),
    ]
    assert item_lines.filter(pl.col("line") == 11)["title"].to_list() == ["Nobody"]  # the row's columns, as text
    user_lines = pl.read_parquet(str(result.users_quarantine_path))
    assert user_lines.select("row", "line", "reason", "raw_line").rows() == [
        (3, 5, "bad_encoding", r"u3,\xffR"),
        (4, 6, "missing_user_id", None),
    ]
    # the rest of each file is kept
    catalogue = lake.read_catalogue(settings.lake_dir, DAY)
    listed = set(catalogue.filter(pl.col("title").is_not_null())["item_id"])
    assert listed == {f"i{n}" for n in range(40)} - {"i5", "i8", "i9", "i12"}
    assert catalogue.filter(pl.col("item_id") == "i1")["title"].to_list() == ["Title 1"]
    user_rows = pl.read_parquet(str(lake.snapshot_path(settings.lake_dir, "users", DAY)))
    assert sorted(user_rows["user_id"]) == sorted(f"u{n}" for n in range(40) if n not in (3, 4))


def test_movielens_movies_csv_lines_are_quarantined_like_an_item_file(tmp_path: Path) -> None:
    folder = tmp_path / "ml"
    write_bytes(folder, b"userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,20,3.5,964981247\n", "ratings.csv")
    movies = b"".join(f'{n},"Film {n}, The (1995)",Drama\n'.encode() for n in range(10, 40))
    write_bytes(folder, b"movieId,title,genres\n" + movies + b"99,Caf\xe9 (1995),Drama\n", "movies.csv")
    settings = settings_for(tmp_path)
    result = ingest(settings, folder, DAY)
    assert result.items_quarantined_by_reason == {"bad_encoding": 1}
    item_lines = pl.read_parquet(str(lake.quarantine_dir(settings.lake_dir, DAY) / "movies.csv.parquet"))
    assert item_lines.select("line", "reason").rows() == [(32, "bad_encoding")]
    assert lake.read_catalogue(settings.lake_dir, DAY).height == 30


def test_too_many_bad_lines_in_an_item_file_refuse_it(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    write_bytes(folder, interactions(), "interactions.csv")
    write_bytes(folder, b"item_id,title\n" + b"".join(b"i%d,Caf\xe9\n" % n for n in range(5)), "items.csv")
    settings = settings_for(tmp_path, max_bad_fraction=0.5)
    with pytest.raises(BadInputError) as failure:
        ingest(settings, folder, DAY)
    message = str(failure.value)
    assert message.startswith("items.csv: 100.0% of 5 rows are bad (limit 50.0%): 5 bad_encoding (whole line)")
    assert not lake.interaction_partitions(settings.lake_dir, DAY)
    assert pl.read_parquet(str(lake.quarantine_dir(settings.lake_dir, DAY) / "items.csv.parquet")).height == 5


@pytest.mark.parametrize(
    ("name", "content", "shown"),
    [
        ("items.csv", b"item_id,title\ni1,One\ni2,Two\n i1 ,Again\n", "items.csv: item id i1 is on lines 2 and 4"),
        ("users.csv", b"user_id,country\nu\x1b1,FR\nu2,DE\nu\x1b1,FR\n", None),
        ("users.csv", b"user_id,country\nu1,FR\nu2,DE\nu1,FR\n", "users.csv: user id u1 is on lines 2 and 4"),
    ],
)
def test_a_duplicate_id_is_warned_about_and_ingested_as_before(
    tmp_path: Path, name: str, content: bytes, shown: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "src"
    write_bytes(folder, interactions(), "interactions.csv")
    write_bytes(folder, content, name)
    settings = settings_for(tmp_path, max_bad_fraction=0.9)
    with caplog.at_level("WARNING", logger="jobs.steps.ingest"):
        ingest(settings, folder, DAY)
    warned = [r.getMessage() for r in caplog.records if "listed more than once" in r.getMessage()]
    if shown is None:  # bad ids are quarantined, so never duplicates
        assert not warned
    else:
        assert len(warned) == 1 and warned[0].startswith(f"ingest: {shown}"), warned
    assert lake.interaction_partitions(settings.lake_dir, DAY)
    if name == "items.csv":
        titles = dict(lake.read_catalogue(settings.lake_dir, DAY).select("item_id", "title").iter_rows())
        assert titles["i1"] == "Again"  # the last line of an id wins, as it always did


@pytest.mark.parametrize("variant", ["movielens-100k", "movielens-1m"])
def test_a_bad_line_of_a_latin1_movielens_item_file_is_quarantined(tmp_path: Path, variant: str) -> None:
    folder = tmp_path / "ml"
    if variant == "movielens-100k":
        write_bytes(folder, b"1\t10\t4\t881250949\n2\t20\t3\t891717742\n", "u.data")
        flags = "|".join(["0"] * 18 + ["1"])
        movies = [f"{n}|Caf\xe9 {n} (1995)|01-Jan-1995||http://x|{flags}" for n in range(10, 40)]
        movies[5] = f"15|A | in the title (1995)|01-Jan-1995||http://x|{flags}"  # line 6: a field too many
        movies[7] = "17|Cut short"  # line 8
        name, content = "u.item", "\n".join(movies).encode("latin-1") + b"\n"
    else:
        write_bytes(folder, b"1::10::4::978300760\n2::20::3::978302109\n", "ratings.dat")
        movies = [f"{n}::Caf\xe9 {n} (1995)::Drama" for n in range(10, 40)]
        movies[5] = "15::A :: in the title (1995)::Drama"  # line 6
        movies[7] = "17::Cut short"  # line 8
        name, content = "movies.dat", "\r\n".join(movies).encode("latin-1") + b"\r\n"
    write_bytes(folder, content, name)
    settings = settings_for(tmp_path, max_bad_fraction=0.1)
    result = ingest(settings, folder, DAY)
    assert result.items_quarantined_by_reason == {"extra_fields": 1, "too_few_fields": 1}
    item_lines = pl.read_parquet(str(result.items_quarantine_path))
    assert item_lines.select("row", "line", "reason").rows() == [(5, 6, "extra_fields"), (7, 8, "too_few_fields")]
    assert item_lines["raw_line"].to_list() == [movies[5], movies[7]]
    catalogue = lake.read_catalogue(settings.lake_dir, DAY)
    assert catalogue.filter(pl.col("item_id") == "10")["title"].to_list() == ["Caf\xe9 10 (1995)"]
    assert catalogue.filter(pl.col("title").is_not_null()).height == 28
