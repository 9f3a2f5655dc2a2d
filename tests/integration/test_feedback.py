"""POST /v1/events over a real socket: validation with reasons, all-or-nothing acceptance, nothing lost."""

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from jobs.database import upgrade
from serving.app import create_app, serving_error_response
from serving.errors import ServingConfigError, ServingError
from serving.feedback import FeedbackIntake, router
from serving.settings import get_serving_settings
from tests.support.commands import serving_app
from tests.support.databases import create_database, drop_database
from tests.support.serving import losing_the_first_reply

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


def events_app(intake: FeedbackIntake, *, start_writer: bool = True) -> FastAPI:
    """The events router on its own, with the intake's writer run by the lifespan as the service would."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_writer:
            intake.start()
        app.state.feedback = intake
        try:
            yield
        finally:
            intake.start()  # drain on shutdown even if it was held back
            await intake.stop()

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)
    app.add_exception_handler(ServingError, lambda _, error: serving_error_response(error))  # as create_app does
    return app


@pytest.fixture(scope="module")
def client(postgres_admin_url: str) -> Iterator[httpx.Client]:
    """One service for the validation cases, which must leave nothing behind: it checks that on shutdown."""
    url = create_database(postgres_admin_url)
    try:
        with psycopg.connect(url) as conn:
            upgrade(conn)
        intake = FeedbackIntake(url)
        with serving_app(events_app(intake)) as base, httpx.Client(base_url=base) as http:
            yield http
        assert intake.writer.accepted == 0
        assert stored(url) == []
    finally:
        drop_database(postgres_admin_url, url)


def event(**overrides: Any) -> dict[str, Any]:
    return {
        "user_id": "u1",
        "item_id": "i1",
        "type": "click",
        "timestamp": NOW.isoformat(),
        "request_id": "r1",
    } | overrides


def stored(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT occurred_at, user_id, item_id, event_type, request_id, "
            "received_at BETWEEN now() - interval '1 minute' AND now() "
            "FROM overnight.feedback_events ORDER BY occurred_at, user_id, item_id, event_type"
        ).fetchall()


def test_one_and_many_events_are_accepted_and_written(database_url: str) -> None:
    intake = FeedbackIntake(database_url)
    with serving_app(events_app(intake)) as base, httpx.Client(base_url=base) as http:
        one = http.post("/v1/events", json={"events": [event()]})
        assert one.status_code == 202, one.text
        assert one.json() == {"accepted": 1}
        many = [
            event(user_id="u2", item_id="i9", type="impression", timestamp=(NOW - timedelta(hours=2)).isoformat()),
            event(
                user_id="u2",
                item_id="i9",
                type="conversion",
                request_id=None,
                timestamp=(NOW - timedelta(minutes=1)).isoformat().replace("+00:00", "+02:00"),
            ),
        ]
        response = http.post("/v1/events", json={"events": many})
        assert response.status_code == 202 and response.json() == {"accepted": 2}
    # leaving the block shut the app down, which drains the queue
    assert stored(database_url) == [
        (NOW - timedelta(hours=2, minutes=1), "u2", "i9", "conversion", None, True),
        (NOW - timedelta(hours=2), "u2", "i9", "impression", "r1", True),
        (NOW, "u1", "i1", "click", "r1", True),
    ]
    assert intake.writer.written == 3 and intake.writer.lost == 0


BAD_EVENTS: list[tuple[str, Any, str]] = [
    ("missing user", {k: v for k, v in event().items() if k != "user_id"}, "user_id"),
    ("unknown type", event(type="purchase"), "type"),
    ("empty item", event(item_id=""), "item_id"),
    ("control character", event(item_id="i\x001"), "item_id"),
    ("over-long id", event(user_id="u" * 257), "user_id"),
    ("naive timestamp", event(timestamp="2026-11-20T10:00:00"), "timestamp"),
    ("not a timestamp", event(timestamp="yesterday"), "timestamp"),
    ("future", event(timestamp=(NOW + timedelta(hours=1)).isoformat()), "timestamp"),
    ("too old", event(timestamp=(NOW - timedelta(days=30)).isoformat()), "timestamp"),
    ("unknown field", event(score=1.0), "score"),
    ("spaces in request id", event(request_id="a b"), "request_id"),
]


@pytest.mark.parametrize(("case", "bad", "field"), BAD_EVENTS, ids=[case for case, _, _ in BAD_EVENTS])
def test_a_bad_event_gets_a_422_with_the_reason_and_nothing_is_kept(
    client: httpx.Client, case: str, bad: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/events", json={"events": [event(user_id="good"), bad]})
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(problem["loc"][:3] == ["body", "events", 1] and field in problem["loc"] for problem in problems), (
        problems
    )
    assert all(problem["msg"] for problem in problems)


def test_malformed_bodies_get_a_422(client: httpx.Client) -> None:
    for body in ({"events": []}, {}, [event()], {"events": event()}):
        assert client.post("/v1/events", json=body).status_code == 422, body
    assert (
        client.post("/v1/events", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    )


def test_out_of_range_times_are_named_with_the_accepted_range(client: httpx.Client) -> None:
    old = client.post("/v1/events", json={"events": [event(timestamp=(NOW - timedelta(days=8)).isoformat())]})
    future = client.post("/v1/events", json={"events": [event(timestamp=(NOW + timedelta(hours=1)).isoformat())]})
    assert (old.status_code, future.status_code) == (422, 422)
    assert old.json()["detail"][0]["msg"].startswith("timestamp is older than 7 days (server time ")
    assert future.json()["detail"][0]["msg"].startswith("timestamp is more than 5 minutes in the future (server time ")


def test_a_request_limit_larger_than_the_queue_is_refused_at_startup() -> None:
    with pytest.raises(ServingConfigError, match=r"FEEDBACK_MAX_EVENTS \(2000\) is larger than .*QUEUE_SIZE \(1000\)"):
        get_serving_settings(database_url="postgresql://unused", feedback_max_events=2000, feedback_queue_size=1000)
    assert get_serving_settings(database_url="postgresql://unused", feedback_max_events=1000, feedback_queue_size=1000)


def test_too_many_events_in_one_request(database_url: str) -> None:
    intake = FeedbackIntake(database_url, max_events_per_request=3)
    with serving_app(events_app(intake)) as base, httpx.Client(base_url=base) as http:
        response = http.post("/v1/events", json={"events": [event(item_id=f"i{n}") for n in range(4)]})
        assert response.status_code == 422
        assert "at most 3 events" in response.text
    assert stored(database_url) == []


def test_a_full_queue_refuses_whole_requests_with_503_and_loses_nothing_accepted(database_url: str) -> None:
    # The writer is held back, so the queue (5 events) only fills; shutdown then drains it.
    intake = FeedbackIntake(database_url, queue_size=5)
    accepted = 0
    with serving_app(events_app(intake, start_writer=False)) as base, httpx.Client(base_url=base) as http:
        first = http.post("/v1/events", json={"events": [event(item_id=f"a{n}") for n in range(3)]})
        assert first.status_code == 202
        accepted += 3
        refused = http.post("/v1/events", json={"events": [event(item_id=f"b{n}") for n in range(3)]})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "nothing was kept" in refused.json()["detail"]
        assert refused.json()["reason"] == "feedback_queue_full"
        fits = http.post("/v1/events", json={"events": [event(item_id=f"c{n}") for n in range(2)]})
        assert fits.status_code == 202
        accepted += 2
    items = sorted(row[2] for row in stored(database_url))
    assert items == ["a0", "a1", "a2", "c0", "c1"]
    assert intake.writer.refused == 3 and intake.writer.lost == 0 and intake.writer.written == accepted


def test_the_service_answers_bad_requests_on_events_with_4xx_never_500(database_url: str) -> None:
    """Through `create_app`, as deployed: the key, the body limit and the service's 422 handler."""
    settings = get_serving_settings(database_url=database_url, api_keys=("k-1",), max_request_bytes=4096)
    with (
        serving_app(create_app(settings)) as base,
        httpx.Client(base_url=base, headers={"Authorization": "Bearer k-1"}) as http,
    ):
        assert httpx.post(f"{base}/v1/events", json={"events": [event(item_id="anonymous")]}).status_code == 401
        oversized = http.post("/v1/events", json={"events": [event(item_id=f"big-{n}") for n in range(100)]})
        assert oversized.status_code == 413, oversized.text
        # JSON may carry a lone surrogate, which no response can encode as UTF-8: the 422 echoes it escaped.
        lone = '{"events": [{"user_id": "u\\ud800", "item_id": "i1", "type": "click", "timestamp": "%s"}]}'
        response = http.post("/v1/events", content=lone % NOW.isoformat(), headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "events", 0, "user_id"]
        assert response.json()["detail"][0]["input"] == "u\\ud800"
        for body in ('{"events": [{"\\udfff": 1}]}', '{"user_ids": ["u1"], "k": "\\ud800"}'):
            for path in ("/v1/events", "/v1/recommendations:batch"):
                bad = http.post(path, content=body, headers={"Content-Type": "application/json"})
                assert bad.status_code == 422, (path, body, bad.text)
        batch = http.post(
            "/v1/recommendations:batch",
            content='{"user_ids": ["\\ud800"]}',
            headers={"Content-Type": "application/json"},
        )
        assert batch.status_code == 422 and "not valid Unicode" in batch.text, batch.text
        assert http.post("/v1/events", json={"events": [event(item_id="kept")]}).status_code == 202
    assert [row[2] for row in stored(database_url)] == ["kept"]


