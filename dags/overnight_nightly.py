"""overnight_nightly: ingest → features → candidates → train when due → score shards → monitor → publish → freshness.

Wiring only: every task calls one function of ``jobs`` and passes small values (dates, ids,
counts). Heavy libraries are imported inside the tasks, never when the scheduler parses this file.

Params: ``source`` (default OVERNIGHT_SOURCE; ``{date}`` becomes the logical date), ``shards``
(default: enough for OVERNIGHT_SHARD_USERS users each, at least OVERNIGHT_SCORE_SHARDS),
``publish_live`` (null: live unless a newer date is live; true: make this date's batch live even
in a backfill; false: never) and ``shadow_model`` (default OVERNIGHT_SHADOW_MODEL: a registered
model also scored, after publish, into a shadow batch that is never served; compare with
``overnight shadow-report``; a model trained after the run's date, as in a backfill, skips the shadow)
and ``accept_checks`` (null; a reason: publish the batch though monitoring fails it, as
``overnight publish --accept-checks``, recorded with who triggered the run).

After publish, while a canary of another model runs, ``refresh_canary`` scores the date with the
canary's model too and moves the canary to that batch (same users), unless OVERNIGHT_REFRESH_CANARY
is off. ``online_summary`` stores the day before's online numbers per served model (its feedback's
day of grace ended with the run's date) for the dashboard.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, Param, dag, get_current_context, task
from airflow.sdk.definitions.timetables.interval import CronDataIntervalTimetable

from jobs.monitoring.alerts import task_failed
from jobs.monitoring.history import airflow_task_failed, airflow_task_finished, airflow_task_started
from jobs.settings import get_settings

DEFAULT_ARGS = {
    "owner": "overnight",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": [task_failed, airflow_task_failed],
    # run history (overnight.runs / run_steps): these run in the task's own process
    "on_execute_callback": airflow_task_started,
    "post_execute": airflow_task_finished,
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
        callback=AsyncCallback("jobs.monitoring.alerts.nightly_deadline_missed"),
    )


@dag(
    dag_id="overnight_nightly",
    description="Score every user nightly and publish the batch to Postgres atomically.",
    # Interval semantics: the run that starts at midnight after day D has logical date D, so a night
    # scores the day that has just ended (Airflow 3's "@daily" would label it with the day just begun).
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    # Early on purpose: Airflow creates no task instance for a manual run (UI, REST API) dated before
    # start_date and reports it a success, so every date a user can pick must come after it. With
    # catchup=False the scheduler still starts from the latest night, never from this date.
    start_date=pendulum.datetime(1970, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["overnight"],
    doc_md=__doc__,
    params={
        "source": Param(None, type=["null", "string"], description="File or folder to ingest."),
        "shards": Param(None, type=["null", "integer"], minimum=1, description="Score shards."),
        "publish_live": Param(None, type=["null", "boolean"], description="Force (or forbid) going live."),
        "shadow_model": Param(
            None, type=["null", "string"], description="Registered model to score into a shadow batch too."
        ),
        "accept_checks": Param(
            None,
            type=["null", "string"],
            minLength=1,
            description="Why the date's failing monitoring checks may be accepted: publish the batch anyway.",
        ),
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

        from jobs.steps.ingest import ingest, source_for

        settings = get_settings()
        when = date.fromisoformat(day)
        source = source_for(settings, when, (params or {}).get("source"))
        return asdict(ingest(settings, source, when, settings.source_format))

    @task
    def features(day: str, ingested: dict[str, Any]) -> dict[str, Any]:
        from datetime import date

        from jobs.steps.features import prepare

        return asdict(prepare(get_settings(), date.fromisoformat(day)))

    @task
    def candidates(day: str, ingested: dict[str, Any]) -> dict[str, Any]:
        from datetime import date

        from jobs.steps.candidates import prepare

        return asdict(prepare(get_settings(), date.fromisoformat(day)))

    @task
    def train(day: str, ingested: dict[str, Any]) -> dict[str, Any]:
        import logging
        from datetime import date

        from jobs.steps.train import train_if_due

        result = train_if_due(get_settings(), date.fromisoformat(day))
        # a model the gate kept out is not a failure of the night: say so in the task log and go on
        logging.getLogger("overnight.train").log(
            logging.WARNING if result.trained and not result.promoted else logging.INFO, result.summary()
        )
        return {**asdict(result), "promoted": result.promoted}

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

        from jobs.steps.score import plan_shards

        planned = plan_shards(get_settings(), date.fromisoformat(day), (params or {}).get("shards"))
        return [{"shards": len(planned), "shard": i} for i in planned]

    @task(retries=3)
    def score_shard(day: str, shards: int, shard: int) -> dict[str, Any]:
        from datetime import date

        from jobs.steps.score import score_shard

        return asdict(score_shard(get_settings(), date.fromisoformat(day), shards, shard))

    @task
    def publish(
        day: str, scored: list[dict[str, Any]], params: dict[str, Any] | None = None, dag_run: Any = None
    ) -> dict[str, Any]:
        from datetime import date

        from jobs.steps.publish import publish

        params = params or {}
        user = getattr(dag_run, "triggering_user_name", None) or "unknown user"
        published = publish(
            get_settings(),
            date.fromisoformat(day),
            params.get("publish_live"),
            accept_checks=params.get("accept_checks"),
            accepted_by=f"{user} (airflow dag run {dag_run.run_id})" if dag_run else None,
        )
        return asdict(published)

    @task
    def monitor_input(day: str, scored: list[dict[str, Any]]) -> dict[str, Any]:
        from datetime import date

        from jobs.monitoring.drift import monitor_input

        return asdict(monitor_input(get_settings(), date.fromisoformat(day)))

    @task(retries=1)
    def check_freshness(published: dict[str, Any]) -> dict[str, Any]:
        from jobs.monitoring.freshness import check_freshness

        return asdict(check_freshness(get_settings()))

    @task
    def shadow(day: str, published: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        from datetime import date

        from jobs.rollouts.shadow import nightly_shadow

        settings = get_settings()
        model_id = (params or {}).get("shadow_model") or settings.shadow_model
        if not model_id:
            return {"shadow": None, "reason": "no shadow_model param and OVERNIGHT_SHADOW_MODEL is unset"}
        # Nested: a batch_id or model_id at the top would be noted as the night's in the run history.
        return {"shadow": asdict(nightly_shadow(settings, date.fromisoformat(day), model_id))}

    @task
    def refresh_canary(day: str, published: dict[str, Any]) -> dict[str, Any]:
        from datetime import date

        from jobs.rollouts.canary import refresh_canary

        settings = get_settings()
        if not settings.refresh_canary:
            return {"canary": None, "reason": "OVERNIGHT_REFRESH_CANARY is off"}
        # Nested, as the shadow's: its batch and model are not the night's.
        return {"canary": asdict(refresh_canary(settings, date.fromisoformat(day)))}

    @task
    def online_tables(day: str) -> dict[str, Any]:
        from jobs.rollouts.online import maintain_tables

        return maintain_tables(get_settings())

    @task
    def online_summary(day: str) -> dict[str, Any]:
        from datetime import date

        from jobs.rollouts.online import record_previous_day

        return record_previous_day(get_settings(), date.fromisoformat(day))

    day = logical_date()
    online_tables(day)
    online_summary(day)
    ingested = ingest(day)
    model = train(day, ingested)
    shards = plan_shards(day, features(day, ingested), candidates(day, ingested), model)
    scored = score_shard.partial(day=day).expand_kwargs(shards)
    published = publish(day, scored)
    monitor_input(day, scored) >> published  # publish's monitoring gate reads what this measured
    check_freshness(published)
    shadow(day, published)
    refresh_canary(day, published)


overnight_nightly()
