"""Quality of the item-to-item answers (docs/evaluation.md#similar-items-and-sessions): similar items at predicting
a user's next new item, and session answers for anonymous visitors against the popular lists they would get.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from common.session import SESSION_RECENCY_DECAY, blend_session
from jobs.settings import Settings
from jobs.steps import candidates, similar
from jobs.steps.ranking_metrics import K, ranking_metrics

# The service takes at most this many session items by default (OVERNIGHT_MAX_SESSION_ITEMS); the evaluation
# gives each visitor's latest ones.
SESSION_ITEMS = 50
BLEND = "similar-items"
ITEM_KNN = "item-knn"
CO_VISITATION = "co-visitation"
POPULAR = "popular"
SEGMENT_POPULAR = "segment-popular"
NOT_APPLICABLE = "not_applicable"
# What the similar-items and session reports show of `ranking_metrics` (the user protocol's: evaluate.METRIC_KEYS).
ITEM_METRIC_KEYS = (f"ndcg@{K}", f"hit_rate@{K}", f"recall@{K}", f"coverage@{K}", "users")


def next_item_pairs(history: pl.LazyFrame, later: pl.LazyFrame) -> pl.DataFrame:
    """(pair, user_id, previous_id, item_id): each event of ``later`` whose item is new to the user, with
    the item the user touched just before it (from ``history`` or ``later``), in time order.

    Events at the same instant go history first, then by item id, as the user-holdout split orders them."""
    users = later.select("user_id").unique()
    events = pl.concat(
        [
            history.join(users, on="user_id", how="semi").select("user_id", "item_id", "timestamp", held=pl.lit(False)),
            later.select("user_id", "item_id", "timestamp", held=pl.lit(True)),
        ]
    )
    return (
        events.sort("user_id", "timestamp", "held", "item_id")
        .with_columns(
            previous_id=pl.col("item_id").shift(1).over("user_id"),
            first_touch=pl.int_range(pl.len()).over("user_id", "item_id") == 0,
        )
        .filter(pl.col("held") & pl.col("first_touch") & pl.col("previous_id").is_not_null())
        .select("user_id", "previous_id", "item_id")
        .collect()
        .with_row_index("pair")
    )


def neighbour_answers(pairs: pl.DataFrame, neighbours: pl.DataFrame, k: int = K) -> pl.DataFrame:
    """(user_id = pair, item_id, rank): the first ``k`` published neighbours of each pair's previous item."""
    return (
        pairs.select("pair", "previous_id")
        .join(neighbours.select(pl.col("item_id").alias("previous_id"), "item_ids"), on="previous_id")
        .select(pl.col("pair").alias("user_id"), item_id=pl.col("item_ids").list.head(k))
        .explode("item_id")
        .drop_nulls("item_id")
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over("user_id"))
    )


def next_item_metrics(pairs: pl.DataFrame, neighbours: pl.DataFrame, catalogue_size: int) -> dict[str, Any]:
    """Metrics@10 of ``neighbours`` (``similar.similar_items``' table) at predicting each pair's next item."""
    relevant = pairs.select(pl.col("pair").alias("user_id"), "item_id")
    return public_metrics(ranking_metrics(neighbour_answers(pairs, neighbours), relevant, catalogue_size))


def public_metrics(metrics: Mapping[str, Any], keys: Sequence[str] = ITEM_METRIC_KEYS) -> dict[str, Any]:
    """The metrics a report shows, `keys` in their order: `ranking_metrics` measures more."""
    return {key: metrics[key] for key in keys}


@dataclass(frozen=True)
class Sessions:
    """Anonymous visitors' sessions and what they went on to touch."""

    items: pl.DataFrame  # user_id, items (distinct, most recent first, at most SESSION_ITEMS)
    relevant: pl.DataFrame  # user_id, item_id: held-out items new to the visitor
    training: pl.LazyFrame  # every event of the other users: what the neighbours are built from
    cutoff: datetime  # just after the last training event


