"""The lookup service tried as an attacker would: made-up methods and paths, secrets in URLs, a stray
environment variable, a database that goes away, internals in responses. (The dashboard's sign-in is
the console's now: tests/integration/test_console.py.)
"""

import json
import logging
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg import sql as pgsql

from serving.app import create_app
from serving.live import WATCHER_APPLICATION_NAME
from serving.lookup import POOL_APPLICATION_NAME
from sql.contract import MAX_ID_LENGTH
from tests.support.commands import OVERNIGHT, free_port, overnight_env, running_service
from tests.support.serving import (
    API_KEY,
    RECS,
    SWITCH_DEADLINE,
    Publisher,
    detail_text,
    kill_live_watcher,
    running,
    service_settings,
)

pytestmark = pytest.mark.integration


def raw_request(base_url: str, method: str, path: str) -> int:
    """Send one request exactly as given (any method, any path) and return its status."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return int(received.split(b" ", 2)[1])


def stall_mid_body(base_url: str, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A client that announces a 100-byte JSON body, sends its first byte and then nothing."""
    address = urlsplit(base_url)
    sock = socket.create_connection((address.hostname, address.port), timeout=5)
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n{lines}\r\n"
    sock.sendall(head.encode() + b"{")
    return sock


def answers_before_close(socks: list[socket.socket], within: float) -> list[tuple[int | None, bytes]]:
    """The status and response each server sent before closing its connection, all within `within` seconds
    from now; status None for a connection still open then."""
    deadline = time.monotonic() + within
    answers: list[tuple[int | None, bytes]] = []
    for sock in socks:
        received = b""
        try:
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                if not (chunk := sock.recv(65536)):
                    break
                received += chunk
        except TimeoutError:
            answers.append((None, received))
            continue
        finally:
            sock.close()
        answers.append((int(received.split(b" ", 2)[1]), received))
    return answers


# ---------------------------------------------------------------------------- metrics and the access log


def test_made_up_methods_and_paths_create_no_metric_series(database_url: str, tmp_path: Path) -> None:
    Publisher(database_url).publish(RECS)
    env = overnight_env(database_url, tmp_path / "var", OVERNIGHT_API_KEYS=API_KEY)
    with running_service(env) as base:
        before = httpx.get(f"{base}/metrics").text
        for n in range(40):
            raw_request(base, f"{'C' * 2000}{n}", "/healthz")
            raw_request(base, "GET", f"/no-such-route-{n}-{'x' * 2000}")
        after = httpx.get(f"{base}/metrics").text
    assert "CCCC" not in after and "no-such-route" not in after
    assert 'method="OTHER",route="/healthz"' in after
    assert 'route="unmatched"' in after
    series = [line for line in after.splitlines() if line.startswith("overnight_http_requests_total{")]
    assert len(series) <= 4, series  # the scrapes, the made-up methods, the unmatched paths
    assert len(after) < len(before) + 20_000


