"""The Postgres contract shared by the batch side and the serving side: ``migrations/NNNN_name.sql``, and every query
a role runs as a named block (``-- name: x``) of ``queries/<role or part>.sql``. Values are always bound parameters;
only a batch table's name (``{recs}``, ...) is formatted into SQL, through ``psycopg.sql.Identifier``.
"""

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import LiteralString, cast

from psycopg import sql as pgsql

SCHEMA = "overnight"
LIVE_CHANNEL = "overnight_live"

_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


# A batch's tables, by the placeholder its queries use for each (see migrations 0001 and 0019): the user
# lists, the items' neighbour lists, the catalogue's attributes, the segments' lists, users' segments.
BATCH_TABLES = ("recs", "similar", "items", "segments", "user_segments")


def batch_table_name(batch_id: int, table: str = "recs") -> str:
    if table not in BATCH_TABLES:
        raise ValueError(f"a batch has no {table!r} table (it has {', '.join(BATCH_TABLES)})")
    return f"{table}_{int(batch_id)}"


def batch_table(batch_id: int, table: str = "recs") -> pgsql.Identifier:
    return pgsql.Identifier(SCHEMA, batch_table_name(batch_id, table))


def recs_table_name(batch_id: int) -> str:
    return batch_table_name(batch_id)


def recs_table(batch_id: int) -> pgsql.Identifier:
    return batch_table(batch_id)


@cache
def queries() -> dict[str, str]:
    named: dict[str, str] = {}
    files = sorted(resources.files(__name__).joinpath("queries").iterdir(), key=lambda entry: entry.name)
    for entry in (entry for entry in files if entry.name.endswith(".sql")):
        parts = _NAME_LINE.split(entry.read_text(encoding="utf-8"))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in named:
                raise ValueError(f"sql/queries names the query {name!r} twice (again in {entry.name})")
            named[name] = body.strip()
    return named


def query(name: str) -> LiteralString:
    try:
        return cast(LiteralString, queries()[name])
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries/") from None


def batch_query(name: str, batch_id: int) -> pgsql.Composed:
    """A named query over one batch's tables; ``{recs}``, ``{similar}``, ... in its text are the tables."""
    return pgsql.SQL(query(name)).format(**{table: batch_table(batch_id, table) for table in BATCH_TABLES})


def migrations() -> list[Migration]:
    folder = resources.files(__name__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers are handed out ahead of time to work done in parallel, so a gap is allowed until the
    # missing number lands; a number used twice never is.
    if len(set(versions)) != len(versions) or (versions and versions[0] != 1):
        raise ValueError(f"migrations must be numbered 0001, 0002, ... each number once; found {versions}")
    return found
