"""The named queries, a file per role or part under sql/queries/: each role runs the queries of its file."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import sql
from console.dashboard import QUERIES as CONSOLE_QUERIES

ROOT = Path(__file__).resolve().parents[2]


def names_in(file: str) -> set[str]:
    lines = (ROOT / "sql" / "queries" / file).read_text().splitlines()
    return {line.removeprefix("-- name: ").strip() for line in lines if line.startswith("-- name: ")}


def calls_in(package: str) -> Iterator[ast.Call]:
    for path in (ROOT / package).rglob("*.py"):
        yield from (node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call))


def queries_named_in(package: str) -> set[str]:
    """The first argument of every sql.query(...) and sql.batch_query(...) call under `package`."""
    return {
        node.args[0].value
        for node in calls_in(package)
        if isinstance(node.func, ast.Attribute)
        and node.func.attr in ("query", "batch_query")
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "sql"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def test_every_query_is_named_once_across_the_files() -> None:
    files = sorted(p.name for p in (ROOT / "sql" / "queries").glob("*.sql"))
    per_file = [names_in(file) for file in files]
    assert sum(len(names) for names in per_file) == len(sql.queries())
    with pytest.raises(KeyError, match="no query named 'nope' in sql/queries/"):
        sql.query("nope")


def test_the_lookup_service_runs_only_the_queries_of_serving_sql() -> None:
    used = queries_named_in("serving")
    assert {"recs_for_users", "serving_batches", "insert_feedback_events"} <= used  # the reader sees the calls
    # the service builds one query's name from a flag: both names are in its file too
    assert used | {"explained_recs_and_segments_for_users", "explained_recs_for_users"} <= names_in("serving.sql")


def fetched_in(package: str) -> set[str]:
    """The query name of every _fetch(conn, "name", ...) call under `package` (the console's one way to run one)."""
    return {
        node.args[1].value
        for node in calls_in(package)
        if isinstance(node.func, ast.Name)
        and node.func.id == "_fetch"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
    }


def test_the_console_runs_only_its_listed_queries() -> None:
    """Migration 0018 grants the console's role what these queries read, and nothing else."""
    assert set(CONSOLE_QUERIES) >= names_in("console.sql")
    assert set(CONSOLE_QUERIES) <= set(sql.queries())


def test_every_query_the_console_uses_is_defined_in_console_sql_and_only_there() -> None:
    """The console has queries of its own: a batch-side change to a query of another file never breaks it.

    dashboard_live and dashboard_retrain_request copy status.sql's live_status and monitoring.sql's
    retrain_request_for_date on purpose, so `duplicates --change` may list such a pair: the copy is the point.
    """
    fetched = fetched_in("console")
    assert {"dashboard_live", "dashboard_runs", "dashboard_retrain_request"} <= fetched  # the reader sees the calls
    used = set(CONSOLE_QUERIES) | fetched | queries_named_in("console")
    assert used <= names_in("console.sql")
    for other in sorted(p.name for p in (ROOT / "sql" / "queries").glob("*.sql") if p.name != "console.sql"):
        assert not used & names_in(other), f"the console runs queries of {other}"