def test_the_access_log_bounds_what_clients_send_and_redacts_keys(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    Publisher(database_url).publish(RECS)
    with running(service_settings(database_url, access_log=True)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        with caplog.at_level("INFO", logger="overnight.access"):
            # an old dashboard bookmark: the dashboard moved to the console, the key still stays out of the log
            service.anonymous.get("/dashboard", params={"key": "s3cret-dashboard-key", "date": "2026-11-20"})
            service.anonymous.get("/dashboard", params={"KEY": "s3cret-upper"})
            service.anonymous.request("PROPFIND", "/healthz")  # uvicorn refuses methods it does not know
            service.recs("u" * 5000)
            # a credential may come under any name: only the parameters the service reads are written
            names = ("api-key", "x-api-key", "auth", "sig", "session", "code")
            service.client.get("/v1/users/42/recommendations?" + "&".join(f"{name}=s3cret-{name}" for name in names))
            service.client.get("/v1/users/42/recommendations?k=3;key=s3cret-after-a-semicolon&exclude=i1")
    messages = [record.getMessage() for record in caplog.records if record.name == "overnight.access"]
    # A line is written once its response is sent: the last /readyz of the wait may come in too.
    entries = [entry for entry in map(json.loads, messages) if entry["route"] != "/readyz"]
    assert not any("s3cret" in message for message in messages)
    assert entries[0]["query"] == "key=REDACTED&date=REDACTED"  # the service reads no `date`
    assert entries[1]["query"] == "KEY=REDACTED"
    assert entries[2]["method"] == "OTHER"
    assert all(len(message) < 2000 for message in messages)
    assert entries[3]["path"].endswith("more characters]")
    assert entries[4]["query"] == "&".join(f"{name}=REDACTED" for name in names)
    assert entries[5]["query"] == "k=3;key=REDACTED&exclude=i1"


# ---------------------------------------------------------------------------- the dashboard moved out


def test_the_dashboard_is_no_longer_here_and_the_404_says_where_it_went(database_url: str) -> None:
    with running(service_settings(database_url)) as service:
        for method, path in [("GET", "/dashboard"), ("GET", "/dashboard/api/overview"), ("POST", "/dashboard/login")]:
            moved = service.anonymous.request(method, path, params={"key": API_KEY})
            assert moved.status_code == 404
            assert moved.json()["detail"] == "the dashboard is served by `overnight console` (port 8001 by default)"
            assert "set-cookie" not in moved.headers


def test_the_lookup_service_runs_from_its_own_entry_point(database_url: str, tmp_path: Path) -> None:
    """`python -m serving`, what the lookup image runs: no `overnight` command, no batch-side settings."""
    Publisher(database_url).publish(RECS)
    port = free_port()
    env = {k: v for k, v in overnight_env(database_url, tmp_path / "var").items() if k != "OVERNIGHT_DATA_DIR"}
    process = subprocess.Popen(
        [sys.executable, "-m", "serving", "--port", str(port)],
        env={**env, "OVERNIGHT_API_KEYS": API_KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"python -m serving exited {process.returncode}"
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "python -m serving was not ready within 30 s"
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(f"{base}/v1/users/42/recommendations", headers=headers).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=15)
    without_keys = [sys.executable, "-m", "serving", "--port", str(free_port())]
    refused = subprocess.run(without_keys, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("serving: error: no API key configured")


# ---------------------------------------------------------------------------- slow and unreadable requests

BODY_TIMEOUT_SECONDS = 1.0


def test_stalled_bodies_are_cut_off_and_clients_without_a_key_never_hold_one(database_url: str, tmp_path: Path) -> None:
    """More clients stopping mid-body than a worker of `overnight serve` (granian) takes connections: those
    without a key are refused before their body is read (no route outside /v1 reads one), those with one
    get a 408 once OVERNIGHT_BODY_TIMEOUT_SECONDS is up, and /healthz answers all along."""
    Publisher(database_url).publish(RECS)
    env = overnight_env(
        database_url,
        tmp_path / "var",
        OVERNIGHT_API_KEYS=API_KEY,
        OVERNIGHT_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT_SECONDS),
    )
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    with running_service(env) as base:
        paths = ("/v1/events", "/v1/recommendations:session", "/v1/recommendations:batch", "/no-such-route")
        anonymous = [stall_mid_body(base, path) for path in paths for _ in range(300)]
        assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        statuses = Counter(status for status, _ in answers_before_close(anonymous, within=2))
        assert statuses == {401: 900, 404: 300}, statuses

        started = time.monotonic()
        keyed = [stall_mid_body(base, path, bearer) for path in paths[:3] for _ in range(10)]
        assert httpx.get(f"{base}/healthz", timeout=BODY_TIMEOUT_SECONDS / 2).status_code == 200
        answers = answers_before_close(keyed, within=BODY_TIMEOUT_SECONDS + 3 - (time.monotonic() - started))
        assert {status for status, _ in answers} == {408}, answers[:3]
        for _, response in answers:
            refusal = json.loads(response.partition(b"\r\n\r\n")[2])
            assert refusal["reason"] == "body_timeout" and "OVERNIGHT_BODY_TIMEOUT_SECONDS" in refusal["detail"]
        # granian passes the path's bytes on as sent: an id that is not UTF-8 is refused there too
        refused = httpx.get(f"{base}/v1/users/%FF/recommendations", headers=bearer)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["path", "user_id"]


def test_ids_whose_bytes_are_not_utf8_are_refused_naming_the_parameter(database_url: str) -> None:
    """The server decodes `%FF` and `%FE` alike to U+FFFD: answered, they would be one user in the
    prediction log. A well-formed U+FFFD (`%EF%BF%BD`) is an id like any other."""
    Publisher(database_url).publish(RECS)
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        for path, name in [
            ("/v1/users/%FF/recommendations", "user_id"),
            ("/v1/users/tenant%2F%C3/recommendations", "user_id"),
            ("/v1/items/%ED%A0%80/similar", "item_id"),  # a UTF-16 surrogate, which UTF-8 cannot hold
        ]:
            refused = service.client.get(path)
            assert refused.status_code == 422, (path, refused.text)
            assert refused.json()["detail"][0]["loc"] == ["path", name], refused.text
            assert service.client.head(path).status_code == 422, path  # the routed endpoint's rules too
        replacement = service.client.get("/v1/users/%EF%BF%BD/recommendations")
        assert replacement.status_code == 200 and replacement.json()["user_id"] == "\ufffd"


# ---------------------------------------------------------------------------- the schema tells the truth

EXCLUDING_BODIES = (
    ("/v1/recommendations:batch", "BatchRecommendationsRequest", {"user_ids": ["42"]}),
    ("/v1/items:similar", "SimilarItemsRequest", {"item_ids": ["i1"]}),
    ("/v1/recommendations:session", "SessionRequest", {"items": ["i1"]}),
)


def test_an_excluded_id_longer_than_any_id_is_declared_and_refused_naming_the_field(database_url: str) -> None:
    Publisher(database_url).publish(RECS)
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        document = service.anonymous.get("/openapi.json").json()
        schemas = document["components"]["schemas"]
        for _, model, _ in EXCLUDING_BODIES:
            assert schemas[model]["properties"]["exclude"]["items"]["maxLength"] == MAX_ID_LENGTH, model
        for path in ("/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar"):
            parameters = {p["name"]: p for p in document["paths"][path]["get"]["parameters"]}
            assert parameters["exclude"]["schema"]["items"]["maxLength"] == MAX_ID_LENGTH, path
            # the longest exclude list the schema admits is more than an HTTP server reads in a request line
            assert {"400", "414", "431"} <= document["paths"][path]["get"]["responses"].keys(), path
        over_a_request_line = ",".join(["x" * MAX_ID_LENGTH] * 300)  # 77 KB, within every limit stated
        refused_by_the_server = raw_request(
            service.base_url, "GET", f"/v1/users/42/recommendations?exclude={over_a_request_line}"
        )
        assert refused_by_the_server == 400  # uvicorn's answer (granian's is 414), before the service sees it

        longest, too_long = "x" * MAX_ID_LENGTH, "x" * (MAX_ID_LENGTH + 1)
        for path, _, body in EXCLUDING_BODIES:
            assert service.client.post(path, json=body | {"exclude": ["i2", longest]}).status_code == 200, path
            refused = service.client.post(path, json=body | {"exclude": ["i2", too_long]})
            assert refused.status_code == 422, (path, refused.text)
            assert refused.json()["detail"][0]["loc"] == ["body", "exclude", 1], refused.text
            assert f"longer than {MAX_ID_LENGTH}" in detail_text(refused)
        for get, looked_up in ((service.recs, "42"), (service.similar, "i1")):
            assert get(looked_up, exclude=f"i2,{longest}").status_code == 200
            refused = get(looked_up, exclude=f"i2,{too_long}")
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"][0]["loc"] == ["query", "exclude"], refused.text


def test_every_request_body_states_the_byte_limit_the_schema_cannot(database_url: str) -> None:
    """A body the schema admits may still be over OVERNIGHT_MAX_REQUEST_BYTES: each request body's
    description says the limit and that it applies all the same, and such a body is the 413 it promises."""
    Publisher(database_url).publish(RECS)
    with running(service_settings(database_url, max_request_bytes=4096)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        document = service.anonymous.get("/openapi.json").json()
        bodies = {
            f"{method.upper()} {path}": operation["requestBody"]
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            if "requestBody" in operation
        }
        assert len(bodies) == 4, bodies.keys()  # batch, similar items, session and feedback events
        for label, request_body in bodies.items():
            description = request_body.get("description", "")
            assert (
                "4,096 bytes" in description and "413" in description and "even one this schema admits" in (description)
            ), label
        # 16 excluded ids of 256 characters: within every limit the schema states, over the 4 KiB byte limit.
        admitted = {"user_ids": ["42"], "exclude": ["x" * MAX_ID_LENGTH] * 16}
        assert len(json.dumps(admitted)) > 4096
        refused = service.client.post("/v1/recommendations:batch", json=admitted)
        assert refused.status_code == 413 and refused.json()["reason"] == "body_too_large"


# ---------------------------------------------------------------------------- turning auth off


def test_the_environment_cannot_turn_auth_off(database_url: str, tmp_path: Path) -> None:
    Publisher(database_url).publish(RECS)
    env = overnight_env(database_url, tmp_path / "var", OVERNIGHT_API_KEYS=API_KEY, OVERNIGHT_AUTH_DISABLED="true")
    with running_service(env, "--workers", "2") as base:
        for _ in range(4):  # both workers
            assert httpx.get(f"{base}/v1/users/42/recommendations").status_code == 401
            assert httpx.post(f"{base}/v1/events", json={"events": []}).status_code == 401
    without_keys = {k: v for k, v in env.items() if k != "OVERNIGHT_API_KEYS"}
    refused = subprocess.run(
        [str(OVERNIGHT), "serve", "--port", str(free_port())],
        env=without_keys,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "no API key configured" in refused.stderr
    # the one line a refused start prints says the variable was not taken, lest it look like a bug
    assert "OVERNIGHT_AUTH_DISABLED is ignored" in refused.stderr.strip().splitlines()[-1]


def test_no_auth_warns_that_feedback_writes_are_open_too(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        create_app(service_settings(database_url, api_keys=()), auth_disabled=True)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "--no-auth" in warning and "POST /v1/events" in warning


def test_a_key_short_enough_to_guess_is_warned_about_at_start(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys are checked without a limit on tries (a lockout would let anyone lock the backends out)."""
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        create_app(service_settings(database_url, api_keys=("k" * 32,)))
    assert "shorter than" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        create_app(service_settings(database_url, api_keys=("k" * 32, "short")))
    assert "1 of the 2 keys in OVERNIGHT_API_KEYS are shorter than 16 characters" in caplog.text
    assert "short," not in caplog.text and "'short'" not in caplog.text  # never the key itself


# ---------------------------------------------------------------------------- internals stay in the log

INTERNALS = ("127.0.0.1", "5432", "psycopg", "connection", "accepting", 'database "', "FATAL", "server")


def _shows_no_internals(text: str) -> None:
    lowered = text.lower()
    assert not [word for word in INTERNALS if word.lower() in lowered], text


def test_an_unreachable_database_shows_reason_codes_not_driver_text(tmp_path: Path) -> None:
    port = free_port()
    with running(service_settings(f"postgresql://postgres@127.0.0.1:{port}/secret_db", live_poll_seconds=1)) as svc:
        svc.wait_for(lambda: svc.anonymous.get("/readyz").json().get("reason") == "live_pointer_unreadable", within=5)
        ready = svc.anonymous.get("/readyz")
        assert ready.status_code == 503
        _shows_no_internals(ready.text)
        assert str(port) not in ready.text and "secret_db" not in ready.text
        lookup = svc.recs("42")
        assert lookup.status_code == 503
        _shows_no_internals(lookup.text)
        assert str(port) not in lookup.text


def test_stale_answers_and_503s_carry_reason_codes_when_the_database_refuses_connections(
    database_url: str, postgres_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Callers get a reason code; the driver's words (which name the database) go to the service's log."""
    caplog.set_level(logging.WARNING)
    publisher = Publisher(database_url)
    publisher.publish(RECS)
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with running(service_settings(database_url, live_poll_seconds=0.2, cache_entries=100)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        assert service.recs("42").status_code == 200  # now cached
        with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
            admin.execute(pgsql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(pgsql.Identifier(name)))
            try:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND application_name IN (%s, %s)",
                    (name, WATCHER_APPLICATION_NAME, POOL_APPLICATION_NAME),
                )
                service.wait_for(lambda: "X-Stale" in service.recs("42").headers, within=5)
                cached = service.recs("42")
                assert cached.status_code == 200
                assert cached.headers["X-Stale"] == "live_pointer_unreadable"
                uncached = service.recs("7")
                assert uncached.status_code == 503
                assert uncached.json()["reason"] == "database_unavailable"
                _shows_no_internals(uncached.text)
                ready = service.anonymous.get("/readyz")
                assert ready.status_code == 503
                _shows_no_internals(ready.text)
                logged = [r.getMessage() for r in caplog.records if r.name.startswith("serving")]
                assert any("not currently accepting connections" in line for line in logged), logged
            finally:
                admin.execute(pgsql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(pgsql.Identifier(name)))
        service.wait_for(lambda: "X-Stale" not in service.recs("42").headers, within=5)
        time.sleep(0.1)


def test_the_live_watcher_recovers_as_fast_from_every_lost_connection(database_url: str) -> None:
    """The watcher's reconnect back-off starts over once it is back: connections lost now and then (an
    operator's pg_terminate_backend, failovers) must not leave answers stale for longer each time."""
    Publisher(database_url).publish(RECS)
    with (
        running(service_settings(database_url, live_poll_seconds=5)) as service,
        psycopg.connect(database_url, autocommit=True) as admin,
    ):
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        recoveries = []
        for _ in range(5):
            lost_at = time.monotonic()
            assert kill_live_watcher(admin) == 1
            service.wait_for(lambda: "X-Stale" in service.recs("42").headers, within=2)
            service.wait_for(lambda: "X-Stale" not in service.recs("42").headers, within=10)
            recoveries.append(round(time.monotonic() - lost_at, 2))
            time.sleep(1)
        # The first back-off is at most 0.5 s; doubling it each time would take 2 s or more by the fourth.
        assert max(recoveries) < 1.5, recoveries
