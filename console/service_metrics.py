"""The dashboard's service panel: the lookup service's traffic, latency and errors, read from its ``/metrics`` over
HTTP (the console shares no process and no code with the service), each read kept as a snapshot for a history of rates.
"""

import asyncio
import logging
import math
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from common.text import first_line

logger = logging.getLogger(__name__)

SNAPSHOTS_KEPT = 240
ROUTES_SHOWN = 8
MAX_METRICS_BYTES = 8 * 1024 * 1024
# The service's address is an internal one: read it directly, whatever HTTP(S)_PROXY says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Scrape:
    """One read of one service URL: its Prometheus text, or why there is none."""

    url: str
    text: str | None = None
    problem: str | None = None


def _read_metrics(url: str, timeout: float) -> Scrape:
    metrics_url = f"{url}/metrics"
    try:
        with _OPENER.open(metrics_url, timeout=timeout) as response:
            body = response.read(MAX_METRICS_BYTES + 1)
    except urllib.error.HTTPError as error:
        return Scrape(url, problem=f"{metrics_url} answered HTTP {error.code}")
    except urllib.error.URLError as error:
        return Scrape(url, problem=f"{metrics_url} cannot be reached ({first_line(error.reason)})")
    except TimeoutError:
        return Scrape(url, problem=f"{metrics_url} did not answer within {timeout:g} s")
    except OSError as error:
        return Scrape(url, problem=f"{metrics_url} cannot be read ({first_line(error)})")
    if len(body) > MAX_METRICS_BYTES:
        return Scrape(url, problem=f"{metrics_url} answered more than {MAX_METRICS_BYTES} bytes")
    return Scrape(url, text=body.decode("utf-8", "replace"))


async def scrape(urls: Sequence[str], timeout: float) -> list[Scrape]:
    """Every URL's ``/metrics``, read at once in threads (urllib blocks)."""
    return list(await asyncio.gather(*(asyncio.to_thread(_read_metrics, url, timeout) for url in urls)))


@dataclass
class _Counts:
    """What the panel needs from one read of ``/metrics`` (or the sum of several)."""

    requests: dict[str, float] = field(default_factory=dict)
    api_requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    lookups: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None

    def add(self, other: "_Counts") -> None:
        for mine, theirs in ((self.requests, other.requests), (self.lookups, other.lookups)):
            for name, value in theirs.items():
                mine[name] = mine.get(name, 0.0) + value
        for bound, value in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + value
        self.api_requests += other.api_requests
        self.errors += other.errors


def _parse(text: str) -> _Counts:
    counts = _Counts()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "overnight_http_requests_total":
                route = sample.labels.get("route", "")
                counts.requests[route] = counts.requests.get(route, 0.0) + sample.value
                if route.startswith("/v1"):
                    counts.api_requests += sample.value
                    if sample.labels.get("status", "").startswith("5"):
                        counts.errors += sample.value
            elif sample.name == "overnight_http_request_duration_seconds_bucket" and sample.labels.get(
                "route", ""
            ).startswith("/v1"):
                bound = float(sample.labels["le"])
                counts.buckets[bound] = counts.buckets.get(bound, 0.0) + sample.value
            elif sample.name == "overnight_lookups_total":
                source = sample.labels.get("source", "")
                counts.lookups[source] = counts.lookups.get(source, 0.0) + sample.value
            elif sample.name == "process_start_time_seconds":
                counts.started_at = sample.value
    return counts


def service_figures(
    history: deque[dict[str, Any]], scrapes: Sequence[Scrape], now: float | None = None
) -> dict[str, Any]:
    """Traffic, latency and errors summed over the URLs that answered; the new snapshot goes into `history`.

    ``{"available": False, "reason": ...}`` when none answered (or none gave Prometheus text): the rest
    of the dashboard does not depend on it.
    """
    counts = _Counts()
    answered: list[tuple[str, float | None]] = []
    problems: list[str] = []
    for one in scrapes:
        if one.text is None:
            problems.append(one.problem or f"{one.url}/metrics gave no answer")
            continue
        try:
            read = _parse(one.text)
        except (ValueError, KeyError, IndexError) as error:  # what the parser and a bucket without `le` raise
            problems.append(f"{one.url}/metrics is not Prometheus text ({first_line(error)})")
            continue
        counts.add(read)
        answered.append((one.url, read.started_at))
    if not answered:
        reason = "; ".join(problems) or "no lookup service URL is configured (OVERNIGHT_CONSOLE_SERVICE_URL)"
        return {"available": False, "reason": reason}

    at = time.time() if now is None else now
    history.append(
        {
            "at": at,
            "processes": tuple(answered),
            "api_requests": counts.api_requests,
            "errors": counts.errors,
            "buckets": dict(counts.buckets),
        }
    )
    total_lookups = sum(counts.lookups.values())
    figures: dict[str, Any] = {
        "available": True,
        "api_requests": counts.api_requests,
        "api_errors": counts.errors,
        "error_share": counts.errors / counts.api_requests if counts.api_requests else 0.0,
        "p50_ms": _quantile(counts.buckets, 0.5) * 1000 if counts.api_requests else None,
        "p99_ms": _quantile(counts.buckets, 0.99) * 1000 if counts.api_requests else None,
        "fallback_share": counts.lookups.get("fallback", 0.0) / total_lookups if total_lookups else None,
        "requests_by_route": dict(sorted(counts.requests.items(), key=lambda item: -item[1])[:ROUTES_SHOWN]),
        "series": _rates(history),
        "note": "read from " + ", ".join(f"{url}/metrics" for url, _ in answered) + ": each read answers for "
        "the worker that took it (with several workers or replicas behind one address, one of them)",
    }
    if problems:
        figures["unreachable"] = problems
    return figures


# A rate is only taken between two snapshots of the same processes (``process_start_time_seconds``): behind a proxy
# or with several workers, consecutive reads may come from different workers, and a restarted worker starts its
# counters again.
def _rates(history: deque[dict[str, Any]]) -> list[dict[str, Any]]:
    """A point per snapshot: the rates since the previous snapshot of the same processes."""
    series = []
    previous: dict[tuple[tuple[str, float | None], ...], dict[str, Any]] = {}
    for after in history:
        before = previous.get(after["processes"])
        previous[after["processes"]] = after
        if before is None:
            continue
        elapsed = after["at"] - before["at"]
        count = after["api_requests"] - before["api_requests"]
        if elapsed <= 0 or count < 0:  # a counter went back: a process restarted
            continue
        delta = {b: after["buckets"].get(b, 0.0) - before["buckets"].get(b, 0.0) for b in after["buckets"]}
        series.append(
            {
                "at": datetime.fromtimestamp(after["at"]).astimezone(),
                "requests_per_second": count / elapsed,
                "error_share": (after["errors"] - before["errors"]) / count if count else 0.0,
                "p50_ms": _quantile(delta, 0.5) * 1000 if count else None,
                "p99_ms": _quantile(delta, 0.99) * 1000 if count else None,
            }
        )
    return series


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
