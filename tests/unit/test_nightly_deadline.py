"""The nightly run's completion deadline: counted from the night's day, so only a scheduled night is late."""

import asyncio

import pytest

from jobs.monitoring import alerts
from tests.support.webhooks import recording_webhook


@pytest.mark.parametrize(("run_type", "alerted"), [("scheduled", True), ("backfill", False), ("manual", False)])
def test_only_a_scheduled_night_can_miss_its_completion_deadline(
    monkeypatch: pytest.MonkeyPatch, run_type: str, alerted: bool
) -> None:
    """The deadline is counted from the night's day (its logical date), so a backfill or manual run of an
    older date is past it from the start: only a scheduled night is late."""
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", "postgresql://nowhere:1/x")
    with recording_webhook() as webhook:
        monkeypatch.setenv("OVERNIGHT_ALERT_WEBHOOK_URL", webhook.url)
        context = {"dag_run": {"dag_run_id": f"{run_type}__1998-04-22", "run_type": run_type}}
        asyncio.run(alerts.nightly_deadline_missed(context=context))
    assert [body["run_id"] for body in webhook.received] == ([f"{run_type}__1998-04-22"] if alerted else [])
