"""Integration fixtures: a lake with two scored days, built once per module and copied per test."""

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

import sql
from jobs import ingest, publish, registry, score, train
from jobs.settings import Settings
from serving.prediction_log import BulkWriter, EncodedBatch
from tests.conftest import SAMPLE_DATE, create_database, drop_database

PREVIOUS_DATE = SAMPLE_DATE - timedelta(days=1)


@dataclass(frozen=True)
class ScoredLake:
    data_dir: Path
    model: registry.ModelVersion
    dates: tuple[date, date]


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
            ingest.ingest(settings, sample_source, day)
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
    """Settings over a private copy of the scored lake and a fresh database that knows its model."""
    data_dir = tmp_path / "var"
    shutil.copytree(scored_lake.data_dir, data_dir)
    with psycopg.connect(database_url) as conn:
        registry.register(conn, scored_lake.model)
    return Settings(data_dir=data_dir, database_url=database_url, score_shards=2)


@pytest.fixture
def two_batches(batch_settings: Settings) -> tuple[int, int]:
    """(production, candidate): PREVIOUS_DATE's batch is live, SAMPLE_DATE's is published but not live."""
    candidate = publish.publish(batch_settings, SAMPLE_DATE, make_live=False).batch_id
    production = publish.publish(batch_settings, PREVIOUS_DATE, make_live=True).batch_id
    return production, candidate


def register_challenger(settings: Settings) -> registry.ModelVersion:
    """A second registered model, "challenger": the production model's artifact under another id, trained
    a day earlier (so it may score both days) and kept out by the gate (status candidate)."""
    with psycopg.connect(str(settings.database_url)) as conn:
        original = registry.production_model(conn)
        assert original is not None
        challenger = registry.with_status(
            replace(original, model_id="challenger", logical_date=original.logical_date - timedelta(days=1)),
            "candidate",
            "kept out by the gate",
        )
        registry.register(conn, challenger)
    return original


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


def losing_the_first_reply(writer: BulkWriter[Any]) -> None:
    """The writer's first write is committed, then fails as a reply lost on the way back would."""
    write = writer._write

    async def write_then_fail_once(batch: EncodedBatch) -> bool:
        stored = await write(batch)
        if writer.write_failures == 0:
            raise OSError("reply lost")
        return stored

    writer._write = write_then_fail_once  # type: ignore[method-assign]


def batch_status(settings: Settings, batch_id: int) -> str:
    """A batch's status (live, ready, canary, shadow, ...), as the database has it."""
    with psycopg.connect(str(settings.database_url)) as conn:
        row = conn.execute(sql.query("batch_by_id"), (batch_id,)).fetchone()
    assert row is not None
    return str(row[3])
