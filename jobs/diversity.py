"""Diversity of the published lists: item similarity from the catalogue (the Jaccard index of items' tokens), and
an MMR re-ranking with the mean, not the maximum, similarity to the items taken (docs/evaluation.md#diversity).
"""

# Monitoring and scoring both use this module, so it imports only numpy and polars (the kernel: in `rerank`).
import numpy as np
import polars as pl

POOL_FACTOR = 3  # the re-ranking chooses among the best 3k candidates: deep enough to reach other genres
TOKEN = "token"


def item_tokens(catalogue: pl.DataFrame) -> pl.DataFrame:
    """(item_id, token) of every item: its genres, and ``name=value`` of its text and text-list attributes."""
    parts = []
    if "genres" in catalogue.columns:
        parts.append(catalogue.select("item_id", pl.col("genres").alias(TOKEN)).explode(TOKEN))
    for name, dtype in catalogue.schema.items():
        if name in ("item_id", "title", "genres") or not (dtype == pl.String or dtype == pl.List(pl.String)):
            continue
        values = catalogue.select("item_id", pl.col(name).alias(TOKEN))
        if dtype == pl.List(pl.String):
            values = values.explode(TOKEN)
        parts.append(values.select("item_id", (pl.lit(f"{name}=") + pl.col(TOKEN)).alias(TOKEN)))
    if not parts:
        return pl.DataFrame(schema={"item_id": pl.String, TOKEN: pl.String})
    return (
        pl.concat(parts)
        .drop_nulls()
        .filter(pl.col(TOKEN) != "")
        .with_columns(pl.col("item_id").cast(pl.String))
        .unique()
        .sort("item_id", TOKEN)
    )


class ItemSimilarity:
    """The tokens of the items of an enum, as sorted token codes per item code (CSR), for the kernels."""

    def __init__(self, tokens: pl.DataFrame, items: pl.Enum) -> None:
        self.items = items
        coded = (
            tokens.filter(pl.col("item_id").is_in(items.categories.implode()))
            .select(
                item=pl.col("item_id").cast(items).to_physical().cast(pl.Int64),
                token=pl.col(TOKEN).rank("dense").cast(pl.Int64),
            )
            .sort("item", "token")
        )
        counts = np.bincount(coded["item"].to_numpy(), minlength=items.categories.len())
        self.pointers = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.tokens = coded["token"].to_numpy().astype(np.int64)


def rerank(
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    scores: np.ndarray,
    k: int,
    strength: float,
    similarity: ItemSimilarity,
) -> tuple[np.ndarray, np.ndarray]:
    """MMR over pools given as rows grouped by user, each user's rows best score first (as ``kernels.top_rows``
    returns them): (the chosen pool rows, k per user at most, in list order; the scores to publish with them).

    The scores published are the chosen items' own scores sorted best first, so a list's scores
    still fall with its order (a blend that sorts by score keeps the diversified order).
    """
    starts = np.flatnonzero(np.diff(user_codes, prepend=-1)) if user_codes.size else np.empty(0, np.int64)
    user_ptr = np.append(starts, user_codes.size).astype(np.int64)
    from jobs import kernels  # numba: loaded only where lists are re-ranked, never by monitoring

    chosen = kernels.mmr_positions(
        user_ptr, item_codes, scores.astype(np.float64), similarity.pointers, similarity.tokens, k, strength
    )
    chosen = chosen[chosen >= 0]
    chosen_users = user_codes[chosen]
    # descending scores within each user: sort by (user, -score); users are already in order
    order = np.lexsort((-scores[chosen], chosen_users))
    return chosen, scores[chosen][order].astype(np.float32)


def intra_list_diversity(recommendations: pl.DataFrame, item_tokens: pl.DataFrame, k: int = 10) -> float:
    """The mean over users (with two items or more in their top k) of the mean dissimilarity of the pairs of
    their list, dissimilarity being 1 - the Jaccard index of the two items' tokens (:func:`item_tokens`)."""
    top = recommendations.filter(pl.col("rank") <= k).select(pl.col("user_id"), pl.col("item_id").cast(pl.String))
    tokens = item_tokens.select(pl.col("item_id").cast(pl.String), "token")
    sizes = tokens.group_by("item_id").agg(size=pl.len())
    pairs = (
        top.join(top, on="user_id", suffix="_other")
        .filter(pl.col("item_id") < pl.col("item_id_other"))
        .join(sizes, on="item_id", how="left")
        .join(sizes.rename({"item_id": "item_id_other", "size": "size_other"}), on="item_id_other", how="left")
    )
    if pairs.height == 0:
        return 0.0
    listed_tokens = top.join(tokens, on="item_id")
    shared = (
        listed_tokens.join(listed_tokens, on=["user_id", "token"], suffix="_other")
        .filter(pl.col("item_id") < pl.col("item_id_other"))
        .group_by("user_id", "item_id", "item_id_other")
        .agg(shared=pl.len())
    )
    union = pl.col("size").fill_null(0) + pl.col("size_other").fill_null(0) - pl.col("shared")
    per_user = (
        pairs.join(shared, on=["user_id", "item_id", "item_id_other"], how="left")
        .with_columns(pl.col("shared").fill_null(0))
        .with_columns(distance=pl.when(union > 0).then(1.0 - pl.col("shared") / union).otherwise(1.0))
        .group_by("user_id")
        .agg(pl.col("distance").mean())
    )
    return round(float(per_user["distance"].mean()), 9)  # type: ignore[arg-type]
