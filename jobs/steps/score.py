"""Score every user with history: candidates → features → ranker → top K, one shard at a time.

Shard I of N takes every N-th user of the date's sorted user list, so shards are disjoint,
balanced and can run in separate processes or on separate Airflow workers. Each shard writes
``scores/shard-IIIII-of-NNNNN.parquet`` (user_id, item_ids, scores) and a JSON manifest that
publish reads. Memory is bounded by the shard's users, processed in chunks.
"""

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from jobs import kernels, lake, registry
from jobs.database import connect
from jobs.errors import FutureModelError, MissingDataError
from jobs.settings import Settings
from jobs.steps import candidates, features

logger = logging.getLogger(__name__)

CHUNK_USERS = 20_000


@dataclass(frozen=True)
class ScoreResult:
    logical_date: str
    shard: int
    shards: int
    model_id: str
    users: int
    users_without_candidates: int
    candidate_rows: int
    generated_at: str
    path: str
    seconds: float = 0.0
    predict_seconds: float = 0.0  # inside LightGBM's predict: the ceiling the rest of scoring is measured against


def scores_dir(settings: Settings, logical_date: date, model_id: str | None = None) -> Path:
    """Where a date's score shards go: production's in ``scores/``; a chosen model's (a shadow, a canary)
    in ``model-scores/<model_id>/``, one folder per model, so a shadow and a canary of the same night
    never mix or overwrite each other's shards."""
    folder = settings.work_dir_for(logical_date)
    return folder / "scores" if model_id is None else folder / "model-scores" / model_id


def shard_path(settings: Settings, logical_date: date, shard: int, shards: int, model_id: str | None = None) -> Path:
    return scores_dir(settings, logical_date, model_id) / f"shard-{shard:05d}-of-{shards:05d}.parquet"


def ensure_shared_tables(settings: Settings, logical_date: date) -> Path:
    """The shared candidate and feature tables of the date, built now if no earlier step did."""
    folder = settings.work_dir_for(logical_date)
    if not candidates.CandidateTables.exists(folder):
        candidates.prepare(settings, logical_date)
    if not features.FeatureTables.exists(folder):
        features.prepare(settings, logical_date)
    return folder


