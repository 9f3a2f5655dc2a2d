"""Ingest: read a source (Parquet, CSV, MovieLens), validate it against the data contract, quarantine bad rows with
their reason and write the lake (``jobs.lake``). Idempotent per logical date: a re-run merges the same rows into the
same event-day partitions and replaces that date's catalogue snapshot, quarantine and report.
"""

import bisect
import io
import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import polars as pl
from upath import UPath

from common.text import first_line, printable, some
from jobs import lake, workdir
from jobs.errors import BadInputError
from jobs.outcome import Outcome
from jobs.settings import MAX_WEIGHT, Settings
from jobs.steps.feedback_interactions import SOURCE_NAME as FEEDBACK_SOURCE
from jobs.steps.feedback_interactions import feedback_interactions
from sql.contract import MAX_ID_LENGTH

if TYPE_CHECKING:
    import pyarrow.csv

logger = logging.getLogger(__name__)

FORMATS = ("auto", "movielens", "parquet", "csv")
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
CHUNK_ROWS = 2_000_000  # interactions validated at a time: ingest's memory depends on this, not on the source
CSV_BLOCK_BYTES = 64 << 20  # bytes of CSV parsed at a time: a CSV chunk holds one block's rows
DEDUP_KEYS = ["user_id", "item_id", "timestamp", "event_type"]
STAGING_COMPRESSION: Final = "lz4"  # the staged chunks are read back once, by this ingest

MOVIELENS_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip

# Rows timestamped after the logical date are set aside like bad rows, but they are not
# malformed: a later date's ingest takes them in. They do not count toward the bad fraction.
NOT_YET_VISIBLE = "after_logical_date"
# Feedback naming an item the catalogue does not hold: a client's wrong id must not become a
# recommendable item, so the row is dropped (and counted) instead of adding the item.
UNKNOWN_ITEM = "unknown_item"
# A CSV line whose fields cannot be read (not UTF-8, or more or fewer fields than the header) is
# quarantined as a row of nulls in its place, with the line's text, escaped, in RAW_LINE.
BAD_ENCODING = "bad_encoding"
EXTRA_FIELDS = "extra_fields"
TOO_FEW_FIELDS = "too_few_fields"
RAW_LINE = "raw_line"
# Such a record read over several lines (a quoted field holding line breaks: often one stray quote that took
# the lines after it into one field) is one bad row a line, each with its own text: its first line with the
# record's reason, the others IN_QUOTED_FIELD. The bad fraction then counts every line it took.
IN_QUOTED_FIELD = "in_quoted_field"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # as the reader ends lines: \r alone too, never \f or \x85
_LINE_REASON = "_line_reason"  # the reader's note of such a line, until validation makes it the row's reason
# The line of a CSV file (from 1, the header's) on which a row starts: the quarantine's `line`.
_LINE = "_line"
# The file of a folder of parts (``items/part-1.csv``) an item or user row was read from: the quarantine's `file`.
_FILE = "_file"
REASON_COLUMN: dict[str, str | None] = {
    "missing_user_id": "user_id",
    "bad_user_id": "user_id",
    "missing_item_id": "item_id",
    "bad_item_id": "item_id",
    "missing_timestamp": "timestamp",
    "bad_timestamp": "timestamp",
    NOT_YET_VISIBLE: "timestamp",
    "bad_weight": "weight",
    "duplicate": "user_id, item_id, timestamp, event_type",
    UNKNOWN_ITEM: "item_id",
    BAD_ENCODING: None,
    EXTRA_FIELDS: None,
    TOO_FEW_FIELDS: None,
    IN_QUOTED_FIELD: None,
}
_TIMESTAMP_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d",
)


@dataclass(frozen=True)
class TableFile:
    """An item or user file (``kind`` "item" or "user"), checked line by line: ``rows`` are its good rows
    (``<kind>_id`` stripped), ``quarantined`` its bad lines, with ``row``, ``file``, ``line`` and ``reason`` like
    quarantined interactions. ``name`` is the file's, for messages and its quarantine file."""

    name: str
    kind: str
    rows: pl.DataFrame
    quarantined: pl.DataFrame

    @property
    def rows_read(self) -> int:
        return self.rows.height + self.quarantined.height

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(self.quarantined.group_by("reason").len().iter_rows())) if self.quarantined.height else {}


@dataclass(frozen=True)
class Source:
    """A source read into raw frames; ``name`` is the file that messages should point at, ``file`` the file
    (a part of a folder: ``interactions/part-1.csv``) these interactions were read from: a quarantined
    row's ``file``, beside its ``line``."""

    name: str
    format: str
    interactions: pl.DataFrame
    items: TableFile | None = None
    users: TableFile | None = None
    default_event_type: str = "interaction"
    file: str | None = None


@dataclass(frozen=True)
class IngestResult:
    logical_date: str
    source: str
    format: str
    rows_read: int
    rows_valid: int
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    bad_fraction: float
    partitions_written: int
    users: int
    items_in_catalogue: int
    first_event: str | None
    last_event: str | None
    quarantine_path: str | None
    # The item and user files' bad lines (MovieLens' movies file included), by reason, and where they are set
    # aside: they count in neither the rows above nor bad_fraction; each file has its own limit.
    items_quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    items_quarantine_path: str | None = None
    users_quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    users_quarantine_path: str | None = None
    # overnight.feedback_events, apart from the source's counts (its drops never fail the run):
    # events read, events that passed validation, events dropped (set aside) by reason.
    feedback_read: int = 0
    feedback_used: int = 0
    feedback_dropped_by_reason: dict[str, int] = field(default_factory=dict)
    feedback_quarantine_path: str | None = None
    report_path: str = field(default="")

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_in=self.rows_read, rows_out=self.rows_valid)

    def summary(self) -> str:
        source = printable(self.source)
        text = f"{self.rows_valid:,} rows from {source} ({self.format}), {self.rows_quarantined:,} quarantined"
        table_lines = sum(self.items_quarantined_by_reason.values()) + sum(self.users_quarantined_by_reason.values())
        if table_lines:
            text += f"; {table_lines:,} item or user file lines quarantined"
        if self.feedback_read:
            dropped = sum(self.feedback_dropped_by_reason.values())
            text += f"; {self.feedback_used:,} of {self.feedback_read:,} feedback events, {dropped:,} dropped"
        return text


# ---------------------------------------------------------------- reading


def detect_format(path: Path) -> str:
    if path.is_dir():
        if _movielens_files(path) is not None:
            return "movielens"
        found = _table_file(path, "interactions")
        if found is None:
            raise BadInputError(
                f"{path}: not a MovieLens folder (u.data, ratings.dat or ratings.csv) and no "
                "interactions.parquet, interactions.csv or interactions/ folder in it"
            )
        return _file_format(found)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    return _file_format(path)


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower() if path.is_file() else _folder_suffix(path)
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    raise BadInputError(f"{path}: cannot tell the format from the name; pass --format parquet or csv")


def _folder_suffix(folder: Path) -> str:
    suffixes = {p.suffix.lower() for p in _data_files(folder)}
    return suffixes.pop() if len(suffixes) == 1 else ""


