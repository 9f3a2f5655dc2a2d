"""Alerts: always a log line, and a JSON POST to OVERNIGHT_ALERT_WEBHOOK_URL if set; each sent once per
fingerprint. Monitoring's problems, failed Airflow tasks and a missed nightly deadline come here.
"""

# Airflow imports this module when it parses the DAGs, so it imports nothing heavy at module level.
import asyncio
import http.client
import json
import logging
import urllib.error
import urllib.request
from datetime import date
from typing import TYPE_CHECKING, Any

from common.text import jsonable, some

if TYPE_CHECKING:
    from jobs.monitoring.checks import Check
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
    logger.error("ALERT %s: %s", title, json.dumps(jsonable(details), default=str))
    url = settings.alert_webhook_url
    if not url:
        return
    # "text" is what Slack, Mattermost and most chat webhooks display
    text = f"{title}: {details['error']}" if details.get("error") else title
    body = json.dumps(jsonable({"title": title, "text": text, **details}), default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except (OSError, ValueError, http.client.HTTPException) as error:
        # not the error's text: it may hold the webhook's URL, which is a secret
        logger.error("could not deliver the alert to the webhook: %s", _delivery_failure(error))


def _delivery_failure(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, OSError):
        return f"{type(error.reason).__name__} ({error.reason.strerror or 'no detail'})"
    return type(error).__name__


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


def dashboard_link(settings: "Settings", logical_date: date) -> str | None:
    if not settings.dashboard_url:
        return None
    return f"{settings.dashboard_url.rstrip('/')}?date={logical_date.isoformat()}"


def fingerprint(logical_date: date, stage: str, statistic: str, level: str) -> str:
    return f"monitor:{logical_date.isoformat()}:{stage}:{statistic}:{level}"


def alert_problems(
    settings: "Settings", logical_date: date, problems: list["Check"], run_id: int | None, what: str
) -> list[str]:
    """One alert per problem statistic (its subjects listed together), at most ``alert_max_per_run``;
    the rest go in one summary. Each is sent once per date: re-runs and retries do not repeat it.
    Returns the fingerprints used."""
    grouped: dict[tuple[str, str, str], list[Check]] = {}
    for check in problems:
        grouped.setdefault((check.stage, check.statistic, check.level), []).append(check)
    link = dashboard_link(settings, logical_date)
    sent: list[str] = []
    from jobs.monitoring.checks import LEVELS

    groups = sorted(grouped.items(), key=lambda item: (-LEVELS.index(item[0][2]), item[0]))
    keep = settings.alert_max_per_run - 1 if len(groups) > settings.alert_max_per_run else len(groups)
    for (stage, statistic, level), checks in groups[:keep]:
        worst = checks[:10]
        key = fingerprint(logical_date, stage, statistic, level)
        send_alert(
            f"overnight {logical_date}: {what}: {statistic} {level}",
            {
                "text": some([c.message for c in checks], 10, sentences=True),
                "level": level,
                "stage": stage,
                "statistic": statistic,
                "logical_date": logical_date.isoformat(),
                "run_id": run_id,
                "values": {c.subject or statistic: c.value for c in worst},
                "threshold": checks[0].fail_at if level == "fail" else checks[0].warn_at,
                "dashboard": link,
            },
            fingerprint=key,
            settings=settings,
        )
        sent.append(key)
    rest = groups[keep:]
    if rest:
        key = fingerprint(logical_date, "all", "more", "summary")
        send_alert(
            f"overnight {logical_date}: {what}: {len(rest)} more problems",
            {
                "text": "; ".join(f"{stat} {level}" for (_, stat, level), _ in rest),
                "logical_date": logical_date.isoformat(),
                "run_id": run_id,
                "dashboard": link,
            },
            fingerprint=key,
            settings=settings,
        )
        sent.append(key)
    return sent


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
        # a problem monitoring already alerted about (a blocked publish, also as the cause the DAG
        # fails the task with) is not announced twice
        fingerprint=getattr(exception, "alert_fingerprint", None)
        or getattr(getattr(exception, "__cause__", None), "alert_fingerprint", None),
    )


async def nightly_deadline_missed(**kwargs: Any) -> None:
    """Deadline Alert callback (runs in the triggerer) when the nightly run is late. Only a scheduled
    night can be late: a backfill or manual run of an older date is past its night's deadline from the
    start."""
    context = kwargs.get("context") or {}
    dag_run = context.get("dag_run") if isinstance(context, dict) else None
    dag_run = dag_run if isinstance(dag_run, dict) else {}  # the run as the REST API shows it
    if dag_run.get("run_type", "scheduled") != "scheduled":
        logger.info("the deadline of a %s run passed: only a scheduled night can be late", dag_run["run_type"])
        return
    await asyncio.to_thread(
        send_alert,
        "overnight_nightly missed its completion deadline",
        {"dag_id": "overnight_nightly", "run_id": dag_run.get("dag_run_id"), **kwargs.get("details", {})},
    )
