"""End-to-end fixtures: an isolated Airflow home, set before anything imports Airflow."""

import os
import tempfile
from pathlib import Path

from tests.support.dags import DAGS_FOLDER

# Airflow reads its configuration when first imported, so this must happen at collection time.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="overnight-airflow-"))
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}"
