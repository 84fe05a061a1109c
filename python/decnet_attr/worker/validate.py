"""Checks on observation events arriving on ``attacker.observation.<p>``.

The primitive comes from the topic (the transport), and a payload that names
another one is refused (reference §10.1.14); required fields, types and
sizes are checked before anything touches the store, so a hostile event is a
dead letter with a reason, never a crash.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from decnet_attr.bus.base import UNDECODABLE
from decnet_attr.registry import is_known, note_unknown, value_kind_for
from decnet_attr.store.base import ObservationRow
from decnet_attr.topics import primitive_from_topic

MAX_NAME = 128
MAX_SOURCE = 512
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Rejected(ValueError):
    """An event that cannot be merged; the message is the dead-letter reason."""


@dataclass(frozen=True)
class CheckedObservation:
    row: ObservationRow
    value: Any
    attacker_ip: str | None


_TOPICS: dict[str, tuple[str | None, bool, bool]] = {}


def _topic_info(topic: str) -> tuple[str | None, bool, bool]:
    """(primitive, known, numeric) of a topic, cached: a fleet publishes on a
    few dozen topics, so validating each topic string once is enough."""
    info = _TOPICS.get(topic)
    if info is None:
        primitive = primitive_from_topic(topic)
        known = primitive is not None and is_known(primitive)
        numeric = primitive is not None and value_kind_for(primitive) == "numeric"
        info = (primitive, known, numeric)
        if len(_TOPICS) < 10_000:
            _TOPICS[topic] = info
    return info


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numeric_ok(v: Any) -> bool:
    """Mirror of the engine's float conversion for numeric primitives."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, (int, float)):
        try:
            return math.isfinite(float(v))
        except OverflowError:
            return False
    if isinstance(v, str):
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False
    return False


def check_observation(
    topic: str,
    payload: Any,
    event_id: str,
    *,
    max_value_bytes: int,
    accept_unknown: bool = False,
    identity_uuid: str | None = None,
) -> CheckedObservation:
    """Validate one observation event; raise :class:`Rejected` with a reason."""
    primitive, known, numeric = _topic_info(topic)
    if primitive is None:
        raise Rejected(f"topic {topic[:200]!r} is not attacker.observation.<primitive>")
    if not isinstance(payload, dict):
        raise Rejected(f"payload must be an object, got {type(payload).__name__}")
    if UNDECODABLE in payload:
        raise Rejected(f"undecodable message: {payload.get('error', '?')}")
    named = payload.get("primitive", primitive)
    if named != primitive:
        raise Rejected(
            f"payload primitive {str(named)[:200]!r} does not match topic primitive {primitive!r}"
        )
    if not known:
        note_unknown(primitive)
        if not accept_unknown:
            raise Rejected(f"unknown primitive {primitive!r}")
    attacker = payload.get("attacker_uuid")
    if not isinstance(attacker, str) or not attacker or len(attacker) > MAX_NAME:
        raise Rejected("attacker_uuid must be a non-empty string of at most 128 characters")
    if "value" not in payload:
        raise Rejected("missing field value")
    value = payload["value"]
    raw_ts = payload.get("ts")
    if not _finite(raw_ts):
        raise Rejected("ts must be a finite number")
    ts = float(raw_ts)  # type: ignore[arg-type]  # _finite() checked it
    try:
        value_json = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise Rejected(f"value is not JSON: {exc}") from None
    if len(value_json) > max_value_bytes:
        raise Rejected(f"value is {len(value_json)} bytes, above the limit of {max_value_bytes}")
    if numeric and not _numeric_ok(value):
        raise Rejected(
            f"{primitive} is numeric but the value {value_json[:80]} is not a finite number"
        )
    confidence = payload.get("confidence")
    if confidence is not None and not (_finite(confidence) and 0.0 <= confidence <= 1.0):
        raise Rejected("confidence must be a number in [0, 1]")
    oid = payload.get("id") or event_id
    if not isinstance(oid, str) or not _ID_RE.match(oid):
        raise Rejected("id must be 1-128 characters of [A-Za-z0-9_.:-]")
    evidence = payload.get("evidence_ref") or f"obs:{oid}"
    if not isinstance(evidence, str) or len(evidence) > MAX_SOURCE:
        raise Rejected("evidence_ref must be a string of at most 512 characters")
    source = payload.get("source")
    if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE):
        raise Rejected("source must be a string of at most 512 characters")
    identity_ref = payload.get("identity_ref")
    if identity_ref is not None and (
        not isinstance(identity_ref, str) or len(identity_ref) > MAX_NAME
    ):
        raise Rejected("identity_ref must be a string")
    window = payload.get("window")
    w_start: float | None = None
    w_end: float | None = None
    if window is not None:
        if (
            not isinstance(window, dict)
            or not _finite(window.get("start_ts"))
            or not _finite(window.get("end_ts"))
        ):
            raise Rejected("window must be {start_ts, end_ts} numbers")
        w_start, w_end = float(window["start_ts"]), float(window["end_ts"])
        if w_end < w_start:
            raise Rejected("window end_ts is before start_ts")
    ip = payload.get("attacker_ip")
    if ip is not None and (not isinstance(ip, str) or len(ip) > 64):
        raise Rejected("attacker_ip must be a string")
    for name, text in (
        ("attacker_uuid", attacker),
        ("id", oid),
        ("evidence_ref", evidence),
        ("source", source),
        ("identity_ref", identity_ref),
        ("attacker_ip", ip),
    ):
        # PostgreSQL text cannot hold NUL: one such field would fail the whole batch
        if text is not None and "\x00" in text:
            raise Rejected(f"{name} contains a NUL character")
    version = payload.get("v", 1)
    row = ObservationRow(
        id=oid,
        attacker_uuid=attacker,
        primitive=primitive,
        value_json=value_json,
        ts=ts,
        evidence_ref=evidence,
        confidence=None if confidence is None else float(confidence),
        window_start_ts=w_start,
        window_end_ts=w_end,
        source=source,
        identity_ref=identity_ref,
        envelope_v=version if isinstance(version, int) and not isinstance(version, bool) else 1,
        identity_uuid=identity_uuid,
    )
    return CheckedObservation(row=row, value=value, attacker_ip=ip or None)
