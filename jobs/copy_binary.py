"""Postgres binary COPY bodies of a batch's rows: (key, item_ids, scores[, reasons]) and rows of plain text, real
and jsonb fields, encoded column-wise with Arrow's string kernels, not one Python call per row (``write_row``).
"""

from collections.abc import Mapping
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
TEXT_OID, FLOAT4_OID = 25, 700
NULL_LENGTH = -1
NOTHING = pa.scalar(b"", pa.large_binary())  # the separator of every join
JSONB_VERSION = pa.scalar(b"\x01", pa.large_binary())  # jsonb's binary form: this byte, then the JSON text
# The plain fields `encode_fields` writes: text, real (float4) and jsonb (from JSON text)
FieldKind = Literal["text", "real", "jsonb"]


class EncodingError(ValueError):
    """Rows that the recs table's ``NOT NULL`` columns could not take."""


# A whole block of rows becomes one COPY body, element-wise over all rows: each element is its 4-byte length
# joined to its bytes, each row's elements are joined into its array, and each row's fields to their length
# prefixes.
def _fixed(values: np.ndarray) -> pa.Array:
    """One binary value per row of ``values`` (a 2-D uint8 array): its bytes."""
    width = values.shape[1]
    flat = np.ascontiguousarray(values).reshape(-1)
    offsets = np.arange(0, (values.shape[0] + 1) * width, width, dtype=np.int64)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), values.shape[0], [None, pa.py_buffer(offsets), pa.py_buffer(flat)]
    )


def _int32(*columns: np.ndarray | int, rows: int) -> np.ndarray:
    """Big-endian int32 columns side by side, as a (rows, 4 * columns) uint8 array."""
    stacked = np.empty((rows, len(columns)), dtype=">i4")
    for i, column in enumerate(columns):
        stacked[:, i] = column
    return stacked.view(np.uint8).reshape(rows, 4 * len(columns))


def _join_lists(elements: pa.Array, offsets: np.ndarray) -> pa.Array:
    """One binary per row: the row's element blobs concatenated."""
    lists = pa.LargeListArray.from_arrays(pa.array(offsets - offsets[0], pa.int64()), elements)
    return pc.binary_join(lists, NOTHING)


def _array_field(
    values: pa.Array, valid: np.ndarray, value_lengths: np.ndarray, offsets: np.ndarray, oid: int
) -> pa.Array:
    """The length-prefixed binary form of one array column: header, then per element length and bytes."""
    rows = len(offsets) - 1
    lengths = np.diff(offsets)
    element_prefix = _fixed(_int32(np.where(valid, value_lengths, NULL_LENGTH), rows=len(valid)))
    elements = pc.binary_join_element_wise(element_prefix, values, NOTHING)
    body = _join_lists(elements, offsets)
    has_null = np.zeros(rows, dtype=bool)
    if not valid.all():
        row_of_element = np.repeat(np.arange(rows), lengths)
        has_null = np.bincount(row_of_element, weights=~valid, minlength=rows) > 0
    header = _fixed(_int32(1, has_null, oid, lengths, 1, rows=rows))
    return pc.binary_join_element_wise(header, body, NOTHING)


def _body(encoded: pa.Array, rows: int) -> pa.Buffer:
    """The bytes of ``encoded``'s rows, one after the other."""
    encoded = encoded.cast(pa.large_binary())
    data_offsets = np.frombuffer(encoded.buffers()[1], dtype=np.int64)[encoded.offset : encoded.offset + rows + 1]
    return encoded.buffers()[2][data_offsets[0] : data_offsets[-1]] if rows else pa.py_buffer(b"")


def _text_array_field(lists: pa.Array) -> pa.Array:
    """The binary form of a text[] column (``lists``: large lists of binary)."""
    values = lists.flatten()
    valid = ~np.asarray(values.is_null(), dtype=bool)
    return _array_field(
        values.fill_null(NOTHING),
        valid,
        pc.binary_length(values).fill_null(0).to_numpy(zero_copy_only=False),
        np.asarray(lists.offsets, dtype=np.int64),
        TEXT_OID,
    )


