"""Wire formats shared by the REST routes and the event streams."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from decnet_attr.store import AttributionView, StateRow

__all__ = ["IDENTITY_TIME_FIELDS", "attribution_row", "identity_entry", "iso_utc"]

#: Identity fields given as ISO-8601 UTC strings.
IDENTITY_TIME_FIELDS = ("first_seen_at", "last_seen_at", "created_at", "updated_at")


def iso_utc(ts: float | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC string with microseconds and ``Z``
    (``1970-01-01T00:00:50.000000Z``); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def attribution_row(row: AttributionView | StateRow) -> dict[str, Any]:
    """One attribution row (the attribution endpoint's, the identity's, a
    snapshot's): exactly these seven keys, in this order."""
    return {
        "primitive": row.primitive,
        "current_value": orjson.loads(row.current_value_json),
        "state": row.state,
        "confidence": row.confidence,
        "observation_count": row.observation_count,
        "last_change_ts": row.last_change_ts,
        "last_observation_ts": row.last_observation_ts,
    }


def identity_entry(row: dict[str, Any]) -> dict[str, Any]:
    """An identity as the store gives it, its times as ISO-8601 UTC."""
    out = dict(row)
    for key in IDENTITY_TIME_FIELDS:
        if key in out:
            out[key] = iso_utc(out[key])
    return out
