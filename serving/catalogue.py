"""A batch's catalogue (its items' popularity and attributes, its segments' popular lists) as the service holds it
in memory, read once per batch so that filters and fallbacks need no database trip, and the `filter=` grammar over it.
"""

import asyncio
import heapq
import re
from collections import OrderedDict
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
# Compiled filters hold the sets they fold and the lists they fill from, up to a catalogue's size each:
# a catalogue keeps the filters used last while all they hold stays under _FILTERS_HELD_ITEMS items or
# _FILTERS_HELD_CATALOGUES times its own size, whichever is more.
_FILTERS_HELD_ITEMS = 100_000
_FILTERS_HELD_CATALOGUES = 8
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
    # Filters compiled over this catalogue, by their text.
    _compiled: "_CompiledFilters" = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = frozenset(self.values) | frozenset(self.true) | frozenset(self.false)
        object.__setattr__(self, "attribute_names", names)
        held = max(_FILTERS_HELD_ITEMS, _FILTERS_HELD_CATALOGUES * len(self.popularity))
        object.__setattr__(self, "_compiled", _CompiledFilters(_PARSED_FILTERS, held))

    def filter(self, text: str) -> "Filter":
        """`text` parsed and compiled over this catalogue (both cached); a `FilterError` if it cannot be."""
        compiled = self._compiled.get(text)
        if compiled is None:
            compiled = self.compile(parse_filter(text))
            self._compiled.put(text, compiled)
        return compiled

    def genre_fallback(self, item_id: str, wanted: "Filter | None" = None) -> Iterator[tuple[str, float]]:
        """The available items sharing a genre with `item_id` (and passing `wanted`), most popular first
        (nothing for an item outside the catalogue or without genres); the item itself is not among them."""
        if item_id not in self.popularity:
            return iter(())
        genres = self.values.get(GENRE_ATTRIBUTE, {})
        item_genres = [genre for genre, items in genres.items() if item_id in items]
        if wanted is None:
            lists = [self.genre_lists.get(genre, ()) for genre in item_genres]
        else:
            lists = [wanted.genre_list(genre) for genre in item_genres]
        popularity = self.popularity
        merged = heapq.merge(*lists, key=lambda other: (-popularity[other], other))
        return ((other, popularity[other]) for other in _unique(merged) if other != item_id)

    def compile(self, terms: tuple[Term, ...]) -> "Filter":
        """The filter of `terms` over this catalogue; a `FilterError` naming an attribute its items lack."""
        known = self.attribute_names
        # An item must be in every one of `required` and in none of `refused`.
        required: list[AbstractSet[str]] = []
        refused: list[AbstractSet[str]] = []
        for term in dict.fromkeys(terms):
            if term.name not in known:
                listed = ", ".join(sorted(known)) or "none"
                raise FilterError(f"unknown attribute {term.name!r} (the batch's items have: {listed})")
            if term.value is None:
                required.append((self.false if term.negated else self.true).get(term.name, frozenset()))
            else:
                members = self.values.get(term.name, {}).get(term.value, frozenset())
                (refused if term.negated else required).append(members)
        if not required:
            # Negated values only: an item passes when it is none of them, even one outside the catalogue.
            if len(refused) == 1:
                return Filter(self, refused[0], passing=False)
            owned = set().union(*refused)
            return Filter(self, owned, passing=False, held=len(owned))
        required.sort(key=len)
        if len(required) == 1 and not refused:
            return Filter(self, required[0], passing=True)
        # Each step walks the smaller of its two sets: no more than the sets' sizes together.
        owned = set(required[0]).intersection(*required[1:])
        for members in refused:
            owned -= members
        return Filter(self, owned, passing=True, held=len(owned))


class Filter:
    """A compiled filter: its terms folded into one set, which an item passes by being in it (`passing`)
    or, for a filter of negated values only, by being out of it. What fills a short filtered answer is
    built on its first use and kept with the filter: the catalogue's passing items by popularity, and
    each genre's, so a fill walks only items that pass, never the whole catalogue."""

    __slots__ = ("_genre_lists", "_popular", "cache", "catalogue", "held", "members", "passing")

    def __init__(self, catalogue: Catalogue, members: AbstractSet[str], *, passing: bool, held: int = 0) -> None:
        self.catalogue = catalogue
        self.members = members
        self.passing = passing
        # Items in the sets and lists this filter built (not the catalogue's own sets it refers to).
        self.held = held
        self.cache: _CompiledFilters | None = None
        self._popular: tuple[str, ...] | None = None
        self._genre_lists: dict[str, tuple[str, ...]] = {}

    def passes(self, item_id: str) -> bool:
        return (item_id in self.members) is self.passing

    def popular(self) -> Iterator[tuple[str, float]]:
        """The catalogue's available items that pass, most popular first, with their popularity."""
        if self._popular is None:
            self._popular = self._built(self.catalogue.by_popularity)
        popularity = self.catalogue.popularity
        return ((item_id, popularity[item_id]) for item_id in self._popular)

    def genre_list(self, genre: str) -> tuple[str, ...]:
        """`genre`'s available items that pass, most popular first."""
        built = self._genre_lists.get(genre)
        if built is None:
            built = self._genre_lists[genre] = self._built(self.catalogue.genre_lists.get(genre, ()))
        return built

    def _built(self, items: Iterable[str]) -> tuple[str, ...]:
        members, passing = self.members, self.passing
        kept = tuple(item_id for item_id in items if (item_id in members) is passing)
        self.held += len(kept)
        if self.cache is not None:
            self.cache.grew(len(kept))
        return kept


class _CompiledFilters:
    """The filters compiled over one catalogue by their text, the least recently used dropped first: at
    most `entries` of them, holding at most `items` items together (`Filter.held`)."""

    def __init__(self, entries: int, items: int) -> None:
        self.entries = entries
        self.items = items
        self.held = 0
        self._filters: OrderedDict[str, Filter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._filters)

    def get(self, text: str) -> Filter | None:
        compiled = self._filters.get(text)
        if compiled is not None:
            self._filters.move_to_end(text)
        return compiled

    def put(self, text: str, compiled: Filter) -> None:
        self._filters[text] = compiled
        compiled.cache = self
        self.held += compiled.held
        self._drop_oldest()

    def grew(self, items: int) -> None:
        self.held += items
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        while self._filters and (len(self._filters) > self.entries or self.held > self.items):
            _, dropped = self._filters.popitem(last=False)
            dropped.cache = None
            self.held -= dropped.held


# What a batch without extras filters and fills with: it has no items, so every attribute is unknown.
EMPTY_CATALOGUE = Catalogue(by_popularity=(), popularity={}, values={}, true={}, false={}, genre_lists={}, segments={})


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
