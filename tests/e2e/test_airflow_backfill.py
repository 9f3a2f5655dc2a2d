"""A real Airflow (`overnight airflow`: api-server, scheduler, dag-processor, triggerer, LocalExecutor)
against Postgres: backfills through the REST API v2 and `airflow backfill create`, and a manual run
of a MovieLens date triggered through the REST API.

The scheduler's own schedule is off (``[scheduler] use_job_schedule``) so that only the runs of the
test run; everything else is the configuration a user gets.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from jobs.dev.airflow_local import metadata_database_name
from jobs.dev.generate import generate
from tests.support.commands import OVERNIGHT, free_port, overnight_env
from tests.support.data import MOVIELENS_100K, SAMPLE_DATE, write_movielens_100k
from tests.support.databases import create_database, drop_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "overnight_nightly"
DATES = [SAMPLE_DATE - timedelta(days=2), SAMPLE_DATE - timedelta(days=1), SAMPLE_DATE]
FAST_AIRFLOW = {
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
    "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__API__WORKERS": "1",
}


@dataclass
class RunningAirflow:
    url: str
    client: httpx.Client
    database_url: str
    env: dict[str, str]
    home: Path

    def unpause(self) -> None:
        """Wait for the dag-processor's first parse of the DAG, then unpause it."""
        deadline = time.monotonic() + 120
        while self.client.get(f"/api/v2/dags/{DAG_ID}").status_code != 200:
            assert time.monotonic() < deadline, "the DAG was not parsed within 120s"
            time.sleep(0.5)
        assert self.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200

    def wait_for_runs(self, count: int, timeout: float = 400) -> list[dict[str, Any]]:
        """Poll until ``count`` backfill runs of the DAG have finished; fail at once if one failed."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}).json()
            runs = runs["dag_runs"]
            failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
            assert not failed, f"runs failed: {failed}\n{self.failed_task_logs()}"
            if len(runs) >= count and all(r["state"] == "success" for r in runs):
                return list(runs)
            assert time.monotonic() < deadline, f"runs not finished within {timeout}s: {runs}"
            time.sleep(1)

    def failed_task_logs(self) -> str:
        logs = sorted((self.home / "logs" / f"dag_id={DAG_ID}").rglob("*.log"))
        return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs if '"level":"error"' in p.read_text())


def _kept_batches(database_url: str) -> list[tuple[int, Any, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT batch_id, logical_date, status FROM overnight.batches "
            "WHERE status IN ('live', 'ready', 'retired', 'loading') ORDER BY batch_id"
        ).fetchall()


def _run_status(database_url: str, dag_run_id: str) -> str | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status FROM overnight.runs WHERE external_id = %s", (f"{DAG_ID}/{dag_run_id}",)
        ).fetchone()
    return row[0] if row else None


def _live_date(database_url: str) -> Any:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT b.logical_date FROM overnight.live JOIN overnight.batches b USING (batch_id)"
        ).fetchone()
    return row[0] if row else None


@pytest.fixture(scope="module")
def airflow(
    postgres_admin_url: str, sample_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningAirflow]:
    database_url = create_database(postgres_admin_url)
    data_dir = tmp_path_factory.mktemp("airflow-e2e") / "var"
    port = free_port()
    env = {
        **overnight_env(
            database_url,
            data_dir,
            OVERNIGHT_SOURCE=str(sample_source),
            OVERNIGHT_SCORE_SHARDS="2",
            OVERNIGHT_NUM_BOOST_ROUND="30",
        ),
        **FAST_AIRFLOW,
    }
    env = {k: v for k, v in env.items() if k != "AIRFLOW_HOME" and not k.startswith("AIRFLOW__DATABASE__")}
    process = subprocess.Popen(
        [str(OVERNIGHT), "airflow", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(line.startswith("Airflow is ready") for line in lines):
            assert process.poll() is None, "overnight airflow exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "overnight airflow was not ready in 240s:\n" + "".join(lines)
            time.sleep(0.5)
        login = re.search(r"login:\s+(\S+) / (\S+)", "".join(lines))
        assert login, "".join(lines)
        url = f"http://127.0.0.1:{port}"
        token = httpx.post(f"{url}/auth/token", json={"username": login[1], "password": login[2]}).json()
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=30
        ) as client:
            yield RunningAirflow(url, client, database_url, env, data_dir / "airflow")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drop_database(postgres_admin_url, make_conninfo(database_url, dbname=metadata_database_name(database_url)))
        drop_database(postgres_admin_url, database_url)


def test_a_three_date_backfill_through_the_rest_api_publishes_one_batch_per_date(airflow: RunningAirflow) -> None:
    client = airflow.client
    airflow.unpause()

    started = time.monotonic()
    created = client.post(
        "/api/v2/backfills",
        json={
            "dag_id": DAG_ID,
            "from_date": f"{DATES[0]}T00:00:00Z",
            "to_date": f"{DATES[-1]}T00:00:00Z",
            "max_active_runs": 2,
        },
    )
    assert created.status_code == 200, created.text
    runs = airflow.wait_for_runs(3)
    elapsed = time.monotonic() - started
    print(f"three-date backfill: {elapsed:.1f}s")  # the report's number; shown with -s

    assert sorted(r["logical_date"][:10] for r in runs) == [d.isoformat() for d in DATES]
    deadline = time.monotonic() + 60
    while (backfill := client.get(f"/api/v2/backfills/{created.json()['id']}").json())["completed_at"] is None:
        assert time.monotonic() < deadline, f"the scheduler never marked the backfill complete: {backfill}"
        time.sleep(0.5)
    assert backfill["max_active_runs"] == 2
    spans = [(r["start_date"], r["end_date"]) for r in runs]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2, spans  # never more dates at once
    kept = _kept_batches(airflow.database_url)
    assert sorted(day for _, day, _ in kept) == DATES, kept  # one batch per date, none duplicated
    assert _live_date(airflow.database_url) == DATES[-1]  # the newest date is live, whatever order they ran in
    with psycopg.connect(airflow.database_url) as conn:
        # point in time: no batch was scored by a model trained after its date
        leaks = conn.execute(
            "SELECT b.logical_date, m.logical_date FROM overnight.batches b JOIN overnight.model_versions m "
            "USING (model_id) WHERE m.logical_date > b.logical_date"
        ).fetchall()
    assert leaks == []


def test_rerunning_a_date_with_the_cli_and_publish_live_replaces_its_batch(airflow: RunningAirflow) -> None:
    before = {day: batch for batch, day, _ in _kept_batches(airflow.database_url)}
    assert set(before) == set(DATES), "runs after the three-date backfill"
    middle = DATES[1].isoformat()
    command = [
        sys.executable, "-m", "airflow", "backfill", "create", "--dag-id", DAG_ID,
        "--from-date", middle, "--to-date", middle, "--reprocess-behavior", "completed",
        "--dag-run-conf", json.dumps({"publish_live": True}),
    ]  # fmt: skip
    env = {**airflow.env, "AIRFLOW_HOME": str(airflow.home)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    deadline = time.monotonic() + 400
    while True:
        runs = airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}).json()
        # The run id is named after when the run may start (the day after), so find it by its date.
        (run,) = [r for r in runs["dag_runs"] if r["logical_date"].startswith(middle)]
        if run["state"] == "success" and run["conf"] == {"publish_live": True}:
            break
        assert run["state"] != "failed", airflow.failed_task_logs()
        assert time.monotonic() < deadline, run
        time.sleep(1)

    after = {day: (batch, status) for batch, day, status in _kept_batches(airflow.database_url)}
    assert set(after) == set(DATES)  # still one batch per date: the re-run replaced the old one
    assert after[DATES[1]][0] != before[DATES[1]] and after[DATES[1]][1] == "live"  # asked to go live
    assert after[DATES[2]] == (before[DATES[2]], "retired")  # the newest stays kept for rollback


def _trigger(airflow: RunningAirflow, logical_date: str, source: Path, **params: Any) -> str:
    """A manual run of the nightly DAG through the REST API, as the UI's trigger form makes one: its id."""
    created = airflow.client.post(
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        json={"logical_date": logical_date, "conf": {"source": str(source), **params}},
    )
    assert created.status_code == 200, created.text
    return str(created.json()["dag_run_id"])


