"""The monitoring dashboard at ``/dashboard``: one page, its assets, and one JSON endpoint behind it, reading the
batch side's records through ``sql/queries/console.sql`` and the lookup service's ``/metrics``. Sign-in: `console.auth`.
"""

import asyncio
import html
import logging
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

import psycopg
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from psycopg.rows import dict_row

import sql
from common.text import first_line, jsonable
from console.auth import (
    COOKIE,
    authorised,
    client_address,
    matching_key,
    settings_of,
    throttle_of,
    with_session,
    without_session,
)
from console.service_metrics import scrape, service_figures

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/dashboard", include_in_schema=False)

STATIC = Path(__file__).with_name("static")
# The charts are Apache ECharts, vendored under static/vendor so that the page works offline.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "vendor/echarts/echarts.min.js": "text/javascript; charset=utf-8",
}
RUNS_SHOWN = 30
DATES_SHOWN = 30
ALERTS_SHOWN = 10
LOGIN_FORM_BYTES = 16 * 1024
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
# Every named query the dashboard runs, all of sql/queries/console.sql and nothing of another file: what its
# database role (migration 0018) must be able to read.
QUERIES = (
    "dashboard_live",
    "dashboard_canary",
    "dashboard_runs",
    "dashboard_run_steps",
    "dashboard_models",
    "dashboard_online",
    "dashboard_checks",
    "dashboard_output_report",
    "dashboard_alerts",
    "dashboard_retrain_request",
)


# ---------------------------------------------------------------------------- pages


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


def _login_page(status: int, message: str = "", next_query: str = "") -> Response:
    shown = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return _page_headers(
        HTMLResponse(_LOGIN_PAGE.format(message=shown, next=html.escape(next_query, quote=True)), status_code=status)
    )


@router.get("")
async def dashboard_page(request: Request, key: Annotated[str | None, Query()] = None) -> Response:
    if key is not None:
        # A key in the address reaches browser history and every proxy's log on the way: it is never
        # taken, only answered with the sign-in form (the access log writes it as REDACTED).
        return _login_page(401, "A key in the address is not accepted: sign in with the form below.")
    if not authorised(request):
        # A first visit gets the sign-in form; a session cookie that is none (forged, malformed, expired)
        # is refused as such, with the same form.
        return _login_page(401 if COOKIE in request.cookies else 200, next_query=request.url.query)
    return _page_headers(FileResponse(STATIC / "dashboard.html", media_type="text/html; charset=utf-8"))


async def _form(request: Request) -> dict[str, list[str]] | None:
    """The posted form, or None when it is bigger than a sign-in form can be; a 408 (HTTPException) when it
    has not all arrived within OVERNIGHT_BODY_TIMEOUT_SECONDS."""
    timeout_seconds = settings_of(request).body_timeout_seconds
    body = bytearray()
    # One deadline for the whole form: a client trickling it a byte at a time must not hold the worker's
    # connection slot for longer either.
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > LOGIN_FORM_BYTES:
                    return None
    except TimeoutError:
        raise HTTPException(
            408,
            f"the sign-in form did not arrive within {timeout_seconds:g} s (OVERNIGHT_BODY_TIMEOUT_SECONDS)",
            # the rest of the form is still on its way: the connection cannot carry another request
            headers={"Connection": "close"},
        ) from None
    return parse_qs(body.decode("utf-8", "replace"))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    if form is None:
        return JSONResponse(
            {"detail": f"a sign-in form is at most {LOGIN_FORM_BYTES} bytes", "reason": "body_too_large"},
            status_code=413,
        )
    presented = (form.get("key") or [""])[0]
    next_query = (form.get("next") or [""])[0]
    client = client_address(request)
    throttle = throttle_of(request)
    if retry_after := throttle.retry_after(client):
        return _too_many_attempts(retry_after)
    found = matching_key(settings_of(request), presented) if presented else None
    if found is None:
        throttle.failed(client)
        await asyncio.sleep(0.5)  # slows down a guesser who waits for each answer
        return _login_page(401, "That key is not valid.", next_query)
    throttle.succeeded(client)
    target = "/dashboard" + (f"?{next_query}" if next_query and "://" not in next_query else "")
    return with_session(RedirectResponse(target, status_code=303), request, found)


@router.post("/logout")
async def logout() -> Response:
    return without_session(RedirectResponse("/dashboard", status_code=303))


