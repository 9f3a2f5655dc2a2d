"""The named queries, a file per role or part under sql/queries/: each role runs the queries of its file."""

import ast
from pathlib import Path

import pytest

import sql
from console.dashboard import QUERIES as CONSOLE_QUERIES

ROOT = Path(__file__).resolve().parents[2]


def names_in(file: str) -> set[str]:
    lines = (ROOT / "sql" / "queries" / file).read_text().splitlines()
    return {line.removeprefix("-- name: ").strip() for line in lines if line.startswith("-- name: ")}


def queries_named_in(package: str) -> set[str]:
    """The first argument of every sql.query(...) and sql.batch_query(...) call under `package`."""
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("query", "batch_query")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "sql"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(node.args[0].value)
    return found


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


def test_the_console_runs_only_its_listed_queries() -> None:
    """Migration 0018 grants the console's role what these queries read, and nothing else."""
    assert set(CONSOLE_QUERIES) >= names_in("console.sql")
    assert set(CONSOLE_QUERIES) <= set(sql.queries())
