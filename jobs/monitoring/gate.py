"""The publish gate: production's batch goes live only when no check of its date (input, drift, output) fails, or
when an operator has accepted the fails on the record (docs/operations.md#publishing-what-monitoring-held-back).
"""

import getpass
import logging
import socket
from dataclasses import dataclass
from datetime import date
from typing import Any

import sql
from common.text import some
from jobs import workdir
from jobs.database import connect
from jobs.errors import OvernightError, PublishBlockedError
from jobs.jsonable import jsonb
from jobs.monitoring import alerts, checks, history
from jobs.monitoring.outputs import OUTPUT_STATISTICS, ListMeasures, batch_statistics
from jobs.settings import Settings

logger = logging.getLogger(__name__)


class MonitoringBlockedError(PublishBlockedError):
    """Monitoring found a problem past its fail threshold: the batch must not go live."""

    def __init__(self, message: str, alert_fingerprint: str | None) -> None:
        super().__init__(message)
        # jobs.monitoring.alerts.task_failed sends nothing more for a problem already announced under it
        self.alert_fingerprint = alert_fingerprint


class AcceptanceError(OvernightError):
    """Failing checks cannot be accepted that way (no reason given, or not production's batch)."""


@dataclass(frozen=True)
class Acceptance:
    """The failing checks an operator accepted to publish a batch monitoring held back."""

    reason: str
    accepted_by: str
    accepted_at: str
    batch_id: int
    checks: list[dict[str, str]]  # stage, statistic, subject, message

    @property
    def names(self) -> list[str]:
        named = (f"{c['statistic']} of {c['subject']}" if c["subject"] else c["statistic"] for c in self.checks)
        return list(dict.fromkeys(named))

    def summary(self) -> str:
        count = len(self.checks)
        return (
            f"accepted {count} failing check{'s' if count != 1 else ''} ({', '.join(self.names)}) "
            f'by {self.accepted_by}: "{self.reason}"'
        )


def given_reason(reason: str) -> str:
    """The reason to accept failing checks, refused when empty: an acceptance must say why."""
    if not reason.strip():
        raise AcceptanceError("accepting failing checks needs a reason: say why the batch may be published")
    return reason.strip()


def operator() -> str:
    """Who runs this process, as an acceptance records it: the login name at the host."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown user"
    return f"{user}@{socket.gethostname()}"


def require_input_checks(settings: Settings, logical_date: date, model_id: str) -> None:
    """The date's input and drift checks, measured with `model_id`, are stored: publish asks before it
    loads a batch, so a missing monitor step costs no load."""
    with connect(settings) as conn:
        measured_input = checks.stored_reports(conn, logical_date).get("input")
    if measured_input is None or measured_input["model_id"] != model_id:
        what = "input and drift checks" + ("" if measured_input is None else f" of model {model_id}")
        raise workdir.missing(what, logical_date, "monitor", "the database")


def check_batch(
    settings: Settings,
    logical_date: date,
    batch_id: int,
    model_id: str,
    accept_checks: str | None = None,
    accepted_by: str | None = None,
    measured: ListMeasures | None = None,
) -> Acceptance | None:
    """The publish gate of a production batch: measure the loaded batch, record it as the date's
    output monitoring, and raise MonitoringBlockedError when any check of the date (input, drift or
    output) is at its fail threshold, unless `accept_checks` gives the reason an operator accepts them:
    then the acceptance is recorded, alerted and returned. Never for a batch of a chosen model: see
    ``outputs.unrecorded_checks``. `measured`: what ``outputs.measure_lists`` measured of its lists already."""
    limits = checks.thresholds(settings)
    require_input_checks(settings, logical_date, model_id)
    run_id = history.current_run_id()
    with connect(settings) as conn:
        stats = batch_statistics(settings, logical_date, batch_id, conn, measured=measured)
        judged = [checks.judge(limits, "output", name, stats[name]) for name in OUTPUT_STATISTICS]
        checks.record(conn, logical_date, "output", judged, stats, run_id=run_id, model_id=model_id, batch_id=batch_id)
        stored = checks.stored_checks(conn, logical_date)
    output_fails = [c for c in judged if c.level == "fail"]
    if output_fails:
        what = f"batch {batch_id} {'published, its fails accepted' if accept_checks is not None else 'held back'}"
        alerts.alert_problems(settings, logical_date, output_fails, run_id, what)
    fails = [c for c in stored if c["level"] == "fail"]
    if fails and accept_checks is not None:
        return _accept(settings, logical_date, batch_id, run_id, fails, given_reason(accept_checks), accepted_by)
    if fails:
        first = fails[0]
        link = alerts.dashboard_link(settings, logical_date)
        day = logical_date.isoformat()
        raise MonitoringBlockedError(
            f"batch {batch_id} for {logical_date} blocked by monitoring: "
            + some([c["message"] for c in fails], 10, sentences=True)
            + (f"; see {link}" if link else f"; see `overnight drift --date {day}`")
            + f'; to publish it anyway once looked at: overnight publish --date {day} --accept-checks "why"',
            alerts.fingerprint(logical_date, first["stage"], first["statistic"], "fail"),
        )
    if accept_checks is not None:
        logger.info("publish: batch %d for %s: no check fails, nothing to accept", batch_id, logical_date)
    return None


def _accept(
    settings: Settings,
    logical_date: date,
    batch_id: int,
    run_id: int | None,
    fails: list[dict[str, Any]],
    reason: str,
    accepted_by: str | None,
) -> Acceptance:
    accepted = [{k: str(c[k]) for k in ("stage", "statistic", "subject", "message")} for c in fails]
    who = accepted_by or operator()
    with connect(settings) as conn:
        row = conn.execute(
            sql.query("record_acceptance"),
            {
                "logical_date": logical_date,
                "batch_id": batch_id,
                "run_id": run_id,
                "checks": jsonb(accepted),
                "reason": reason,
                "accepted_by": who,
            },
        ).fetchone()
    assert row is not None
    acceptance = Acceptance(reason, who, row[0].isoformat(), batch_id, accepted)
    logger.warning("publish: batch %d for %s: %s", batch_id, logical_date, acceptance.summary())
    alerts.send_alert(
        f"overnight {logical_date}: batch {batch_id} published with its failing checks accepted",
        {
            "text": acceptance.summary(),
            "reason": reason,
            "accepted_by": who,
            "checks": acceptance.names,
            "messages": [c["message"] for c in accepted],
            "logical_date": logical_date.isoformat(),
            "batch_id": batch_id,
            "run_id": run_id,
            "dashboard": alerts.dashboard_link(settings, logical_date),
        },
        fingerprint=f"accepted:{logical_date.isoformat()}:{batch_id}",
        settings=settings,
    )
    return acceptance
