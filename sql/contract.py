"""What the batch side and the serving side agree on besides the tables: limits and names both check."""

from collections.abc import Sequence
from typing import Final, Literal, get_args

# The longest user or item id: ingest quarantines longer ones, so no batch holds one; the lookup
# service takes user ids this long by default (OVERNIGHT_MAX_USER_ID_LENGTH) and feedback item ids.
MAX_ID_LENGTH: Final = 256

# What a batch is for (overnight.batches.kind): the night's lists (served when live), a canary's
# lists (served to the canary's share of users), or a shadow's (never served). The kind says where a batch
# came from and never changes; its status (overnight.batches.status) says what it is doing now:
#   kind     statuses it can have
#   serving  loading -> ready -> live -> retired, failed, dropped; "canary" while a canary serves it (a
#            published night's batch, `overnight canary start batch B`)
#   canary   loading -> ready (scored by a canary's model) -> canary while served -> live once promoted,
#            retired, failed, dropped
#   shadow   loading -> shadow (validated, never served), failed, dropped
# So the word canary is a kind (lists a canary's model scored) and a status (any batch a canary serves now),
# and, as a Variant below, which batch answered a lookup.
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
