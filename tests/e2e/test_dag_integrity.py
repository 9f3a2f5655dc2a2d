"""Every DAG file imports cleanly and follows the house rules; the contract's DAG ids exist.

One parametrized test per rule walks every DAG, so a new DAG is checked without a new test.
"""

import importlib.util
import re
import subprocess
import sys
from typing import Any

import pytest
from airflow.serialization.encoders import coerce_to_core_timetable

from jobs import nightly
from jobs.errors import BadInputError, DatabaseError
from jobs.monitoring.gate import MonitoringBlockedError
from jobs.monitoring.history import airflow_dag_run_failed, airflow_dag_run_succeeded, airflow_task_retrying
from tests.support.dags import DAGS_FOLDER

pytestmark = pytest.mark.e2e

WATCHER = "watcher"  # overnight_nightly's task that fails the dag run when a step failed

# DAG id → cron expression of its schedule.
EXPECTED = {"overnight_nightly": "0 0 * * *", "overnight_freshness": "0 * * * *"}


@pytest.fixture(scope="module")
def dagbag() -> Any:
    # imported here: Airflow configures logging for the whole process when it is imported
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_no_import_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}


def test_the_contract_dag_ids_and_schedules(dagbag: Any) -> None:
    schedules = {dag_id: coerce_to_core_timetable(dag.timetable).summary for dag_id, dag in dagbag.dags.items()}
    assert schedules == EXPECTED


def test_a_scheduled_night_scores_the_day_that_has_just_ended(dagbag: Any) -> None:
    import pendulum
    from airflow.timetables.base import DataInterval, TimeRestriction

    timetable = coerce_to_core_timetable(dagbag.dags["overnight_nightly"].timetable)
    scored_the_19th = DataInterval(pendulum.datetime(2026, 11, 19, tz="UTC"), pendulum.datetime(2026, 11, 20, tz="UTC"))
    restriction = TimeRestriction(earliest=None, latest=None, catchup=True)
    upcoming = timetable.next_dagrun_info(last_automated_data_interval=scored_the_19th, restriction=restriction)
    assert upcoming is not None
    # The run that starts at midnight on the 21st scores the 20th, whose events are all in by then.
    assert upcoming.logical_date == pendulum.datetime(2026, 11, 20, tz="UTC")
    assert upcoming.run_after == pendulum.datetime(2026, 11, 21, tz="UTC")


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_house_rules(dagbag: Any, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert "overnight" in dag.tags
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md
    for task in dag.tasks:
        assert task.owner == "overnight", task.task_id
        assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"
        if task.task_id != WATCHER:  # it fails only after a step failed, which has alerted
            assert task.on_failure_callback, f"{dag_id}.{task.task_id} sends no alert on failure"


def test_nightly_wires_the_pipeline_in_order(dagbag: Any) -> None:
    dag = dagbag.dags["overnight_nightly"]
    # a topological order exists (no cycle) and follows the order of jobs.nightly.STEPS (docs/airflow.md)
    order = [task.task_id for task in dag.topological_sort()]
    for before, after in [
        ("ingest", "features"),
        ("ingest", "candidates"),
        ("features", "train"),
        ("candidates", "train"),
        ("train", "plan_score"),
        ("plan_score", "score"),
        ("score", "monitor"),
        ("monitor", "publish"),
        ("publish", "check_freshness"),
        ("publish", "shadow"),
        ("publish", "refresh_canary"),
    ]:
        assert order.index(before) < order.index(after), f"{before} must run before {after}"
    assert dag.get_task("score").is_mapped
    assert dag.deadline, "the nightly run has a completion deadline alert"


def test_the_dag_is_the_nightly_graph_overnight_run_runs(dagbag: Any) -> None:
    """One graph: every step of jobs.nightly.STEPS is a task waiting on exactly its upstream steps."""
    dag = dagbag.dags["overnight_nightly"]
    planned = {f"plan_{step.task_id}" for step in nightly.STEPS if step.sharded}
    assert {task.task_id for task in dag.tasks} == {step.task_id for step in nightly.STEPS} | planned | {WATCHER}
    for step in nightly.STEPS:
        entry = dag.get_task(f"plan_{step.task_id}" if step.sharded else step.task_id)
        assert entry.upstream_task_ids == {nightly.STEP_BY_NAME[up].task_id for up in step.upstream}, step.name
        if step.sharded:
            assert dag.get_task(step.task_id).upstream_task_ids == {entry.task_id}
        # every task records its step in the run history, a sharded step's plan included, and a failed
        # attempt with a retry due (Airflow calls only the retry callback then: docs/airflow.md)
        assert entry.on_execute_callback and entry.post_execute, entry.task_id
        for task in {entry, dag.get_task(step.task_id)}:
            assert airflow_task_retrying in _callbacks(task.on_retry_callback), task.task_id
        expected_rule = "all_done" if step.even_after_failure else "all_success"
        assert dag.get_task(step.task_id).trigger_rule == expected_rule, step.name
    # The online upkeep runs after a failure and succeeds: the watcher, waiting on every step and run
    # only when one failed, fails the dag run (Airflow judges a run by its last tasks).
    # the run history's run ends with the dag run too: a clear may re-run failed tasks but not the last step
    assert airflow_dag_run_succeeded in _callbacks(dag.on_success_callback)
    assert airflow_dag_run_failed in _callbacks(dag.on_failure_callback)
    watcher = dag.get_task(WATCHER)
    assert watcher.trigger_rule == "one_failed" and not watcher.downstream_task_ids
    assert watcher.upstream_task_ids == {step.task_id for step in nightly.STEPS}
    assert [task.task_id for task in dag.leaves] == [WATCHER]


@pytest.mark.parametrize("dag_file", sorted(p.name for p in DAGS_FOLDER.glob("*.py")))
def test_parsing_imports_nothing_heavy(dag_file: str) -> None:
    """The scheduler parses DAG files constantly: no polars, lightgbm, numpy or the lookup service then."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        "heavy = [m for m in ('polars', 'lightgbm', 'numpy', 'pyarrow', 'serving', 'jobs.steps.train', "
        "'jobs.steps.score') if m in sys.modules]; print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(DAGS_FOLDER / dag_file)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"{dag_file} imports {result.stdout.strip()} at parse time"


def _callbacks(callback: Any) -> list[Any]:
    return list(callback) if isinstance(callback, list | tuple) else [callback]


def test_an_error_a_retry_cannot_cure_fails_the_task_at_once() -> None:
    """Bad input, a future date or a publish monitoring held back fail without minutes of retries;
    Postgres out of reach or an error no code foresaw is retried."""
    from airflow.sdk.exceptions import AirflowFailException

    spec = importlib.util.spec_from_file_location("overnight_nightly_under_test", DAGS_FOLDER / "overnight_nightly.py")
    assert spec and spec.loader
    dag_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag_file)
    for final in (BadInputError("events.csv: missing required column user_id"), MonitoringBlockedError("held", None)):
        with (
            pytest.raises(AirflowFailException, match=re.escape(str(final))) as failed,
            dag_file._retried_only_if_worth_it(),
        ):
            raise final
        assert failed.value.__cause__ is final
    for transient in (DatabaseError("cannot reach Postgres"), OSError("No space left on device")):
        with pytest.raises(type(transient)), dag_file._retried_only_if_worth_it():
            raise transient
