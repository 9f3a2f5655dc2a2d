"""The batch side: the nightly steps, monitoring, rollouts and the ``overnight`` CLI."""

import os

# Polars' allocator (jemalloc) hands freed pages back to the system after half a second, so every chunk of a
# step faults its hundreds of MB in again: a fifth of scoring's CPU went to the kernel. Kept for jemalloc's own
# default of ten seconds, a step reuses them, for a few hundred MB more at its peak (docs/scale.md#bounded-memory). Read
# once, when polars is first imported; a value set in the environment wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:10000,muzzy_decay_ms:10000")
