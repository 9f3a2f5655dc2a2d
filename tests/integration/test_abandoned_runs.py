"""Runs whose process died mid-way: killed with SIGKILL, they read as abandoned, not running forever.

A CLI run is abandoned when its process is gone; a step of an Airflow dag run when its task's process
is gone, the dag run itself only when none of its steps is still running; a retry of the task makes
both running again. Read through what users read: the dashboard (as the console's read-only
role, which cannot write) and `overnight status --json`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import psycopg
import pytest

from jobs.database import upgrade
from jobs.errors import BadInputError, DatabaseError, StaleBatchError
from jobs.monitoring import freshness, history, status
from jobs.monitoring.gate import MonitoringBlockedError
from jobs.settings import Settings
from tests.support.commands import OVERNIGHT, overnight, overnight_env
from tests.support.console import read_dashboard
from tests.support.data import SAMPLE_DATE
from tests.support.databases import create_database, drop_database, migrate_before

pytestmark = pytest.mark.integration

T = TypeVar("T")


def eventually(read: Callable[[], T | None], timeout: float = 20.0) -> T:
    """What ``read`` returns once it returns something: a killed client's backend ends a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("not seen in time")
        time.sleep(0.1)


def kill_once_started(script: str, *args: str, before_kill: Callable[[], object] = lambda: None) -> None:
    """Run `script` in a Python process of its own, wait until it prints "started", call `before_kill`,
    then kill it with SIGKILL (its database connections end with it)."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args], env=dict(os.environ), stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "started"
        before_kill()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def stored_statuses(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT r.run_id, r.status, r.abandoned_at IS NOT NULL, s.step, s.status, s.abandoned_at IS NOT NULL "
            "FROM overnight.runs AS r JOIN overnight.run_steps AS s USING (run_id) ORDER BY r.run_id, s.started_at"
        ).fetchall()


def test_a_killed_overnight_run_and_its_step_read_as_abandoned_and_the_next_run_starts(
    database_url: str, console_dsn: str, sample_source: Path, tmp_path: Path
) -> None:
    env = overnight_env(database_url, tmp_path / "var")
    args = ["run", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat()]
    killed_in = "train"  # the longest step of the sample's run: killed while it runs
    with (tmp_path / "run.log").open("w") as log:
        process = subprocess.Popen([str(OVERNIGHT), *args], env=env, stdout=log, stderr=log)
        try:

            def training() -> bool | None:
                with psycopg.connect(database_url) as conn:
                    row = conn.execute(
                        "SELECT status FROM overnight.run_steps WHERE step = %s", (killed_in,)
                    ).fetchone()
                return True if row and row[0] == "running" else None

            eventually(training, timeout=120)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=10) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()

    # The dashboard, under the read-only role, tells from the owner's backend being gone.
    def abandoned_on_dashboard() -> dict[str, Any] | None:
        shown = read_dashboard(console_dsn)["runs"]
        return shown[-1] if shown and shown[-1]["status"] == "abandoned" else None

    run = eventually(abandoned_on_dashboard)
    # Not marked yet: no noticed time, and its time ends at its last recorded step (it does not grow).
    assert run["abandoned_at"] is None
    time.sleep(1.1)
    assert read_dashboard(console_dsn)["runs"][-1]["seconds"] == run["seconds"]
    steps = {s["step"]: s["status"] for s in run["steps"]}
    assert steps[killed_in] == "abandoned", steps
    assert {status for name, status in steps.items() if name != killed_in} == {"success"}
    assert {row[1] for row in stored_statuses(database_url)} == {"running"}  # the read-only read wrote nothing

    # Starting the next run marks the dead one abandoned for good, with when it noticed; the new run
    # starts and finishes.
    before_start = datetime.now(UTC)
    overnight(*args, env=env)
    with psycopg.connect(database_url) as conn:
        first, second = conn.execute(
            "SELECT status, abandoned_at, started_at FROM overnight.runs ORDER BY run_id"
        ).fetchall()
    assert first[0] == "abandoned" and first[1] >= before_start
    # noticed when the next run started, before any of its steps (not by a later read, check-freshness's)
    assert first[1] <= second[2], (first, second)
    stored = stored_statuses(database_url)
    assert [(row[3], row[4], row[5]) for row in stored if row[4] not in ("success", "skipped")][:1] == [
        (killed_in, "abandoned", True)
    ]
    history = json.loads(overnight("status", "--json", env=env).stdout)["recent_runs"]
    assert [(r["status"], r["abandoned_at"] is not None) for r in history] == [("success", False), ("abandoned", True)]
    assert history[0]["steps"]["publish"] == "success"
    # and in words: the dead run, when it was noticed and the step it died in
    shown = overnight("status", env=env).stdout.splitlines()
    day, when = SAMPLE_DATE.isoformat(), r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    runs = shown[shown.index("recent runs:") + 1 :]
    assert len(runs) == 2, runs
    assert re.fullmatch(rf"\s+2  {day}  success\s+started {when}", runs[0]), runs
    assert re.fullmatch(
        rf"\s+1  {day}  abandoned started {when}, noticed abandoned {when}; step {killed_in} abandoned", runs[1]
    ), runs
    on_dashboard = read_dashboard(console_dsn)["runs"]
    assert [(r["status"], r["abandoned_at"] is not None) for r in on_dashboard] == [
        ("abandoned", True),
        ("success", False),
    ]


def test_the_freshness_check_marks_runs_whose_process_died(database_url: str, tmp_path: Path) -> None:
    """The hourly freshness DAG notices a dead run between nights, even when nothing is live yet."""
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    kill_once_started(DEAD_CLI_RUN, database_url, str(tmp_path / "var"))

    def marked() -> tuple[Any, ...] | None:
        with pytest.raises(StaleBatchError, match="nothing is live"):
            freshness.check_freshness(settings)
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT status, abandoned_at FROM overnight.runs").fetchone()
        return row if row is not None and row[0] == "abandoned" else None

    assert eventually(marked)[1] is not None


# A CLI run recorded by a process that is then killed (its backend ends with it).
DEAD_CLI_RUN = """
import sys, time
from datetime import date
from pathlib import Path

