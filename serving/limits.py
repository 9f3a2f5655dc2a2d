"""A limit on request bodies, enforced before anything parses them: bigger bodies get 413 with the reason."""

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import BodyTooLargeError

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestSizeLimit:
    """Refuses bodies over `max_bytes`: at once when Content-Length says so, else while reading a chunked body.

    A body that passes is buffered (it is at most `max_bytes`) and replayed to the app, so nothing
    downstream ever holds more than the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.max_bytes)
        except BodyTooLargeError as error:
            await self._refuse(send, error)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, error: BodyTooLargeError) -> None:
        # the shape and reason of every other refusal (serving.app.serving_error_response)
        body = orjson.dumps({"detail": str(error), "reason": error.reason})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    """The request's body, refused (`BodyTooLargeError`) at once when Content-Length says it is over
    `max_bytes`, else as soon as a chunked body grows past it. A client gone away leaves it short: the
    app sees what came, and the disconnect."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > max_bytes:
                raise BodyTooLargeError(_too_large(max_bytes))
            break
    chunks: list[bytes] = []
    size = 0
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
    return b"".join(chunks)


def _too_large(max_bytes: int) -> str:
    return f"request body larger than {max_bytes} bytes (OVERNIGHT_MAX_REQUEST_BYTES)"
