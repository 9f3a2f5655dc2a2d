"""Train the LightGBM LambdaRank ranker point in time, evaluate it, and register it through the promotion gate
(docs/architecture.md#3-train-when-due). Training, evaluation and scoring share one way to generate candidates and
features: the evaluation protocols build their label windows with the code the nightly run learns from.
"""

import json
import logging
import math
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psycopg
from upath import UPath

from jobs import lake, predictor, registry, tuning
from jobs.database import connect, upgrade
from jobs.errors import MissingDataError
from jobs.event_weights import EVENT_WEIGHT, GRADE, grade_levels, label_of_grade, with_event_weight
from jobs.monitoring import drift
from jobs.outcome import Outcome
from jobs.settings import Settings
from jobs.steps import candidates, features
from jobs.steps.ranking_metrics import DIGITS, K, candidate_recall, ranking_metrics

logger = logging.getLogger(__name__)

KEY = candidates.KEY
BUCKETS = 1000
HOLDOUT_SHARE = 0.2
# The promotion gate judges a new model on the newest label windows covering this many days, as the backtest
# (`overnight backtest`, its default horizon) judges the lists a night publishes.
GATE_DAYS = 28
VALIDATION_SHARE = 0.2  # of the training users of every window: where early stopping watches the rounds
MORE_WINDOWS = 4  # at most this many times label_windows, while the windows hold few users (rolling_windows)
# model names in evaluations: each candidate source on its own is a baseline
SOURCE_BASELINES = {
    "popular": "recent-popular",
    "covisit": "co-visitation",
    "knn": "item-knn",
    "genre": "genre-popular",
}
MOST_POPULAR = "most-popular"
RANKER = "ranker"
PRODUCTION = "production"
SMALL_DATA_ROWS = 500_000


# A label window: a cutoff, the events before it and each user's relevant items after it. The nightly run for D
# learns from rolling windows ending at D (`rolling_windows`); with `event_weights` the labels are graded.
@dataclass(frozen=True)
class LabelWindow:
    name: str
    cutoff: datetime  # candidates and features see only what happened before it
    history: pl.LazyFrame  # the events before the cutoff
    relevant: pl.DataFrame  # user_id, item_id, grade: new items of users with history, after the cutoff


@dataclass(frozen=True)
class Examples:
    """Candidates with features and labels for the labelled users of one window."""

    window: LabelWindow
    frame: pl.DataFrame  # user_id, item_id, FEATURES..., label
    relevant: pl.DataFrame  # user_id, item_id, grade
    catalogue_size: int


@dataclass(frozen=True)
class Fitted:
    booster: Any
    rounds: int
    importance: dict[str, float]
    training: dict[str, Any]


@dataclass(frozen=True)
class TrainResult:
    logical_date: str
    trained: bool
    model_id: str  # the model trained now, or the one kept when nothing was trained
    status: str
    reason: str
    scoring_model_id: str | None = None  # what scores the date after this step
    metrics: dict[str, Any] = field(default_factory=dict)
    training_rows: int | None = None  # candidate rows the model was fitted on; None when nothing was trained

    @property
    def promoted(self) -> bool:
        return self.trained and self.status in ("production", "retired")

    def outcome(self) -> Outcome:
        return Outcome(self.summary(), rows_in=self.training_rows, model_id=self.scoring_model_id)

    def summary(self) -> str:
        if not self.trained:
            return f"kept {self.model_id}: {self.reason}"
        ndcg = f"ndcg@10 {self.metrics['ndcg@10']:.4f}"
        if not self.promoted:
            return f"{self.model_id} {ndcg}: {self.reason}; scoring with {self.scoring_model_id or 'no model'}"
        return f"{self.model_id} ({self.status}), {ndcg}"


# ---------------------------------------------------------------- label windows


