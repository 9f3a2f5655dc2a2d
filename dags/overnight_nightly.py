"""overnight_nightly: the tasks of `jobs.nightly.STEPS`, the same steps `overnight run` runs in order.

Each task runs one step and returns its outcome; `watcher` fails the run when a step failed or was blocked. The
params (``source``, ``source_format``, ``shards``, ``publish_live``, ``shadow_model``, ``accept_checks``) are
described in docs/airflow.md#params.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from typing import Any

from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, Param, dag, get_current_context, task
from airflow.sdk.definitions.timetables.interval import CronDataIntervalTimetable
from airflow.sdk.exceptions import AirflowFailException
from airflow.task.trigger_rule import TriggerRule

# Wiring only: jobs.nightly loads no data library, so heavy libraries are imported inside the tasks, never when the
# scheduler parses this file.
from jobs import nightly
from jobs.errors import worth_retrying
from jobs.monitoring.alerts import task_failed
from jobs.monitoring.history import (
    airflow_dag_run_failed,
    airflow_dag_run_succeeded,
    airflow_task_failed,
    airflow_task_finished,
    airflow_task_retrying,
    airflow_task_started,
)
from jobs.settings import get_settings

WATCHER = "watcher"  # fails the dag run when any step failed

DEFAULT_ARGS = {
    "owner": "overnight",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": [task_failed, airflow_task_failed],
    "on_retry_callback": airflow_task_retrying,
}


def _night(params: dict[str, Any] | None) -> nightly.Night:
    """The night of the running task: its logical date (a manual run without one stands for the day it
    runs on) and the run's params."""
    context = get_current_context()
    dag_run = context["dag_run"]
    when = context.get("logical_date") or dag_run.run_after
    params = params or {}
    user = getattr(dag_run, "triggering_user_name", None) or "unknown user"
    return nightly.Night(
        settings=get_settings(),
        logical_date=when.date(),
        source=params.get("source"),
        source_format=params.get("source_format"),
        shards=params.get("shards"),
        publish_live=params.get("publish_live"),
        shadow_model=params.get("shadow_model"),
        accept_checks=params.get("accept_checks"),
        accepted_by=f"{user} (airflow dag run {dag_run.run_id})",
    )


@contextmanager
def _retried_only_if_worth_it() -> Iterator[None]:
    """An error that a retry cannot cure (bad input, a date in the future, a publish monitoring held
    back) fails the task at once with its message, rather than after minutes of retries."""
    try:
        yield
    except Exception as error:
        if worth_retrying(error):
            raise
        raise AirflowFailException(str(error)) from error


def run_step(step: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    with _retried_only_if_worth_it():
        return asdict(nightly.run_step(step, _night(params)).outcome())


def plan_shards(step: str, params: dict[str, Any] | None = None) -> list[dict[str, int]]:
    with _retried_only_if_worth_it():
        planned = nightly.plan_shards(step, _night(params))
    return [{"shards": len(planned), "shard": shard} for shard in planned]


def run_shard(step: str, shards: int, shard: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
    with _retried_only_if_worth_it():
        return asdict(nightly.run_shard(step, _night(params), shards, shard).outcome())


def fail_the_run() -> None:
    raise AirflowFailException("a step of this night failed or was blocked: see that task's log")


def _completion_deadline() -> DeadlineAlert | None:
    """The night must be done ``OVERNIGHT_NIGHTLY_DEADLINE_HOURS`` after its day ends (its logical date is
    the day's start). Not from DAGRUN_QUEUED_AT: clearing a run with a deadline from when it was queued is
    a 500 in Airflow 3.3 (apache/airflow#70368), so no one could retry a failed night from the UI."""
    hours = get_settings().nightly_deadline_hours
    if not hours:
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=timedelta(days=1, hours=hours),
        callback=AsyncCallback("jobs.monitoring.alerts.nightly_deadline_missed"),
    )


@dag(
    dag_id="overnight_nightly",
    description="Score every user nightly and publish the batch to Postgres atomically.",
    # Interval semantics: the run that starts at midnight after day D has logical date D, so a night
    # scores the day that has just ended (Airflow 3's "@daily" would label it with the day just begun).
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    # No start_date on purpose: Airflow creates no task instance for a manual run (UI, REST API) dated
    # before it and reports that run a success, so any start_date leaves dates that silently do nothing.
    # Without one (Airflow 3) every date gets its tasks; catchup=False: the scheduler starts from the
    # latest night.
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["overnight"],
    doc_md=__doc__,
    params={
        "source": Param(None, type=["null", "string"], description="File or folder to ingest."),
        "source_format": Param(
            None,
            type=["null", "string"],
            enum=[None, "auto", "movielens", "parquet", "csv"],
            description="How to read the source (auto detects from the path).",
        ),
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
    # the run history's run ends with the dag run, also when a clear re-ran only some of its tasks
    on_success_callback=airflow_dag_run_succeeded,
    on_failure_callback=airflow_dag_run_failed,
)
def overnight_nightly() -> None:
    first: dict[str, Any] = {}  # each step's first task (a sharded step's plan), what its upstream waits on
    last: dict[str, Any] = {}  # each step's last task, what waits on it
    for step in nightly.STEPS:
        recorded: dict[str, Any] = {
            "task_id": step.task_id,
            # run history (overnight.runs / run_steps): these run in the task's own process
            "on_execute_callback": airflow_task_started,
            "post_execute": partial(airflow_task_finished, ends_run=step.name == nightly.LAST_STEP),
        }
        if step.retries is not None:
            recorded["retries"] = step.retries
        if step.even_after_failure:
            recorded["trigger_rule"] = TriggerRule.ALL_DONE
        if step.sharded is None:
            first[step.name] = last[step.name] = task(**recorded)(run_step)(step.name)
        else:
            # recorded as a step of its own ("plan-score"), so a plan that fails is in the run history too
            planned = task(
                task_id=f"plan_{step.task_id}",
                on_execute_callback=airflow_task_started,
                post_execute=airflow_task_finished,
            )(plan_shards)(step.name)
            first[step.name] = planned
            last[step.name] = task(**recorded)(run_shard).partial(step=step.name).expand_kwargs(planned)
        for upstream in step.upstream:
            last[upstream] >> first[step.name]
    # Airflow judges a dag run by its last tasks, and the online upkeep runs (and succeeds) even after an
    # earlier step failed: without this task a night whose publish failed would show green. It runs only
    # when a step failed, and fails; the failed step has already alerted and recorded the run's end.
    watcher = task(task_id=WATCHER, trigger_rule=TriggerRule.ONE_FAILED, on_failure_callback=[])(fail_the_run)
    list(last.values()) >> watcher()


overnight_nightly()
