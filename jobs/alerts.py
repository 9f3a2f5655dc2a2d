"""Alerts raised from Airflow callbacks: always a log line, and a JSON POST to OVERNIGHT_ALERT_WEBHOOK_URL if set.

Airflow imports this module when it parses the DAGs, so it imports nothing heavy at module level.
"""

import asyncio
import json
import logging
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)


def send_alert(title: str, details: dict[str, Any]) -> None:
    from jobs.settings import get_settings

    logger.error("ALERT %s: %s", title, json.dumps(details, default=str))
    url = get_settings().alert_webhook_url
    if not url:
        return
    body = json.dumps({"title": title, **details}, default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError as error:
        logger.error("could not deliver the alert to the webhook: %s", error)


def task_failed(context: Any) -> None:
    """``on_failure_callback`` of the overnight DAGs: one message per failed task."""
    ti = context["task_instance"]
    send_alert(
        f"{ti.dag_id}.{ti.task_id} failed",
        {
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": ti.run_id,
            "try_number": ti.try_number,
            "error": str(context.get("exception") or "unknown"),
        },
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
