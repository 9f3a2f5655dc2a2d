"""Input monitoring and feature drift of one night (``overnight drift``): the date's input against the days before
it, and per ranker feature PSI and KS between the model's training-date reference and tonight's sample. Drift at or
above ``OVERNIGHT_DRIFT_RETRAIN_PSI`` records a retrain request (docs/monitoring.md#drift).
"""

import json
import logging
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psycopg
from upath import UPath

import sql
from common.text import some
from jobs import lake, registry, workdir
from jobs.database import connect, upgrade
from jobs.errors import MissingDataError
from jobs.monitoring import alerts, checks, distributions, history
from jobs.outcome import Outcome
from jobs.settings import Settings

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference.parquet"
TRAILING_DAYS = 7
WEIGHT_BASELINE_DAYS = 28


# ---------------------------------------------------------------------------- samples of the features


def sample_rows(frame: pl.DataFrame, settings: Settings) -> pl.DataFrame:
    """A feature sample as drift compares it: at most ``drift_reference_rows`` rows, the ids left out."""
    if frame.height > settings.drift_reference_rows:
        # sorted first: the candidates come in no particular order, and the sample must not depend on it
        frame = frame.sort("user_id", "item_id").sample(n=settings.drift_reference_rows, seed=settings.seed)
    return frame.drop("user_id", "item_id")


def tonight(settings: Settings, logical_date: date) -> pl.DataFrame:
    """The ranker's features as the score step computed them tonight, for the stable sample of users
    whose features it wrote to the work folder (see ``jobs.workdir.drift_sample_dir``), as drift compares them."""
    return sample_rows(_scored_sample(settings, logical_date), settings)


def _scored_sample(settings: Settings, logical_date: date) -> pl.DataFrame:
    parts = workdir.drift_sample_parts(settings, logical_date)
    return pl.read_parquet([str(part) for part in parts])


def reference_path(settings: Settings, model: registry.ModelVersion) -> Path | UPath:
    return registry.artifact_location(settings, model).parent / REFERENCE_FILE


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks: float
    ks_pvalue: float
    reference_mean: float
    current_mean: float
    histogram: distributions.Histogram


def feature_drift(reference: pl.DataFrame, current: pl.DataFrame, feature_names: list[str]) -> list[FeatureDrift]:
    found = []
    for name in feature_names:
        ref = reference[name].cast(pl.Float64).to_numpy()
        cur = current[name].cast(pl.Float64).to_numpy()
        shares = distributions.histogram(ref, cur)
        ks = distributions.ks_test(ref, cur)
        found.append(
            FeatureDrift(
                feature=name,
                psi=distributions.psi_of_shares(shares.expected, shares.actual),
                ks=ks.statistic,
                ks_pvalue=ks.pvalue,
                reference_mean=float(np.nanmean(ref)) if ref.size else float("nan"),
                current_mean=float(np.nanmean(cur)) if cur.size else float("nan"),
                histogram=shares,
            )
        )
    return found


# ---------------------------------------------------------------------------- input statistics