def new_items(history: pl.LazyFrame, later: pl.LazyFrame, settings: Settings) -> pl.DataFrame:
    """(user_id, item_id, grade) of ``later`` for users with ``history``; without what they saw when
    ``exclude_seen``. grade is the largest weight of the user's events on the item (``event_weights``; 1 without)."""
    graded = with_event_weight(later, settings.event_weights).group_by(KEY).agg(pl.col(EVENT_WEIGHT).max().alias(GRADE))
    relevant = graded.join(history.select("user_id").unique(), on="user_id", how="semi")
    if settings.exclude_seen:
        relevant = relevant.join(history.select(KEY).unique(), on=KEY, how="anti")
    return relevant.sort(KEY).collect()


def time_window(events: pl.LazyFrame, cutoff: datetime, end: datetime, settings: Settings) -> LabelWindow:
    """History before ``cutoff``; relevant: what users with history touched in [cutoff, end)."""
    history = events.filter(pl.col("timestamp") < cutoff)
    later = events.filter((pl.col("timestamp") >= cutoff) & (pl.col("timestamp") < end))
    return LabelWindow(
        name=f"[{cutoff:%Y-%m-%d}, {end:%Y-%m-%d})",
        cutoff=cutoff,
        history=history,
        relevant=new_items(history, later, settings),
    )


def rolling_windows(events: pl.LazyFrame, end: datetime, settings: Settings) -> list[LabelWindow]:
    """Consecutive windows of ``label_days`` ending at ``end``, newest first: ``label_windows`` of them, and
    more (up to MORE_WINDOWS times as many) while those so far hold fewer than ``train_max_users`` labelled
    users, so that small data learns from all the history it has and large data stays at ``label_windows``.
    A window without history before it or without labels ends the list."""
    windows: list[LabelWindow] = []
    labelled = 0
    for number in range(settings.label_windows * MORE_WINDOWS):
        if number >= settings.label_windows and labelled >= settings.train_max_users:
            break
        window_end = end - timedelta(days=settings.label_days * number)
        window = time_window(events, window_end - timedelta(days=settings.label_days), window_end, settings)
        if window.relevant.height == 0:
            break
        windows.append(window)
        labelled += window.relevant["user_id"].n_unique()
    return windows


def user_buckets(users: pl.Series, seed: int) -> pl.Series:
    """A stable bucket in [0, BUCKETS) per user id: the same user lands in the same bucket every night."""
    return users.map_elements(
        lambda user: zlib.crc32(f"{seed}:{user}".encode()) % BUCKETS, return_dtype=pl.Int32, skip_nulls=True
    )


def held_out_users(users: pl.Series, seed: int) -> pl.Series:
    """The users never trained on: the promotion gate compares models on them."""
    unique = users.unique().sort()
    return unique.filter(user_buckets(unique, seed) < int(BUCKETS * HOLDOUT_SHARE))


# ---------------------------------------------------------------- examples


def build_examples(
    window: LabelWindow, catalogue: pl.DataFrame, settings: Settings, users: pl.Series | None = None
) -> Examples:
    """Candidates and features of the window's labelled users (or of ``users`` among them), with labels.

    The same candidate and feature code as scoring: item tables from the history, then one call
    of ``features.for_users`` over the users' histories.
    """
    relevant = window.relevant
    if users is not None:
        relevant = relevant.filter(pl.col("user_id").is_in(users.implode()))
    tables = candidates.build_tables(window.history, catalogue, window.cutoff, settings)
    feature_tables = features.build_tables(window.history, catalogue, window.cutoff)
    labelled = relevant.select("user_id").unique()
    user_history = window.history.join(labelled.lazy(), on="user_id", how="semi").collect()
    encoded = features.encode_tables(tables, feature_tables, user_history["item_id"])
    frame = features.for_users(user_history, encoded, window.cutoff, settings).with_columns(pl.col(KEY).cast(pl.String))
    labels = relevant.select(*KEY, label=label_of_grade(pl.col(GRADE), settings.event_weights))
    frame = frame.join(labels, on=KEY, how="left").with_columns(pl.col("label").fill_null(0))
    return Examples(window=window, frame=frame, relevant=relevant, catalogue_size=catalogue.height)