def sessions_of(before: pl.DataFrame, later: pl.DataFrame, training: pl.DataFrame) -> Sessions | None:
    """Visitors' sessions from their events ``before`` the held-out part and their relevant items from the
    held-out part ``later`` (those new to them); ``training`` holds everyone else's events. None when no
    visitor has a new item to find or no one else has events."""
    relevant = (
        later.select("user_id", "item_id")
        .unique()
        .join(before.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
        .sort("user_id", "item_id")
    )
    last = training["timestamp"].max()
    if relevant.height == 0 or not isinstance(last, datetime):
        return None
    items = (
        before.join(relevant.select("user_id").unique(), on="user_id", how="semi")
        .group_by("user_id", "item_id")
        .agg(last_seen=pl.col("timestamp").max())
        # latest first; at the same instant the larger id, which the holdout split orders after
        .sort("user_id", "last_seen", "item_id", descending=[False, True, True])
        .group_by("user_id", maintain_order=True)
        .agg(items=pl.col("item_id").head(SESSION_ITEMS))
    )
    return Sessions(items=items, relevant=relevant, training=training.lazy(), cutoff=last + timedelta(microseconds=1))


def session_answers(items: pl.DataFrame, neighbours: pl.DataFrame, k: int = K) -> pl.DataFrame:
    """(user_id, item_id, rank): each session answered by ``blend_session`` over the published neighbours."""
    wanted = items.select(pl.col("items").explode().unique().alias("item_id"))
    lists = {
        item_id: (item_ids, scores)
        for item_id, item_ids, scores in neighbours.join(wanted, on="item_id", how="semi")
        .select("item_id", "item_ids", "scores")
        .iter_rows()
    }
    rows: list[tuple[str, str, int]] = []
    for user_id, session in items.iter_rows():
        answer = blend_session([lists.get(item_id) for item_id in session], set(session))
        rows.extend((user_id, item_id, rank) for rank, (item_id, _) in enumerate(answer[:k], start=1))
    return _answers(rows)


def list_answers(items: pl.DataFrame, ranked: Sequence[str], k: int = K) -> pl.DataFrame:
    """(user_id, item_id, rank): one list for every session, its items left out (what ``exclude=`` does)."""
    return segment_answers(items, {}, ranked, k)


def segment_answers(
    items: pl.DataFrame, list_of: Mapping[str, Sequence[str]], default: Sequence[str], k: int = K
) -> pl.DataFrame:
    """(user_id, item_id, rank): each session's own list from ``list_of`` (``default`` for the others), its
    items left out."""
    rows: list[tuple[str, str, int]] = []
    for user_id, session in items.iter_rows():
        seen = set(session)
        kept = [item_id for item_id in list_of.get(user_id, default) if item_id not in seen][:k]
        rows.extend((user_id, item_id, rank) for rank, item_id in enumerate(kept, start=1))
    return _answers(rows)


def _answers(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"user_id": pl.String, "item_id": pl.String, "rank": pl.Int64}, orient="row")


def neighbour_tables(
    tables: candidates.CandidateTables, catalogue: pl.DataFrame, settings: Settings, covisit_share: float
) -> dict[str, pl.DataFrame]:
    """The published blend and its two one-signal baselines, each as ``similar.similar_items`` makes it."""
    return {
        BLEND: similar.similar_items(tables.neighbours, tables.similar, catalogue, settings, covisit_share),
        ITEM_KNN: similar.similar_items(tables.neighbours, tables.similar, catalogue, settings, 0.0),
        CO_VISITATION: similar.similar_items(tables.neighbours, tables.similar, catalogue, settings, 1.0),
    }


def _table(title: str, models: Mapping[str, Mapping[str, Any]], users: str) -> list[str]:
    columns = (f"ndcg@{K}", f"hit_rate@{K}", f"coverage@{K}", "users")
    lines = [title, f"{'model':<16}" + "".join(f"{users if c == 'users' else c:>14}" for c in columns)]
    for name, metrics in models.items():
        if NOT_APPLICABLE in metrics:
            lines.append(f"{name:<16}  not applicable: {metrics[NOT_APPLICABLE]}")
            continue
        cells = [f"{metrics[c]:>14,}" if c == "users" else f"{metrics[c]:>14.4f}" for c in columns]
        lines.append(f"{name:<16}" + "".join(cells))
    return lines


