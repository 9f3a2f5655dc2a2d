"""A night without events, the first night, and publishing a batch monitoring held back.

The MovieLens 100K case on generated data: the data ends on a day, the night after it has no event.
Monitoring holds the batch back and says so in words (never "volume_change is inf"); an operator who
has looked publishes it with `overnight publish --accept-checks "why"`, and the acceptance is in the
run history, the alert log and the dashboard. The first night, with no earlier day to compare its
volume with, is not held back.
"""

import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from jobs import nightly
from jobs.dev.generate import generate, write_dataset
from jobs.monitoring import drift
from jobs.settings import Settings
from tests.support.commands import overnight, overnight_env
from tests.support.console import read_dashboard
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration

NO_EVENTS = SAMPLE_DATE + timedelta(days=1)  # sample_source ends on SAMPLE_DATE
NO_EVENTS_FOR_A_WEEK = SAMPLE_DATE + timedelta(days=8)  # nothing on it nor in its trailing 7 days
REASON = "the export of the 21st was empty upstream (INC-123); the 20th's lists are fine to serve"
REPO = Path(__file__).resolve().parents[2]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_night_without_events_is_held_back_in_words_and_published_once_accepted(
    database_url: str, console_dsn: str, sample_source: Path, tmp_path: Path
) -> None:
    env = overnight_env(database_url, tmp_path / "var")
    night = NO_EVENTS.isoformat()

    blocked = overnight("run", "--source", str(sample_source), "--date", night, env=env, check=False)
    assert blocked.returncode == 1
    reason = last_line(blocked.stderr)
    assert reason.startswith(f"overnight: error: batch 1 for {night} blocked by monitoring: no events on {night}; ")
    assert re.search(r"the trailing 7-day average is [\d,]+ a day: the source may be incomplete", reason), reason
    assert not re.search(r"\binf\b", blocked.stderr), reason
    shown = overnight("drift", "--date", night, env=env).stdout
    assert f"fail  no events on {night}" in shown and not re.search(r"\binf\b", shown)
    assert json.loads(overnight("status", "--json", env=env).stdout)["live"] is None

    refused = overnight("publish", "--date", night, "--accept-checks", "  ", env=env, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "--accept-checks" in refused.stderr, refused.stderr

    published = overnight("publish", "--date", night, "--accept-checks", REASON, env=env)
    assert "accepted 1 failing check (volume_change)" in published.stdout, published.stdout
    status = json.loads(overnight("status", "--json", env=env).stdout)
    assert (status["live"]["batch_id"], status["live"]["logical_date"]) == (2, night)

    # run history: the blocked run, then the publish that accepted its fails
    blocked_run, accepted_run = status["recent_runs"][1], status["recent_runs"][0]
    assert (blocked_run["logical_date"], blocked_run["status"], blocked_run["accepted"]) == (night, "blocked", None)
    assert (accepted_run["logical_date"], accepted_run["status"]) == (night, "success")
    assert accepted_run["steps"] == {"publish": "success"}
    accepted = accepted_run["accepted"]
    assert accepted["reason"] == REASON and accepted["batch_id"] == 2 and accepted["accepted_by"]
    assert [c["statistic"] for c in accepted["checks"]] == ["volume_change"]
    assert accepted["checks"][0]["message"].startswith(f"no events on {night}")
    with psycopg.connect(database_url) as conn:
        summary = conn.execute(
            "SELECT summary FROM overnight.run_steps WHERE run_id = %s AND step = 'publish'", (accepted_run["run_id"],)
        ).fetchone()
        alert = conn.execute(
            "SELECT title, details FROM overnight.alerts WHERE fingerprint = %s", (f"accepted:{night}:2",)
        ).fetchone()
    assert summary is not None and "accepted 1 failing check (volume_change)" in summary[0] and REASON in summary[0]

    # the alert log
    assert alert is not None, "no alert recorded for the acceptance"
    title, details = alert
    assert "batch 2" in title and "accepted" in title
    assert details["reason"] == REASON and details["checks"] == ["volume_change"]
    assert details["accepted_by"] == accepted["accepted_by"] and REASON in details["text"]

    # the dashboard, as the console reads it: its read-only role
    runs = read_dashboard(console_dsn)["runs"]
    assert [(r["status"], r["accepted"] is not None) for r in runs] == [("blocked", False), ("success", True)]
    shown_acceptance = runs[-1]["accepted"]
    assert shown_acceptance["reason"] == REASON and shown_acceptance["accepted_by"] == accepted["accepted_by"]
    assert [c["statistic"] for c in shown_acceptance["checks"]] == ["volume_change"]
    assert shown_acceptance["accepted_at"]


def test_a_night_without_events_after_a_week_without_any_is_held_back_too(
    database_url: str, sample_source: Path, tmp_path: Path
) -> None:
    """No trailing average to compare the empty night with, but history before it: the source stopped
    sending, which must not pass as "not measured" and publish the batch."""
    env = overnight_env(database_url, tmp_path / "var")
    night = NO_EVENTS_FOR_A_WEEK.isoformat()

    blocked = overnight("run", "--source", str(sample_source), "--date", night, env=env, check=False)
    assert blocked.returncode == 1, blocked.stderr[-2000:]
    assert last_line(blocked.stderr).startswith(
        f"overnight: error: batch 1 for {night} blocked by monitoring: no events on {night} nor in the 7 days "
        f"before it (the last event was on {SAMPLE_DATE}): the source may be incomplete; "
    )
    shown = overnight("drift", "--date", night, env=env).stdout
    assert f"fail  no events on {night} nor in the 7 days before it" in shown and not re.search(r"\binf\b", shown)

    # `overnight status` says the batch and its run were blocked, and at which step
    status = overnight("status", env=env).stdout.splitlines()
    batches, runs = status[status.index("recent batches:") + 1], status[status.index("recent runs:") + 1 :]
    assert re.fullmatch(
        rf"\s+1  {night}  blocked\s+[\d,]+ users  \(batch 1 for {night} blocked by monitoring: .*\)", batches
    )
    assert re.fullmatch(rf"\s+1  {night}  blocked\s+started [\d-]+ [\d:]+ UTC; step publish blocked", runs[0])

    published = overnight("publish", "--date", night, "--accept-checks", REASON, env=env)
    assert "accepted 1 failing check (volume_change)" in published.stdout, published.stdout
    runs = overnight("status", env=env).stdout.splitlines()
    assert runs[0].startswith(f"live: batch 2 for {night}")
    accepted = runs[runs.index("recent runs:") + 1]
    assert re.fullmatch(rf"\s+2  {night}  success\s+started .* UTC; failing checks accepted by \S+@\S+", accepted)


def test_the_dag_publishes_a_held_back_batch_with_its_accept_checks_param(
    database_url: str, sample_source: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    with pytest.raises(Exception, match="no events on"):
        nightly.run(nightly.night_of(settings, NO_EVENTS, sample_source))
    # The DAG's publish task as Airflow calls it, with the run's params and dag run.
    code = (
        "import json, sys\n"
        "from types import SimpleNamespace\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "dag = DagBag(dag_folder=sys.argv[1]).dags['overnight_nightly']\n"
        "assert dag.params['accept_checks'] is None\n"
        "from datetime import datetime, UTC\n"
        "from airflow.sdk.execution_time.context import set_current_context\n"
        "run_step = dag.get_task('publish').python_callable\n"
        "dag_run = SimpleNamespace(run_id='manual__accept', triggering_user_name='ops-alice', run_after=None)\n"
        "day = datetime.fromisoformat(sys.argv[2]).replace(tzinfo=UTC)\n"
        "with set_current_context({'dag_run': dag_run, 'logical_date': day}):\n"
        "    print(json.dumps(run_step('publish', params={'accept_checks': sys.argv[3]})))\n"
    )
    airflow_home = tmp_path / "airflow"
    env = {
        **overnight_env(database_url, settings.data_dir),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "dags"), NO_EVENTS.isoformat(), REASON],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(last_line(done.stdout))  # the task's return: the publish step's outcome
    assert "batch 2" in outcome["summary"] and ", live; accepted 1 failing check" in outcome["summary"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT batch_id FROM overnight.live").fetchone() == (outcome["batch_id"],)
        row = conn.execute("SELECT reason, accepted_by FROM overnight.monitor_acceptances").fetchone()
    assert row == (REASON, "ops-alice (airflow dag run manual__accept)")


def test_the_first_night_without_earlier_days_is_not_held_back(database_url: str, tmp_path: Path) -> None:
    # Two days of data from just after midnight: the night of the second day has no full day before it.
    data = generate(users=300, items=120, days=2, end_date=SAMPLE_DATE, seed=11, events_per_user=25)
    source = write_dataset(data, tmp_path / "source")
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, label_days=1)

    night = nightly.run(nightly.night_of(settings, SAMPLE_DATE, source))
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT batch_id FROM overnight.live").fetchone() == (night.batch_id,)
    volume = next(c for c in drift.report(settings, SAMPLE_DATE)["checks"] if c["statistic"] == "volume_change")
    assert volume["level"] == "ok" and volume["value"] is None
    assert volume["message"].startswith(f"volume_change: not measured: no full day of events before {SAMPLE_DATE}")


def test_overnight_run_takes_the_dags_params(database_url: str, sample_source: Path, tmp_path: Path) -> None:
    """`overnight run` and the DAG run the same steps with the same params: shards, accept_checks."""
    env = overnight_env(database_url, tmp_path / "var")
    night = NO_EVENTS.isoformat()
    source = str(sample_source)
    refused = overnight("run", "--source", source, "--date", night, "--accept-checks", " ", env=env, check=False)
    assert refused.returncode == 2 and "--accept-checks" in refused.stderr
    run = overnight("run", "--source", source, "--date", night, "--shards", "3", "--accept-checks", REASON, env=env)
    assert "in 3 shard(s)" in run.stdout and "accepted 1 failing check (volume_change)" in run.stdout, run.stdout
    status = json.loads(overnight("status", "--json", env=env).stdout)
    assert status["live"]["logical_date"] == night and status["recent_runs"][0]["status"] == "success"
    assert status["recent_runs"][0]["accepted"]["reason"] == REASON
