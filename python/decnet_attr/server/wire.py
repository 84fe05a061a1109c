"""Wire formats shared by the REST routes and the event streams."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["iso_utc"]


def iso_utc(ts: float | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC string with microseconds and ``Z``
    (``1970-01-01T00:00:50.000000Z``); None stays None."""
    if ts is None:
        return None
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )
