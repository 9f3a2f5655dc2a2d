"""Fixtures shared by every tier: a real Postgres, a fresh database per test, small generated data.

Tests use the Postgres at OVERNIGHT_TEST_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres);
when nothing answers there and the variable is unset, they start an embedded Postgres (pgserver)
for the session, so `make test` works on a machine without a database server.
"""

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from jobs.database import upgrade
from jobs.generate import generate, write_dataset

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MOVIELENS_100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    configured = os.environ.get("OVERNIGHT_TEST_ADMIN_URL")
    url = configured or DEFAULT_ADMIN_URL
    try:
        with psycopg.connect(url, connect_timeout=3):
            return url
    except psycopg.OperationalError:
        if configured:
            raise
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="delete")
    return str(server.get_uri())


def create_database(admin_url: str) -> str:
    name = f"overnight_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    return make_conninfo(admin_url, dbname=name)


def drop_database(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(str(name))))


@pytest.fixture
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A new database with the overnight schema migrated, dropped after the test."""
    url = create_database(postgres_admin_url)
    try:
        with psycopg.connect(url) as conn:
            upgrade(conn)
        yield url
    finally:
        drop_database(postgres_admin_url, url)


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated dataset (interactions.parquet + items.parquet) ending on SAMPLE_DATE."""
    data = generate(users=300, items=120, days=45, end_date=SAMPLE_DATE, seed=11, events_per_user=25)
    return write_dataset(data, tmp_path_factory.mktemp("sample"))


SAMPLE_DATE = date(2026, 11, 20)


OVERNIGHT = Path(sys.executable).with_name("overnight")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def overnight(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real `overnight` command, as a user would."""
    result = subprocess.run([str(OVERNIGHT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"overnight {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def overnight_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERNIGHT_")}
    return {**env, "OVERNIGHT_DATABASE_URL": database_url, "OVERNIGHT_DATA_DIR": str(data_dir), **extra}


@contextmanager
def running_service(env: dict[str, str], *args: str, ready_timeout: float = 30) -> Iterator[str]:
    """`overnight serve` on a free port of 127.0.0.1; yields its base URL once /readyz answers 200."""
    port = free_port()
    process = subprocess.Popen(
        [str(OVERNIGHT), "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"overnight serve exited {process.returncode}:\n{process.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"overnight serve was not ready within {ready_timeout}s")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serving_app(app: Any) -> Iterator[str]:
    """An ASGI app under uvicorn on a free localhost port, in a thread with its own event loop; yields its URL.

    Leaving the block runs the app's shutdown (lifespan) before returning.
    """
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", proxy_headers=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
