"""Whether what is live is fresh: ``overnight check-freshness``, the nightly step and the hourly DAG."""

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

import sql
from common.text import jsonable
from jobs.batches import live_status
from jobs.database import connect
from jobs.errors import StaleBatchError
from jobs.monitoring import history
from jobs.outcome import Outcome
from jobs.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreshnessResult:
    batch_id: int
    logical_date: str
    age_hours: float
    rows: int
    active_users: int
    coverage: float
    max_age_hours: float
    min_coverage: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_out=self.rows)

    def summary(self) -> str:
        return f"batch {self.batch_id} is {self.age_hours:.2f} h old, covers {self.coverage:.1%} of active users"


def check_freshness(
    settings: Settings, max_age_hours: float | None = None, min_coverage: float | None = None
) -> FreshnessResult:
    """Check what is actually served; raise StaleBatchError naming every problem found. Runs whose
    process died are marked abandoned on the way (the hourly check notices them between nights)."""
    max_age = settings.max_age_hours if max_age_hours is None else max_age_hours
    minimum = settings.min_coverage if min_coverage is None else min_coverage
    with connect(settings) as conn:
        history.mark_abandoned(conn)
        live = live_status(conn)
        if live is None:
            raise StaleBatchError("nothing is live: no batch has been published yet")
        try:
            rows = conn.execute(sql.batch_query("count_recs", live["batch_id"])).fetchone()[0]  # type: ignore[index]
        except psycopg.errors.UndefinedTable:
            raise StaleBatchError(f"live batch {live['batch_id']} has no table: it was dropped") from None
    age_hours = float(live["age_seconds"]) / 3600.0
    coverage = rows / live["active_users"] if live["active_users"] else 0.0
    problems = []
    if age_hours > max_age:
        problems.append(f"is {age_hours:.1f} h old (limit {max_age:g} h)")
    if rows != live["users_scored"]:
        problems.append(f"has {rows} rows but {live['users_scored']} were published")
    if coverage < minimum:
        problems.append(f"covers {coverage:.1%} of {live['active_users']} active users (minimum {minimum:.0%})")
    result = FreshnessResult(
        batch_id=live["batch_id"],
        logical_date=live["logical_date"].isoformat(),
        age_hours=round(age_hours, 3),
        rows=rows,
        active_users=live["active_users"],
        coverage=round(coverage, 6),
        max_age_hours=max_age,
        min_coverage=minimum,
        problems=problems,
    )
    if problems:
        raise StaleBatchError(f"live batch {live['batch_id']} ({live['logical_date']}) " + "; ".join(problems))
    return result


def as_dict(result: FreshnessResult) -> dict[str, Any]:
    return jsonable({**asdict(result), "ok": result.ok})
