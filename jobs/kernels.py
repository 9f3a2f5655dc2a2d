"""Per-user and per-item sums that polars would materialise as joins and group-bys first, compiled with numba (why:
docs/scale.md#throughput). Each equals its polars formulation: float64 sums rounded to 6 decimals, the same ranks
and tie-breaks (``_key``).
"""

from datetime import datetime
from typing import Literal

import numba
import numpy as np
import polars as pl
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

RankBy = Literal["total", "recent"]
# Parallel kernels split their users (or items) into this many tasks per thread, each task allocating its scratch
# arrays (a few MB) once: a task per 64 users allocated hundreds of them per chunk, each page faulted in afresh.
_TASKS_PER_THREAD = 4


@numba.njit(cache=True, inline="always")
def _rounded(value: float) -> np.float32:
    return np.float32(np.round(value, 6))


def _per_task(n: int) -> int:
    """How many of ``n`` users (or items) each parallel task of a kernel takes: ``_TASKS_PER_THREAD`` tasks
    per thread (an argument of the kernels: inside one, the thread count would keep numba from caching it)."""
    tasks = numba.get_num_threads() * _TASKS_PER_THREAD
    return max(1, (n + tasks - 1) // tasks)


@intrinsic
def _float_bits(typingctx: object, value: types.Type) -> tuple[object, object] | None:
    """The bits of a float32 as a uint32 (a register move, where a view would allocate an array)."""
    if value != types.float32:
        return None

    def codegen(context: object, builder: ir.IRBuilder, signature: object, args: list[ir.Value]) -> ir.Value:
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@numba.njit(cache=True, inline="always")
def _key(score: np.float32, item: int) -> np.uint64:
    """A sort key putting higher scores first and, among equal scores, lower item codes."""
    if score == 0:
        score = np.float32(0.0)  # -0.0 ties with 0.0, as it compares
    bits = np.uint64(_float_bits(np.float32(score)))  # type: ignore[call-arg]  # the typing context is numba's
    ordered = bits ^ np.uint64(0x80000000) if bits < np.uint64(0x80000000) else ~bits & np.uint64(0xFFFFFFFF)
    return ((np.uint64(0xFFFFFFFF) - ordered) << np.uint64(32)) | np.uint64(item)


@numba.njit(cache=True)
def _best(keys: np.ndarray, limit: int) -> np.ndarray:
    """The items of the ``limit`` smallest ``_key``s, best first; only those are sorted."""
    keep = min(limit, keys.size)
    if keep < keys.size:
        keys = np.partition(keys, keep - 1)[:keep]
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)