def sample_users(users: pl.Series, limit: int, seed: int) -> pl.Series:
    """At most about ``limit`` of ``users``, the same ones for the same seed."""
    unique = users.unique().sort()
    if unique.len() <= limit:
        return unique
    return unique.filter(user_buckets(unique, seed + 1) < max(1, BUCKETS * limit // unique.len()))


# ---------------------------------------------------------------- fitting


def lightgbm_params(settings: Settings) -> dict[str, Any]:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [K],
        "learning_rate": settings.learning_rate,
        "num_leaves": settings.num_leaves,
        "min_data_in_leaf": settings.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        # graded labels 1, 2, ... gain as much as the event weights they stand for (0: not relevant)
        **({"label_gain": [0.0, *levels]} if (levels := grade_levels(settings.event_weights)) else {}),
        "seed": settings.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 0,
        "verbose": -1,
    }


def threads_for(rows: int) -> int:
    """One thread for small data: OpenMP threads that wait on each other cost more than they bring,
    many times more on a busy machine; all cores (0) from SMALL_DATA_ROWS on."""
    return 1 if rows < SMALL_DATA_ROWS else 0


def _dataset(frames: list[pl.DataFrame], reference: Any = None) -> Any:
    import lightgbm as lgb

    # a user's rows are one query group per window; users who got no relevant candidate teach nothing
    useful = [f.filter(pl.col("label").max().over("user_id") > 0).sort(KEY) for f in frames]
    frame = pl.concat(useful) if useful else pl.DataFrame()
    groups = np.concatenate([f.group_by("user_id", maintain_order=True).len()["len"].to_numpy() for f in useful])
    return lgb.Dataset(
        frame.select(features.FEATURES).to_numpy(),
        label=frame["label"].to_numpy(),
        group=groups,
        feature_name=list(features.FEATURES),
        reference=reference,
        free_raw_data=True,
    ), frame


def fit(training: list[Examples], settings: Settings) -> Fitted:
    """Early-stop on a fifth of the training users (by a stable hash) of every window, fitting on the rest,
    then refit on every user with the best number of rounds.

    Every window rather than the newest alone: on small data the newest holds too few users, and the
    rounds it picks swing from a handful to a hundred between neighbouring nights (docs/evaluation.md#backtest).
    """
    import lightgbm as lgb

    frames = [e.frame for e in training]
    fit_frames, valid_frames = [], []
    for frame in frames:
        users = frame["user_id"].unique().sort()
        valid_users = users.filter(user_buckets(users, settings.seed + 2) < int(BUCKETS * VALIDATION_SHARE)).implode()
        fit_frames.append(frame.filter(~pl.col("user_id").is_in(valid_users)))
        valid_frames.append(frame.filter(pl.col("user_id").is_in(valid_users)))
    params = {**lightgbm_params(settings), "num_threads": threads_for(sum(f.height for f in frames))}
    train_set, _ = _dataset(fit_frames)
    if train_set.get_label() is None or len(train_set.get_label()) == 0:
        raise MissingDataError("no candidate of any training user was relevant in the label windows")
    valid_set, valid_frame = _dataset(valid_frames, reference=train_set)
    rounds = settings.num_boost_round
    if valid_frame.height:
        probe = lgb.train(
            params,
            train_set,
            num_boost_round=settings.num_boost_round,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)],
        )
        rounds = max(1, probe.best_iteration or settings.num_boost_round)
    full_set, full_frame = _dataset(frames)
    booster = lgb.train(params, full_set, num_boost_round=rounds)
    importance = dict(
        zip(features.FEATURES, (round(float(g), 3) for g in booster.feature_importance("gain")), strict=True)
    )
    return Fitted(
        booster=booster,
        rounds=rounds,
        importance=importance,
        training={
            "windows": [e.window.name for e in training],
            "rows": full_frame.height,
            "users": full_frame.select("user_id").n_unique(),
            "positives": int(full_frame["label"].sum()),
            "rounds": rounds,
            "threads": params["num_threads"],
            "early_stopping_on": f"{VALIDATION_SHARE:.0%} of the users of every window",
        },
    )


# ---------------------------------------------------------------- evaluation