def test_non_finite_numbers_in_a_body_get_a_422_that_names_them(database_url: str) -> None:
    """Python's JSON parser takes NaN, Infinity and 1e400 (infinity); the 422 echoes them as text, since
    JSON has no number for them."""
    settings = get_serving_settings(database_url=database_url, api_keys=("k-1",))
    json_body = {"Content-Type": "application/json"}
    timestamp = '{"events": [{"user_id": "u", "item_id": "i", "type": "click", "timestamp": %s}]}'
    cases = [
        ("/v1/events", timestamp % "NaN", ["body", "events", 0, "timestamp"], "NaN"),
        ("/v1/events", timestamp % "1e400", ["body", "events", 0, "timestamp"], "Infinity"),
        ("/v1/recommendations:batch", '{"user_ids": ["a"], "k": NaN}', ["body", "k"], "NaN"),
        ("/v1/recommendations:batch", '{"user_ids": ["a"], "k": -Infinity}', ["body", "k"], "-Infinity"),
        ("/v1/recommendations:batch", '{"user_ids": [NaN]}', ["body", "user_ids", 0], "NaN"),
    ]
    with (
        serving_app(create_app(settings)) as base,
        httpx.Client(base_url=base, headers={"Authorization": "Bearer k-1"}) as http,
    ):
        for path, body, loc, echoed in cases:
            response = http.post(path, content=body, headers=json_body)
            assert response.status_code == 422, (path, body, response.text)
            problem = response.json()["detail"][0]
            assert (problem["loc"], problem["input"]) == (loc, echoed), (body, problem)
            assert problem["msg"]
    assert stored(database_url) == []