def test_a_run_triggered_for_any_past_date_runs_its_tasks(airflow: RunningAirflow, tmp_path: Path) -> None:
    """A manual run (the UI's trigger form, the REST API) of a date long past, as an operator picks it:
    MovieLens 100K's last day, on MovieLens 100K when it is there (../shared), else on generated data
    ending that day written as a MovieLens 100K release, read by the same reader.

    Last in the file: it adds a 1998 batch, which the tests above do not expect among theirs.
    """
    source = MOVIELENS_100K
    if not (MOVIELENS_100K / "u.data").exists():
        data = generate(users=300, items=120, days=45, end_date=date(1998, 4, 22), seed=11, events_per_user=25)
        source = write_movielens_100k(data, tmp_path / "ml-100k")
    airflow.unpause()
    started = time.monotonic()
    run_id = _trigger(airflow, "1998-04-22T00:00:00Z", source)
    deadline = time.monotonic() + 400
    while (run := airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json())["state"] != "success":
        assert run["state"] != "failed", airflow.failed_task_logs()
        assert time.monotonic() < deadline, run
        time.sleep(1)
    print(f"manual run of {source}: {time.monotonic() - started:.1f}s")  # the report's number; shown with -s

    instances = airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()
    states = {ti["task_id"]: ti["state"] for ti in instances["task_instances"]}
    # Before the fix the run "succeeded" with no task instance at all: Airflow makes none for a
    # manual run dated before the tasks' start_date.
    assert states.get("publish") == "success", states
    assert states.get("ingest") == "success", states
    assert date(1998, 4, 22) in [day for _, day, _ in _kept_batches(airflow.database_url)]

    # The day after the data ends has no events: monitoring holds its batch back. The publish task fails
    # at once (a retry cannot cure it) and the run is blocked in the run history.
    blocked_run = _trigger(airflow, "1998-04-23T00:00:00Z", source)
    deadline = time.monotonic() + 400
    while (run := airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{blocked_run}").json())["state"] != "failed":
        assert run["state"] != "success", run
        assert time.monotonic() < deadline, run
        time.sleep(1)
    listed = airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{blocked_run}/taskInstances").json()
    publish = next(ti for ti in listed["task_instances"] if ti["task_id"] == "publish")
    assert (publish["state"], publish["try_number"]) == ("failed", 1), publish
    assert _run_status(airflow.database_url, blocked_run) == "blocked"

    # An operator who looked publishes it anyway on the record: a backfill of the date that reprocesses
    # failed runs, with the accept_checks param (a run for the date exists: a new trigger would be a 409).
    why = "the source ends on 1998-04-22; an empty day is expected"
    created = airflow.client.post(
        "/api/v2/backfills",
        json={
            "dag_id": DAG_ID,
            "from_date": "1998-04-23T00:00:00Z",
            "to_date": "1998-04-23T00:00:00Z",
            "reprocess_behavior": "failed",
            "dag_run_conf": {"source": str(source), "accept_checks": why},
        },
    )
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 400
    while (run := airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{blocked_run}").json())["state"] != "success":
        assert run["state"] != "failed", airflow.failed_task_logs()  # the backfill cleared it when created
        assert time.monotonic() < deadline, run
        time.sleep(1)
    with psycopg.connect(airflow.database_url) as conn:
        accepted = conn.execute(
            "SELECT a.reason, b.logical_date, r.external_id FROM overnight.monitor_acceptances AS a"
            " JOIN overnight.batches AS b USING (batch_id) JOIN overnight.runs AS r USING (run_id)"
        ).fetchall()
    assert accepted == [(why, date(1998, 4, 23), f"{DAG_ID}/{blocked_run}")], accepted
    assert _run_status(airflow.database_url, blocked_run) == "success"

    # A date before any start_date Airflow could have had (1970 was ours): its tasks exist and run too.
    old_run = _trigger(airflow, "1969-12-31T00:00:00Z", source)
    deadline = time.monotonic() + 120
    while True:
        listed = airflow.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{old_run}/taskInstances").json()
        ingest = {ti["task_id"]: ti["state"] for ti in listed["task_instances"]}.get("ingest")
        if ingest in ("success", "failed", "up_for_retry"):
            break  # ran (a source without events that day may well fail it): not an empty "success"
        assert time.monotonic() < deadline, listed
        time.sleep(1)
    assert len(listed["task_instances"]) > 1, listed
