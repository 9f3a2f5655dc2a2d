"""How a session answer (POST /v1/recommendations:session) is blended from precomputed neighbour lists:
the lookup service answers with it and `overnight evaluate` measures it, so both score the same answer."""

from collections.abc import Sequence, Set
from operator import itemgetter
from typing import Final

# Session recommendations (POST /v1/recommendations:session) are combined at request time by the service
# and the same way by `overnight evaluate` when it measures them, so both use `blend_session`.
# The i-th most recent item's neighbours count SESSION_RECENCY_DECAY ** i as much as the latest item's.
SESSION_RECENCY_DECAY: Final = 0.7
# With a known user, their own precomputed list counts this much against the whole session's.
SESSION_USER_WEIGHT: Final = 1.0

Ranked = tuple[Sequence[str], Sequence[float]]


def blend_session(
    neighbours: Sequence[Ranked | None],
    leave_out: Set[str],
    user_list: Sequence[str] = (),
) -> list[tuple[str, float]]:
    """Every item the session's neighbour lists propose, best first, with its blended score.

    `neighbours` has one list per session item, most recent first (None for an item without one); their
    scores are similarities, never negative. Each list's scores are divided by its best, weighted by
    recency, summed over the lists and divided by the weights' sum. A known user's own list (`user_list`,
    best first: ranker scores are not comparable across users, so only its order counts) adds
    SESSION_USER_WEIGHT * (1 - position / length). Items in `leave_out` (the session's own, the excluded)
    are left out; ties keep the order in which the lists (most recent item's first) proposed the items,
    so an answer repeats exactly."""
    totals: dict[str, float] = {}
    weight_sum = sum(SESSION_RECENCY_DECAY**position for position in range(len(neighbours)))
    for position, ranked in enumerate(neighbours):
        if ranked is None or not ranked[0]:
            continue
        item_ids, scores = ranked
        best = max(scores)
        if best <= 0:
            continue
        scale = SESSION_RECENCY_DECAY**position / (best * weight_sum)
        scaled = [score * scale for score in scores]
        if not totals:
            # The first list in one step (a list names each item once; if not, it is summed as the others).
            totals = dict(zip(item_ids, scaled, strict=True))
            if len(totals) == len(scaled):
                continue
            totals = {}
        get = totals.get
        for item_id, score in zip(item_ids, scaled, strict=True):
            totals[item_id] = get(item_id, 0.0) + score
    if user_list:
        get = totals.get
        length = len(user_list)
        for position, item_id in enumerate(user_list):
            totals[item_id] = get(item_id, 0.0) + SESSION_USER_WEIGHT * (1 - position / length)
    # Left out last: taking an item out changes no other item's score nor the order they came in.
    for item_id in leave_out:
        totals.pop(item_id, None)
    # A stable sort: ties keep the order the lists first proposed the items in, so an answer repeats exactly.
    return sorted(totals.items(), key=itemgetter(1), reverse=True)
