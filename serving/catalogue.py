"""A batch's catalogue as the service holds it in memory, and the `filter=` grammar over it.

The catalogue (the batch's ``items`` table: each item's popularity and attributes) and its segments'
popular lists are read once when a batch starts being served and kept while it is served: filters,
unknown items' fallbacks and filtered fills are then answered without a database trip. Attributes are
held as an inverted index (attribute, value) -> items, so a filter is a few set lookups per item.
"""

import asyncio
import heapq
import re
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

import sql

# What the batch side publishes in `attributes`: the genres an unknown item's fallback shares, and
# whether an item may be recommended at all (an item without it is).
GENRE_ATTRIBUTE = "genre"
AVAILABLE_ATTRIBUTE = "available"
# Rows parsed between two yields to the event loop while a catalogue loads: lookups keep being answered.
_LOAD_CHUNK_ROWS = 500
_PARSED_FILTERS = 1_024
_NAME = re.compile(r"[^,:\-\s][^,:]*")

Ranked = tuple[tuple[str, ...], tuple[float, ...]]


class FilterError(ValueError):
    """A filter that cannot be applied: malformed, or naming an attribute the batch's items lack."""


@dataclass(frozen=True, slots=True)
class Term:
    """One ANDed term: `name:value` (value None: the attribute is boolean true, or false when negated)."""

    name: str
    value: str | None
    negated: bool


@dataclass(frozen=True, slots=True, eq=False)
class Catalogue:
    """One batch's items, attributes and segments; built once per batch, never changed."""

    # Available items, most popular first, with their popularity: the last fill of a filtered answer.
    by_popularity: tuple[str, ...]
    popularity: Mapping[str, float]
    # attribute -> value as text -> the items having it (a list attribute: each of its values).
    values: Mapping[str, Mapping[str, AbstractSet[str]]]
    # attribute -> the items where it is boolean true / false.
    true: Mapping[str, AbstractSet[str]]
    false: Mapping[str, AbstractSet[str]]
    # genre -> its available items, most popular first.
    genre_lists: Mapping[str, tuple[str, ...]]
    segments: Mapping[str, Ranked]

    attribute_names: frozenset[str] = field(init=False)
    # Filters compiled over this catalogue, by their text (each holds only references to its sets).
    _compiled: dict[str, "Filter"] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = frozenset(self.values) | frozenset(self.true) | frozenset(self.false)
        object.__setattr__(self, "attribute_names", names)
        object.__setattr__(self, "_compiled", {})

    def filter(self, text: str) -> "Filter":
        """`text` parsed and compiled over this catalogue (both cached); a `FilterError` if it cannot be."""
        compiled = self._compiled.get(text)
        if compiled is None:
            compiled = self.compile(parse_filter(text))
            if len(self._compiled) >= _PARSED_FILTERS:
                self._compiled.clear()
            self._compiled[text] = compiled
        return compiled

    def genre_fallback(self, item_id: str) -> Iterator[tuple[str, float]]:
        """The available items sharing a genre with `item_id`, most popular first (nothing for an item
        outside the catalogue or without genres); the item itself is not among them."""
        if item_id not in self.popularity:
            return iter(())
        genres = self.values.get(GENRE_ATTRIBUTE, {})
        lists = [self.genre_lists.get(genre, ()) for genre, items in genres.items() if item_id in items]
        popularity = self.popularity
        merged = heapq.merge(*lists, key=lambda other: (-popularity[other], other))
        return ((other, popularity[other]) for other in _unique(merged) if other != item_id)

    def popular(self) -> Iterator[tuple[str, float]]:
        popularity = self.popularity
        return ((item_id, popularity[item_id]) for item_id in self.by_popularity)

    def compile(self, terms: tuple[Term, ...]) -> "Filter":
        """The filter of `terms` over this catalogue; a `FilterError` naming an attribute its items lack."""
        known = self.attribute_names
        checks = []
        for term in terms:
            if term.name not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise FilterError(f"unknown attribute {term.name!r} (the batch's items have: {listed})")
            if term.value is None:
                members = (self.false if term.negated else self.true).get(term.name, frozenset())
                checks.append((members, True))
            else:
                members = self.values.get(term.name, {}).get(term.value, frozenset())
                checks.append((members, not term.negated))
        return Filter(tuple(checks))