def test_every_accepted_event_is_stored_while_the_writer_loses_its_connection(database_url: str) -> None:
    """20 clients post events while the writer's connection is killed again and again: what got a 202 is in
    the table once, what got a 503 is not."""
    intake = FeedbackIntake(database_url)
    app = events_app(intake)

    async def scenario() -> tuple[int, int, int]:
        accepted = refused = killed = 0

        async def client(number: int, http: httpx.AsyncClient) -> None:
            nonlocal accepted, refused
            for request in range(40):
                events = [
                    event(user_id=f"u{number}", item_id=f"i{request}-{n}", request_id=f"c{number}r{request}")
                    for n in range(25)
                ]
                response = await http.post("/v1/events", json={"events": events})
                assert response.status_code in (202, 503), response.text
                if response.status_code == 202:
                    accepted += len(events)
                else:
                    refused += len(events)
                await asyncio.sleep(random.random() * 0.004)

        async def killer(clients_done: asyncio.Event) -> None:
            nonlocal killed
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
                attempts = 0
                while attempts < 3 or not clients_done.is_set():  # all the time the clients post, however long
                    attempts += 1
                    await asyncio.sleep(0.1)
                    cursor = await admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name LIKE 'overnight-serving-feedback%'"
                    )
                    row = await cursor.fetchone()
                    killed += row[0] if row else 0

        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://events") as http:
                clients_done = asyncio.Event()

                async def clients() -> None:
                    await asyncio.gather(*(client(n, http) for n in range(20)))
                    clients_done.set()

                await asyncio.gather(clients(), killer(clients_done))
        return accepted, refused, killed

    accepted, refused, killed = asyncio.run(scenario())
    writer = intake.writer
    with psycopg.connect(database_url) as conn:
        rows, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (user_id, item_id, request_id)) FROM overnight.feedback_events"
        ).fetchone() or (0, 0)
    print(f"accepted {accepted}, refused {refused}, connections killed {killed}, failed writes {writer.write_failures}")
    # A kill between two writes fails the next one; one landing after the last write fails none.
    assert killed >= 1 and writer.write_failures >= 1
    assert accepted > 0 and accepted + refused == 20 * 40 * 25
    assert (rows, distinct) == (accepted, accepted)
    assert (writer.written, writer.lost, writer.refused) == (accepted, 0, refused)


