"""Integration fixtures: a lake with two scored days, built once per module and copied per test."""

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from jobs import registry
from jobs.monitoring import drift
from jobs.settings import Settings
from jobs.steps import publish, score, train
from tests.support.batches import ScoredLake, ingest_and_prepare
from tests.support.console import console_login
from tests.support.data import PREVIOUS_DATE, SAMPLE_DATE
from tests.support.databases import create_database, drop_database


@pytest.fixture(scope="module")
def scored_lake(
    tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str, sample_source: Path
) -> Iterator[ScoredLake]:
    """Ingested, trained (for the earlier day) and scored for both days, with 2 shards."""
    data_dir = tmp_path_factory.mktemp("scored") / "var"
    url = create_database(postgres_admin_url)
    try:
        settings = Settings(data_dir=data_dir, database_url=url, score_shards=2)
        for day in (PREVIOUS_DATE, SAMPLE_DATE):
            ingest_and_prepare(settings, sample_source, day)
        trained = train.train(settings, PREVIOUS_DATE)
        for day in (PREVIOUS_DATE, SAMPLE_DATE):
            score.score(settings, day)
        with psycopg.connect(url) as conn:
            model = registry.model_by_id(conn, trained.model_id)
        assert model is not None
        yield ScoredLake(data_dir=data_dir, model=model, dates=(PREVIOUS_DATE, SAMPLE_DATE))
    finally:
        drop_database(postgres_admin_url, url)


@pytest.fixture
def batch_settings(scored_lake: ScoredLake, database_url: str, tmp_path: Path) -> Settings:
    """Settings over a private copy of the scored lake and a fresh database that knows its model and
    the monitoring of both days."""
    data_dir = tmp_path / "var"
    shutil.copytree(scored_lake.data_dir, data_dir)
    with psycopg.connect(database_url) as conn:
        registry.register(conn, scored_lake.model)
    settings = Settings(data_dir=data_dir, database_url=database_url, score_shards=2)
    # What publish's gate reads, as the monitor step records it; without a retrain request, which the
    # tests of retraining make themselves.
    quiet = settings.model_copy(update={"drift_retrain_psi": float("inf")})
    for day in scored_lake.dates:
        drift.monitor_input(quiet, day)
    return settings


@pytest.fixture
def two_batches(batch_settings: Settings) -> tuple[int, int]:
    """(production, candidate): PREVIOUS_DATE's batch is live, SAMPLE_DATE's is published but not live."""
    candidate = publish.publish_nightly(batch_settings, SAMPLE_DATE, make_live=False).batch_id
    production = publish.publish_nightly(batch_settings, PREVIOUS_DATE, make_live=True).batch_id
    return production, candidate


@pytest.fixture
def console_dsn(database_url: str) -> Iterator[str]:
    """The database as the console logs in to it, in the overnight_console role (migration 0018)."""
    with console_login(database_url) as dsn:
        yield dsn


@pytest.fixture
def serving_login(database_url: str) -> Iterator[str]:
    """The database as the lookup service logs in to it: a login role in overnight_serving (made by
    migration 0003), as an operator would create one."""
    role = f"overnight_api_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN IN ROLE overnight_serving").format(pgsql.Identifier(role)))
    try:
        yield make_conninfo(database_url, user=role)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(pgsql.Identifier(role)))
