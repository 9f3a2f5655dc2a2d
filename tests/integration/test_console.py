"""The operator console: the dashboard's sign-in tried as an attacker would (forged cookies, guessed keys,
forged proxy headers, keys in URLs), its own read-only database role, and the service panel read from
the lookup service's /metrics over HTTP.
"""

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql as pgsql
from starlette.requests import Request

import sql
from console.app import create_app
from console.auth import COOKIE, session_token
from console.dashboard import QUERIES
from console.settings import ConsoleConfigError
from tests.support.commands import OVERNIGHT, free_port, overnight_env
from tests.support.console import (
    CONSOLE_KEY,
    NO_SERVICE_URL,
    Console,
    console_login,
    console_process,
    console_settings,
    running_console,
)
from tests.support.polling import wait_until
from tests.support.serving import RECS, SWITCH_DEADLINE, Publisher, running, service_settings

pytestmark = pytest.mark.integration

ONE_USER_ROUTE = "/v1/users/{user_id:text}/recommendations"


# ---------------------------------------------------------------------------- sign-in


@pytest.mark.parametrize(
    "cookie",
    [
        b"9" * 5000 + b"." + b"a" * 64,  # more digits than int() takes
        # The server reads a header's bytes as latin-1: b"\xb2" is "²", b"\xb9" "¹", b"\xb3" "³", digits to
        # str.isdigit() that int() refuses.
        b"\xb2." + b"a" * 64,
        b"1\xb9\xb3." + b"a" * 64,
        b"123",
        b"." * 10,
        b"99999999999." + b"Z" * 64,
        "\uff11\uff12\uff13.".encode() + b"a" * 64,  # fullwidth digits, sent as UTF-8
    ],
)
def test_a_malformed_session_cookie_is_no_session(database_url: str, cookie: bytes) -> None:
    raw = COOKIE.encode() + b"=" + cookie  # bytes: httpx sends them as they are, no UTF-8 re-encoding
    # what the app's session check is given: the cookie's bytes read as latin-1 ("²." for b"\xb2.")
    assert Request({"type": "http", "headers": [(b"cookie", raw)]}).cookies[COOKIE] == cookie.decode("latin-1")
    with running_console(console_settings(database_url)) as console:
        header = {b"Cookie": raw}
        page = console.anonymous.get("/dashboard", headers=header)
        assert page.status_code == 401 and "Sign in" in page.text and "set-cookie" not in page.headers
        first_visit = console.anonymous.get("/dashboard")  # no cookie at all: the form, nothing refused
        assert first_visit.status_code == 200 and "Sign in" in first_visit.text
        assert console.anonymous.get("/dashboard/api/overview", headers=header).status_code == 401


def test_a_valid_session_cookie_still_opens_the_dashboard(database_url: str) -> None:
    with running_console(console_settings(database_url)) as console:
        header = {"Cookie": f"{COOKIE}={session_token(CONSOLE_KEY)}"}
        assert "Sign in" not in console.anonymous.get("/dashboard", headers=header).text
        assert console.anonymous.get("/dashboard/api/overview", headers=header).status_code == 200


def test_dashboard_keys_replace_the_api_keys(database_url: str) -> None:
    settings = console_settings(database_url, dashboard_keys="operators-only")
    with running_console(settings) as console:
        assert console.overview().status_code == 401  # the API key no longer opens it
        opened = console.anonymous.get("/dashboard/api/overview", headers={"Authorization": "Bearer operators-only"})
        assert opened.status_code == 200


def _sign_in(console: Console, key: str, **headers: str) -> httpx.Response:
    return console.anonymous.post(
        "/dashboard/login", data={"key": key, "next": ""}, headers=headers, follow_redirects=False
    )