def input_statistics(settings: Settings, logical_date: date) -> dict[str, Any]:
    """Measurements of the date's events (those timestamped on the date) against the days before."""
    day_start = lake.day_start(logical_date)
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    trailing_start = day_start - timedelta(days=TRAILING_DAYS)
    counts = events.select(
        volume=(pl.col("timestamp") >= day_start).sum(),
        trailing=((pl.col("timestamp") >= trailing_start) & (pl.col("timestamp") < day_start)).sum(),
        history_start=pl.col("timestamp").min(),
        last_before=pl.col("timestamp").filter(pl.col("timestamp") < day_start).max(),
    ).collect(engine="streaming")
    volume, trailing, history_start, last_before = counts.row(0)
    # A lake younger than the trailing window averages over the days it has.
    days_of_history = min(TRAILING_DAYS, (day_start - history_start).days) if history_start else 0
    trailing_average = trailing / days_of_history if days_of_history > 0 else None

    def new_share(column: str) -> tuple[float | None, int]:
        # The date's ids looked up in the history before it, rather than every id's first day: memory then
        # holds the date's ids, not the whole history's. Compared as 64-bit hashes; a collision (about 1 in
        # 10^7 at millions of ids) would count one new id as seen.
        keyed = events.select(key=pl.col(column).hash(seed=0), timestamp=pl.col("timestamp"))
        today = keyed.filter(pl.col("timestamp") >= day_start).select("key").unique().collect(engine="streaming")
        if today.is_empty():
            return None, 0
        seen = (
            keyed.filter(pl.col("timestamp") < day_start, pl.col("key").is_in(today["key"].implode()))
            .select("key")
            .unique()
            .select(pl.len())
            .collect(engine="streaming")
            .item()
        )
        return (today.height - seen) / today.height, today.height

    new_users, users_today = new_share("user_id")
    new_items, items_today = new_share("item_id")

    weights = (
        events.filter(pl.col("timestamp") >= day_start - timedelta(days=WEIGHT_BASELINE_DAYS))
        .select("weight", today=pl.col("timestamp") >= day_start)
        .drop_nulls("weight")
        .collect(engine="streaming")
    )
    today_weights = weights.filter(pl.col("today"))["weight"].cast(pl.Float64).to_numpy()
    before_weights = weights.filter(~pl.col("today"))["weight"].cast(pl.Float64).to_numpy()
    weight_shares = (
        distributions.histogram(before_weights, today_weights) if today_weights.size and before_weights.size else None
    )

    ingest_report = _ingest_report(settings, logical_date)
    null_fraction = quarantine_fraction = None
    if ingest_report and ingest_report.get("rows_read"):
        reasons = ingest_report.get("quarantined_by_reason", {})
        rows_read = ingest_report["rows_read"]
        null_fraction = sum(n for r, n in reasons.items() if r.startswith("missing_")) / rows_read
        quarantine_fraction = sum(n for r, n in reasons.items() if r != "after_logical_date") / rows_read
    # Feedback counts apart from the source's (its drops never fail ingest); a night that read none,
    # or ran with OVERNIGHT_INGEST_FEEDBACK off, has nothing to measure.
    feedback_read = ingest_report.get("feedback_read", 0) if ingest_report else 0
    feedback_dropped_by_reason = ingest_report.get("feedback_dropped_by_reason", {}) if ingest_report else {}
    feedback_dropped = sum(feedback_dropped_by_reason.values())

    volume_change = None
    if trailing_average:
        ratio = volume / trailing_average
        volume_change = max(ratio, 1 / ratio) if ratio > 0 else float("inf")
    elif trailing_average == 0 and volume == 0:
        # Nothing on the date nor in the week before, with history before that: the source, not the
        # users, most likely stopped; a factor of nothing against nothing must not read as no change.
        volume_change = float("inf")
    return {
        "volume": volume,
        "trailing_days": days_of_history,
        "trailing_average": trailing_average,
        "last_event_before": last_before.date().isoformat() if last_before else None,
        "volume_ratio": volume / trailing_average if trailing_average else None,
        "volume_change": volume_change,
        "users_today": users_today,
        "items_today": items_today,
        "new_user_share": new_users,
        "new_item_share": new_items,
        "null_fraction": null_fraction,
        "quarantine_fraction": quarantine_fraction,
        "rows_read": ingest_report.get("rows_read") if ingest_report else None,
        "feedback_read": feedback_read,
        "feedback_dropped": feedback_dropped,
        "feedback_dropped_by_reason": feedback_dropped_by_reason,
        "feedback_dropped_share": feedback_dropped / feedback_read if feedback_read else None,
        "weight": {
            "today": distributions.quantiles(today_weights) | {"mean": _mean(today_weights)},
            "before": distributions.quantiles(before_weights) | {"mean": _mean(before_weights)},
            "histogram": weight_shares.__dict__ if weight_shares else None,
        },
        "weight_psi": distributions.psi_of_shares(weight_shares.expected, weight_shares.actual)
        if weight_shares
        else None,
    }


def volume_in_words(logical_date: date, measured: dict[str, Any]) -> str | None:
    """The volume check's message where a factor says it badly: a day without events (an infinite
    change; it usually means a broken or late source, so it still fails), also after a week without
    any; a first night, with no full day before it to compare with (not measured, so it never holds a
    batch back); and the events of a day after a week without any (nothing to compare them with)."""
    volume, average = measured["volume"], measured["trailing_average"]
    if average is None:
        return (
            f"volume_change: not measured: no full day of events before {logical_date} to compare its "
            f"{volume:,} events with (a first night)"
        )
    days = measured["trailing_days"]
    if average == 0:
        if volume > 0:
            return (
                f"volume_change: not measured: no events in the {days} days before {logical_date} to compare "
                f"its {volume:,} events with (the last before them was on {measured['last_event_before']})"
            )
        return (
            f"no events on {logical_date} nor in the {days} days before it (the last event was on "
            f"{measured['last_event_before']}): the source may be incomplete"
        )
    if volume == 0:
        shown = f"{average:,.0f}" if average >= 10 else f"{average:.2g}"
        return (
            f"no events on {logical_date}; the trailing {measured['trailing_days']}-day average is {shown} a day: "
            "the source may be incomplete"
        )
    return None


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _ingest_report(settings: Settings, logical_date: date) -> dict[str, Any] | None:
    path = workdir.ingest_report_path(settings, logical_date)
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# ---------------------------------------------------------------------------- the night's report


