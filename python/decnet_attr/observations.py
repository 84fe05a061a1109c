"""The one observation validator, with the service's settings.

HTTP ingest and the worker both call :func:`validate`; the rules live in
Rust (``rust/src/core/validate.rs``, table in the README). The result is a
:class:`ValidatedBatch`: Python moves it as one object and asks it for the
bus payloads, the rows to store and the engine's input.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from decnet_attr._core import (
    InvalidJSONError,
    TooManyItemsError,
    ValidatedBatch,
    ndjson_lines,
    normalise_ip,
    rejection_codes,
    validate_observations,
)
from decnet_attr.config import Settings

#: Input at least this large (an HTTP body, a worker's fetch) is validated
#: on a thread: the Rust pass releases the GIL, so the event loop goes on
#: serving meanwhile; below it, the hop to a thread costs more than it frees.
OFF_LOOP_BYTES = 64 * 1024

__all__ = [
    "OFF_LOOP_BYTES",
    "InvalidJSONError",
    "TooManyItemsError",
    "ValidatedBatch",
    "ndjson_lines",
    "normalise_ip",
    "rejection_codes",
    "validate",
]


def validate(
    data: bytes,
    settings: Settings,
    *,
    envelopes: Sequence[tuple[str | None, str | None]] | None = None,
    source: str | None = None,
    id_prefix: str | None = None,
    api: bool = False,
    max_items: int | None = None,
    now: float | None = None,
    ndjson: bool = False,
) -> ValidatedBatch:
    """Validate ``data`` (JSON array, one object or NDJSON; with ``ndjson``,
    NDJSON whatever it starts with: each line of ``ndjson_lines`` one item,
    and never an error for the body as a whole).

    ``api=True`` is the HTTP API's form: missing ids come from ``id_prefix``,
    evidence refs default to ``api:<id>``, ``confidence`` to 1.0 and
    ``window`` to ``{ts, ts}``. Bus events default the evidence ref to
    ``obs:<id>`` and take the id from their envelope (``envelopes``).
    """
    ts_max = None
    if settings.ts_max_ahead > 0:
        ts_max = (time.time() if now is None else now) + settings.ts_max_ahead
    return validate_observations(
        data,
        envelopes=list(envelopes) if envelopes is not None else None,
        max_value_bytes=settings.max_value_bytes,
        ts_min=settings.ts_min,
        ts_max=ts_max,
        id_prefix=id_prefix,
        evidence_prefix="api:" if api else "obs:",
        default_source=source,
        fill_defaults=api,
        max_items=max_items,
        ndjson=ndjson,
    )