def shard_users(folder: Path, shards: int, shard: int) -> pl.DataFrame:
    """(user_id, chunk): the shard's users, numbered into chunks of CHUNK_USERS."""
    return (
        pl.scan_parquet(folder / "users.parquet")
        .with_row_index("position")
        .filter(pl.col("position") % shards == shard)
        .select("user_id", chunk=(pl.int_range(pl.len()) // CHUNK_USERS).cast(pl.Int32))
        .collect()
    )


def shard_events(settings: Settings, logical_date: date, users: pl.DataFrame) -> dict[int, pl.DataFrame]:
    """The shard's events as of the date, by chunk; the filter runs inside the Parquet scan, so memory
    follows the shard's events, not the lake's."""
    events = (
        lake.scan_interactions(settings.lake_dir, logical_date)
        .select(features.HISTORY_COLUMNS)
        .filter(pl.col("user_id").is_in(users["user_id"].implode()))
        .collect(engine="streaming")
        .join(users, on="user_id")
    )
    return {key[0]: part.drop("chunk") for key, part in events.partition_by("chunk", as_dict=True).items()}


def ranker_for(settings: Settings, logical_date: date, model_id: str | None = None) -> registry.ModelVersion:
    """The model scoring the date may use (with `model_id`, that registered model, a shadow, whatever its
    status), or a clear error saying how to get one."""
    with connect(settings) as conn:
        model = (
            registry.model_for_date(conn, logical_date) if model_id is None else registry.model_by_id(conn, model_id)
        )
    if model is None and model_id is not None:
        raise MissingDataError(f"model {model_id} is not registered; see `overnight models`")
    if model is None:
        raise MissingDataError(
            f"no promoted model trained on or before {logical_date}; run `overnight train --date {logical_date}`"
        )
    if model.logical_date > logical_date:
        raise FutureModelError(
            f"model {model.model_id} was trained for {model.logical_date}, after {logical_date}: "
            "scoring that date with it would use the future"
        )
    return model


def load_ranker(
    settings: Settings, logical_date: date, model_id: str | None = None
) -> tuple[registry.ModelVersion, Any]:
    import lightgbm as lgb

    model = ranker_for(settings, logical_date, model_id)
    booster = lgb.Booster(model_file=str(registry.artifact_file(settings.data_dir, model)))
    if list(booster.feature_name()) != list(model.features):
        raise MissingDataError(f"model {model.model_id}: artifact features differ from the registered feature list")
    return model, booster


def rank_top_k(frame: pl.DataFrame, predicted: np.ndarray, k: int) -> pl.DataFrame:
    """(user_id, item_ids, scores): each user's k best items, best first (ties by item)."""
    best = kernels.top_rows(frame["user_id"], frame["item_id"], predicted, k)
    return (
        frame.select("user_id", "item_id")[best]
        .with_columns(score=pl.Series(predicted[best], dtype=pl.Float32))
        .group_by("user_id", maintain_order=True)
        .agg(item_ids="item_id", scores="score")
        .with_columns(pl.col("user_id").cast(pl.String), pl.col("item_ids").cast(pl.List(pl.String)))
    )


def candidate_features(settings: Settings, logical_date: date, folder: Path) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """chunk events -> (user_id, item_id, FEATURES...): the seam to the candidate generators and the
    features, with the date's shared tables read (and their ids encoded) once.

    The frame returned keeps the ids as enums (see ``features.encode_tables``); `rank_top_k` turns
    them back into strings.
    """
    string_tables = (candidates.CandidateTables.load(folder), features.FeatureTables.load(folder))
    cutoff = lake.day_end(logical_date)
    encoded = features.encode_tables(*string_tables)

    def build(events: pl.DataFrame) -> pl.DataFrame:
        nonlocal encoded
        if not events["item_id"].is_in(encoded.items.categories.implode()).all():
            # an item none of the tables knows (the lake changed since they were built): widen the enum
            encoded = features.encode_tables(*string_tables, events["item_id"])
        return features.for_users(events, encoded, cutoff, settings)

    return build


def score_shard(
    settings: Settings, logical_date: date, shards: int, shard: int, model_id: str | None = None
) -> ScoreResult:
    """Score one shard; with `model_id`, that model (a shadow's, a canary's), into its own folder."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in 0..{shards - 1}, got {shard}")
    started = time.perf_counter()
    model, booster = load_ranker(settings, logical_date, model_id)
    folder = ensure_shared_tables(settings, logical_date)
    feature_names = list(model.features)
    users = shard_users(folder, shards, shard)
    build = candidate_features(settings, logical_date, folder)
    events = shard_events(settings, logical_date, users)
    generated_at = datetime.now(UTC)
    parts: list[pl.DataFrame] = []
    candidate_rows = 0
    predict_seconds = 0.0
    chunks = math.ceil(users.height / CHUNK_USERS)
    for chunk in range(chunks):
        chunk_events = events.pop(chunk, None)
        if chunk_events is not None:
            frame = build(chunk_events)
            del chunk_events
            candidate_rows += frame.height
            if frame.height:
                matrix = frame.select(feature_names).to_numpy()
                predicting = time.perf_counter()
                predicted = booster.predict(matrix, num_threads=0)
                predict_seconds += time.perf_counter() - predicting
                del matrix
                parts.append(rank_top_k(frame, predicted, settings.top_k))
        logger.info(
            "score shard %d/%d: chunk %d of %d, %d candidates so far", shard, shards, chunk + 1, chunks, candidate_rows
        )
    scored = (
        pl.concat(parts)
        if parts
        else pl.DataFrame(schema={"user_id": pl.String, "item_ids": pl.List(pl.String), "scores": pl.List(pl.Float32)})
    )
    path = shard_path(settings, logical_date, shard, shards, model_id)
    lake.write_parquet_atomically(scored, path)
    result = ScoreResult(
        logical_date=logical_date.isoformat(),
        shard=shard,
        shards=shards,
        model_id=model.model_id,
        users=scored.height,
        users_without_candidates=users.height - scored.height,
        candidate_rows=candidate_rows,
        generated_at=generated_at.isoformat(),
        path=str(path),
        seconds=round(time.perf_counter() - started, 3),
        predict_seconds=round(predict_seconds, 3),
    )
    lake.write_json_atomically(asdict(result), path.with_suffix(".json"))
    return result


def summarise(results: list[ScoreResult]) -> str:
    users = sum(r.users for r in results)
    rows = sum(r.candidate_rows for r in results)
    return f"{users:,} users in {len(results)} shard(s), {rows:,} candidates ranked"


def score(
    settings: Settings,
    logical_date: date,
    shards: int | None = None,
    shard: int | None = None,
    model_id: str | None = None,
) -> list[ScoreResult]:
    """Score one shard, or all of them one after another when ``shard`` is None (`model_id`: a chosen model)."""
    ranker_for(settings, logical_date, model_id)  # before planning: without a model, that is what to say
    if shard is not None:
        return [score_shard(settings, logical_date, shards or shard_count(settings, logical_date), shard, model_id)]
    planned = plan_shards(settings, logical_date, shards, model_id)
    return [score_shard(settings, logical_date, len(planned), i, model_id) for i in planned]


def shard_count(settings: Settings, logical_date: date) -> int:
    """At least ``score_shards``, and enough that no shard has more than ``shard_users`` users."""
    folder = ensure_shared_tables(settings, logical_date)
    users = pl.scan_parquet(folder / "users.parquet").select(pl.len()).collect().item()
    return max(settings.score_shards, math.ceil(users / settings.shard_users))


def plan_shards(
    settings: Settings, logical_date: date, shards: int | None = None, model_id: str | None = None
) -> list[int]:
    """The shard numbers to score (``shards`` of them, or ``shard_count``); shard files of an earlier run
    with another count are removed, since publishing them with this run's would mix two runs."""
    shards = shards or shard_count(settings, logical_date)
    folder = scores_dir(settings, logical_date, model_id)
    if folder.is_dir():
        for stale in folder.glob("shard-*"):
            if not stale.name.split(".")[0].endswith(f"-of-{shards:05d}"):
                stale.unlink()
    return list(range(shards))


def read_manifests(settings: Settings, logical_date: date, model_id: str | None = None) -> list[ScoreResult]:
    """The manifests of one complete set of shards for the date (of `model_id`'s folder, with one), or a
    clear error naming what is missing."""
    folder = scores_dir(settings, logical_date, model_id)
    manifests = [_read_manifest(p) for p in sorted(folder.glob("shard-*.json"))]
    if not manifests:
        raise MissingDataError(f"no scores for {logical_date} in {folder}; run `overnight score --date {logical_date}`")
    counts = {m.shards for m in manifests}
    if len(counts) != 1:
        raise MissingDataError(f"scores for {logical_date} mix shard counts {sorted(counts)}; re-run `overnight score`")
    shards = counts.pop()
    missing = sorted(set(range(shards)) - {m.shard for m in manifests})
    if missing:
        raise MissingDataError(f"scores for {logical_date} are missing shard(s) {missing} of {shards}")
    models = {m.model_id for m in manifests}
    if len(models) != 1:
        raise MissingDataError(
            f"shards of {logical_date} were scored by different models {sorted(models)}; re-run them"
        )
    return sorted(manifests, key=lambda m: m.shard)


def _read_manifest(path: Path) -> ScoreResult:
    try:
        return ScoreResult(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise MissingDataError(
            f"shard manifest {path} is unreadable ({error}); re-run `overnight score` for its date"
        ) from None


def fallback(settings: Settings, logical_date: date) -> tuple[list[str], list[float]]:
    """The list for users the batch does not know: the most popular available items."""
    popular = pl.read_parquet(settings.work_dir_for(logical_date) / "popular.parquet").head(settings.top_k)
    return popular["item_id"].to_list(), popular["popular_score"].cast(pl.Float64).to_list()