def test_events_of_a_write_retried_after_its_commit_reply_was_lost_are_stored_once(database_url: str) -> None:
    """The first write is committed, then fails as a lost reply would; its retry stores nothing again."""
    intake = FeedbackIntake(database_url, linger_seconds=0.05)
    losing_the_first_reply(intake.writer)
    app = events_app(intake)

    async def scenario() -> int:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://events") as http:
                events = [event(item_id=f"i{n}", request_id=f"r{n}") for n in range(3)]
                response = await http.post("/v1/events", json={"events": events})
                await asyncio.wait_for(intake.writer.flush(), 10)
                return response.status_code

    assert asyncio.run(scenario()) == 202
    assert stored(database_url) == [(NOW, "u1", f"i{n}", "click", f"r{n}", True) for n in range(3)]
    assert (intake.writer.written, intake.writer.write_failures, intake.writer.lost) == (3, 1, 0)
    with psycopg.connect(database_url) as conn:
        claims = conn.execute("SELECT writer, row_count FROM overnight.bulk_writes").fetchall()
    assert claims == [("feedback_events", 3)]


def test_feedback_takes_user_ids_as_long_as_the_lookups_do(database_url: str) -> None:
    """A user the service can answer (OVERNIGHT_MAX_USER_ID_LENGTH) can send feedback; item ids keep the
    ingest contract's 256 characters, which every item of a batch meets."""
    settings = get_serving_settings(database_url=database_url, api_keys=("k-1",), max_user_id_length=300)
    long_user = "u" * 300
    with (
        serving_app(create_app(settings)) as base,
        httpx.Client(base_url=base, headers={"Authorization": "Bearer k-1"}) as http,
    ):
        assert http.post("/v1/events", json={"events": [event(user_id=long_user)]}).status_code == 202
        too_long = http.post("/v1/events", json={"events": [event(user_id="u" * 301)]})
        assert too_long.status_code == 422, too_long.text
        assert too_long.json()["detail"][0]["loc"] == ["body", "events", 0, "user_id"]
        assert "longer than 300 characters" in too_long.json()["detail"][0]["msg"]
        long_item = http.post("/v1/events", json={"events": [event(item_id="i" * 257)]})
        assert long_item.status_code == 422, long_item.text
        assert long_item.json()["detail"][0]["loc"] == ["body", "events", 0, "item_id"]
    assert [row[1] for row in stored(database_url)] == [long_user]