@dataclass(frozen=True)
class SimilarItemsQuality:
    """Metrics@10 of the published neighbour lists, and of each signal alone, at the next item."""

    covisit_share: float  # the published blend's
    pairs: int
    models: dict[str, dict[str, Any]]  # similar-items, item-knn, co-visitation: metrics over the pairs

    def table(self) -> str:
        title = (
            f"similar items: the next new item among the previous one's {K} neighbours "
            f"(published blend with covisit_share {self.covisit_share}; one query per pair)"
        )
        return "\n".join(_table(title, self.models, "pairs"))


def similar_items_quality(
    history: pl.LazyFrame, later: pl.LazyFrame, catalogue: pl.DataFrame, cutoff: datetime, settings: Settings
) -> SimilarItemsQuality:
    """Neighbours from ``history`` (all before ``cutoff``) scored on the next-item pairs of ``later``."""
    pairs = next_item_pairs(history, later)
    tables = candidates.build_tables(history, catalogue, cutoff, settings)
    share = similar.DEFAULT_COVISIT_SHARE
    models = {
        name: next_item_metrics(pairs, neighbours, catalogue.height)
        for name, neighbours in neighbour_tables(tables, catalogue, settings, share).items()
    }
    return SimilarItemsQuality(covisit_share=share, pairs=pairs.height, models=models)


@dataclass(frozen=True)
class SegmentPopular:
    """What a lookup gives a visitor of a segment: the segment's popular list when it has one."""

    members: pl.DataFrame  # user_id, segment
    lists: pl.DataFrame  # segment, item_ids (best first)


@dataclass(frozen=True)
class SessionQuality:
    """Metrics@10 of session answers for anonymous visitors, and of the popular lists they would get instead."""

    visitors: int
    recency_decay: float  # SESSION_RECENCY_DECAY
    lift: float | None  # the session answer's NDCG@10 / the global popular list's
    models: dict[str, dict[str, Any]]  # similar-items (and each signal alone), popular, segment-popular

    def table(self) -> str:
        lift = f"; {self.lift:.2f}x the popular list's NDCG@{K}" if self.lift is not None else ""
        title = (
            f"session: anonymous held-out users' last 20% from the items before it "
            f"(blend_session, recency decay {self.recency_decay}{lift})"
        )
        return "\n".join(_table(title, self.models, "visitors"))


def session_quality(
    sessions: Sessions, catalogue: pl.DataFrame, settings: Settings, segment_popular: SegmentPopular | str
) -> SessionQuality:
    """Session answers over neighbours built from the other users, against the popular list and the segment's
    popular list (``segment_popular``, or why that baseline is not applicable)."""
    tables = candidates.build_tables(sessions.training, catalogue, sessions.cutoff, settings)
    size, relevant = catalogue.height, sessions.relevant
    models: dict[str, dict[str, Any]] = {
        name: public_metrics(ranking_metrics(session_answers(sessions.items, neighbours), relevant, size))
        for name, neighbours in neighbour_tables(tables, catalogue, settings, similar.DEFAULT_COVISIT_SHARE).items()
    }
    # The whole popular table, deeper than the published fallback: a session may leave out many of its items.
    popular = tables.popular["item_id"].to_list()
    models[POPULAR] = public_metrics(ranking_metrics(list_answers(sessions.items, popular), relevant, size))
    if isinstance(segment_popular, str):
        models[SEGMENT_POPULAR] = {NOT_APPLICABLE: segment_popular}
    else:
        own = dict(segment_popular.lists.select("segment", "item_ids").iter_rows())
        list_of = {user_id: own[segment] for user_id, segment in segment_popular.members.iter_rows() if segment in own}
        answers = segment_answers(sessions.items, list_of, popular)
        models[SEGMENT_POPULAR] = public_metrics(ranking_metrics(answers, relevant, size))
    base = models[POPULAR][f"ndcg@{K}"]
    lift = round(models[BLEND][f"ndcg@{K}"] / base, 4) if base > 0 else None
    return SessionQuality(
        visitors=models[POPULAR]["users"], recency_decay=SESSION_RECENCY_DECAY, lift=lift, models=models
    )