def _length_prefix(field: pa.Array, rows: int) -> pa.Array:
    return _fixed(_int32(pc.binary_length(field).to_numpy(zero_copy_only=False), rows=rows))


def encode_rows(frame: pl.DataFrame, key: str = "user_id", reasons: bool = False) -> pa.Buffer:
    """The COPY rows of ``frame``'s ``key`` (text: a user id, an item id, a segment), item_ids and scores and,
    with ``reasons``, reason_codes (bytea) and reason_refs (text[]), to send between SIGNATURE and TRAILER."""
    columns = [key, "item_ids", "scores", *(("reason_codes", "reason_refs") if reasons else ())]
    table = frame.select(columns).to_arrow(compat_level=pl.CompatLevel.oldest())
    users = table.column(key).combine_chunks().cast(pa.large_binary())
    items = table.column("item_ids").combine_chunks().cast(pa.large_list(pa.large_binary()))
    scores = table.column("scores").combine_chunks().cast(pa.large_list(pa.float32()))
    if users.null_count or items.null_count or scores.null_count:
        raise EncodingError("a row has a null user id, item list or score list")
    rows = len(users)
    offsets = np.asarray(items.offsets, dtype=np.int64)
    if not np.array_equal(np.diff(offsets), np.diff(np.asarray(scores.offsets, dtype=np.int64))):
        raise EncodingError("a row has item and score lists of different lengths")

    item_field = _text_array_field(items)
    score_values = scores.flatten()
    score_valid = ~np.asarray(score_values.is_null(), dtype=bool)
    floats = np.asarray(score_values.fill_null(0.0), dtype=">f4")
    score_offsets = np.concatenate([[0], np.cumsum(np.where(score_valid, 4, 0))]).astype(np.int64)
    score_bytes = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        len(floats),
        [None, pa.py_buffer(score_offsets), pa.py_buffer(floats[score_valid].tobytes())],
    )
    score_field = _array_field(score_bytes, score_valid, np.full(len(floats), 4), offsets, FLOAT4_OID)
    fields = [item_field, score_field]
    if reasons:
        codes = table.column("reason_codes").combine_chunks().cast(pa.large_binary())
        refs = table.column("reason_refs").combine_chunks().cast(pa.large_list(pa.large_binary()))
        if codes.null_count or refs.null_count:
            raise EncodingError("a row has null reasons")
        fields += [codes, _text_array_field(refs)]

    user_lengths = pc.binary_length(users).to_numpy(zero_copy_only=False)
    field_count = np.zeros((rows, 2), dtype=np.uint8)
    field_count[:, 1] = 1 + len(fields)
    prefixed = [part for field in fields for part in (_length_prefix(field, rows), field)]
    prefix = _fixed(np.hstack([field_count, _int32(user_lengths, rows=rows)]))
    encoded = pc.binary_join_element_wise(prefix, users, *prefixed, NOTHING)
    return _body(encoded, rows)


def encode_fields(frame: pl.DataFrame, kinds: Mapping[str, FieldKind]) -> pa.Buffer:
    """The COPY rows of ``frame``'s columns named in ``kinds``, in that order, each a field of its kind
    (none may be null), to send between SIGNATURE and TRAILER."""
    table = frame.select(list(kinds)).to_arrow(compat_level=pl.CompatLevel.oldest())
    rows = frame.height
    fields = [_fixed(np.full(rows, len(kinds), dtype=">i2").view(np.uint8).reshape(rows, 2))]
    for name, kind in kinds.items():
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise EncodingError(f"a row has a null {name}")
        if kind == "real":
            values = _fixed(
                np.asarray(column.to_numpy(zero_copy_only=False), dtype=">f4").view(np.uint8).reshape(rows, 4)
            )
        elif kind == "jsonb":
            values = pc.binary_join_element_wise(JSONB_VERSION, column.cast(pa.large_binary()), NOTHING)
        else:
            values = column.cast(pa.large_binary())
        lengths = pc.binary_length(values).to_numpy(zero_copy_only=False)
        fields += [_fixed(_int32(lengths, rows=rows)), values]
    return _body(pc.binary_join_element_wise(*fields, NOTHING), rows)