@dataclass(frozen=True)
class InputReport:
    logical_date: str
    model_id: str
    verdict: str
    features_checked: int
    drifted_features: list[str]
    retrain_reason: str | None
    rows_in: int
    rows_out: int
    problems: list[str] = field(default_factory=list)
    flagged_inputs: list[str] = field(default_factory=list)  # input statistics at warn or fail

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_in=self.rows_in, rows_out=self.rows_out, model_id=self.model_id)

    def summary(self) -> str:
        inputs = ", ".join(self.flagged_inputs) or "none"
        drifted = ", ".join(self.drifted_features) or "none"
        retrain = "; retrain requested" if self.retrain_reason else ""
        return f"{self.verdict}: input checks flagged {inputs}; drifted features {drifted}{retrain}"


INPUT_STATISTICS = (
    "volume_change",
    "new_user_share",
    "new_item_share",
    "null_fraction",
    "quarantine_fraction",
    "weight_psi",
    "feedback_dropped_share",
)


def monitor_input(settings: Settings, logical_date: date) -> InputReport:
    """Measure the date's input and the model's feature drift, record both, request a retrain on
    strong drift and alert on every fail. Runs after scoring, before publish."""
    limits = checks.thresholds(settings)
    with connect(settings) as conn:
        upgrade(conn)
        model = registry.model_for_date(conn, logical_date)
    if model is None:
        raise MissingDataError(
            f"no promoted model trained on or before {logical_date} to measure drift against; "
            f"run `overnight train --date {logical_date}`"
        )

    measured = input_statistics(settings, logical_date)
    input_details = {
        "feedback_dropped_share": {
            "feedback_read": measured["feedback_read"],
            "feedback_dropped_by_reason": measured["feedback_dropped_by_reason"],
        }
    }
    described = {"volume_change": volume_in_words(logical_date, measured)}
    input_checks = [
        checks.judge(
            limits, "input", name, measured[name], details=input_details.get(name), described=described.get(name)
        )
        for name in INPUT_STATISTICS
    ]

    reference_file = reference_path(settings, model)
    drift_checks: list[checks.Check] = []
    drift_report: dict[str, Any] = {"model_id": model.model_id, "reference": str(reference_file)}
    current_rows = 0
    if reference_file.is_file():
        reference = pl.read_parquet(str(reference_file))
        current = tonight(settings, logical_date)
        current_rows = current.height
        names = [f for f in model.features if f in reference.columns and f in current.columns]
        drifts = feature_drift(reference, current, names)
        drift_report |= {
            "reference_rows": reference.height,
            "current_rows": current.height,
            "features": {d.feature: _drift_dict(d) for d in drifts},
        }
        for d in drifts:
            details = {"ks_pvalue": d.ks_pvalue, "reference_mean": d.reference_mean, "current_mean": d.current_mean}
            drift_checks.append(checks.judge(limits, "drift", "feature_psi", d.psi, d.feature, details))
            drift_checks.append(checks.judge(limits, "drift", "feature_ks", d.ks, d.feature, details))
    else:
        drift_report["problem"] = f"model {model.model_id} has no training reference at {reference_file}"
        logger.warning("drift: %s; feature drift is not measured", drift_report["problem"])

    retrain_reason = _retrain_reason(settings, logical_date, drift_checks)
    drift_report["retrain_reason"] = retrain_reason
    run_id = history.current_run_id()
    with connect(settings) as conn:
        checks.record(conn, logical_date, "input", input_checks, measured, run_id=run_id, model_id=model.model_id)
        checks.record(conn, logical_date, "drift", drift_checks, drift_report, run_id=run_id, model_id=model.model_id)
        if retrain_reason:
            conn.execute(sql.query("request_retrain"), (model.model_id, logical_date, retrain_reason))
        else:
            conn.execute(sql.query("withdraw_retrain"), (model.model_id, logical_date))

    judged = input_checks + drift_checks
    problems = [c for c in judged if c.level == "fail"]
    if problems:
        alerts.alert_problems(settings, logical_date, problems, run_id, "input monitoring")
    if retrain_reason:
        alerts.send_alert(
            f"overnight {logical_date}: model {model.model_id} is due for retraining",
            {
                "text": retrain_reason,
                "logical_date": logical_date.isoformat(),
                "run_id": run_id,
                "model_id": model.model_id,
                "dashboard": alerts.dashboard_link(settings, logical_date),
            },
            fingerprint=f"retrain:{model.model_id}",
            settings=settings,
        )
    drifted = sorted({c.subject for c in drift_checks if c.level != "ok"})
    return InputReport(
        logical_date=logical_date.isoformat(),
        model_id=model.model_id,
        verdict=checks.verdict(judged),
        features_checked=len({c.subject for c in drift_checks}),
        drifted_features=drifted,
        retrain_reason=retrain_reason,
        rows_in=int(measured["volume"]),
        rows_out=current_rows,
        problems=[c.message for c in judged if c.level != "ok"],
        flagged_inputs=[c.statistic for c in input_checks if c.level != "ok"],
    )


