"""Values as jsonb parameters, made JSON-safe by `sql.text.jsonable` (the conversion every image shares)."""

from typing import Any

from psycopg.types.json import Jsonb

from sql.text import jsonable


def jsonb(value: Any) -> Jsonb:
    """`value` as a jsonb parameter (see `sql.text.jsonable`)."""
    return Jsonb(jsonable(value))