def top_k(frame: pl.DataFrame, score: pl.Expr, k: int, descending: bool = True) -> pl.DataFrame:
    """(user_id, item_id, rank) of each user's k best rows by ``score``; ties go by item id."""
    return (
        frame.with_columns(_score=score)
        .drop_nulls("_score")
        .sort(["user_id", "_score", "item_id"], descending=[False, descending, False])
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("user_id"))
        .filter(pl.col("rank") <= k)
        .select("user_id", "item_id", "rank")
    )


def predict(booster: Any, frame: pl.DataFrame, feature_names: list[str]) -> np.ndarray:
    threads = threads_for(frame.height)
    return np.asarray(booster.predict(frame.select(feature_names).to_numpy(), num_threads=threads), dtype=np.float64)


def most_popular(history: pl.LazyFrame, users: pl.DataFrame, limit: int, settings: Settings) -> pl.DataFrame:
    """(user_id, item_id, popularity): the all-time most interacted-with items, less what each user saw."""
    seen = history.select(KEY).unique().join(users.lazy(), on="user_id", how="semi").collect()
    longest = seen.group_by("user_id").len()["len"].max() if settings.exclude_seen and seen.height else 0
    assert isinstance(longest, int | None)
    top = (
        history.group_by("item_id")
        .agg(popularity=pl.len())
        .sort(["popularity", "item_id"], descending=[True, False])
        .head(limit + int(longest or 0))
        .collect()
    )
    proposed = users.join(top, how="cross")
    if settings.exclude_seen:
        proposed = proposed.join(seen, on=KEY, how="anti")
    return proposed


def evaluate_models(
    examples: Examples, rankers: dict[str, tuple[Any, list[str]]], settings: Settings
) -> dict[str, Any]:
    """Metrics@10 of each ranker and of every baseline on the same users.

    Per model: ndcg@10, recall@10, map@10, hit_rate@10, coverage@10, users, candidate_recall (the share
    of relevant items among everything the model could have ranked: the ceiling of its recall) and,
    for rankers, full_lists (the share of users who got 10 items) and finite_scores.
    """
    frame, relevant, size = examples.frame, examples.relevant, examples.catalogue_size
    results: dict[str, Any] = {}
    union_recall = candidate_recall(frame, relevant)
    users = relevant.select("user_id").unique()
    for name, (booster, feature_names) in rankers.items():
        scores = predict(booster, frame, feature_names)
        listed = top_k(frame.with_columns(_ranker=pl.Series(scores)), pl.col("_ranker"), K)
        full = listed.group_by("user_id").len().filter(pl.col("len") >= K).height
        results[name] = {
            **ranking_metrics(listed, relevant, size),
            "candidate_recall": union_recall,
            "full_lists": round(full / users.height, 6) if users.height else 0.0,
            "finite_scores": bool(np.isfinite(scores).all()),
        }
    for name, (listed, proposed) in baseline_lists(examples, settings).items():
        results[name] = {
            **ranking_metrics(listed, relevant, size),
            "candidate_recall": candidate_recall(proposed, relevant),
        }
    return results


def baseline_lists(examples: Examples, settings: Settings) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """Every baseline's lists for the examples' labelled users: (its top K, user_id, item_id, rank; all it
    proposed, the ceiling of its recall). Each candidate source on its own, and the all-time most popular."""
    frame = examples.frame
    lists: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}
    for source, name in SOURCE_BASELINES.items():
        score, rank = candidates.SOURCES[source]
        proposed = frame.filter(pl.col(score) > 0) if source != "popular" else frame
        proposed = proposed.filter(pl.col(rank) <= candidates.source_limits(settings)[source])
        lists[name] = (top_k(proposed, pl.col(rank), K, descending=False), proposed)
    users = examples.relevant.select("user_id").unique()
    popular = most_popular(examples.window.history, users, settings.popular_candidates, settings)
    popular_top = top_k(popular, pl.col("popularity"), settings.popular_candidates)
    lists[MOST_POPULAR] = (popular_top, popular_top)
    return lists


