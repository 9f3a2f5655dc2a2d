"""What the batch side and the serving side agree on besides the tables: limits and names both check."""

from collections.abc import Sequence, Set
from operator import itemgetter
from typing import Final, Literal, get_args

# The longest user or item id: ingest quarantines longer ones, so no batch holds one; the lookup
# service takes user ids this long by default (OVERNIGHT_MAX_USER_ID_LENGTH) and feedback item ids.
MAX_ID_LENGTH: Final = 256

# What a batch is for (overnight.batches.kind): the night's lists (served when live), a canary's
# lists (served to the canary's share of users), or a shadow's (never served).
BatchKind = Literal["serving", "canary", "shadow"]
NIGHTLY_BATCH: Final = "serving"
CANARY_BATCH: Final = "canary"
SHADOW_BATCH: Final = "shadow"

# Which batch answered a lookup (overnight.served_predictions.variant, the X-Variant header): the live
# batch, or the canary's for the canary's share of users.
Variant = Literal["production", "canary"]
PRODUCTION_VARIANT: Final = "production"
CANARY_VARIANT: Final = "canary"

# What a user did with an item (POST /v1/events, overnight.feedback_events.event_type, whose CHECK in
# migration 0006 lists the same); OVERNIGHT_FEEDBACK_WEIGHTS gives some of them a weight for ingest.
FeedbackEventType = Literal["impression", "click", "conversion"]
FEEDBACK_EVENT_TYPES: Final[tuple[FeedbackEventType, ...]] = get_args(FeedbackEventType)

# Why an item is in a user's published list (`?explain=true`). A batch published with explanations has,
# beside each user's item_ids, reason_codes (bytea: two bytes an item, big-endian, the source's index in
# REASON_SOURCES << REASON_SOURCE_SHIFT | the index in reason_refs of what it names) and reason_refs (text[]:
# the distinct user's items and genres the reasons name, sorted). "trending" (the recent popular list)
# names nothing; "covisit" and "knn" name the user's item that added the most to the item's neighbour
# sum; "genre" names the user's favourite genre that added the most to its genre score.
REASON_SOURCES: Final = ("trending", "covisit", "knn", "genre")
REASON_SOURCE_SHIFT: Final = 14
REASON_REF_MASK: Final = (1 << REASON_SOURCE_SHIFT) - 1


def decode_reasons(codes: bytes, refs: Sequence[str]) -> list[dict[str, str]]:
    """The reasons of a list's items, in its order: {"source": ...} and, for an item-to-item source, the
    "item_id" it names, for "genre" the "genre"."""
    reasons: list[dict[str, str]] = []
    for index in range(0, len(codes), 2):
        code = (codes[index] << 8) | codes[index + 1]
        source = REASON_SOURCES[code >> REASON_SOURCE_SHIFT]
        if source == "trending":
            reasons.append({"source": source})
        else:
            reasons.append(
                {"source": source, "genre" if source == "genre" else "item_id": refs[code & REASON_REF_MASK]}
            )
    return reasons


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
