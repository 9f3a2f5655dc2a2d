"""Filtered answers and their fills: the same items as the plain term-by-term definition of a filter gives,
at a cost that does not grow with the catalogue for every list of a request."""

import heapq
import random
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from itertools import chain
from typing import Any

import pytest

from serving.catalogue import AVAILABLE_ATTRIBUTE, GENRE_ATTRIBUTE, Catalogue, Term, parse_filter
from serving.live import LiveBatch, live_batch_from_row
from serving.lookup import Cached, Recs, cache_row, pick, pick_similar

NOW = datetime(2026, 12, 1, tzinfo=UTC)
GENRES = ["Comedy", "Drama", "Horror", "Western", "Noir"]


class CountedWalks(tuple[str, ...]):
    """A catalogue list that counts how often it is walked from the start."""

    walks = 0

    def __iter__(self) -> Iterator[str]:
        CountedWalks.walks += 1
        return super().__iter__()


def catalogue_of(
    items: dict[str, tuple[float, dict[str, Any]]],
    segments: dict[str, list[str]],
    walked: type[tuple[str, ...]] = tuple,
) -> Catalogue:
    """The catalogue `serving.catalogue.load_catalogue` reads for these items (most popular first, ties by id)."""
    values: dict[str, dict[str, set[str]]] = {}
    true: dict[str, set[str]] = {}
    false: dict[str, set[str]] = {}
    by_popularity: list[str] = []
    genre_lists: dict[str, list[str]] = {}
    for item_id, (_, attributes) in sorted(items.items(), key=lambda item: (-item[1][0], item[0])):
        for name, value in attributes.items():
            for element in value if isinstance(value, list) else [value]:
                text = element if isinstance(element, str) else str(element).lower()
                values.setdefault(name, {}).setdefault(text, set()).add(item_id)
            if isinstance(value, bool):
                (true if value else false).setdefault(name, set()).add(item_id)
        if attributes.get(AVAILABLE_ATTRIBUTE) is not False:
            by_popularity.append(item_id)
            for genre in attributes.get(GENRE_ATTRIBUTE, []):
                genre_lists.setdefault(genre, []).append(item_id)
    return Catalogue(
        by_popularity=walked(by_popularity),
        popularity={item_id: popularity for item_id, (popularity, _) in items.items()},
        values=values,
        true=true,
        false=false,
        genre_lists={genre: walked(listed) for genre, listed in genre_lists.items()},
        segments={
            segment: (tuple(listed), tuple(float(len(listed) - rank) for rank in range(len(listed))))
            for segment, listed in segments.items()
        },
    )


def random_items(rng: random.Random, count: int) -> dict[str, tuple[float, dict[str, Any]]]:
    items = {}
    for n in range(count):
        attributes: dict[str, Any] = {"genre": rng.sample(GENRES, rng.randint(0, 3)), "year": rng.randint(1990, 1995)}
        if rng.random() < 0.9:
            attributes["available"] = rng.random() < 0.85
        if rng.random() < 0.5:
            attributes["adult"] = rng.random() < 0.3
        # Few popularity values, so ties (broken by id) are common.
        items[f"i{n}"] = (float(rng.randint(1, 40)), attributes)
    return items


def batch_of(catalogue: Catalogue, fallback: list[str]) -> LiveBatch:
    scores = [float(len(fallback) - rank) / 10 for rank in range(len(fallback))]
    return live_batch_from_row(3, "m", 20, NOW, fallback, scores, NOW, 20, "country", catalogue)


# ---------------------------------------------------------------------------- the plain definition


def plain_passes(catalogue: Catalogue, terms: tuple[Term, ...]) -> Any:
    """Whether an item meets every term, term by term, as the grammar in docs/serving.md#filters says."""

    def passes(item_id: str) -> bool:
        for term in terms:
            if term.value is None:
                held = (catalogue.false if term.negated else catalogue.true).get(term.name, set())
                if item_id not in held:
                    return False
            elif (item_id in catalogue.values.get(term.name, {}).get(term.value, set())) is term.negated:
                return False
        return True

    return passes


