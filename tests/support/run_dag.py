"""Run one DAG through ``dag.test()`` in a process of its own: ``python run_dag.py DAG_ID YYYY-MM-DD DAGS``.

Prints ``STATE <state>`` last and exits 0 only when the run succeeded. The caller sets the
Airflow and overnight environment (AIRFLOW_HOME, the metadata database, OVERNIGHT_*).
Retries are turned off: dag.test() would wait out every retry delay in real time.
"""

import sys
from datetime import UTC, datetime

from airflow.dag_processing.dagbag import DagBag
from airflow.utils.db import initdb


def main(dag_id: str, day: str) -> int:
    initdb()
    bag = DagBag(dag_folder=sys.argv[3])
    if bag.import_errors:
        print(f"IMPORT ERRORS {bag.import_errors}")
        return 2
    dag = bag.get_dag(dag_id)
    for task in dag.tasks:
        task.retries = 0
    run = dag.test(logical_date=datetime.fromisoformat(day).replace(tzinfo=UTC))
    print(f"STATE {run.state}")
    return 0 if str(run.state) == "success" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