def _data_files(folder: Path) -> list[Path]:
    """A folder's data files: not hidden (.crc) nor a writer's marker (Spark's _SUCCESS, _committed_...)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "_")))


def _movielens_files(folder: Path) -> tuple[Path, Path | None, str] | None:
    for ratings, items, variant in (
        ("u.data", "u.item", "movielens-100k"),
        ("ratings.dat", "movies.dat", "movielens-1m"),
        ("ratings.csv", "movies.csv", "movielens-latest"),
    ):
        if (folder / ratings).is_file():
            item_path = folder / items
            return folder / ratings, item_path if item_path.is_file() else None, variant
    return None


def _table_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.parquet", folder / f"{stem}.csv", folder / stem):
        if candidate.exists():
            return candidate
    return None


def read_source(path: Path, fmt: str = "auto") -> Source:
    """The whole source in memory (small sources, tests); ``ingest`` streams it with ``source_chunks``."""
    chunks = list(source_chunks(path, fmt))
    first = chunks[0]
    if len(chunks) == 1:
        return first
    interactions = pl.concat([c.interactions for c in chunks], how="diagonal_relaxed")
    return Source(first.name, first.format, interactions, first.items, first.users, first.default_event_type)


def source_chunks(path: Path, fmt: str = "auto", chunk_rows: int = 0) -> Iterator[Source]:
    """The source as a sequence of Sources of at most ``chunk_rows`` interactions each (0: the default).

    Items and users (small) come with the first chunk. Memory depends on the chunk size, not on
    the size of the source.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "movielens":
        yield from _movielens_chunks(path)
        return
    interactions, items, users = path, None, None
    if path.is_dir():
        found = _table_file(path, "interactions")
        if found is None:
            raise BadInputError(f"{path}: no interactions.parquet, interactions.csv or interactions/ in it")
        interactions, items, users = found, _table_file(path, "items"), _table_file(path, "users")
    item_file = _read_table_file(items, "item") if items else None
    user_file = _read_table_file(users, "user") if users else None
    for number, (file, frame) in enumerate(_table_batches(interactions, chunk_rows or CHUNK_ROWS, fmt)):
        first = number == 0
        yield Source(
            interactions.name, fmt, frame, item_file if first else None, user_file if first else None, file=file
        )


def _table_files(path: Path) -> list[Path]:
    files = _data_files(path) if path.is_dir() else [path]
    if not files:
        raise BadInputError(f"{path}: empty folder")
    return files


def _table_batches(path: Path, rows: int, fmt: str = "auto") -> Iterator[tuple[str, pl.DataFrame]]:
    """Each file's rows, with the file's name from the source's folder (``interactions/part-1.csv``).
    Parquet keeps its types; CSV is read as text so that validation sees every bad value. `fmt` (parquet
    or csv) is what the files are whatever their names say; auto tells each by its name."""
    import pyarrow

    for file in _table_files(path):
        label = str(file.relative_to(path.parent))
        try:
            if (fmt if fmt in ("parquet", "csv") else _file_format(file)) == "parquet":
                yield from ((label, frame) for frame in _parquet_batches(file, rows))
            else:
                yield from ((label, frame) for frame in _csv_batches(file))
        except (pl.exceptions.PolarsError, OSError, pyarrow.ArrowException) as error:
            raise BadInputError(f"{printable(str(file))}: cannot read: {printable(first_line(error))}") from error


def _parquet_batches(file: Path, rows: int) -> Iterator[pl.DataFrame]:
    import pyarrow.parquet

    empty = True
    for batch in pyarrow.parquet.ParquetFile(file).iter_batches(batch_size=rows):
        if batch.num_rows:
            empty = False
            yield pl.from_arrow(batch)  # type: ignore[misc]
    if empty:  # still show the columns, so that validation can name what is missing
        yield pl.read_parquet(file)


def _csv_batches(
    file: Path, delimiter: str | None = None, names: list[str] | None = None, quoted: bool = True
) -> Iterator[pl.DataFrame]:
    """The file's fields as text, a block at a time. Only an empty field is null: text that pyarrow
    would take for one by default (NA, null, nan...) can be a real id. A line whose fields cannot
    be read comes as a row of nulls in its place (see ``_BadCsvLines``), not as an error; such a
    record read over several lines, as a row of nulls for each (see ``IN_QUOTED_FIELD``).

    ``delimiter``: by default a tab for .tsv, else a comma. ``names``: the columns of a file without a
    header line (MovieLens' u.data), whose first line is then line 1. ``quoted``: whether " quotes fields."""
    import pyarrow
    import pyarrow.csv

    delimiter = delimiter or ("\t" if file.suffix.lower() == ".tsv" else ",")
    header_line = names is None
    if names is None:
        with file.open("rb") as handle:  # pyarrow needs the header within a block; lines may end with \r alone
            header = next(iter(handle.readline(CSV_BLOCK_BYTES).splitlines(keepends=True)), b"")
        try:
            header.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInputError(
                f"{printable(str(file))}: the header line is not UTF-8: {_escaped_line(header)}"
            ) from None
        names = pl.read_csv(header, separator=delimiter, infer_schema=False, quote_char='"' if quoted else None).columns
    with _Utf8CheckedFile(file, fields=len(names), delimiter=delimiter, header=header_line, quoted=quoted) as stream:
        bad_lines = _BadCsvLines(names, delimiter, stream.undecodable, header=header_line)
        batches = pyarrow.csv.open_csv(
            stream,
            # serial: the invalid-row handler gets each skipped line's row number only then
            read_options=pyarrow.csv.ReadOptions(
                block_size=CSV_BLOCK_BYTES, use_threads=False, column_names=None if header_line else names
            ),
            # newlines_in_values: a block never ends inside a quoted field, whose line ends are its text
            parse_options=pyarrow.csv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoted else False,
                newlines_in_values=True,
                invalid_row_handler=bad_lines.skip,
            ),
            convert_options=pyarrow.csv.ConvertOptions(
                column_types=dict.fromkeys(names, pyarrow.string()), null_values=[""], strings_can_be_null=True
            ),
        )
        records = 0
        for batch in batches:
            frame = bad_lines.put_back(pl.from_arrow(batch))  # type: ignore[arg-type]
            if frame.height:
                yield _a_row_a_line(stream.line_numbers.numbered(frame, records))
                records += frame.height
        rest = bad_lines.put_back(None)
        if rest.height or not records:  # an empty frame still shows the columns, for validation to name what is missing
            yield _a_row_a_line(stream.line_numbers.numbered(rest, records))


def _escaped_line(line: bytes) -> str:
    return printable(line.rstrip(b"\r\n").decode("utf-8", "backslashreplace"))


