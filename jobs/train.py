"""Train the LightGBM LambdaRank ranker point in time and register it.

For logical date D with a label window of L days: the cutoff is C = end of D minus L days.
Candidates and features come only from events before C; labels are the items each user
interacted with in [C, end of D) that they had not seen before C. A fifth of the labelled
users is held out: the registry records the ranker's metrics on them, beside the baselines'.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from jobs import candidates, features, lake, registry
from jobs.database import connect, upgrade
from jobs.errors import MissingDataError
from jobs.metrics import candidate_recall, ranking_metrics
from jobs.settings import Settings

logger = logging.getLogger(__name__)

HOLDOUT_SHARE = 0.2
KEY = ["user_id", "item_id"]


@dataclass(frozen=True)
class TrainResult:
    logical_date: str
    trained: bool
    model_id: str
    status: str
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.trained:
            return f"kept {self.model_id}: {self.reason}"
        return f"{self.model_id} ({self.status}), ndcg@10 {self.metrics['ndcg@10']:.4f}"


@dataclass(frozen=True)
class Examples:
    """Candidates with features and labels for the users labelled in the window."""

    frame: pl.DataFrame  # user_id, item_id, FEATURES..., label
    relevant: pl.DataFrame  # user_id, item_id: everything each labelled user interacted with in the window
    catalogue_size: int


def lightgbm_params(settings: Settings) -> dict[str, Any]:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": settings.learning_rate,
        "num_leaves": settings.num_leaves,
        "min_data_in_leaf": settings.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        "seed": settings.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 0,
        "verbose": -1,
    }


def build_examples(settings: Settings, logical_date: date, cutoff: datetime) -> Examples:
    events = lake.scan_interactions(settings.lake_dir, logical_date)
    # Item attributes (genres, availability) are taken as known on D; candidates and every
    # count still come from events before the cutoff only.
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    history = events.filter(pl.col("timestamp") < cutoff)
    seen = history.select(KEY).unique()
    relevant = (
        events.filter(pl.col("timestamp") >= cutoff)
        .select(KEY)
        .unique()
        .join(history.select("user_id").unique(), on="user_id", how="semi")
    )
    if settings.exclude_seen:
        relevant = relevant.join(seen, on=KEY, how="anti")
    relevant_frame = relevant.sort(KEY).collect()
    if relevant_frame.height == 0:
        raise MissingDataError(
            f"cannot train for {logical_date}: no user with history before {cutoff:%Y-%m-%d} interacted "
            f"with a new item in the {settings.label_days}-day label window; ingest more history "
            "or shorten OVERNIGHT_LABEL_DAYS"
        )
    popular = candidates.build_popular(history, catalogue, cutoff, settings)
    neighbours = candidates.build_neighbours(history, settings)
    item_features = features.build_item_features(history, cutoff)
    genres = features.item_genres(catalogue)
    user_history = history.join(relevant_frame.lazy().select("user_id").unique(), on="user_id", how="semi")
    proposed = candidates.generate(user_history, popular, neighbours, settings)
    frame = features.assemble(proposed, user_history, item_features, genres, cutoff, settings)
    frame = frame.join(relevant_frame.with_columns(label=pl.lit(1, pl.Int8)), on=KEY, how="left").with_columns(
        pl.col("label").fill_null(0)
    )
    return Examples(frame=frame, relevant=relevant_frame, catalogue_size=catalogue.height)


def split_users(users: pl.Series, seed: int) -> tuple[pl.Series, pl.Series]:
    """(training users, held-out users), a deterministic function of the user ids and the seed."""
    ordered = users.unique().sort()
    held_out = np.random.default_rng(seed).random(ordered.len()) < HOLDOUT_SHARE
    if ordered.len() >= 2:
        held_out[0], held_out[-1] = True, False  # both sides non-empty
    return ordered.filter(~held_out), ordered.filter(held_out)


def top_k(frame: pl.DataFrame, score: pl.Expr, k: int, descending: bool = True) -> pl.DataFrame:
    """(user_id, item_id, rank) of each user's k best rows by ``score``."""
    return (
        frame.with_columns(_score=score)
        .drop_nulls("_score")
        .with_columns(rank=pl.col("_score").rank("ordinal", descending=descending).over("user_id"))
        .filter(pl.col("rank") <= k)
        .select("user_id", "item_id", "rank")
    )


def fit(train_frame: pl.DataFrame, settings: Settings) -> Any:
    import lightgbm as lgb

    groups = train_frame.group_by("user_id", maintain_order=True).len()["len"].to_numpy()
    dataset = lgb.Dataset(
        train_frame.select(features.FEATURES).to_numpy(),
        label=train_frame["label"].to_numpy(),
        group=groups,
        feature_name=list(features.FEATURES),
        free_raw_data=True,
    )
    return lgb.train(lightgbm_params(settings), dataset, num_boost_round=settings.num_boost_round)


