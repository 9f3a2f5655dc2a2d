"""Output monitoring of a batch before it goes live: the statistics of the lists about to be published that the
publish gate (``jobs.monitoring.gate``) judges, and the unrecorded checks of a chosen model's batch (the statistics
and their thresholds: docs/monitoring.md#checks).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psycopg
from upath import UPath

import sql
from jobs import diversity, lake, workdir
from jobs.database import connect
from jobs.monitoring import checks, distributions
from jobs.settings import Settings

logger = logging.getLogger(__name__)

OVERLAP_K = 10
SCORE_BINS = 20
SCORE_SAMPLE_USERS = 20_000  # about this many users' scores make the score quantiles and histogram


@dataclass(frozen=True)
class ListMeasures:
    """What output monitoring measures of a batch's lists from its shard files alone, with no database: publish
    measures them (`measure_lists`) while the server keys the batch's table, and the gate judges them with the
    rest."""

    files: list[UPath]
    lists: int
    statistics: dict[str, Any]  # empty_list_share ... intra_list_diversity, as batch_statistics reports them


def measure_lists(settings: Settings, logical_date: date, chosen_model: str | None = None) -> ListMeasures:
    """The statistics of the date's shard files (production's, or `chosen_model`'s) that need no database."""
    manifests = workdir.read_manifests(settings, logical_date, chosen_model)
    files = [workdir.shard_path(settings, logical_date, m.shard, m.shards, chosen_model) for m in manifests]
    short_at = min(OVERLAP_K, settings.top_k)
    n_lists = _scan_lists(files).select(pl.len()).collect().item()  # from the files' metadata

    empty, short, mean_length, exposure, sampled_scores, top_scores_frame, sampled_lists = list_statistics(
        files, n_lists, short_at
    )
    catalogue = lake.read_catalogue(settings.lake_dir, logical_date)
    if "available" in catalogue.columns:
        catalogue = catalogue.filter(pl.col("available").fill_null(True))
    available = catalogue.select("item_id").unique()
    shown = available.join(exposure, on="item_id", how="left").with_columns(pl.col("len").fill_null(0))
    scores = sampled_scores["scores"].cast(pl.Float64).to_numpy()
    top_scores = top_scores_frame["scores"].to_numpy()
    statistics = {
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
        "intra_list_diversity": _intra_list_diversity(sampled_lists, catalogue),
    }
    return ListMeasures(files, n_lists, statistics)


def _scan_lists(files: Sequence[UPath | Path]) -> pl.LazyFrame:
    return pl.scan_parquet([str(file) for file in files]).select("user_id", "item_ids", "scores")


def batch_statistics(
    settings: Settings,
    logical_date: date,
    batch_id: int,
    conn: psycopg.Connection,
    chosen_model: str | None = None,
    measured: ListMeasures | None = None,
) -> dict[str, Any]:
    """`chosen_model`: measure the lists scored with that model (a shadow's or a canary's), not production's.
    `measured`: what `measure_lists` has already measured of those lists (else it is measured here)."""
    if measured is None:
        measured = measure_lists(settings, logical_date, chosen_model)
    n_lists = measured.lists
    batch = conn.execute(sql.query("batch_by_id"), (batch_id,)).fetchone()
    assert batch is not None
    users_scored, active_users = batch[5], batch[6]
    stats: dict[str, Any] = {
        "batch_id": batch_id,
        "lists": n_lists,
        "active_users": active_users,
        "fallback_share": 1.0 - users_scored / active_users if active_users else None,
        **measured.statistics,
    }
    stats |= _against_yesterday(logical_date, _scan_lists(measured.files), n_lists, settings, conn)
    return stats


def list_statistics(
    files: Sequence[UPath | Path], n_lists: int, short_at: int
) -> tuple[int, int, float | None, pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Of the published lists in `files`: how many are empty and shorter than `short_at`, their mean length,
    each item's exposure (item_id, len), a stable sample's scores, every list's top score, and the sample's
    first OVERLAP_K items (user_id, item_id).

    Shard by shard, then combined: exploding every list of a night at once would hold them all, one
    shard's at a time holds a shard's. The score distribution is for display, so a stable sample of
    users gives it.
    """
    shapes, exposures, scores, tops, samples = [], [], [], [], []
    for file in files:
        lists = pl.scan_parquet(str(file)).select("user_id", "item_ids", "scores")
        sampled = lists.filter(_sample(n_lists, SCORE_SAMPLE_USERS, seed=11))
        shape, exposure, sampled_scores, top, sample = pl.collect_all(
            [
                lists.select(
                    empty=(pl.col("item_ids").list.len() == 0).sum(),
                    short=(pl.col("item_ids").list.len() < short_at).sum(),
                    items=pl.col("item_ids").list.len().sum(),
                ),
                lists.select(pl.col("item_ids").explode().alias("item_id")).drop_nulls().group_by("item_id").len(),
                sampled.select(pl.col("scores").explode()).drop_nulls(),
                lists.select(pl.col("scores").list.first()).drop_nulls(),
                sampled.select("user_id", pl.col("item_ids").list.head(OVERLAP_K).alias("item_id")),
            ]
        )
        shapes.append(shape)
        exposures.append(exposure)
        scores.append(sampled_scores)
        tops.append(top)
        samples.append(sample)
    if not shapes:
        raise ValueError("no shard files to measure")
    empty, short, items = pl.concat(shapes).sum().row(0)
    exposure = pl.concat(exposures).group_by("item_id").agg(pl.col("len").sum())
    mean_length = items / n_lists if n_lists else None
    return empty, short, mean_length, exposure, pl.concat(scores), pl.concat(tops), pl.concat(samples)


def _intra_list_diversity(sampled_lists: pl.DataFrame, catalogue: pl.DataFrame) -> float | None:
    """Of the sampled users' top OVERLAP_K; None without a list of two items to compare."""
    listed = (
        sampled_lists.explode("item_id").drop_nulls().with_columns(rank=pl.int_range(1, pl.len() + 1).over("user_id"))
    )
    if listed.filter(pl.col("rank") == 2).height == 0:
        return None
    return diversity.intra_list_diversity(listed, diversity.item_tokens(catalogue), OVERLAP_K)


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


def unrecorded_checks(
    settings: Settings, logical_date: date, batch_id: int, model_id: str, measured: ListMeasures | None = None
) -> dict[str, Any]:
    """Output statistics and checks of a batch scored with a chosen model (a shadow, a model canary).

    Nothing is recorded in the date's monitoring (production's) and no alert is sent: the date's
    record is production's, and a batch that is not production must not replace it. The caller keeps
    the result with the batch (its ``validation``) and decides whether a failed check blocks it.
    """
    limits = checks.thresholds(settings)
    with connect(settings) as conn:
        stats = batch_statistics(settings, logical_date, batch_id, conn, chosen_model=model_id, measured=measured)
    judged = [checks.judge(limits, "output", name, stats[name]) for name in OUTPUT_STATISTICS]
    return {
        "verdict": checks.verdict(judged),
        "statistics": {name: stats[name] for name in OUTPUT_STATISTICS},
        "checks": [{"statistic": c.statistic, "level": c.level, "message": c.message} for c in judged],
    }
