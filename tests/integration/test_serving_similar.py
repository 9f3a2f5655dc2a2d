"""Similar items on a real socket against a real Postgres: neighbours served from the batch a user is
routed to, k/exclude/filter applied, fallbacks for items without neighbours, switches and limits."""

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from jobs.rollouts.canary import start_canary
from jobs.settings import Settings
from serving.variants import TrafficSplit
from tests.support.serving import (
    EXTRAS,
    FALLBACK,
    RECS,
    SIMILAR,
    SWITCH_DEADLINE,
    Extras,
    K,
    Publisher,
    Service,
    batch_of,
    detail_text,
    item_ids,
    item_ids_of,
    lookup_service,
    running,
    service_settings,
    similarities_for,
)
from tests.support.serving import publisher_fixture as publisher_fixture  # the `publisher` fixture

pytestmark = pytest.mark.integration


@pytest.fixture
def service(database_url: str, publisher: Publisher) -> Iterator[Service]:
    with lookup_service(database_url, partial(publisher.publish, RECS, extras=EXTRAS)) as service:
        yield service


def test_an_items_neighbours_are_served_best_first_with_k_and_exclude(service: Service) -> None:
    response = service.similar("i1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["item_id", "items", "source", "model_id", "batch_id", "generated_at", "variant"]
    assert (body["item_id"], body["source"], body["variant"]) == ("i1", "similar", "production")
    assert item_ids(response) == SIMILAR["i1"]
    assert [item["score"] for item in body["items"]] == pytest.approx(similarities_for(SIMILAR["i1"]))
    assert batch_of(response) == body["batch_id"]
    assert all(name in response.headers for name in ("X-Data-Age-Seconds", "X-Variant", "X-Request-Id"))
    assert "X-Filled-From-Fallback" not in response.headers

    assert item_ids(service.similar("i1", k=3)) == SIMILAR["i1"][:3]
    assert item_ids(service.similar("i1", k=3, exclude="i5,i8")) == ["i3", "i2", "i4"]
    assert item_ids(service.similar("i1", k=2, exclude=["i3", "i5"])) == ["i8", "i2"]


def test_k_beyond_similar_k_and_bad_ids_are_422s_naming_the_limit(database_url: str, publisher: Publisher) -> None:
    publisher.publish(RECS, extras=Extras(SIMILAR, EXTRAS.items, similar_k=8))
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        assert service.similar("i1", k=8).status_code == 200
        for k in (0, 9, "ten"):
            response = service.similar("i1", k=k)
            assert response.status_code == 422, (k, response.text)
        assert "similar_k" in detail_text(service.similar("i1", k=9)) and "8" in detail_text(service.similar("i1", k=9))
        assert service.similar("x" * 257).status_code == 422
        assert service.similar("i1", exclude=",".join(f"e{n}" for n in range(501))).status_code == 422
        assert service.similar("i1", user_id="").status_code == 422
        many = service.client.post("/v1/items:similar", json={"item_ids": ["i1"] * 1001})
        assert many.status_code == 422 and "1000" in detail_text(many)


def test_an_item_without_neighbours_gets_its_genres_popular_items_else_the_fallback(service: Service) -> None:
    # i4 is a Horror item without a neighbour list: the popular available Horror items (p5 and i6 are not
    # available), then the batch's fallback list.
    response = service.similar("i4", k=6)
    body = response.json()
    assert body["source"] == "fallback"
    assert item_ids(response) == ["p2", "i9", "p1", "p3", "p4", "p5"]
    assert item_ids(service.similar("w1", k=2)) == ["w2", "p1"]  # the item itself is never among them
    # Not in the catalogue at all: the batch's fallback list.
    unknown = service.similar("nowhere", k=3)
    assert (unknown.json()["source"], item_ids(unknown)) == ("fallback", FALLBACK[:3])


def test_the_batch_form_answers_in_request_order(service: Service) -> None:
    response = service.client.post(
        "/v1/items:similar", json={"item_ids": ["i2", "nowhere", "i1"], "k": 2, "exclude": ["i7"]}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["item_id"] for result in results] == ["i2", "nowhere", "i1"]
    assert [item_ids_of(result) for result in results] == [["i10", "i3"], ["p1", "p2"], ["i3", "i5"]]
    assert [result["source"] for result in results] == ["similar", "fallback", "similar"]
    assert response.headers["X-Variant"] == "production"


def test_head_answers_headers_only_and_every_new_route_needs_a_key(service: Service) -> None:
    head = service.client.head("/v1/items/i1/similar")
    assert head.status_code == 200 and head.content == b"" and batch_of(head) > 0
    for method, path, body in (
        ("GET", "/v1/items/i1/similar", None),
        ("HEAD", "/v1/items/i1/similar", None),
        ("POST", "/v1/items:similar", {"item_ids": ["i1"]}),
        ("POST", "/v1/recommendations:session", {"items": ["i1"]}),
    ):
        response = service.anonymous.request(method, path, json=body)
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        wrong = service.anonymous.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def test_a_canary_users_similar_items_come_from_the_canary_batch(
    database_url: str, publisher: Publisher, tmp_path: Path
) -> None:
    production = publisher.publish(RECS, extras=EXTRAS)
    canary = publisher.publish(RECS, switch=False, extras=Extras({"i1": ["c1", "c2"]}, EXTRAS.items))
    split = TrafficSplit("test-salt", 0.5)
    users = [f"u{n}" for n in range(20)]
    canary_user = next(user for user in users if split.variant(user) == "canary")
    production_user = next(user for user in users if split.variant(user) == "production")
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        start_canary(Settings(database_url=database_url, data_dir=tmp_path / "var"), canary, 0.5, salt="test-salt")
        service.wait_for(
            lambda: service.similar("i1", user_id=canary_user).json()["variant"] == "canary", within=SWITCH_DEADLINE
        )
        response = service.similar("i1", user_id=canary_user)
        assert (batch_of(response), response.headers["X-Variant"], item_ids(response)) == (
            canary,
            "canary",
            ["c1", "c2"],
        )
        response = service.similar("i1", user_id=production_user)
        assert (batch_of(response), item_ids(response)) == (production, SIMILAR["i1"][:10])
        without_user = service.similar("i1")
        assert (batch_of(without_user), without_user.json()["variant"]) == (production, "production")
        many = service.client.post("/v1/items:similar", json={"item_ids": ["i1"], "user_id": canary_user})
        assert many.json()["results"][0]["batch_id"] == canary


def test_a_switch_and_a_rollback_serve_the_new_batchs_lists(service: Service, publisher: Publisher) -> None:
    first = batch_of(service.similar("i1"))
    second = publisher.publish(RECS, extras=Extras({"i1": ["n1", "n2"]}, EXTRAS.items))
    service.wait_for(lambda: batch_of(service.similar("i1")) == second, within=SWITCH_DEADLINE)
    assert item_ids(service.similar("i1")) == ["n1", "n2"]
    publisher.switch(first)
    service.wait_for(lambda: batch_of(service.similar("i1")) == first, within=SWITCH_DEADLINE)
    assert item_ids(service.similar("i1")) == SIMILAR["i1"][:10]


def test_a_batch_without_extras_answers_the_global_fallback(database_url: str, publisher: Publisher) -> None:
    publisher.publish(RECS)
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        response = service.similar("i1", k=3)
        assert (response.json()["source"], item_ids(response)) == ("fallback", FALLBACK[:3])
        assert service.similar("i1", k=K).status_code == 200  # the limit is the batch's k
        session = service.session(items=["i1", "i2"], k=2)
        assert (session.json()["source"], item_ids(session)) == ("fallback", FALLBACK[:2])
        unknown_attribute = service.similar("i1", filter="genre:Comedy")
        assert unknown_attribute.status_code == 422 and "'genre'" in detail_text(unknown_attribute)
        # An anonymous user with a segment asked for: there are none, so the global list, unflagged.
        fallback = service.recs("nobody", segment="FR").json()
        assert "segment" not in fallback and fallback["source"] == "fallback"


def test_a_dropped_batchs_similar_items_come_from_the_live_one(service: Service, publisher: Publisher) -> None:
    first = batch_of(service.similar("i1"))
    # A switch whose NOTIFY was lost, then the old batch's tables dropped: the service still holds `first`.
    second = publisher.publish(RECS, extras=Extras({"i2": ["n1"]}, EXTRAS.items), notify=False)
    time.sleep(0.2)
    publisher.drop(first)
    # The first cache miss finds the table gone, reloads the rollout and asks the live batch.
    response = service.similar("i2")
    assert response.status_code == 200, response.text
    assert (batch_of(response), item_ids(response)) == (second, ["n1"])
    session = service.session(items=["i3"], k=2)
    assert session.status_code == 200 and batch_of(session) == second
