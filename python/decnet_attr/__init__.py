"""decnet-attr: Rust-accelerated attacker attribution for honeypot networks.

Wire-compatible with DECNET's attribution engine (v0 merger rules, topics,
REST and SSE shapes) and faster, exact and durable.
"""

from __future__ import annotations

from collections.abc import Sequence

from decnet_attr._core import (
    REGISTRY_VERSION,
    STATES,
    AttributionState,
    ChangeRecord,
    DecnetAttrError,
    Engine,
    IngestResult,
    InvalidJSONError,
    RejectedItem,
    Thresholds,
    __version__,
    aggregate_observations,
)
from decnet_attr.registry import value_kind_for

Sequence.register(IngestResult)

__all__ = [
    "REGISTRY_VERSION",
    "STATES",
    "AttributionState",
    "ChangeRecord",
    "DecnetAttrError",
    "Engine",
    "IngestResult",
    "InvalidJSONError",
    "RejectedItem",
    "Thresholds",
    "__version__",
    "aggregate_observations",
    "value_kind_for",
]