class _CsvLineNumbers:
    """The line of the file (from 1, the header's) on which each record starts, counted the way pyarrow
    reads records: a line ending inside a quoted field does not end the record, and an empty line is no
    record (pyarrow skips it). ``feed`` is given the file's bytes in order, as pyarrow reads them; a block
    without quotes or empty lines, the usual case, is counted with a few byte searches. A file without a
    header (``header`` False) is counted as if a header stood before its line 1; one read without quoting
    (``quoted`` False) has no quoted fields.

    Held as the records at which (line - record) changes: one entry per multi-line record or empty line,
    and those before the rows already numbered are forgotten.
    """

    def __init__(self, delimiter: str, header: bool = True, quoted: bool = True) -> None:
        d = re.escape(delimiter).encode()
        # a field: a quoted part ("" a quote in it), then text up to the delimiter; or text not starting with "
        field = rb'(?:"(?:[^"]|"")*+"[^%s]*+|(?!")[^%s]*+)' % (d, d)
        # a line that does not end inside a quoted field, read from a record's start or inside a quoted field
        self._ends_record = re.compile(rb"%s(?:%s%s)*+" % (field, d, field))
        self._closes_quote = re.compile(rb'(?:[^"]|"")*+"[^%s]*+(?:%s%s)*+' % (d, d, field))
        self._quoted = quoted
        self._lines = 0
        self._records = 0 if header else 1  # the header's included (one before line 1 when there is none)
        self._in_quote = False
        self._after_cr = False
        self._shifts = [(0, 1 if header else 0)]  # (record, line - record for it and those after it)

    def feed(self, data: bytes) -> None:
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]  # the end of a \r\n split between two reads
        if not data:
            return
        self._after_cr = data.endswith(b"\r")
        lines = self._one_record_a_line(data)
        if lines is not None:
            self._shift(self._lines + 1 - self._records)
            self._lines += lines
            self._records += lines
            return
        for line in data.splitlines():
            self._lines += 1
            if self._in_quote:
                self._in_quote = self._closes_quote.fullmatch(line) is None
            elif line:
                self._shift(self._lines - self._records)
                self._records += 1
                self._in_quote = self._quoted and self._ends_record.fullmatch(line) is None

    def _one_record_a_line(self, data: bytes) -> int | None:
        """The lines in ``data`` when each is a record (no quote, no empty line), else None. Byte searches
        only, for \\n or \\r\\n line ends (a mix of them is left to the line by line count)."""
        if self._in_quote or (self._quoted and b'"' in data) or data.startswith((b"\n", b"\r")):
            return None
        lf = data.count(b"\n")
        unended = not data.endswith((b"\n", b"\r"))
        if b"\r" not in data:
            return None if b"\n\n" in data else lf + unended
        crlf = data.count(b"\r\n")
        if crlf != lf or data.count(b"\r") != crlf + data.endswith(b"\r") or b"\n\r" in data:
            return None
        return lf + data.endswith(b"\r") + unended

    def _shift(self, shift: int) -> None:
        if shift != self._shifts[-1][1]:
            self._shifts.append((self._records, shift))

    def numbered(self, frame: pl.DataFrame, first_row: int) -> pl.DataFrame:
        """``frame``, the rows from ``first_row`` (0: the one after the header), with their lines in ``_LINE``."""
        records = np.arange(first_row + 1, first_row + 1 + frame.height, dtype=np.int64)
        starts = np.fromiter((record for record, _ in self._shifts), np.int64)
        shifts = np.fromiter((shift for _, shift in self._shifts), np.int64)
        lines = records + shifts[np.searchsorted(starts, records, side="right") - 1]
        done = bisect.bisect_right(self._shifts, first_row + 1 + frame.height, key=lambda entry: entry[0]) - 1
        del self._shifts[:done]
        return frame.with_columns(pl.Series(_LINE, lines, dtype=pl.Int64))


class _Utf8CheckedFile(io.RawIOBase):
    """A CSV file's bytes for pyarrow, which refuses the whole file at the first line that is not UTF-8.

    Such a line is replaced by a marker line with one field more than the header, so that pyarrow skips
    it through its invalid-row handler, which knows the row number; the line's text, escaped, waits in
    ``undecodable`` under the marker's number. A block of ASCII, the usual case, passes with one check.
    """

    MARKER = "\x00undecodable line "

    def __init__(self, path: Path, fields: int, delimiter: str, header: bool = True, quoted: bool = True) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._marker_end = (delimiter * fields).encode()
        self._partial = b""  # the last line read so far, checked once its end is read
        self._ready = b""
        self._at_end = False
        self.undecodable: dict[int, str] = {}
        self._marked_lines = 0
        self.line_numbers = _CsvLineNumbers(delimiter, header=header, quoted=quoted)

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        size = size if size is not None and size >= 0 else CSV_BLOCK_BYTES  # pyarrow always asks for a size
        while not self._ready and not self._at_end:
            self._ready = self._checked_lines(size)
            self.line_numbers.feed(self._ready)
        piece, self._ready = self._ready[:size], self._ready[size:]
        if len(piece) > 1 and piece.endswith(b"\r") and self._ready.startswith(b"\n"):
            # pyarrow takes a block that is only the \n of a \r\n for the end of the file: keep \r\n together
            piece, self._ready = piece[:-1], b"\r" + self._ready
        return piece

    def close(self) -> None:
        self._file.close()
        super().close()

    def _checked_lines(self, size: int) -> bytes:
        data = self._file.read(size)
        if not data:
            self._at_end = True
            lines, self._partial = self._partial, b""
        else:
            end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            if not end:
                self._partial += data
                return b""
            lines = b"".join((self._partial, memoryview(data)[:end]))
            self._partial = data[end:]
        if lines.isascii():
            return lines
        try:
            lines.decode("utf-8")
            return lines
        except UnicodeDecodeError:
            return b"".join(self._marked(line) for line in lines.splitlines(keepends=True))

    def _marked(self, line: bytes) -> bytes:
        try:
            line.decode("utf-8")
            return line
        except UnicodeDecodeError:
            self._marked_lines += 1
            self.undecodable[self._marked_lines] = _escaped_line(line)
            ending = line[len(line.rstrip(b"\r\n")) :]
            return f"{self.MARKER}{self._marked_lines}".encode() + self._marker_end + ending


class _BadCsvLines:
    """Lines pyarrow's CSV reader skips, noted by its invalid-row handler and put back, as rows of
    nulls with their reason and text, where they were among the rows read: each keeps its row number."""

    def __init__(self, names: list[str], delimiter: str, undecodable: dict[int, str], header: bool = True) -> None:
        self._names = names
        self._first_number = 2 if header else 1  # pyarrow's number for the first row after the header
        self._delimiter = delimiter
        self._undecodable = undecodable
        # (rows read before the record, reason, the text of each of its lines), in the file's order
        self._pending: list[tuple[int, str, list[str]]] = []
        self._skipped = 0
        self._rows_read = 0

    def skip(self, row: "pyarrow.csv.InvalidRow") -> str:
        reason = EXTRA_FIELDS if row.actual_columns > row.expected_columns else TOO_FEW_FIELDS
        lines = _LINE_BREAK.split(row.text)
        undecodable = [self._undecodable_text(line) for line in lines]
        if len(lines) == 1 and undecodable[0] is not None:
            reason = BAD_ENCODING
        texts = [printable(line if text is None else text) for line, text in zip(lines, undecodable, strict=True)]
        # row.number counts the header, if any, as 1; pyarrow gives it when it reads serially, as it does here
        position = row.number - self._first_number if row.number is not None else self._rows_read + self._skipped
        self._pending.append((position - self._skipped, reason, texts))
        self._skipped += 1
        return "skip"

    def _undecodable_text(self, line: str) -> str | None:
        """The escaped text of the line that is not UTF-8 that ``line`` marks, if it is such a marker."""
        if not line.startswith(_Utf8CheckedFile.MARKER):
            return None
        number = line[len(_Utf8CheckedFile.MARKER) :].rstrip(self._delimiter)
        return self._undecodable.pop(int(number), None) if number.isdigit() else None

    def put_back(self, frame: pl.DataFrame | None) -> pl.DataFrame:
        """``frame``, the next rows read, with the skipped lines among them put back in place; at the
        end of the file (``frame`` None), the lines skipped after the last row."""
        start = self._rows_read
        if frame is None:
            frame = pl.DataFrame(schema=dict.fromkeys(self._names, pl.String))
            count = len(self._pending)
        else:
            self._rows_read += frame.height
            # lines skipped after the frame's last row go with the next frame
            count = bisect.bisect_left(self._pending, self._rows_read, key=lambda line: line[0])
        lines, self._pending = self._pending[:count], self._pending[count:]
        if not lines:
            return frame
        bad = pl.DataFrame(
            {
                **{name: pl.Series([None] * len(lines), dtype=pl.String) for name in self._names},
                _LINE_REASON: [reason for _, reason, _ in lines],
                RAW_LINE: pl.Series([texts for _, _, texts in lines], dtype=pl.List(pl.String)),
                "_line_position": [rows_before - start for rows_before, _, _ in lines],
            }
        )
        read = frame.with_columns(_line_position=pl.int_range(frame.height, dtype=pl.Int64))
        # a skipped line goes before the row read after it: a stable sort, skipped lines first
        return pl.concat([bad, read], how="diagonal").sort("_line_position", maintain_order=True).drop("_line_position")


