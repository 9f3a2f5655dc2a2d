"""Output monitoring of a batch before it goes live, and the publish gate.

Measures the lists about to be published: score distribution (of a stable sample of about
20,000 users; each user's top score over all of them), share of active users left to the
fallback, catalogue coverage, distinct items and Gini of exposure, empty and short lists, and the
overlap with (and score shift against) yesterday's lists for a stable sample of users.
``check_batch`` is the gate publish calls before switching ``live``: any check at its fail
threshold (input, drift or output) blocks the batch with the reasons, and production keeps the
batch it has. An operator who has looked at them may accept the fails (``overnight publish
--accept-checks "why"``): the batch goes through, and who accepted which checks, why and when is
recorded (``overnight.monitor_acceptances``, linked to the run) and alerted.
"""

import getpass
import logging
import socket
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import polars as pl
import psycopg
from psycopg.types.json import Jsonb

import sql
from jobs import lake
from jobs.database import connect
from jobs.errors import BatchValidationError, OvernightError
from jobs.monitoring import checks, distributions, history
from jobs.settings import Settings
from jobs.steps import score

logger = logging.getLogger(__name__)

OVERLAP_K = 10
SCORE_BINS = 20
SCORE_SAMPLE_USERS = 20_000  # about this many users' scores make the score quantiles and histogram


class MonitoringBlockedError(BatchValidationError):
    """Monitoring found a problem past its fail threshold: the batch must not go live."""

    blocks_publish = True

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


def batch_statistics(
    settings: Settings, logical_date: date, batch_id: int, conn: psycopg.Connection, chosen_model: str | None = None
) -> dict[str, Any]:
    """`chosen_model`: measure the lists scored with that model (a shadow's or a canary's), not production's."""
    manifests = score.read_manifests(settings, logical_date, chosen_model)
    files = [score.shard_path(settings, logical_date, m.shard, m.shards, chosen_model) for m in manifests]
    lists = pl.scan_parquet(files)
    short_at = min(OVERLAP_K, settings.top_k)
    n_lists = lists.select(pl.len()).collect().item()  # from the files' metadata

    # One pass over the files for everything. The score distribution is for display: a stable
    # sample of users gives it (50 million scores at 1M users took 4 of the gate's 6 seconds).
    shape, exposure, sampled_scores, top_scores_frame = pl.collect_all(
        [
            lists.select(
                empty=(pl.col("item_ids").list.len() == 0).sum(),
                short=(pl.col("item_ids").list.len() < short_at).sum(),
                mean_length=pl.col("item_ids").list.len().mean(),
            ),
            lists.select(pl.col("item_ids").explode().alias("item_id")).drop_nulls().group_by("item_id").len(),
            lists.filter(_sample(n_lists, SCORE_SAMPLE_USERS, seed=11)).select(pl.col("scores").explode()).drop_nulls(),
            lists.select(pl.col("scores").list.first()).drop_nulls(),
        ]
    )
    empty, short, mean_length = shape.row(0)
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    if "available" in catalogue.columns:
        catalogue = catalogue.filter(pl.col("available").fill_null(True))
    available = catalogue.select("item_id").unique()
    shown = available.join(exposure, on="item_id", how="left").with_columns(pl.col("len").fill_null(0))
    scores = sampled_scores["scores"].cast(pl.Float64).to_numpy()
    top_scores = top_scores_frame["scores"].to_numpy()

    batch = conn.execute(sql.query("batch_by_id"), (batch_id,)).fetchone()
    assert batch is not None
    users_scored, active_users = batch[5], batch[6]
    stats: dict[str, Any] = {
        "batch_id": batch_id,
        "lists": n_lists,
        "active_users": active_users,
        "fallback_share": 1.0 - users_scored / active_users if active_users else None,
        "empty_list_share": empty / n_lists if n_lists else None,
        "short_list_share": short / n_lists if n_lists else None,
        "short_means_below": short_at,
        "mean_list_length": mean_length,
        "distinct_items": exposure.height,
        "available_items": available.height,
        "catalogue_coverage": int((shown["len"] > 0).sum()) / available.height if available.height else None,
        "gini_exposure": distributions.gini(shown["len"].to_numpy()),
        "score_quantiles": distributions.quantiles(scores),
        "top_score_quantiles": distributions.quantiles(top_scores),
        "score_histogram": _equal_width_histogram(scores),
    }
    stats |= _against_yesterday(logical_date, lists, n_lists, settings, conn)
    return stats


def _equal_width_histogram(values: np.ndarray) -> dict[str, list[float]]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"edges": [], "counts": []}
    low, high = np.quantile(finite, [0.001, 0.999])
    counts, edges = np.histogram(np.clip(finite, low, high), bins=SCORE_BINS, range=(low, high or low + 1))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _sample(users: int, size: int, seed: int) -> pl.Expr:
    """About ``size`` of ``users`` users, the same ones for the same ids: a filter, not a sort of every list."""
    return pl.col("user_id").hash(seed=seed) % max(users, 1) < size


