"""The lookup service on a real socket against a real Postgres: auth, lookups, limits, live switches, outages.

Batches are published the way the publisher does it (named queries, binary COPY, one switching
transaction with NOTIFY); no response in any test may be a 500.
"""

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg import sql as pgsql

import sql
from jobs.rollouts.canary import start_canary, stop_canary
from jobs.settings import Settings
from serving.app import USER_RECOMMENDATIONS_PATH, create_app
from serving.errors import ServingConfigError
from serving.server import serve
from serving.settings import get_serving_settings
from serving.variants import TrafficSplit
from tests.support.commands import overnight_env, running_service
from tests.support.serving import (
    API_KEY,
    DB_TIMEOUT,
    FALLBACK,
    RECS,
    SWITCH_DEADLINE,
    K,
    Publisher,
    Service,
    batch_of,
    detail_text,
    item_ids,
    item_ids_of,
    kill_live_watcher,
    lookup_service,
    running,
    scores_for,
    service_settings,
)
from tests.support.serving import publisher_fixture as publisher_fixture  # the `publisher` fixture

pytestmark = pytest.mark.integration


# user -> items in rank order; scores descend with rank


# ---------------------------------------------------------------------------- publishing


# ---------------------------------------------------------------------------- the service


@pytest.fixture
def service(database_url: str) -> Iterator[Service]:
    with lookup_service(database_url) as service:  # nothing published: see live_service
        yield service


@pytest.fixture
def live_service(publisher: Publisher, service: Service) -> Service:
    """The service with one batch published before it was asked anything."""
    publisher.publish(RECS)
    service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
    return service


# ---------------------------------------------------------------------------- auth


