"""Score every user with history: candidates → features → ranker → top K, one shard at a time. Shard I of N takes
every N-th user of the date's sorted users, so shards are disjoint, balanced and can run on separate workers; each
writes its lists and a manifest that publish reads (``jobs.workdir``), its users processed in chunks.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from upath import UPath

from jobs import diversity, kernels, lake, predictor, registry, workdir
from jobs.database import connect
from jobs.errors import FutureModelError, MissingDataError, UnfitCandidatesError
from jobs.outcome import Outcome
from jobs.settings import Settings
from jobs.steps import candidates, features
from sql.contract import REASON_SOURCE_SHIFT, REASON_SOURCES

logger = logging.getLogger(__name__)

CHUNK_USERS = 20_000
# The ranks that choose between the item-to-item sources' reasons (features: an unproposed item ranks last).
REASON_RANKS = ("covisit_rank", "knn_rank")
# A shard file's columns: the lists, and their reasons when the night publishes explanations.
LISTS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "item_ids": pl.List(pl.String),
    "scores": pl.List(pl.Float32),
}
REASONS_SCHEMA: dict[str, pl.DataType] = {"reason_refs": pl.List(pl.String), "reason_codes": pl.Binary()}


def shard_users(folder: UPath, shards: int, shard: int) -> pl.DataFrame:
    """(user_id, chunk): the shard's users, numbered into chunks of CHUNK_USERS."""
    return (
        pl.scan_parquet(str(workdir.table_in(folder, workdir.USERS)))
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


def require_fitting_tables(
    settings: Settings, logical_date: date, model: registry.ModelVersion, model_id: str | None
) -> None:
    """The date's candidate tables must be built with the candidate settings `model` was tuned with. For
    the date's own model (`model_id` None) the candidates step rebuilds them; a chosen model with other
    settings cannot score the date, since the date has one set of tables, its own model's."""
    if candidates.tables_fit(settings, logical_date, model):
        return
    if model_id is None:
        raise MissingDataError(
            f"the candidate tables of {logical_date} were built with other candidate settings than {model.model_id} "
            f"was tuned with; run `overnight candidates --date {logical_date}`"
        )
    raise UnfitCandidatesError(
        f"model {model.model_id} was tuned with other candidate settings than the candidate tables of "
        f"{logical_date} were built with (those of the model that scores the date): it cannot score {logical_date}"
    )


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
            "scoring that date with it would use the future",
            model.logical_date,
        )
    return model


def load_ranker(
    settings: Settings, logical_date: date, model_id: str | None = None
) -> tuple[registry.ModelVersion, Any]:
    import lightgbm as lgb

    model = ranker_for(settings, logical_date, model_id)
    booster = lgb.Booster(model_file=str(registry.artifact_file(settings, model)))
    if list(booster.feature_name()) != list(model.features):
        raise MissingDataError(f"model {model.model_id}: artifact features differ from the registered feature list")
    return model, booster