from jobs.monitoring import history
from jobs.settings import Settings

settings = Settings(database_url=sys.argv[1], data_dir=Path(sys.argv[2]))
with history.recording(settings, date(2026, 11, 20)):
    print("started", flush=True)
    time.sleep(600)
"""


TASK_PROCESS = """
import sys, time
from datetime import UTC, datetime
from types import SimpleNamespace

from jobs.monitoring import history

ti = SimpleNamespace(dag_id="overnight_nightly", task_id="score", map_index=int(sys.argv[1]))
dag_run = SimpleNamespace(
    dag_id="overnight_nightly", run_id="scheduled__2026-11-20", run_after=datetime(2026, 11, 21, tzinfo=UTC)
)
context = {"task_instance": ti, "dag_run": dag_run, "logical_date": datetime(2026, 11, 20, tzinfo=UTC)}
history.airflow_task_started(context)
print("started", flush=True)
time.sleep(600)
"""


def task_context(map_index: int, task_id: str = "score") -> dict[str, Any]:
    ti = SimpleNamespace(dag_id="overnight_nightly", task_id=task_id, map_index=map_index)
    dag_run = SimpleNamespace(
        dag_id="overnight_nightly", run_id="scheduled__2026-11-20", run_after=datetime(2026, 11, 21, tzinfo=UTC)
    )
    return {"task_instance": ti, "dag_run": dag_run, "logical_date": datetime(2026, 11, 20, tzinfo=UTC)}


def test_an_airflow_task_whose_process_died_is_abandoned_until_its_retry(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_DATA_DIR", str(tmp_path / "var"))
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")

    def recent() -> dict[str, Any]:
        return dict(status.status(settings)["recent_runs"][0])

    # another shard of the same dag run starts meanwhile, alive in this process
    kill_once_started(TASK_PROCESS, "0", before_kill=lambda: history.airflow_task_started(task_context(1)))

    # Shard 0's process died: its step is abandoned, the dag run is not while shard 1 runs.
    def shard_abandoned() -> dict[str, Any] | None:
        found = recent()
        return found if found["steps"].get("score[0]") == "abandoned" else None

    run = eventually(shard_abandoned)
    assert run["status"] == "running" and run["abandoned_at"] is None
    assert run["steps"] == {"score[0]": "abandoned", "score[1]": "running"}

    # Shard 1 ends: nothing runs any more and a step was abandoned, so the dag run is.
    history.airflow_task_finished(task_context(1), {"summary": "shard 1 of 2", "rows_out": 10})
    run = recent()
    assert (run["status"], run["steps"]) == ("abandoned", {"score[0]": "abandoned", "score[1]": "success"})
    assert run["abandoned_at"] is not None

    # Airflow retries shard 0: the step and the dag run are running again.
    history.airflow_task_started(task_context(0))
    run = recent()
    assert (run["status"], run["abandoned_at"]) == ("running", None)
    assert run["steps"] == {"score[0]": "running", "score[1]": "success"}
    history.airflow_task_finished(task_context(0), {"summary": "shard 0 of 2", "rows_out": 10})
    with psycopg.connect(database_url) as conn:
        attempts = conn.execute("SELECT step, status, attempt FROM overnight.run_steps ORDER BY step").fetchall()
    assert attempts == [("score[0]", "success", 2), ("score[1]", "success", 1)]
    assert recent()["status"] == "running"  # the dag run goes on to publish


def test_a_night_blocked_in_airflow_stays_blocked_after_the_online_upkeep_succeeds(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The online upkeep runs after a failed step and ends the dag run: the run keeps the blocked step's
    end, as `overnight run` records it. A shadow's batch is its step's, never the run's."""
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_DATA_DIR", str(tmp_path / "var"))
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    shadow, publish, online = (task_context(-1, name) for name in ("shadow", "publish", "online"))

    history.airflow_task_started(shadow)
    shadow_outcome = {"summary": "shadow batch 7 of model m9", "rows_out": 5, "batch_id": 7, "model_id": "m9"}
    history.airflow_task_finished(shadow, shadow_outcome | {"production": False})
    history.airflow_task_started(publish)
    blocked = MonitoringBlockedError("volume_change of interactions is -100%: no events on 2026-11-20", None)
    history.airflow_task_failed(publish | {"exception": blocked})
    history.airflow_task_started(online)
    history.airflow_task_finished(online, {"summary": "partitions kept"}, ends_run=True)

    run = dict(status.status(settings)["recent_runs"][0])
    assert (run["status"], run["steps"]) == (
        "blocked",
        {"shadow": "success", "publish": "blocked", "online": "success"},
    )
    assert run["error"] == str(blocked) and run["finished_at"] is not None
    assert (run["batch_id"], run["model_id"]) == (None, None)
    with psycopg.connect(database_url) as conn:
        steps = conn.execute("SELECT step, batch_id, model_id FROM overnight.run_steps ORDER BY step").fetchall()
    assert steps == [("online", None, None), ("publish", None, None), ("shadow", 7, "m9")]


