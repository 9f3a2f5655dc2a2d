"""Similar items: each catalogue item's neighbours, published with the batch for ``GET /v1/items/{item_id}/similar``
and sessions: co-visitation and cosine similarity, each divided by the item's best, mixed by ``covisit_share``.
"""

import polars as pl

from jobs.settings import Settings

# How this share was chosen, and why it is not chosen each night: docs/evaluation.md#how-the-blend-was-chosen.
DEFAULT_COVISIT_SHARE = 0.4


def similar_items(
    covisits: pl.DataFrame,
    cosine: pl.DataFrame,
    catalogue: pl.DataFrame,
    settings: Settings,
    covisit_share: float = DEFAULT_COVISIT_SHARE,
) -> pl.DataFrame:
    """(item_id, item_ids, scores): each item's available neighbours, best first, at most ``similar_k``;
    scores are in (0, 1]. Items neither signal knows have no row.

    ``covisits`` is the candidates step's (item_id, neighbour_id, covisit_weight) table and ``cosine`` its
    (item_id, neighbour_id, similarity) table (``CandidateTables.neighbours`` and ``.similar``)."""
    if not 0.0 <= covisit_share <= 1.0:
        raise ValueError(f"covisit_share must be between 0 and 1, got {covisit_share}")

    def scaled(table: pl.DataFrame, value: str, share: float) -> pl.LazyFrame:
        # A pair the signal weighs 0 (co-visits so old that their decay rounds to 0) is no neighbour: divided
        # by an item's best of 0 it would score NaN, which `score > 0` keeps (polars orders NaN above numbers).
        weight = pl.col(value).cast(pl.Float64)
        return (
            table.lazy()
            .filter(weight.is_finite() & (weight > 0))
            .select("item_id", "neighbour_id", score=weight / weight.max().over("item_id") * share)
        )

    available = catalogue.lazy().filter(pl.col("available")).select(pl.col("item_id").alias("neighbour_id"))
    blended = (
        pl.concat(
            [
                scaled(covisits, "covisit_weight", covisit_share),
                scaled(cosine, "similarity", 1.0 - covisit_share),
            ]
        )
        .filter(pl.col("score") > 0)
        .join(available, on="neighbour_id", how="semi")
        .group_by("item_id", "neighbour_id")
        .agg(score=pl.col("score").sum().round(6))
    )
    return (
        blended.sort("item_id", "score", "neighbour_id", descending=[False, True, False])
        .group_by("item_id", maintain_order=True)
        .agg(
            item_ids=pl.col("neighbour_id").head(settings.similar_k),
            scores=pl.col("score").head(settings.similar_k).cast(pl.Float32),
        )
        .collect()
    )
