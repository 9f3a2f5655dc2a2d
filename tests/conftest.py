"""Fixtures shared by every tier: a real Postgres, a fresh database per test, small generated data.

Tests use the Postgres at OVERNIGHT_TEST_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres);
when nothing answers there and the variable is unset, they start an embedded Postgres (pgserver)
for the session, so `make test` works on a machine without a database server.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from jobs.database import upgrade
from jobs.dev.generate import generate, write_dataset
from tests.support.data import SAMPLE_DATE
from tests.support.databases import DEFAULT_ADMIN_URL, create_database, drop_database


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
