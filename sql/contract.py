"""What the batch side and the serving side agree on besides the tables: limits and names both check."""

from typing import Final, Literal

# The longest user or item id: ingest quarantines longer ones, so no batch holds one; the lookup
# service takes user ids this long by default (OVERNIGHT_MAX_USER_ID_LENGTH) and feedback item ids.
MAX_ID_LENGTH: Final = 256

# What a batch is for (overnight.batches.kind): the night's lists (served when live), a canary's
# lists (served to the canary's share of users), or a shadow's (never served).
BatchKind = Literal["serving", "canary", "shadow"]
NIGHTLY_BATCH: Final = "serving"
CANARY_BATCH: Final = "canary"
SHADOW_BATCH: Final = "shadow"