def test_an_airflow_attempt_that_fails_with_a_retry_due_is_failed_not_abandoned(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow calls only the retry callback when an attempt fails with retries left: the step keeps its
    error, the run goes on (not abandoned, though the attempt's process is gone), and the retry resumes it."""
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_DATA_DIR", str(tmp_path / "var"))
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    ingest = task_context(-1, "ingest")
    history.airflow_task_started(ingest)
    history.airflow_task_retrying(ingest | {"exception": OSError("the source's volume is not mounted")})

    run = dict(status.status(settings)["recent_runs"][0])  # reading the runs marks abandoned ones
    assert (run["status"], run["abandoned_at"], run["steps"]) == ("running", None, {"ingest": "retrying"})
    with psycopg.connect(database_url) as conn:
        step = conn.execute("SELECT status, error, attempt FROM overnight.run_steps").fetchone()
    assert step == ("retrying", "the source's volume is not mounted", 1)
    # another step failing for good ends the run with its own error, not the attempt's that will be retried
    features = task_context(-1, "features")
    history.airflow_task_started(features)
    history.airflow_task_failed(features | {"exception": BadInputError("events.csv: missing required column user_id")})
    run = dict(status.status(settings)["recent_runs"][0])
    assert (run["status"], run["error"]) == ("failed", "events.csv: missing required column user_id")

    history.airflow_task_started(ingest)
    history.airflow_task_finished(ingest, {"summary": "100 rows", "rows_out": 100})
    run = dict(status.status(settings)["recent_runs"][0])
    assert run["steps"] == {"ingest": "success", "features": "failed"}


def test_a_blocked_dag_run_run_again_with_its_checks_accepted_ends_a_success(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill with reprocess 'failed' clears a blocked dag run and runs its tasks again (with the
    accept_checks param): the run is running again from its first task and ends as its new steps do."""
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_DATA_DIR", str(tmp_path / "var"))
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    ingest, publish, online = (task_context(-1, name) for name in ("ingest", "publish", "online"))
    history.airflow_task_started(ingest)
    history.airflow_task_finished(ingest, {"summary": "0 rows"})
    history.airflow_task_started(publish)
    blocked = MonitoringBlockedError("no events on 2026-11-20", None)
    # the DAG fails a task that a retry cannot cure at once, with the error as its cause
    failed_at_once = RuntimeError(str(blocked))
    failed_at_once.__cause__ = blocked
    history.airflow_task_failed(publish | {"exception": failed_at_once})
    history.airflow_task_started(online)
    history.airflow_task_finished(online, {"summary": "partitions kept"}, ends_run=True)
    assert dict(status.status(settings)["recent_runs"][0])["status"] == "blocked"

    history.airflow_task_started(ingest)  # the dag run, cleared, starts again
    run = dict(status.status(settings)["recent_runs"][0])
    assert (run["status"], run["error"], run["finished_at"]) == ("running", None, None)
    for task in (ingest, publish, online):
        if task is not ingest:
            history.airflow_task_started(task)
        history.airflow_task_finished(task, {"summary": "done"}, ends_run=task is online)
    run = dict(status.status(settings)["recent_runs"][0])
    assert (run["status"], run["steps"]) == (
        "success",
        {"ingest": "success", "publish": "success", "online": "success"},
    )


def test_a_dag_run_cleared_for_its_failed_tasks_only_ends_with_the_dag_run(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clearing only a failed shard re-runs it, not the online upkeep that ended the run before: the dag
    run's own end (its success callback) ends the run again, rather than leaving it running."""
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_DATA_DIR", str(tmp_path / "var"))
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    shard, online = task_context(2), task_context(-1, "online")
    history.airflow_task_started(shard)
    history.airflow_task_failed(shard | {"exception": OSError("No space left on device")})
    history.airflow_task_started(online)
    history.airflow_task_finished(online, {"summary": "partitions kept"}, ends_run=True)
    history.airflow_dag_run_failed({"dag_run": shard["dag_run"], "reason": "task_failure"})
    assert dict(status.status(settings)["recent_runs"][0])["status"] == "failed"

    history.airflow_task_started(shard)  # cleared: attempt 2
    assert dict(status.status(settings)["recent_runs"][0])["status"] == "running"
    history.airflow_task_finished(shard, {"summary": "shard 2 of 4", "rows_out": 10})
    history.airflow_dag_run_succeeded({"dag_run": shard["dag_run"]})
    run = dict(status.status(settings)["recent_runs"][0])
    assert (run["status"], run["error"], run["steps"]) == (
        "success",
        None,
        {"score[2]": "success", "online": "success"},
    )


def test_a_cli_run_does_not_start_without_the_connection_that_would_tell_it_abandoned(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://postgres@127.0.0.1:1/nowhere", data_dir=tmp_path / "var")
    refused = pytest.raises(DatabaseError, match=r"^run history: could not open the connection that tells a dead run")
    with refused, history.recording(settings, SAMPLE_DATE):
        raise AssertionError("the run started")


def test_runs_left_running_before_runs_had_recorders_are_abandoned_by_the_upgrade(postgres_admin_url: str) -> None:
    url = create_database(postgres_admin_url)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate_before(conn, 22)
            add_run = (
                "INSERT INTO overnight.runs (logical_date, trigger, external_id, status, owner_name) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING run_id"
            )
            day = SAMPLE_DATE
            ownerless_cli = conn.execute(add_run, (day, "cli", None, "running", None)).fetchone()
            finished = conn.execute(add_run, (day, "cli", None, "success", None)).fetchone()
            dag_run = conn.execute(add_run, (day, "airflow", "overnight_nightly/old", "running", None)).fetchone()
            assert ownerless_cli and finished and dag_run
            conn.execute(
                "INSERT INTO overnight.run_steps (run_id, step, status) VALUES (%s, 'ingest', 'success'), "
                "(%s, 'train', 'running')",
                (dag_run[0], dag_run[0]),
            )
            upgrade(conn)
            runs = dict(conn.execute("SELECT run_id, status FROM overnight.runs").fetchall())
            steps = conn.execute("SELECT step, status, abandoned_at IS NOT NULL FROM overnight.run_steps").fetchall()
        assert runs == {ownerless_cli[0]: "abandoned", finished[0]: "success", dag_run[0]: "abandoned"}
        assert sorted(steps) == [("ingest", "success", False), ("train", "abandoned", True)]
    finally:
        drop_database(postgres_admin_url, url)


def test_a_night_ends_as_its_first_failed_step_whichever_task_reports_last(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `overnight run` raises its first error: a blocked publish, then a failing online upkeep, end the
    Airflow run as blocked, with the publish's reason, not as the last failure reported."""
    monkeypatch.setenv("OVERNIGHT_DATABASE_URL", database_url)
    monkeypatch.setenv("OVERNIGHT_DATA_DIR", str(tmp_path / "var"))
    settings = Settings(database_url=database_url, data_dir=tmp_path / "var")
    publish, online = task_context(-1, "publish"), task_context(-1, "online")
    history.airflow_task_started(publish)
    blocked = MonitoringBlockedError("volume_change of interactions is -100%", None)
    history.airflow_task_failed(publish | {"exception": blocked})
    history.airflow_task_started(online)
    history.airflow_task_failed(online | {"exception": RuntimeError("partition upkeep failed")})
    run = dict(status.status(settings)["recent_runs"][0])
    assert (run["status"], run["error"]) == ("blocked", str(blocked))
    assert run["steps"] == {"publish": "blocked", "online": "failed"}
