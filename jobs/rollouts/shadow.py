"""Shadow batches: score a date with another registered model into a batch that is never served, and compare it
with what production published for the same date (``overnight shadow-report``; docs/rollouts.md#shadow).
"""

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any

import polars as pl
import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

import sql
from jobs import lake
from jobs.database import connect, upgrade
from jobs.errors import FutureModelError, MissingDataError, UnfitCandidatesError
from jobs.outcome import Outcome
from jobs.settings import Settings
from jobs.steps import publish, ranking_metrics, score, train

logger = logging.getLogger(__name__)

OVERLAP_K = ranking_metrics.K
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass(frozen=True)
class ShadowResult:
    logical_date: str
    model_id: str
    batch_id: int
    users: int

    def summary(self) -> str:
        return f"shadow batch {self.batch_id} of model {self.model_id}: {self.users:,} users (never served)"

    def outcome(self) -> Outcome:
        return Outcome(
            self.summary(), rows_out=self.users, batch_id=self.batch_id, model_id=self.model_id, production=False
        )


def run_shadow(settings: Settings, logical_date: date, model_id: str, shards: int | None = None) -> ShadowResult:
    """Score every user of the date with `model_id` and publish the result as a shadow batch."""
    score.score(settings, logical_date, shards, model_id=model_id)
    published = publish.publish_shadow(settings, logical_date, model_id)
    return ShadowResult(logical_date.isoformat(), published.model_id, published.batch_id, published.users)


@dataclass(frozen=True)
class ShadowSkipped:
    """A nightly shadow that could not apply to its date; the night goes on without it."""

    logical_date: str
    model_id: str
    reason: str
    skipped: bool = True

    def summary(self) -> str:
        return f"shadow skipped: {self.reason}"

    def outcome(self) -> Outcome:
        return Outcome(self.summary())


def nightly_shadow(
    settings: Settings, logical_date: date, model_id: str, shards: int | None = None
) -> ShadowResult | ShadowSkipped:
    """The shadow of a scheduled run: like `run_shadow`, but a model that cannot score the date (trained
    after it, in a backfill of an older date with today's OVERNIGHT_SHADOW_MODEL; or tuned with other
    candidate settings than the date's tables) skips the shadow with the reason logged, rather than
    failing a night whose production batch is published. An unknown model still fails."""
    try:
        return run_shadow(settings, logical_date, model_id, shards)
    except (FutureModelError, UnfitCandidatesError) as error:
        skipped = ShadowSkipped(logical_date.isoformat(), model_id, str(error))
        logger.warning("%s", skipped.summary())
        return skipped


