"""overnight_freshness: every hour, check what is actually served; fail (and so alert) when stale.

The task fails with the reason (age past OVERNIGHT_MAX_AGE_HOURS, coverage below OVERNIGHT_MIN_COVERAGE, a missing
or short table), and the failure callback posts it to OVERNIGHT_ALERT_WEBHOOK_URL when that is set."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from airflow.sdk import dag, task

from jobs.monitoring.alerts import task_failed


@dag(
    dag_id="overnight_freshness",
    description="Fail loudly when the live batch is stale or incomplete.",
    schedule="@hourly",
    # No start_date, for the same reason as overnight_nightly's: a manual run dated before it would get no
    # task and report a success without checking anything. catchup=False: from the coming hour.
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "overnight",
        "retries": 1,
        "retry_delay": timedelta(minutes=1),
        "on_failure_callback": task_failed,
    },
    tags=["overnight"],
    doc_md=__doc__,
)
def overnight_freshness() -> None:
    @task
    def check_freshness() -> dict[str, Any]:
        from jobs.monitoring.freshness import check_freshness
        from jobs.settings import get_settings

        return asdict(check_freshness(get_settings()))

    check_freshness()


overnight_freshness()
