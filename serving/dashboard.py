"""The monitoring dashboard at ``/dashboard``: one page, its assets, and one JSON endpoint behind it.

It reads the batch side's records (what is live and the canary, runs, models and their online numbers
per day, monitoring checks and reports, alerts) through
named queries of ``sql/queries.sql`` and this process's own Prometheus registry; it never imports
``jobs``. The charts are drawn by Apache ECharts, vendored under ``serving/static/vendor`` so the
page works offline.

Auth: a browser cannot send a bearer header when it navigates, so the page asks for a key once
(a login form; an old bookmark's ``/dashboard?key=...`` still works, is dropped from the URL at once
and redacted from the access log, but no such link is handed out any more)
and keeps a signed, HttpOnly, SameSite=Strict session cookie for 12 hours. The keys are
OVERNIGHT_DASHBOARD_KEYS, or the API keys when none is set; the JSON endpoint also accepts a
bearer header, for scripts. With ``--no-auth`` the dashboard is open like the rest of the service.
"""

import asyncio
import hashlib
import hmac
import html
import logging
import math
import re
import time
from collections import OrderedDict, deque
from datetime import date, datetime
from decimal import Decimal
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import psycopg
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from psycopg.rows import dict_row

import sql
from serving.settings import ServingSettings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/dashboard", include_in_schema=False)

STATIC = Path(__file__).with_name("static")
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "vendor/echarts/echarts.min.js": "text/javascript; charset=utf-8",
}
COOKIE = "overnight_dashboard"
SESSION_SECONDS = 12 * 3600
RUNS_SHOWN = 30
DATES_SHOWN = 30
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


# ---------------------------------------------------------------------------- auth


def _settings(request: Request) -> ServingSettings:
    settings: ServingSettings = request.app.state.settings
    return settings


def _keys(settings: ServingSettings) -> tuple[str, ...]:
    return settings.dashboard_keys or settings.api_keys


def _signature(key: str, expires: int) -> str:
    secret = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return hmac.new(secret, f"overnight-dashboard|{expires}".encode(), hashlib.sha256).hexdigest()


def session_token(key: str, now: float | None = None) -> str:
    """``<expiry>.<HMAC of the expiry under the key>``: every worker can check it, and removing the
    key from the configuration ends the sessions opened with it."""
    expires = int((now or time.time()) + SESSION_SECONDS)
    return f"{expires}.{_signature(key, expires)}"


# What `session_token` makes, and nothing else: any other cookie is no session (never an error).
_SESSION_TOKEN = re.compile(r"([0-9]{1,12})\.([0-9a-f]{64})", re.ASCII)


def _valid_session(settings: ServingSettings, token: str | None) -> bool:
    found = _SESSION_TOKEN.fullmatch(token) if token else None
    if found is None:
        return False
    expires = int(found[1])
    if expires < time.time():
        return False
    matched = False
    for key in _keys(settings):
        matched |= hmac.compare_digest(found[2], _signature(key, expires))
    return matched


def _matching_key(settings: ServingSettings, presented: str) -> str | None:
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    found = None
    for key in _keys(settings):
        if hmac.compare_digest(digest, hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()):
            found = key
    return found


def _authorised(request: Request) -> bool:
    settings = _settings(request)
    if request.app.state.auth_disabled:
        return True
    if _valid_session(settings, request.cookies.get(COOKIE)):
        return True
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    return scheme.lower() == "bearer" and bool(credentials) and _matching_key(settings, credentials.strip()) is not None


def _with_session(response: Response, request: Request, key: str) -> Response:
    response.set_cookie(
        COOKIE,
        session_token(key),
        max_age=SESSION_SECONDS,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=_over_https(request),
    )
    return response


def _proxied(request: Request) -> bool:
    """Whether the request came from a proxy we trust to say who the client is and how it connected."""
    peer = request.client.host if request.client else None
    if peer is None:
        return False
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in _settings(request).trusted_proxies)


def _over_https(request: Request) -> bool:
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "")
    # The proxy nearest to us appends last: its word is the one we trust.
    return bool(forwarded) and forwarded.split(",")[-1].strip().lower() == "https" and _proxied(request)


def _client_address(request: Request) -> str:
    """The client as the nearest trusted proxy saw it (X-Forwarded-For's last hop), else the peer."""
    peer = request.client.host if request.client else "unknown"
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and _proxied(request):
        return forwarded.split(",")[-1].strip()[:64] or peer
    return peer


