"""A DECNET-style baseline in pure Python: per observation, the whole
(identity, primitive) series is reloaded and the v0 merger recomputed
(docs/decnet.md#attribution-worker). The merger itself is the project's oracle
(tests/oracle.py), written from the same rules."""

from __future__ import annotations

from typing import Any

from tests import oracle


def series(primitive: str, length: int) -> list[dict[str, Any]]:
    values = ["typed", "typed", "typed", "pasted"]
    return [{"value": values[i % 4], "ts": float(i), "confidence": 1.0} for i in range(length)]


def merge_per_observation(history: list[dict[str, Any]], n: int) -> None:
    """Merge `n` new observations DECNET's way: append, reload the full
    series (copy, like a SELECT), sort by ts, recompute."""
    stored = list(history)
    for i in range(n):
        stored.append({"value": "typed", "ts": float(len(history) + i), "confidence": 1.0})
        loaded = sorted((dict(o) for o in stored), key=lambda o: o["ts"])
        oracle.aggregate(loaded, "categorical")
        stored.pop()  # keep the series length constant