def baselines_of(results: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in results.items() if name not in (RANKER, PRODUCTION)}


# ---------------------------------------------------------------- promotion gate


def gate_windows(windows: list[LabelWindow], settings: Settings) -> list[LabelWindow]:
    """The newest label windows, covering GATE_DAYS: the span the promotion gate judges a new model on."""
    return windows[: max(1, math.ceil(GATE_DAYS / settings.label_days))]


def examples_of(examples: Examples, users: pl.Series) -> Examples:
    """The part of ``examples`` that is about ``users``."""
    mine = pl.col("user_id").is_in(users.implode())
    return Examples(
        examples.window, examples.frame.filter(mine), examples.relevant.filter(mine), examples.catalogue_size
    )


def pooled_results(per_window: list[dict[str, Any]]) -> dict[str, Any]:
    """Each model's metrics (``evaluate_models``) over the users of every window together: users add up,
    flags must hold in every window, every other number is the mean over windows weighted by their users."""
    pooled: dict[str, Any] = {}
    for name in per_window[0]:
        found = [results[name] for results in per_window if name in results]
        users = sum(metrics["users"] for metrics in found)
        model: dict[str, Any] = {}
        for key, value in found[0].items():
            if key == "users":
                model[key] = users
            elif isinstance(value, bool):
                model[key] = all(metrics[key] for metrics in found)
            elif isinstance(value, int | float):
                weighted = sum(metrics[key] * metrics["users"] for metrics in found)
                model[key] = round(weighted / users, DIGITS) if users else value
            else:
                model[key] = value
        pooled[name] = model
    return pooled


def promotion_gate(results: dict[str, Any], settings: Settings) -> str | None:
    """Why the new ranker must not become production, or None when it may.

    It must have finite scores, give a full list to enough users, and beat on NDCG@10 both the best
    baseline and the production model (when that could be evaluated on the same users) by the margin.
    """
    new = results[RANKER]
    if not new["finite_scores"]:
        return "the ranker produced non-finite scores"
    if new["full_lists"] < settings.promotion_min_user_coverage:
        return (
            f"only {new['full_lists']:.1%} of evaluated users got {K} items "
            f"(minimum {settings.promotion_min_user_coverage:.0%})"
        )
    factor = 1.0 + settings.promotion_margin
    margin = f" by {settings.promotion_margin:.1%}" if settings.promotion_margin else ""
    # the gate's own users and windows: not the figures the models were registered with
    best_name, best = max(baselines_of(results).items(), key=lambda item: item[1]["ndcg@10"])
    if new["ndcg@10"] < best["ndcg@10"] * factor or new["ndcg@10"] == 0.0:
        return (
            f"ndcg@10 {new['ndcg@10']:.4f} does not beat {best_name}{margin}: "
            f"it scores {best['ndcg@10']:.4f} on the same held-out users"
        )
    production = results.get(PRODUCTION)
    if production is not None and new["ndcg@10"] < production["ndcg@10"] * factor:
        return (
            f"ndcg@10 {new['ndcg@10']:.4f} does not beat the production model{margin}: "
            f"it scores {production['ndcg@10']:.4f} on the same held-out users"
        )
    return None


# ---------------------------------------------------------------- the nightly step


def _load_booster(settings: Settings, model: registry.ModelVersion) -> Any | None:
    """The production model's booster when it can rank today's features, else None."""
    import lightgbm as lgb

    if not set(model.features) <= set(features.FEATURES):
        return None
    try:
        return lgb.Booster(model_file=str(registry.artifact_file(settings, model)))
    except MissingDataError as error:
        logger.warning("train: cannot compare with %s: %s", model.model_id, error)
        return None


