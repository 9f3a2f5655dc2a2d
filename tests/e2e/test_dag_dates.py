"""Which dates the DAGs run: any date an operator picks gets its tasks (no start_date, before which a
manual run would get none), and the scheduler alone never backfills.

Both are checked through the serialized DAG, the object the scheduler and the REST API use; the real
trigger through the REST API is in test_airflow_backfill.py.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.dags import DAGS_FOLDER

pytestmark = pytest.mark.e2e

DAG_IDS = ("overnight_nightly", "overnight_freshness")


@pytest.fixture(scope="module")
def serialized() -> dict[str, Any]:
    # imported here: Airflow configures logging for the whole process when it is imported
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    dagbag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert dagbag.import_errors == {}
    return {dag_id: DagSerialization.from_dict(DagSerialization.to_dict(dagbag.dags[dag_id])) for dag_id in DAG_IDS}


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_a_manual_run_of_any_date_gets_every_task(serialized: dict[str, Any], dag_id: str) -> None:
    # Airflow creates a manual run's task instances only for tasks whose start_date is on or before the
    # run's logical date (a backfill skips this check), and a run without any reports success: with a
    # start_date, however early, some date a user can pick (1969-12-31, 1066-10-14) would do nothing.
    dag = serialized[dag_id]
    assert dag.start_date is None, (
        f"{dag_id} starts on {dag.start_date}: a manual run of an older date would do nothing"
    )
    dated = sorted(task.task_id for task in dag.tasks if task.start_date is not None)
    assert dated == [], f"{dated} have a start_date: a manual run of an older date would skip them"


@pytest.mark.parametrize(
    ("dag_id", "period"), [("overnight_nightly", timedelta(days=1)), ("overnight_freshness", timedelta(hours=1))]
)
def test_a_freshly_unpaused_dag_schedules_only_the_latest_period(
    serialized: dict[str, Any], dag_id: str, period: timedelta
) -> None:
    before = datetime.now(UTC)
    # What the scheduler computes for a DAG without any scheduled run yet (DagModel.calculate_dagrun_date_fields).
    first = serialized[dag_id].next_dagrun_info(last_automated_run_info=None)
    after = datetime.now(UTC)
    assert first is not None
    # catchup=False: the first run is the latest period or the coming one, never a backfill of the past.
    assert before - period <= first.run_after <= after + period, first
    assert first.run_after - first.data_interval.start <= period, first
