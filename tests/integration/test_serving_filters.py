"""Request-time filters on a real socket against a real Postgres: on user, similar and session answers,
with negation and booleans, 422s for unknown attributes and malformed filters, and short answers filled
from the filtered fallback with `X-Filled-From-Fallback`."""

import re
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.rollouts.canary import start_canary, stop_canary
from jobs.settings import Settings
from serving.variants import TrafficSplit
from tests.support.serving import (
    EXTRAS,
    RECS,
    SWITCH_DEADLINE,
    Extras,
    Publisher,
    Service,
    detail_text,
    item_ids,
    item_ids_of,
    lookup_service,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def service(database_url: str) -> Iterator[Service]:
    published = partial(Publisher(database_url).publish, RECS, extras=EXTRAS)
    with lookup_service(database_url, published, max_filter_length=64) as service:
        yield service


def filled(response: httpx.Response) -> int | None:
    value = response.headers.get("X-Filled-From-Fallback")
    return None if value is None else int(value)


def test_a_users_list_is_filtered_by_value_negation_and_boolean(service: Service) -> None:
    # User 42's list is i1..i12 in order.
    comedy = service.recs("42", k=4, filter="genre:Comedy")
    assert (item_ids(comedy), filled(comedy), comedy.json()["source"]) == (
        ["i1", "i3", "i5", "i8"],
        None,
        "personalized",
    )
    assert item_ids(service.recs("42", k=4, filter="genre:-Comedy")) == ["i2", "i4", "i6", "i7"]
    assert item_ids(service.recs("42", k=3, filter="genre:-Comedy,available")) == ["i2", "i4", "i7"]
    # Repeated filters AND like terms do; nothing else passes both, so nothing was there to fill from.
    both = service.recs("42", k=3, filter=["genre:Comedy", "genre:Drama"])
    assert (item_ids(both), filled(both)) == (["i3"], None)
    assert item_ids(service.recs("42", k=3, filter="genre:Comedy,genre:Drama")) == ["i3"]
    assert item_ids(service.recs("42", k=2, filter="year:1995")) == ["i12"]  # numbers compare as JSON writes them
    assert item_ids(service.recs("42", k=3, filter="genre:Comedy", exclude="i1,i5")) == ["i3", "i8", "i11"]
    # An empty filter filters nothing.
    assert item_ids(service.recs("42", k=2, filter="")) == ["i1", "i2"]


def test_a_short_filtered_answer_is_filled_from_the_filtered_fallback(service: Service) -> None:
    # Only i4 and i9 of 42's list are available Horror; the fallback list adds p2 (p5 is not available).
    horror = service.recs("42", k=4, filter="genre:Horror,available")
    assert (item_ids(horror), filled(horror)) == (["i4", "i9", "p2"], 1)
    # Unavailable items are what `-available` asks for: i6 from the list, p5 from the fallback list.
    unavailable = service.recs("42", k=3, filter="-available")
    assert (item_ids(unavailable), filled(unavailable)) == (["i6", "p5"], 1)
    # A visitor's fallback list, filled from the catalogue by popularity (available items only).
    visitor = service.recs("nobody", k=4, filter="genre:Comedy")
    assert (item_ids(visitor), filled(visitor), visitor.json()["source"]) == (["p3", "i1", "i3", "i5"], 3, "fallback")
    # A segment's list, then the global list, then the catalogue.
    segment = service.recs("anon-fr", k=3, filter="genre:Comedy")
    assert (item_ids(segment), filled(segment), segment.json()["segment"]) == (["p3", "i1", "i3"], 3, "FR")
    # The batch form counts the fills of all its lists.
    many = service.client.post(
        "/v1/recommendations:batch", json={"user_ids": ["42", "nobody"], "k": 4, "filter": "genre:Horror,available"}
    )
    results = many.json()["results"]
    assert [item_ids_of(result) for result in results] == [["i4", "i9", "p2"], ["p2", "i4", "i9"]]
    assert filled(many) == 3


def test_similar_and_session_answers_are_filtered_and_filled(service: Service) -> None:
    # i1's neighbours i3 i5 i8 i2 i4 i11 i12 i7: the Dramas are i3 i2 i7, then i1's Comedies that are
    # Dramas (only i3), then the fallback list's Dramas p1 and p4.
    drama = service.similar("i1", k=5, filter="genre:Drama")
    assert (item_ids(drama), filled(drama), drama.json()["source"]) == (["i3", "i2", "i7", "p1", "p4"], 2, "similar")
    assert item_ids(service.similar("i1", k=3, filter="genre:-Drama,genre:-Horror")) == ["i5", "i8", "i11"]
    many = service.client.post("/v1/items:similar", json={"item_ids": ["i1", "i2"], "k": 2, "filter": "genre:Comedy"})
    assert [item_ids_of(result) for result in many.json()["results"]] == [["i3", "i5"], ["i3", "i1"]]
    session = service.session(items=["i2"], k=2, filter="genre:Comedy")
    assert (item_ids(session), session.json()["source"]) == (["i3", "i1"], "session")
    short = service.session(items=["i2"], k=4, filter="genre:Comedy")
    assert (item_ids(short), filled(short)) == (["i3", "i1", "p3", "i5"], 2)


def test_unknown_attributes_and_malformed_filters_are_422s(service: Service) -> None:
    unknown = service.recs("42", filter="genre:Comedy,colour:red")
    assert unknown.status_code == 422
    problem = unknown.json()["detail"][0]
    assert problem["loc"] == ["query", "filter"] and "'colour'" in problem["msg"] and "genre" in problem["msg"]
    assert "'colour'" in detail_text(service.similar("i1", filter="colour"))
    body_unknown = service.session(items=["i1"], filter="-colour")
    assert body_unknown.status_code == 422 and body_unknown.json()["detail"][0]["loc"] == ["body", "filter"]
    batch = service.client.post("/v1/recommendations:batch", json={"user_ids": ["42"], "filter": "colour:red"})
    assert batch.status_code == 422 and "'colour'" in detail_text(batch)
    for malformed in ("genre:", "genre:Comedy,", ",available", "-genre:Comedy", "genre:-", ":Comedy", "-"):
        response = service.recs("42", filter=malformed)
        assert response.status_code == 422, malformed
        assert "malformed" in detail_text(response), malformed
    too_long = service.recs("42", filter="genre:" + "x" * 60)
    assert too_long.status_code == 422 and "longer than 64" in detail_text(too_long)


def test_the_schema_states_the_filters_the_live_batch_accepts(service: Service) -> None:
    document = service.client.get("/openapi.json").json()
    parameters = document["paths"]["/v1/items/{item_id}/similar"]["get"]["parameters"]
    filter_schema = next(p["schema"] for p in parameters if p["name"] == "filter")
    assert filter_schema["maxLength"] == 64
    assert "available|genre|year" in filter_schema["pattern"]
    k_schema = next(p["schema"] for p in parameters if p["name"] == "k")
    assert k_schema["maximum"] == EXTRAS.similar_k


# One term naming each attribute of EXTRAS' items.
TERM_OF_ATTRIBUTE = {"available": "available", "genre": "genre:Comedy", "year": "year:1995"}
WITHOUT_YEAR = replace(
    EXTRAS,
    items={
        item_id: (popularity, {name: value for name, value in attributes.items() if name != "year"})
        for item_id, (popularity, attributes) in EXTRAS.items.items()
    },
)


def filter_schemas(service: Service) -> list[dict[str, Any]]:
    """The `filter` parameter's schema on both GET lookups, as the served document states it."""
    paths = service.client.get("/openapi.json").json()["paths"]
    return [
        next(parameter["schema"] for parameter in paths[path]["get"]["parameters"] if parameter["name"] == "filter")
        for path in ("/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar")
    ]


def admits(schema: dict[str, Any], text: str) -> bool:
    return len(text) <= schema["maxLength"] and re.search(schema.get("pattern", ""), text) is not None


def attributes_admitted(service: Service) -> list[str]:
    user_schema, similar_schema = filter_schemas(service)
    admitted = [name for name, term in TERM_OF_ATTRIBUTE.items() if admits(user_schema, term)]
    assert admitted == [name for name, term in TERM_OF_ATTRIBUTE.items() if admits(similar_schema, term)]
    return admitted


@pytest.mark.parametrize(
    ("canary_extras", "both_arms_have"),
    [(WITHOUT_YEAR, ["available", "genre"]), (None, [])],
    ids=["canary-items-without-year", "canary-without-items"],
)
def test_with_a_canary_the_schema_admits_only_the_filters_both_arms_accept(
    database_url: str, tmp_path: Path, canary_extras: Extras | None, both_arms_have: list[str]
) -> None:
    """A user cannot know their arm, so a filter the schema admits must be one either arm's batch accepts."""
    publisher = Publisher(database_url)
    rollouts = Settings(database_url=database_url, data_dir=tmp_path / "var")
    users = [f"u{n}" for n in range(40)]
    assert {TrafficSplit("test-salt", 0.5).variant(user) for user in users} == {"canary", "production"}

    def arms_answering() -> set[str]:
        return {service.recs(user).headers["X-Variant"] for user in users}

    with lookup_service(database_url, partial(publisher.publish, RECS, extras=EXTRAS)) as service:
        assert attributes_admitted(service) == ["available", "genre", "year"]
        canary = publisher.publish(RECS, switch=False, extras=canary_extras)
        start_canary(rollouts, canary, 0.5, salt="test-salt")
        service.wait_for(lambda: arms_answering() == {"canary", "production"}, within=SWITCH_DEADLINE)

        assert attributes_admitted(service) == both_arms_have
        for name, term in TERM_OF_ATTRIBUTE.items():
            statuses = {
                response.status_code
                for user in users
                for response in (service.recs(user, filter=term), service.similar("i1", user_id=user, filter=term))
            }
            # Left out because canary users are refused it, not for nothing.
            assert statuses == ({200} if name in both_arms_have else {200, 422}), term
        assert {service.recs(user, filter="").status_code for user in users} == {200}

        stop_canary(rollouts)
        service.wait_for(lambda: arms_answering() == {"production"}, within=SWITCH_DEADLINE)
        assert attributes_admitted(service) == ["available", "genre", "year"]