@numba.njit(parallel=True, cache=True)
def _top_neighbours(
    user_ptr: np.ndarray,
    history_items: np.ndarray,
    history_recency: np.ndarray,
    history_strength: np.ndarray,
    seen_ptr: np.ndarray,
    seen_items: np.ndarray,
    neighbour_ptr: np.ndarray,
    neighbour_items: np.ndarray,
    neighbour_values: np.ndarray,
    n_items: int,
    limit: int,
    by_recent: bool,
    per_task: int,
) -> tuple[np.ndarray, ...]:
    n_users = user_ptr.size - 1
    out_users = np.full(n_users * limit, -1, np.int64)  # -1: an unused slot
    out_items = np.empty(n_users * limit, np.int64)
    out_total = np.empty(n_users * limit, np.float32)
    out_max = np.empty(n_users * limit, np.float32)
    out_recent = np.empty(n_users * limit, np.float32)
    out_count = np.empty(n_users * limit, np.int32)
    out_rank = np.empty(n_users * limit, np.int32)
    out_because = np.empty(n_users * limit, np.int64)
    for task in numba.prange((n_users + per_task - 1) // per_task):
        # Each neighbour's sums side by side, so that adding to them touches one or two cache lines, not
        # seven arrays: (the plain sum, the sum over sqrt(recency), the largest addition to the ranking sum,
        # the largest value) and (the user whose sums the row holds, -2 = seen by that user; the history
        # item adding the most to the ranking sum, ties: the one reached first; how many items reach it).
        sums = np.zeros((n_items, 4), np.float64)
        tags = np.full((n_items, 3), -1, np.int64)
        touched = np.empty(n_items, np.int64)
        keys = np.empty(n_items, np.uint64)
        for user in range(task * per_task, min(n_users, (task + 1) * per_task)):
            n_touched = 0
            for h in range(user_ptr[user], user_ptr[user + 1]):
                item = history_items[h]
                root = np.sqrt(np.float64(history_recency[h]))
                strength = np.float64(history_strength[h])
                for e in range(neighbour_ptr[item], neighbour_ptr[item + 1]):
                    neighbour = neighbour_items[e]
                    value = np.float64(np.float32(neighbour_values[e] * strength))
                    scaled = value / root
                    added = scaled if by_recent else value
                    row = sums[neighbour]
                    tag = tags[neighbour]
                    if tag[0] != user:
                        tag[0], tag[1], tag[2] = user, item, 1
                        row[0], row[1], row[2], row[3] = value, scaled, added, value
                        touched[n_touched] = neighbour
                        n_touched += 1
                    else:
                        if added > row[2]:
                            tag[1] = item
                            row[2] = added
                        row[0] += value
                        row[1] += scaled
                        row[3] = max(row[3], value)
                        tag[2] += 1
            for s in range(seen_ptr[user], seen_ptr[user + 1]):
                tags[seen_items[s], 0] = -2
            n_candidates = 0
            for t in range(n_touched):
                item = touched[t]
                if tags[item, 0] == user:
                    keys[n_candidates] = _key(_rounded(sums[item, 1] if by_recent else sums[item, 0]), item)
                    n_candidates += 1
            for s in range(seen_ptr[user], seen_ptr[user + 1]):
                tags[seen_items[s], 0] = -1
            chosen = _best(keys[:n_candidates], limit)
            base = user * limit
            for r in range(chosen.size):
                item = chosen[r]
                out_users[base + r] = user
                out_rank[base + r] = r + 1
                out_items[base + r] = item
                out_total[base + r] = _rounded(sums[item, 0])
                out_max[base + r] = np.float32(sums[item, 3])
                out_recent[base + r] = _rounded(sums[item, 1])
                out_count[base + r] = tags[item, 2]
                out_because[base + r] = tags[item, 1]
    return out_users, out_items, out_total, out_max, out_recent, out_count, out_rank, out_because


def _pointers(sorted_codes: np.ndarray, size: int) -> np.ndarray:
    """CSR row pointers: rows of code c are sorted_codes[ptr[c]:ptr[c + 1]]."""
    return np.searchsorted(sorted_codes, np.arange(size + 1)).astype(np.int64)


def _code_array(ids: pl.Series) -> np.ndarray:
    """The enum codes of ``ids`` as int64, the index type of the kernels' arrays."""
    return ids.to_physical().cast(pl.Int64).to_numpy()


def _codes(column: str) -> pl.Expr:
    return pl.col(column).to_physical().cast(pl.Int64)


def _user_sorted_pairs(pairs: pl.DataFrame | None) -> pl.DataFrame:
    """(user, item) codes of (user_id, item_id) pairs, sorted by user; none for None."""
    if pairs is None:
        return pl.DataFrame(schema={"user": pl.Int64, "item": pl.Int64})
    return pairs.select(user=_codes("user_id"), item=_codes("item_id")).sort("user")


def top_neighbours(
    latest: pl.DataFrame,
    seen: pl.DataFrame | None,
    table: pl.DataFrame,
    value: str,
    limit: int,
    rank_by: RankBy,
) -> pl.DataFrame:
    """Each user's ``limit`` best neighbours of their latest items.

    ``latest``: (user_id, item_id, recency, strength) with 1 = the user's latest item and strength the
    weight of the user's item (1 without event weights: the sums are then plain); ``seen``: (user_id,
    item_id) pairs never to propose, or None; ``table``: (item_id, neighbour_id, ``value``). Ids are
    enums, the users' and the items' the same in all three.

    Returns (user_code, item_code, total, max, recent, count, rank, because): per user and neighbour,
    the sum of ``value`` over the user's items, its largest value, the sum of ``value`` / sqrt(recency),
    how many of the user's items have it as a neighbour, and the code of the user's item that adds the
    most to the sum it is ranked by (the reason a list gives for it). Ranked by ``total`` or ``recent``
    (rounded to 6 decimals, ties by item), rank 1 = best.
    """
    users = latest.schema["user_id"]
    items = latest.schema["item_id"]
    assert isinstance(users, pl.Enum) and isinstance(items, pl.Enum)
    n_users, n_items = users.categories.len(), items.categories.len()
    history = latest.select(
        user=_codes("user_id"), item=_codes("item_id"), recency="recency", strength="strength"
    ).sort("user")
    pairs = _user_sorted_pairs(seen)
    edges = table.select(item=_codes("item_id"), neighbour=_codes("neighbour_id"), value=pl.col(value)).sort(
        "item", maintain_order=True
    )
    columns = _top_neighbours(
        _pointers(history["user"].to_numpy(), n_users),
        history["item"].to_numpy(),
        history["recency"].cast(pl.Int64).to_numpy(),
        history["strength"].cast(pl.Float32).to_numpy(),
        _pointers(pairs["user"].to_numpy(), n_users),
        pairs["item"].to_numpy(),
        _pointers(edges["item"].to_numpy(), n_items),
        edges["neighbour"].to_numpy(),
        edges["value"].cast(pl.Float32).to_numpy(),
        n_items,
        limit,
        rank_by == "recent",
        _per_task(n_users),
    )
    names = ("user_code", "item_code", "total", "max", "recent", "count", "rank", "because")
    return pl.DataFrame(dict(zip(names, columns, strict=True))).filter(pl.col("user_code") >= 0)


# what `merge_sources` returns after user_code and item_code: the float columns, then the integer ones
_MERGED_FLOATS = ("knn_score", "knn_max", "knn_recent", "covisit_score", "genre_score", "popular_score")
# (the four ranks first: the cut to `most` reads them by position)
_MERGED_INTS = (
    "knn_rank", "covisit_rank", "genre_rank", "popular_rank", "covisit_hits",
    "knn_because", "covisit_because", "genre_because",
)  # fmt: skip
_SOURCE_COLUMNS = {  # each source's rank (0 inside the kernel when it did not propose the item): its columns
    "knn_rank": ("knn_score", "knn_max", "knn_recent", "knn_rank", "knn_because"),
    "covisit_rank": ("covisit_score", "covisit_hits", "covisit_rank", "covisit_because"),
    "genre_rank": ("genre_score", "genre_rank", "genre_because"),
    "popular_rank": ("popular_score", "popular_rank"),
}


@numba.njit(cache=True, inline="always")
def _join(
    item: int, user: int, owner: np.ndarray, members: np.ndarray, n: int, floats: np.ndarray, ints: np.ndarray
) -> int:
    """Add ``item`` to the user's list (its row of ``floats`` and ``ints`` emptied) unless it is in it;
    the list's new length."""
    if owner[item] == user:
        return n
    owner[item] = user
    members[n] = item
    floats[item, :] = np.nan
    ints[item, :] = 0
    return n + 1


@numba.njit(parallel=True, cache=True)
def _merge_sources(
    knn_ptr: np.ndarray,
    knn_items: np.ndarray,
    knn_values: np.ndarray,
    knn_because: np.ndarray,
    covisit_ptr: np.ndarray,
    covisit_items: np.ndarray,
    covisit_values: np.ndarray,
    covisit_hits: np.ndarray,
    covisit_because: np.ndarray,
    favourite_ptr: np.ndarray,
    favourite_genres: np.ndarray,
    favourite_shares: np.ndarray,
    genre_ptr: np.ndarray,
    genre_items: np.ndarray,
    genre_popularity: np.ndarray,
    popular_items: np.ndarray,
    popular_scores: np.ndarray,
    seen_ptr: np.ndarray,
    seen_items: np.ndarray,
    n_items: int,
    genre_limit: int,
    popular_limit: int,
    most: int,
    per_task: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n_users = knn_ptr.size - 1
    out_users = np.full(n_users * most, -1, np.int64)  # -1: an unused slot
    out_items = np.empty(n_users * most, np.int64)
    out_floats = np.empty((len(_MERGED_FLOATS), n_users * most), np.float32)
    out_ints = np.empty((len(_MERGED_INTS), n_users * most), np.int32)
    for task in numba.prange((n_users + per_task - 1) // per_task):
        owner = np.full(n_items, -1, np.int64)  # the user whose list holds the item (rows of floats, ints)
        members = np.empty(n_items, np.int64)
        floats = np.empty((n_items, len(_MERGED_FLOATS)), np.float32)
        ints = np.empty((n_items, len(_MERGED_INTS)), np.int32)
        seen_by = np.full(n_items, -1, np.int64)
        genre_owner = np.full(n_items, -1, np.int64)
        genre_sum = np.empty(n_items, np.float64)
        genre_touched = np.empty(n_items, np.int64)
        genre_because = np.empty(n_items, np.int64)  # the favourite genre adding the most to genre_sum
        genre_most = np.empty(n_items, np.float64)
        keys = np.empty(n_items, np.uint64)
        for user in range(task * per_task, min(n_users, (task + 1) * per_task)):
            for s in range(seen_ptr[user], seen_ptr[user + 1]):
                seen_by[seen_items[s]] = user
            n = 0
            for e in range(knn_ptr[user], knn_ptr[user + 1]):
                item = knn_items[e]
                n = _join(item, user, owner, members, n, floats, ints)
                floats[item, 0:3] = knn_values[e]
                ints[item, 0] = e - knn_ptr[user] + 1
                ints[item, 5] = knn_because[e]
            for e in range(covisit_ptr[user], covisit_ptr[user + 1]):
                item = covisit_items[e]
                n = _join(item, user, owner, members, n, floats, ints)
                floats[item, 3] = covisit_values[e]
                ints[item, 1] = e - covisit_ptr[user] + 1
                ints[item, 4] = covisit_hits[e]
                ints[item, 6] = covisit_because[e]
            # genre: the popular items of the user's favourite genres, weighted by the genre's share
            n_genre = 0
            for f in range(favourite_ptr[user], favourite_ptr[user + 1]):
                genre = favourite_genres[f]
                for g in range(genre_ptr[genre], genre_ptr[genre + 1]):
                    item = genre_items[g]
                    if seen_by[item] == user:
                        continue
                    added = np.float64(favourite_shares[f] * genre_popularity[g])
                    if genre_owner[item] != user:
                        genre_owner[item] = user
                        genre_sum[item] = 0.0
                        genre_touched[n_genre] = item
                        n_genre += 1
                        genre_because[item] = genre
                        genre_most[item] = added
                    elif added > genre_most[item]:
                        genre_because[item] = genre
                        genre_most[item] = added
                    genre_sum[item] += added
            for t in range(n_genre):
                keys[t] = _key(_rounded(genre_sum[genre_touched[t]]), genre_touched[t])
            chosen = _best(keys[:n_genre], genre_limit)
            for r in range(chosen.size):
                item = chosen[r]
                n = _join(item, user, owner, members, n, floats, ints)
                floats[item, 4] = _rounded(genre_sum[item])
                ints[item, 2] = r + 1
                ints[item, 7] = genre_because[item]
            # popular: the list as it comes (best first, ties by item), without what the user has seen
            rank = 0
            for p in range(popular_items.size):
                if rank == popular_limit:
                    break
                item = popular_items[p]
                if seen_by[item] == user:
                    continue
                rank += 1
                n = _join(item, user, owner, members, n, floats, ints)
                floats[item, 5] = popular_scores[p]
                ints[item, 3] = rank
            # past `most`, the user keeps the items some source ranks highest (a round robin of sources)
            for m in range(n):
                item = members[m]
                best = np.int32(2**31 - 1)
                for source in range(4):
                    if ints[item, source] > 0:
                        best = min(best, ints[item, source])
                keys[m] = (np.uint64(best) << np.uint64(32)) | np.uint64(item)
            chosen = _best(keys[:n], most)
            base = user * most
            for r in range(chosen.size):
                item = chosen[r]
                out_users[base + r] = user
                out_items[base + r] = item
                out_floats[:, base + r] = floats[item]
                out_ints[:, base + r] = ints[item]
    return out_users, out_items, out_floats, out_ints


def merge_sources(
    knn: pl.DataFrame,
    covisit: pl.DataFrame,
    favourite: pl.DataFrame,
    genre_popular: pl.DataFrame,
    popular: pl.DataFrame,
    seen: pl.DataFrame | None,
    genre_limit: int,
    most: int,
) -> pl.DataFrame:
    """Each user's candidates from the four sources, at most ``most`` of them.

    ``knn`` and ``covisit``: ``top_neighbours`` results, ranked; ``favourite``: (user_id, genre,
    share), the genres whose popular items the user gets, ``genre_popular``: (genre, item_id,
    genre_popularity), their items; genre scores are the share-weighted sums of popularity, the
    ``genre_limit`` best kept. ``popular``: (item_id, popular_score), proposed to every user by
    score (ties by item). Nothing ``seen`` (user_id, item_id) is proposed. Past ``most``, the items
    with the best rank in any source stay, ties by item.

    Returns user_code, item_code and per source its score and rank columns (see candidates.SOURCES)
    plus knn_max, knn_recent and covisit_hits, null where the source did not propose the item, and what a
    list says it was proposed for: knn_because and covisit_because, the code of the user's item that
    added the most to its neighbour sum, and genre_because, the favourite genre that added the most.
    Ids are enums: the users' of ``favourite`` and the items' of ``popular`` are the others' too.
    """
    users = favourite.schema["user_id"]
    items = popular.schema["item_id"]
    assert isinstance(users, pl.Enum) and isinstance(items, pl.Enum)
    n_users, n_items = users.categories.len(), items.categories.len()
    genres = pl.Enum(pl.concat([favourite["genre"], genre_popular["genre"]]).unique().sort())
    favourite = favourite.select(user=_codes("user_id"), genre=pl.col("genre").cast(genres), share="share").sort("user")
    genre_popular = genre_popular.select(
        genre=pl.col("genre").cast(genres), item=_codes("item_id"), popularity="genre_popularity"
    ).sort("genre")
    popular = popular.select(item=_codes("item_id"), score="popular_score").sort(
        "score", "item", descending=[True, False]
    )
    seen_pairs = _user_sorted_pairs(seen)
    users_found, items_found, floats, ints = _merge_sources(
        _pointers(knn["user_code"].to_numpy(), n_users),
        knn["item_code"].to_numpy(),
        knn.select("total", "max", "recent").to_numpy(order="c"),
        knn["because"].to_numpy(),
        _pointers(covisit["user_code"].to_numpy(), n_users),
        covisit["item_code"].to_numpy(),
        covisit["recent"].to_numpy(),
        covisit["count"].to_numpy(),
        covisit["because"].to_numpy(),
        _pointers(favourite["user"].to_numpy(), n_users),
        _code_array(favourite["genre"]),
        favourite["share"].cast(pl.Float32).to_numpy(),
        _pointers(_code_array(genre_popular["genre"]), genres.categories.len()),
        genre_popular["item"].to_numpy(),
        genre_popular["popularity"].cast(pl.Float32).to_numpy(),
        popular["item"].to_numpy(),
        popular["score"].cast(pl.Float32).to_numpy(),
        _pointers(seen_pairs["user"].to_numpy(), n_users),
        seen_pairs["item"].to_numpy(),
        n_items,
        genre_limit,
        popular.height,
        most,
        _per_task(n_users),
    )
    merged = pl.DataFrame(
        {
            "user_code": users_found,
            "item_code": items_found,
            **{name: floats[i] for i, name in enumerate(_MERGED_FLOATS)},
            **{name: ints[i] for i, name in enumerate(_MERGED_INTS)},
        }
    )
    kept = merged.filter(pl.col("user_code") >= 0).select(
        "user_code",
        "item_code",
        *(
            pl.when(pl.col(rank) > 0).then(pl.col(column)).alias(column)
            for rank, columns in _SOURCE_COLUMNS.items()
            for column in columns
        ),
    )
    physical = pl.Series(dtype=genres).to_physical().dtype  # codes as an enum: no text per candidate
    return kept.with_columns(pl.col("genre_because").cast(physical).cat.to(genres))


@numba.njit(parallel=True, cache=True)
def _top_rows(
    user_ptr: np.ndarray, rows: np.ndarray, items: np.ndarray, scores: np.ndarray, n_items: int, k: int, per_task: int
) -> np.ndarray:
    n_users = user_ptr.size - 1
    out = np.full(n_users * k, -1, np.int64)  # -1: an unused slot
    for task in numba.prange((n_users + per_task - 1) // per_task):
        row_of = np.empty(n_items, np.int64)
        for user in range(task * per_task, min(n_users, (task + 1) * per_task)):
            first, last = user_ptr[user], user_ptr[user + 1]
            keys = np.empty(last - first, np.uint64)
            for j in range(first, last):
                row = rows[j]
                row_of[items[row]] = row
                keys[j - first] = _key(scores[row], items[row])
            best = _best(keys, k)
            for r in range(best.size):
                out[user * k + r] = row_of[best[r]]
    return out


@numba.njit(cache=True)
def _group_rows(codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(pointers, rows): a counting sort of row numbers by code; rows of code c are rows[ptr[c]:ptr[c + 1]]."""
    ptr = np.zeros(n_groups + 1, np.int64)
    for code in codes:
        ptr[code + 1] += 1
    ptr = np.cumsum(ptr)
    fill = ptr[:-1].copy()
    rows = np.empty(codes.size, np.int64)
    for row in range(codes.size):
        rows[fill[codes[row]]] = row
        fill[codes[row]] += 1
    return ptr, rows


def top_rows(users: pl.Series, items: pl.Series, scores: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of each user's ``k`` highest ``scores`` (float32; ties by item), users in code order
    and each user's rows best first. ``users`` and ``items`` are enums, an item at most once per user."""
    assert isinstance(users.dtype, pl.Enum) and isinstance(items.dtype, pl.Enum)
    user_ptr, rows = _group_rows(_code_array(users), users.dtype.categories.len())
    found = _top_rows(
        user_ptr,
        rows,
        _code_array(items),
        scores.astype(np.float32),
        items.dtype.categories.len(),
        k,
        _per_task(user_ptr.size - 1),
    )
    return found[found >= 0]


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
        _code_array(candidates["user_id"]),
        _code_array(candidates["item_id"]),
        _pointers(edges["item"].to_numpy(), items.categories.len()),
        edges["genre"].to_numpy(),
        dense,
    )
    return pl.Series("genre_affinity", affinity)


@numba.njit(parallel=True, cache=True)
def _item_pairs(
    user_ptr: np.ndarray,
    user_items: np.ndarray,
    user_seen: np.ndarray,
    user_strengths: np.ndarray,
    item_ptr: np.ndarray,
    item_users: np.ndarray,
    item_seen: np.ndarray,
    item_strengths: np.ndarray,
    cosine: bool,
    min_support: int,
    cutoff: int,
    per_day: float,
    limit: int,
    per_task: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item, the sums over its users' other items, each item's ``limit`` best kept: with ``cosine``,
    strength x strength over the norms' product (pairs of ``min_support`` users or more); else the
    co-visit weight (``covisitation``)."""
    n_items = item_ptr.size - 1
    norms = np.zeros(n_items, np.float64)
    if cosine:
        for item in range(n_items):
            for e in range(item_ptr[item], item_ptr[item + 1]):
                norms[item] += item_strengths[e] * item_strengths[e]
    out_items = np.full(n_items * limit, -1, np.int64)  # -1: an unused slot
    out_neighbours = np.empty(n_items * limit, np.int64)
    out_values = np.empty(n_items * limit, np.float32)
    for task in numba.prange((n_items + per_task - 1) // per_task):
        total = np.zeros(n_items, np.float64)
        support = np.zeros(n_items, np.int64)
        owner = np.full(n_items, -1, np.int64)  # the item whose sums a slot holds
        value = np.empty(n_items, np.float32)
        touched = np.empty(n_items, np.int64)
        keys = np.empty(n_items, np.uint64)
        for item in range(task * per_task, min(n_items, (task + 1) * per_task)):
            n_touched = 0
            for e in range(item_ptr[item], item_ptr[item + 1]):
                user = item_users[e]
                seen = item_seen[e]
                # as polars computes it: whole seconds (truncated), then days
                decayed = 0.0 if cosine else np.exp(-(np.float64((cutoff - seen) // 1_000_000) / 86_400.0) * per_day)
                for f in range(user_ptr[user], user_ptr[user + 1]):
                    other = user_items[f]
                    if other == item:
                        continue
                    if owner[other] != item:
                        owner[other] = item
                        total[other] = 0.0
                        support[other] = 0
                        touched[n_touched] = other
                        n_touched += 1
                    if cosine:
                        total[other] += item_strengths[e] * user_strengths[f]
                    else:
                        gap = np.float64(abs(seen - user_seen[f]) // 1_000_000) / 86_400.0
                        total[other] += decayed * user_strengths[f] / (1.0 + gap)
                    support[other] += 1
            n_candidates = 0
            for t in range(n_touched):
                other = touched[t]
                if support[other] >= min_support:
                    summed = total[other] / np.sqrt(norms[item] * norms[other]) if cosine else total[other]
                    value[other] = _rounded(summed)
                    keys[n_candidates] = _key(value[other], other)
                    n_candidates += 1
            chosen = _best(keys[:n_candidates], limit)
            base = item * limit
            for r in range(chosen.size):
                out_items[base + r] = item
                out_neighbours[base + r] = chosen[r]
                out_values[base + r] = value[chosen[r]]
    return out_items, out_neighbours, out_values


def _item_pair_table(
    frame: pl.DataFrame, name: str, cosine: bool, min_support: int, cutoff: int, per_day: float, limit: int
) -> pl.DataFrame:
    """``_item_pairs`` over ``frame`` (user_id, item_id, strength, and for co-visits last_seen) as
    (item_id, neighbour_id, ``name``), ids as text, each item's best first."""
    items = pl.Enum(frame["item_id"].cast(pl.String).unique().sort())
    # Codes in the ids' sorted order, as a dense rank gives them, without ranking every row's text.
    users = pl.Enum(frame["user_id"].cast(pl.String).unique().sort())
    seen = pl.col("last_seen").dt.cast_time_unit("us").dt.replace_time_zone(None) if not cosine else pl.lit(0)
    coded = frame.select(
        user=pl.col("user_id").cast(pl.String).cast(users).to_physical().cast(pl.Int64),
        item=pl.col("item_id").cast(pl.String).cast(items).to_physical().cast(pl.Int64),
        seen=seen.cast(pl.Int64),
        strength=pl.col("strength").cast(pl.Float64),
    )
    by_user = coded.sort("user", "item")
    by_item = coded.sort("item", "user")
    found_items, neighbours, values = _item_pairs(
        _pointers(by_user["user"].to_numpy(), users.categories.len()),
        by_user["item"].to_numpy(),
        by_user["seen"].to_numpy(),
        by_user["strength"].to_numpy(),
        _pointers(by_item["item"].to_numpy(), items.categories.len()),
        by_item["user"].to_numpy(),
        by_item["seen"].to_numpy(),
        by_item["strength"].to_numpy(),
        cosine,
        min_support,
        cutoff,
        per_day,
        limit,
        _per_task(items.categories.len()),
    )
    kept = found_items >= 0
    names = items.categories
    return pl.DataFrame(
        {"item_id": names.gather(found_items[kept]), "neighbour_id": names.gather(neighbours[kept]), name: values[kept]}
    )


def item_similarity(history: pl.DataFrame, min_support: int, limit: int) -> pl.DataFrame:
    """(item_id, neighbour_id, similarity): each item's ``limit`` most cosine-similar items over the users'
    histories (``history``: user_id, item_id, strength; an item at most once per user, its cell the strength),
    pairs shared by at least ``min_support`` users; best first, ties by neighbour id. Ids are text.

    Per item, its users' items are summed in scratch arrays indexed by item code, as ``_top_neighbours``
    does, so memory never holds the (user, item, item) rows of a self-join, whose count grows with users
    times history squared.
    """
    return _item_pair_table(history, "similarity", True, min_support, 0, 0.0, limit)


def covisitation(recent: pl.DataFrame, cutoff: datetime, half_life_days: float, limit: int) -> pl.DataFrame:
    """(item_id, neighbour_id, covisit_weight): each item's ``limit`` heaviest co-visited items (ties by
    neighbour id). ``recent``: (user_id, item_id, last_seen, strength), an item at most once per user. A
    co-visit of item i with the user's item j weighs the decay of i's last_seen before ``cutoff`` (halving
    every ``half_life_days``) times j's strength, over 1 + the days between the two; summed per pair,
    rounded to 6 decimals. Summed per item like ``item_similarity``, never holding the pairs."""
    cutoff_us = int(pl.Series([cutoff]).dt.cast_time_unit("us").dt.replace_time_zone(None).cast(pl.Int64)[0])
    per_day = 0.6931471805599453 / half_life_days
    return _item_pair_table(recent, "covisit_weight", False, 1, cutoff_us, per_day, limit)


@numba.njit(cache=True, inline="always")
def _jaccard(pointers: np.ndarray, tokens: np.ndarray, a: int, b: int) -> float:
    i, i_end = pointers[a], pointers[a + 1]
    j, j_end = pointers[b], pointers[b + 1]
    union = (i_end - i) + (j_end - j)
    if union == 0:
        return 0.0
    shared = 0
    while i < i_end and j < j_end:
        if tokens[i] == tokens[j]:
            shared += 1
            i += 1
            j += 1
        elif tokens[i] < tokens[j]:
            i += 1
        else:
            j += 1
    return shared / (union - shared)


@numba.njit(parallel=True, cache=True)
def mmr_positions(
    user_ptr: np.ndarray,
    items: np.ndarray,
    scores: np.ndarray,
    pointers: np.ndarray,
    tokens: np.ndarray,
    k: int,
    strength: float,
) -> np.ndarray:
    """Per user (rows user_ptr[u]:user_ptr[u+1], best score first), the pool positions in MMR order
    (``jobs.diversity.rerank``): -1 where a user's pool is smaller than k."""
    n_users = user_ptr.size - 1
    out = np.full(n_users * k, -1, np.int64)
    for user in numba.prange(n_users):
        first, last = user_ptr[user], user_ptr[user + 1]
        size = last - first
        high, low = scores[first], scores[last - 1]
        spread = high - low
        taken = np.zeros(size, np.bool_)
        similarity = np.zeros(size)  # of each candidate to the items taken, summed
        for position in range(min(k, size)):
            best, best_value = -1, -np.inf
            for c in range(size):
                if taken[c]:
                    continue
                relevance = (scores[first + c] - low) / spread if spread > 0 else 1.0
                mean = similarity[c] / position if position > 0 else 0.0
                value = (1.0 - strength) * relevance - strength * mean
                if value > best_value:  # strictly: among equals the better-scored candidate stays
                    best, best_value = c, value
            taken[best] = True
            out[user * k + position] = first + best
            for c in range(size):
                if not taken[c]:
                    similarity[c] += _jaccard(pointers, tokens, items[first + best], items[first + c])
    return out
