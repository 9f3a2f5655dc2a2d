"""Fault injection: SIGKILL a score shard, and publish at two points between COPY and the switch.

Each fault runs the real `overnight` command while the lookup service serves the previous batch on
a real socket. Publish is stopped at an exact point by a lock the test holds (it blocks there like
a slow database would), then killed with SIGKILL. Afterwards production must still serve the
previous batch, and a plain re-run must complete and leave no orphan table behind.
"""

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support.commands import OVERNIGHT, overnight, overnight_env, running_service
from tests.support.dags import run_dag
from tests.support.data import SAMPLE_DATE
from tests.support.databases import create_database, drop_database
from tests.support.webhooks import recording_webhook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREVIOUS = SAMPLE_DATE - timedelta(days=1)
KEY = "fault-test-key"
LIVE_LOCK = 7368224362352640001  # sql/queries/publish.sql lock_live
HOLD_READY_LOCK = 4242


@dataclass
class Production:
    database_url: str
    env: dict[str, str]
    service: str

    def served_batch(self) -> int:
        response = httpx.get(
            f"{self.service}/v1/users/1/recommendations", headers={"Authorization": f"Bearer {KEY}"}, timeout=5
        )
        assert response.status_code == 200, response.text
        return int(response.headers["X-Batch-Id"])

    def live_batch(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            return int(conn.execute("SELECT batch_id FROM overnight.live").fetchone()[0])  # type: ignore[index]

    def batch_status(self, batch_id: int) -> str:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT status FROM overnight.batches WHERE batch_id = %s", (batch_id,)).fetchone()
        assert row is not None
        return str(row[0])

    def newest_batch(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            return int(conn.execute("SELECT max(batch_id) FROM overnight.batches").fetchone()[0])  # type: ignore[index]

    def assert_no_orphans(self) -> None:
        """Every recs_ table belongs to a kept batch, every kept batch has its table, nothing is loading."""
        with psycopg.connect(self.database_url) as conn:
            tables = {
                int(name.removeprefix("recs_"))
                for (name,) in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'overnight' AND tablename LIKE 'recs\\_%'"
                )
            }
            kept = {
                batch_id
                for (batch_id,) in conn.execute(
                    "SELECT batch_id FROM overnight.batches WHERE status IN ('live', 'ready', 'retired')"
                )
            }
            loading = conn.execute("SELECT count(*) FROM overnight.batches WHERE status = 'loading'").fetchone()
        assert tables == kept
        assert loading == (0,)

    def rerun_publish_goes_live(self) -> int:
        overnight("publish", "--date", str(SAMPLE_DATE), env=self.env)
        batch = self.live_batch()
        deadline = time.monotonic() + 15  # the service follows LISTEN/NOTIFY (and polls every 5 s)
        while self.served_batch() != batch:
            assert time.monotonic() < deadline, "the service did not pick up the re-published batch"
            time.sleep(0.2)
        self.assert_no_orphans()
        return batch


@pytest.fixture(scope="module")
def production(
    postgres_admin_url: str, sample_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Production]:
    """PREVIOUS is live and served; SAMPLE_DATE is ingested and scored, ready to publish."""
    database_url = create_database(postgres_admin_url)
    env = overnight_env(
        database_url,
        tmp_path_factory.mktemp("faults") / "var",
        OVERNIGHT_API_KEYS=KEY,
        OVERNIGHT_NUM_BOOST_ROUND="30",
    )
    try:
        overnight("run", "--source", str(sample_source), "--date", str(PREVIOUS), env=env)
        overnight("ingest", "--source", str(sample_source), "--date", str(SAMPLE_DATE), env=env)
        for step in ("candidates", "features"):
            overnight(step, "--date", str(SAMPLE_DATE), env=env)
        overnight("score", "--date", str(SAMPLE_DATE), "--shards", "2", env=env)
        overnight("monitor", "--date", str(SAMPLE_DATE), env=env)  # publish's gate reads what it records
        with running_service(env) as service:
            yield Production(database_url, env, service)
    finally:
        drop_database(postgres_admin_url, database_url)


def _wait_for_publish_blocked(database_url: str, process: subprocess.Popen[str], timeout: float = 60) -> int:
    """The backend pid of publish once it waits on the test's advisory lock; fails if publish ended first."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while not (
            row := conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'"
            ).fetchone()
        ):
            assert process.poll() is None, f"publish ended before the fault point:\n{process.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "publish never reached the fault point"
            time.sleep(0.05)
    return int(row[0])


def _killed_publish(production: Production, hold: str) -> int:
    """Start publish, let it block on the lock ``hold`` takes, SIGKILL it; returns the batch it was loading."""
    with psycopg.connect(production.database_url, autocommit=True) as holder:
        holder.execute(hold)
        process = subprocess.Popen(
            [str(OVERNIGHT), "publish", "--date", str(SAMPLE_DATE)],
            env=production.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        blocked = _wait_for_publish_blocked(production.database_url, process)
        batch = production.newest_batch()
        assert production.served_batch() == production.live_batch() != batch  # the old batch is served meanwhile
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
        # the dead client's server backend ends as soon as its blocked statement returns
        holder.execute("SELECT pg_advisory_unlock_all()")
        deadline = time.monotonic() + 10
        while holder.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (blocked,)).fetchone():
            assert time.monotonic() < deadline, "the killed publish's backend did not end"
            time.sleep(0.05)
    return batch


def test_a_killed_score_shard_leaves_production_serving_and_a_rerun_completes(production: Production) -> None:
    served = production.served_batch()
    shard_files = sorted(_scores(production).glob("shard-00000-of-00002.*"))
    assert shard_files
    for path in shard_files:  # as if this shard had never run for the date
        path.unlink()
    process = subprocess.Popen(
        [str(OVERNIGHT), "score", "--date", str(SAMPLE_DATE), "--shards", "2", "--shard", "0"],
        env=production.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:  # type: ignore[union-attr]
        if "score shard 0/2:" in line:  # its users are ranked; next it writes them
            process.send_signal(signal.SIGKILL)
            break
    assert process.wait(timeout=60) == -signal.SIGKILL

    assert production.served_batch() == served == production.live_batch()
    if not (_scores(production) / "shard-00000-of-00002.json").exists():  # killed before its manifest
        refused = overnight("publish", "--date", str(SAMPLE_DATE), env=production.env, check=False)
        assert refused.returncode == 1
        assert "missing 1 shard(s) of 2: 0;" in refused.stderr
        assert production.served_batch() == served
    overnight("score", "--date", str(SAMPLE_DATE), "--shards", "2", "--shard", "0", env=production.env)  # the retry
    assert production.rerun_publish_goes_live() != served


def _scores(production: Production) -> Path:
    return Path(production.env["OVERNIGHT_DATA_DIR"]) / "work" / f"date={SAMPLE_DATE}" / "scores"


def test_publish_killed_after_copy_while_loading_is_cleaned_up_by_the_rerun(production: Production) -> None:
    served = production.served_batch()
    with psycopg.connect(production.database_url, autocommit=True) as conn:
        # marks 'ready' wait for the test's lock: publish stops after COPY, key and validation
        conn.execute(
            "CREATE FUNCTION public.hold_ready() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({HOLD_READY_LOCK}); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER hold_ready BEFORE UPDATE ON overnight.batches FOR EACH ROW "
            "WHEN (NEW.status = 'ready') EXECUTE FUNCTION public.hold_ready()"
        )
    try:
        killed = _killed_publish(production, f"SELECT pg_advisory_lock({HOLD_READY_LOCK})")
    finally:
        with psycopg.connect(production.database_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER hold_ready ON overnight.batches")
            conn.execute("DROP FUNCTION public.hold_ready()")

    assert production.batch_status(killed) == "loading"  # half-published: its loader is gone
    assert production.served_batch() == served == production.live_batch()
    assert production.rerun_publish_goes_live() not in (served, killed)
    assert production.batch_status(killed) == "failed"  # the orphan was found and its table dropped


def test_publish_killed_between_copy_and_switch_is_replaced_by_the_rerun(production: Production) -> None:
    served = production.served_batch()
    killed = _killed_publish(production, f"SELECT pg_advisory_lock({LIVE_LOCK})")
    assert production.batch_status(killed) == "ready"  # loaded and valid, never switched to
    assert production.served_batch() == served == production.live_batch()
    assert production.rerun_publish_goes_live() not in (served, killed)
    assert production.batch_status(killed) == "dropped"  # the re-run of the date replaced it


def test_the_freshness_dag_fails_loudly_and_posts_to_the_webhook_when_live_is_stale_and_short(
    production: Production, tmp_path: Path
) -> None:
    live = production.live_batch()
    with psycopg.connect(production.database_url) as conn:  # lose a row of what is served
        conn.execute(
            f"DELETE FROM overnight.recs_{live} WHERE user_id = (SELECT min(user_id) FROM overnight.recs_{live})"
        )
    with recording_webhook("/alert") as webhook:
        env = {**production.env, "OVERNIGHT_ALERT_WEBHOOK_URL": webhook.url, "OVERNIGHT_MAX_AGE_HOURS": "0.0001"}
        result = run_dag("overnight_freshness", str(SAMPLE_DATE), env, tmp_path / "airflow")
    assert result.returncode == 1
    assert "STATE failed" in result.stdout
    problem = f"live batch {live} ("
    assert problem in result.stdout + result.stderr
    assert len(webhook.received) == 1, webhook.received
    alert = webhook.received[0]
    assert alert["title"] == "overnight_freshness.check_freshness failed"
    assert problem in alert["text"] and "h old (limit 0.0001 h)" in alert["text"]
    assert "rows but" in alert["error"]  # the missing row is named too
    production.rerun_publish_goes_live()  # a whole batch again for whatever runs next
