"""`overnight_nightly` on Airflow's CeleryExecutor with Redis and two Celery workers: the mapped score
shards run on both workers, and publish runs after all of them.

Real services throughout: a fresh Postgres database for Airflow's metadata (and Celery's results),
the Redis at 127.0.0.1:6379 as the broker (a queue of this test's own), an S3-compatible server
(moto's) whose bucket holds the data folder, and the api-server, scheduler, dag-processor and two
`airflow celery worker` processes started here. The workers share only the bucket: each has a local
folder of its own, as two machines would.
"""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.support.commands import free_port, overnight_env
from tests.support.dags import DAGS_FOLDER
from tests.support.data import SAMPLE_DATE
from tests.support.databases import create_database, drop_database
from tests.support.object_storage import S3Server
from tests.support.object_storage import s3_fixture as s3_fixture  # the `s3` fixture

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).with_name("airflow")
REDIS = ("127.0.0.1", 6379)
SHARDS = 6
# An Airflow task holds its Celery slot for a few seconds after it has finished (the task runner's
# wind-down): with one slot per worker, a worker still winding down its previous task can miss
# every shard. Two slots each, and more shards than slots in all.
WORKER_SLOTS = 2
WORKERS = ("worker-a", "worker-b")
RUN_ID = "celery-distribution"


