"""Process-wide settings for the long-running commands (``serve``, ``worker``)."""

from __future__ import annotations

import gc

#: Young-generation threshold: net allocations between young collections.
GC_THRESHOLD0 = 20_000
#: Young collections per middle-generation collection.
GC_THRESHOLD1 = 50
#: Middle collections per full collection.
GC_THRESHOLD2 = 100


def tune_gc() -> tuple[int, int, int]:
    """Collect less often, and never scan what start-up allocated.

    Every batch allocates thousands of short-lived rows, payloads and
    futures. With CPython's defaults (700, 10, 10) that means a young
    collection every few hundred observations. It also means a full
    collection every time the long-lived heap grows by a quarter. A full
    collection walks every tracked object, and with a warm process that
    pauses the event loop for 20–70 ms. The worker benchmark's worst
    latencies lined up with those pauses. Objects alive at start-up
    (modules, the registry, configuration) are frozen out of collection.
    Cyclic garbage is still collected; it just waits longer.

    Returns the previous thresholds."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, GC_THRESHOLD1, GC_THRESHOLD2)
    return before
