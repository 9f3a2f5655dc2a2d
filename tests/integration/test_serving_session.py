"""Session recommendations and segment fallbacks on a real socket against a real Postgres: the blend is
`common.session.blend_session`'s over the published lists, the session's and excluded items stay out, a
known user's list is blended in, and visitors get their segment's list."""

import struct
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import psycopg
import pytest

from common.session import blend_session
from tests.support.serving import (
    EXTRAS,
    FALLBACK,
    RECS,
    SEGMENTS,
    SIMILAR,
    Publisher,
    Service,
    detail_text,
    item_ids,
    lookup_service,
    scores_for,
    similarities_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def service(database_url: str) -> Iterator[Service]:
    published = partial(Publisher(database_url).publish, RECS, extras=EXTRAS)
    with lookup_service(database_url, published, max_session_items=5, max_request_bytes=8192) as service:
        yield service


def as_published(scores: list[float]) -> list[float]:
    """Scores as a `real[]` column returns them."""
    return [struct.unpack("f", struct.pack("f", score))[0] for score in scores]


def expected_blend(items: list[str], leave_out: set[str], user_list: Sequence[str] = ()) -> list[tuple[str, float]]:
    neighbours: list[Any] = [
        (SIMILAR[item], as_published(similarities_for(SIMILAR[item]))) if item in SIMILAR else None for item in items
    ]
    return blend_session(neighbours, frozenset(leave_out), user_list)


def test_the_session_answer_is_blend_session_of_the_published_lists(service: Service) -> None:
    items = ["i2", "nowhere", "i1"]
    response = service.session(items=items, k=6, exclude=["i8"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["user_id", "items", "source", "model_id", "batch_id", "generated_at", "variant"]
    assert (body["user_id"], body["source"], body["variant"]) == (None, "session", "production")
    expected = expected_blend(items, {*items, "i8"})[:6]
    assert item_ids(response) == [item_id for item_id, _ in expected]
    assert [item["score"] for item in body["items"]] == pytest.approx([score for _, score in expected])
    assert not {"i2", "i1", "i8"} & set(item_ids(response))
    # Recency counts: the same items in the other order blend differently.
    assert (
        item_ids(service.session(items=["i1", "i2"], k=6))
        == [i for i, _ in expected_blend(["i1", "i2"], {"i1", "i2"})][:6]
    )
    assert service.session(items=["i1", "i2"], k=3).headers["X-Batch-Id"] == str(body["batch_id"])


def test_a_known_users_list_is_blended_in(service: Service) -> None:
    response = service.session(items=["i5"], user_id="7", k=5)
    body = response.json()
    assert (body["user_id"], body["source"]) == ("7", "session")
    expected = expected_blend(["i5"], {"i5"}, RECS["7"])[:5]
    assert item_ids(response) == [item_id for item_id, _ in expected]
    assert "i9" in item_ids(response)  # only in the user's own list


def test_without_neighbours_a_session_answers_as_the_user_lookup_would(service: Service) -> None:
    visitor = service.session(items=["nowhere"], k=3)
    assert (visitor.json()["source"], item_ids(visitor)) == ("fallback", FALLBACK[:3])
    known = service.session(items=["nowhere", "i1"][:1], user_id="42", k=3, exclude=["i2"])
    assert (known.json()["source"], item_ids(known)) == ("personalized", ["i1", "i3", "i4"])
    by_segment = service.session(items=[], k=2, segment="DE")
    assert (by_segment.json()["source"], by_segment.json()["segment"], item_ids(by_segment)) == (
        "fallback",
        "DE",
        SEGMENTS["DE"][:2],
    )
    stored = service.session(items=["nowhere"], k=2, user_id="anon-fr")
    assert (stored.json()["segment"], item_ids(stored)) == ("FR", SEGMENTS["FR"][:2])


def test_session_limits_are_422s(service: Service) -> None:
    too_many = service.session(items=[f"i{n}" for n in range(6)])
    assert too_many.status_code == 422 and "at most 5 session items" in detail_text(too_many)
    assert service.session(items=["i1"], k=0).status_code == 422
    assert service.session(items=["i1"], k=13).status_code == 422
    assert service.session(items=["x" * 257]).status_code == 422
    assert service.session(items=["i1"], user_id="").status_code == 422
    assert service.session(items=["i1"], exclude=[f"e{n}" for n in range(501)]).status_code == 422
    assert service.session(items=["i1"], surprise=1).status_code == 422
    assert service.session(items="i1").status_code == 422
    # Bodies as FastAPI refuses them, though the session POST is answered before it.
    path = "/v1/recommendations:session"
    not_json = service.client.post(path, content=b'{"items": [', headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["loc"][0] == "body"
    not_text = service.client.post(path, content=b'{"items": ["\xff"]}', headers={"Content-Type": "application/json"})
    assert not_text.status_code == 400
    too_big = service.client.post(path, json={"items": ["i1"], "exclude": ["x" * 9000]})
    assert too_big.status_code == 413 and "8192" in too_big.json()["detail"]


def test_a_session_body_is_json_only_when_its_content_type_says_so_as_routed_bodies_are(service: Service) -> None:
    """FastAPI reads a routed endpoint's body as JSON only under application/json or a +json type; the session
    POST, answered before it, must refuse the others with the same 422 (not answer them 200)."""
    bodies = {
        "/v1/recommendations:session": b'{"items": ["i1"], "k": 1}',
        "/v1/recommendations:batch": b'{"user_ids": ["42"], "k": 1}',
    }
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonp", None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        problems = []
        for path, body in bodies.items():
            refused = service.client.post(path, content=body, headers=headers)
            assert refused.status_code == 422, (content_type, path, refused.text)
            problems.append(refused.json()["detail"])
        assert problems[0] == [{**problems[1][0], "input": bodies["/v1/recommendations:session"].decode()}]
        assert problems[0][0]["type"] == "model_attributes_type" and problems[0][0]["loc"] == ["body"]
        # bytes that are not UTF-8 are echoed as far as they are text, never a 500
        for path in bodies:
            odd = service.client.post(path, content=b'\xff{"items": []}', headers=headers)
            assert odd.status_code == 422 and odd.json()["detail"][0]["input"] == '\ufffd{"items": []}', odd.text
    for content_type in ("application/json", "Application/JSON; charset=utf-8", "application/vnd.session+json"):
        answered = service.client.post(
            "/v1/recommendations:session",
            content=bodies["/v1/recommendations:session"],
            headers={"Content-Type": content_type},
        )
        assert answered.status_code == 200, (content_type, answered.text)
    empty = service.client.post("/v1/recommendations:session", headers={"Content-Type": "application/json"})
    assert empty.status_code == 422 and empty.json()["detail"][0]["type"] == "missing", empty.text


def test_segment_fallbacks_by_parameter_and_by_stored_segment(service: Service) -> None:
    stored = service.recs("anon-fr", k=3).json()
    assert (stored["source"], stored["segment"], [i["item_id"] for i in stored["items"]]) == (
        "fallback",
        "FR",
        SEGMENTS["FR"][:3],
    )
    assert [i["score"] for i in stored["items"]] == pytest.approx(scores_for(SEGMENTS["FR"], top=1.0)[:3])
    assert list(stored) == ["user_id", "items", "source", "segment", "model_id", "batch_id", "generated_at", "variant"]
    asked = service.recs("anon-fr", k=3, segment="DE").json()
    assert (asked["segment"], [i["item_id"] for i in asked["items"]]) == ("DE", SEGMENTS["DE"][:3])
    nobody = service.recs("nobody", segment="DE", k=2).json()
    assert (nobody["segment"], [i["item_id"] for i in nobody["items"]]) == ("DE", SEGMENTS["DE"][:2])
    # An unknown segment is the global list, and the answer is the one it always was.
    for response in (service.recs("nobody", segment="XX", k=2), service.recs("nobody", k=2)):
        body = response.json()
        assert list(body) == ["user_id", "items", "source", "model_id", "batch_id", "generated_at", "variant"]
        assert [i["item_id"] for i in body["items"]] == FALLBACK[:2]
    known = service.recs("42", segment="FR", k=2).json()
    assert (known["source"], "segment" in known) == ("personalized", False)
    many = service.client.post(
        "/v1/recommendations:batch", json={"user_ids": ["anon-de", "nobody", "42"], "k": 1, "segment": "FR"}
    ).json()["results"]
    assert [(r["source"], r.get("segment"), r["items"][0]["item_id"]) for r in many] == [
        ("fallback", "FR", "i7"),
        ("fallback", "FR", "i7"),
        ("personalized", None, "i1"),
    ]
    stored_many = service.client.post("/v1/recommendations:batch", json={"user_ids": ["anon-de"], "k": 1}).json()
    assert stored_many["results"][0]["segment"] == "DE"


def test_similar_and_session_answers_are_logged_with_their_source(database_url: str, service: Service) -> None:
    service.client.get("/v1/items/i1/similar", params={"k": 2}, headers={"X-Request-Id": "sim-1"})
    service.client.get("/v1/items/i1/similar", params={"k": 2, "user_id": "7"}, headers={"X-Request-Id": "sim-2"})
    service.client.post(
        "/v1/recommendations:session", json={"items": ["i1"], "k": 2}, headers={"X-Request-Id": "ses-1"}
    )
    service.client.head("/v1/items/i1/similar", headers={"X-Request-Id": "head-1"})
    expected = {
        ("sim-1", "", "similar", ("i3", "i5")),
        ("sim-2", "7", "similar", ("i3", "i5")),
        ("ses-1", "", "session", ("i3", "i5")),
    }

    def logged() -> set[tuple[str, str, str, tuple[str, ...]]]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT request_id, user_id, source, item_ids FROM overnight.served_predictions"
            ).fetchall()
        return {(request_id, user_id, source, tuple(items)) for request_id, user_id, source, items in rows}

    deadline = time.monotonic() + 5
    while logged() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged() == expected
    metrics = service.anonymous.get("/metrics").text
    assert 'overnight_lookups_total{source="similar"} 3.0' in metrics  # the HEAD was answered, not logged
    assert 'overnight_lookups_total{source="session"} 1.0' in metrics
    assert 'route="/v1/items/{item_id:text}/similar"' in metrics
    assert 'route="/v1/recommendations:session"' in metrics
