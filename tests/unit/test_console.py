"""The console's settings (which DSN and keys it uses) and its service panel's figures from /metrics text."""

from collections import deque
from typing import Any

import pytest

from console.service_metrics import Scrape, service_figures
from console.settings import DEFAULT_SERVICE_URL, ConsoleConfigError, get_console_settings

SERVICE = "http://lookup:8000"
ONE_USER = "/v1/users/{user_id:text}/recommendations"


@pytest.fixture(autouse=True)
def no_overnight_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "CONSOLE_DATABASE_URL", "API_KEYS", "DASHBOARD_KEYS", "CONSOLE_SERVICE_URL"):
        monkeypatch.delenv(f"OVERNIGHT_{name}", raising=False)


def test_the_console_reads_with_its_own_dsn_and_falls_back_to_the_batch_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", "postgresql://owner@db/overnight")
    assert get_console_settings().dsn == "postgresql://owner@db/overnight"
    monkeypatch.setenv("OVERNIGHT_CONSOLE_DATABASE_URL", "postgresql://console@db/overnight")
    assert get_console_settings().dsn == "postgresql://console@db/overnight"
    monkeypatch.delenv("OVERNIGHT_DATABASE_URL")
    monkeypatch.setenv("OVERNIGHT_CONSOLE_DATABASE_URL", "")
    with pytest.raises(ConsoleConfigError, match="neither OVERNIGHT_CONSOLE_DATABASE_URL nor OVERNIGHT_DATABASE_URL"):
        get_console_settings()


def test_dashboard_keys_fall_back_to_the_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", "postgresql://db/overnight")
    monkeypatch.setenv("OVERNIGHT_API_KEYS", "a, b")
    monkeypatch.setenv("OVERNIGHT_DASHBOARD_KEYS", "")  # compose's ${OVERNIGHT_DASHBOARD_KEYS:-}
    assert get_console_settings().keys == ("a", "b")
    monkeypatch.setenv("OVERNIGHT_DASHBOARD_KEYS", "ops")
    assert get_console_settings().keys == ("ops",)


def test_service_urls_are_http_and_may_be_several(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", "postgresql://db/overnight")
    assert get_console_settings().console_service_url == (DEFAULT_SERVICE_URL,)
    monkeypatch.setenv("OVERNIGHT_CONSOLE_SERVICE_URL", "http://a:8000/, https://b")
    assert get_console_settings().console_service_url == ("http://a:8000", "https://b")
    monkeypatch.setenv("OVERNIGHT_CONSOLE_SERVICE_URL", "file:///etc/passwd")
    with pytest.raises(ConsoleConfigError, match="OVERNIGHT_CONSOLE_SERVICE_URL: 'file:///etc/passwd' is not an http"):
        get_console_settings()


def metrics_text(lookups: int, errors: int = 0, fallback: int = 0, started: float = 1000.0) -> str:
    """What the lookup service's /metrics says after `lookups` one-user lookups, each within 1 ms."""
    return "\n".join(
        [
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {started}",
            "# TYPE overnight_http_requests counter",
            f'overnight_http_requests_total{{method="GET",route="{ONE_USER}",status="200"}} {lookups - errors}',
            f'overnight_http_requests_total{{method="GET",route="{ONE_USER}",status="503"}} {errors}',
            'overnight_http_requests_total{method="GET",route="/metrics",status="200"} 3',
            "# TYPE overnight_http_request_duration_seconds histogram",
            f'overnight_http_request_duration_seconds_bucket{{le="0.001",method="GET",route="{ONE_USER}"}} {lookups}',
            f'overnight_http_request_duration_seconds_bucket{{le="+Inf",method="GET",route="{ONE_USER}"}} {lookups}',
            f'overnight_http_request_duration_seconds_count{{method="GET",route="{ONE_USER}"}} {lookups}',
            f'overnight_http_request_duration_seconds_sum{{method="GET",route="{ONE_USER}"}} {lookups * 0.0005}',
            "# TYPE overnight_lookups counter",
            f'overnight_lookups_total{{source="personalized"}} {lookups - fallback}',
            f'overnight_lookups_total{{source="fallback"}} {fallback}',
            "",
        ]
    )


def test_figures_and_rates_come_from_the_services_metrics() -> None:
    history: deque[dict[str, Any]] = deque(maxlen=10)
    first = service_figures(history, [Scrape(SERVICE, metrics_text(100, errors=1, fallback=25))], now=0.0)
    second = service_figures(history, [Scrape(SERVICE, metrics_text(300, errors=1, fallback=25))], now=10.0)
    assert first["available"] and first["api_requests"] == 100 and first["api_errors"] == 1
    assert first["error_share"] == pytest.approx(0.01) and first["fallback_share"] == pytest.approx(0.25)
    assert 0 < first["p50_ms"] <= 1.0
    assert first["requests_by_route"] == {ONE_USER: 100, "/metrics": 3}
    assert first["series"] == []
    (point,) = second["series"]
    assert point["requests_per_second"] == pytest.approx(20.0) and point["error_share"] == 0.0


def test_a_restarted_or_another_worker_gives_no_rate_across_it() -> None:
    history: deque[dict[str, Any]] = deque(maxlen=10)
    service_figures(history, [Scrape(SERVICE, metrics_text(500, started=1000.0))], now=0.0)
    service_figures(history, [Scrape(SERVICE, metrics_text(10, started=2000.0))], now=10.0)  # another worker
    third = service_figures(history, [Scrape(SERVICE, metrics_text(700, started=1000.0))], now=20.0)
    (point,) = third["series"]  # the first worker again, over the 20 s since its last read
    assert point["requests_per_second"] == pytest.approx(10.0)


def test_several_urls_are_summed_and_an_unreachable_one_is_named() -> None:
    history: deque[dict[str, Any]] = deque(maxlen=10)
    figures = service_figures(
        history,
        [
            Scrape("http://a:8000", metrics_text(10)),
            Scrape("http://b:8000", metrics_text(30, started=5.0)),
            Scrape("http://c:8000", problem="http://c:8000/metrics cannot be reached (connection refused)"),
        ],
    )
    assert figures["api_requests"] == 40
    assert figures["unreachable"] == ["http://c:8000/metrics cannot be reached (connection refused)"]


def test_no_answer_says_why_and_keeps_no_snapshot() -> None:
    history: deque[dict[str, Any]] = deque(maxlen=10)
    refused = service_figures(history, [Scrape(SERVICE, problem=f"{SERVICE}/metrics cannot be reached (refused)")])
    assert refused == {"available": False, "reason": f"{SERVICE}/metrics cannot be reached (refused)"}
    garbage = service_figures(history, [Scrape(SERVICE, "<html>not metrics</html>")])
    assert garbage["available"] is False and "is not Prometheus text" in garbage["reason"]
    assert not history
