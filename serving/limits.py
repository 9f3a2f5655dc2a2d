"""Limits on request bodies, enforced before anything parses them: bigger bodies get 413, bodies that do not
arrive in time 408, each with its reason."""

import asyncio
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import BodyTooLargeError, ServingError

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyTimeoutError(ServingError):
    """A request body that did not all arrive within OVERNIGHT_BODY_TIMEOUT_SECONDS."""

    reason = "body_timeout"


class RequestSizeLimit:
    """Refuses bodies over `max_bytes` (at once when Content-Length says so, else while reading a chunked
    body) and bodies not all received within `timeout_seconds`.

    `admit(scope)` runs before a byte of the body is read: it raises a `ServingError` to refuse the
    request (an unknown API key), or returns False when no route of the request's path takes a body, which
    is then never read (the app sees an empty one). So a client the service does not know cannot make it
    hold a buffer. A body that passes is buffered (it is at most `max_bytes`) and replayed to the app, so
    nothing downstream ever holds more than the limit. `respond` renders a refusal in the app's error shape;
    the rest of the body is never read, so it must close the connection.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_seconds: float,
        admit: Callable[[Scope], bool],
        respond: Callable[[Exception], Response],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds
        self.admit = admit
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            if not self.admit(scope):
                await self.app(scope, _replaying(b"", receive), send)
                return
            body = await read_body(scope, receive, self.max_bytes, self.timeout_seconds)
        except ServingError as error:
            await self.respond(error)(scope, receive, send)
            return
        await self.app(scope, _replaying(body, receive), send)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` that gives `body` as the whole request body first."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def read_body(scope: Scope, receive: Receive, max_bytes: int, timeout_seconds: float) -> bytes:
    """The request's body, refused (`BodyTooLargeError`) at once when Content-Length says it is over
    `max_bytes`, else as soon as a chunked body grows past it; refused (`BodyTimeoutError`) when it has not
    all arrived `timeout_seconds` after the request did. A client gone away leaves it short: the app sees
    what came, and the disconnect."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > max_bytes:
                raise BodyTooLargeError(_too_large(max_bytes))
            break
    chunks: list[bytes] = []
    size = 0
    # One deadline for the whole body, not per chunk: a client trickling a byte at a time must not hold a
    # worker's connection slot and buffer for longer either.
    try:
        async with asyncio.timeout(timeout_seconds):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLargeError(_too_large(max_bytes))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise BodyTimeoutError(
            f"request body not received within {timeout_seconds:g} s (OVERNIGHT_BODY_TIMEOUT_SECONDS)"
        ) from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> str:
    return f"request body larger than {max_bytes} bytes (OVERNIGHT_MAX_REQUEST_BYTES)"
