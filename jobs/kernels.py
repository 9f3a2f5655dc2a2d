"""Per-user sums that a polars join and group-by would materialise first, compiled with numba.

- ``top_neighbours``: the knn and co-visitation sources sum an item-to-item table over each
  user's latest items. For a 20,000-user chunk that is 28 million (user, item, neighbour) rows
  grouped into 9 million (user, neighbour) pairs, of which each user keeps ~100: as a polars
  join and group-by, the largest part of scoring a chunk. Here each user's neighbours are added
  up in scratch arrays indexed by item code, the seen items are dropped and only what is kept is
  sorted, on all cores.
- ``genre_affinity``: per candidate, the user's shares of the item's genres, summed, without
  joining millions of candidates to their genres and grouping them back.

The results equal the polars formulations': sums in float64 rounded to 6 decimals, the same
ranks and tie-breaks. Compiled once and cached beside this file.
"""

from typing import Literal

import numba
import numpy as np
import polars as pl

RankBy = Literal["total", "recent"]
_USERS_PER_TASK = 64  # users per parallel task, each with its own scratch arrays (a few MB)


@numba.njit(parallel=True, cache=True)
def _top_neighbours(
    user_ptr: np.ndarray,
    history_items: np.ndarray,
    history_recency: np.ndarray,
    seen_ptr: np.ndarray,
    seen_items: np.ndarray,
    neighbour_ptr: np.ndarray,
    neighbour_items: np.ndarray,
    neighbour_values: np.ndarray,
    n_items: int,
    limit: int,
    by_recent: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n_users = user_ptr.size - 1
    out_items = np.empty(n_users * limit, np.int64)
    out_total = np.empty(n_users * limit, np.float32)
    out_max = np.empty(n_users * limit, np.float32)
    out_recent = np.empty(n_users * limit, np.float32)
    out_count = np.empty(n_users * limit, np.int32)
    kept = np.zeros(n_users, np.int64)
    for task in numba.prange((n_users + _USERS_PER_TASK - 1) // _USERS_PER_TASK):
        total = np.zeros(n_items, np.float64)
        recent = np.zeros(n_items, np.float64)
        largest = np.zeros(n_items, np.float32)
        count = np.zeros(n_items, np.int32)
        owner = np.full(n_items, -1, np.int64)  # the user whose sums a slot holds; -2 = seen by that user
        touched = np.empty(n_items, np.int64)
        for user in range(task * _USERS_PER_TASK, min(n_users, (task + 1) * _USERS_PER_TASK)):
            n_touched = 0
            for h in range(user_ptr[user], user_ptr[user + 1]):
                item = history_items[h]
                root = np.sqrt(np.float64(history_recency[h]))
                for e in range(neighbour_ptr[item], neighbour_ptr[item + 1]):
                    neighbour = neighbour_items[e]
                    value = neighbour_values[e]
                    if owner[neighbour] != user:
                        owner[neighbour] = user
                        total[neighbour] = 0.0
                        recent[neighbour] = 0.0
                        largest[neighbour] = value
                        count[neighbour] = 0
                        touched[n_touched] = neighbour
                        n_touched += 1
                    total[neighbour] += np.float64(value)
                    recent[neighbour] += np.float64(value) / root
                    largest[neighbour] = max(largest[neighbour], value)
                    count[neighbour] += 1
            for s in range(seen_ptr[user], seen_ptr[user + 1]):
                owner[seen_items[s]] = -2
            candidates = np.empty(n_touched, np.int64)
            n_candidates = 0
            for t in range(n_touched):
                if owner[touched[t]] == user:
                    candidates[n_candidates] = touched[t]
                    n_candidates += 1
            for s in range(seen_ptr[user], seen_ptr[user + 1]):
                owner[seen_items[s]] = -1
            candidates = np.sort(candidates[:n_candidates])  # item order: ties of the score go by item
            scores = np.empty(n_candidates, np.float32)
            for c in range(n_candidates):
                scores[c] = np.float32(np.round(recent[candidates[c]] if by_recent else total[candidates[c]], 6))
            order = np.argsort(-scores, kind="mergesort")
            keep = min(limit, n_candidates)
            base = user * limit
            for r in range(keep):
                item = candidates[order[r]]
                out_items[base + r] = item
                out_total[base + r] = np.float32(np.round(total[item], 6))
                out_max[base + r] = largest[item]
                out_recent[base + r] = np.float32(np.round(recent[item], 6))
                out_count[base + r] = count[item]
            kept[user] = keep
    return out_items, out_total, out_max, out_recent, out_count, kept


def _pointers(sorted_codes: np.ndarray, size: int) -> np.ndarray:
    """CSR row pointers: rows of code c are sorted_codes[ptr[c]:ptr[c + 1]]."""
    return np.searchsorted(sorted_codes, np.arange(size + 1)).astype(np.int64)


def _codes(column: str) -> pl.Expr:
    return pl.col(column).to_physical().cast(pl.Int64)


def top_neighbours(
    latest: pl.DataFrame,
    seen: pl.DataFrame | None,
    table: pl.DataFrame,
    value: str,
    limit: int,
    rank_by: RankBy,
) -> pl.DataFrame:
    """Each user's ``limit`` best neighbours of their latest items.

    ``latest``: (user_id, item_id, recency) with 1 = the user's latest item; ``seen``: (user_id,
    item_id) pairs never to propose, or None; ``table``: (item_id, neighbour_id, ``value``). Ids are
    enums, the users' and the items' the same in all three.

    Returns (user_code, item_code, total, max, recent, count, rank): per user and neighbour, the
    sum of ``value`` over the user's items, its largest value, the sum of ``value`` / sqrt(recency),
    and how many of the user's items have it as a neighbour. Ranked by ``total`` or ``recent``
    (rounded to 6 decimals, ties by item), rank 1 = best.
    """
    users = latest.schema["user_id"]
    items = latest.schema["item_id"]
    assert isinstance(users, pl.Enum) and isinstance(items, pl.Enum)
    n_users, n_items = users.categories.len(), items.categories.len()
    history = latest.select(user=_codes("user_id"), item=_codes("item_id"), recency="recency").sort("user")
    pairs = (
        seen.select(user=_codes("user_id"), item=_codes("item_id")).sort("user")
        if seen is not None
        else pl.DataFrame(schema={"user": pl.Int64, "item": pl.Int64})
    )
    edges = table.select(item=_codes("item_id"), neighbour=_codes("neighbour_id"), value=pl.col(value)).sort(
        "item", maintain_order=True
    )
    found, total, largest, recent, count, kept = _top_neighbours(
        _pointers(history["user"].to_numpy(), n_users),
        history["item"].to_numpy(),
        history["recency"].cast(pl.Int64).to_numpy(),
        _pointers(pairs["user"].to_numpy(), n_users),
        pairs["item"].to_numpy(),
        _pointers(edges["item"].to_numpy(), n_items),
        edges["neighbour"].to_numpy(),
        edges["value"].cast(pl.Float32).to_numpy(),
        n_items,
        limit,
        rank_by == "recent",
    )
    mask = (np.arange(limit)[None, :] < kept[:, None]).ravel()
    return pl.DataFrame(
        {
            "user_code": np.repeat(np.arange(n_users, dtype=np.int64), limit)[mask],
            "item_code": found[mask],
            "total": total[mask],
            "max": largest[mask],
            "recent": recent[mask],
            "count": count[mask],
            "rank": np.tile(np.arange(1, limit + 1, dtype=np.int32), n_users)[mask],
        }
    )


@numba.njit(parallel=True, cache=True)
def _genre_affinity(
    users: np.ndarray, items: np.ndarray, genre_ptr: np.ndarray, item_genres: np.ndarray, shares: np.ndarray
) -> np.ndarray:
    out = np.empty(users.size, np.float32)
    for row in numba.prange(users.size):
        total = 0.0
        for e in range(genre_ptr[items[row]], genre_ptr[items[row] + 1]):
            total += np.float64(shares[users[row], item_genres[e]])
        out[row] = np.float32(np.round(total, 6))
    return out


def genre_affinity(candidates: pl.DataFrame, shares: pl.DataFrame, item_genres: pl.DataFrame) -> pl.Series:
    """Per row of ``candidates`` (user_id, item_id), the sum of the user's ``shares`` (user_id, genre,
    share) of the item's genres (``item_genres``: item_id, genre); 0 where they share none.

    Ids are enums, the same in all three. The shares are held as a dense users x genres array.
    """
    users = candidates.schema["user_id"]
    items = candidates.schema["item_id"]
    assert isinstance(users, pl.Enum) and isinstance(items, pl.Enum)
    genres = pl.Enum(pl.concat([item_genres["genre"], shares["genre"]]).unique().sort())
    coded = shares.select(user=_codes("user_id"), genre=pl.col("genre").cast(genres).to_physical(), share="share")
    dense = np.zeros((users.categories.len(), genres.categories.len()), np.float32)
    dense[coded["user"].to_numpy(), coded["genre"].to_numpy()] = coded["share"].to_numpy()
    edges = item_genres.select(item=_codes("item_id"), genre=pl.col("genre").cast(genres).to_physical().cast(pl.Int64))
    edges = edges.sort("item", maintain_order=True)
    affinity = _genre_affinity(
        candidates["user_id"].to_physical().cast(pl.Int64).to_numpy(),
        candidates["item_id"].to_physical().cast(pl.Int64).to_numpy(),
        _pointers(edges["item"].to_numpy(), items.categories.len()),
        edges["genre"].to_numpy(),
        dense,
    )
    return pl.Series("genre_affinity", affinity)