def test_auth_is_required_on_the_api_and_not_on_operations(live_service: Service) -> None:
    path = "/v1/users/42/recommendations"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEY}"}):
        response = live_service.anonymous.get(path, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["detail"]
    batch = live_service.anonymous.post("/v1/recommendations:batch", json={"user_ids": ["42"]})
    assert batch.status_code == 401
    # Authentication comes before validation: no probing the API without a key.
    assert live_service.anonymous.get(path, params={"k": "abc"}).status_code == 401
    # Non-ASCII tokens must be a plain 401, not a comparison error.
    assert live_service.anonymous.get(path, headers={b"Authorization": "Bearer ключ".encode()}).status_code == 401

    assert live_service.recs("42").status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert live_service.anonymous.get(open_path).status_code == 200, open_path


# ---------------------------------------------------------------------------- single lookups


def test_known_user_gets_the_batch_in_rank_order(live_service: Service, publisher: Publisher) -> None:
    response = live_service.recs("7")
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == "7"
    assert body["source"] == "personalized"
    assert body["items"] == [
        {"item_id": "i5", "score": 3.21},
        {"item_id": "i3", "score": 2.96},
        {"item_id": "i9", "score": 2.71},
    ]
    assert body["model_id"] == "ranker-2026-11-20"
    assert body["variant"] == "production"
    assert body["batch_id"] == batch_of(response)
    assert body["generated_at"].endswith("Z")
    generated_at = datetime.fromisoformat(body["generated_at"])
    age = int(response.headers["X-Data-Age-Seconds"])
    assert abs(age - (datetime.now(UTC) - generated_at).total_seconds()) <= 2
    assert 7200 <= age <= 7210


def test_the_routed_lookup_answers_as_the_one_served_before_the_middleware(live_service: Service) -> None:
    # A GET is answered before FastAPI's middleware and router; a HEAD goes through them to the same lookup.
    path = "/v1/users/42/recommendations"
    get = live_service.client.get(path, params={"k": 3})
    head = live_service.client.head(path, params={"k": 3})
    assert (get.status_code, head.status_code) == (200, 200)
    for name in ("content-type", "content-length", "x-batch-id", "x-data-age-seconds", "x-variant"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers["x-variant"] == "production"
    assert head.content == b""
    assert live_service.anonymous.head(path).status_code == live_service.anonymous.get(path).status_code == 401
    assert live_service.client.head(path, params={"k": 0}).status_code == 422


def test_unknown_user_gets_the_fallback(live_service: Service) -> None:
    response = live_service.recs("never-seen")
    assert response.status_code == 200
    assert response.json()["source"] == "fallback"
    assert item_ids(response) == FALLBACK
    assert [item["score"] for item in response.json()["items"]] == scores_for(FALLBACK, top=1.0)
    assert "X-Batch-Id" in response.headers and "X-Data-Age-Seconds" in response.headers
    assert response.headers["X-Variant"] == "production"

    excluded = live_service.recs("never-seen", exclude="p1,p3", k=2)
    assert item_ids(excluded) == ["p2", "p4"]


def test_k_defaults_to_ten_and_is_bounded_by_the_batch(live_service: Service) -> None:
    assert item_ids(live_service.recs("42")) == RECS["42"][:10]
    assert item_ids(live_service.recs("42", k=1)) == ["i1"]
    assert item_ids(live_service.recs("42", k=K)) == RECS["42"]
    assert item_ids(live_service.recs("7", k=K)) == RECS["7"]

    for bad in (0, -1, K + 1, 10**30, "abc", "1.5", "", "1e3"):
        response = live_service.client.get("/v1/users/42/recommendations", params={"k": bad})
        assert response.status_code == 422, bad
        assert detail_text(response), bad
    too_big = live_service.recs("42", k=K + 1)
    assert f"between 1 and {K}" in detail_text(too_big)


def test_exclude_filters_before_cutting_to_k(live_service: Service) -> None:
    assert item_ids(live_service.recs("42", k=3, exclude="i1,i3")) == ["i2", "i4", "i5"]
    # Repeated parameter, blanks and unknown items are fine too.
    response = live_service.client.get(
        "/v1/users/42/recommendations", params=[("k", 3), ("exclude", "i2, ,"), ("exclude", "i1"), ("exclude", "zz")]
    )
    assert item_ids(response) == ["i3", "i4", "i5"]
    assert item_ids(live_service.recs("7", exclude="i5,i3,i9")) == []

    too_many = ",".join(f"x{n}" for n in range(501))
    response = live_service.recs("42", exclude=too_many)
    assert response.status_code == 422
    assert "at most 500" in detail_text(response)
    # The limit counts ids as sent, repeated and empty ones too: the schema's maxItems, so every request
    # over it is refused (schemathesis sends such lists), in a query and in a JSON body alike.
    repeated = live_service.client.get("/v1/users/42/recommendations", params=[("exclude", "x")] * 501)
    assert repeated.status_code == 422 and "got 501" in detail_text(repeated)
    assert live_service.client.get("/v1/users/42/recommendations", params=[("exclude", "x")] * 500).status_code == 200
    for path, body in (
        ("/v1/recommendations:batch", {"user_ids": ["42"]}),
        ("/v1/items:similar", {"item_ids": ["i1"]}),
        ("/v1/recommendations:session", {"items": ["i1"]}),
    ):
        refused = live_service.client.post(path, json=body | {"exclude": [""] * 501})
        assert refused.status_code == 422 and "at most 500" in detail_text(refused), path


def test_odd_user_ids_are_looked_up_safely(live_service: Service, publisher: Publisher) -> None:
    assert live_service.recs("u" * 257).status_code == 422
    assert "longer than 256" in detail_text(live_service.recs("u" * 257))
    assert live_service.recs("u" * 256).json()["source"] == "fallback"

    injection = "42'; DROP TABLE overnight.batches; --"
    response = live_service.client.get(f"/v1/users/{injection}/recommendations")
    assert response.status_code == 200
    assert response.json()["source"] == "fallback"
    assert response.json()["user_id"] == injection

    for odd in ("ünïcødé ✓", "a b", "42 ", "%", "?x=1", "😀" * 10):
        response = live_service.client.get(f"/v1/users/{quote(odd, safe='')}/recommendations")
        assert response.status_code == 200, odd
        assert response.json()["user_id"] == odd
        assert response.json()["source"] == "fallback"

    slashed = live_service.client.get("/v1/users/tenant%2F7/recommendations")
    assert slashed.json()["source"] == "personalized"
    assert item_ids(slashed) == RECS["tenant/7"]
    assert live_service.client.get("/v1/users/a%00b/recommendations").status_code == 422

    # The injection did nothing: the batch is still served.
    assert live_service.recs("42").json()["source"] == "personalized"


# ---------------------------------------------------------------------------- batch lookups


def test_batch_lookup_answers_in_request_order(live_service: Service) -> None:
    ids = ["7", "nobody", "42", "7", "tenant/7"]
    response = live_service.client.post("/v1/recommendations:batch", json={"user_ids": ids, "k": 2})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [result["user_id"] for result in results] == ids
    assert [result["source"] for result in results] == [
        "personalized",
        "fallback",
        "personalized",
        "personalized",
        "personalized",
    ]
    assert [[item["item_id"] for item in result["items"]] for result in results] == [
        ["i5", "i3"],
        ["p1", "p2"],
        ["i1", "i2"],
        ["i5", "i3"],
        ["i2", "i4"],
    ]
    assert {result["batch_id"] for result in results} == {batch_of(response)}
    assert int(response.headers["X-Data-Age-Seconds"]) >= 7200

    default_k = live_service.client.post(
        "/v1/recommendations:batch", json={"user_ids": ["42"], "exclude": ["i1", "i2"]}
    )
    assert [item["item_id"] for item in default_k.json()["results"][0]["items"]] == RECS["42"][2:12]


BAD_BATCH_BODIES: list[tuple[Any, str]] = [
    ({"user_ids": [str(n) for n in range(51)]}, "at most 50 user ids"),
    ({"user_ids": []}, "at least 1"),
    ({}, "Field required"),
    ({"user_ids": "42"}, "valid list"),
    ({"user_ids": [42]}, "valid string"),
    ({"user_ids": [None]}, "valid string"),
    ({"user_ids": ["42"], "k": 0}, "greater than or equal to 1"),
    ({"user_ids": ["42"], "k": K + 1}, f"between 1 and {K}"),
    ({"user_ids": ["42"], "k": "ten"}, "valid integer"),
    ({"user_ids": ["42"], "k": 2.5}, "valid integer"),
    ({"user_ids": ["u" * 257]}, "longer than 256"),
    ({"user_ids": ["a\x00b"]}, "NUL"),
    ({"user_ids": ["42"], "users": ["7"]}, "Extra inputs"),
    ([{"user_ids": ["42"]}], "valid dictionary"),
]


def test_batch_lookup_rejects_bad_bodies(live_service: Service) -> None:
    for body, reason in BAD_BATCH_BODIES:
        response = live_service.client.post("/v1/recommendations:batch", json=body)
        assert response.status_code == 422, body
        assert reason in detail_text(response), (body, response.json())


def test_batch_lookup_rejects_malformed_json(live_service: Service) -> None:
    for content in (b"", b"{", b"not json", b'{"user_ids": ["\\ud800"]}', b"\xff\xfe"):
        response = live_service.client.post(
            "/v1/recommendations:batch", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, content


# ---------------------------------------------------------------------------- the live batch


def test_a_worker_starts_serving_with_the_live_batch_loaded(database_url: str, publisher: Publisher) -> None:
    # With several workers on one port, readiness of one says nothing of the others: each must have read
    # the live pointer before it takes its first request.
    batch_id = publisher.publish(RECS)
    with psycopg.connect(publisher.url) as locker:
        # The pointer cannot be read for the first 0.3 s of the worker's life.
        locker.execute("LOCK TABLE overnight.live IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(0.3, locker.commit)
        release.start()
        with running(service_settings(database_url)) as service:
            first = service.recs("42")
        release.join()
    assert first.status_code == 200, first.text
    assert batch_of(first) == batch_id


def test_nothing_live_is_503_until_a_batch_is_published(service: Service, publisher: Publisher) -> None:
    response = service.recs("42")
    assert response.status_code == 503
    assert response.json() == {"detail": "no batch is live yet", "reason": "no_live_batch"}
    assert service.client.post("/v1/recommendations:batch", json={"user_ids": ["42"]}).status_code == 503
    ready = service.anonymous.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"detail": "no batch is live yet", "reason": "no_live_batch"}
    assert service.anonymous.get("/healthz").status_code == 200

    batch_id = publisher.publish(RECS)
    service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
    assert service.anonymous.get("/readyz").json()["batch_id"] == batch_id
    assert batch_of(service.recs("42")) == batch_id


def test_new_batch_and_rollback_are_served_within_a_second(live_service: Service, publisher: Publisher) -> None:
    first = batch_of(live_service.recs("42"))

    second = publisher.publish({"42": ["n1", "n2"]}, model_id="ranker-2026-11-21")
    live_service.wait_for(lambda: batch_of(live_service.recs("42")) == second, within=SWITCH_DEADLINE)
    response = live_service.recs("42")
    assert item_ids(response) == ["n1", "n2"]
    assert response.json()["model_id"] == "ranker-2026-11-21"
    assert live_service.recs("7").json()["source"] == "fallback"

    publisher.switch(first)  # rollback: the pointer goes back, with its NOTIFY
    live_service.wait_for(lambda: batch_of(live_service.recs("42")) == first, within=SWITCH_DEADLINE)
    assert item_ids(live_service.recs("42", k=2)) == ["i1", "i2"]
    assert live_service.anonymous.get("/readyz").json()["batch_id"] == first


def test_a_dropped_batch_table_is_replaced_by_the_live_one(live_service: Service, publisher: Publisher) -> None:
    # Enough lookups that every pooled connection has prepared the old batch's statement.
    first = {batch_of(live_service.recs(str(n))) for n in range(40)}.pop()
    # A switch whose NOTIFY was lost, then the old table dropped: the service still holds `first`.
    second = publisher.publish({"42": ["n1"]}, notify=False)
    time.sleep(0.2)
    assert batch_of(live_service.recs("42")) == first
    publisher.drop(first)

    # A cached user is still answered from `first` (whole, from one batch); the first cache miss finds
    # the table gone, and from then on everything comes from the live batch.
    uncached = live_service.recs("not-asked-before")
    assert uncached.status_code == 200
    assert batch_of(uncached) == second
    response = live_service.recs("42")
    assert response.status_code == 200
    assert batch_of(response) == second
    assert item_ids(response) == ["n1"]
    batch = live_service.client.post("/v1/recommendations:batch", json={"user_ids": ["42", "7"]})
    assert [result["batch_id"] for result in batch.json()["results"]] == [second, second]


def test_a_stalled_database_is_a_fast_503(live_service: Service, publisher: Publisher) -> None:
    batch_id = batch_of(live_service.recs("42"))
    with psycopg.connect(publisher.url) as locker:
        locker.execute(pgsql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.recs_table(batch_id)))
        start = time.monotonic()
        response = live_service.recs("7")
        elapsed = time.monotonic() - start
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert "database" in response.json()["detail"]
        assert elapsed < DB_TIMEOUT + 0.5
        batch = live_service.client.post("/v1/recommendations:batch", json={"user_ids": ["42", "7"]})
        assert batch.status_code == 503
        # A user already in the cache needs no database: still answered, from the same batch.
        cached = live_service.recs("42")
        assert cached.status_code == 200
        assert batch_of(cached) == batch_id
        locker.rollback()
    assert live_service.recs("7").status_code == 200


def test_an_unreachable_database_is_a_503_with_a_reason(database_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = service_settings(f"postgresql://postgres@127.0.0.1:{closed_port}/overnight", live_poll_seconds=1)
    with running(settings) as service:
        assert service.anonymous.get("/healthz").status_code == 200
        service.wait_for(lambda: "cannot read" in service.anonymous.get("/readyz").text, within=3)
        assert "overnight_live_batch_age_seconds +Inf" in service.anonymous.get("/metrics").text
        ready = service.anonymous.get("/readyz")
        assert ready.status_code == 503
        assert "no live batch loaded" in ready.json()["detail"]
        start = time.monotonic()
        assert service.recs("42").status_code == 503
        assert time.monotonic() - start < DB_TIMEOUT + 0.5


def test_the_watcher_reconnects_after_losing_its_connection(live_service: Service, publisher: Publisher) -> None:
    with psycopg.connect(publisher.url, autocommit=True) as admin:
        assert kill_live_watcher(admin) == 1
    time.sleep(0.1)
    second = publisher.publish({"42": ["n1"]})
    live_service.wait_for(lambda: batch_of(live_service.recs("42")) == second, within=3)


def test_metrics_report_requests_and_the_live_batch(live_service: Service) -> None:
    batch_id = batch_of(live_service.recs("42"))
    live_service.recs("nobody")
    live_service.anonymous.get("/v1/users/42/recommendations")
    text = live_service.anonymous.get("/metrics").text
    route = "/v1/users/{user_id:text}/recommendations"
    assert f'overnight_http_requests_total{{method="GET",route="{route}",status="200"}} 2.0' in text
    assert f'overnight_http_requests_total{{method="GET",route="{route}",status="401"}} 1.0' in text
    assert "overnight_http_request_duration_seconds_bucket" in text
    assert f"overnight_live_batch_id {float(batch_id)}" in text
    assert 'overnight_lookups_total{source="fallback"} 1.0' in text
    age = next(line for line in text.splitlines() if line.startswith("overnight_live_batch_age_seconds "))
    assert 7200 <= float(age.split()[1]) < 7300


# ---------------------------------------------------------------------------- start-up


def test_refuses_to_start_without_keys_or_database(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    for name in [name for name in os.environ if name.startswith("OVERNIGHT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OVERNIGHT_AUTH_DISABLED", "false")

    with pytest.raises(ServingConfigError, match="OVERNIGHT_DATABASE_URL is not set"):
        serve(port=0)
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_API_KEYS", " , ,")
    with pytest.raises(ServingConfigError, match="no API key configured") as refused:
        serve(port=0)
    assert "\n" not in str(refused.value)
    with pytest.raises(ServingConfigError, match="no API key configured"):
        create_app()
    monkeypatch.setenv("OVERNIGHT_DB_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ServingConfigError, match="OVERNIGHT_DB_TIMEOUT_SECONDS"):
        serve(port=0, no_auth=True)
    assert os.environ["OVERNIGHT_AUTH_DISABLED"] == "false"

    monkeypatch.delenv("OVERNIGHT_DB_TIMEOUT_SECONDS")
    monkeypatch.setenv("OVERNIGHT_API_KEYS", " k1, ,k2 ,k1,")
    assert get_serving_settings().api_keys == ("k1", "k2")
    monkeypatch.setenv("OVERNIGHT_API_KEYS", '["k3", " k4 "]')
    assert get_serving_settings().api_keys == ("k3", "k4")


def test_serve_without_auth_runs_workers_that_inherit_it(
    database_url: str, publisher: Publisher, tmp_path: Path
) -> None:
    publisher.publish(RECS)
    env = overnight_env(database_url, tmp_path / "var")
    with running_service(env, "--workers", "2", "--no-auth") as base, httpx.Client(base_url=base) as client:
        for _ in range(6):  # spread over both workers
            response = client.get("/v1/users/42/recommendations", params={"k": 1})
            assert response.status_code == 200
            assert item_ids(response) == ["i1"]


# ---------------------------------------------------------------------------- limits, cache, observability


def test_oversized_bodies_are_refused_with_413_before_parsing(database_url: str, publisher: Publisher) -> None:
    publisher.publish(RECS)
    with running(service_settings(database_url, max_request_bytes=2048)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        big = {"user_ids": ["u" * 200] * 20}
        for path in ("/v1/recommendations:batch", "/v1/events", "/v1/items:similar", "/v1/recommendations:session"):
            response = service.client.post(path, json=big)
            # one shape for every refusal: a short reason code beside the detail
            assert response.status_code == 413 and response.json()["reason"] == "body_too_large", path
            assert "2048 bytes" in detail_text(response)

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield b'{"user_ids": ['
            for _ in range(200):
                yield b'"0123456789",'
            yield b'"42"]}'

        assert service.client.post("/v1/recommendations:batch", content=chunked()).status_code == 413
        assert service.client.post("/v1/recommendations:batch", json={"user_ids": ["42"]}).status_code == 200


def test_control_characters_in_ids_are_just_unknown_users(live_service: Service) -> None:
    for odd in ("\n", "a\nb", "\t\x0b", "\r\n"):
        response = live_service.client.get(f"/v1/users/{quote(odd, safe='')}/recommendations")
        assert response.status_code == 200, repr(odd)
        assert response.json()["user_id"] == odd
        assert response.json()["source"] == "fallback"


def test_metrics_report_cache_database_trips_and_pool(live_service: Service) -> None:
    for _ in range(3):
        live_service.recs("42")
    text = live_service.anonymous.get("/metrics").text
    assert 'overnight_cache_lookups_total{result="hit"} 2.0' in text
    assert 'overnight_cache_lookups_total{result="miss"} 1.0' in text
    assert "overnight_cache_hit_ratio 0.66" in text
    assert "overnight_db_trips_total 1.0" in text
    assert 'overnight_db_pool_connections{state="open"}' in text
    assert "overnight_db_pool_max 4.0" in text


def test_access_log_is_json_and_sampled(
    database_url: str, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    publisher.publish(RECS)
    with running(service_settings(database_url, access_log=True, access_log_sample=0.0)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        with caplog.at_level("INFO", logger="overnight.access"):
            for _ in range(5):
                service.recs("42")
            service.anonymous.get("/v1/users/42/recommendations")
    entries = [json.loads(record.getMessage()) for record in caplog.records if record.name == "overnight.access"]
    # Sampled at 0: no success is logged, every error is.
    assert [entry["status"] for entry in entries] == [401]
    assert entries[0]["route"] == "/v1/users/{user_id:text}/recommendations"
    assert entries[0]["path"] == "/v1/users/42/recommendations"
    assert entries[0]["duration_ms"] > 0


# ---------------------------------------------------------------------------- canary, served-prediction log, feedback


def metric(service: Service, line_start: str) -> float:
    text = service.anonymous.get("/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def served_rows(url: str) -> list[tuple[str, str, int, str, list[str]]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT request_id, user_id, batch_id, variant, item_ids FROM overnight.served_predictions"
        ).fetchall()


def test_canary_users_get_the_canary_and_every_answer_is_logged_with_its_request_id(
    database_url: str, publisher: Publisher, tmp_path: Path
) -> None:
    users = [f"u{n}" for n in range(40)]
    production = publisher.publish({user: [f"p-{user}"] for user in users})
    canary = publisher.publish({user: [f"c-{user}"] for user in users}, switch=False)
    batch_settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    split = TrafficSplit("test-salt", 0.5)
    arm = {user: split.variant(user) for user in users}
    expected = {user: (canary, "canary") if arm[user] == "canary" else (production, "production") for user in users}
    assert set(arm.values()) == {"canary", "production"}

    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        assert service.recs("u1").json()["variant"] == "production"
        start_canary(batch_settings, canary, 0.5, salt="test-salt")
        canary_user = next(user for user in users if arm[user] == "canary")
        service.wait_for(lambda: service.recs(canary_user).json()["variant"] == "canary", within=SWITCH_DEADLINE)

        for user in users:
            response = service.client.get(f"/v1/users/{user}/recommendations", headers={"X-Request-Id": f"one-{user}"})
            body = response.json()
            assert (body["batch_id"], body["variant"]) == expected[user]
            assert int(response.headers["X-Batch-Id"]) == body["batch_id"]
            assert response.headers["X-Variant"] == body["variant"]
            assert response.headers["X-Request-Id"] == f"one-{user}"
            head = service.client.head(f"/v1/users/{user}/recommendations")
            assert (head.headers["X-Batch-Id"], head.headers["X-Variant"]) == (str(body["batch_id"]), body["variant"])
            assert [item["item_id"] for item in body["items"]] == [f"{'c' if arm[user] == 'canary' else 'p'}-{user}"]
        made_up = service.client.get("/v1/users/u1/recommendations", headers={"X-Request-Id": "not sane"})
        assert made_up.headers["X-Request-Id"] != "not sane" and len(made_up.headers["X-Request-Id"]) == 32

        # A batch request answers each user from their own arm; X-Batch-Id names production, X-Variant both.
        response = service.client.post(
            "/v1/recommendations:batch", json={"user_ids": [*users, "u0"]}, headers={"X-Request-Id": "many"}
        )
        results = response.json()["results"]
        assert [result["user_id"] for result in results] == [*users, "u0"]
        assert [(r["batch_id"], r["variant"]) for r in results] == [expected[user] for user in [*users, "u0"]]
        assert int(response.headers["X-Batch-Id"]) == production
        assert response.headers["X-Variant"] == "production, canary"
        assert response.headers["X-Request-Id"] == "many"
        only_canary = [user for user in users if arm[user] == "canary"]
        response = service.client.post("/v1/recommendations:batch", json={"user_ids": only_canary})
        assert (int(response.headers["X-Batch-Id"]), response.headers["X-Variant"]) == (canary, "canary")

        assert metric(service, "overnight_canary_batch_id ") == canary
        assert metric(service, "overnight_canary_traffic ") == 0.5
        in_canary = sum(1 for user in [*users, *users, "u0", canary_user] if arm[user] == "canary")
        assert metric(service, 'overnight_variant_lookups_total{variant="canary"}') >= in_canary

        # Feedback takes the same key as the lookups.
        event = {"user_id": "u1", "item_id": "p-u1", "type": "click", "timestamp": datetime.now(UTC).isoformat()}
        assert service.anonymous.post("/v1/events", json={"events": [event]}).status_code == 401
        assert service.client.post("/v1/events", json={"events": [{**event, "request_id": "many"}]}).status_code == 202

        stop_canary(batch_settings)
        service.wait_for(lambda: service.recs(canary_user).json()["variant"] == "production", within=SWITCH_DEADLINE)
        assert metric(service, "overnight_canary_batch_id ") == 0
    # Leaving the block shut the service down, which wrote out every queued row.

    rows = served_rows(database_url)
    singles = {row[1]: row for row in rows if row[0].startswith("one-")}
    assert {user: (row[2], row[3]) for user, row in singles.items()} == expected
    many = sorted((row[1], row[2], row[3]) for row in rows if row[0] == "many")
    assert many == sorted((user, *expected[user]) for user in [*users, "u0"])
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT request_id, event_type FROM overnight.feedback_events").fetchall() == [
            ("many", "click")
        ]


def test_a_full_prediction_log_queue_drops_and_counts_and_never_slows_a_lookup(
    database_url: str, publisher: Publisher
) -> None:
    """With room for one row and the writer stalled on a lock, every lookup is still answered at once;
    the rows that did not fit are counted as dropped, and the ones queued are written once it clears."""
    publisher.publish(RECS)
    with running(service_settings(database_url, prediction_log_queue_size=1)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE overnight.served_prediction_chunks IN ACCESS EXCLUSIVE MODE")
            slowest = 0.0
            for n in range(200):
                started = time.perf_counter()
                assert service.recs("42" if n % 2 else f"nobody-{n}").status_code == 200
                slowest = max(slowest, time.perf_counter() - started)
            written = metric(service, 'overnight_bulk_rows_written_total{writer="served_predictions"}')
            dropped = metric(service, 'overnight_bulk_rows_dropped_total{writer="served_predictions"}')
            accepted = metric(service, 'overnight_bulk_rows_accepted_total{writer="served_predictions"}')
            queued = metric(service, 'overnight_bulk_rows_queued{writer="served_predictions"}')
            blocker.rollback()
        # Far below the stall, which lasted through all 200 lookups: no lookup waited for the writer.
        assert slowest < DB_TIMEOUT, slowest
        assert written == 0 and queued >= 1
        assert accepted + dropped == 200 and dropped >= 190, (accepted, dropped)
        service.wait_for(
            lambda: metric(service, 'overnight_bulk_rows_written_total{writer="served_predictions"}') == accepted,
            within=5,
        )
    assert len(served_rows(database_url)) == accepted


def test_a_head_request_is_answered_but_not_logged_as_served(database_url: str, publisher: Publisher) -> None:
    """A HEAD shows the user nothing: it is a request in the metrics, never an answer in the prediction log."""
    publisher.publish(RECS)
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        for user in ("42", "nobody"):
            head = service.client.head(f"/v1/users/{user}/recommendations", headers={"X-Request-Id": f"head-{user}"})
            assert (head.status_code, head.headers["X-Request-Id"]) == (200, f"head-{user}")
        assert service.recs("42", k=2).status_code == 200
        head_requests = (
            f'overnight_http_requests_total{{method="HEAD",route="{USER_RECOMMENDATIONS_PATH}",status="200"}}'
        )
        assert metric(service, head_requests) == 2
    # Leaving the block shut the service down, which wrote out every queued row.
    assert [(row[1], row[4]) for row in served_rows(database_url)] == [("42", ["i1", "i2"])]


def test_a_batch_request_in_both_arms_is_logged_whole_or_not_at_all(
    database_url: str, publisher: Publisher, tmp_path: Path
) -> None:
    """Sampling is one decision per request: logging only one arm of a batch request would skew the
    online report's comparison of the arms."""
    users = [f"u{n}" for n in range(10)]
    publisher.publish({user: [f"p-{user}"] for user in users})
    canary = publisher.publish({user: [f"c-{user}"] for user in users}, switch=False)
    split = TrafficSplit("test-salt", 0.5)
    assert {split.variant(user) for user in users} == {"canary", "production"}
    requests = 40
    with running(service_settings(database_url, prediction_log_sample_rate=0.5)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        start_canary(Settings(database_url=database_url, data_dir=tmp_path / "var"), canary, 0.5, salt="test-salt")
        service.wait_for(lambda: metric(service, "overnight_canary_batch_id ") == canary, within=SWITCH_DEADLINE)
        for n in range(requests):
            response = service.client.post(
                "/v1/recommendations:batch", json={"user_ids": users}, headers={"X-Request-Id": f"many-{n}"}
            )
            assert {result["variant"] for result in response.json()["results"]} == {"canary", "production"}
    logged: dict[str, set[str]] = {}
    for request_id, user_id, *_ in served_rows(database_url):
        logged.setdefault(request_id, set()).add(user_id)
    assert all(logged_users == set(users) for logged_users in logged.values()), logged
    assert 0 < len(logged) < requests  # about half; each way by chance once in 2**40


def move_canary_without_notify(url: str, old_batch: int, new_batch: int) -> None:
    """A nightly canary refresh (same salt and traffic, another batch) whose NOTIFY the service missed."""
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute(sql.query("lock_live"))
        conn.execute(sql.query("move_canary_to_batch"), {"batch_id": new_batch, "previous_batch_id": old_batch})
        conn.execute(sql.query("mark_batch_canary"), (new_batch,))
        conn.execute(sql.query("mark_canary_batch_ready"), (old_batch,))


def test_a_canary_user_stays_in_the_canary_when_its_batch_is_dropped_under_a_lookup(
    database_url: str, publisher: Publisher, tmp_path: Path
) -> None:
    """The refresh drops the canary's old batch right after moving the canary: a lookup still routed to the
    old batch reloads the rollout and routes its users again, so canary users get the new canary batch."""
    users = [f"u{n}" for n in range(80)]
    split = TrafficSplit("test-salt", 0.5)
    production = publisher.publish({user: [f"p-{user}"] for user in users})
    canaries = [publisher.publish({user: [f"c{n}-{user}"] for user in users}, switch=False) for n in range(3)]

    def served(result: dict[str, Any]) -> tuple[str, int, list[str]]:
        return result["variant"], result["batch_id"], item_ids_of(result)

    def expected(user: str, canary: int) -> tuple[str, int, list[str]]:
        if split.variant(user) == "canary":
            return "canary", canary, [f"c{canaries.index(canary)}-{user}"]
        return "production", production, [f"p-{user}"]

    warm, asked_alone, asked_together = users[:20], users[20:40], users[40:]
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        start_canary(Settings(database_url=database_url, data_dir=tmp_path / "var"), canaries[0], 0.5, salt="test-salt")
        service.wait_for(lambda: metric(service, "overnight_canary_batch_id ") == canaries[0], within=SWITCH_DEADLINE)
        for user in warm:  # every pooled connection has prepared the canary batch's statement
            assert served(service.recs(user).json()) == expected(user, canaries[0])

        move_canary_without_notify(database_url, canaries[0], canaries[1])
        publisher.drop(canaries[0])
        for user in asked_alone:  # the first canary user finds the table gone
            assert served(service.recs(user).json()) == expected(user, canaries[1]), user

        # The same in a batch request, whose canary arm is read from the dropped batch in one trip.
        move_canary_without_notify(database_url, canaries[1], canaries[2])
        publisher.drop(canaries[1])
        response = service.client.post("/v1/recommendations:batch", json={"user_ids": asked_together})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [served(result) for result in results] == [expected(user, canaries[2]) for user in asked_together]
