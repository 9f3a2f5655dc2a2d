"""overnight_nightly: ingest → features → candidates → train when due → score shards → publish → freshness.

Wiring only: every task calls one function of ``jobs`` and passes small values (dates, ids,
counts). Heavy libraries are imported inside the tasks, never when the scheduler parses this file.

Params: ``source`` (default OVERNIGHT_SOURCE; ``{date}`` becomes the logical date), ``shards``
(default OVERNIGHT_SCORE_SHARDS) and ``publish_live`` (null: live unless a newer date is live;
true: make this date's batch live even in a backfill; false: never).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, Param, dag, get_current_context, task

from jobs.alerts import task_failed
from jobs.settings import get_settings

DEFAULT_ARGS = {
    "owner": "overnight",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": task_failed,
}


def _logical_date() -> str:
    """The run's logical date; a manual run without one stands for the day it runs on."""
    context = get_current_context()
    when = context.get("logical_date") or context["dag_run"].run_after
    return when.date().isoformat()


def _completion_deadline() -> DeadlineAlert | None:
    hours = get_settings().nightly_deadline_hours
    if not hours:
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(hours=hours),
        callback=AsyncCallback("jobs.alerts.nightly_deadline_missed"),
    )


@dag(
    dag_id="overnight_nightly",
    description="Score every user nightly and publish the batch to Postgres atomically.",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["overnight"],
    doc_md=__doc__,
    params={
        "source": Param(None, type=["null", "string"], description="File or folder to ingest."),
        "shards": Param(None, type=["null", "integer"], minimum=1, description="Score shards."),
        "publish_live": Param(None, type=["null", "boolean"], description="Force (or forbid) going live."),
    },
    deadline=_completion_deadline(),
)
def overnight_nightly() -> None:
    @task
    def logical_date() -> str:
        return _logical_date()

    @task
    def ingest(day: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        from datetime import date

        from jobs.ingest import ingest, source_for

        settings = get_settings()
        when = date.fromisoformat(day)
        source = source_for(settings, when, (params or {}).get("source"))
        return asdict(ingest(settings, source, when, settings.source_format))

    @task
    def features(day: str, ingested: dict[str, Any]) -> dict[str, Any]:
        from datetime import date

        from jobs.features import prepare

        return asdict(prepare(get_settings(), date.fromisoformat(day)))

    @task
    def candidates(day: str, ingested: dict[str, Any]) -> dict[str, Any]:
        from datetime import date

        from jobs.candidates import prepare

        return asdict(prepare(get_settings(), date.fromisoformat(day)))

    @task
    def train(day: str, ingested: dict[str, Any]) -> dict[str, Any]:
        from datetime import date

        from jobs.train import train_if_due

        return asdict(train_if_due(get_settings(), date.fromisoformat(day)))

    @task
    def plan_shards(
        day: str,
        item_tables: dict[str, Any],
        candidate_tables: dict[str, Any],
        model: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, int]]:
        # the three inputs are only there to wait for their tasks
        from datetime import date

        from jobs.score import plan_shards

        settings = get_settings()
        shards = (params or {}).get("shards") or settings.score_shards
        return [{"shards": shards, "shard": i} for i in plan_shards(settings, date.fromisoformat(day), shards)]

    @task(retries=3)
    def score_shard(day: str, shards: int, shard: int) -> dict[str, Any]:
        from datetime import date

        from jobs.score import score_shard

        return asdict(score_shard(get_settings(), date.fromisoformat(day), shards, shard))

    @task
    def publish(day: str, scored: list[dict[str, Any]], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from datetime import date

        from jobs.publish import publish

        return asdict(publish(get_settings(), date.fromisoformat(day), (params or {}).get("publish_live")))

    @task(retries=1)
    def check_freshness(published: dict[str, Any]) -> dict[str, Any]:
        from jobs.freshness import check_freshness

        return asdict(check_freshness(get_settings()))

    day = logical_date()
    ingested = ingest(day)
    model = train(day, ingested)
    shards = plan_shards(day, features(day, ingested), candidates(day, ingested), model)
    scored = score_shard.partial(day=day).expand_kwargs(shards)
    check_freshness(publish(day, scored))


overnight_nightly()