def _a_row_a_line(records: pl.DataFrame) -> pl.DataFrame:
    """``records`` (numbered, with the skipped ones put back, their lines' texts a list in ``RAW_LINE``) with
    a bad record read over several lines made one row a line (see ``IN_QUOTED_FIELD``)."""
    if RAW_LINE not in records.columns:
        return records
    if (records[RAW_LINE].list.len().max() or 0) <= 1:  # type: ignore[operator]
        return records.with_columns(pl.col(RAW_LINE).list.first())
    rows = pl.col(RAW_LINE).list.len().fill_null(1).clip(1)  # each record's rows once exploded
    following = pl.int_range(pl.len()) - pl.col("_first")  # 0 on a record's first line
    return (
        records.with_columns(_first=rows.cum_sum() - rows)
        .explode(RAW_LINE)
        .with_columns(
            pl.col(_LINE) + following,
            pl.when(following > 0).then(pl.lit(IN_QUOTED_FIELD)).otherwise(pl.col(_LINE_REASON)).alias(_LINE_REASON),
        )
        .drop("_first")
    )


def _read_table_file(path: Path, kind: str, rename: dict[str, str] | None = None) -> TableFile:
    """An item or user file (or folder of parts), read like interactions: a line that cannot be read is
    quarantined with its reason, the rest of the file is kept (see ``check_table_file``)."""
    frame = pl.concat(
        [frame.with_columns(pl.lit(file).alias(_FILE)) for file, frame in _table_batches(path, CHUNK_ROWS)],
        how="diagonal_relaxed",
    )
    return check_table_file(frame.rename(rename, strict=False) if rename else frame, kind, path.name)


def _movielens_chunks(folder: Path) -> Iterator[Source]:
    """A MovieLens release as Sources, the ratings a block at a time, read like a CSV source: a line that
    cannot be read (not UTF-8, a field too many or too few) is quarantined with its line, not the file."""
    import pyarrow

    found = _movielens_files(folder)
    if found is None:
        raise BadInputError(f"{folder}: not a MovieLens folder (no u.data, ratings.dat or ratings.csv)")
    ratings_path, items_path, variant = found
    items = _movielens_items(items_path, variant) if items_path else None
    columns = ["user_id", "item_id", "rating", "timestamp"]
    if variant == "movielens-100k":  # tab-separated, no header
        batches = _csv_batches(ratings_path, delimiter="\t", names=columns)
    elif variant == "movielens-1m":  # fields separated by ::, which pyarrow cannot split: one field a line
        lines = _csv_batches(ratings_path, delimiter="\x1f", names=["line"], quoted=False)
        batches = (_split_lines(frame, "::", columns) for frame in lines)
    else:
        renamed = {"userId": "user_id", "movieId": "item_id"}
        batches = (frame.rename(renamed, strict=False) for frame in _csv_batches(ratings_path))
    try:
        for number, frame in enumerate(batches):
            first = number == 0
            yield Source(
                ratings_path.name,
                variant,
                frame,
                items if first else None,
                default_event_type="rating",
                file=ratings_path.name,
            )
    except (pl.exceptions.PolarsError, OSError, pyarrow.ArrowException) as error:
        raise BadInputError(
            f"{printable(str(ratings_path))}: cannot read as {variant}: {printable(first_line(error))}"
        ) from error


def _split_lines(lines: pl.DataFrame, separator: str, columns: list[str]) -> pl.DataFrame:
    """Lines (``line``, numbered in ``_LINE``) split at ``separator`` into ``columns``, for MovieLens' files
    that pyarrow cannot split (``::``) or that are latin-1. A line with more or fewer fields is noted like such
    a CSV line (a row of nulls with its reason and its text, escaped), unless the reader noted it already."""
    separators = pl.col("line").str.count_matches(separator, literal=True)
    wrong = (
        pl.when(separators > len(columns) - 1)
        .then(pl.lit(EXTRA_FIELDS))
        .when(separators < len(columns) - 1)
        .then(pl.lit(TOO_FEW_FIELDS))
    )
    if _LINE_REASON not in lines.columns:
        lines = lines.with_columns(pl.lit(None, pl.String).alias(_LINE_REASON), pl.lit(None, pl.String).alias(RAW_LINE))
    noted = lines.with_columns(
        pl.coalesce(_LINE_REASON, wrong).alias(_LINE_REASON),
        pl.coalesce(
            RAW_LINE,
            pl.when(wrong.is_not_null()).then(pl.col("line")).map_elements(printable, return_dtype=pl.String),
        ).alias(RAW_LINE),
    )
    fields = (
        pl.when(pl.col(_LINE_REASON).is_null())
        .then(pl.col("line"))
        .str.splitn(separator, len(columns))
        .struct.rename_fields(columns)
        .alias("fields")
    )
    split = noted.select(fields, _LINE, _LINE_REASON, RAW_LINE).unnest("fields")
    if split[_LINE_REASON].null_count() == split.height:
        return split.drop(_LINE_REASON, RAW_LINE)
    return split


def _latin1_lines(path: Path) -> pl.DataFrame:
    """A latin-1 file's lines (every byte decodes), numbered from 1 in ``_LINE``, without the empty ones."""
    lines = re.split(r"\r\n?|\n", path.read_bytes().decode("latin-1"))
    numbered = pl.DataFrame({"line": lines, _LINE: pl.int_range(1, len(lines) + 1, eager=True)})
    return numbered.filter(pl.col("line") != "")


def _movielens_items(path: Path, variant: str) -> TableFile:
    if variant == "movielens-latest":  # a CSV file like an item file
        return _read_table_file(path, "item", rename={"movieId": "item_id"})
    try:  # latin-1: every line decodes
        frame = _movielens_100k_items(path) if variant == "movielens-100k" else _movielens_1m_items(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise BadInputError(
            f"{printable(str(path))}: cannot read as {variant}: {printable(first_line(error))}"
        ) from error
    return check_table_file(frame, "item", path.name)


def _movielens_100k_items(path: Path) -> pl.DataFrame:
    names = ["item_id", "title", "release_date", "video_release_date", "url", *MOVIELENS_100K_GENRES]
    raw = _split_lines(_latin1_lines(path), "|", names)
    flags = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in MOVIELENS_100K_GENRES]
    notes = [c for c in (_LINE, _LINE_REASON, RAW_LINE) if c in raw.columns]
    return raw.select("item_id", "title", pl.concat_list(flags).list.drop_nulls().alias("genres"), *notes)


def _movielens_1m_items(path: Path) -> pl.DataFrame:
    return _split_lines(_latin1_lines(path), "::", ["item_id", "title", "genres"])


