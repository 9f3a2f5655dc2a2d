"""The HTTP app: thin routes over `serving.lookup`, injected dependencies, and the one map of errors to statuses.

`uvicorn --factory serving.app:create_app` builds one app per worker from the environment.
"""

import asyncio
import gc
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import TypeAdapter, ValidationError
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from serving.auth import ApiKeys, bearer_scheme, bearer_token
from serving.errors import (
    DatabaseUnavailableError,
    InvalidRequestError,
    NoLiveBatchError,
    NotAuthenticatedError,
    ServingError,
)
from serving.feedback import FeedbackIntake
from serving.feedback import router as events_router
from serving.limits import RequestSizeLimit
from serving.live import LiveView, LiveWatcher
from serving.lookup import Answer, Answers, Lookup, create_pool, encode, render
from serving.metrics import MetricsMiddleware, RequestRecorder, ServingMetrics
from serving.prediction_log import PredictionLog, WriterCollector, request_id_for
from serving.schemas import (
    BatchRecommendations,
    BatchRecommendationsRequest,
    ErrorMessage,
    Health,
    Readiness,
    Recommendations,
)
from serving.settings import ENV_PREFIX, ServingSettings, check_auth_configured, get_serving_settings
from serving.variants import CANARY, PRODUCTION

logger = logging.getLogger(__name__)

WRITER_DRAIN_SECONDS = 10.0  # at shutdown, for the queued answers and events to be written
# Older releases turned auth off from this variable; now only the --no-auth flag does (see create_open_app).
IGNORED_AUTH_VARIABLE = f"{ENV_PREFIX}AUTH_DISABLED"

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
    400: {"model": ErrorMessage, "description": "The request body could not be read as JSON text (UTF-8)."},
    413: {"model": ErrorMessage, "description": "The request body is larger than OVERNIGHT_MAX_REQUEST_BYTES."},
}


class _AnyText(PathConvertor):
    """Starlette's `path`, but newlines too: a user id is any text, and control characters must not make it 404."""

    regex = "(?s:.*)"


register_url_convertor("text", _AnyText())
USER_RECOMMENDATIONS_PATH = "/v1/users/{user_id:text}/recommendations"

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
) -> None:
    """The schema of `UserRecommendationsEndpoint`: the parameters and rules it enforces itself."""


class UserRecommendationsEndpoint:
    """GET one user's list as a routed endpoint: for what `ServingApp` does not answer before the stack (HEAD)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, body = await _user_recommendations(scope, scope["path_params"]["user_id"])
        await _send_json(send, headers, body)


async def _user_recommendations(scope: Scope, user_id: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The one-user lookup: headers and JSON body, or a `ServingError`.

    FastAPI's per-request parameter and dependency solving cost about three times the rest of a cached
    lookup, so this checks the key and parses its two query parameters itself, with the rules and error
    shapes `user_recommendations` declares.
    """
    state = scope["app"].state
    if not state.auth_disabled:
        state.api_keys.check_token(bearer_token(scope["headers"]))
    k, exclude = _lookup_query(scope["query_string"])
    lookup: Lookup = state.lookup
    answer = await lookup.recommend(user_id, k, exclude)
    state.metrics.count_answer(answer)
    request_id = request_id_for(_header(scope["headers"], b"x-request-id"))
    if scope["method"] != "HEAD":  # a HEAD shows the user nothing, so nothing was served to log
        state.prediction_log.record_answer(request_id, answer.batch.batch_id, answer.variant, answer.results)
    return _answer_headers(answer, lookup, request_id), encode(render(answer, answer.results[0]))


