"""Databases for tests: one per test, created and dropped on the test Postgres, and what tests read back."""

import uuid

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

import sql

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_database(admin_url: str) -> str:
    name = f"overnight_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    return make_conninfo(admin_url, dbname=name)


def drop_database(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(str(name))))


def migrate_before(conn: psycopg.Connection, version: int) -> None:
    """The schema as it was just before migration `version`: each earlier migration applied and recorded as
    `jobs.database.upgrade` does, so that upgrade() later applies `version` and the rest."""
    with conn.transaction():
        conn.execute(sql.query("lock_migrations"))
        conn.execute(sql.query("create_migrations_table"))
        for migration in sql.migrations():
            if migration.version < version:
                conn.execute(migration.text.encode())
                conn.execute(sql.query("record_migration"), (migration.version, migration.name))