def check_table_file(frame: pl.DataFrame, kind: str, name: str) -> TableFile:
    """Split an item or user file (``kind`` "item" or "user") into its good rows and its bad lines: a line
    the reader could not read, an empty ``<kind>_id`` (``missing_<kind>_id``) or one no batch may hold
    (``bad_<kind>_id``). A file without that column is refused; an id listed twice is warned about (the
    last line is kept, as the catalogue and users snapshot keep it)."""
    id_column = f"{kind}_id"
    renamed = _added_names_renamed(frame)  # in the quarantine only: the good rows keep their names
    frame = frame.rename(renamed)
    notes = _LINE_REASON in frame.columns
    columns = {c: dtype for c, dtype in frame.schema.items() if c not in (_LINE_REASON, RAW_LINE, _LINE, _FILE)}
    if id_column not in columns:
        found = printable(", ".join(columns)) or "none"
        raise BadInputError(f"{printable(name)}: {kind} file has no {id_column} column (found: {found})")
    ident = _id_expr(id_column, columns[id_column], name)
    reason: pl.Expr = (
        pl.when(ident.is_null() | (ident == ""))
        .then(pl.lit(f"missing_{id_column}"))
        .when(_bad_id(ident))
        .then(pl.lit(f"bad_{id_column}"))
    )
    if notes:
        reason = pl.when(pl.col(_LINE_REASON).is_not_null()).then(pl.col(_LINE_REASON)).otherwise(reason)
    checked = frame.with_row_index("row").with_columns(
        pl.col(_LINE) if _LINE in frame.columns else pl.lit(None, pl.Int64).alias(_LINE),
        _id=ident,
        reason=reason,
    )
    good = checked.filter(pl.col("reason").is_null())
    repeated = good.filter(pl.col("_id").is_duplicated())
    if repeated.height:
        # As before lines were checked one by one: the file's last line of an id is the one kept.
        first = repeated.row(0, named=True)["_id"]
        places = repeated.filter(pl.col("_id") == first)
        # "lines 2 and 4"; "rows 0, 3, 7 and 2 more" when the lines are not known
        where = f"lines {some(places[_LINE])}" if places[_LINE].null_count() == 0 else f"rows {some(places['row'])}"
        logger.warning(
            "ingest: %s: %s id %s is on %s (%s ids listed more than once): the last line of each is kept",
            printable(name),
            kind,
            printable(first),
            where,
            f"{repeated['_id'].n_unique():,}",
        )
    quarantined = checked.filter(pl.col("reason").is_not_null()).select(
        "row",
        pl.col(_FILE).alias("file") if _FILE in frame.columns else pl.lit(name).alias("file"),
        pl.col(_LINE).alias("line"),
        *[pl.col(c) if dtype.is_nested() else pl.col(c).cast(pl.String) for c, dtype in columns.items()],
        *([RAW_LINE] if notes else []),
        "reason",
    )
    rows = good.with_columns(pl.col("_id").alias(id_column)).select(list(columns))
    return TableFile(name, kind, rows.rename({new: old for old, new in renamed.items()}), quarantined)


# What validation and a quarantine file add beside a row's own columns; a source column of one of these
# names is read as source_<name> (a source may well have a `file`, `line` or `reason` column of its own).
ADDED_COLUMNS = ("row", "file", "line", "reason")


def _added_names_renamed(frame: pl.DataFrame) -> dict[str, str]:
    return {c: f"source_{c}" for c in frame.columns if c in ADDED_COLUMNS}


# ---------------------------------------------------------------- validation


def first_of_keys(frame: pl.DataFrame, keys: list[str]) -> pl.Series:
    """Whether each row is the first with its values of `keys` (`is_first_distinct` of their struct).

    The keys are hashed first and only rows whose hash repeats are compared exactly: a full comparison
    row-encodes every key of every row, several times the cost of hashing them, and repeats are rare.
    """
    repeated = frame.select(pl.struct(keys).hash().is_duplicated()).to_series()
    first = pl.repeat(True, frame.height, eager=True)
    if repeated.any():
        exact = frame.filter(repeated).select(pl.struct(keys).is_first_distinct()).to_series()
        first = first.scatter(repeated.arg_true(), exact)
    return first


def _id_expr(column: str, dtype: pl.DataType, file_name: str) -> pl.Expr:
    if not (dtype == pl.String or dtype.is_integer() or dtype == pl.Categorical or dtype == pl.Null):
        raise BadInputError(f"{file_name}: column {column} has type {dtype}; expected text or integer ids")
    return pl.col(column).cast(pl.String).str.strip_chars()


def _timestamp_expr(dtype: pl.DataType, file_name: str) -> pl.Expr:
    column = pl.col("timestamp")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return column.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
        return column.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if dtype == pl.Date:
        return column.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        return _epoch_to_datetime(column.cast(pl.Float64, strict=False))
    if dtype == pl.String or dtype == pl.Null:
        text = column.cast(pl.String).str.strip_chars()
        epoch = _epoch_to_datetime(
            pl.when(text.str.contains(r"^\d+(\.\d+)?$")).then(text.cast(pl.Float64, strict=False))
        )
        parsed = [text.str.to_datetime(fmt, strict=False, time_zone="UTC") for fmt in _TIMESTAMP_FORMATS]
        return pl.coalesce(epoch, *parsed).dt.cast_time_unit("us")
    raise BadInputError(f"{file_name}: column timestamp has type {dtype}; expected a datetime, epoch or text")


def _epoch_to_datetime(seconds_or_more: pl.Expr) -> pl.Expr:
    """Epoch numbers in seconds, milliseconds or microseconds, told apart by magnitude."""
    value = seconds_or_more
    micros = pl.when(value.abs() >= 1e14).then(value).when(value.abs() >= 1e11).then(value * 1e3).otherwise(value * 1e6)
    finite = value.is_finite() & (micros.abs() < 9e18)
    return pl.when(finite).then(micros.cast(pl.Int64, strict=False)).cast(pl.Datetime("us", "UTC"))


def _bad_id(expr: pl.Expr) -> pl.Expr:
    """An id no batch may hold: longer than ``MAX_ID_LENGTH`` or holding a control character."""
    return (expr.str.len_chars() > MAX_ID_LENGTH) | expr.str.contains(r"[\x00-\x1f\x7f]")


def _weight_expr(columns: dict[str, pl.DataType]) -> tuple[pl.Expr, pl.Expr]:
    """(parsed weight, raw weight present) from ``weight`` or else ``rating``."""
    name = "weight" if "weight" in columns else "rating" if "rating" in columns else None
    if name is None:
        return pl.lit(1.0, dtype=pl.Float32), pl.lit(False)
    raw = pl.col(name)
    text = raw.cast(pl.String).str.strip_chars()
    present = text.is_not_null() & (text != "")
    return text.cast(pl.Float64, strict=False), present