def evaluate_holdout(booster: Any, examples: Examples, held_out: pl.Series, settings: Settings) -> dict[str, Any]:
    frame = examples.frame.filter(pl.col("user_id").is_in(held_out.implode()))
    relevant = examples.relevant.filter(pl.col("user_id").is_in(held_out.implode()))
    predicted = booster.predict(frame.select(features.FEATURES).to_numpy())
    if not np.isfinite(predicted).all():
        raise MissingDataError("the trained ranker produced non-finite scores on held-out users")
    frame = frame.with_columns(ranker_score=pl.Series(predicted, dtype=pl.Float64))
    size = examples.catalogue_size
    results = {
        "ranker": ranking_metrics(top_k(frame, pl.col("ranker_score"), 10), relevant, size),
        "baselines": {
            "recent_popular": ranking_metrics(
                top_k(
                    frame.filter(pl.col("popular_rank") <= settings.popular_candidates),
                    pl.col("popular_rank"),
                    10,
                    descending=False,
                ),
                relevant,
                size,
            ),
            "covisit": ranking_metrics(
                top_k(frame.filter(pl.col("covisit_hits") > 0), pl.col("covisit_score"), 10), relevant, size
            ),
        },
        "candidate_recall": candidate_recall(frame, relevant),
    }
    return results


def train(settings: Settings, logical_date: date) -> TrainResult:
    """Train, evaluate on held-out users, save the artifact and register (and promote) the model."""
    import lightgbm as lgb

    cutoff = lake.day_end(logical_date) - timedelta(days=settings.label_days)
    examples = build_examples(settings, logical_date, cutoff)
    train_users, held_out = split_users(examples.relevant["user_id"], settings.seed)
    train_frame = examples.frame.filter(pl.col("user_id").is_in(train_users.implode()))
    # Users whose candidates contain none of their label items teach a ranker nothing.
    train_frame = train_frame.filter(pl.col("label").max().over("user_id") > 0)
    if train_frame.height == 0:
        raise MissingDataError(
            f"cannot train for {logical_date}: no candidate of any training user was relevant in the label window"
        )
    logger.info(
        "train: %d rows, %d users, %d positives; %d held-out users",
        train_frame.height,
        train_frame["user_id"].n_unique(),
        int(train_frame["label"].sum()),
        held_out.len(),
    )
    booster = fit(train_frame, settings)
    evaluation = evaluate_holdout(booster, examples, held_out, settings)
    metrics: dict[str, Any] = {
        "protocol": "global",
        "cutoff": cutoff.isoformat(),
        "horizon_days": settings.label_days,
        **{name: value for name, value in evaluation["ranker"].items()},
        "baselines": evaluation["baselines"],
        "candidate_recall": evaluation["candidate_recall"],
        "training": {
            "rows": train_frame.height,
            "users": train_frame["user_id"].n_unique(),
            "positives": int(train_frame["label"].sum()),
        },
    }
    importance = dict(zip(features.FEATURES, booster.feature_importance("gain").tolist(), strict=True))
    model_id, artifact = _save_artifact(booster, settings, logical_date)
    model = registry.ModelVersion(
        model_id=model_id,
        logical_date=logical_date,
        status="candidate",
        status_reason=None,
        data_window={
            "features_before": cutoff.isoformat(),
            "label_start": cutoff.isoformat(),
            "label_end": lake.day_end(logical_date).isoformat(),
        },
        params={
            **lightgbm_params(settings),
            "num_boost_round": settings.num_boost_round,
            "lightgbm_version": lgb.__version__,
            "feature_importance_gain": importance,
        },
        features=list(features.FEATURES),
        metrics=metrics,
        artifact_path=str(artifact.relative_to(settings.data_dir)),
        artifact_sha256=registry.file_sha256(artifact),
    )
    with connect(settings) as conn:
        upgrade(conn)
        registry.register(conn, model)
        promoted = registry.promote(conn, model)
    logger.info(
        "train: registered %s (%s) ndcg@10 %.4f vs recent-popular %.4f",
        model_id,
        promoted.status,
        metrics["ndcg@10"],
        metrics["baselines"]["recent_popular"]["ndcg@10"],
    )
    return TrainResult(
        logical_date=logical_date.isoformat(),
        trained=True,
        model_id=model_id,
        status=promoted.status,
        reason=promoted.status_reason or "trained",
        metrics=metrics,
    )


def _save_artifact(booster: Any, settings: Settings, logical_date: date) -> tuple[str, Path]:
    staging = settings.models_dir / f".staging-{logical_date.isoformat()}-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / "model.txt"
    booster.save_model(tmp)
    model_id = f"ranker-{logical_date:%Y%m%d}-{registry.file_sha256(tmp)[:12]}"
    final_dir = settings.models_dir / model_id
    final_dir.mkdir(parents=True, exist_ok=True)
    artifact = final_dir / "model.txt"
    tmp.replace(artifact)
    (final_dir / "features.json").write_text(json.dumps(list(features.FEATURES)) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    return model_id, artifact


def train_if_due(settings: Settings, logical_date: date) -> TrainResult:
    """Train unless a promoted model at most ``retrain_days`` old (as of D, never newer than D) exists.

    When training is due but the data cannot train a model (no labels yet), a usable older model
    is kept and the night goes on; without any model the error stands.
    """
    with connect(settings) as conn:
        upgrade(conn)
        current = registry.model_for_date(conn, logical_date)
    if current is None:
        return train(settings, logical_date)
    age = (logical_date - current.logical_date).days
    if age < settings.retrain_days:
        reason = f"{current.model_id} is {age} day(s) old; retraining every {settings.retrain_days} day(s)"
    else:
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
    )
