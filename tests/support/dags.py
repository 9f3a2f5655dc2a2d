"""Airflow for tests: the project's DAGs, run through `dag.test()` in a process of their own."""

import subprocess
import sys
from pathlib import Path

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
RUNNER = Path(__file__).with_name("run_dag.py")


def run_dag(dag_id: str, day: str, env: dict[str, str], airflow_home: Path) -> subprocess.CompletedProcess[str]:
    airflow_env = {
        **env,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        # dag.test() in Airflow 3.3.2 cannot settle a run whose DAG has a Deadline Alert (it looks the
        # alert up by the serialized dict instead of its id); the scheduler path is unaffected.
        "OVERNIGHT_NIGHTLY_DEADLINE_HOURS": "0",
    }
    return subprocess.run(
        [sys.executable, str(RUNNER), dag_id, day, str(DAGS_FOLDER)],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