@dataclass(frozen=True)
class ShadowReport:
    logical_date: str
    production: dict[str, Any]
    shadow: dict[str, Any]
    overlap: dict[str, Any]
    evaluation: dict[str, Any]
    deltas: dict[str, float] = field(default_factory=dict)
    latest_window: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as the lines ``overnight shadow-report`` prints."""

        def compared(key: str, production: float, delta: float) -> str:
            return f"  {key:<14} production {production:.4f}  shadow {production + delta:.4f}  delta {delta:+.4f}"

        lines = [
            f"{self.logical_date}: production batch {self.production['batch_id']} ({self.production['model_id']}) "
            f"vs shadow batch {self.shadow['batch_id']} ({self.shadow['model_id']})"
        ]
        latest = self.latest_window
        if "note" in latest:
            lines.append(f"latest window: {latest['note']}")
        else:
            lines.append(f"latest window {latest['window']}: {latest['users']:,} held-out users, as the promotion gate")
            lines += [compared(key, latest["production"][key], delta) for key, delta in latest["deltas"].items()]
        if "unavailable" in self.overlap:
            lines.append(f"overlap, evaluation after the date, scores: unavailable: {self.overlap['unavailable']}")
            return lines
        lines.append(f"overlap: {json.dumps(self.overlap)}")
        window = self.evaluation["window"]
        lines.append(
            f"evaluation window {window['start']} .. {window['end']}: {window['users']:,} users, "
            f"{window['days_with_data']} of {window['days']} days with data"
            + ("" if self.evaluation["window_complete"] else " (INCOMPLETE)")
        )
        if "warning" in self.evaluation:
            lines.append(f"  warning: {self.evaluation['warning']}")
        elif "note" in self.evaluation:
            lines.append(f"  {self.evaluation['note']}")
        lines += [compared(key, self.evaluation["production"][key], delta) for key, delta in self.deltas.items()]
        for name, batch in (("production", self.production), ("shadow", self.shadow)):
            lines.append(f"{name} scores: all {json.dumps(batch['scores']['all_scores'])}")
            lines.append(f"{name} scores: top {json.dumps(batch['scores']['top_scores'])}")
        return lines


def _batch(conn: psycopg.Connection, query: str, logical_date: date, what: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute(sql.query(query), (logical_date,)).fetchone()
    if found is None:
        raise MissingDataError(f"no {what} batch for {logical_date}")
    found["generated_at"] = found["generated_at"].isoformat()
    return found


def _distribution(conn: psycopg.Connection, batch_id: int) -> dict[str, Any]:
    row = conn.execute(sql.batch_query("score_distribution", batch_id)).fetchone()
    assert row is not None
    users, all_scores, top_scores = row

    def named(values: list[float] | None) -> dict[str, float]:
        return {f"p{round(q * 100):02d}": round(v, 6) for q, v in zip(QUANTILES, values or [], strict=False)}

    return {"users": users, "all_scores": named(all_scores), "top_scores": named(top_scores)}


def _deltas(production: dict[str, Any], shadow: dict[str, Any]) -> dict[str, float]:
    """Shadow minus production for each metric@k."""
    return {key: round(shadow[key] - production[key], 9) for key in production if "@" in key}


def _dropped_tables(conn: psycopg.Connection, batches: dict[str, dict[str, Any]]) -> str:
    """Which of the batches' tables retention dropped: "the table of batch N (production) was dropped"."""
    dropped = []
    with conn.cursor(row_factory=dict_row) as cur:
        for name, batch in batches.items():
            found = cur.execute(sql.query("batch_for_rollout"), (batch["batch_id"],)).fetchone()
            if found is None or not found["has_table"]:
                dropped.append(f"batch {batch['batch_id']} ({name})")
    if len(dropped) == 1:
        return f"the table of {dropped[0]} was dropped"
    return f"the tables of {' and '.join(dropped)} were dropped"


def _top_items(conn: psycopg.Connection, batch_id: int, users: list[str]) -> pl.DataFrame:
    rows = conn.execute(sql.batch_query("top_items_for_users", batch_id), (OVERLAP_K, users)).fetchall()
    frame = pl.DataFrame(rows, schema={"user_id": pl.String, "item_ids": pl.List(pl.String)}, orient="row")
    return (
        frame.explode("item_ids")
        .drop_nulls("item_ids")
        .rename({"item_ids": "item_id"})
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("user_id"))
    )


def evaluation_window(settings: Settings, logical_date: date, horizon_days: int) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The relevant (user, item) pairs after the date: what users did once the batches were made; and
    the window, with how many of its days the lake holds interactions for (``days_with_data``)."""
    start = lake.day_end(logical_date)
    end = start + timedelta(days=horizon_days)
    events = (
        lake.scan_interactions(settings.lake_dir, logical_date + timedelta(days=horizon_days))
        .filter(pl.col("timestamp") >= start, pl.col("timestamp") < end)
        .select("user_id", "item_id", day=pl.col("timestamp").dt.date())
        .unique()
        .collect()
    )
    relevant = events.select("user_id", "item_id").unique()
    days = sorted(events["day"].unique().to_list())
    window = {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "users": relevant["user_id"].n_unique(),
        "pairs": relevant.height,
        "days": horizon_days,
        "days_with_data": len(days),
        "last_day_with_data": days[-1].isoformat() if days else None,
    }
    return relevant, window


def latest_window_comparison(
    settings: Settings, logical_date: date, production_model_id: str, shadow_model_id: str
) -> dict[str, Any]:
    """Both models on the newest label windows as of the date, on their held-out users, pooled: what the
    promotion gate compares (`jobs.steps.train`), so it needs no event after the date nor either batch's table."""
    try:
        catalogue, windows, held_out = train.label_data(settings, logical_date)
    except MissingDataError as error:
        return {"note": f"there is no labelled window to compare the models on: {error}"}
    judged = train.gate_windows(windows, settings)
    rankers = {}
    for name, model_id in (("production", production_model_id), ("shadow", shadow_model_id)):
        model, booster = score.load_ranker(settings, logical_date, model_id)
        rankers[name] = (booster, list(model.features))
    results = train.pooled_results(
        [
            train.evaluate_models(train.build_examples(window, catalogue, settings, held_out), rankers, settings)
            for window in judged
        ]
    )
    compared = {
        name: {key: value for key, value in results[name].items() if "@" in key or key == "users"} for name in rankers
    }
    return {
        "window": ", ".join(window.name for window in judged),
        "cutoff": judged[-1].cutoff.isoformat(),
        "users": compared["production"]["users"],
        **compared,
        "deltas": _deltas(compared["production"], compared["shadow"]),
    }