# What a batch without extras filters and fills with: it has no items, so every attribute is unknown.
EMPTY_CATALOGUE = Catalogue(by_popularity=(), popularity={}, values={}, true={}, false={}, genre_lists={}, segments={})


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled filter: an item passes when it is in (or, for a negated value, out of) every set."""

    checks: tuple[tuple[AbstractSet[str], bool], ...]

    def passes(self, item_id: str) -> bool:
        # A loop rather than all(): no generator made per item of every filtered answer.
        for members, wanted in self.checks:  # noqa: SIM110
            if (item_id in members) is not wanted:
                return False
        return True


@lru_cache(maxsize=_PARSED_FILTERS)
def parse_filter(text: str) -> tuple[Term, ...]:
    """`genre:Comedy,genre:-Horror,available,-adult` as its terms; a `FilterError` when malformed."""
    terms = []
    for part in text.split(","):
        term = part.strip()
        negated = term.startswith("-")
        name, colon, value = term.removeprefix("-").partition(":")
        name, value = name.strip(), value.strip()
        if colon:
            if negated:
                raise FilterError(f"malformed filter term {term!r}: negate the value (name:-value), not the name")
            negated = value.startswith("-")
            value = value.removeprefix("-").strip()
            if not value:
                raise FilterError(f"malformed filter term {term!r}: no value after the colon")
        if not _NAME.fullmatch(name):
            raise FilterError(f"malformed filter term {term!r}: expected name:value, name:-value, name or -name")
        terms.append(Term(name, value if colon else None, negated))
    return tuple(terms)


async def load_catalogue(conn: psycopg.AsyncConnection[Any], batch_id: int, with_segments: bool) -> Catalogue:
    """Read a batch's items (and its segments' lists when it has segments) into a `Catalogue`.

    The items come most popular first, so every list is built in order, without sorting; between chunks
    of rows the event loop answers lookups (a chunk takes a few milliseconds).
    """
    values: dict[str, dict[str, set[str]]] = {}
    true: dict[str, set[str]] = {}
    false: dict[str, set[str]] = {}
    popularity: dict[str, float] = {}
    by_popularity: list[str] = []
    genre_lists: dict[str, list[str]] = {}
    cur = conn.cursor()
    set_json_loads(orjson.loads, cur)  # faster than the standard library's parser
    await cur.execute(sql.batch_query("batch_items", batch_id))
    while rows := await cur.fetchmany(_LOAD_CHUNK_ROWS):
        for item_id, item_popularity, attributes in rows:
            popularity[item_id] = item_popularity
            for name, value in attributes.items():
                by_text = values.get(name)
                if by_text is None:
                    by_text = values[name] = {}
                if isinstance(value, list):
                    for element in value:
                        _index(by_text, element, item_id)
                else:
                    _index(by_text, value, item_id)
                if value is True or value is False:
                    (true if value else false).setdefault(name, set()).add(item_id)
            if attributes.get(AVAILABLE_ATTRIBUTE) is not False:
                by_popularity.append(item_id)
                genres = attributes.get(GENRE_ATTRIBUTE)
                for genre in genres if isinstance(genres, list) else [genres]:
                    text = _text(genre)
                    if text is not None:
                        genre_lists.setdefault(text, []).append(item_id)
        await asyncio.sleep(0)
    segments: dict[str, Ranked] = {}
    if with_segments:
        cur = await conn.execute(sql.batch_query("batch_segments", batch_id))
        for segment, item_ids, scores in await cur.fetchall():
            segments[segment] = (tuple(item_ids), tuple(scores))
    return Catalogue(
        by_popularity=tuple(by_popularity),
        popularity=popularity,
        values=values,
        true=true,
        false=false,
        genre_lists={genre: tuple(items) for genre, items in genre_lists.items()},
        segments=segments,
    )


def _index(by_text: dict[str, set[str]], value: Any, item_id: str) -> None:
    text = value if isinstance(value, str) else _text(value)
    if text is not None:
        items = by_text.get(text)
        if items is None:
            by_text[text] = {item_id}
        else:
            items.add(item_id)


def _text(value: Any) -> str | None:
    """An attribute's value as filters compare it: text as is, JSON scalars as JSON writes them (objects
    and nulls are not compared)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _unique(items: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for item_id in items:
        if item_id not in seen:
            seen.add(item_id)
            yield item_id