@router.get("/static/{name:path}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        return JSONResponse({"detail": "not found", "reason": "not_found"}, status_code=404)
    response = FileResponse(STATIC / name, media_type=media_type)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


# ---------------------------------------------------------------------------- data


@router.get("/api/overview")
async def overview(
    request: Request, day: Annotated[date | None, Query(alias="date", description="Date to focus on.")] = None
) -> Response:
    # Whether the client was held back before this request (its own failure does not make it a 429).
    retry_after = throttle_of(request).retry_after(client_address(request))
    if not authorised(request):
        if retry_after:
            return JSONResponse(
                {"detail": f"too many failed sign-ins: try again in {retry_after} s", "reason": "too_many_attempts"},
                status_code=429,
                headers={"Retry-After": str(retry_after)},
            )
        return JSONResponse(
            {"detail": "sign in at /dashboard, or send Authorization: Bearer <key>", "reason": "not_authenticated"},
            status_code=401,
        )
    settings = settings_of(request)
    # The service's figures are read while the database answers; neither waits for the other.
    scraping = asyncio.ensure_future(scrape(settings.console_service_url, settings.console_service_timeout_seconds))
    data = await _records(settings.dsn, day)
    if isinstance(data, Response):
        scraping.cancel()
        return data
    data["service"] = service_figures(request.app.state.service_snapshots, await scraping)
    return JSONResponse(jsonable(data), headers={"Cache-Control": "no-store"})


async def connect_read_only(dsn: str) -> psycopg.AsyncConnection[dict[str, Any]]:
    """A connection of the console's: every transaction on it is read only, whichever role the DSN logs in
    as (the batch side's owner role, when OVERNIGHT_CONSOLE_DATABASE_URL is unset)."""
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, connect_timeout=5, row_factory=dict_row, options="-c default_transaction_read_only=on"
    )


async def _records(dsn: str, day: date | None) -> dict[str, Any] | Response:
    """`read_overview` over a connection of its own, or the 503 that says why the records cannot be read."""
    try:
        async with await connect_read_only(dsn) as conn:
            return await read_overview(conn, day)
    except psycopg.errors.UndefinedTable:
        return JSONResponse(
            {"detail": "the monitoring tables do not exist yet: run `overnight db upgrade`", "reason": "no_schema"},
            status_code=503,
        )
    except psycopg.errors.InsufficientPrivilege as error:
        logger.error("dashboard: the console's database role may not read what it shows: %s", first_line(error))
        detail = "the console's database role may not read the monitoring tables: run `overnight db upgrade`"
        return JSONResponse({"detail": detail, "reason": "insufficient_privilege"}, status_code=503)
    except psycopg.OperationalError as error:
        logger.warning("dashboard: database unavailable: %s", first_line(error))
        return JSONResponse(
            {"detail": "the database is unavailable", "reason": "database_unavailable"}, status_code=503
        )
    except psycopg.Error as error:  # a schema this console does not know (another version's): say so, not a 500
        logger.error("dashboard: the records could not be read: %s", first_line(error))
        detail = "the records could not be read: is the schema the console's version? run `overnight db upgrade`"
        return JSONResponse({"detail": detail, "reason": "database_error"}, status_code=503)


async def _fetch(conn: psycopg.AsyncConnection[dict[str, Any]], name: str, params: Any = ()) -> list[dict[str, Any]]:
    if name not in QUERIES:  # the list migration 0018's grants (and their test) are derived from
        raise KeyError(f"{name!r} is not in console.dashboard.QUERIES")
    cursor = await conn.execute(sql.query(name), params)
    return await cursor.fetchall()


async def read_overview(conn: psycopg.AsyncConnection[dict[str, Any]], day: date | None) -> dict[str, Any]:
    """Everything the page shows but the service panel, focused on `day` (default the newest checked date)."""
    live = await _fetch(conn, "dashboard_live")
    canary = await _fetch(conn, "dashboard_canary")
    runs = await _fetch(conn, "dashboard_runs", (RUNS_SHOWN,))
    steps = await _fetch(conn, "dashboard_run_steps", ([r["run_id"] for r in runs],))
    for run in runs:
        run["steps"] = [s for s in steps if s["run_id"] == run["run_id"]]
    models = await _fetch(conn, "dashboard_models", (DATES_SHOWN,))
    online = await _fetch(conn, "dashboard_online", (DATES_SHOWN,))
    checks = await _fetch(conn, "dashboard_checks", (DATES_SHOWN,))
    output = await _fetch(conn, "dashboard_output_report", {"logical_date": day})
    alerts = await _fetch(conn, "dashboard_alerts", (ALERTS_SHOWN,))
    focus = day or (max(c["logical_date"] for c in checks) if checks else None)
    retrain = await _fetch(conn, "dashboard_retrain_request", {"logical_date": focus}) if focus else []
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
