"""The monitoring dashboard in a real headless Chromium, served by `overnight console` over three nights,
beside the lookup service (`overnight serve`) whose /metrics its service panel reads.

Signs in through the login form, waits for every panel to be drawn, fails on any browser console error,
and saves a screenshot (dashboard.png) in the test's output folder. Needs Debian's chromium and
chromium-driver (`make browser`); in CI (CI set) their absence is a failure, not a skip.
"""

import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from jobs import nightly
from jobs.rollouts import canary, online
from jobs.settings import Settings
from tests.support.commands import overnight_env, running_service
from tests.support.console import console_process
from tests.support.data import SAMPLE_DATE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "dashboard-test-key"
PANELS = ("live", "runs", "models", "checks", "online", "drift", "input", "output", "scores", "service")


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        message = "needs Debian's chromium and chromium-driver: run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,2400"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_draws_every_panel_without_console_errors(
    browser: Any, database_url: str, sample_source: Path, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, retrain_days=7, num_boost_round=30)
    for night in (2, 1, 0):
        nightly.run(nightly.night_of(settings, SAMPLE_DATE - timedelta(days=night), sample_source))
    # The night before's batch, served again to a tenth of users.
    with psycopg.connect(database_url) as conn:
        (canary_batch,) = conn.execute(
            "SELECT batch_id FROM overnight.batches WHERE logical_date = %s", (SAMPLE_DATE - timedelta(days=1),)
        ).fetchone()  # type: ignore[misc]
    canary.start_canary(settings, canary_batch, 0.1)

    env = overnight_env(database_url, settings.data_dir, OVERNIGHT_API_KEYS=KEY)
    with running_service(env) as service, console_process({**env, "OVERNIGHT_CONSOLE_SERVICE_URL": service}) as base:
        bearer = {"Authorization": f"Bearer {KEY}"}
        for user in ("1", "2", "nobody"):
            assert httpx.get(f"{service}/v1/users/{user}/recommendations", headers=bearer).status_code == 200
        # A click on user 1's first item, and the day's online numbers recorded as the nightly run does.
        answer = httpx.get(f"{service}/v1/users/1/recommendations", headers={**bearer, "X-Request-Id": "dash-1"}).json()
        click = {"user_id": "1", "item_id": answer["items"][0]["item_id"], "type": "click", "request_id": "dash-1"}
        events = {"events": [{**click, "timestamp": datetime.now(UTC).isoformat()}]}
        assert httpx.post(f"{service}/v1/events", json=events, headers=bearer).status_code == 202
        written = "SELECT (SELECT count(*) FROM overnight.served_predictions), count(*) FROM overnight.feedback_events"
        deadline = time.monotonic() + 10
        with psycopg.connect(database_url, autocommit=True) as conn:
            while conn.execute(written).fetchone() != (4, 1):
                assert time.monotonic() < deadline, "the service did not write its logs within 10 s"
                time.sleep(0.1)
            served_models = [
                model_id
                for (model_id,) in conn.execute(
                    "SELECT DISTINCT b.model_id FROM overnight.served_predictions JOIN overnight.batches AS b"
                    " USING (batch_id) ORDER BY 1"
                )
            ]
            clicked = conn.execute(
                "SELECT model_id, status, (metrics->>'ndcg@10')::float FROM overnight.model_versions"
                " WHERE model_id = %s",
                (answer["model_id"],),
            ).fetchone()
        today = datetime.now(UTC).date()
        recorded = online.record_day(settings, today)
        assert recorded == {"day": today.isoformat(), "models": served_models, "complete": False}

        # the data needs a key
        assert httpx.get(f"{base}/dashboard/api/overview").status_code == 401
        overview = httpx.get(f"{base}/dashboard/api/overview", headers=bearer).json()
        assert len(overview["runs"]) == 3 and all(r["status"] == "success" for r in overview["runs"])
        assert (overview["canary"]["batch_id"], overview["canary"]["traffic"]) == (canary_batch, 0.1)
        online_rows = {row["model_id"]: row for row in overview["online"]}
        assert sorted(online_rows) == served_models and {row["day"] for row in online_rows.values()} == {str(today)}
        served = online_rows[answer["model_id"]]  # the clicked answer's model: held-out NDCG@10 beside its clicks
        assert clicked is not None and (served["model_id"], served["status"]) == clicked[:2]
        assert served["ndcg"] == pytest.approx(clicked[2]) and served["complete"] is False
        assert (served["summary"]["impressions"], served["summary"]["clicks"]) == (1, 1)
        # the service panel: the lookups above, read from the service's /metrics
        assert overview["service"]["available"] and overview["service"]["api_requests"] >= 4
        earlier = (SAMPLE_DATE - timedelta(days=1)).isoformat()
        focused = httpx.get(f"{base}/dashboard/api/overview", params={"date": earlier}, headers=bearer).json()
        assert focused["focus_date"] == earlier and focused["output"]["logical_date"] == earlier
        assert httpx.get(f"{base}/dashboard", params={"key": KEY}).status_code == 401  # keys never in URLs
        signed_in = httpx.post(f"{base}/dashboard/login", data={"key": KEY, "next": "date=2026-11-20"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard?date=2026-11-20"
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and KEY not in cookie
        assert httpx.get(f"{base}/dashboard/static/../settings.py").status_code == 404
        assert httpx.get(f"{service}/dashboard").status_code == 404  # not the lookup service's any more

        # What the runs table must say in words: a run whose process died in train, and the newest night's
        # batch published with a failing check accepted (as `overnight publish --accept-checks` records it).
        with psycopg.connect(database_url, autocommit=True) as conn:
            (dead_run,) = conn.execute(
                "INSERT INTO overnight.runs (logical_date, trigger, status, abandoned_at)"
                " VALUES (%s, 'cli', 'abandoned', now()) RETURNING run_id",
                (SAMPLE_DATE,),
            ).fetchone()  # type: ignore[misc]
            conn.execute(
                "INSERT INTO overnight.run_steps (run_id, step, status, abandoned_at)"
                " VALUES (%s, 'train', 'abandoned', now())",
                (dead_run,),
            )
            (newest_run, newest_batch) = conn.execute(
                "SELECT run_id, batch_id FROM overnight.runs WHERE batch_id IS NOT NULL ORDER BY run_id DESC LIMIT 1"
            ).fetchone()  # type: ignore[misc]
            conn.execute(
                "INSERT INTO overnight.monitor_acceptances"
                " (logical_date, batch_id, run_id, checks, reason, accepted_by)"
                " VALUES (%s, %s, %s, %s, 'a holiday: low volume expected', 'ops-alice')",
                (
                    SAMPLE_DATE,
                    newest_batch,
                    newest_run,
                    json.dumps([{"stage": "input", "statistic": "volume_change", "subject": "interactions"}]),
                ),
            )

        browser.get(f"{base}/dashboard")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # The sign-in replaces the page, so an element found a moment ago can go stale while waiting.
        WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true"
        )
        states = {panel: browser.find_element(By.ID, f"panel-{panel}").get_attribute("data-state") for panel in PANELS}
        canvases = {
            panel: len(browser.find_elements(By.CSS_SELECTOR, f"#panel-{panel} canvas"))
            for panel in PANELS
            if panel not in ("live", "checks", "online")
        }
        live_cards = browser.find_element(By.ID, "live-cards").text
        runs_table = browser.find_element(By.ID, "table-runs").text
        online_table = browser.find_element(By.ID, "table-online").text
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    print(f"screenshot: {tmp_path / 'dashboard.png'}")
    assert states == dict.fromkeys(PANELS, "ready")
    assert f"#{canary_batch}" in live_cards and "10.0% of users" in live_cards
    assert f"#{dead_run}" in runs_table and "abandoned in train: the process recording it died (noticed" in runs_table
    assert f"batch #{newest_batch} published with failing checks accepted (volume_change of interactions)" in runs_table
    assert "by ops-alice" in runs_table and "“a holiday: low volume expected”" in runs_table
    assert all(model in online_table for model in served_models)
    assert "CTR [95%]" in online_table and f"{today} (partial)" in online_table
    assert all(count >= 1 for count in canvases.values()), canvases
    assert errors == []
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