def _drift_dict(d: FeatureDrift) -> dict[str, Any]:
    return {
        "psi": d.psi,
        "ks": d.ks,
        "ks_pvalue": d.ks_pvalue,
        "reference_mean": d.reference_mean,
        "current_mean": d.current_mean,
        "histogram": d.histogram.__dict__,
    }


def _retrain_reason(settings: Settings, logical_date: date, drift_checks: list[checks.Check]) -> str | None:
    limit = settings.drift_retrain_psi
    if limit is None:
        return None
    drifted = sorted(
        (
            (c.value, c.subject)
            for c in drift_checks
            if c.statistic == "feature_psi" and c.value is not None and c.value >= limit
        ),
        reverse=True,
    )
    if not drifted:
        return None
    listed = some([f"{name} PSI {value:.3f}" for value, name in drifted], 5)
    return f"feature drift on {logical_date}: {listed} (retrain at PSI >= {limit:g})"


def drift_requires_retrain(conn: psycopg.Connection, logical_date: date) -> str | None:
    """Why the model ``logical_date`` would use should be retrained because of drift, or None.

    A request holds from the date its drift was measured until a newer model takes over.
    """
    row = conn.execute(sql.query("retrain_request_for_date"), {"logical_date": logical_date}).fetchone()
    return str(row[0]) if row else None


def report(settings: Settings, logical_date: date) -> dict[str, Any]:
    """The stored monitoring report of a date; measuring it is the monitor step's work, never this reader's."""
    with connect(settings) as conn:
        upgrade(conn)
        stored = checks.stored_reports(conn, logical_date)
        if "input" not in stored:
            raise MissingDataError(
                f"{logical_date} has no monitoring report yet; run `overnight monitor --date {logical_date}`"
            )
        stored_checks = checks.stored_checks(conn, logical_date)
        retrain = drift_requires_retrain(conn, logical_date)
    return {
        "logical_date": logical_date.isoformat(),
        "verdict": max((c["level"] for c in stored_checks), key=checks.LEVELS.index, default="ok"),
        "retrain_reason": retrain,
        "stages": {
            stage: {
                "verdict": row["verdict"],
                "model_id": row["model_id"],
                "batch_id": row["batch_id"],
                "run_id": row["run_id"],
                "created_at": row["created_at"].isoformat(),
                "report": row["report"],
            }
            for stage, row in stored.items()
        },
        "checks": [{k: v for k, v in c.items() if k not in ("model_id", "batch_id", "run_id")} for c in stored_checks],
    }


def render_report(found: dict[str, Any]) -> list[str]:
    """A ``report`` as the lines ``overnight drift`` prints: each stage's verdict and checks, the drift
    stage as a table of features, worst PSI first."""
    lines = [f"monitoring of {found['logical_date']}: {found['verdict'].upper()}"]
    for stage in ("input", "drift", "output"):
        stored = found["stages"].get(stage)
        lines.append("")
        if stored is None:
            lines.append(
                f"{stage}: not measured yet" + ("  (measured when the batch is published)" if stage == "output" else "")
            )
            continue
        where = f"model {stored['model_id']}" + (f", batch {stored['batch_id']}" if stored["batch_id"] else "")
        lines.append(f"{stage}: {stored['verdict']}  ({where}, run {stored['run_id'] or '-'})")
        if stage == "drift":
            problem = stored["report"].get("problem")
            if problem:
                lines.append(f"  {problem}")
            features = stored["report"].get("features", {})
            if features:
                lines.append(f"  {'feature':<24} {'PSI':>8} {'KS':>7} {'p-value':>9}  level")
                levels = {(c["statistic"], c["subject"]): c["level"] for c in found["checks"] if c["stage"] == "drift"}
                for name, values in sorted(features.items(), key=lambda item: -(item[1]["psi"] or 0)):
                    level = max(
                        levels.get(("feature_psi", name), "ok"),
                        levels.get(("feature_ks", name), "ok"),
                        key=checks.LEVELS.index,
                    )
                    ks, pvalue = values["ks"] or 0.0, values["ks_pvalue"] or 0.0
                    psi = "-" if values["psi"] is None else f"{values['psi']:.3f}"  # not measurable: say so
                    lines.append(f"  {name:<24} {psi:>8} {ks:7.3f} {pvalue:9.2g}  {level}")
            continue
        lines += [f"  {check['level']:<5} {check['message']}" for check in found["checks"] if check["stage"] == stage]
    if found["retrain_reason"]:
        lines += ["", f"retrain due: {found['retrain_reason']}"]
    return lines
