"""The operator console's HTTP app: the dashboard router, a health check, and the access log. `granian --factory
console.app:create_app` (what `overnight console` and ``python -m console`` run) builds one per worker.
"""

import logging
import os
from collections import deque
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException

from common.server import IGNORED_AUTH_VARIABLE, open_app_factory
from common.web import configure_logging, overnight_version, short_keys_warning
from console.access_log import AccessLog
from console.auth import LoginThrottle
from console.dashboard import router as dashboard_router
from console.service_metrics import SNAPSHOTS_KEPT
from console.settings import ConsoleSettings, check_auth_configured, get_console_settings

logger = logging.getLogger(__name__)


def create_app(settings: ConsoleSettings | None = None, *, auth_disabled: bool = False) -> FastAPI:
    """The console; with no settings they come from the environment (the server's workers)."""
    settings = settings or get_console_settings()
    check_auth_configured(settings, auth_disabled)
    configure_logging()
    if auth_disabled:
        logger.warning("authentication is disabled (--no-auth): anyone who can reach this port can open the dashboard")
    elif os.environ.get(IGNORED_AUTH_VARIABLE):
        logger.warning("%s is ignored: only the --no-auth flag turns authentication off", IGNORED_AUTH_VARIABLE)
    if not auth_disabled and (
        weak := short_keys_warning(settings.keys, "OVERNIGHT_DASHBOARD_KEYS or OVERNIGHT_API_KEYS")
    ):
        logger.warning("%s", weak)

    app = FastAPI(
        title="overnight console",
        summary="The operator dashboard of overnight.",
        version=overnight_version(),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.auth_disabled = auth_disabled
    app.state.login_throttle = LoginThrottle()
    app.state.service_snapshots = deque(maxlen=SNAPSHOTS_KEPT)
    if settings.console_access_log:
        app.add_middleware(AccessLog)
    app.include_router(dashboard_router)
    app.add_exception_handler(HTTPException, _on_http_error)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/dashboard", status_code=307)

    return app


# The console without sign-in: the factory ``overnight console --no-auth`` gives its workers.
create_open_app = open_app_factory(create_app)


async def _on_http_error(request: Request, error: Exception) -> Response:
    """FastAPI's answer to an HTTP error; a sign-in form that did not arrive in time (the console's one 408,
    `console.dashboard._form`) in the shape of the console's other refusals, with its reason."""
    assert isinstance(error, HTTPException)
    if error.status_code == 408:
        return JSONResponse({"detail": error.detail, "reason": "body_timeout"}, status_code=408, headers=error.headers)
    return await http_exception_handler(request, error)