def redis_answers() -> bool:
    try:
        with socket.create_connection(REDIS, timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def sqlalchemy_url(conninfo: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = parts.get("user", "postgres")
    password = f":{parts['password']}" if parts.get("password") else ""
    where = f"{parts.get('host', '127.0.0.1')}:{parts.get('port', 5432)}"
    return f"postgresql+psycopg://{user}{password}@{where}/{parts['dbname']}"


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A service process in a session of its own, so that it and the children it forks are stopped together."""
    with log.open("wb") as out:
        started = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield started
    finally:
        try:
            os.killpg(started.pid, 15)
            started.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(started.pid, 9)
            started.wait()


def airflow(*args: str, env: dict[str, str]) -> None:
    result = subprocess.run([str(AIRFLOW), *args], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")


def logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("*.log")))


def reported_ready(name: str, log: Path) -> bool:
    """Celery logs ``<name>@<host> ready.`` once the worker consumes from its queue."""
    return log.exists() and re.search(rf"\b{name}@\S+ ready\.", log.read_text(errors="replace")) is not None


def wait_for(condition, timeout: float, what: str, folder: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f}s\n{logs(folder)}")
        time.sleep(2)


@pytest.mark.skipif(not redis_answers(), reason=f"no Redis answering at {REDIS[0]}:{REDIS[1]}")
def test_score_shards_run_on_both_celery_workers(
    postgres_admin_url: str, database_url: str, sample_source: Path, tmp_path: Path, s3: S3Server
) -> None:
    bucket = s3.new_bucket()
    airflow_db = create_database(postgres_admin_url)
    metadata = sqlalchemy_url(airflow_db)
    port = free_port()
    folder = tmp_path / "logs"
    folder.mkdir()
    env = {
        **overnight_env(database_url, Path(), OVERNIGHT_SOURCE=str(sample_source)),
        **s3.environment(),
        "OVERNIGHT_DATA_DIR": f"s3://{bucket}/nightly",
        "OVERNIGHT_LOCAL_DIR": str(tmp_path / "scheduler"),
        "PYTHONPATH": str(ROOT),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the run this test triggers, no scheduled ones
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": metadata,  # psycopg 3 does async too; no asyncpg needed
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_SLOTS),
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        # a queue of this run's own: other runs may share the Redis
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"overnight-test-{secrets.token_hex(6)}",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
    }
    queue = env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]
    try:
        airflow("db", "migrate", env=env)
        with ExitStack() as services:
            services.enter_context(
                process([str(AIRFLOW), "api-server", "--port", str(port)], env, folder / "api-server.log")
            )
            services.enter_context(process([str(AIRFLOW), "dag-processor"], env, folder / "dag-processor.log"))
            services.enter_context(process([str(AIRFLOW), "scheduler"], env, folder / "scheduler.log"))
            for name in WORKERS:
                worker_env = {
                    **env,
                    "OVERNIGHT_LOCAL_DIR": str(tmp_path / name),
                    "OVERNIGHT_TEST_WORKER_NAME": name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.support.celery_worker_name.hostname",
                }
                command = [
                    str(AIRFLOW),
                    "celery",
                    "worker",
                    "-q",
                    queue,
                    "-H",
                    f"{name}@%h",
                    "-c",
                    str(WORKER_SLOTS),
                    "-s",
                ]
                services.enter_context(process(command, worker_env, folder / f"{name}.log"))

            def dag_is_known() -> bool:
                with psycopg.connect(airflow_db) as conn:
                    found = conn.execute(
                        "SELECT count(*) FROM serialized_dag WHERE dag_id = 'overnight_nightly'"
                    ).fetchone()
                return bool(found and found[0])

            wait_for(dag_is_known, 180, "the dag-processor did not serialize overnight_nightly", folder)

            # A worker still starting when the shards are queued leaves them all to the other one.
            def workers_ready() -> bool:
                return all(reported_ready(name, folder / f"{name}.log") for name in WORKERS)

            wait_for(workers_ready, 180, "the Celery workers did not report ready", folder)
            airflow(
                "dags",
                "trigger",
                "overnight_nightly",
                "--run-id",
                RUN_ID,
                "--logical-date",
                f"{SAMPLE_DATE.isoformat()}T00:00:00+00:00",
                "--conf",
                json.dumps({"shards": SHARDS}),
                env=env,
            )

            def run_state() -> str | None:
                with psycopg.connect(airflow_db) as conn:
                    row = conn.execute("SELECT state FROM dag_run WHERE run_id = %s", (RUN_ID,)).fetchone()
                return row[0] if row else None

            wait_for(lambda: run_state() in ("success", "failed"), 600, "the run did not finish", folder)
            with psycopg.connect(airflow_db) as conn:
                tasks = conn.execute(
                    "SELECT task_id, map_index, state, hostname, start_date, end_date FROM task_instance"
                    " WHERE dag_id = 'overnight_nightly' AND run_id = %s",
                    (RUN_ID,),
                ).fetchall()
            assert run_state() == "success", f"{tasks}\n{logs(folder)}"
            day = f"{bucket}/nightly/work/date={SAMPLE_DATE.isoformat()}/scores"
            manifests = s3.filesystem().glob(f"{day}/shard-*-of-{SHARDS:05d}.json")
    finally:
        drop_database(postgres_admin_url, airflow_db)

    shards = [t for t in tasks if t[0] == "score"]
    assert sorted(t[1] for t in shards) == list(range(SHARDS))
    assert {t[2] for t in shards} == {"success"}
    schedule = "\n".join(
        f"{t[0]}[{t[1]}] on {t[3]}: {t[4]:%H:%M:%S.%f} - {t[5]:%H:%M:%S.%f}" for t in sorted(tasks, key=lambda t: t[4])
    )
    assert {t[3] for t in shards} == set(WORKERS), f"shards ran on {[t[3] for t in shards]}\n{schedule}"
    assert len(manifests) == SHARDS, manifests
    for name in WORKERS:  # each scored from its own copy of the model, fetched from the bucket
        assert list((tmp_path / name / "models").glob("*/model.txt")), f"{name} has no local copy of the model"
        assert not (tmp_path / name / "lake").exists()
    publish = next(t for t in tasks if t[0] == "publish")
    assert publish[4] >= max(t[5] for t in shards), "publish started before every shard had finished"
    with psycopg.connect(database_url) as conn:
        live = conn.execute(
            "SELECT b.logical_date, b.users_scored FROM overnight.live JOIN overnight.batches b USING (batch_id)"
        ).fetchone()
    assert live is not None and live[0] == SAMPLE_DATE and live[1] > 0