class Diversifier:
    """The MMR re-ranking of a night's lists at ``strength``, over the similarity of the catalogue's items."""

    def __init__(self, catalogue: pl.DataFrame, strength: float) -> None:
        self.tokens = diversity.item_tokens(catalogue)
        self.strength = strength
        self.similarity: diversity.ItemSimilarity | None = None

    def rerank(self, frame: pl.DataFrame, predicted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        items = frame.schema["item_id"]
        assert isinstance(items, pl.Enum)
        if self.similarity is None or self.similarity.items != items:  # a chunk may widen the item enum
            self.similarity = diversity.ItemSimilarity(self.tokens, items)
        pool = kernels.top_rows(frame["user_id"], frame["item_id"], predicted, k * diversity.POOL_FACTOR)
        codes = frame.select(pl.col("user_id", "item_id").to_physical().cast(pl.Int64))[pool]
        chosen, published = diversity.rerank(
            codes["user_id"].to_numpy(), codes["item_id"].to_numpy(), predicted[pool], k, self.strength, self.similarity
        )
        return pool[chosen], published


def diversifier(settings: Settings, logical_date: date) -> Diversifier | None:
    """The night's re-ranking, or None when ``diversity`` is 0: the ranker's order, untouched."""
    if settings.diversity == 0:
        return None
    return Diversifier(lake.read_catalogue(settings.lake_dir, logical_date), settings.diversity)


def rank_top_k(frame: pl.DataFrame, predicted: np.ndarray, k: int, diverse: Diversifier | None = None) -> pl.DataFrame:
    """(user_id, item_ids, scores): each user's k best items, best first (ties by item); with ``diverse``,
    re-ranked by MMR over the best candidates (``jobs.diversity``). When ``frame`` has the sources'
    ``candidates.REASONS``, the lists' reasons too (reason_codes, reason_refs: ``sql.contract``)."""
    if diverse is None:
        best = kernels.top_rows(frame["user_id"], frame["item_id"], predicted, k)
        published = predicted[best]
    else:
        best, published = diverse.rerank(frame, predicted, k)
    explained = all(column in frame.columns for column in candidates.REASONS)
    chosen = frame.select("user_id", "item_id", *((*REASON_RANKS, *candidates.REASONS) if explained else ()))[best]
    names = pl.Series(dtype=pl.String)
    if explained:  # the source and what it names, then the name's place among the user's sorted distinct names
        code, ref, names = reason_code_and_ref(chosen)
        chosen = chosen.with_columns(code, ref)
        place = (pl.col("reason_ref").rank("dense").over("user_id") - 1).fill_null(0).cast(pl.Int32)
        code = pl.col("reason_code").cast(pl.Int32) * (1 << REASON_SOURCE_SHIFT) + place
        chosen = chosen.with_columns(reason_code=code.cast(pl.UInt16))
    reasons = (pl.col("reason_code"), pl.col("reason_ref").drop_nulls().unique().sort().alias("reason_refs"))
    lists = (
        chosen.with_columns(score=pl.Series(published, dtype=pl.Float32))
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").alias("item_ids"), pl.col("score").alias("scores"), *(reasons if explained else ()))
        .with_columns(pl.col("user_id").cast(pl.String), pl.col("item_ids").cast(pl.List(pl.String)))
    )
    if not explained:
        return lists
    return lists.with_columns(
        reason_refs=named(lists["reason_refs"], names), reason_codes=packed_codes(lists["reason_code"])
    ).select(*LISTS_SCHEMA, *REASONS_SCHEMA)


def named(refs: pl.Series, names: pl.Series) -> pl.Series:
    """Lists of positions in ``names`` as lists of the names."""
    positions = refs.to_arrow().cast(pa.large_list(pa.uint32()))
    values = names.gather(pl.Series(positions.flatten())).to_arrow().cast(pa.large_string())
    lists = pa.LargeListArray.from_arrays(positions.offsets, values, mask=positions.is_null())
    return pl.Series(refs.name, lists, dtype=pl.List(pl.String))


def packed_codes(codes: pl.Series) -> pl.Series:
    """Each list of two-byte codes as bytes, big-endian (bytea for Postgres, ``sql.contract.decode_reasons``)."""
    lists = codes.to_arrow().cast(pa.large_list(pa.uint16()))
    values = np.asarray(lists.flatten().to_numpy(zero_copy_only=False), dtype=">u2")
    offsets = np.asarray(lists.offsets, dtype=np.int64) * 2
    packed = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(lists), [None, pa.py_buffer(offsets), pa.py_buffer(values.tobytes())]
    )
    return pl.Series("reason_codes", packed, dtype=pl.Binary)


def reason_code_and_ref(chosen: pl.DataFrame) -> tuple[pl.Expr, pl.Expr, pl.Series]:
    """Per candidate, its reason's source code (``sql.contract.REASON_SOURCES``) and what it names: the
    item-to-item source that ranks the item higher (co-visitation on a tie) with the user's item behind it,
    else the genre source with the user's genre, else trending (the popular source, naming nothing).

    What a reason names is given as its position in the third value, every item and genre name sorted as
    text: positions order as the names do, and no candidate's name is made as text."""
    items, genres = (chosen.schema[column] for column in ("knn_because", "genre_because"))
    assert isinstance(items, pl.Enum) and chosen.schema["covisit_because"] == items
    if not isinstance(genres, pl.Enum):
        genres = candidates.sorted_enum(chosen["genre_because"].drop_nulls())
    names = pl.concat([items.categories, genres.categories]).unique().sort()
    item_place = pl.lit(names.search_sorted(items.categories))
    genre_place = pl.lit(names.search_sorted(genres.categories))
    genre_code = pl.col("genre_because").cast(genres).to_physical()
    covisit = pl.col("covisit_because").is_not_null()
    knn = pl.col("knn_because").is_not_null()
    genre = pl.col("genre_because").is_not_null()
    by_covisit = covisit & (knn.not_() | (pl.col("covisit_rank") <= pl.col("knn_rank")))
    source = REASON_SOURCES.index
    code = (
        pl.when(by_covisit)
        .then(source("covisit"))
        .when(knn)
        .then(source("knn"))
        .when(genre)
        .then(source("genre"))
        .otherwise(source("trending"))
    )
    ref = (
        pl.when(by_covisit)
        .then(item_place.gather(pl.col("covisit_because").to_physical()))
        .when(knn)
        .then(item_place.gather(pl.col("knn_because").to_physical()))
        .when(genre)
        .then(genre_place.gather(genre_code))
    )
    return code.cast(pl.UInt16).alias("reason_code"), ref.alias("reason_ref"), names


