"""The `filter=` grammar, and a filter compiled over a catalogue."""

import pytest

from serving.catalogue import Catalogue, FilterError, Term, parse_filter


def catalogue() -> Catalogue:
    return Catalogue(
        by_popularity=("a", "b"),
        popularity={"a": 2.0, "b": 1.0, "c": 0.5},
        values={
            "genre": {"Comedy": frozenset({"a", "c"}), "Drama": frozenset({"b", "c"})},
            "available": {"true": frozenset({"a", "b"}), "false": frozenset({"c"})},
        },
        true={"available": frozenset({"a", "b"})},
        false={"available": frozenset({"c"})},
        genre_lists={"Comedy": ("a",), "Drama": ("b",)},
        segments={},
    )


def test_terms_parse_with_negation_booleans_and_spaces() -> None:
    assert parse_filter(" genre:Comedy , genre:-Horror,available,-adult,title:a:b") == (
        Term("genre", "Comedy", False),
        Term("genre", "Horror", True),
        Term("available", None, False),
        Term("adult", None, True),
        Term("title", "a:b", False),
    )


@pytest.mark.parametrize("text", ["", ",", "genre:", "genre:-", "-genre:Comedy", ":x", "-", "a,,b", "genre: "])
def test_malformed_filters_are_refused(text: str) -> None:
    with pytest.raises(FilterError, match="malformed"):
        parse_filter(text)


def test_parsed_and_compiled_filters_are_cached() -> None:
    assert parse_filter("genre:Drama,available") is parse_filter("genre:Drama,available")
    held = catalogue()
    assert held.filter("genre:Drama,available") is held.filter("genre:Drama,available")


def test_a_compiled_filter_ands_its_terms() -> None:
    passing = {
        text: [item for item in "abc" if catalogue().compile(parse_filter(text)).passes(item)]
        for text in ("genre:Comedy", "genre:-Comedy", "available", "-available", "genre:Drama,available", "genre:X")
    }
    assert passing == {
        "genre:Comedy": ["a", "c"],
        "genre:-Comedy": ["b"],
        "available": ["a", "b"],
        "-available": ["c"],
        "genre:Drama,available": ["b"],
        "genre:X": [],
    }


def test_an_unknown_attribute_is_named() -> None:
    with pytest.raises(FilterError, match=r"unknown attribute 'colour' \(the batch's items have: available, genre\)"):
        catalogue().compile(parse_filter("genre:Comedy,colour:red"))


def test_an_unknown_items_fallback_is_its_genres_available_items_by_popularity() -> None:
    assert list(catalogue().genre_fallback("c")) == [("a", 2.0), ("b", 1.0)]
    assert list(catalogue().genre_fallback("a")) == []  # alone in its genre
    assert list(catalogue().genre_fallback("zzz")) == []  # not in the catalogue


def test_compiled_filters_are_kept_while_what_they_hold_stays_under_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serving.catalogue._FILTERS_HELD_ITEMS", 3)
    monkeypatch.setattr("serving.catalogue._FILTERS_HELD_CATALOGUES", 1)
    held = catalogue()
    # Repeated terms are dropped: one negated term refers to the catalogue's own set and holds nothing.
    assert list(held.filter("genre:-Comedy,genre:-Comedy").popular()) == [("b", 1.0)]
    first = held.filter("available,genre:Comedy")  # folds its two sets into one of its own: {a}
    assert list(first.popular()) == [("a", 2.0)]
    assert held.filter("available,genre:Comedy") is first
    # Its own set and two lists more: over the bound, so the filters used longest ago are let go.
    assert list(held.filter("genre:-Drama,genre:-Horror").popular()) == [("a", 2.0)]
    assert held.filter("available,genre:Comedy") is not first
