"""Prometheus metrics of one app instance (docs/serving.md#metrics), and the sampled structured access log. Each app
has its own registry, so several apps in one process (tests) do not collide; each worker reports its own numbers.
"""

import logging
import math
import random
import time
from collections.abc import Iterator

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.web import UNMATCHED_ROUTE, bounded, loggable_query, logged_method
from serving.live import LiveView
from serving.lookup import SOURCES, Answer, Lookup
from serving.variants import CANARY, PRODUCTION

access_logger = logging.getLogger("overnight.access")
# The query parameters the lookup service reads (serving.app's lookups: `_lookup_query`): the access log
# writes their values; every other parameter's is REDACTED, since a credential may come under any name.
LOGGED_QUERY_PARAMETERS = frozenset({"k", "exclude", "filter", "segment", "user_id", "explain"})

# Lookups take about a millisecond; the upper buckets catch database stalls up to the timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, view: LiveView) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "overnight_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "overnight_http_request_duration_seconds",
            "Time from request to the end of the response, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lookups = Counter(
            "overnight_lookups",
            "Lists answered, by source (personalized, fallback, similar, session): a falling personalized share "
            "means coverage dropped.",
            ["source"],
            registry=self.registry,
        )
        self._by_source = {source: self.lookups.labels(source) for source in SOURCES}
        answers = Counter(
            "overnight_variant_lookups",
            "Users answered, by variant (production, canary).",
            ["variant"],
            registry=self.registry,
        )
        self._by_variant = {variant: answers.labels(variant) for variant in (PRODUCTION, CANARY)}
        Gauge(
            "overnight_canary_batch_id",
            "Batch this process serves as the canary (0 when no canary runs).",
            registry=self.registry,
        ).set_function(
            lambda: (
                0.0
                if view.rollout is None or view.rollout.canary is None
                else float(view.rollout.canary.batch.batch_id)
            )
        )
        Gauge(
            "overnight_canary_traffic",
            "Share of users routed to the canary (0 when no canary runs).",
            registry=self.registry,
        ).set_function(
            lambda: 0.0 if view.rollout is None or view.rollout.canary is None else view.rollout.canary.split.traffic
        )
        Gauge(
            "overnight_live_batch_id",
            "Batch this process serves (0 when none is loaded).",
            registry=self.registry,
        ).set_function(lambda: 0.0 if view.batch is None else float(view.batch.batch_id))
        # +Inf when nothing is loaded, so a freshness alert on this gauge fires rather than going quiet.
        Gauge(
            "overnight_live_batch_age_seconds",
            "Seconds since the served batch was generated (+Inf when none is loaded).",
            registry=self.registry,
        ).set_function(lambda: _age_seconds(view))
        self._lookup_collector = _LookupCollector()
        self.registry.register(self._lookup_collector)

    def watch(self, lookup: Lookup) -> None:
        """Report `lookup`'s cache, database trips and pool from now on."""
        self._lookup_collector.lookup = lookup

    def count_answer(self, answer: Answer) -> None:
        self._by_variant[answer.variant].inc(len(answer.results))
        by_source = self._by_source
        for recs in answer.results:
            by_source[recs.source].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LookupCollector(Collector):
    """Read at scrape time from the lookup's plain counters, so the hot path pays one integer add."""

    lookup: Lookup | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lookup = self.lookup
        if lookup is None:
            return
        caches = lookup.caches.values()
        hit_count = sum(cache.hits for cache in caches)
        miss_count = sum(cache.misses for cache in caches)
        hits = CounterMetricFamily(
            "overnight_cache_lookups",
            "Lookup cache reads (users' and items' lists) by result (hit ratio = hit / all).",
            labels=["result"],
        )
        hits.add_metric(["hit"], hit_count)
        hits.add_metric(["miss"], miss_count)
        yield hits
        yield GaugeMetricFamily(
            "overnight_cache_entries",
            "Users' and items' lists held in the lookup caches.",
            value=sum(len(cache) for cache in caches),
        )
        ratio = hit_count / (hit_count + miss_count) if hit_count + miss_count else math.nan
        yield GaugeMetricFamily("overnight_cache_hit_ratio", "Cache hits over all cache reads so far.", value=ratio)
        yield CounterMetricFamily(
            "overnight_db_trips",
            "Database round trips of lookups (each answers every user waiting).",
            value=lookup.trips,
        )
        yield CounterMetricFamily(
            "overnight_db_trip_users", "Users asked for over all database trips.", value=lookup.trip_users
        )
        yield CounterMetricFamily(
            "overnight_db_dead_connection_retries",
            "Lookups asked again because their pooled connection had died while idle (a Postgres restart).",
            value=lookup.dead_connection_retries,
        )
        stats = lookup.pool.get_stats()
        pool = GaugeMetricFamily("overnight_db_pool_connections", "Lookup pool connections by state.", labels=["state"])
        size = stats.get("pool_size", 0)
        available = stats.get("pool_available", 0)
        pool.add_metric(["open"], size)
        pool.add_metric(["idle"], available)
        pool.add_metric(["in_use"], size - available)
        yield pool
        yield GaugeMetricFamily(
            "overnight_db_pool_max", "Most connections the lookup pool may open.", value=lookup.pool.max_size
        )
        yield GaugeMetricFamily(
            "overnight_db_pool_waiting",
            "Lookups waiting for a pool connection.",
            value=stats.get("requests_waiting", 0),
        )


def _age_seconds(view: LiveView) -> float:
    batch = view.batch
    return math.inf if batch is None else time.time() - batch.generated_at.timestamp()


class RequestRecorder:
    """Counts and times every HTTP request by its route template (never the raw path: user ids would make
    a series per user), and writes the access log: one JSON line per request, a sampled share of
    successes and every error."""

    def __init__(self, metrics: ServingMetrics, access_log: bool = False, sample: float = 1.0) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.sample = sample
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def record(self, scope: Scope, template: str, status: int, elapsed: float, batch_id: bytes) -> None:
        method = logged_method(scope["method"])
        key = (template, method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self.metrics.requests.labels(template, method, str(status)),
                self.metrics.latency.labels(template, method),
            )
        series[0].inc()
        series[1].observe(elapsed)
        if self.access_log and (status >= 400 or random.random() < self.sample):
            _log_access(scope, method, template, status, elapsed, batch_id)


class MetricsMiddleware:
    """Records every request that goes through the app's routes with a `RequestRecorder`."""

    def __init__(self, app: ASGIApp, recorder: RequestRecorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        batch_id = b""
        access_log = self.recorder.access_log

        async def send_and_record_status(message: Message) -> None:
            nonlocal status, batch_id
            if message["type"] == "http.response.start":
                status = message["status"]
                if access_log:
                    batch_id = next((v for k, v in message.get("headers", ()) if k.lower() == b"x-batch-id"), b"")
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.recorder.record(scope, template, status, time.perf_counter() - start, batch_id)


def _log_access(scope: Scope, method: str, route: str, status: int, elapsed: float, batch_id: bytes) -> None:
    client = scope.get("client")
    entry = {
        "ts": time.time(),
        "method": method,
        "path": bounded(scope["path"]),
        "query": bounded(loggable_query(scope.get("query_string", b""), LOGGED_QUERY_PARAMETERS)),
        "route": route,
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
        "batch_id": int(batch_id) if batch_id.isdigit() else None,
        "client": client[0] if client else None,
    }
    access_logger.info(orjson.dumps(entry).decode())
