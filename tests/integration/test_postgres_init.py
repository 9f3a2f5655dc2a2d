"""deploy/postgres-init run as the postgres image runs it on the first start of an empty volume, then each
service's login, taken from docker-compose.yml, connecting over TCP with its password from .env.

On a Postgres of the test's own: the scripts create cluster-wide roles with fixed names (overnight,
overnight_serving, ...: the shared test server's databases use overnight_serving and overnight_console
too) and set the owner and rights of the `overnight` and `airflow` databases.
"""

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

import sql
from console.dashboard import connect_read_only, read_overview
from jobs.database import upgrade
from tests.support.commands import free_port
from tests.support.serving import Publisher

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INIT_DIR = ROOT / "deploy" / "postgres-init"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The image's server listens on the default Unix socket while the init scripts run; 02-roles.sh clears
# PGHOST, so its psql goes there (PGPORT tells this test's server from the shared one).
DEFAULT_SOCKET_DIR = Path("/var/run/postgresql")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}")


def env_example_names() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z_][A-Z0-9_]*=", line)}


def interpolated(value: str, env: dict[str, str]) -> str:
    """``value`` from docker-compose.yml with ``${NAME...}`` replaced as compose would from .env."""
    return _VARIABLE.sub(lambda match: env[match[1]], value)


@dataclass(frozen=True)
class InitialisedPostgres:
    """A new cluster after the image's first start: the init scripts ran with ``dotenv``'s values."""

    port: int
    dotenv: dict[str, str]

    def url(self, service: str, variable: str) -> str:
        """How ``service`` of docker-compose.yml connects (``variable``), pointed at this server."""
        compose_url = interpolated(COMPOSE["services"][service]["environment"][variable], self.dotenv)
        compose_url = re.sub(r"^postgresql\+\w+://", "postgresql://", compose_url)  # SQLAlchemy's driver
        params = conninfo_to_dict(compose_url)
        assert (params["host"], params["port"]) == ("postgres", "5432")
        return make_conninfo(compose_url, host="127.0.0.1", port=str(self.port))


