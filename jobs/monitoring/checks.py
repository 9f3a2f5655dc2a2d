"""Thresholds, checks and reports of monitoring: a check compares one measured value with its statistic's warn and
fail thresholds, stored per date and stage in ``overnight.monitor_checks`` (reports: ``overnight.monitor_reports``).
A fail blocks the publish (``jobs.monitoring.gate.check_batch``); a warn is recorded and shown.
"""

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

import sql
from common.text import jsonable
from jobs.settings import Settings

logger = logging.getLogger(__name__)

Level = Literal["ok", "warn", "fail"]
LEVELS: tuple[Level, ...] = ("ok", "warn", "fail")


@dataclass(frozen=True)
class Threshold:
    bad_side: Literal["above", "below"]
    warn: float | None
    fail: float | None
    meaning: str


DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    # input: the date's events
    "volume_change": Threshold(
        "above", 2.0, 10.0, "events on the date against the trailing 7-day daily average, as a factor either way"
    ),
    "new_user_share": Threshold("above", 0.5, None, "share of the date's users never seen before it"),
    "new_item_share": Threshold("above", 0.5, None, "share of the date's items never seen before it"),
    "null_fraction": Threshold("above", 0.01, None, "share of rows read with a missing id or timestamp"),
    "quarantine_fraction": Threshold("above", 0.02, None, "share of rows read that ingest quarantined"),
    "weight_psi": Threshold("above", 0.1, None, "PSI of the date's ratings/weights against the 28 days before"),
    # No fail by default: feedback drops never fail ingest (a client's bad events must not block the
    # publish), but a client sending mostly ids we do not know (its own SKUs, say) should be seen.
    "feedback_dropped_share": Threshold(
        "above", 0.05, None, "share of the feedback events ingest read that it dropped (unknown items, bad ids, ...)"
    ),
    # drift: the ranker's features, training reference against tonight's scoring data
    # PSI's textbook warn level is 0.1; nightly features that depend on the clock (counts over a
    # window, ages) move that much within days on their own, so 0.2 warns of real shifts only.
    "feature_psi": Threshold("above", 0.2, None, "PSI of a ranker feature, the model's reference against tonight"),
    "feature_ks": Threshold("above", 0.2, None, "two-sample KS statistic of a ranker feature, same samples"),
    # output: the batch about to go live
    "fallback_share": Threshold("above", 0.2, 0.5, "share of active users left to the fallback list"),
    "catalogue_coverage": Threshold("below", 0.02, None, "share of available items in anyone's list"),
    "gini_exposure": Threshold("above", 0.95, None, "Gini coefficient of how often each available item is listed"),
    "short_list_share": Threshold("above", 0.5, None, "share of lists shorter than 10 items (or K)"),
    "overlap_yesterday": Threshold("below", 0.1, None, "share of a user's top 10 that yesterday's batch also had"),
    "score_psi": Threshold("above", 0.25, None, "PSI of tonight's scores against yesterday's, same users"),
}


def thresholds(settings: Settings) -> dict[str, Threshold]:
    """The defaults with OVERNIGHT_MONITOR_THRESHOLDS applied; an unknown statistic is an error."""
    from jobs.errors import OvernightError

    merged = dict(DEFAULT_THRESHOLDS)
    for name, override in settings.monitor_thresholds.items():
        if name not in merged:
            raise OvernightError(
                f"OVERNIGHT_MONITOR_THRESHOLDS names an unknown statistic {name!r}; known: {', '.join(merged)}"
            )
        unknown = set(override) - {"warn", "fail"}
        if unknown:
            raise OvernightError(f"OVERNIGHT_MONITOR_THRESHOLDS[{name!r}]: only 'warn' and 'fail' can be set")
        base = merged[name]
        merged[name] = Threshold(
            base.bad_side, override.get("warn", base.warn), override.get("fail", base.fail), base.meaning
        )
    return merged


@dataclass(frozen=True)
class Check:
    stage: str
    statistic: str
    subject: str
    value: float | None
    level: Level
    message: str
    warn_at: float | None
    fail_at: float | None
    bad_side: str
    details: dict[str, Any] = field(default_factory=dict)


def _past(value: float, limit: float | None, bad_side: str) -> bool:
    if limit is None:
        return False
    return value > limit if bad_side == "above" else value < limit


def judge(
    limits: dict[str, Threshold],
    stage: str,
    statistic: str,
    value: float | None,
    subject: str = "",
    details: dict[str, Any] | None = None,
    described: str | None = None,
) -> Check:
    """Compare one measurement with its thresholds; an unmeasurable value (None, NaN) is ok and says so.

    ``described``: the message, in words, where the number would say it badly (a day without events
    changes the volume by an infinite factor). An infinite value is past every finite threshold on its
    bad side; it is stored as no value (JSON has no infinity) and never printed."""
    limit = limits[statistic]
    name = f"{statistic} of {subject}" if subject else statistic
    shown = f"{value:.4g}" if value is not None and math.isfinite(value) else "unbounded"
    if value is None or math.isnan(value):
        level: Level = "ok"
        message = f"{name}: not measured"
        value = None
    elif _past(value, limit.fail, limit.bad_side):
        level = "fail"
        message = f"{name} is {shown}, {limit.bad_side} the fail threshold {limit.fail:g}"
    elif _past(value, limit.warn, limit.bad_side):
        level = "warn"
        message = f"{name} is {shown}, {limit.bad_side} the warn threshold {limit.warn:g}"
    else:
        level = "ok"
        message = f"{name} is {shown}"
    return Check(
        stage=stage,
        statistic=statistic,
        subject=subject,
        value=value if value is None or math.isfinite(value) else None,
        level=level,
        message=described or message,
        warn_at=limit.warn,
        fail_at=limit.fail,
        bad_side=limit.bad_side,
        details=details or {},
    )


def verdict(checks: list[Check]) -> Level:
    return max((c.level for c in checks), key=LEVELS.index, default="ok")


def record(
    conn: psycopg.Connection,
    logical_date: date,
    stage: str,
    checks: list[Check],
    report: dict[str, Any],
    *,
    run_id: int | None,
    model_id: str | None,
    batch_id: int | None = None,
) -> None:
    """Replace the date's report and checks of one stage (a re-run of a date replaces them)."""
    with conn.transaction():
        conn.execute(sql.query("delete_monitor_checks"), (logical_date, stage))
        with conn.cursor() as cur:
            cur.executemany(
                sql.query("insert_monitor_check"),
                [
                    {
                        **{k: v for k, v in asdict(c).items() if k != "details"},
                        "details": Jsonb(jsonable(c.details)),
                        "logical_date": logical_date,
                        "run_id": run_id,
                        "model_id": model_id,
                        "batch_id": batch_id,
                    }
                    for c in checks
                ],
            )
        conn.execute(
            sql.query("upsert_monitor_report"),
            {
                "logical_date": logical_date,
                "stage": stage,
                "verdict": verdict(checks),
                "report": Jsonb(jsonable(report)),
                "run_id": run_id,
                "model_id": model_id,
                "batch_id": batch_id,
            },
        )


def stored_checks(conn: psycopg.Connection, logical_date: date) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.query("monitor_checks_for_date"), (logical_date,)).fetchall()


def stored_reports(conn: psycopg.Connection, logical_date: date) -> dict[str, dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql.query("monitor_reports_for_date"), (logical_date,)).fetchall()
    return {row["stage"]: row for row in rows}