def _compare_lists(
    conn: psycopg.Connection,
    settings: Settings,
    logical_date: date,
    horizon_days: int,
    batches: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(overlap, evaluation after the date, its deltas) from both batches' tables, with each batch's score
    distribution put in its "scores"; psycopg.errors.UndefinedTable when retention dropped either table."""
    production, shadow = batches["production"], batches["shadow"]
    for batch in batches.values():
        batch["scores"] = _distribution(conn, batch["batch_id"])
    overlap_query = pgsql.SQL(sql.query("batch_overlap")).format(
        production=sql.recs_table(production["batch_id"]), shadow=sql.recs_table(shadow["batch_id"])
    )
    with conn.cursor(row_factory=dict_row) as cur:
        overlap = cur.execute(overlap_query, {"n": OVERLAP_K}).fetchone()
    assert overlap is not None
    overlap = {
        f"overlap@{OVERLAP_K}": round(float(overlap["mean_overlap"]), 6),
        "users_in_both": overlap["users"],
        "identical_lists": overlap["identical"],
    }

    relevant, window = evaluation_window(settings, logical_date, horizon_days)
    complete = window["days_with_data"] == horizon_days
    evaluation: dict[str, Any] = {"window": window, "window_complete": complete}
    deltas: dict[str, float] = {}
    last_day = logical_date + timedelta(days=horizon_days)
    if not complete:
        evaluation["warning"] = (
            f"the evaluation window [{logical_date + timedelta(days=1)}, {last_day + timedelta(days=1)}) has "
            f"interactions for {window['days_with_data']} of its {horizon_days} days"
            + (
                ": the metrics and deltas below are of a partial window"
                if window["days_with_data"]
                else ": there is nothing to evaluate yet"
            )
            + f"; run the report again once {last_day} is ingested"
            # a smaller window helps only when some of its days have data
            + (" (or pass a smaller --horizon-days)" if window["days_with_data"] else "")
        )
        logger.warning("shadow report of %s: %s", logical_date, evaluation["warning"])
    if relevant.height == 0:
        evaluation["note"] = (
            f"no events after {logical_date} in the lake yet: run the report again once later dates are ingested"
        )
    else:
        users = relevant["user_id"].unique().to_list()
        catalogue = lake.read_catalogue(settings.lake_dir, logical_date).height
        for name, batch in batches.items():
            recommendations = _top_items(conn, batch["batch_id"], users)
            evaluation[name] = ranking_metrics.ranking_metrics(recommendations, relevant, catalogue)
        deltas = _deltas(evaluation["production"], evaluation["shadow"])
    return overlap, evaluation, deltas


def shadow_report(settings: Settings, logical_date: date, horizon_days: int = 7) -> ShadowReport:
    with connect(settings) as conn:
        upgrade(conn)
        production = _batch(conn, "serving_batch_for_date", logical_date, "production")
        shadow = _batch(conn, "shadow_batch_for_date", logical_date, "shadow")
        conn.commit()
        batches = {"production": production, "shadow": shadow}
        try:
            overlap, evaluation, deltas = _compare_lists(conn, settings, logical_date, horizon_days, batches)
        except psycopg.errors.UndefinedTable:
            conn.rollback()
            unavailable = {
                "unavailable": f"{_dropped_tables(conn, batches)} by retention, which keeps the newest "
                f"OVERNIGHT_KEEP_BATCHES ({settings.keep_batches}) batches of each kind: the overlap, the score "
                f"distributions and the evaluation after {logical_date} need both published lists; the latest "
                "window compares the models without them"
            }
            logger.warning("shadow report of %s: %s", logical_date, unavailable["unavailable"])
            for batch in batches.values():
                batch["scores"] = unavailable
            overlap, evaluation, deltas = unavailable, unavailable, {}
    try:
        latest_window = latest_window_comparison(settings, logical_date, production["model_id"], shadow["model_id"])
    except MissingDataError as error:
        latest_window = {"note": f"the models cannot be compared on the latest window: {error}"}
    return ShadowReport(
        logical_date=logical_date.isoformat(),
        production=production,
        shadow=shadow,
        overlap=overlap,
        evaluation=evaluation,
        deltas=deltas,
        latest_window=latest_window,
    )
