"""Values as jsonb parameters, made JSON-safe by `common.text.jsonable` (the conversion every image shares)."""

from typing import Any

from psycopg.types.json import Jsonb

from common.text import jsonable


def jsonb(value: Any) -> Jsonb:
    """`value` as a jsonb parameter (see `common.text.jsonable`)."""
    return Jsonb(jsonable(value))