class LoginThrottle:
    """Slows down key guessing: after `attempts` failed sign-ins from one client within `window` seconds,
    that client's next sign-ins are refused (429, with Retry-After) until the oldest failure is older
    than the window. A successful sign-in clears the client's failures. Each worker counts its own
    failures, at most `clients` clients (the longest quiet are forgotten first)."""

    def __init__(self, attempts: int = 5, window: float = 900.0, clients: int = 10_000) -> None:
        self.attempts = attempts
        self.window = window
        self.clients = clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds until `client` may try again; 0 when it may now."""
        failures = self._failures.get(client)
        if failures is None:
            return 0
        now = time.monotonic() if now is None else now
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.attempts:
            return 0
        return max(1, math.ceil(failures[0] + self.window - now))

    def failed(self, client: str, now: float | None = None) -> None:
        failures = self._failures.pop(client, None) or deque(maxlen=self.attempts)
        failures.append(time.monotonic() if now is None else now)
        self._failures[client] = failures
        while len(self._failures) > self.clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def _throttle(request: Request) -> LoginThrottle:
    throttle: LoginThrottle = request.app.state.login_throttle
    return throttle


def _too_many_attempts(retry_after: int) -> Response:
    response = _login_page(429, f"Too many failed sign-ins from your address: try again in {retry_after} s.")
    response.headers["Retry-After"] = str(retry_after)
    return response


def _page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>overnight · sign in</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body class="login"><form method="post" action="/dashboard/login" class="login-form">
<h1>overnight</h1><p>Monitoring dashboard. Sign in with a dashboard or API key.</p>{message}
<label for="key">Key</label><input id="key" name="key" type="password" autocomplete="current-password" autofocus>
<input type="hidden" name="next" value="{next}"><button type="submit">Sign in</button></form></body></html>
"""


def _login_page(status: int = 200, message: str = "", next_query: str = "") -> Response:
    shown = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return _page_headers(
        HTMLResponse(_LOGIN_PAGE.format(message=shown, next=html.escape(next_query, quote=True)), status_code=status)
    )


# ---------------------------------------------------------------------------- pages


@router.get("")
async def dashboard_page(request: Request, key: Annotated[str | None, Query()] = None) -> Response:
    settings = _settings(request)
    if key is not None:
        # An old bookmark's ?key=: trade it for a session and take it out of the address bar and history.
        # (Links with keys are no longer handed out: the access log redacts them, a proxy's may not.)
        client = _client_address(request)
        throttle = _throttle(request)
        if retry_after := throttle.retry_after(client):
            return _too_many_attempts(retry_after)
        found = _matching_key(settings, key)
        if found is None and not request.app.state.auth_disabled:
            throttle.failed(client)
            return _login_page(401, "That key is not valid.")
        throttle.succeeded(client)
        rest = "&".join(f"{k}={v}" for k, v in request.query_params.items() if k != "key")
        response = RedirectResponse(f"/dashboard{'?' + rest if rest else ''}", status_code=303)
        return _with_session(response, request, found) if found else response
    if not _authorised(request):
        return _login_page(next_query=request.url.query)
    return _page_headers(FileResponse(STATIC / "dashboard.html", media_type="text/html; charset=utf-8"))


@router.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    presented = (form.get("key") or [""])[0]
    next_query = (form.get("next") or [""])[0]
    client = _client_address(request)
    throttle = _throttle(request)
    if retry_after := throttle.retry_after(client):
        return _too_many_attempts(retry_after)
    found = _matching_key(_settings(request), presented) if presented else None
    if found is None:
        throttle.failed(client)
        await asyncio.sleep(0.5)  # slows down a guesser who waits for each answer
        return _login_page(401, "That key is not valid.", next_query)
    throttle.succeeded(client)
    target = "/dashboard" + (f"?{next_query}" if next_query and "://" not in next_query else "")
    return _with_session(RedirectResponse(target, status_code=303), request, found)


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/dashboard", status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


@router.get("/static/{name:path}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    response = FileResponse(STATIC / name, media_type=media_type)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


# ---------------------------------------------------------------------------- data


@router.get("/api/overview")
async def overview(
    request: Request, day: Annotated[date | None, Query(alias="date", description="Date to focus on.")] = None
) -> Response:
    if not _authorised(request):
        return JSONResponse({"detail": "sign in at /dashboard, or send Authorization: Bearer <key>"}, status_code=401)
    settings = _settings(request)
    try:
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True, connect_timeout=5, row_factory=dict_row
        ) as conn:
            data = await _read(conn, day)
    except psycopg.errors.UndefinedTable:
        return JSONResponse(
            {"detail": "the monitoring tables do not exist yet: run `overnight db upgrade`"}, status_code=503
        )
    except psycopg.OperationalError as error:
        logger.warning("dashboard: database unavailable: %s", str(error).strip().split("\n")[0])
        return JSONResponse(
            {"detail": "the database is unavailable", "reason": "database_unavailable"}, status_code=503
        )
    data["service"] = service_figures(request.app)
    return JSONResponse(_plain(data), headers={"Cache-Control": "no-store"})


async def _fetch(conn: psycopg.AsyncConnection[dict[str, Any]], name: str, params: Any = ()) -> list[dict[str, Any]]:
    cursor = await conn.execute(sql.query(name), params)
    return await cursor.fetchall()