def label_data(settings: Settings, logical_date: date) -> tuple[pl.DataFrame, list[LabelWindow], pl.Series]:
    """(catalogue, rolling label windows, the users held out for the promotion gate: a fifth of those of the
    windows it judges, never trained on in any window) of a retrain on the date."""
    end = lake.day_end(logical_date)
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    # Item attributes (genres, availability) are taken as known on D; candidates and every
    # count still come from events before each window's cutoff only.
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    windows = rolling_windows(events, end, settings)
    if not windows:
        first_cutoff = end - timedelta(days=settings.label_days)
        raise MissingDataError(
            f"cannot train for {logical_date}: no user with history before {first_cutoff:%Y-%m-%d} "
            f"interacted with a new item in the {settings.label_days}-day label window; ingest more history "
            "or shorten OVERNIGHT_LABEL_DAYS"
        )
    judged = pl.concat([window.relevant["user_id"] for window in gate_windows(windows, settings)])
    return catalogue, windows, held_out_users(judged, settings.seed)


def training_users(window: LabelWindow, held_out: pl.Series, settings: Settings) -> pl.Series:
    """The window's labelled users a ranker may learn from: never the held-out ones, at most train_max_users."""
    users = window.relevant["user_id"].unique()
    return sample_users(users.filter(~users.is_in(held_out.implode())), settings.train_max_users, settings.seed)


def tuning_objective(
    windows: list[LabelWindow], held_out: pl.Series, catalogue: pl.DataFrame
) -> Callable[[Settings], float]:
    """NDCG@10 of a ranker trained with a trial's settings, on training users only: fit on the older windows and
    scored on the newest window's training users (a single window: scored on VALIDATION_SHARE of its training
    users, fit on the others). The users the promotion gate holds out are in neither part."""

    def objective(settings: Settings) -> float:
        users = [training_users(window, held_out, settings) for window in windows]
        if len(windows) >= 2:
            fitting = [build_examples(w, catalogue, settings, u) for w, u in zip(windows[1:], users[1:], strict=True)]
            scored_users = users[0]
        else:
            scored_users = users[0].filter(user_buckets(users[0], settings.seed + 2) < int(BUCKETS * VALIDATION_SHARE))
            fitting = [
                build_examples(
                    windows[0], catalogue, settings, users[0].filter(~users[0].is_in(scored_users.implode()))
                )
            ]
        fitted = fit(fitting, settings)
        scored = build_examples(windows[0], catalogue, settings, scored_users)
        predicted = predict(fitted.booster, scored.frame, list(features.FEATURES))
        listed = top_k(scored.frame.with_columns(_ranker=pl.Series(predicted)), pl.col("_ranker"), K)
        return ranking_metrics(listed, scored.relevant, scored.catalogue_size)[f"ndcg@{K}"]

    return objective


def tune(settings: Settings, logical_date: date, budget_minutes: float) -> tuning.Search:
    """The parameter search of a retrain on the date, alone (`overnight tune`): trials recorded, nothing trained."""
    catalogue, windows, held_out = label_data(settings, logical_date)
    return tuning.search(settings, logical_date, budget_minutes, tuning_objective(windows, held_out, catalogue))


def train(settings: Settings, logical_date: date) -> TrainResult:
    """Train on rolling label windows, evaluate on held-out users, register, and promote through the gate.

    With ``tune_budget_minutes``, the settings searched by ``jobs.tuning`` are chosen first, on training users."""
    import lightgbm as lgb

    end = lake.day_end(logical_date)
    catalogue, windows, held_out = label_data(settings, logical_date)
    night_settings = settings
    searched = None
    if settings.tune_budget_minutes is not None:
        objective = tuning_objective(windows, held_out, catalogue)
        searched = tuning.search(settings, logical_date, settings.tune_budget_minutes, objective)
        settings = registry.settings_with(settings, searched.best.params)
    judged = gate_windows(windows, settings)
    training, evaluations = [], []
    for number, window in enumerate(windows):
        users = training_users(window, held_out, settings)
        if number < len(judged):  # one build of the window's tables for both parts
            both = build_examples(window, catalogue, settings, pl.concat([users, held_out]))
            evaluations.append(examples_of(both, held_out))
            training.append(examples_of(both, users))
        else:
            training.append(build_examples(window, catalogue, settings, users))
    fitted = fit(training, settings)
    rankers = {RANKER: (fitted.booster, list(features.FEATURES))}
    with connect(settings) as conn:
        upgrade(conn)
        current = registry.model_for_date(conn, logical_date)
    current_booster = _load_booster(settings, current) if current else None
    if current is not None and current_booster is not None:
        rankers[PRODUCTION] = (current_booster, list(current.features))
    results = pooled_results([evaluate_models(examples, rankers, settings) for examples in evaluations])
    cutoff = windows[0].cutoff
    metrics: dict[str, Any] = {
        "protocol": "global",
        "cutoff": judged[-1].cutoff.isoformat(),
        "horizon_days": settings.label_days * len(judged),
        "gate_windows": [w.name for w in judged],
        **{k: v for k, v in results[RANKER].items() if k not in ("finite_scores",)},
        "baselines": baselines_of(results),
        "production": {"model_id": current.model_id, **results[PRODUCTION]}
        if current is not None and PRODUCTION in results
        else None,
        "training": fitted.training,
    }
    rejection = promotion_gate(results, settings)
    metrics["gate"] = {"passed": rejection is None, "reason": rejection, "margin": settings.promotion_margin}
    model_id, artifact = _save_artifact(fitted.booster, settings, logical_date)
    if candidates.tables_built_with(night_settings, logical_date, settings):
        write_reference(settings, artifact.parent, features.sample_features(settings, logical_date))
    else:  # the date's tables are the last model's: refit-candidates rebuilds them, then `write_late_reference`
        logger.info("train: the drift reference of %s is taken once its candidate tables are built", model_id)
    model = registry.ModelVersion(
        model_id=model_id,
        logical_date=logical_date,
        status="trained",
        status_reason=None,
        data_window={
            "features_before": cutoff.isoformat(),
            "label_start": cutoff.isoformat(),
            "label_end": end.isoformat(),
            "label_windows": [w.name for w in windows],
        },
        params={
            **lightgbm_params(settings),
            "num_boost_round": fitted.rounds,
            "lightgbm_version": lgb.__version__,
            "feature_importance_gain": fitted.importance,
            **(
                {registry.TUNED_SETTINGS: searched.best.params, registry.TUNING: searched.summary()} if searched else {}
            ),
        },
        features=list(features.FEATURES),
        metrics=metrics,
        artifact_path=str(artifact.relative_to(settings.data_dir)),
        artifact_sha256=registry.file_sha256(artifact),
    )
    # before scoring can pick the model up
    predictor.compile_for(settings, registry.artifact_file(settings, model), model.artifact_sha256)
    with connect(settings) as conn:
        if rejection is not None and current is None:
            # nothing to keep: a night without any model could not score at all
            logger.warning("train: gate failed (%s), but there is no model to keep; promoting %s", rejection, model_id)
            model = registry.with_status(model, "trained", f"promoted without a model to keep; gate: {rejection}")
        elif rejection is not None and current is not None and current.model_id != model_id:
            registry.register(conn, registry.with_status(model, "rejected", f"promotion skipped: {rejection}"))
            scoring = registry.model_for_date(conn, logical_date)
            logger.warning("train: promotion skipped: %s; %s stays", rejection, scoring.model_id if scoring else "none")
            return TrainResult(
                logical_date=logical_date.isoformat(),
                trained=True,
                model_id=model_id,
                status="rejected",
                reason=f"promotion skipped: {rejection}",
                scoring_model_id=scoring.model_id if scoring else None,
                metrics=metrics,
                training_rows=fitted.training["rows"],
            )
        registry.register(conn, model)
        promoted = registry.promote(conn, model)
    logger.info(
        "train: registered %s (%s) ndcg@10 %.4f; best baseline %.4f",
        model_id,
        promoted.status,
        metrics["ndcg@10"],
        max(b["ndcg@10"] for b in metrics["baselines"].values()),
    )
    return TrainResult(
        logical_date=logical_date.isoformat(),
        trained=True,
        model_id=model_id,
        status=promoted.status,
        reason=promoted.status_reason or "trained and promoted",
        scoring_model_id=model_id,
        metrics=metrics,
        training_rows=fitted.training["rows"],
    )


