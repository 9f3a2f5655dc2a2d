"""The HTTP app: thin routes over `serving.lookup`, injected dependencies, and the one map of errors to statuses.

`uvicorn --factory serving.app:create_app` builds one app per worker from the environment.
"""

import asyncio
import copy
import email.message
import functools
import gc
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, unquote_to_bytes

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import TypeAdapter, ValidationError
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from common.server import IGNORED_AUTH_VARIABLE, open_app_factory
from common.text import jsonable
from common.web import configure_logging, overnight_version, short_keys_warning
from serving.auth import ApiKeys, bearer_scheme, bearer_token
from serving.catalogue import EMPTY_CATALOGUE
from serving.errors import (
    BodyTooLargeError,
    DatabaseUnavailableError,
    FeedbackQueueFullError,
    InvalidRequestError,
    NoLiveBatchError,
    NotAuthenticatedError,
    ServingError,
    UnreadableBodyError,
)
from serving.feedback import FeedbackIntake, event_timestamp_pattern
from serving.feedback import router as events_router
from serving.limits import BodyTimeoutError, RequestSizeLimit, read_body
from serving.live import LiveView, LiveWatcher, Rollout
from serving.lookup import (
    Answer,
    Answers,
    Lookup,
    create_pool,
    encode,
    render,
    render_session,
    render_similar,
)
from serving.metrics import MetricsMiddleware, RequestRecorder, ServingMetrics
from serving.prediction_log import PredictionLog, WriterCollector, request_id_for
from serving.schemas import (
    EXPLAIN_DESCRIPTION,
    FILTER_DESCRIPTION,
    SEGMENT_DESCRIPTION,
    BatchRecommendations,
    BatchRecommendationsRequest,
    BatchSimilarItems,
    ErrorMessage,
    Health,
    Readiness,
    Recommendations,
    SessionRecommendations,
    SessionRequest,
    SimilarItems,
    SimilarItemsRequest,
)
from serving.settings import ServingSettings, check_auth_configured, get_serving_settings
from serving.variants import CANARY, PRODUCTION
from sql.contract import MAX_ID_LENGTH

logger = logging.getLogger(__name__)

WRITER_DRAIN_SECONDS = 10.0  # at shutdown, for the queued answers and events to be written

# ---------------------------------------------------------------------------- dependencies
# Async: FastAPI runs a plain `def` dependency in a worker thread, which costs more than the lookup.
# The routes read the lookup and metrics from app.state directly: a dependency per object costs a
# measurable share of a cached lookup.


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    state = request.app.state
    if not state.auth_disabled:
        keys: ApiKeys = state.api_keys
        keys.check(credentials)


# ---------------------------------------------------------------------------- routes

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or unknown API key."},
    503: {"model": ErrorMessage, "description": "No batch is live yet, or the database did not answer."},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorMessage,
        "description": "The request body's bytes are not text in an encoding JSON allows (UTF-8, or UTF-16/32; "
        "reason unreadable_body). Text that is not well-formed JSON is a 422 (type json_invalid).",
    },
    408: {
        "model": ErrorMessage,
        "description": "The request body did not all arrive within OVERNIGHT_BODY_TIMEOUT_SECONDS (reason "
        "body_timeout); the connection is closed.",
    },
    413: {"model": ErrorMessage, "description": "The request body is larger than OVERNIGHT_MAX_REQUEST_BYTES."},
}
UNREADABLE_BODY = "the request body is not text in an encoding JSON allows (UTF-8, UTF-16 or UTF-32)"


class _AnyText(PathConvertor):
    """Starlette's `path`, but newlines too: a user id is any text, and control characters must not make it 404."""

    regex = "(?s:.*)"


register_url_convertor("text", _AnyText())
USER_RECOMMENDATIONS_PATH = "/v1/users/{user_id:text}/recommendations"
SIMILAR_ITEMS_PATH = "/v1/items/{item_id:text}/similar"
SESSION_PATH = "/v1/recommendations:session"

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
ops = APIRouter()
# Declares the one-user route for the OpenAPI schema; `UserRecommendationsEndpoint` serves it.
documented = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)


@documented.get(USER_RECOMMENDATIONS_PATH, summary="Recommendations for one user", response_model=Recommendations)
async def user_recommendations(
    user_id: Annotated[
        str, Path(description="Any text up to OVERNIGHT_MAX_USER_ID_LENGTH; ids with `/` may be percent-encoded.")
    ],
    k: Annotated[
        int | None, Query(ge=1, description="Items to return, 1..k of the live batch; default 10 (or k if smaller).")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        Query(description="Item ids to leave out: comma-separated, and/or the parameter repeated."),
    ] = None,
    filter: Annotated[str | None, Query(description=FILTER_DESCRIPTION)] = None,
    segment: Annotated[str | None, Query(description=SEGMENT_DESCRIPTION)] = None,
    explain: Annotated[bool, Query(description=EXPLAIN_DESCRIPTION)] = False,
) -> None:
    """The schema of `UserRecommendationsEndpoint`: the parameters and rules it enforces itself."""


