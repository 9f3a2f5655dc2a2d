"""Top-k ranking metrics, vectorised over all users at once, with the conventions of docs/evaluation.md#metrics:
binary relevance (graded NDCG aside), NDCG@k and MAP@k over min(|relevant|, k), and every user in ``relevant``
counted, a user with no recommendation scoring zero.
"""

import math

import polars as pl

K = 10
DIGITS = 9
GRADE = "grade"  # the column of a relevant item's grade (jobs.event_weights.GRADE)


def metric_names(k: int = K) -> tuple[str, ...]:
    """The metrics ``ranking_metrics`` reports, besides its user count."""
    return (f"ndcg@{k}", f"graded_ndcg@{k}", f"recall@{k}", f"map@{k}", f"hit_rate@{k}", f"coverage@{k}")


def ranking_metrics(
    recommendations: pl.DataFrame, relevant: pl.DataFrame, catalogue_size: int, k: int = K
) -> dict[str, float]:
    """Score ``recommendations`` (user_id, item_id, rank from 1) against ``relevant`` (user_id, item_id)."""
    per_user = per_user_metrics(recommendations, relevant, k)
    if per_user.height == 0:
        return {**dict.fromkeys(metric_names(k), 0.0), "users": 0}
    means = per_user.drop("user_id").mean().row(0, named=True)
    covered = listed_items(recommendations, relevant, k).select(pl.col("item_id").n_unique()).item()
    # Rounded: a parallel mean adds in varying order, and a registry should not differ in the 16th digit.
    return {
        f"ndcg@{k}": round(float(means["ndcg"]), DIGITS),
        f"graded_ndcg@{k}": round(float(means["graded_ndcg"]), DIGITS),
        f"recall@{k}": round(float(means["recall"]), DIGITS),
        f"map@{k}": round(float(means["ap"]), DIGITS),
        f"hit_rate@{k}": round(float(means["hit"]), DIGITS),
        f"coverage@{k}": round(covered / catalogue_size, DIGITS) if catalogue_size else 0.0,
        "users": per_user.height,
    }


def listed_items(recommendations: pl.DataFrame, relevant: pl.DataFrame, k: int = K) -> pl.DataFrame:
    """(user_id, item_id, rank) of the top k of the users in ``relevant``: what coverage counts."""
    top = recommendations.filter(pl.col("rank") <= k).select("user_id", "item_id", "rank")
    return top.join(relevant.select("user_id").unique(), on="user_id", how="semi")


def per_user_metrics(recommendations: pl.DataFrame, relevant: pl.DataFrame, k: int = K) -> pl.DataFrame:
    """One row per user in ``relevant`` (user_id, item_id and, for graded relevance, grade), sorted by user
    id: user_id, ndcg, graded_ndcg, recall, ap, hit (their means are the metrics of ``ranking_metrics``; the
    backtest resamples them)."""
    grade = pl.col(GRADE).cast(pl.Float64) if GRADE in relevant.columns else pl.lit(1.0, pl.Float64)
    relevant = relevant.group_by("user_id", "item_id").agg(grade.max().alias(GRADE))
    users = relevant.group_by("user_id").agg(
        pl.len().alias("relevant"),
        graded_idcg=(
            pl.col(GRADE).sort(descending=True).head(k) / (pl.int_range(2, pl.len().clip(upper_bound=k) + 2)).log(2)
        ).sum(),
    )
    top = listed_items(recommendations, relevant, k)
    hits = (
        top.join(relevant, on=["user_id", "item_id"], how="inner")
        .sort("user_id", "rank")
        .with_columns(hit_number=pl.int_range(1, pl.len() + 1).over("user_id"))
        .group_by("user_id")
        .agg(
            hits=pl.len(),
            dcg=(1.0 / (pl.col("rank") + 1).log(2)).sum(),
            graded_dcg=(pl.col(GRADE) / (pl.col("rank") + 1).log(2)).sum(),
            precision_sum=(pl.col("hit_number") / pl.col("rank")).sum(),
        )
    )
    ideal = pl.DataFrame(
        {
            "n": list(range(1, k + 1)),
            "idcg": [sum(1.0 / math.log2(r + 1) for r in range(1, n + 1)) for n in range(1, k + 1)],
        }
    )
    return (
        users.join(hits, on="user_id", how="left")
        .fill_null(0)
        .with_columns(n=pl.min_horizontal(pl.col("relevant"), pl.lit(k)))
        .join(ideal, on="n", how="left")
        .select(
            "user_id",
            ndcg=pl.col("dcg") / pl.col("idcg"),
            graded_ndcg=pl.col("graded_dcg") / pl.col("graded_idcg"),
            recall=pl.col("hits") / pl.col("relevant"),
            ap=pl.col("precision_sum") / pl.col("n"),
            hit=(pl.col("hits") > 0).cast(pl.Float64),
        )
        .sort("user_id")
    )


def candidate_recall(candidates: pl.DataFrame, relevant: pl.DataFrame) -> float:
    """Share of (user, relevant item) pairs that the candidate set contains at all: a ceiling on recall."""
    relevant = relevant.select("user_id", "item_id").unique()
    if relevant.height == 0:
        return 0.0
    found = relevant.join(candidates.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="semi")
    return round(found.height / relevant.height, DIGITS)


def novelty(recommendations: pl.DataFrame, history: pl.DataFrame, k: int = K) -> float:
    """Mean self-information of the listed items, -log2 of the share of the history's users who touched
    each (plus one, so an item no one touched is finite): higher for less known items."""
    users = history.select(pl.col("user_id").n_unique()).item()
    if users == 0:
        return 0.0
    reach = history.group_by(pl.col("item_id").cast(pl.String)).agg(reached=pl.col("user_id").n_unique())
    top = recommendations.filter(pl.col("rank") <= k).select(pl.col("item_id").cast(pl.String))
    if top.height == 0:
        return 0.0
    information = top.join(reach, on="item_id", how="left").select(
        -((pl.col("reached").fill_null(0) + 1) / (users + 1)).log(2)
    )
    return round(float(information.to_series().mean()), DIGITS)  # type: ignore[arg-type]
