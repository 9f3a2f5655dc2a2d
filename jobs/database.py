"""Connections for the batch side: the configured Postgres or an embedded one, and schema migrations."""

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import psycopg

import sql
from common.text import first_line
from jobs.errors import DatabaseError
from jobs.settings import Settings

logger = logging.getLogger(__name__)


def database_url(settings: Settings) -> str:
    """The DSN to use: OVERNIGHT_DATABASE_URL, or an embedded Postgres started on first use.

    The embedded server keeps running after this process exits, so the next command (or the
    lookup service) finds it again; its URL is exported so child processes reuse it.
    """
    if settings.database_url:
        return settings.database_url
    url = embedded_database_url(settings.machine_dir)
    os.environ["OVERNIGHT_DATABASE_URL"] = url
    return url


@cache
def embedded_database_url(data_dir: Path) -> str:
    server = _embedded_server(data_dir, cleanup_mode=None)
    logger.info("OVERNIGHT_DATABASE_URL is unset: using the embedded Postgres in %s", server.pgdata)
    return str(server.get_uri())


def stop_embedded(data_dir: Path) -> str:
    """Stop the embedded Postgres of this data dir if it runs; what was done, in words."""
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        return f"no embedded Postgres in {data_dir}"
    if not (pgdata / "postmaster.pid").exists():  # Postgres writes it on start and removes it on a clean stop
        return f"the embedded Postgres in {data_dir} is not running"
    _embedded_server(data_dir, cleanup_mode="stop").cleanup()
    embedded_database_url.cache_clear()
    return f"stopped the embedded Postgres in {data_dir}"


def _embedded_server(data_dir: Path, cleanup_mode: str | None) -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs complains about XDG_RUNTIME_DIR on servers; pgserver copes without it
            warnings.simplefilter("ignore")
            import pgserver  # heavy, and only needed where no server is configured
    except ImportError:
        raise DatabaseError(
            "OVERNIGHT_DATABASE_URL is unset and the embedded Postgres is not installed: "
            "set OVERNIGHT_DATABASE_URL or install overnight[batch]"
        ) from None
    pgdata = (data_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
    except Exception as error:
        raise DatabaseError(f"could not start the embedded Postgres in {pgdata}: {error}") from error


@contextmanager
def connect(settings: Settings, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    url = database_url(settings)
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as error:
        raise DatabaseError(f"cannot connect to Postgres: {first_line(error)}") from error
    with conn:
        yield conn


def upgrade(conn: psycopg.Connection) -> list[int]:
    """Apply pending migrations in order, under an advisory lock; return the versions applied."""
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute(sql.query("lock_migrations"))
        conn.execute(sql.query("create_migrations_table"))
        applied = {row[0] for row in conn.execute(sql.query("applied_migrations"))}
        for migration in sql.migrations():
            if migration.version in applied:
                continue
            logger.info("applying migration %04d_%s", migration.version, migration.name)
            conn.execute(migration.text.encode())
            conn.execute(sql.query("record_migration"), (migration.version, migration.name))
            applied_now.append(migration.version)
    return applied_now