def _against_yesterday(
    logical_date: date, lists: pl.LazyFrame, users: int, settings: Settings, conn: psycopg.Connection
) -> dict[str, Any]:
    """Overlap@10 and score PSI against the previous kept batch, for a stable sample of users."""
    previous = conn.execute(sql.query("previous_kept_batch"), (logical_date,)).fetchone()
    if previous is None:
        return {"previous_batch_id": None, "overlap_yesterday": None, "score_psi": None}
    previous_id, previous_date = previous
    sample = lists.filter(_sample(users, settings.drift_sample_users, seed=7)).collect()
    try:
        rows = conn.execute(sql.batch_query("recs_for_users", previous_id), (sample["user_id"].to_list(),)).fetchall()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return {"previous_batch_id": previous_id, "overlap_yesterday": None, "score_psi": None}
    yesterday = {user_id: (items, scores) for user_id, items, scores in rows}
    overlaps, today_scores, before_scores = [], [], []
    for user_id, items, scores in sample.iter_rows():
        if user_id not in yesterday:
            continue
        old_items, old_scores = yesterday[user_id]
        overlaps.append(distributions.list_overlap(items, old_items, OVERLAP_K))
        today_scores.extend(scores[:OVERLAP_K])
        before_scores.extend(old_scores[:OVERLAP_K])
    return {
        "previous_batch_id": previous_id,
        "previous_date": previous_date.isoformat(),
        "users_compared": len(overlaps),
        "overlap_yesterday": float(np.mean(overlaps)) if overlaps else None,
        "score_psi": distributions.psi(np.array(before_scores), np.array(today_scores)) if overlaps else None,
    }


OUTPUT_STATISTICS = (
    "fallback_share",
    "catalogue_coverage",
    "gini_exposure",
    "short_list_share",
    "overlap_yesterday",
    "score_psi",
)


def unrecorded_checks(settings: Settings, logical_date: date, batch_id: int, model_id: str) -> dict[str, Any]:
    """Output statistics and checks of a batch scored with a chosen model (a shadow, a model canary).

    Nothing is recorded in the date's monitoring (production's) and no alert is sent: the date's
    record is production's, and a batch that is not production must not replace it. The caller keeps
    the result with the batch (its ``validation``) and decides whether a failed check blocks it.
    """
    limits = checks.thresholds(settings)
    with connect(settings) as conn:
        stats = batch_statistics(settings, logical_date, batch_id, conn, chosen_model=model_id)
    judged = [checks.judge(limits, "output", name, stats[name]) for name in OUTPUT_STATISTICS]
    return {
        "verdict": checks.verdict(judged),
        "statistics": {name: stats[name] for name in OUTPUT_STATISTICS},
        "checks": [{"statistic": c.statistic, "level": c.level, "message": c.message} for c in judged],
    }


def check_batch(
    settings: Settings,
    logical_date: date,
    batch_id: int,
    model_id: str,
    accept_checks: str | None = None,
    accepted_by: str | None = None,
) -> Acceptance | None:
    """The publish gate of a production batch: measure the loaded batch, record it as the date's
    output monitoring, and raise MonitoringBlockedError when any check of the date (input, drift or
    output) is at its fail threshold, unless `accept_checks` gives the reason an operator accepts them:
    then the acceptance is recorded, alerted and returned. Never for a batch of a chosen model: see
    `unrecorded_checks`."""
    from jobs.monitoring import drift

    limits = checks.thresholds(settings)
    with connect(settings) as conn:
        measured_input = checks.stored_reports(conn, logical_date).get("input")
    if measured_input is None or measured_input["model_id"] != model_id:
        drift.monitor_input(settings, logical_date)
    run_id = history.current_run_id()
    with connect(settings) as conn:
        stats = batch_statistics(settings, logical_date, batch_id, conn)
        judged = [checks.judge(limits, "output", name, stats[name]) for name in OUTPUT_STATISTICS]
        checks.record(conn, logical_date, "output", judged, stats, run_id=run_id, model_id=model_id, batch_id=batch_id)
        stored = checks.stored_checks(conn, logical_date)
    output_fails = [c for c in judged if c.level == "fail"]
    if output_fails:
        what = f"batch {batch_id} {'published, its fails accepted' if accept_checks is not None else 'held back'}"
        checks.alert_problems(settings, logical_date, output_fails, run_id, what)
    fails = [c for c in stored if c["level"] == "fail"]
    if fails and accept_checks is not None:
        return _accept(settings, logical_date, batch_id, run_id, fails, given_reason(accept_checks), accepted_by)
    if fails:
        first = fails[0]
        link = checks.dashboard_link(settings, logical_date)
        day = logical_date.isoformat()
        raise MonitoringBlockedError(
            f"batch {batch_id} for {logical_date} blocked by monitoring: "
            + "; ".join(c["message"] for c in fails[:10])
            + (f" (and {len(fails) - 10} more)" if len(fails) > 10 else "")
            + (f"; see {link}" if link else f"; see `overnight drift --date {day}`")
            + f'; to publish it anyway once looked at: overnight publish --date {day} --accept-checks "why"',
            checks.fingerprint(logical_date, first["stage"], first["statistic"], "fail"),
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
    from jobs.monitoring.alerts import send_alert

    accepted = [{k: str(c[k]) for k in ("stage", "statistic", "subject", "message")} for c in fails]
    who = accepted_by or operator()
    with connect(settings) as conn:
        row = conn.execute(
            sql.query("record_acceptance"),
            {
                "logical_date": logical_date,
                "batch_id": batch_id,
                "run_id": run_id,
                "checks": Jsonb(accepted),
                "reason": reason,
                "accepted_by": who,
            },
        ).fetchone()
    assert row is not None
    acceptance = Acceptance(reason, who, row[0].isoformat(), batch_id, accepted)
    logger.warning("publish: batch %d for %s: %s", batch_id, logical_date, acceptance.summary())
    send_alert(
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
            "dashboard": checks.dashboard_link(settings, logical_date),
        },
        fingerprint=f"accepted:{logical_date.isoformat()}:{batch_id}",
        settings=settings,
    )
    return acceptance