def _save_artifact(booster: Any, settings: Settings, logical_date: date) -> tuple[str, UPath]:
    with tempfile.TemporaryDirectory(prefix="overnight-model-") as scratch:
        saved = Path(scratch) / "model.txt"
        booster.save_model(saved)
        model_id = f"ranker-{logical_date:%Y%m%d}-{registry.file_sha256(saved)[:12]}"
        artifact = settings.models_dir / model_id / "model.txt"
        lake.write_atomically(artifact, lambda tmp: shutil.copyfile(saved, tmp))
    names = json.dumps(list(features.FEATURES)) + "\n"
    lake.write_atomically(artifact.with_name("features.json"), lambda tmp: tmp.write_text(names))
    return model_id, artifact


# ---------------------------------------------------------------- cadence


def retrain_due(settings: Settings, conn: psycopg.Connection, logical_date: date) -> tuple[bool, str]:
    """Whether the night of ``logical_date`` should train a new model, and why.

    Due when no promoted model may score the date, or when the one that would is ``retrain_days``
    old or older, or when feature drift measured since it took over asks for a new one. Further
    reasons belong here, so the DAG and ``overnight run`` follow them.
    """
    current = registry.model_for_date(conn, logical_date)
    if current is None:
        return True, f"no promoted model trained on or before {logical_date}"
    drifted = drift.drift_requires_retrain(conn, logical_date)
    if drifted is not None:
        return True, f"{current.model_id}: {drifted}"
    age = (logical_date - current.logical_date).days
    if age >= settings.retrain_days:
        return True, f"{current.model_id} is {age} day(s) old; retraining every {settings.retrain_days} day(s)"
    return False, f"{current.model_id} is {age} day(s) old; retraining every {settings.retrain_days} day(s)"


def write_reference(settings: Settings, model_dir: Path | UPath, frame: pl.DataFrame) -> Path | UPath:
    """Keep beside the model a sample of its features as scoring sees them on the date it was trained for
    (`frame`, from the same users as every night's sample); monitoring's drift compares each night's
    features with it (`jobs.monitoring.drift.reference_path`) and never writes it.

    Not the training rows themselves: those are as of the start of the label window and only of
    labelled users, so time-dependent features (ages, recencies, counts) would differ from any
    night's scoring data by construction, every night, and a retrain would not make that go away.
    """
    path = model_dir / drift.REFERENCE_FILE
    lake.write_parquet_atomically(drift.sample_rows(frame, settings), path)
    return path


def write_late_reference(settings: Settings, logical_date: date) -> None:
    """The drift reference of a model trained for the date that `train` could not write: the date's candidate
    tables were then built with other candidate settings than the model was tuned with. The refit-candidates
    step calls it once it has rebuilt them for the model."""
    with connect(settings) as conn:
        model = registry.model_for_date(conn, logical_date)
    if model is None or model.logical_date != logical_date:
        return
    reference = drift.reference_path(settings, model)
    if not reference.is_file():
        sample = features.sample_features(registry.tuned_settings(settings, model), logical_date)
        write_reference(settings, reference.parent, sample)


def train_if_due(settings: Settings, logical_date: date) -> TrainResult:
    """Train when :func:`retrain_due` says so, else keep the model the date would use.

    When training is due but the data cannot train a model (no labels yet), a usable older model
    is kept and the night goes on; without any model the error stands.
    """
    with connect(settings) as conn:
        upgrade(conn)
        due, reason = retrain_due(settings, conn, logical_date)
        current = registry.model_for_date(conn, logical_date)
    if current is None:
        return train(settings, logical_date)
    if due:
        try:
            return train(settings, logical_date)
        except MissingDataError as error:
            logger.warning("train: keeping %s: %s", current.model_id, error)
            reason = f"could not retrain ({error})"
    return TrainResult(
        logical_date=logical_date.isoformat(),
        trained=False,
        model_id=current.model_id,
        status=current.status,
        reason=reason,
        scoring_model_id=current.model_id,
    )
