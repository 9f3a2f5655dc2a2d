"""The console's access log: one JSON line per request, with what a client sent bounded in length and the
values of the query parameters the console does not read (an old bookmark's ``/dashboard?key=...``, or
a credential under any other name) replaced by REDACTED."""

import logging
import time

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.web import UNMATCHED_ROUTE, bounded, loggable_query, logged_method
from console.auth import client_address

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("overnight.console.access")
# The query parameters the console reads for what it shows (console.dashboard: the page's and the overview's
# `date`): the access log writes their values, every other one's REDACTED. Not `key`: the page reads it
# only to refuse it, and it is a secret.
LOGGED_QUERY_PARAMETERS = frozenset({"date"})


class AccessLog:
    """Writes a line for every HTTP request once its response has started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_keep_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_keep_status)
        finally:
            _log(scope, status, time.perf_counter() - start)


def _log(scope: Scope, status: int, elapsed: float) -> None:
    method = logged_method(scope["method"])
    route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
    entry = {
        "ts": time.time(),
        "method": method,
        "path": bounded(scope["path"]),
        "query": bounded(loggable_query(scope.get("query_string", b""), LOGGED_QUERY_PARAMETERS)),
        "route": route,
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
        # as the nearest trusted proxy saw it: sign-ins are what this log is read for
        "client": client_address(Request(scope)),
    }
    access_logger.info(orjson.dumps(entry).decode())