@documented.get(SIMILAR_ITEMS_PATH, summary="Items similar to one item", response_model=SimilarItems)
async def similar_items(
    item_id: Annotated[str, Path(description="Any item id; ids with `/` may be percent-encoded.")],
    k: Annotated[
        int | None,
        Query(ge=1, description="Neighbours to return, 1..similar_k of the live batch; default 10 (or less)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        Query(description="Item ids to leave out: comma-separated, and/or the parameter repeated."),
    ] = None,
    filter: Annotated[str | None, Query(description=FILTER_DESCRIPTION)] = None,
    user_id: Annotated[
        str | None, Query(description="Whom the list is for: a canary user's comes from the canary's batch.")
    ] = None,
) -> None:
    """The schema of `SimilarItemsEndpoint`: the parameters and rules it enforces itself."""


class UserRecommendationsEndpoint:
    """GET one user's list as a routed endpoint: for what `ServingApp` does not answer before the stack (HEAD)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, body = await _user_recommendations(scope, receive, scope["path_params"]["user_id"])
        await _send_json(send, headers, body)


class SimilarItemsEndpoint:
    """GET one item's neighbours as a routed endpoint (HEAD, a mounted root path), like the user lookup's."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, body = await _similar_items(scope, receive, scope["path_params"]["item_id"])
        await _send_json(send, headers, body)


async def _user_recommendations(
    scope: Scope, receive: Receive, user_id: str
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The one-user lookup: headers and JSON body, or a `ServingError`.

    FastAPI's per-request parameter and dependency solving cost several times the rest of a cached
    lookup, so this checks the key and parses its query parameters itself, with the rules and error
    shapes `user_recommendations` declares.
    """
    state = scope["app"].state
    if not state.auth_disabled:
        state.api_keys.check_token(bearer_token(scope["headers"]))
    _check_path_id_is_utf8(scope, user_id, "user_id")
    query = _lookup_query(scope["query_string"])
    lookup: Lookup = state.lookup
    exclude = _query_exclude_set(query.exclude, state.settings.max_exclude_items)
    answer = await lookup.recommend(user_id, query.k, exclude, query.filter, query.segment, query.explain)
    return _served(scope, answer, lookup), encode(render(answer, answer.results[0]))


async def _similar_items(scope: Scope, receive: Receive, item_id: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """One item's neighbours: headers and JSON body, or a `ServingError` (as `_user_recommendations`)."""
    state = scope["app"].state
    if not state.auth_disabled:
        state.api_keys.check_token(bearer_token(scope["headers"]))
    _check_path_id_is_utf8(scope, item_id, "item_id")
    query = _lookup_query(scope["query_string"])
    lookup: Lookup = state.lookup
    exclude = _query_exclude_set(query.exclude, state.settings.max_exclude_items)
    answer = await lookup.similar([item_id], query.k, exclude, query.filter, query.user_id)
    return _served(scope, answer, lookup), encode(render_similar(answer, answer.results[0]))


async def _session_recommendations(scope: Scope, receive: Receive, _: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A session's answer: headers and JSON body, or a `ServingError` or `RequestValidationError`, with the
    rules and error shapes of `session_recommendations` (the body as FastAPI would read and validate it)."""
    state = scope["app"].state
    if not state.auth_disabled:
        state.api_keys.check_token(bearer_token(scope["headers"]))
    settings: ServingSettings = state.settings
    body = await read_body(scope, receive, settings.max_request_bytes, settings.body_timeout_seconds)
    request = _session_request(body, _header(scope["headers"], b"content-type"))
    lookup: Lookup = state.lookup
    answer = await lookup.session(
        request.items,
        request.k,
        _body_exclude_set(request.exclude, state.settings.max_exclude_items),
        _filter_text(request.filter),
        request.user_id,
        request.segment,
    )
    return _served(scope, answer, lookup), encode(render_session(answer, answer.results[0]))


def _session_request(body: bytes, content_type: str | None) -> SessionRequest:
    """A session body read and validated as FastAPI reads a routed endpoint's: no body is a missing one, and
    it is read as JSON only when its Content-Type says so (else its bytes, which are no object, are what
    is validated); or the `RequestValidationError` or `UnreadableBodyError` FastAPI's reading would give."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        if not _is_json_media_type(content_type):
            return SessionRequest.model_validate(body, from_attributes=True)
        try:
            text = body.decode(json.detect_encoding(body))
        except UnicodeDecodeError:
            raise UnreadableBodyError(UNREADABLE_BODY) from None
        return SessionRequest.model_validate_json(text)
    except ValidationError as error:
        problems = error.errors(include_url=False)
        raise RequestValidationError([{**problem, "loc": ("body", *problem["loc"])} for problem in problems]) from None


def _is_json_media_type(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON (application/json or application/*+json), parsed as FastAPI parses it."""
    if content_type == "application/json":
        return True
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _check_path_id_is_utf8(scope: Scope, path_id: str, name: str) -> None:
    """Refuse (422) an id in the path whose percent-encoded bytes are not UTF-8.

    Servers decode the path leniently, each bad sequence becoming U+FFFD, so `%FF` and `%FE` would both be
    the user "\ufffd" (answered, and logged as one user). Only a path holding U+FFFD is decoded again,
    strictly, from the bytes the client sent: a well-formed `%EF%BF%BD` is an id like any other.
    """
    if "\ufffd" not in path_id:
        return
    raw_path = scope.get("raw_path")
    if raw_path is None:
        return
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        what = name.replace("_", " ")
        raise InvalidRequestError(("path", name), f"{what} is not valid UTF-8 once percent-decoded") from None


def _served(scope: Scope, answer: Answer, lookup: Lookup) -> list[tuple[bytes, bytes]]:
    """Count and log a fast-path answer; its headers."""
    state = scope["app"].state
    state.metrics.count_answer(answer)
    request_id = request_id_for(_header(scope["headers"], b"x-request-id"))
    if scope["method"] != "HEAD":  # a HEAD shows the user nothing, so nothing was served to log
        state.prediction_log.record_answer(request_id, answer.batch.batch_id, answer.variant, answer.results)
    return _answer_headers(answer, lookup, request_id, filled=answer.filled)


async def _send_json(send: Send, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    start_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": 200, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


Handler = Callable[[Scope, Receive, str], Awaitable[tuple[list[tuple[bytes, bytes]], bytes]]]


@dataclass(frozen=True)
class _FastRoute:
    """A GET answered before the middleware stack: its template and the id its path names."""

    template: str
    handler: Handler
    prefix: str
    suffix: str

    def path_id(self, path: str) -> str | None:
        """The id in `path`, as the route's pattern would match it; None for other paths."""
        if (
            path.startswith(self.prefix)
            and path.endswith(self.suffix)
            and len(path) >= len(self.prefix) + len(self.suffix)
        ):
            return path[len(self.prefix) : len(path) - len(self.suffix)]
        return None


def _fast_route(template: str, handler: Handler) -> _FastRoute:
    prefix, _, rest = template.partition("{")
    return _FastRoute(template, handler, prefix, rest.partition("}")[2])


_FAST_ROUTES = (
    _fast_route(USER_RECOMMENDATIONS_PATH, _user_recommendations),
    _fast_route(SIMILAR_ITEMS_PATH, _similar_items),
)
_SESSION_ROUTE = _FastRoute(SESSION_PATH, _session_recommendations, SESSION_PATH, "")


class ServingApp(FastAPI):
    """FastAPI, with the one-user lookup, one item's neighbours and a session answered before its middleware
    stack and router.

    On a cached lookup, Starlette's middleware layers and route matching cost about as much as the
    lookup itself (and FastAPI's body solving a session POST as much again). So those requests are
    served here, recorded by the same
    `RequestRecorder` under the same route template, with the same error responses (a `ServingError` as
    `_on_serving_error` maps it, a body FastAPI would refuse as it would, anything else a plain 500 that
    goes on to the server's log, as Starlette's `ServerErrorMiddleware` does). Every other request goes
    through the stack, where the same lookups are also routed (HEAD, a mounted root path).
    """

    recorder: RequestRecorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            if scope["method"] == "GET":
                for route in _FAST_ROUTES:
                    path_id = route.path_id(scope["path"])
                    if path_id is not None:
                        scope["app"] = self
                        await self._fast(scope, receive, send, route, path_id)
                        return
            elif scope["method"] == "POST" and scope["path"] == SESSION_PATH:
                scope["app"] = self
                await self._fast(scope, receive, send, _SESSION_ROUTE, "")
                return
        await super().__call__(scope, receive, send)

    async def _fast(self, scope: Scope, receive: Receive, send: Send, route: _FastRoute, path_id: str) -> None:
        start = time.perf_counter()
        status = 500
        batch_id = b""
        try:
            try:
                headers, body = await route.handler(scope, receive, path_id)
            except (ServingError, RequestValidationError) as error:
                response = (
                    serving_error_response(error) if isinstance(error, ServingError) else _unprocessable(error.errors())
                )
                status = response.status_code
                await response(scope, receive, send)
                return
            except Exception:
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
                raise
            status = 200
            batch_id = headers[0][1]
            await _send_json(send, headers, body)
        finally:
            self.recorder.record(scope, route.template, status, time.perf_counter() - start, batch_id)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


_INT = TypeAdapter(int)
_BOOL = TypeAdapter(bool)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _LookupQuery:
    k: int | None = None
    exclude: tuple[str, ...] = ()
    filter: str | None = None
    segment: str | None = None
    user_id: str | None = None
    explain: bool = False


_NO_QUERY = _LookupQuery()


def _lookup_query(query_string: bytes) -> _LookupQuery:
    """The fast-path GETs' query parameters, by FastAPI's rules: the last `k`, `segment` or `user_id` wins,
    `exclude` and `filter` may repeat (excluded items add up; filters AND, like their terms)."""
    if not query_string:
        return _NO_QUERY
    k_text: str | None = None
    excluded: list[str] = []
    filters: list[str] = []
    segment: str | None = None
    user_id: str | None = None
    explain_text: str | None = None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name == "k":
            k_text = value
        elif name == "exclude":
            excluded.append(value)
        elif name == "filter":
            filters.append(value)
        elif name == "segment":
            segment = value
        elif name == "user_id":
            user_id = value
        elif name == "explain":
            explain_text = value
    k = None if k_text is None else _query_value(_INT, "k", k_text)
    if k is not None and k < 1:
        raise InvalidRequestError(("query", "k"), "Input should be greater than or equal to 1", k_text)
    explain = explain_text is not None and _query_value(_BOOL, "explain", explain_text)
    return _LookupQuery(k, tuple(excluded), _filter_text(filters), segment, user_id, explain)


def _query_value(adapter: TypeAdapter[T], name: str, text: str) -> T:
    """A query parameter's value by FastAPI's rules (pydantic's lax mode), or the 422 it would give."""
    try:
        return adapter.validate_python(text)
    except ValidationError as error:
        raise InvalidRequestError(("query", name), error.errors()[0]["msg"], text) from None


def _filter_text(values: list[str] | str | None) -> str | None:
    """The filter terms of one or more `filter` values, ANDed; None when there are none (empty values)."""
    if isinstance(values, str):
        values = [values]
    text = ",".join(value for value in values or () if value.strip())
    return text or None


@api.post(
    "/recommendations:batch",
    summary="Recommendations for many users, each from one batch",
    description="Every user is answered wholly from the batch of their arm: the canary's for the users in a "
    "running canary's share, the live batch for the others (and for everyone when no canary runs).",
    response_model=BatchRecommendations,
    responses=BODY_ERRORS,
)
async def batch_recommendations(request: Request, body: BatchRecommendationsRequest) -> Response:
    state = request.app.state
    lookup: Lookup = state.lookup
    answers = await lookup.recommend_many(
        body.user_ids,
        body.k,
        _body_exclude_set(body.exclude, state.settings.max_exclude_items),
        _filter_text(body.filter),
        body.segment,
        body.explain,
    )
    request_id = request_id_for(request.headers.get("x-request-id"))
    for answer in answers.parts:
        state.metrics.count_answer(answer)
    state.prediction_log.record_answers(
        request_id, [(answer.batch.batch_id, answer.variant, answer.results) for answer in answers.parts]
    )
    document = {"results": [render(answer, recs) for answer, recs in answers.in_order]}
    # With users in both arms, X-Batch-Id names the production batch (each result names its own), and
    # X-Variant both arms.
    return _json(document, answers, lookup, request_id)


@api.post(
    "/items:similar",
    summary="Items similar to each of many items",
    description="Every list from one batch: the canary's when `user_id` is in a running canary's share, else the "
    "live batch's.",
    response_model=BatchSimilarItems,
    responses=BODY_ERRORS,
)
async def batch_similar_items(request: Request, body: SimilarItemsRequest) -> Response:
    state = request.app.state
    lookup: Lookup = state.lookup
    answer = await lookup.similar(
        body.item_ids,
        body.k,
        _body_exclude_set(body.exclude, state.settings.max_exclude_items),
        _filter_text(body.filter),
        body.user_id,
        where="body",
    )
    return _single_answer(request, answer, {"results": [render_similar(answer, recs) for recs in answer.results]})


@api.post(
    SESSION_PATH.removeprefix("/v1"),
    summary="Recommendations for a session: the items a visitor just touched",
    description="Blended at request time from the precomputed neighbour lists of the session's items (recent "
    "ones weigh more), and the user's own list when the batch scored `user_id`; never a model call.",
    response_model=SessionRecommendations,
    responses=BODY_ERRORS,
)
async def session_recommendations(request: Request, body: SessionRequest) -> Response:
    state = request.app.state
    lookup: Lookup = state.lookup
    answer = await lookup.session(
        body.items,
        body.k,
        _body_exclude_set(body.exclude, state.settings.max_exclude_items),
        _filter_text(body.filter),
        body.user_id,
        body.segment,
    )
    return _single_answer(request, answer, render_session(answer, answer.results[0]))


def _single_answer(request: Request, answer: Answer, document: Any) -> Response:
    """Count and log an answer from one batch; the response with its headers."""
    state = request.app.state
    state.metrics.count_answer(answer)
    request_id = request_id_for(request.headers.get("x-request-id"))
    state.prediction_log.record_answer(request_id, answer.batch.batch_id, answer.variant, answer.results)
    return _json(document, Answers([answer], []), state.lookup, request_id)


@ops.get("/healthz", summary="The process is alive")
async def healthz() -> Health:
    return Health()


@ops.get("/readyz", summary="Ready: a batch is loaded and the database answers", responses={503: _ERRORS[503]})
async def readyz(request: Request) -> Readiness:
    lookup: Lookup = request.app.state.lookup
    batch = lookup.live()
    await lookup.ping()
    return Readiness(
        batch_id=batch.batch_id,
        model_id=batch.model_id,
        generated_at=batch.generated_at,
        data_age_seconds=batch.age_seconds(),
    )


# The dashboard moved to the operator console: an old bookmark learns where, rather than a bare 404.
DASHBOARD_MOVED = "the dashboard is served by `overnight console` (port 8001 by default)"


@ops.api_route("/dashboard{rest:path}", methods=["GET", "HEAD", "POST"], include_in_schema=False)
async def dashboard_moved() -> Response:
    return JSONResponse({"detail": DASHBOARD_MOVED, "reason": "moved"}, status_code=404)


@ops.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    metrics: ServingMetrics = request.app.state.metrics
    return Response(content=metrics.render(), media_type=metrics.content_type)


def _query_exclude_set(values: Sequence[str] | None, limit: int) -> frozenset[str]:
    """The ids a query's `exclude` values name: each one id or several separated by commas (the schema's
    form style, not exploded), the parameter repeated or not. The limit counts the ids as sent, empty and
    repeated ones too: the schema's `maxItems` of comma-free items."""
    if not values:
        return frozenset()
    sent = len(values) + sum(value.count(",") for value in values)
    _check_exclude_count(sent, limit, ("query",))
    items = [item for value in values for item in value.split(",")]
    for item in items:
        _check_exclude_length(item, ("query", "exclude"))
    return frozenset(item.strip() for item in items if item.strip())


def _body_exclude_set(values: Sequence[str] | None, limit: int) -> frozenset[str]:
    """A body's `exclude` array: each element one id, exactly as given (an id may hold a comma)."""
    if not values:
        return frozenset()
    _check_exclude_count(len(values), limit, ("body",))
    for index, item in enumerate(values):
        _check_exclude_length(item, ("body", "exclude", index))
    return frozenset(values)


def _check_exclude_count(sent: int, limit: int, loc: tuple[str, ...]) -> None:
    if sent > limit:
        raise InvalidRequestError((*loc, "exclude"), f"at most {limit} excluded items, got {sent}")


def _check_exclude_length(item: str, loc: tuple[str | int, ...]) -> None:
    """An excluded id longer than any id can be (the schema's `maxLength`): a 422, as a looked-up id's."""
    if len(item) > MAX_ID_LENGTH:
        raise InvalidRequestError(loc, f"excluded item id is longer than {MAX_ID_LENGTH} characters")


def _json(document: Any, answers: Answers, lookup: Lookup, request_id: str) -> Response:
    response = Response(content=encode(document), media_type="application/json")
    variants = b", ".join(_VARIANT_HEADER[answer.variant] for answer in answers.parts)
    response.raw_headers.extend(_answer_headers(answers.parts[0], lookup, request_id, variants, answers.filled))
    return response


_VARIANT_HEADER = {PRODUCTION: PRODUCTION.encode(), CANARY: CANARY.encode()}


def _answer_headers(
    answer: Answer, lookup: Lookup, request_id: str, variants: bytes | None = None, filled: int = 0
) -> list[tuple[bytes, bytes]]:
    """`X-Batch-Id` (first: the access log reads it from there), data age, `X-Variant` (`variants`, for
    a batch request's arms, else the answer's), request id, `X-Stale` if so, and `X-Filled-From-Fallback`
    when a filtered answer was filled (`filled` items, over all of a batch request's lists)."""
    headers = [
        (b"x-batch-id", b"%d" % answer.batch.batch_id),
        (b"x-data-age-seconds", b"%d" % answer.batch.age_seconds()),
        (b"x-variant", variants or _VARIANT_HEADER[answer.variant]),
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    if lookup.view.problem:
        # The live pointer cannot be read right now: this may no longer be the batch that is live.
        headers.append((b"x-stale", lookup.view.problem.encode()))
    if filled:
        headers.append((b"x-filled-from-fallback", b"%d" % filled))
    return headers


# ---------------------------------------------------------------------------- errors

_STATUS: list[tuple[type[ServingError], int]] = [
    (UnreadableBodyError, 400),
    (NotAuthenticatedError, 401),
    (BodyTimeoutError, 408),
    (BodyTooLargeError, 413),
    (InvalidRequestError, 422),
    (NoLiveBatchError, 503),
    (DatabaseUnavailableError, 503),
    (FeedbackQueueFullError, 503),
]


async def _on_serving_error(request: Request, error: Exception) -> Response:
    return serving_error_response(error)


# Refusals made before the request's body was read (a key is checked first): the rest of the body may still
# be on its way, so the connection cannot carry another request. uvicorn would keep it open waiting for it.
_BODY_UNREAD = (NotAuthenticatedError, BodyTimeoutError, BodyTooLargeError)


def serving_error_response(error: Exception) -> Response:
    status = next((code for kind, code in _STATUS if isinstance(error, kind)), 500)
    headers: dict[str, str] = {}
    if isinstance(error, _BODY_UNREAD):
        headers["Connection"] = "close"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        headers["Retry-After"] = "1"
    elif status == 500:
        logger.error("unmapped %s: %s", type(error).__name__, error)
    if isinstance(error, InvalidRequestError):
        # Same shape as FastAPI's own 422s, so clients parse one format.
        problem: dict[str, Any] = {"type": "value_error", "loc": list(error.loc), "msg": error.message}
        if error.value is not None:
            problem["input"] = error.value
        return _unprocessable([problem])
    reason = error.reason if isinstance(error, ServingError) else "internal_error"
    return JSONResponse({"detail": str(error), "reason": reason}, status_code=status, headers=headers)


async def _on_http_error(request: Request, error: Exception) -> Response:
    """FastAPI's answer to an HTTP error, but for a body its JSON parser raised on with something other than
    a decode error (FastAPI's bare 400 "There was an error parsing the body"): bytes that are not text in
    an encoding JSON allows are a 400 `unreadable_body`, and text the parser gives up on (nested too
    deeply, a number of too many digits) a 422 json_invalid, as the session endpoint and the schema say."""
    assert isinstance(error, HTTPException)
    cause = error.__cause__
    if error.status_code != 400 or cause is None:
        return await http_exception_handler(request, error)
    if isinstance(cause, UnicodeDecodeError):
        return serving_error_response(UnreadableBodyError(UNREADABLE_BODY))
    if isinstance(cause, RecursionError):
        reason = "nested too deeply"
    elif isinstance(cause, ValueError):
        reason = f"a number of more than {sys.get_int_max_str_digits()} digits"
    else:
        reason = "not readable as JSON"
    return _unprocessable(
        [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "input": {}, "ctx": {"error": reason}}]
    )


async def _on_request_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return _unprocessable(error.errors())


def _unprocessable(problems: Sequence[Any]) -> Response:
    """FastAPI's 422 body, with the client's input echoed only as JSON can carry it: a body may hold a lone
    surrogate (``"\\ud800"``), which no response could encode as UTF-8, and Python's parser takes NaN,
    Infinity and 1e400 (infinity), which JSON has no number for; either made FastAPI's own handler
    answer 500. A body not declared JSON is echoed as its bytes, which need not be UTF-8 (FastAPI's encoder
    decodes them strictly, a 500 too): bytes that are not are echoed with U+FFFD in their place."""
    encoded = jsonable_encoder(problems, custom_encoder={bytes: _lenient_text})
    return JSONResponse({"detail": jsonable(encoded, non_finite="text")}, status_code=422)


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# ---------------------------------------------------------------------------- factory

API_PREFIX = "/v1/"


def _admit_body(scope: Scope) -> bool:
    """Whether `RequestSizeLimit` reads a request's body: only the /v1 routes take one, and only from a client
    with a valid key (else `NotAuthenticatedError`), so no one without a key can make a worker hold a body."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not path.removeprefix(root_path).startswith(API_PREFIX):
        return False
    state = scope["app"].state
    if not state.auth_disabled:
        state.api_keys.check_token(bearer_token(scope["headers"]))
    return True


def create_app(settings: ServingSettings | None = None, *, auth_disabled: bool = False) -> FastAPI:
    """The app; with no settings they come from the environment (``uvicorn --factory``)."""
    settings = settings or get_serving_settings()
    check_auth_configured(settings, auth_disabled)
    configure_logging()
    if auth_disabled:
        logger.warning(
            "authentication is disabled (--no-auth): anyone who can reach this port can read recommendations "
            "and write feedback events (POST /v1/events)"
        )
    elif os.environ.get(IGNORED_AUTH_VARIABLE):
        logger.warning(
            "%s is ignored: only the --no-auth flag (`overnight serve`, `python -m serving`) turns authentication off",
            IGNORED_AUTH_VARIABLE,
        )
    if not auth_disabled and (weak := short_keys_warning(settings.api_keys, "OVERNIGHT_API_KEYS")):
        logger.warning("%s", weak)

    view = LiveView()
    metrics = ServingMetrics(view)
    # Both write from their own bounded queue over their own connection, never the lookup pool's.
    prediction_log = PredictionLog(
        settings.database_url,
        sample_rate=settings.prediction_log_sample_rate,
        queue_size=settings.prediction_log_queue_size,
    )
    feedback = FeedbackIntake(
        settings.database_url,
        queue_size=settings.feedback_queue_size,
        max_events_per_request=settings.feedback_max_events,
        max_user_id_length=settings.max_user_id_length,
    )
    metrics.registry.register(WriterCollector([prediction_log.writer, feedback.writer]))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start without depending on Postgres: if the first read of the live pointer fails, /healthz still
        # answers and /readyz says when we can serve.
        pool = create_pool(settings)
        await pool.open(wait=False)
        watcher = LiveWatcher(settings, view)
        watcher.start()
        await watcher.first_read()
        app.state.lookup = lookup = Lookup(settings, view, pool)
        metrics.watch(lookup)
        prediction_log.start()
        feedback.start()
        # What exists now lives as long as the process (modules, the app, its routes and models):
        # keep the collector from walking it on every full collection, a pause that stalls every
        # request in flight.
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        try:
            yield
        finally:
            # Write out what was served and accepted before letting go of anything; both at once, so the
            # drain takes at most one writer's timeout (docker-compose.yml's stop_grace_period allows for it).
            await asyncio.gather(
                feedback.stop(timeout=WRITER_DRAIN_SECONDS), prediction_log.stop(timeout=WRITER_DRAIN_SECONDS)
            )
            await watcher.stop()
            await pool.close()

    app = ServingApp(
        title="overnight",
        summary="Recommendations computed overnight, served in a millisecond.",
        version=overnight_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth_disabled = auth_disabled
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.metrics = metrics
    app.state.prediction_log = prediction_log
    app.state.feedback = feedback
    app.add_middleware(
        RequestSizeLimit,
        max_bytes=settings.max_request_bytes,
        timeout_seconds=settings.body_timeout_seconds,
        admit=_admit_body,
        respond=serving_error_response,
    )
    app.recorder = RequestRecorder(metrics, access_log=settings.access_log, sample=settings.access_log_sample)
    app.add_middleware(MetricsMiddleware, recorder=app.recorder)
    app.add_exception_handler(ServingError, _on_serving_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.router.routes.append(Route(USER_RECOMMENDATIONS_PATH, UserRecommendationsEndpoint(), methods=["GET"]))
    app.router.routes.append(Route(SIMILAR_ITEMS_PATH, SimilarItemsEndpoint(), methods=["GET"]))
    app.include_router(api)
    app.include_router(events_router, dependencies=[Depends(require_api_key)], responses=_ERRORS | BODY_ERRORS)
    app.include_router(ops)

    @functools.cache
    def routes_document() -> dict[str, Any]:  # FastAPI's document of the routes, made once
        return get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=[*documented.routes, *app.routes]
        )

    def openapi() -> dict[str, Any]:
        # The limits are written in at every fetch: the largest k a client may ask for and the attributes a
        # filter may name follow the live rollout, and the feedback timestamps' pattern moves with the clock.
        document = copy.deepcopy(routes_document())
        app.openapi_schema = declare_limits(document, settings, view.rollout, datetime.now(UTC))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# The app without authentication: the factory ``overnight serve --no-auth`` gives its workers.
create_open_app = open_app_factory(create_app)

# Postgres text holds no NUL, so an id with one is refused (422) rather than looked up.
_NO_NUL = "^[^\\x00]+$"


def declare_limits(
    document: dict[str, Any], settings: ServingSettings, rollout: Rollout | None, now: datetime
) -> dict[str, Any]:
    """`document` with the limits this server enforces written in: k up to the live batch's (similar items:
    its similar_k), id lengths, list sizes, the filters the items' attributes allow in every arm of
    `rollout`, feedback timestamps certainly inside the time window at `now` (`event_timestamp_pattern`);
    so a request the schema allows is one the server accepts, whichever arm the user is in. Also says
    which bodies are a 422: malformed JSON is one too."""
    user_id = {"type": "string", "minLength": 1, "maxLength": settings.max_user_id_length, "pattern": _NO_NUL}
    item_id = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": _NO_NUL}
    # Lookups check k against production's for both arms (a canary has at least its k), so the k limits are
    # production's alone: a smaller one would state that the server refuses a k it takes.
    production = None if rollout is None else rollout.production
    k_schema = _k_schema(None if production is None else production.k)
    similar_k_schema = _k_schema(None if production is None else production.similar_k or production.k)
    # A query's exclude is comma-separated ids (`_query_exclude_set` counts them); a body's, one id an element.
    # Either way no excluded id may be longer than an id can be (`_check_exclude_length`).
    query_exclude = {
        "type": "array",
        "items": {"type": "string", "maxLength": MAX_ID_LENGTH, "pattern": "^[^,]*$"},
        "maxItems": settings.max_exclude_items,
    }
    body_exclude = {"items": {"type": "string", "maxLength": MAX_ID_LENGTH}, "maxItems": settings.max_exclude_items}
    filter_schema = _filter_schema(settings, _attributes_of_every_arm(rollout))
    segment = {"type": "string", "maxLength": MAX_ID_LENGTH}
    parameters = {
        "/v1/users/{user_id}/recommendations": {
            "user_id": user_id,
            "k": k_schema,
            "exclude": query_exclude,
            "filter": filter_schema,
            "segment": segment,
            "explain": {"type": "boolean"},
        },
        "/v1/items/{item_id}/similar": {
            "item_id": item_id,
            "k": similar_k_schema,
            "exclude": query_exclude,
            "filter": filter_schema,
            "user_id": user_id,
        },
    }
    for path, schemas_by_name in parameters.items():
        # No content: the HTTP server answers these itself (uvicorn in plain text, granian with no body).
        document["paths"][path]["get"]["responses"] |= {
            str(status): {"description": _LONG_TARGET} for status in (400, 414, 431)
        }
        for parameter in document["paths"][path]["get"]["parameters"]:
            described = {"description": parameter["schema"].get("description", "")}
            parameter["schema"] = schemas_by_name[parameter["name"]] | described
            if parameter["name"] == "exclude":
                parameter |= {"style": "form", "explode": False}  # exclude=a,b,c (repeating it works too)
    schemas = document["components"]["schemas"]
    many = schemas["BatchRecommendationsRequest"]["properties"]
    many["user_ids"] |= {"maxItems": settings.max_batch_users, "items": user_id}
    many["k"]["anyOf"][0] = k_schema
    many["exclude"] |= body_exclude
    many["filter"]["anyOf"][0] = filter_schema
    many["segment"]["anyOf"][0] = segment
    similar = schemas["SimilarItemsRequest"]["properties"]
    similar["item_ids"] |= {"maxItems": settings.max_batch_items, "items": item_id}
    similar["k"]["anyOf"][0] = similar_k_schema
    similar["exclude"] |= body_exclude
    similar["filter"]["anyOf"][0] = filter_schema
    similar["user_id"]["anyOf"][0] = user_id
    session = schemas["SessionRequest"]["properties"]
    session["items"] |= {"maxItems": settings.max_session_items, "items": item_id}
    session["k"]["anyOf"][0] = k_schema
    session["exclude"] |= body_exclude
    session["filter"]["anyOf"][0] = filter_schema
    session["user_id"]["anyOf"][0] = user_id
    session["segment"]["anyOf"][0] = segment
    schemas["FeedbackRequest"]["properties"]["events"]["maxItems"] = settings.feedback_max_events
    schemas["FeedbackEvent"]["properties"]["user_id"]["maxLength"] = settings.max_user_id_length
    schemas["FeedbackEvent"]["properties"]["timestamp"]["pattern"] = event_timestamp_pattern(now)
    for operations in document["paths"].values():
        for operation in operations.values():
            if "requestBody" in operation and "422" in operation["responses"]:
                declared = operation["responses"]["422"]
                declared["description"] = f"{declared['description'].rstrip('.')}. {_MALFORMED_JSON}"
            if "requestBody" in operation:
                operation["requestBody"]["description"] = _body_limit(settings.max_request_bytes)
    return document


def _body_limit(max_bytes: int) -> str:
    """What a request body's description says of the byte limit. The schema cannot state it, and it admits
    bigger bodies: whitespace is unbounded, and at the default limits a batch of 1,000 user ids and 500
    excluded ids, each 256 four-byte characters, is 1.5 MB (the limit 1 MiB): so the limit is said to apply."""
    return (
        f"At most {max_bytes:,} bytes as sent (OVERNIGHT_MAX_REQUEST_BYTES): a larger body is refused with a 413 "
        "(reason body_too_large), even one this schema admits."
    )


# A lookup's query may be longer than an HTTP server reads (500 excluded ids of 256 characters each), and the
# server refuses it before the service sees it: granian (`overnight serve`) with 414 (431 when the request's
# head is several hundred KiB), uvicorn with 400.
_LONG_TARGET = (
    "The path and query as sent (percent-encoded) are longer than the HTTP server takes (64 KiB), which a long "
    "`exclude` list can make them: 414 under granian (the default; 431 for a request head of several hundred "
    "KiB), 400 under `--server uvicorn`, without a body. Send such lists in the body of "
    "POST /v1/recommendations:batch or POST /v1/items:similar."
)

# FastAPI reads the bodies: text that is not JSON is a validation error (the 400 is for bytes that are
# not text in an encoding JSON allows).
_MALFORMED_JSON = (
    "A body that is not well-formed JSON, or that the parser gives up on (nested too deeply, a number of "
    "thousands of digits), is a 422 too (type json_invalid)."
)


def _k_schema(k: int | None) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1} | ({"maximum": k} if k else {})


def _attributes_of_every_arm(rollout: Rollout | None) -> frozenset[str]:
    """The attribute names a filter may use whichever batch answers: those every served batch's items have."""
    if rollout is None:
        return frozenset()
    names = (rollout.production.catalogue or EMPTY_CATALOGUE).attribute_names
    if rollout.canary is not None:
        names &= (rollout.canary.batch.catalogue or EMPTY_CATALOGUE).attribute_names
    return names


def _filter_schema(settings: ServingSettings, attribute_names: AbstractSet[str]) -> dict[str, Any]:
    """The filters naming only `attribute_names`, as a pattern over them (those that are plain words; the
    others are accepted too, but not stated). The empty filter is accepted and filters nothing; without
    attributes it is the only one."""
    names = sorted(name for name in attribute_names if _PLAIN_NAME.fullmatch(name))
    if not names:
        return {"type": "string", "maxLength": 0}
    name = f"(?:{'|'.join(names)})"
    # What Python's str.strip() takes off (the parser strips terms): JSON Schema's \s plus \x1c-\x1f and \x85.
    space = "\\s\\x1c-\\x1f\\x85"
    term = f"(?:-?{name}|{name}:-?[^,{space}-](?:[^,]*[^,{space}])?)"
    # The empty filter filters nothing.
    return {"type": "string", "maxLength": settings.max_filter_length, "pattern": f"^(?:{term}(?:,{term})*)?$"}


_PLAIN_NAME = re.compile(r"\w+", re.ASCII)
