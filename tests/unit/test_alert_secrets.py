"""A chat webhook's URL is a secret: a bad one is refused without being repeated, and an alert that
cannot be delivered is logged without it."""

import logging

import pytest
from pydantic import ValidationError

from jobs.monitoring.alerts import send_alert
from jobs.settings import Settings, get_settings

SECRET = "T0000/B0000/XXXXSECRETXXXX"


@pytest.mark.parametrize(
    "url",
    [
        f"hooks.slack.com/services/{SECRET}",
        f"https://hooks.slack.com:port/{SECRET}",
        f"file:///{SECRET}",
        f"https:// /{SECRET}",
    ],
)
def test_a_malformed_webhook_url_is_refused_without_repeating_it(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("OVERNIGHT_ALERT_WEBHOOK_URL", url)
    with pytest.raises(ValidationError) as refused:
        get_settings()
    # pydantic's own text (what a traceback, an Airflow task log or a DAG import error shows) has no input
    assert "alert_webhook_url" in str(refused.value) and SECRET not in str(refused.value)


def test_an_alert_that_cannot_be_delivered_is_logged_without_the_url(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(alert_webhook_url=f"http://127.0.0.1:1/{SECRET}", database_url="postgresql://nowhere:1/x")
    with caplog.at_level(logging.ERROR, logger="jobs.monitoring.alerts"):
        send_alert("a night failed", {"error": "boom"}, settings=settings)
    failures = [r.getMessage() for r in caplog.records if "could not deliver" in r.getMessage()]
    assert failures == ["could not deliver the alert to the webhook: ConnectionRefusedError (Connection refused)"]
    assert not any(SECRET in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("weights", ['{"click": "nan"}', '{"conversion": -3}', '{"click": 1e9}'])
def test_feedback_weights_that_ingest_would_set_aside_are_refused(
    monkeypatch: pytest.MonkeyPatch, weights: str
) -> None:
    monkeypatch.setenv("OVERNIGHT_FEEDBACK_WEIGHTS", weights)
    with pytest.raises(ValidationError, match=r"OVERNIGHT_FEEDBACK_WEIGHTS: feedback type '\w+' weighs"):
        get_settings()