def plain_genre_fallback(catalogue: Catalogue, item_id: str) -> Iterator[tuple[str, float]]:
    if item_id not in catalogue.popularity:
        return iter(())
    genres = catalogue.values.get(GENRE_ATTRIBUTE, {})
    lists = [catalogue.genre_lists.get(genre, ()) for genre, items in genres.items() if item_id in items]
    popularity = catalogue.popularity
    merged = heapq.merge(*lists, key=lambda other: (-popularity[other], other))
    return ((other, popularity[other]) for other in dict.fromkeys(merged) if other != item_id)


def plain_take(
    batch: LiveBatch,
    k: int,
    leave_out: frozenset[str],
    passes: Any,
    ranked: Iterable[tuple[str, float]],
    segment: str | None,
    answered_segment: str | None = None,
    genres_of: str | None = None,
    fallback_is_global: bool = False,
) -> tuple[list[str], list[float], str | None, int]:
    """The first k passing items of `ranked`, then of the fills in order, each list walked in full; and
    how many came from the fills."""
    catalogue = batch.catalogue
    assert catalogue is not None
    items: list[str] = []
    scores: list[float] = []
    for item_id, score in ranked:
        if len(items) < k and item_id not in leave_out and passes(item_id):
            items.append(item_id)
            scores.append(score)
    own = len(items)
    fills: list[Iterable[tuple[str, float]]] = []
    if genres_of is not None:
        fills.append(plain_genre_fallback(catalogue, genres_of))
    if answered_segment is None and segment is not None and segment in catalogue.segments:
        fills.append(zip(*catalogue.segments[segment], strict=True))
    if not fallback_is_global:
        fills.append(zip(batch.fallback_item_ids, batch.fallback_scores, strict=True))
    fills.append((item_id, catalogue.popularity[item_id]) for item_id in catalogue.by_popularity)
    for item_id, score in chain.from_iterable(fills):
        if len(items) < k and item_id not in leave_out and item_id not in items and passes(item_id):
            items.append(item_id)
            scores.append(score)
    return items, scores, answered_segment, len(items) - own


def first_of_each(ranked: Iterable[tuple[str, float]]) -> Iterable[tuple[str, float]]:
    first: dict[str, float] = {}
    for item_id, score in ranked:
        first.setdefault(item_id, score)
    return first.items()


def answer(recs: Recs) -> tuple[list[str], list[float], str | None, int]:
    return recs.item_ids, recs.scores, recs.segment, recs.filled


def plain_user_answer(
    batch: LiveBatch, row: Cached, k: int, exclude: frozenset[str], passes: Any, segment: str | None
) -> tuple[list[str], list[float], str | None, int]:
    catalogue = batch.catalogue
    assert catalogue is not None
    fallback = zip(batch.fallback_item_ids, batch.fallback_scores, strict=True)
    if isinstance(row, tuple):
        ranked = zip(row[0].split("\x00") if row[0] else [], memoryview(row[1]).cast("d").tolist(), strict=True)
        return plain_take(batch, k, exclude, passes, ranked, segment)
    wanted_segment = segment or row
    if wanted_segment is not None and wanted_segment in catalogue.segments:
        listed = zip(*catalogue.segments[wanted_segment], strict=True)
        return plain_take(batch, k, exclude, passes, listed, None, wanted_segment)
    return plain_take(batch, k, exclude, passes, fallback, None, fallback_is_global=True)


def plain_similar_answer(
    batch: LiveBatch, item_id: str, neighbours: list[str] | None, k: int, exclude: frozenset[str], passes: Any
) -> tuple[list[str], list[float], str | None, int]:
    catalogue = batch.catalogue
    assert catalogue is not None
    leave_out = exclude | {item_id}
    if neighbours is not None:
        ranked = zip(neighbours, similarities(neighbours), strict=True)
        return plain_take(batch, k, leave_out, passes, ranked, None, genres_of=item_id)
    fallback = zip(batch.fallback_item_ids, batch.fallback_scores, strict=True)
    ranked_fallback = first_of_each(chain(plain_genre_fallback(catalogue, item_id), fallback))
    return plain_take(batch, k, leave_out, passes, ranked_fallback, None, fallback_is_global=True)