async def _send_json(send: Send, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    start_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": 200, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


_ONE_USER_PREFIX, _, _ONE_USER_SUFFIX = USER_RECOMMENDATIONS_PATH.partition("{user_id:text}")


def _one_user_id(path: str) -> str | None:
    """The user id of a one-user lookup path, as the route's pattern would match it; None for other paths."""
    if (
        path.startswith(_ONE_USER_PREFIX)
        and path.endswith(_ONE_USER_SUFFIX)
        and len(path) >= len(_ONE_USER_PREFIX) + len(_ONE_USER_SUFFIX)
    ):
        return path[len(_ONE_USER_PREFIX) : len(path) - len(_ONE_USER_SUFFIX)]
    return None


class ServingApp(FastAPI):
    """FastAPI, with the one-user lookup answered before its middleware stack and router.

    On a cached lookup, Starlette's middleware layers and route matching cost about as much as the
    lookup itself: without them the service answered 15-45% more requests/s. So a GET of the one-user
    path is served here, recorded by the same `RequestRecorder` under the same route template, with
    the same error responses (a `ServingError` as `_on_serving_error` maps it, anything else a plain
    500 that goes on to the server's log, as Starlette's `ServerErrorMiddleware` does). Every other
    request goes through the stack, where the same lookup is also routed (HEAD, a mounted root path).
    """

    recorder: RequestRecorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            user_id = _one_user_id(scope["path"])
            if user_id is not None:
                scope["app"] = self
                await self._one_user(scope, receive, send, user_id)
                return
        await super().__call__(scope, receive, send)

    async def _one_user(self, scope: Scope, receive: Receive, send: Send, user_id: str) -> None:
        start = time.perf_counter()
        status = 500
        batch_id = b""
        try:
            try:
                headers, body = await _user_recommendations(scope, user_id)
            except ServingError as error:
                response = serving_error_response(error)
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
            self.recorder.record(scope, USER_RECOMMENDATIONS_PATH, status, time.perf_counter() - start, batch_id)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


_INT = TypeAdapter(int)


def _lookup_query(query_string: bytes) -> tuple[int | None, frozenset[str]]:
    if not query_string:
        return None, frozenset()
    k_text: str | None = None
    excluded: list[str] = []
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name == "k":
            k_text = value  # the last one wins, as in FastAPI
        elif name == "exclude":
            excluded.append(value)
    k = None
    if k_text is not None:
        try:
            k = _INT.validate_python(k_text)
        except ValidationError as error:
            raise InvalidRequestError(("query", "k"), error.errors()[0]["msg"], k_text) from None
        if k < 1:
            raise InvalidRequestError(("query", "k"), "Input should be greater than or equal to 1", k_text)
    return k, _exclude_set(excluded)


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
    answers = await lookup.recommend_many(body.user_ids, body.k, _exclude_set(body.exclude))
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


def _exclude_set(values: list[str] | None) -> frozenset[str]:
    if not values:
        return frozenset()
    return frozenset(item.strip() for value in values for item in value.split(",") if item.strip())


def _json(document: Any, answers: Answers, lookup: Lookup, request_id: str) -> Response:
    response = Response(content=encode(document), media_type="application/json")
    variants = b", ".join(_VARIANT_HEADER[answer.variant] for answer in answers.parts)
    response.raw_headers.extend(_answer_headers(answers.parts[0], lookup, request_id, variants))
    return response


_VARIANT_HEADER = {PRODUCTION: PRODUCTION.encode(), CANARY: CANARY.encode()}


def _answer_headers(
    answer: Answer, lookup: Lookup, request_id: str, variants: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """`X-Batch-Id` (first: the access log reads it from there), data age, `X-Variant` (`variants`, for
    a batch request's arms, else the answer's), request id, and `X-Stale` if so."""
    headers = [
        (b"x-batch-id", b"%d" % answer.batch.batch_id),
        (b"x-data-age-seconds", b"%d" % answer.batch.age_seconds()),
        (b"x-variant", variants or _VARIANT_HEADER[answer.variant]),
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    if lookup.view.problem:
        # The live pointer cannot be read right now: this may no longer be the batch that is live.
        headers.append((b"x-stale", lookup.view.problem.encode()))
    return headers


# ---------------------------------------------------------------------------- errors

_STATUS: list[tuple[type[ServingError], int]] = [
    (NotAuthenticatedError, 401),
    (InvalidRequestError, 422),
    (NoLiveBatchError, 503),
    (DatabaseUnavailableError, 503),
]


async def _on_serving_error(request: Request, error: Exception) -> Response:
    return serving_error_response(error)


def serving_error_response(error: Exception) -> Response:
    status = next((code for kind, code in _STATUS if isinstance(error, kind)), 500)
    headers: dict[str, str] = {}
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


async def _on_request_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return _unprocessable(error.errors())


def _unprocessable(problems: Sequence[Any]) -> Response:
    """FastAPI's 422 body, with the client's input echoed only as JSON can carry it: a body may hold a lone
    surrogate (``"\\ud800"``), which no response could encode as UTF-8, and Python's parser takes NaN,
    Infinity and 1e400 (infinity), which JSON has no number for; either made FastAPI's own handler
    answer 500."""
    return JSONResponse({"detail": _json_safe(jsonable_encoder(problems))}, status_code=422)


def _json_safe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode(errors="backslashreplace").decode()
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    return value


# ---------------------------------------------------------------------------- factory


def create_open_app() -> FastAPI:
    """The app without authentication: the factory ``overnight serve --no-auth`` gives its workers."""
    return create_app(auth_disabled=True)


def create_app(settings: ServingSettings | None = None, *, auth_disabled: bool = False) -> FastAPI:
    """The app; with no settings they come from the environment (``uvicorn --factory``)."""
    settings = settings or get_serving_settings()
    check_auth_configured(settings, auth_disabled)
    _configure_logging()
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
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth_disabled = auth_disabled
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.metrics = metrics
    app.state.prediction_log = prediction_log
    app.state.feedback = feedback
    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    app.recorder = RequestRecorder(metrics, access_log=settings.access_log, sample=settings.access_log_sample)
    app.add_middleware(MetricsMiddleware, recorder=app.recorder)
    app.add_exception_handler(ServingError, _on_serving_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation_error)
    app.router.routes.append(Route(USER_RECOMMENDATIONS_PATH, UserRecommendationsEndpoint(), methods=["GET"]))
    app.include_router(api)
    app.include_router(events_router, dependencies=[Depends(require_api_key)], responses=_ERRORS | BODY_ERRORS)
    app.include_router(ops)

    documents: dict[int | None, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        # One document per k of the live batch: the largest k a client may ask for is the live batch's.
        k = None if view.batch is None else view.batch.k
        if k not in documents:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=[*documented.routes, *app.routes]
            )
            documents[k] = declare_limits(document, settings, k)
        app.openapi_schema = documents[k]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# Postgres text holds no NUL, so an id with one is refused (422) rather than looked up.
_NO_NUL = "^[^\\x00]+$"


def declare_limits(document: dict[str, Any], settings: ServingSettings, k: int | None) -> dict[str, Any]:
    """`document` with the limits this server enforces written in: k up to the live batch's, id lengths,
    list sizes; so a request the schema allows is one the server accepts (bar the feedback time window,
    which JSON Schema cannot state: it is in the description)."""
    user_id = {"type": "string", "minLength": 1, "maxLength": settings.max_user_id_length, "pattern": _NO_NUL}
    k_schema: dict[str, Any] = {"type": "integer", "minimum": 1} | ({"maximum": k} if k else {})
    # Items may also be sent comma-separated in one value; the schema states the one-per-value form.
    exclude = {
        "type": "array",
        "items": {"type": "string", "pattern": "^[^,]*$"},
        "maxItems": settings.max_exclude_items,
    }
    lookup = document["paths"]["/v1/users/{user_id}/recommendations"]["get"]
    for parameter in lookup["parameters"]:
        described = {"description": parameter["schema"].get("description", "")}
        parameter["schema"] = {"user_id": user_id, "k": k_schema, "exclude": exclude}[parameter["name"]] | described
    schemas = document["components"]["schemas"]
    many = schemas["BatchRecommendationsRequest"]["properties"]
    many["user_ids"] |= {"maxItems": settings.max_batch_users, "items": user_id}
    many["k"]["anyOf"][0] = k_schema
    many["exclude"] |= {key: value for key, value in exclude.items() if key != "type"}
    schemas["FeedbackRequest"]["properties"]["events"]["maxItems"] = settings.feedback_max_events
    schemas["FeedbackEvent"]["properties"]["user_id"]["maxLength"] = settings.max_user_id_length
    return document


def _configure_logging() -> None:
    # uvicorn configures only its own loggers; give ours a handler unless the host (CLI) already did.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _version() -> str:
    try:
        return metadata.version("overnight")
    except metadata.PackageNotFoundError:
        return "0+unknown"
