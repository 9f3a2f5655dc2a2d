"""The real `overnight_nightly` DAG through `dag.test()` on small generated data, then a lookup over HTTP."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from jobs.steps.features import FEATURES
from tests.support.commands import overnight, overnight_env, running_service
from tests.support.dags import run_dag
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.e2e


def test_nightly_dag_publishes_a_batch_that_the_service_serves(
    database_url: str, sample_source: Path, tmp_path: Path
) -> None:
    env = overnight_env(
        database_url,
        tmp_path / "var",
        OVERNIGHT_SOURCE=str(sample_source),
        OVERNIGHT_SCORE_SHARDS="3",
        OVERNIGHT_API_KEYS="dag-test-key",
    )
    result = run_dag("overnight_nightly", SAMPLE_DATE.isoformat(), env, tmp_path / "airflow")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("STATE success")

    with psycopg.connect(database_url) as conn:
        batch_id, logical_date, status = conn.execute(
            "SELECT b.batch_id, b.logical_date, b.status FROM overnight.live JOIN overnight.batches b USING (batch_id)"
        ).fetchone()  # type: ignore[misc]
        shards = conn.execute("SELECT count(*) FROM overnight.model_versions").fetchone()
        runs = conn.execute("SELECT run_id, trigger, status, logical_date, batch_id FROM overnight.runs").fetchall()
        steps = {
            step: rest
            for step, *rest in conn.execute(
                "SELECT step, status, seconds > 0, peak_memory_bytes > 0, rows_out FROM overnight.run_steps"
            ).fetchall()
        }
        drift_checks = conn.execute(
            "SELECT count(*) FROM overnight.monitor_checks WHERE stage = 'drift' AND logical_date = %s", (SAMPLE_DATE,)
        ).fetchone()
    assert (logical_date, status) == (SAMPLE_DATE, "live")
    assert shards == (1,)
    scores = sorted((tmp_path / "var" / "work" / f"date={SAMPLE_DATE}" / "scores").glob("shard-*-of-00003.parquet"))
    assert len(scores) == 3  # the mapped score task ran once per shard

    # run history: one row for the dag run, one per task (per map index for the shards), from the hooks
    assert [r[1:] for r in runs] == [("airflow", "success", SAMPLE_DATE, batch_id)]
    recorded = {"ingest", "train", "plan-score", "score[0]", "score[1]", "score[2]", "monitor", "publish"}
    assert recorded | {"check-freshness", "online"} <= set(steps)
    assert all(measured[:3] == ["success", True, True] for measured in steps.values()), steps
    assert steps["publish"][3] == sum(steps[f"score[{i}]"][3] for i in range(3)) > 0  # users scored = published
    assert drift_checks is not None and drift_checks[0] == 2 * len(FEATURES)  # PSI and KS of each feature

    with running_service(env) as base:
        headers = {"Authorization": "Bearer dag-test-key"}
        known = httpx.get(f"{base}/v1/users/1/recommendations", params={"k": 5}, headers=headers)
        assert known.status_code == 200
        assert known.json()["source"] == "personalized"
        assert known.json()["batch_id"] == batch_id
        assert len(known.json()["items"]) == 5
        unknown = httpx.get(f"{base}/v1/users/nobody-knows-me/recommendations", headers=headers)
        assert unknown.status_code == 200
        assert unknown.json()["source"] == "fallback"

    # The same night again with a shadow model (any registered model: here the one just trained):
    # the DAG also scores it into a shadow batch, and what is live stays a serving batch.
    with psycopg.connect(database_url) as conn:
        (model_id,) = conn.execute("SELECT model_id FROM overnight.model_versions").fetchone()  # type: ignore[misc]
    rerun = run_dag(
        "overnight_nightly", SAMPLE_DATE.isoformat(), {**env, "OVERNIGHT_SHADOW_MODEL": model_id}, tmp_path / "airflow"
    )
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    with psycopg.connect(database_url) as conn:
        batches = conn.execute(
            "SELECT b.kind, b.status, b.model_id, b.users_scored, b.batch_id = l.batch_id "
            "FROM overnight.batches AS b, overnight.live AS l WHERE b.batch_id > %s ORDER BY b.batch_id",
            (batch_id,),
        ).fetchall()
    assert [row[:3] for row in batches] == [("serving", "live", model_id), ("shadow", "shadow", model_id)]
    assert batches[1][3] == batches[0][3] > 0 and batches[1][4] is False
    with psycopg.connect(database_url) as conn:
        night = conn.execute(
            "SELECT r.status, r.batch_id = l.batch_id FROM overnight.runs AS r, overnight.live AS l "
            "ORDER BY r.run_id DESC LIMIT 1"
        ).fetchone()
    assert night == ("success", True)  # the run history names the night's serving batch, not the shadow

    # The next day has no events: monitoring blocks its publish, the online upkeep still runs and succeeds,
    # and yet the dag run fails (its watcher task) and the run history reads blocked, as `overnight run` would.
    empty_day = SAMPLE_DATE + timedelta(days=1)
    blocked = run_dag(
        "overnight_nightly", empty_day.isoformat(), {**env, "OVERNIGHT_RETRAIN_DAYS": "7"}, tmp_path / "airflow"
    )
    assert blocked.returncode == 1 and blocked.stdout.strip().endswith("STATE failed"), blocked.stdout[-4000:]
    with psycopg.connect(database_url) as conn:
        status, error, run_id = conn.execute(
            "SELECT status, error, run_id FROM overnight.runs WHERE logical_date = %s", (empty_day,)
        ).fetchone()  # type: ignore[misc]
        steps = dict(conn.execute("SELECT step, status FROM overnight.run_steps WHERE run_id = %s", (run_id,)))
    assert status == "blocked" and f"no events on {empty_day}" in error
    assert (steps["publish"], steps["online"], steps["train"]) == ("blocked", "success", "success")
    assert "watcher" not in steps  # not a step: it only fails the dag run


def test_freshness_dag_fails_when_nothing_is_live(database_url: str, tmp_path: Path) -> None:
    env = overnight_env(database_url, tmp_path / "var")
    result = run_dag("overnight_freshness", SAMPLE_DATE.isoformat(), env, tmp_path / "airflow")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "nothing is live: no batch has been published yet" in output
    assert "STATE failed" in result.stdout


def test_a_nightly_run_of_a_future_date_is_refused_with_the_reason(database_url: str, tmp_path: Path) -> None:
    """The REST API and the trigger form take any logical_date; a future one (a typo a year ahead) would go
    live and hold every real night back as a backfill. The CLI refuses it as a usage error, the DAG here."""
    env = overnight_env(database_url, tmp_path / "var")
    future = (datetime.now(UTC).date() + timedelta(days=2)).isoformat()
    result = run_dag("overnight_nightly", future, env, tmp_path / "airflow")
    assert result.returncode == 1 and result.stdout.strip().endswith("STATE failed"), result.stdout[-4000:]
    assert f"{future} is after today" in result.stdout + result.stderr
    assert json.loads(overnight("status", "--json", env=env).stdout)["live"] is None