def similarities(neighbours: list[str]) -> list[float]:
    return [1.0 - rank / 100 for rank in range(len(neighbours))]


# ---------------------------------------------------------------------------- tests


def random_filter(rng: random.Random) -> str:
    terms = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.5:
            genre = rng.choice([*GENRES, "Nope"])
            terms.append(f"genre:{'-' if rng.random() < 0.4 else ''}{genre}")
        elif kind < 0.7:
            terms.append(f"year:{'-' if rng.random() < 0.5 else ''}{rng.randint(1989, 1996)}")
        else:
            terms.append(rng.choice(["available", "-available", "adult", "-adult", "available:true"]))
    if rng.random() < 0.3:
        terms += terms[: rng.randint(1, len(terms))]  # repeated terms
    return ",".join(terms)


@pytest.mark.parametrize("seed", range(6))
def test_filtered_answers_are_the_items_the_term_by_term_definition_gives(seed: int) -> None:
    rng = random.Random(seed)
    items = random_items(rng, 150)
    ids = list(items)
    outside = ["x1", "x2", "x3"]  # items in lists but not in the catalogue
    segments = {"FR": rng.sample(ids, 15), "DE": rng.sample(ids, 5) + outside[:1]}
    catalogue = catalogue_of(items, segments)
    batch = batch_of(catalogue, rng.sample(ids, 10) + outside[1:2])
    filters = ["genre:Nope", "genre:-Comedy,genre:-Drama", "-available", "available:true,available"]
    filters += [random_filter(rng) for _ in range(40)]
    for text in filters:
        wanted = catalogue.filter(text)
        passes = plain_passes(catalogue, parse_filter(text))
        for _ in range(12):
            k = rng.choice([1, 5, 20])
            exclude = frozenset(rng.sample(ids, rng.choice([0, 3, 40])))
            segment = rng.choice([None, "FR", "DE", "XX"])
            listed = rng.sample(ids + outside, rng.randint(0, 20))
            row: Cached = rng.choice([cache_row(listed, similarities(listed)), None, "FR", "DE", "XX"])
            recs = pick(batch, "u", row, k, exclude, wanted, segment)
            assert answer(recs) == plain_user_answer(batch, row, k, exclude, passes, segment), (text, row, segment)
            item_id = rng.choice(ids + outside)
            neighbours = rng.choice([None, rng.sample(ids, rng.randint(0, 12))])
            similar_row = None if neighbours is None else cache_row(neighbours, similarities(neighbours))
            similar = pick_similar(batch, item_id, similar_row, "", k, exclude, wanted)
            assert answer(similar) == plain_similar_answer(batch, item_id, neighbours, k, exclude, passes), text


def test_fills_walk_the_catalogue_once_per_filter_not_once_per_list() -> None:
    rng = random.Random(1)
    items = random_items(rng, 400)
    catalogue = catalogue_of(items, {"FR": list(items)[:10]}, walked=CountedWalks)
    batch = batch_of(catalogue, list(items)[10:20])
    nothing = ",".join(f"genre:-{n}" for n in range(51)) + ",genre:Nope"
    CountedWalks.walks = 0
    for text in (nothing, "genre:Western,year:1990,-adult"):
        wanted = catalogue.filter(text)
        for n in range(200):
            item_id = f"i{n}"
            pick_similar(batch, item_id, cache_row(["i1", "i2"], [0.9, 0.8]), "", 20, frozenset(), wanted)
            pick_similar(batch, item_id, None, "", 20, frozenset(), wanted)
            pick(batch, item_id, cache_row(["i3"], [0.5]), 20, frozenset(), wanted, "FR")
    # The catalogue's list and each genre's, at most once for each of the two filters.
    assert CountedWalks.walks <= 2 * (1 + len(GENRES))