async def _read(conn: psycopg.AsyncConnection[dict[str, Any]], day: date | None) -> dict[str, Any]:
    live = await _fetch(conn, "live_status")
    canary = await _fetch(conn, "dashboard_canary")
    runs = await _fetch(conn, "dashboard_runs", (RUNS_SHOWN,))
    steps = await _fetch(conn, "dashboard_run_steps", ([r["run_id"] for r in runs],))
    for run in runs:
        run["steps"] = [s for s in steps if s["run_id"] == run["run_id"]]
    models = await _fetch(conn, "dashboard_models", (DATES_SHOWN,))
    online = await _fetch(conn, "dashboard_online", (DATES_SHOWN,))
    checks = await _fetch(conn, "dashboard_checks", (DATES_SHOWN,))
    output = await _fetch(conn, "dashboard_output_report", {"logical_date": day})
    alerts = await _fetch(conn, "dashboard_alerts", (10,))
    focus = day or (max(c["logical_date"] for c in checks) if checks else None)
    retrain = await _fetch(conn, "retrain_request_for_date", {"logical_date": focus}) if focus else []
    current = live[0] if live else None
    return {
        "generated_at": datetime.now().astimezone(),
        "focus_date": focus,
        "live": {
            **current,
            "coverage": current["users_scored"] / current["active_users"] if current["active_users"] else None,
        }
        if current
        else None,
        "canary": canary[0] if canary else None,
        "runs": list(reversed(runs)),
        "models": [_model(m) for m in reversed(models)],
        "online": online,
        "checks": checks,
        "focus_checks": [c for c in checks if c["logical_date"] == focus and c["level"] != "ok"],
        "output": output[0] if output else None,
        "retrain_reason": retrain[0]["reason"] if retrain else None,
        "alerts": alerts,
    }


def _model(row: dict[str, Any]) -> dict[str, Any]:
    metrics = row["metrics"] or {}
    return {
        "model_id": row["model_id"],
        "logical_date": row["logical_date"],
        "status": row["status"],
        "metrics": {k: v for k, v in metrics.items() if "@" in k and isinstance(v, int | float)},
        "baselines": {
            name: {k: v for k, v in values.items() if "@" in k}
            for name, values in (metrics.get("baselines") or {}).items()
            if isinstance(values, dict)
        },
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------- the service's own figures

SNAPSHOTS_KEPT = 240


def service_figures(app: Any) -> dict[str, Any]:
    """Traffic, latency and errors of this process, from its Prometheus registry; each call also
    keeps a snapshot, so the page's refreshes build a short history of rates."""
    registry = getattr(getattr(app.state, "metrics", None), "registry", None)
    if registry is None:
        return {"available": False}
    requests: dict[str, float] = {}
    errors = 0.0
    api_requests = 0.0
    buckets: dict[float, float] = {}
    lookups: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "overnight_http_requests_total":
                route = sample.labels.get("route", "")
                requests[route] = requests.get(route, 0.0) + sample.value
                if route.startswith("/v1"):
                    api_requests += sample.value
                    if sample.labels.get("status", "").startswith("5"):
                        errors += sample.value
            elif sample.name == "overnight_http_request_duration_seconds_bucket" and sample.labels.get(
                "route", ""
            ).startswith("/v1"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == "overnight_lookups_total":
                source = sample.labels.get("source", "")
                lookups[source] = lookups.get(source, 0.0) + sample.value
    history: deque[dict[str, Any]] = getattr(app.state, "dashboard_traffic", None) or deque(maxlen=SNAPSHOTS_KEPT)
    app.state.dashboard_traffic = history
    now = time.time()
    history.append({"at": now, "api_requests": api_requests, "errors": errors, "buckets": dict(buckets)})
    series = []
    for before, after in zip(list(history)[:-1], list(history)[1:], strict=True):
        elapsed = after["at"] - before["at"]
        if elapsed <= 0:
            continue
        delta = {b: after["buckets"].get(b, 0.0) - before["buckets"].get(b, 0.0) for b in after["buckets"]}
        count = after["api_requests"] - before["api_requests"]
        series.append(
            {
                "at": datetime.fromtimestamp(after["at"]).astimezone(),
                "requests_per_second": count / elapsed,
                "error_share": (after["errors"] - before["errors"]) / count if count else 0.0,
                "p50_ms": _quantile(delta, 0.5) * 1000 if count else None,
                "p99_ms": _quantile(delta, 0.99) * 1000 if count else None,
            }
        )
    total_lookups = sum(lookups.values())
    return {
        "available": True,
        "api_requests": api_requests,
        "api_errors": errors,
        "error_share": errors / api_requests if api_requests else 0.0,
        "p50_ms": _quantile(buckets, 0.5) * 1000 if api_requests else None,
        "p99_ms": _quantile(buckets, 0.99) * 1000 if api_requests else None,
        "fallback_share": lookups.get("fallback", 0.0) / total_lookups if total_lookups else None,
        "requests_by_route": dict(sorted(requests.items(), key=lambda item: -item[1])[:8]),
        "series": series,
        "note": "this worker process only",
    }


def _quantile(cumulative: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts: linear within the bucket."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return math.nan
    rank = q * cumulative[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound
