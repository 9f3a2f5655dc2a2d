"""Values as JSON can carry them: for jsonb columns, XCom and ``--json`` output."""

import math
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb


def jsonable(value: Any) -> Any:
    """`value` with dataclasses as dicts, dates as ISO text, decimals as floats, and NaN and infinities
    as None: JSON, and so jsonb, has no such numbers."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return jsonable(float(value))
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def jsonb(value: Any) -> Jsonb:
    """`value` as a jsonb parameter (see `jsonable`)."""
    return Jsonb(jsonable(value))