def score_shard(
    settings: Settings, logical_date: date, shards: int, shard: int, model_id: str | None = None
) -> workdir.ShardManifest:
    """Score one shard; with `model_id`, that model (a shadow's, a canary's), into its own folder.

    Production's scoring also writes the features of the shard's users in the drift sample (see
    ``features.drift_sample_users``) for monitoring to compare with the model's reference.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in 0..{shards - 1}, got {shard}")
    started = time.perf_counter()
    model, booster = load_ranker(settings, logical_date, model_id)
    require_fitting_tables(settings, logical_date, model, model_id)
    settings = registry.tuned_settings(settings, model)
    ranker = predictor.for_model(settings, registry.artifact_file(settings, model), model.artifact_sha256, booster)
    folder = workdir.require_tables(settings, logical_date)
    feature_names = list(model.features)
    users = shard_users(folder, shards, shard)
    build = features.candidate_features(settings, logical_date, reasons=settings.explanations)
    events = shard_events(settings, logical_date, users)
    sampled = None if model_id else features.drift_sample_users(settings, logical_date)["user_id"]
    diverse = diversifier(settings, logical_date)
    generated_at = datetime.now(UTC)
    parts: list[pl.DataFrame] = []
    sample_parts: list[pl.DataFrame] = []
    candidate_rows = 0
    predict_seconds = 0.0
    chunks = math.ceil(users.height / CHUNK_USERS)
    for chunk in range(chunks):
        chunk_events = events.pop(chunk, None)
        if chunk_events is not None:
            frame = build(chunk_events)
            del chunk_events
            candidate_rows += frame.height
            if sampled is not None:
                in_sample = frame.filter(pl.col("user_id").cast(pl.String).is_in(sampled.implode()))
                sample_parts.append(features.with_text_ids(in_sample.drop(candidates.REASONS, strict=False)))
            if frame.height:
                predicted = np.empty(frame.height, dtype=np.float64)
                # The matrix a slice at a time: one block the allocator reuses, where the chunk's whole
                # matrix (hundreds of MB) was page-faulted in afresh every chunk.
                for start in range(0, frame.height, predictor.SLICE_ROWS):
                    rows = frame.slice(start, predictor.SLICE_ROWS).select(feature_names).to_numpy(order="c")
                    predicting = time.perf_counter()
                    predicted[start : start + rows.shape[0]] = ranker.predict(rows)
                    predict_seconds += time.perf_counter() - predicting
                parts.append(rank_top_k(frame, predicted, settings.top_k, diverse))
            del frame  # before the next chunk's is built, so that it can take over these pages
        logger.info(
            "score shard %d/%d: chunk %d of %d, %d candidates so far", shard, shards, chunk + 1, chunks, candidate_rows
        )
    scored = (
        pl.concat(parts)
        if parts
        else pl.DataFrame(schema=LISTS_SCHEMA | (REASONS_SCHEMA if settings.explanations else {}))
    )
    path = workdir.shard_path(settings, logical_date, shard, shards, model_id)
    lake.write_parquet_atomically(scored, path)
    if sampled is not None:
        sample_path = workdir.drift_sample_path(settings, logical_date, shard, shards)
        sample_path.unlink(missing_ok=True)  # an earlier run's, which a shard without sampled users would keep
        if sample_parts:
            lake.write_parquet_atomically(pl.concat(sample_parts), sample_path)
    manifest = workdir.ShardManifest(
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
        predictor=ranker.name,
    )
    lake.write_json_atomically(asdict(manifest), workdir.manifest_path(path))
    return manifest


def score(
    settings: Settings,
    logical_date: date,
    shards: int | None = None,
    shard: int | None = None,
    model_id: str | None = None,
) -> list[workdir.ShardManifest]:
    """Score one shard, or all of them one after another when ``shard`` is None (`model_id`: a chosen model)."""
    ranker_for(settings, logical_date, model_id)  # before planning: without a model, that is what to say
    if shard is not None:
        return [score_shard(settings, logical_date, shards or shard_count(settings, logical_date), shard, model_id)]
    planned = plan_shards(settings, logical_date, shards, model_id)
    return [score_shard(settings, logical_date, len(planned), i, model_id) for i in planned]


def shard_count(settings: Settings, logical_date: date) -> int:
    """At least ``score_shards``, and enough that no shard has more than ``shard_users`` users."""
    folder = workdir.require_tables(settings, logical_date)
    users = pl.scan_parquet(str(workdir.table_in(folder, workdir.USERS))).select(pl.len()).collect().item()
    return max(settings.score_shards, math.ceil(users / settings.shard_users))


def plan_shards(
    settings: Settings, logical_date: date, shards: int | None = None, model_id: str | None = None
) -> list[int]:
    """The shard numbers to score (``shards`` of them, or ``shard_count``); shard files of an earlier run
    with another count are removed, since publishing them with this run's would mix two runs."""
    model = ranker_for(settings, logical_date, model_id)
    require_fitting_tables(settings, logical_date, model, model_id)
    shards = shards or shard_count(settings, logical_date)
    workdir.remove_other_shard_counts(settings, logical_date, shards, model_id)
    return list(range(shards))


@dataclass(frozen=True)
class ScoredShards:
    """Every shard of a night scored (`overnight run`, `overnight score`): the step's result."""

    manifests: list[workdir.ShardManifest]

    def summary(self) -> str:
        users = sum(m.users for m in self.manifests)
        rows = sum(m.candidate_rows for m in self.manifests)
        return f"{users:,} users in {len(self.manifests)} shard(s), {rows:,} candidates ranked"

    def outcome(self) -> Outcome:
        return Outcome(
            self.summary(),
            rows_in=sum(m.candidate_rows for m in self.manifests),
            rows_out=sum(m.users for m in self.manifests),
            model_id=self.manifests[0].model_id if self.manifests else None,
        )
