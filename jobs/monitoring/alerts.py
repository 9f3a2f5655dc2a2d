"""Alerts raised from Airflow callbacks: always a log line, and a JSON POST to OVERNIGHT_ALERT_WEBHOOK_URL if set.

Airflow imports this module when it parses the DAGs, so it imports nothing heavy at module level.
"""

import asyncio
import json
import logging
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.settings import Settings

logger = logging.getLogger(__name__)


def send_alert(
    title: str, details: dict[str, Any], *, fingerprint: str | None = None, settings: "Settings | None" = None
) -> None:
    """Log and POST one alert. With a ``fingerprint``, an alert already sent under it is only
    counted (``overnight.alerts``), not sent again: retries and re-runs do not flood anyone."""
    from jobs.settings import get_settings

    settings = settings or get_settings()
    if fingerprint is not None and not _first_time(settings, fingerprint, title, details):
        logger.warning("alert %s was already sent (%s); not sending it again", title, fingerprint)
        return
    logger.error("ALERT %s: %s", title, json.dumps(details, default=str))
    url = settings.alert_webhook_url
    if not url:
        return
    # "text" is what Slack, Mattermost and most chat webhooks display
    text = f"{title}: {details['error']}" if details.get("error") else title
    body = json.dumps({"title": title, "text": text, **details}, default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as error:
        logger.error("could not deliver the alert to the webhook: %s", error)


def _first_time(settings: "Settings", fingerprint: str, title: str, details: dict[str, Any]) -> bool:
    """Record the alert; False when its fingerprint was seen before. If Postgres cannot say, send it."""

    import sql
    from jobs.database import connect
    from jobs.jsonable import jsonb

    try:
        with connect(settings) as conn:
            row = conn.execute(
                sql.query("record_alert"),
                (fingerprint, title, jsonb(details)),
            ).fetchone()
    except Exception as error:
        logger.warning("could not check whether alert %s was sent before: %s", fingerprint, error)
        return True
    return bool(row and row[0])


def task_failed(context: Any) -> None:
    """``on_failure_callback`` of the overnight DAGs: one message per failed task."""
    ti = context["task_instance"]
    exception = context.get("exception")
    send_alert(
        f"{ti.dag_id}.{ti.task_id} failed",
        {
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": ti.run_id,
            "try_number": ti.try_number,
            "error": str(exception or "unknown"),
        },
        # a problem monitoring already alerted about (a blocked publish) is not announced twice
        fingerprint=getattr(exception, "alert_fingerprint", None),
    )


async def nightly_deadline_missed(**kwargs: Any) -> None:
    """Deadline Alert callback (runs in the triggerer) when the nightly run is late."""
    context = kwargs.get("context") or {}
    dag_run = context.get("dag_run") if isinstance(context, dict) else None
    await asyncio.to_thread(
        send_alert,
        "overnight_nightly missed its completion deadline",
        {"dag_id": "overnight_nightly", "run_id": getattr(dag_run, "run_id", None), **kwargs.get("details", {})},
    )