def validate_interactions(
    source: Source, logical_date: date, first_row: int = 0, keep_row: bool = False, max_weight: float = MAX_WEIGHT
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split the source's interactions into (valid rows in the lake schema, quarantined rows).

        Quarantined rows keep their original columns as text, plus ``row`` (0-based position in
        the source, counted from ``first_row``), ``file`` (``source.file``), ``line`` (a CSV file's line the
        row starts on, from 1 for the header; null for other sources) and ``reason``. ``keep_row`` keeps
        ``row`` and ``line`` on valid rows too.
    A weight that is not a finite number in [0, ``max_weight``], or that float32 cannot hold, is ``bad_weight``
    (OVERNIGHT_MAX_WEIGHT).
    """
    raw = source.interactions.rename(_added_names_renamed(source.interactions))
    reader_notes = (_LINE_REASON, RAW_LINE) if _LINE_REASON in raw.columns else ()
    columns = {name: dtype for name, dtype in raw.schema.items() if name not in (*reader_notes, _LINE)}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        found = printable(", ".join(columns)) or "none"
        raise BadInputError(f"{source.name}: missing required column {', '.join(missing)} (found: {found})")
    user = _id_expr("user_id", columns["user_id"], source.name)
    item = _id_expr("item_id", columns["item_id"], source.name)
    timestamp = _timestamp_expr(columns["timestamp"], source.name)
    weight, weight_present = _weight_expr(columns)
    event_type = pl.lit(source.default_event_type)
    if "event_type" in columns:
        given = pl.col("event_type").cast(pl.String).str.strip_chars()
        event_type = pl.when(given != "").then(given).otherwise(event_type)
    timestamp_missing = pl.col("timestamp").is_null()
    if columns["timestamp"] == pl.String:
        timestamp_missing = timestamp_missing | (pl.col("timestamp").str.strip_chars() == "")

    # Each value is parsed once into its own column; the reason is then decided from the parsed columns.
    parsed = raw.with_row_index("row", offset=first_row).with_columns(
        pl.col(_LINE) if _LINE in raw.columns else pl.lit(None, pl.Int64).alias(_LINE),
        _user=user,
        _item=item,
        _timestamp=timestamp,
        _timestamp_missing=timestamp_missing,
        _weight_read=weight,
        _weight_present=weight_present,
        _event_type=event_type,
    )
    user, item, timestamp = pl.col("_user"), pl.col("_item"), pl.col("_timestamp")
    weight, weight_present = pl.col("_weight_read"), pl.col("_weight_present")
    reason: pl.Expr = (
        pl.when(user.is_null() | (user == ""))
        .then(pl.lit("missing_user_id"))
        .when(_bad_id(user))
        .then(pl.lit("bad_user_id"))
        .when(item.is_null() | (item == ""))
        .then(pl.lit("missing_item_id"))
        .when(_bad_id(item))
        .then(pl.lit("bad_item_id"))
        .when(pl.col("_timestamp_missing"))
        .then(pl.lit("missing_timestamp"))
        .when(timestamp.is_null())
        .then(pl.lit("bad_timestamp"))
        .when(timestamp >= lake.day_end(logical_date))
        .then(pl.lit(NOT_YET_VISIBLE))
        # finite as the lake stores it too: a float32 holds no number above about 3.4e38
        .when(
            weight_present
            & (weight.is_null() | ~weight.cast(pl.Float32).is_finite() | (weight < 0) | (weight > max_weight))
        )
        .then(pl.lit("bad_weight"))
    )
    if reader_notes:  # a line whose fields could not be read has no values to check
        reason = pl.when(pl.col(_LINE_REASON).is_not_null()).then(pl.col(_LINE_REASON)).otherwise(reason)
    checked = parsed.with_columns(
        # -0 is stored as 0: a weight of nothing has no sign
        _weight=pl.when(~weight_present)
        .then(pl.lit(1.0, dtype=pl.Float32))
        .when(weight == 0)
        .then(pl.lit(0.0, dtype=pl.Float32))
        .otherwise(weight.cast(pl.Float32)),
        reason=reason,
    )
    # A row already seen (same user, item, time and event type) is a duplicate unless it has another reason.
    first = first_of_keys(checked, ["_user", "_item", "_timestamp", "_event_type"])
    checked = checked.with_columns(
        reason=pl.when(pl.col("reason").is_null() & ~first).then(pl.lit("duplicate")).otherwise(pl.col("reason"))
    )
    valid = checked.filter(pl.col("reason").is_null()).select(
        *([pl.col("row"), pl.col(_LINE).alias("line")] if keep_row else []),
        pl.col("_user").alias("user_id"),
        pl.col("_item").alias("item_id"),
        pl.col("_timestamp").alias("timestamp"),
        pl.col("_weight").alias("weight"),
        pl.col("_event_type").alias("event_type"),
    )
    quarantined = checked.filter(pl.col("reason").is_not_null()).select(
        "row",
        pl.lit(source.file, pl.String).alias("file"),
        pl.col(_LINE).alias("line"),
        *[pl.col(c).cast(pl.String) for c in columns],
        *([RAW_LINE] if reader_notes else []),
        "reason",
    )
    return valid, quarantined


def _normalise_items(items: pl.DataFrame, file_name: str) -> pl.DataFrame:
    if "item_id" not in items.columns:  # checked when read (check_table_file)
        found = printable(", ".join(items.columns)) or "none"
        raise BadInputError(f"{printable(file_name)}: item file has no item_id column (found: {found})")
    genres = pl.lit([], dtype=pl.List(pl.String))
    if "genres" in items.columns:
        dtype = items.schema["genres"]
        if isinstance(dtype, pl.List):
            genres = pl.col("genres").cast(pl.List(pl.String))
        else:
            genres = (
                pl.col("genres")
                .cast(pl.String)
                .fill_null("")
                .str.split("|")
                .list.eval(pl.element().str.strip_chars())
                .list.filter((pl.element() != "") & (pl.element() != "(no genres listed)"))
            )
    available = pl.lit(True)
    if "available" in items.columns:
        text = pl.col("available").cast(pl.String).str.to_lowercase()
        available = text.is_null() | text.is_in(["true", "1", "t", "yes", "y"])
    item = _id_expr("item_id", items.schema["item_id"], file_name)
    return (
        items.select(
            item.alias("item_id"),
            (pl.col("title").cast(pl.String) if "title" in items.columns else pl.lit(None, pl.String)).alias("title"),
            genres.alias("genres"),
            available.alias("available"),
            *_item_attributes(items, file_name),
        )
        .filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
        .unique("item_id", keep="last", maintain_order=True)
    )


# Columns of an item file that are not attributes: the catalogue's own, and `genre`, the name genres go by
# among the published attributes (jobs.steps.popularity.item_attributes).
_NOT_ATTRIBUTES = {*lake.ITEMS_SCHEMA, "genre"}
_TRUE_OR_FALSE = ["true", "false"]


def _item_attributes(items: pl.DataFrame, file_name: str) -> list[pl.Expr]:
    """The item file's attribute columns (``lake.MAX_ITEM_ATTRIBUTES``): text, lists of text and flags, with
    text that only says true or false read as a flag and empty text as no value. A column that cannot be one
    is left out with a warning naming it and why: the item file is still good."""
    kept: list[pl.Expr] = []
    for name, dtype in items.schema.items():
        if name in _NOT_ATTRIBUTES:
            continue
        column = items[name]
        expr: pl.Expr | None = None
        why = ""
        if not lake.ATTRIBUTE_NAME.match(name):
            why = "its name is not lower-case letters, digits and _ (at most 32)"
        elif len(kept) == lake.MAX_ITEM_ATTRIBUTES:
            why = f"the item file has more than {lake.MAX_ITEM_ATTRIBUTES} attribute columns"
        elif dtype == pl.Boolean:
            expr = pl.col(name)
        elif dtype == pl.String:
            text = column.str.strip_chars().drop_nulls()
            stripped = pl.col(name).str.strip_chars()
            if (text.str.len_chars().max() or 0) > lake.MAX_ATTRIBUTE_LENGTH:  # type: ignore[operator]
                why = f"a value is longer than {lake.MAX_ATTRIBUTE_LENGTH} characters (free text)"
            elif text.len() and text.str.to_lowercase().is_in(_TRUE_OR_FALSE).all():
                expr = stripped.str.to_lowercase() == "true"
            else:
                expr = pl.when(stripped != "").then(stripped)
        elif dtype == pl.List(pl.String):
            values = column.explode().drop_nulls()
            if (column.list.len().max() or 0) > lake.MAX_ATTRIBUTE_VALUES:  # type: ignore[operator]
                why = f"a list holds more than {lake.MAX_ATTRIBUTE_VALUES} values"
            elif (values.str.len_chars().max() or 0) > lake.MAX_ATTRIBUTE_LENGTH:  # type: ignore[operator]
                why = f"a value is longer than {lake.MAX_ATTRIBUTE_LENGTH} characters"
            else:
                expr = pl.col(name).list.drop_nulls()
        else:
            why = f"its type is {dtype} (an attribute is text, a list of text or true/false)"
        if expr is None:
            logger.warning(
                "ingest: %s: item column %r is not kept as an attribute: %s", printable(file_name), name, why
            )
        else:
            kept.append(expr.alias(name))
    return kept


def build_catalogue(
    previous: pl.DataFrame | None, items: pl.DataFrame | None, interactions: pl.DataFrame
) -> pl.DataFrame:
    """The catalogue after this ingest: what was known, updated by the item file, plus any item seen
    in the source's interactions (never in feedback: see ``UNKNOWN_ITEM``).

    Attribute columns are the item file's, then those earlier snapshots had, ``lake.MAX_ITEM_ATTRIBUTES``
    at most; an item the item file lists has only the attributes the file gives it."""
    parts = [df for df in (previous, items) if df is not None]
    known = (
        pl.concat(parts, how="diagonal_relaxed").unique("item_id", keep="last", maintain_order=True)
        if parts
        else pl.DataFrame(schema=lake.ITEMS_SCHEMA)
    )
    attributes = list(dict.fromkeys(name for part in reversed(parts) for name in lake.item_attribute_columns(part)))
    seen = interactions.select(pl.col("item_id").unique()).join(known, on="item_id", how="anti")
    unseen = seen.with_columns(
        title=pl.lit(None, pl.String),
        genres=pl.lit([], dtype=pl.List(pl.String)),
        available=pl.lit(True),
    )
    columns = [*lake.ITEMS_SCHEMA, *attributes[: lake.MAX_ITEM_ATTRIBUTES]]
    return pl.concat([known.select(columns), unseen], how="diagonal_relaxed").select(columns).sort("item_id")


# ---------------------------------------------------------------- writing


def _merge_partition(lake_dir: UPath, event_date: date, rows: pl.DataFrame) -> None:
    """Merge rows into their event-day partition; merging the same rows twice changes nothing."""
    path = lake.partition_path(lake_dir, event_date)
    if path.exists():
        rows = pl.concat([pl.read_parquet(str(path)), rows], how="vertical_relaxed")
        rows = rows.filter(first_of_keys(rows, DEDUP_KEYS))
    lake.write_parquet_atomically(rows.sort(["timestamp", "user_id", "item_id", "event_type"]), path)


def _reject_message(
    name: str,
    counts: dict[str, int],
    rows: int,
    fraction: float,
    limit: float,
    where: UPath,
    quarantined: pl.LazyFrame,
) -> str:
    """The message refusing a file with too many bad rows; ``quarantined``, its quarantined rows, is read
    only when some of its lines were read inside a bad record's quoted field, to say where the first starts."""
    worst = sorted(((n, r) for r, n in counts.items() if r != NOT_YET_VISIBLE), reverse=True)[:3]
    detail = ", ".join(
        f"{n:,} {r} in column {REASON_COLUMN[r]}" if REASON_COLUMN[r] else f"{n:,} {r} (whole line)" for n, r in worst
    )
    return (
        f"{printable(name)}: {fraction:.1%} of {rows:,} rows are bad (limit {limit:.1%}): {detail}"
        + (_first_quoted_record(quarantined, name) if counts.get(IN_QUOTED_FIELD) else "")
        + f"; rows set aside in {where}"
    )


def _first_quoted_record(quarantined: pl.LazyFrame, source_name: str) -> str:
    """Where the first bad record read over several lines starts and ends, in words (and in which file,
    when the source is a folder of parts)."""
    further = (
        quarantined.filter(pl.col("reason") == IN_QUOTED_FIELD).select("row", "file", "line").sort("row").collect()
    )
    if further.is_empty():
        return ""
    # its further lines: the rows that follow its first IN_QUOTED_FIELD one without a gap
    record = further.filter((pl.col("row").diff().fill_null(1) != 1).cum_sum() == 0)
    start, end, file = record["line"][0] - 1, record["line"][-1], record["file"][0]
    in_part = f" of {printable(file)}" if file != source_name else ""
    return (
        f"; a quoted field opening on line {start:,}{in_part} runs on to line {end:,} (a stray quote?): "
        f"its {end - start + 1:,} lines count as bad rows"
    )


def source_for(settings: Settings, logical_date: date, override: str | None = None) -> Path:
    """The source to ingest for a date: the run's own, else OVERNIGHT_SOURCE, with ``{date}`` filled in."""
    template = override or settings.source
    if not template:
        raise BadInputError("no source to ingest: set OVERNIGHT_SOURCE or give the run a `source` param")
    return Path(template.replace("{date}", logical_date.isoformat()))


@dataclass
class _Staged:
    """What the first pass over the source learnt, chunk by chunk."""

    folder: Path
    rows_read: int = 0
    chunks: int = 0
    chunk_files: dict[str, str | None] = field(default_factory=dict)  # staged chunk name: the file it was read from
    counts: Counter[str] = field(default_factory=Counter)
    user_ids: list[pl.Series] = field(default_factory=list)
    item_ids: list[pl.Series] = field(default_factory=list)
    first: datetime | None = None
    last: datetime | None = None

    def day_dirs(self) -> list[tuple[date, Path]]:
        return lake.dated_dirs(self.folder, "event_date=")

    @property
    def quarantine_parts(self) -> list[Path]:
        return sorted((self.folder / "quarantine").glob("*.parquet"))


def _stage_valid(staged: _Staged, valid: pl.DataFrame, name: str) -> None:
    """Stage valid rows (with their ``row`` and ``line`` numbers) by event day, and note their ids and time range."""
    if not valid.height:
        return
    staged.user_ids.append(valid["user_id"].unique())
    staged.item_ids.append(valid["item_id"].unique())
    low, high = valid.select(low=pl.col("timestamp").min(), high=pl.col("timestamp").max()).row(0)
    staged.first = low if staged.first is None else min(staged.first, low)
    staged.last = high if staged.last is None else max(staged.last, high)
    by_day = valid.with_columns(event_date=pl.col("timestamp").dt.date()).partition_by(
        "event_date", as_dict=True, include_key=False
    )
    for (event_date,), rows in by_day.items():
        lake.write_parquet_atomically(rows, staged.folder / f"event_date={event_date}" / name, STAGING_COMPRESSION)


def _stage(source_path: Path, fmt: str, logical_date: date, folder: Path, max_weight: float) -> tuple[Source, _Staged]:
    """Validate the source chunk by chunk into ``folder``: valid rows by event day, quarantined rows aside."""
    staged = _Staged(folder)
    meta: Source | None = None
    for chunk in source_chunks(source_path, fmt):
        meta = meta or chunk
        valid, quarantined = validate_interactions(
            chunk, logical_date, first_row=staged.rows_read, keep_row=True, max_weight=max_weight
        )
        staged.rows_read += chunk.interactions.height
        name = f"chunk-{staged.chunks:05d}.parquet"
        staged.chunks += 1
        staged.chunk_files[name] = chunk.file
        if quarantined.height:
            staged.counts.update(dict(quarantined.group_by("reason").len().iter_rows()))
            lake.write_parquet_atomically(quarantined, folder / "quarantine" / name)
        _stage_valid(staged, valid, name)
        logger.info("ingest: validated %d rows of %s", staged.rows_read, printable(meta.name))
    assert meta is not None
    if staged.chunks > 1:
        _quarantine_cross_chunk_duplicates(staged)
    return meta, staged


def _quarantine_cross_chunk_duplicates(staged: _Staged) -> None:
    """Each chunk found its own duplicates; a row repeated in two chunks lands in the same event day."""
    for _, day_dir in staged.day_dirs():
        parts = sorted(day_dir.glob("*.parquet"))
        if len(parts) < 2:
            continue
        rows = pl.read_parquet(parts, include_file_paths="_part")
        repeated = rows.filter(~first_of_keys(rows, DEDUP_KEYS))
        if not repeated.height:
            continue
        staged.counts["duplicate"] += repeated.height
        files = {part.name: staged.chunk_files.get(part.name) for part in parts}
        lake.write_parquet_atomically(
            repeated.select(
                "row",
                pl.col("_part").str.split("/").list.last().replace_strict(files, return_dtype=pl.String).alias("file"),
                "line",
                *[pl.col(c).cast(pl.String) for c in lake.INTERACTIONS_SCHEMA],
                reason=pl.lit("duplicate"),
            ),
            staged.folder / "quarantine" / f"{day_dir.name}-duplicates.parquet",
        )


def ingest(settings: Settings, source_path: Path, logical_date: date, fmt: str = "auto") -> IngestResult:
    staging = workdir.ingest_staging(settings, logical_date)
    try:
        return _ingest(settings, Path(source_path), logical_date, fmt, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ingest(settings: Settings, source_path: Path, logical_date: date, fmt: str, staging: Path) -> IngestResult:
    source, staged = _stage(source_path, fmt, logical_date, staging, settings.max_weight)
    counts, rows_read = dict(staged.counts), staged.rows_read
    logger.info("ingest: read %s (%s): %d rows", printable(source.name), source.format, rows_read)
    malformed = sum(n for reason, n in counts.items() if reason != NOT_YET_VISIBLE)
    bad_fraction = malformed / rows_read if rows_read else 0.0

    lake_dir = settings.lake_dir
    quarantine_dir = lake.quarantine_dir(lake_dir, logical_date)
    quarantine_file = quarantine_dir / f"{source.name}.parquet"
    quarantine_file.unlink(missing_ok=True)
    quarantined_rows = sum(counts.values())
    if quarantined_rows:
        parts = pl.concat([pl.scan_parquet(part) for part in staged.quarantine_parts], how="diagonal_relaxed")
        lake.write_atomically(quarantine_file, parts.sink_parquet)

    if bad_fraction > settings.max_bad_fraction:
        quarantined = pl.concat([pl.scan_parquet(part) for part in staged.quarantine_parts], how="diagonal_relaxed")
        raise BadInputError(
            _reject_message(
                source.name, counts, rows_read, bad_fraction, settings.max_bad_fraction, quarantine_file, quarantined
            )
        )
    rows_valid = rows_read - quarantined_rows
    if rows_valid == 0:
        raise BadInputError(
            f"{source.name}: no valid interactions on or before {logical_date} (read {rows_read:,} rows)"
        )
    no_file: tuple[dict[str, int], str | None] = ({}, None)
    item_lines = (
        _quarantine_table_file(source.items, quarantine_dir, settings.max_bad_fraction) if source.items else no_file
    )
    user_lines = (
        _quarantine_table_file(source.users, quarantine_dir, settings.max_bad_fraction) if source.users else no_file
    )

    previous_path = lake.latest_snapshot(lake_dir, "items", logical_date - timedelta(days=1))
    previous = pl.read_parquet(str(previous_path)) if previous_path else None
    items = _normalise_items(source.items.rows, source.items.name) if source.items is not None else None
    seen_items = pl.concat(staged.item_ids).unique().to_frame()
    catalogue = build_catalogue(previous, items, seen_items)
    feedback = (
        _stage_feedback(settings, logical_date, staged, catalogue, quarantine_dir) if settings.ingest_feedback else None
    )

    days = staged.day_dirs()
    with lake.exclusive_writes(lake_dir):
        for count, (event_date, day_dir) in enumerate(days, start=1):
            rows = pl.read_parquet(sorted(day_dir.glob("*.parquet")))
            _merge_partition(lake_dir, event_date, rows.drop("row", "line").filter(first_of_keys(rows, DEDUP_KEYS)))
            if count % 50 == 0:
                logger.info("ingest: wrote %d of %d event-day partitions", count, len(days))
    lake.write_parquet_atomically(catalogue, lake.snapshot_path(lake_dir, "items", logical_date))
    if source.users is not None:  # checked when read: ids present, stripped and listed once
        lake.write_parquet_atomically(source.users.rows, lake.snapshot_path(lake_dir, "users", logical_date))

    result = IngestResult(
        logical_date=logical_date.isoformat(),
        source=str(source_path),
        format=source.format,
        rows_read=rows_read,
        rows_valid=rows_valid,
        rows_quarantined=quarantined_rows,
        quarantined_by_reason=dict(sorted(counts.items())),
        bad_fraction=round(bad_fraction, 6),
        partitions_written=len(days),
        users=pl.concat(staged.user_ids).n_unique(),
        items_in_catalogue=catalogue.height,
        first_event=staged.first.isoformat() if staged.first else None,
        last_event=staged.last.isoformat() if staged.last else None,
        quarantine_path=str(quarantine_file) if quarantined_rows else None,
        items_quarantined_by_reason=item_lines[0],
        items_quarantine_path=item_lines[1],
        users_quarantined_by_reason=user_lines[0],
        users_quarantine_path=user_lines[1],
        **(asdict(feedback) if feedback else {}),
    )
    report = workdir.ingest_report_path(settings, logical_date)
    result = IngestResult(**{**asdict(result), "report_path": str(report)})
    lake.write_json_atomically(asdict(result), report)
    return result


def _quarantine_table_file(table: TableFile, quarantine_dir: UPath, limit: float) -> tuple[dict[str, int], str | None]:
    """Set an item or user file's bad lines aside in ``<file name>.parquet`` beside the source's, and refuse
    the file when more than ``limit`` of its lines are bad; (lines set aside by reason, where)."""
    path = quarantine_dir / f"{table.name}.parquet"
    path.unlink(missing_ok=True)
    counts = table.by_reason()
    if table.quarantined.height:
        lake.write_parquet_atomically(table.quarantined, path)
        logger.warning(
            "ingest: %s: %d bad lines set aside in %s: %s",
            printable(table.name),
            table.quarantined.height,
            path,
            counts,
        )
    fraction = table.quarantined.height / table.rows_read if table.rows_read else 0.0
    if fraction > limit:
        raise BadInputError(
            _reject_message(table.name, counts, table.rows_read, fraction, limit, path, table.quarantined.lazy())
        )
    return counts, str(path) if table.quarantined.height else None


@dataclass(frozen=True)
class _FeedbackCounts:
    feedback_read: int
    feedback_used: int
    feedback_dropped_by_reason: dict[str, int]
    feedback_quarantine_path: str | None


def _stage_feedback(
    settings: Settings, logical_date: date, staged: _Staged, catalogue: pl.DataFrame, quarantine_dir: UPath
) -> _FeedbackCounts:
    """Validate the feedback events of D's window like a source (ids, times, duplicates), drop those on
    items the catalogue does not hold, set the dropped aside with their reason and stage the rest."""
    events = feedback_interactions(settings, logical_date)
    source = Source(FEEDBACK_SOURCE, "postgres", events, default_event_type="feedback")
    # Row numbers after the source's own, so the first copy of a row in both is the source's.
    valid, dropped = validate_interactions(
        source, logical_date, first_row=staged.rows_read, keep_row=True, max_weight=settings.max_weight
    )
    unknown = valid.join(catalogue.select("item_id"), on="item_id", how="anti")
    if unknown.height:
        valid = valid.join(unknown.select("row"), on="row", how="anti")
        unknown = unknown.select(
            "row", *[pl.col(c).cast(pl.String) for c in events.columns], reason=pl.lit(UNKNOWN_ITEM)
        )
        dropped = pl.concat([dropped, unknown], how="diagonal_relaxed")
    _stage_valid(staged, valid, "feedback.parquet")
    by_reason = dict(sorted(dropped.group_by("reason").len().iter_rows())) if dropped.height else {}
    quarantine_file = quarantine_dir / f"{FEEDBACK_SOURCE}.parquet"
    quarantine_file.unlink(missing_ok=True)
    if dropped.height:
        lake.write_parquet_atomically(dropped.sort("row"), quarantine_file)
        logger.warning(
            "ingest: dropped %d feedback events: %s; set aside in %s", dropped.height, by_reason, quarantine_file
        )
    logger.info("ingest: %d of %d feedback events from %s", valid.height, events.height, FEEDBACK_SOURCE)
    return _FeedbackCounts(
        feedback_read=events.height,
        feedback_used=valid.height,
        feedback_dropped_by_reason=by_reason,
        feedback_quarantine_path=str(quarantine_file) if dropped.height else None,
    )