def test_the_cookie_is_secure_behind_a_trusted_https_proxy_only(database_url: str) -> None:
    https = {"X-Forwarded-Proto": "https"}
    with running_console(console_settings(database_url)) as console:
        direct = _sign_in(console, CONSOLE_KEY, **https)
        assert direct.status_code == 303
        assert "secure" not in direct.headers["set-cookie"].lower()  # anyone can send the header
    with running_console(console_settings(database_url, trusted_proxies="127.0.0.1")) as console:
        assert "secure" in _sign_in(console, CONSOLE_KEY, **https).headers["set-cookie"].lower()
        assert "secure" not in _sign_in(console, CONSOLE_KEY).headers["set-cookie"].lower()


def test_repeated_failed_sign_ins_from_one_client_are_slowed_down(database_url: str) -> None:
    with running_console(console_settings(database_url, trusted_proxies="127.0.0.1")) as console:
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        for _ in range(5):
            assert _sign_in(console, "wrong", **guesser).status_code == 401
        refused = _sign_in(console, CONSOLE_KEY, **guesser)  # even the right key: the client must wait
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 900
        # nor with the key as a bearer header on the data endpoint
        bearer = {"Authorization": f"Bearer {CONSOLE_KEY}"}
        assert console.anonymous.get("/dashboard/api/overview", headers=guesser | bearer).status_code == 429
        # another client behind the same proxy is not held back
        assert _sign_in(console, CONSOLE_KEY, **{"X-Forwarded-For": "198.51.100.2"}).status_code == 303


