"""The HTTP app: thin routes over `serving.lookup`, injected dependencies, and the one map of errors to statuses.

`uvicorn --factory serving.app:create_app` builds one app per worker from the environment.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from serving.auth import ApiKeys, bearer_scheme
from serving.errors import (
    DatabaseUnavailableError,
    InvalidRequestError,
    NoLiveBatchError,
    NotAuthenticatedError,
    ServingError,
)
from serving.live import LiveBatch, LiveView, LiveWatcher
from serving.lookup import PRODUCTION_VARIANT, Lookup, UserRecs, create_pool
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.models import (
    BatchRecommendations,
    BatchRecommendationsRequest,
    ErrorMessage,
    Health,
    Readiness,
    Recommendations,
    RecommendedItem,
)
from serving.settings import ServingSettings, check_auth_configured, get_serving_settings

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- dependencies
# All async: FastAPI runs a plain `def` dependency in a worker thread, which costs more than the lookup.


async def _settings(request: Request) -> ServingSettings:
    settings: ServingSettings = request.app.state.settings
    return settings


async def _lookup(request: Request) -> Lookup:
    lookup: Lookup = request.app.state.lookup
    return lookup


async def _metrics(request: Request) -> ServingMetrics:
    metrics: ServingMetrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[ServingSettings, Depends(_settings)]
LookupDep = Annotated[Lookup, Depends(_lookup)]
MetricsDep = Annotated[ServingMetrics, Depends(_metrics)]


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    if not settings.auth_disabled:
        keys: ApiKeys = request.app.state.api_keys
        keys.check(credentials)


# ---------------------------------------------------------------------------- routes

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or unknown API key."},
    503: {"model": ErrorMessage, "description": "No batch is live yet, or the database did not answer."},
}

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
ops = APIRouter()


@api.get("/users/{user_id:path}/recommendations", summary="Recommendations for one user")
async def user_recommendations(
    user_id: Annotated[str, Path(description="Any text; ids containing `/` may be sent percent-encoded.")],
    lookup: LookupDep,
    metrics: MetricsDep,
    response: Response,
    k: Annotated[
        int | None, Query(ge=1, description="Items to return, 1..k of the live batch; default 10 (or k if smaller).")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        Query(description="Item ids to leave out: comma-separated, and/or the parameter repeated."),
    ] = None,
) -> Recommendations:
    batch, recs = await lookup.recommend(user_id, k, _exclude_set(exclude))
    _stamp(response, batch)
    metrics.count_lookups([recs])
    return _recommendations(batch, recs)


@api.post("/recommendations:batch", summary="Recommendations for many users, from one batch")
async def batch_recommendations(
    body: BatchRecommendationsRequest, lookup: LookupDep, metrics: MetricsDep, response: Response
) -> BatchRecommendations:
    batch, results = await lookup.recommend_many(body.user_ids, body.k, _exclude_set(body.exclude))
    _stamp(response, batch)
    metrics.count_lookups(results)
    return BatchRecommendations(results=[_recommendations(batch, recs) for recs in results])


@ops.get("/healthz", summary="The process is alive")
async def healthz() -> Health:
    return Health()


@ops.get("/readyz", summary="Ready: a batch is loaded and the database answers", responses={503: _ERRORS[503]})
async def readyz(lookup: LookupDep) -> Readiness:
    batch = lookup.live()
    await lookup.ping()
    return Readiness(
        batch_id=batch.batch_id,
        model_id=batch.model_id,
        generated_at=batch.generated_at,
        data_age_seconds=batch.age_seconds(),
    )


@ops.get("/metrics", include_in_schema=False)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=metrics.content_type)


def _exclude_set(values: list[str] | None) -> frozenset[str]:
    if not values:
        return frozenset()
    return frozenset(item.strip() for value in values for item in value.split(",") if item.strip())


def _stamp(response: Response, batch: LiveBatch) -> None:
    response.headers["X-Batch-Id"] = str(batch.batch_id)
    response.headers["X-Data-Age-Seconds"] = str(batch.age_seconds())


def _recommendations(batch: LiveBatch, recs: UserRecs) -> Recommendations:
    return Recommendations(
        user_id=recs.user_id,
        items=[
            RecommendedItem(item_id=item_id, score=score)
            for item_id, score in zip(recs.item_ids, recs.scores, strict=False)
        ],
        source=recs.source,
        model_id=batch.model_id,
        batch_id=batch.batch_id,
        generated_at=batch.generated_at,
        variant=PRODUCTION_VARIANT,
    )


# ---------------------------------------------------------------------------- errors

_STATUS: list[tuple[type[ServingError], int]] = [
    (NotAuthenticatedError, 401),
    (InvalidRequestError, 422),
    (NoLiveBatchError, 503),
    (DatabaseUnavailableError, 503),
]


async def _on_serving_error(request: Request, error: Exception) -> Response:
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
        return JSONResponse({"detail": [problem]}, status_code=status)
    return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- factory


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    """The app; with no settings they come from the environment (``uvicorn --factory``)."""
    settings = settings or get_serving_settings()
    check_auth_configured(settings)
    _configure_logging()
    if settings.auth_disabled:
        logger.warning("authentication is disabled: every client can read recommendations")

    view = LiveView()
    metrics = ServingMetrics(view)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start without waiting for Postgres: /healthz answers at once and /readyz says when we can serve.
        pool = create_pool(settings)
        await pool.open(wait=False)
        watcher = LiveWatcher(settings, view)
        watcher.start()
        app.state.lookup = Lookup(settings, view, pool)
        try:
            yield
        finally:
            await watcher.stop()
            await pool.close()

    app = FastAPI(
        title="overnight",
        summary="Recommendations computed overnight, served in a millisecond.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = ApiKeys(settings.api_keys)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(ServingError, _on_serving_error)
    app.include_router(api)
    app.include_router(ops)
    return app


def _configure_logging() -> None:
    # uvicorn configures only its own loggers; give ours a handler unless the host (CLI) already did.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _version() -> str:
    try:
        return metadata.version("overnight")
    except metadata.PackageNotFoundError:
        return "0+unknown"
