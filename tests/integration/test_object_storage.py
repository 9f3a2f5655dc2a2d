"""OVERNIGHT_DATA_DIR=s3://bucket/prefix against a real S3-compatible server (moto's, its own process):
the same night as on a local folder, the same published batch, and writes a reader never sees half of."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import s3fs
from psycopg import sql as pgsql

import sql
from jobs import lake, registry, storage
from jobs.errors import MissingDataError
from jobs.settings import Settings
from tests.support.commands import overnight, overnight_env
from tests.support.data import SAMPLE_DATE
from tests.support.databases import create_database, drop_database
from tests.support.lake_files import assert_a_writer_dying_midway_leaves_the_old_file_alone
from tests.support.object_storage import S3Server
from tests.support.object_storage import s3_fixture as s3_fixture  # the `s3` fixture

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server as this process's object store, for the tests that call the batch code in-process."""
    for name, value in s3.environment().items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made earlier may point at another test's server
    return s3


@dataclass(frozen=True)
class Night:
    database_url: str
    data_dir: str
    local_dir: Path


def run_night(database_url: str, data_dir: str, local_dir: Path, sample_source: Path, **extra: str) -> Night:
    env = overnight_env(database_url, Path(), OVERNIGHT_DATA_DIR=data_dir, OVERNIGHT_LOCAL_DIR=str(local_dir), **extra)
    overnight("run", "--source", str(sample_source), "--date", SAMPLE_DATE.isoformat(), env=env)
    return Night(database_url, data_dir, local_dir)


@pytest.fixture(scope="module")
def local_night(
    postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory, sample_source: Path
) -> Iterator[Night]:
    """`overnight run` on a local folder, as always."""
    url = create_database(postgres_admin_url)
    try:
        root = tmp_path_factory.mktemp("local-night")
        yield run_night(url, str(root / "var"), root / "unused", sample_source)
    finally:
        drop_database(postgres_admin_url, url)


@pytest.fixture(scope="module")
def bucket_night(
    s3: S3Server, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory, sample_source: Path
) -> Iterator[Night]:
    """The same `overnight run` with the data folder in a bucket and this machine's folder apart."""
    url = create_database(postgres_admin_url)
    try:
        root = tmp_path_factory.mktemp("bucket-night")
        data_dir = f"s3://{s3.new_bucket()}/nightly"
        yield run_night(url, data_dir, root / "machine", sample_source, **s3.environment())
    finally:
        drop_database(postgres_admin_url, url)


def published(database_url: str) -> tuple[str, dict[str, list[str]]]:
    """The production model and the live batch's lists, user by user."""
    with psycopg.connect(database_url) as conn:
        model = registry.production_model(conn)
        batch_id = conn.execute(sql.query("live_batch_id")).fetchone()
        assert model is not None and batch_id is not None
        lists = pgsql.SQL("SELECT user_id, item_ids FROM {} ORDER BY user_id").format(sql.recs_table(batch_id[0]))
        rows = conn.execute(lists).fetchall()
    return model.model_id, {user: list(items) for user, items in rows}


def test_a_night_on_object_storage_publishes_the_batch_a_local_folder_does(
    local_night: Night, bucket_night: Night, s3: S3Server
) -> None:
    local_model, local_lists = published(local_night.database_url)
    bucket_model, bucket_lists = published(bucket_night.database_url)
    assert bucket_model == local_model
    assert len(bucket_lists) > 100 and bucket_lists == local_lists

    bucket = s3.filesystem()
    prefix = bucket_night.data_dir.removeprefix("s3://")
    day = f"{prefix}/work/date={SAMPLE_DATE.isoformat()}"
    assert bucket.glob(f"{prefix}/lake/interactions/event_date=*/part-0.parquet")
    assert bucket.exists(f"{prefix}/lake/items/date={SAMPLE_DATE.isoformat()}/items.parquet")
    shards = bucket.glob(f"{day}/scores/shard-*.parquet")
    assert shards and len(bucket.glob(f"{day}/scores/shard-*.json")) == len(shards)
    assert bucket.exists(f"{prefix}/models/{bucket_model}/model.txt")
    assert not bucket.glob(f"{prefix}/**/*.tmp"), "a temporary file reached the bucket"

    # Only what has to be a local file is on this machine: the model LightGBM loads (and its compiled
    # library), the ingest staging; no lake, no work tables.
    local = bucket_night.local_dir
    assert (local / "models" / bucket_model / "model.txt").is_file()
    assert not (local / "lake").exists()
    assert not list((local / "work").glob("date=*/*.parquet"))


def test_the_data_folder_is_a_local_path_or_an_s3_url() -> None:
    assert Settings(data_dir="s3://bucket/prefix").data_dir.as_uri() == "s3://bucket/prefix"
    with pytest.raises(ValueError, match="expected a local path or s3://bucket/prefix"):
        Settings(data_dir="gs://bucket/prefix")
    with pytest.raises(ValueError, match="expected a local path or s3://bucket/prefix"):
        Settings(data_dir="s3://")


def test_a_writer_that_dies_midway_leaves_the_old_object_and_nothing_else(s3_env: S3Server) -> None:
    data_dir = Settings(data_dir=f"s3://{s3_env.new_bucket()}/atomic").data_dir
    assert_a_writer_dying_midway_leaves_the_old_file_alone(data_dir / "work")


def test_a_model_in_the_bucket_is_copied_once_and_fetched_again_when_the_copy_is_altered(
    s3_env: S3Server, tmp_path: Path
) -> None:
    settings = Settings(data_dir=f"s3://{s3_env.new_bucket()}/models", local_dir=tmp_path / "machine")
    artifact = settings.models_dir / "m1" / "model.txt"
    lake.write_atomically(artifact, lambda tmp: tmp.write_text("tree\n"))
    model = registry.ModelVersion(
        model_id="m1",
        logical_date=SAMPLE_DATE,
        status="production",
        status_reason=None,
        data_window={},
        params={},
        features=[],
        metrics={},
        artifact_path="models/m1/model.txt",
        artifact_sha256=registry.file_sha256(artifact),
    )
    local = registry.artifact_file(settings, model)
    assert local == tmp_path / "machine" / "models" / "m1" / "model.txt" and local.read_text() == "tree\n"

    local.write_text("altered\n")
    assert registry.artifact_file(settings, model).read_text() == "tree\n"

    lake.write_atomically(artifact, lambda tmp: tmp.write_text("another tree\n"))
    local.unlink()
    with pytest.raises(MissingDataError, match="refusing to use it"):
        registry.artifact_file(settings, model)
    assert not local.exists()


def test_a_listing_in_the_bucket_finds_what_a_local_folder_does(s3_env: S3Server, tmp_path: Path) -> None:
    names = ["shard-0.json", "shard-0.parquet", "nested/shard-1.json", "event_date=2026-11-20/part-0.parquet"]
    bucket = Settings(data_dir=f"s3://{s3_env.new_bucket()}/listing").data_dir
    local = Settings(data_dir=tmp_path).data_dir
    for root in (bucket, local):
        for name in names:
            lake.write_atomically(root / name, lambda tmp: tmp.write_text("{}"))
    for pattern in ("shard-*.json", "shard-*", "event_date=*/part-0.parquet", "*/shard-*.json"):
        in_bucket = [path.relative_to(bucket).as_posix() for path in storage.glob(bucket, pattern)]
        assert in_bucket == [path.relative_to(local).as_posix() for path in storage.glob(local, pattern)], pattern
    assert storage.glob(bucket / "absent", "*") == []
