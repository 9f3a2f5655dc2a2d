"""One-line and printable error text, short lists ("a, b, c and 2 more"), JSON-safe values and one-line
settings errors, for every role. Standard library only."""

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from decimal import Decimal
from itertools import islice
from typing import Any, Literal, Protocol


def first_line(error: object, limit: int = 2000) -> str:
    """The first line of an error's message (its type's name when it has none), cut at `limit`
    characters, with non-printable characters escaped (`printable`): what a one-line CLI error, log
    line, status or run history row shows, whatever file name or client text the message carries."""
    text = str(error).strip()
    return printable((text.splitlines()[0] if text else type(error).__name__)[:limit])


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``, ``\\n``): a terminal or
    a log never receives raw control bytes from a file name, a source's line or a client."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def some(items: Collection[object], shown: int = 3, *, sentences: bool = False) -> str:
    """The first `shown` of `items` and how many more, so a message stays one short line: "4", "2 and 4",
    "0, 3 and 7", "0, 3, 7 and 2 more". Items that are messages of their own (`sentences`) are joined by
    "; " with the rest in brackets: "no events; 3 users (and 2 more)"."""
    listed = [str(item) for item in islice(items, max(shown, 0))]
    rest = len(items) - len(listed)
    if sentences:
        return "; ".join(listed) + (f" (and {rest:,} more)" if rest else "")
    if rest:
        return f"{', '.join(listed)} and {rest:,} more"
    return f"{', '.join(listed[:-1])} and {listed[-1]}" if len(listed) > 1 else "".join(listed)


def jsonable(value: Any, *, non_finite: Literal["null", "text"] = "null") -> Any:
    """`value` as JSON (and so jsonb and any UTF-8 response) can carry it: dataclasses as dicts, keys as
    text, tuples as lists, dates as ISO text, decimals as floats, text holding a lone surrogate with it
    escaped (``"\\ud800"``), and NaN and infinities, which JSON has no number for, as null, or with
    ``non_finite="text"`` as "NaN", "Infinity" and "-Infinity" (how a 422 echoes a client's input)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, dict):
        return {_utf8(str(k)): jsonable(v, non_finite=non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, non_finite=non_finite) for v in value]
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        if non_finite == "null":
            return None
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


class _Invalid(Protocol):
    """What `settings_error_line` reads of a pydantic ``ValidationError``."""

    def errors(self, *, include_url: bool = ..., include_input: bool = ...) -> Sequence[Mapping[str, Any]]: ...


def settings_error_line(error: _Invalid, prefix: str, missing: Mapping[str, str] | None = None) -> str:
    """A pydantic settings ``ValidationError`` on one line, a problem per invalid setting joined by "; ":
    ``PREFIX_NAME: why`` (a value inside a mapping or list setting adds its place, ``PREFIX_NAME.key``);
    a rule across settings gives its own message, which names them; a required setting not set that has
    an entry in `missing` gives ``PREFIX_NAME is not set: <the entry>``."""
    problems = []
    for detail in error.errors(include_url=False, include_input=False):
        message = " ".join(str(detail["msg"]).split()).removeprefix("Value error, ")
        place = [str(part) for part in detail["loc"]]
        if not place:  # a rule across settings: its message names them
            problems.append(message)
            continue
        field, *inside = place
        variable = f"{prefix}{field.upper()}"
        if detail["type"] == "missing" and not inside and missing and field in missing:
            problems.append(f"{variable} is not set: {missing[field]}")
        else:
            problems.append(f"{variable}{''.join(f'.{part}' for part in inside)}: {message}")
    return "; ".join(problems)