def test_behind_two_trusted_proxies_one_guesser_does_not_lock_out_the_others(database_url: str) -> None:
    with running_console(console_settings(database_url, trusted_proxies="127.0.0.1,10.0.0.1")) as console:
        guesser = {"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
        for _ in range(5):
            assert _sign_in(console, "wrong", **guesser).status_code == 401
        assert _sign_in(console, CONSOLE_KEY, **guesser).status_code == 429
        assert _sign_in(console, CONSOLE_KEY, **{"X-Forwarded-For": "198.51.100.2, 10.0.0.1"}).status_code == 303


def test_a_made_up_first_header_line_neither_escapes_the_throttle_nor_decides_the_scheme(database_url: str) -> None:
    """A proxy such as HAProxy adds its own X-Forwarded-For / X-Forwarded-Proto line after the client's:
    every line counts, in order, so the client's made-up first line is no new client nor a scheme."""

    def sign_in(key: str, headers: list[tuple[str, str]]) -> httpx.Response:
        return console.anonymous.post(
            "/dashboard/login", data={"key": key, "next": ""}, headers=headers, follow_redirects=False
        )

    with running_console(console_settings(database_url, trusted_proxies="127.0.0.1")) as console:
        statuses = [
            sign_in("bad", [("X-Forwarded-For", f"7.7.7.{n}"), ("X-Forwarded-For", "3.3.3.3")]).status_code
            for n in range(8)
        ]
        assert statuses == [401] * 5 + [429] * 3
        # a client the proxy named with a port, a new one each connection: still one client
        with_ports = [
            sign_in("bad", [("X-Forwarded-For", f"203.0.113.20:{port}")]).status_code for port in range(40000, 40006)
        ]
        assert with_ports == [401] * 5 + [429]
        https = [("X-Forwarded-Proto", "http"), ("X-Forwarded-Proto", "https")]  # the proxy's line last
        assert "secure" in sign_in(CONSOLE_KEY, https).headers["set-cookie"].lower()
        forged = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Proto", "http")]
        assert "secure" not in sign_in(CONSOLE_KEY, forged).headers["set-cookie"].lower()


def test_guessing_bearer_keys_on_the_data_endpoint_is_slowed_down_too(database_url: str) -> None:
    with running_console(console_settings(database_url, trusted_proxies="127.0.0.1")) as console:
        guesser = {"X-Forwarded-For": "203.0.113.8"}

        def overview(key: str) -> httpx.Response:
            return console.anonymous.get(
                "/dashboard/api/overview", headers=guesser | {"Authorization": f"Bearer {key}"}
            )

        wrong = [overview(f"guess-{n}") for n in range(5)]
        assert [r.status_code for r in wrong] == [401] * 5 and wrong[0].json()["reason"] == "not_authenticated"
        refused = overview(CONSOLE_KEY)
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 900
        assert refused.json()["reason"] == "too_many_attempts"
        assert overview("guess-6").json()["reason"] == "too_many_attempts"
        assert _sign_in(console, CONSOLE_KEY, **guesser).status_code == 429  # one count for every way in
        assert (
            console.anonymous.get(
                "/dashboard/api/overview", headers={"Authorization": f"Bearer {CONSOLE_KEY}"}
            ).status_code
            == 200
        )


def test_a_key_in_the_address_is_never_taken(database_url: str) -> None:
    with running_console(console_settings(database_url)) as console:
        page = console.anonymous.get("/dashboard", params={"key": CONSOLE_KEY, "date": "2026-11-20"})
        assert page.status_code == 401 and "Sign in" in page.text and "set-cookie" not in page.headers


def test_a_sign_in_form_bigger_than_one_is_refused(database_url: str) -> None:
    with running_console(console_settings(database_url)) as console:
        huge = console.anonymous.post("/dashboard/login", data={"key": "k" * 100_000, "next": ""})
        assert huge.status_code == 413


def test_a_sign_in_form_that_stalls_is_cut_off_with_a_408_while_the_console_answers(
    database_url: str, tmp_path: Path
) -> None:
    """Clients that stop mid-form on `overnight console` (granian): each gets a 408 with its reason once
    OVERNIGHT_BODY_TIMEOUT_SECONDS is up, and the console answers others meanwhile."""
    timeout_seconds = 1.0
    env = overnight_env(
        database_url,
        tmp_path / "var",
        OVERNIGHT_API_KEYS=CONSOLE_KEY,
        OVERNIGHT_CONSOLE_SERVICE_URL=NO_SERVICE_URL,
        OVERNIGHT_BODY_TIMEOUT_SECONDS=str(timeout_seconds),
    )
    with console_process(env) as base:
        address = urlsplit(base)
        started = time.monotonic()
        stalled = []
        for _ in range(50):
            sock = socket.create_connection((address.hostname, address.port), timeout=5)
            sock.sendall(
                b"POST /dashboard/login HTTP/1.1\r\nHost: test\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nkey="
            )
            stalled.append(sock)
        assert httpx.get(f"{base}/healthz", timeout=timeout_seconds / 2).status_code == 200
        deadline = started + timeout_seconds + 3
        for sock in stalled:
            received = b""
            with sock:
                while True:  # until the console closes the connection, or the test's deadline
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    if not (chunk := sock.recv(65536)):
                        break
                    received += chunk
            assert received.startswith(b"HTTP/1.1 408 "), received[:100]
            refusal = json.loads(received.partition(b"\r\n\r\n")[2])
            assert refusal["reason"] == "body_timeout" and "OVERNIGHT_BODY_TIMEOUT_SECONDS" in refusal["detail"]


def test_the_access_log_bounds_what_clients_send_and_redacts_keys(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        running_console(console_settings(database_url, trusted_proxies="127.0.0.1")) as console,
        caplog.at_level("INFO", logger="overnight.console.access"),
    ):
        console.anonymous.get("/dashboard", params={"key": "s3cret-dashboard-key", "date": "2026-11-20"})
        console.anonymous.get("/dashboard", params={"KEY": "s3cret-upper"})
        console.anonymous.request("PROPFIND", "/healthz")
        console.anonymous.get("/dashboard/" + "x" * 5000)
        console.anonymous.get("/healthz", headers={"X-Forwarded-For": "203.0.113.9"})
        # a credential may come under any name, after a `;` too: only `date`, which the console reads, is written
        console.anonymous.get("/dashboard?api-key=s3cret-a&sig=s3cret-b;code=s3cret-c&date=2026-11-20;session=s3cret-d")
        # the client as the trusted proxy passed it on: whatever it is, a bounded field
        console.anonymous.get("/healthz", headers={"X-Forwarded-For": "c" * 5000})
        # a line is written once its response is sent: the last one may come a moment after
        wait_until(lambda: len(_access_lines(caplog)) >= 7)
    messages = _access_lines(caplog)
    entries = [json.loads(message) for message in messages]
    assert not any("s3cret" in message for message in messages)
    assert entries[0]["query"] == "key=REDACTED&date=2026-11-20"
    assert entries[1]["query"] == "KEY=REDACTED"
    assert entries[2]["method"] == "OTHER"
    assert all(len(message) < 2000 for message in messages)
    assert entries[3]["path"].endswith("more characters]")
    assert entries[4]["client"] == "203.0.113.9"  # as the trusted proxy saw it
    assert entries[5]["query"] == "api-key=REDACTED&sig=REDACTED&date=2026-11-20;session=REDACTED"
    assert entries[6]["client"].startswith("ccc") and len(entries[6]["client"]) <= 64


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "overnight.console.access"]


