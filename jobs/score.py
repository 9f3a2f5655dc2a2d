"""Score every user with history: candidates → features → ranker → top K, one shard at a time.

Shard I of N takes every N-th user of the date's sorted user list, so shards are disjoint,
balanced and can run in separate processes or on separate Airflow workers. Each shard writes
``scores/shard-IIIII-of-NNNNN.parquet`` (user_id, item_ids, scores) and a JSON manifest that
publish reads. Memory is bounded by the shard's users, processed in chunks.
"""

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from jobs import candidates, features, lake, registry
from jobs.database import connect
from jobs.errors import MissingDataError
from jobs.settings import Settings

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


def scores_dir(settings: Settings, logical_date: date) -> Path:
    return settings.work_dir_for(logical_date) / "scores"


def shard_path(settings: Settings, logical_date: date, shard: int, shards: int) -> Path:
    return scores_dir(settings, logical_date) / f"shard-{shard:05d}-of-{shards:05d}.parquet"


def ensure_shared_tables(settings: Settings, logical_date: date) -> Path:
    """The shared candidate and feature tables of the date, built now if no earlier step did."""
    folder = settings.work_dir_for(logical_date)
    if not all((folder / f"{name}.parquet").exists() for name in ("users", "popular", "neighbours")):
        candidates.prepare(settings, logical_date)
    if not all((folder / f"{name}.parquet").exists() for name in ("item_features", "item_genres")):
        features.prepare(settings, logical_date)
    return folder


def shard_users(folder: Path, shards: int, shard: int) -> pl.DataFrame:
    return (
        pl.scan_parquet(folder / "users.parquet")
        .with_row_index("position")
        .filter(pl.col("position") % shards == shard)
        .select("user_id")
        .collect()
    )


def load_ranker(settings: Settings, logical_date: date) -> tuple[registry.ModelVersion, Any]:
    import lightgbm as lgb

    with connect(settings) as conn:
        model = registry.model_for_date(conn, logical_date)
    if model is None:
        raise MissingDataError(
            f"no promoted model trained on or before {logical_date}; run `overnight train --date {logical_date}`"
        )
    booster = lgb.Booster(model_file=str(registry.artifact_file(settings.data_dir, model)))
    if list(booster.feature_name()) != list(model.features):
        raise MissingDataError(f"model {model.model_id}: artifact features differ from the registered feature list")
    return model, booster


def rank_top_k(frame: pl.DataFrame, predicted: np.ndarray, k: int) -> pl.DataFrame:
    """(user_id, item_ids, scores): each user's k best items, best first."""
    return (
        frame.select("user_id", "item_id")
        .with_columns(score=pl.Series(predicted, dtype=pl.Float32))
        .sort(["user_id", "score", "item_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .agg(item_ids=pl.col("item_id").head(k), scores=pl.col("score").head(k))
    )


def score_shard(settings: Settings, logical_date: date, shards: int, shard: int) -> ScoreResult:
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in 0..{shards - 1}, got {shard}")
    model, booster = load_ranker(settings, logical_date)
    folder = ensure_shared_tables(settings, logical_date)
    feature_names = list(model.features)
    cutoff = lake.day_end(logical_date)
    users = shard_users(folder, shards, shard)
    popular = pl.read_parquet(folder / "popular.parquet")
    neighbours = pl.read_parquet(folder / "neighbours.parquet")
    item_features = pl.read_parquet(folder / "item_features.parquet")
    genres = pl.read_parquet(folder / "item_genres.parquet")
    events = (
        lake.scan_interactions(settings.lake_dir, logical_date).join(users.lazy(), on="user_id", how="semi").collect()
    )
    generated_at = datetime.now(UTC)
    parts: list[pl.DataFrame] = []
    candidate_rows = 0
    for start in range(0, users.height, CHUNK_USERS):
        chunk = users.slice(start, CHUNK_USERS)
        chunk_events = events.lazy().join(chunk.lazy(), on="user_id", how="semi")
        proposed = candidates.generate(chunk_events, popular, neighbours, settings)
        frame = features.assemble(proposed, chunk_events, item_features, genres, cutoff, settings)
        candidate_rows += frame.height
        if frame.height:
            predicted = booster.predict(frame.select(feature_names).to_numpy(), num_threads=0)
            parts.append(rank_top_k(frame, predicted, settings.top_k))
        logger.info(
            "score shard %d/%d: %d of %d users",
            shard,
            shards,
            min(start + CHUNK_USERS, users.height),
            users.height,
        )
    scored = (
        pl.concat(parts)
        if parts
        else pl.DataFrame(schema={"user_id": pl.String, "item_ids": pl.List(pl.String), "scores": pl.List(pl.Float32)})
    )
    path = shard_path(settings, logical_date, shard, shards)
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
    )
    path.with_suffix(".json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def summarise(results: list[ScoreResult]) -> str:
    users = sum(r.users for r in results)
    rows = sum(r.candidate_rows for r in results)
    return f"{users:,} users in {len(results)} shard(s), {rows:,} candidates ranked"


def score(
    settings: Settings, logical_date: date, shards: int | None = None, shard: int | None = None
) -> list[ScoreResult]:
    """Score one shard, or all of them one after another when ``shard`` is None."""
    shards = shards or settings.score_shards
    if shard is not None:
        return [score_shard(settings, logical_date, shards, shard)]
    return [score_shard(settings, logical_date, shards, i) for i in plan_shards(settings, logical_date, shards)]


def plan_shards(settings: Settings, logical_date: date, shards: int) -> list[int]:
    """The shard numbers to score; shard files of an earlier run with another count are removed,
    since publishing them with this run's would mix two runs."""
    folder = scores_dir(settings, logical_date)
    if folder.is_dir():
        for stale in folder.glob("shard-*"):
            if not stale.name.split(".")[0].endswith(f"-of-{shards:05d}"):
                stale.unlink()
    return list(range(shards))


def read_manifests(settings: Settings, logical_date: date) -> list[ScoreResult]:
    """The manifests of one complete set of shards for the date, or a clear error naming what is missing."""
    folder = scores_dir(settings, logical_date)
    manifests = [ScoreResult(**json.loads(p.read_text())) for p in sorted(folder.glob("shard-*.json"))]
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


def fallback(settings: Settings, logical_date: date) -> tuple[list[str], list[float]]:
    """The list for users the batch does not know: the most popular available items."""
    popular = pl.read_parquet(settings.work_dir_for(logical_date) / "popular.parquet").head(settings.top_k)
    return popular["item_id"].to_list(), popular["popular_score"].cast(pl.Float64).to_list()