def run_as_image(env: dict[str, str], port: int) -> None:
    """docker-entrypoint.sh's first start: create POSTGRES_DB, then each file of the init folder in name
    order, *.sql with psql as POSTGRES_USER in POSTGRES_DB and *.sh with bash, over the Unix socket."""
    user = env.get("POSTGRES_USER", "postgres")
    database = env.get("POSTGRES_DB", user)
    script_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG") and not key.startswith(("POSTGRES_", "OVERNIGHT_"))
    }
    script_env |= env | {
        "POSTGRES_USER": user,
        "POSTGRES_DB": database,
        "PGUSER": user,
        "PGPASSWORD": env["POSTGRES_PASSWORD"],
        "PGPORT": str(port),
        "PATH": f"{PG_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    psql = [str(PG_BIN / "psql"), "-v", "ON_ERROR_STOP=1", "--username", user, "--no-password", "--no-psqlrc"]
    if database != "postgres":
        subprocess.run(
            [*psql, "--dbname", "postgres", "--set", f"db={database}"],
            input='CREATE DATABASE :"db" ;',
            env=script_env,
            check=True,
            capture_output=True,
            text=True,
        )
    for script in sorted(INIT_DIR.iterdir()):
        if script.suffix == ".sh":
            command = ["bash", str(script)]
        elif script.suffix == ".sql":
            command = [*psql, "--dbname", database, "-f", str(script)]
        else:
            continue
        done = subprocess.run(command, env=script_env, capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def initialised() -> Iterator[InitialisedPostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"needs the PostgreSQL 15 server binaries in {PG_BIN}")
    if not DEFAULT_SOCKET_DIR.is_dir():
        pytest.skip(f"needs {DEFAULT_SOCKET_DIR}, libpq's default socket folder, for the init scripts' psql")
    # Passwords as an operator makes them (URL-safe, .env.example says), one for each name compose reads
    # from .env for the postgres service, each different, so a role given another's password shows.
    service_env: dict[str, str] = COMPOSE["services"]["postgres"]["environment"]
    names = {match[1] for value in service_env.values() for match in _VARIABLE.finditer(str(value))}
    assert names <= env_example_names(), "the postgres service reads a variable .env.example does not list"
    dotenv = {name: secrets.token_hex(16) for name in names}
    env = {key: interpolated(str(value), dotenv) for key, value in service_env.items()}

    folder = Path(tempfile.mkdtemp(prefix="overnight-init-pg-"))  # as root, tmp_path is closed to postgres
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data_dir = folder / "data"
    (folder / "pwfile").write_text(env["POSTGRES_PASSWORD"])
    if run_as:
        shutil.chown(folder / "pwfile", "postgres")
    # as the image: trust on the socket, passwords (scram) over TCP
    initdb = [str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", env.get("POSTGRES_USER", "postgres")]
    initdb += ["--pwfile", str(folder / "pwfile"), "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]
    subprocess.run([*run_as, *initdb], check=True, capture_output=True)
    port = free_port()
    options = f"-p {port} -k {folder},{DEFAULT_SOCKET_DIR} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-w", "-t", "30"]
    subprocess.run([*ctl, "-o", options, "-l", str(folder / "log"), "start"], check=True, capture_output=True)
    try:
        run_as_image(env, port)
        yield InitialisedPostgres(port, dotenv)
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def published(initialised: InitialisedPostgres) -> int:
    """airflow-init's `overnight db upgrade`, then a batch published, both as the owner role Airflow uses."""
    owner_url = initialised.url("airflow-init", "OVERNIGHT_DATABASE_URL")
    assert conninfo_to_dict(owner_url)["user"] == "overnight"
    with psycopg.connect(owner_url) as conn:
        assert upgrade(conn)
    return Publisher(owner_url).publish({"u1": ["i1", "i2"], "u2": ["i3"]})


def attributes(conn: psycopg.Connection[Any]) -> tuple[bool, bool, bool]:
    row = conn.execute(
        "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    return row


# What a role reading the overnight database must never do, each in a transaction of its own.
WRITES = [
    "CREATE TABLE overnight.intruder (x int)",
    "CREATE TABLE public.intruder (x int)",
    "CREATE SCHEMA intruder",
    "CREATE TEMPORARY TABLE intruder (x int)",
    "INSERT INTO overnight.live (singleton, batch_id) VALUES (true, 1)",
    "UPDATE overnight.batches SET k = 1",
    "DELETE FROM overnight.model_versions",
    "TRUNCATE overnight.runs",
    "ALTER TABLE overnight.batches ADD COLUMN intruder int",
    "DROP TABLE overnight.batches",
]


def assert_cannot_write(url: str, also: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in [*WRITES, *also]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())


def test_the_owner_role_owns_both_databases_and_is_no_superuser(
    initialised: InitialisedPostgres, published: int
) -> None:
    owner_url = initialised.url("airflow-init", "OVERNIGHT_DATABASE_URL")
    airflow_url = initialised.url("airflow-worker", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    for url in (owner_url, airflow_url):
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("overnight",)
            assert attributes(conn) == (False, False, False)
            owner = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            ).fetchone()
            assert owner == ("overnight",)


def test_the_lookup_login_reads_and_appends_to_the_online_logs_and_nothing_more(
    initialised: InitialisedPostgres, published: int
) -> None:
    url = initialised.url("lookup", "OVERNIGHT_DATABASE_URL")
    assert conninfo_to_dict(url)["user"] == "overnight_lookup"
    wrong = make_conninfo(url, password=initialised.dotenv["OVERNIGHT_DB_PASSWORD"])
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()
    with psycopg.connect(url) as conn:
        assert attributes(conn) == (False, False, False)
        assert conn.execute("SELECT pg_has_role('overnight_serving', 'MEMBER')").fetchone() == (True,)
        # what the service does: its session, the live batch, a batch's lists, the feedback it receives
        conn.execute(sql.query("serving_session"), ("1000",))
        batches = conn.execute(sql.query("serving_batches")).fetchall()
        assert [(row[0], row[1]) for row in batches] == [("production", published)]
        lists = conn.execute(sql.batch_query("recs_for_users", published), (["u1", "u2"],)).fetchall()
        assert sorted((row[0], row[1]) for row in lists) == [("u1", ["i1", "i2"]), ("u2", ["i3"])]
        rows = [["2026-11-20T10:00:00Z", "2026-11-20T10:00:01Z", "u1", "i1", "click", None]]
        conn.execute(
            sql.query("insert_feedback_events"), {"write_id": secrets.token_hex(8), "count": 1, "rows": Jsonb(rows)}
        )
        conn.commit()
    recs = sql.batch_table(published, "recs")
    assert_cannot_write(
        url,
        [
            pgsql.SQL("INSERT INTO {} (user_id) VALUES ('u9')").format(recs).as_string(None),
            "UPDATE overnight.feedback_events SET user_id = 'u9'",
            "DELETE FROM overnight.feedback_events",
        ],
    )
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(make_conninfo(url, dbname="airflow")).close()


def test_the_console_login_reads_the_dashboard_and_nothing_more(
    initialised: InitialisedPostgres, published: int
) -> None:
    url = initialised.url("console", "OVERNIGHT_CONSOLE_DATABASE_URL")
    assert conninfo_to_dict(url)["user"] == "overnight_console_login"
    with psycopg.connect(url) as conn:
        assert attributes(conn) == (False, False, False)
        assert conn.execute("SELECT pg_has_role('overnight_console', 'MEMBER')").fetchone() == (True,)

    async def overview() -> dict[str, Any]:
        async with await connect_read_only(url) as conn:
            return await read_overview(conn, None)

    assert "runs" in asyncio.run(overview())
    recs = sql.batch_table(published, "recs")
    with psycopg.connect(url, autocommit=True) as conn:
        # neither a batch's lists nor the online logs: only what the dashboard shows
        for table in (recs, pgsql.SQL("overnight.feedback_events")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(pgsql.SQL("SELECT 1 FROM {}").format(table))
    assert_cannot_write(url, ["INSERT INTO overnight.feedback_events (user_id) VALUES ('u9')"])
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(make_conninfo(url, dbname="airflow")).close()