def test_a_schema_the_console_does_not_know_is_a_503_with_a_reason_never_a_500(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:  # another version's schema, say
        conn.execute("ALTER TABLE overnight.runs RENAME COLUMN abandoned_at TO abandoned_when")
    with running_console(console_settings(database_url)) as console:
        overview = console.overview()
    assert overview.status_code == 503 and overview.json()["reason"] == "database_error"
    assert "abandoned" not in overview.text  # the driver's text goes to the log only


# ---------------------------------------------------------------------------- turning auth off


def test_no_auth_is_the_factorys_argument_never_the_environment(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_keys = console_settings(database_url, api_keys=())
    with pytest.raises(ConsoleConfigError, match="no key configured"):
        create_app(without_keys)
    with running_console(without_keys, auth_disabled=True) as console:
        assert "Sign in" not in console.anonymous.get("/dashboard").text
        assert console.anonymous.get("/dashboard/api/overview").status_code == 200
    monkeypatch.setenv("OVERNIGHT_AUTH_DISABLED", "true")
    with running_console(console_settings(database_url)) as console:
        assert console.anonymous.get("/dashboard/api/overview").status_code == 401


def test_overnight_console_refuses_to_start_without_a_key_in_one_line(database_url: str, tmp_path: Path) -> None:
    env = overnight_env(database_url, tmp_path / "var")
    refused = subprocess.run(
        [str(OVERNIGHT), "console", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "overnight: error: no key configured: set OVERNIGHT_DASHBOARD_KEYS or OVERNIGHT_API_KEYS (comma-separated) "
        "or start with --no-auth"
    )


def test_a_refused_start_says_the_auth_disabled_variable_is_ignored(database_url: str, tmp_path: Path) -> None:
    """`OVERNIGHT_AUTH_DISABLED=true overnight console` without a key: its one line says the variable was not
    taken (the warning about it is logged only once the app is made, which a refused start never gets to)."""
    env = overnight_env(database_url, tmp_path / "var", OVERNIGHT_AUTH_DISABLED="true")
    refused = subprocess.run(
        [str(OVERNIGHT), "console", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    last_line = refused.stderr.strip().splitlines()[-1]
    assert (
        last_line.startswith("overnight: error: no key configured")
        and "OVERNIGHT_AUTH_DISABLED is ignored" in last_line
    )


# ---------------------------------------------------------------------------- its own database role


def test_the_console_reads_as_its_own_role_and_can_write_nothing(database_url: str) -> None:
    batch_id = Publisher(database_url).publish(RECS)
    with console_login(database_url) as login:
        with running_console(console_settings(database_url, console_database_url=login)) as console:
            overview = console.overview()
            assert overview.status_code == 200, overview.text
            assert overview.json()["live"]["batch_id"] == batch_id
        with psycopg.connect(login, autocommit=True) as conn:
            for statement in (
                "INSERT INTO overnight.alerts (fingerprint, title, details) VALUES ('x', 'x', '{}')",
                "UPDATE overnight.runs SET status = 'failed'",
                "DELETE FROM overnight.live",
                "TRUNCATE overnight.monitor_checks",
                pgsql.SQL("SELECT * FROM {}").format(sql.recs_table(batch_id)),  # the lists are the service's
                "SELECT * FROM overnight.served_predictions",
                "CREATE TABLE overnight.scratch (x int)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)


def test_the_consoles_role_may_read_exactly_what_its_queries_name(database_url: str) -> None:
    texts = " ".join(sql.query(name) for name in QUERIES)
    named = set(re.findall(r"\bovernight\.(\w+)\b(?!\s*\()", texts))
    functions = set(re.findall(r"\bovernight\.(\w+)\s*\(", texts))
    assert {"runs", "run_steps", "live", "alerts"} <= named and functions == {"run_abandoned", "recorder_gone"}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT c.relname, p.privilege, has_table_privilege('overnight_console', c.oid, p.privilege)"
            " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER'])"
            "   AS p(privilege)"
            " WHERE n.nspname = 'overnight' AND c.relkind IN ('r', 'p', 'v', 'm')"
        ).fetchall()
        readable = {table for table, privilege, granted in rows if granted and privilege == "SELECT"}
        other = {(table, privilege) for table, privilege, granted in rows if granted and privilege != "SELECT"}
        executable = {
            name
            for (name,) in conn.execute(
                "SELECT p.proname FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'overnight' AND has_function_privilege('overnight_console', p.oid, 'EXECUTE')"
                "   AND NOT has_function_privilege('public', p.oid, 'EXECUTE')"
            )
        }
        granted_functions = {
            name
            for (name,) in conn.execute(
                "SELECT p.proname FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace"
                " CROSS JOIN aclexplode(p.proacl) AS acl"
                " WHERE n.nspname = 'overnight' AND acl.grantee = 'overnight_console'::regrole"
                "   AND acl.privilege_type = 'EXECUTE'"
            )
        }
    assert readable == named
    assert other == set()
    assert executable == set()  # nothing beyond what PUBLIC may run
    assert granted_functions == functions


# ---------------------------------------------------------------------------- the service panel


def test_the_service_panel_reads_the_lookup_services_metrics(database_url: str) -> None:
    Publisher(database_url).publish(RECS)
    with running(service_settings(database_url)) as service:
        service.wait_for(lambda: service.anonymous.get("/readyz").status_code == 200, within=SWITCH_DEADLINE)
        settings = console_settings(database_url, console_service_url=service.base_url + "/")
        with running_console(settings) as console:
            for user in ("42", "7", "nobody"):
                assert service.recs(user).status_code == 200
            wait_until(lambda: _lookups_counted(service.base_url) == 3)
            first = console.overview().json()["service"]
            for _ in range(4):
                assert service.recs("42").status_code == 200
            wait_until(lambda: _lookups_counted(service.base_url) == 7)
            second = console.overview().json()["service"]
    assert first["available"] and second["available"]
    assert first["api_requests"] == 3 and second["api_requests"] == 7
    assert first["fallback_share"] == pytest.approx(1 / 3)
    assert first["p50_ms"] is not None and first["error_share"] == 0.0
    assert second["requests_by_route"][ONE_USER_ROUTE] == 7
    assert f"{service.base_url}/metrics" in second["note"]
    (point,) = second["series"]  # one interval between the two reads of the same process
    assert point["requests_per_second"] > 0 and point["p99_ms"] is not None


def _lookups_counted(base_url: str) -> float:
    """One-user lookups the service's own /metrics counts (each is counted once its answer is sent)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
        for sample in family.samples
        if sample.name == "overnight_http_requests_total" and sample.labels["route"] == ONE_USER_ROUTE
    )


def test_an_unreachable_service_leaves_the_rest_of_the_dashboard_working(database_url: str) -> None:
    batch_id = Publisher(database_url).publish(RECS)
    with running_console(console_settings(database_url)) as console:
        overview = console.overview()
        page = console.client.get("/dashboard")
    assert overview.status_code == 200 and page.status_code == 200
    data = overview.json()
    assert data["live"]["batch_id"] == batch_id
    assert data["service"]["available"] is False
    assert "http://127.0.0.1:9/metrics cannot be reached" in data["service"]["reason"]
