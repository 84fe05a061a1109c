"""``POST /api/v1/observations``: sensors push observation events over HTTP.

The body is a JSON array (or one object) or NDJSON. Every item is validated
on its own; the good ones are published with
``bus.publish_durable("attacker.observation.<primitive>", payload)`` in the
shape DECNET's profiler publishes (reference §3.2). The bus is the only path:
the API never writes observations to the store, the worker does (and acks),
so a 202 means *durably accepted*: for the in-process bus the worker has
committed the batch, for NATS JetStream has stored the message.

Answers: 202 ``{"accepted", "ids", "rejected": [{"index", "reason"}]}`` when
at least one item was accepted; 422 ``{"detail": [{"index", "reason"}]}``
when none was; 400 for a body that is not JSON; 413 for a body or a batch
too large; 415 for another content type; 503 (+ ``Retry-After``) when the bus
cannot accept durably right now (the body then lists what was accepted
before the failure). Give every item an ``id``: a retry with the same ids is
de-duplicated end to end.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import re
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from decnet_attr.bus import BusError, BusPayloadTooLarge, Event
from decnet_attr.config import Settings
from decnet_attr.registry import PrimitiveSpec, registry
from decnet_attr.server.app import BUS, COUNTERS, SETTINGS
from decnet_attr.server.auth import INGEST_ROLES, Principal, require
from decnet_attr.server.errors import (
    EXTRA_CONTENT_TYPES,
    JSON_CONTENT_TYPE,
    bad_request,
    json_response,
    payload_too_large,
    service_unavailable,
    unprocessable,
    unsupported_media_type,
)
from decnet_attr.topics import attacker_observation

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

ROUTE_NAME = "ingest_observations"
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/ndjson"})
ACCEPTED_TYPES = frozenset({JSON_CONTENT_TYPE}) | NDJSON_TYPES
EXTRA_CONTENT_TYPES[ROUTE_NAME] = NDJSON_TYPES

#: Events published concurrently (the worker batches what arrives together).
PUBLISH_CHUNK = 500

MAX_ATTACKER_UUID = 128
MAX_PRIMITIVE = 200
MAX_SOURCE = 512
MAX_EVIDENCE_REF = 512
MAX_IDENTITY_REF = 128
ITEM_FIELDS = frozenset(
    {
        "attacker_uuid",
        "primitive",
        "value",
        "ts",
        "attacker_ip",
        "confidence",
        "evidence_ref",
        "id",
        "window",
        "source",
        "identity_ref",
        "v",
    }
)
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_worker_check: Callable[..., Any] | None
_worker_rejected: tuple[type[Exception], ...]
try:  # the worker's own checks, run last so that a 202 never hides a dead letter
    from decnet_attr.worker.validate import Rejected, check_observation
except ModuleNotFoundError as _exc:  # pragma: no cover - worker being written
    if not (_exc.name or "").startswith("decnet_attr.worker"):
        raise
    _worker_check, _worker_rejected = None, ()
else:
    _worker_check, _worker_rejected = check_observation, (Rejected,)


class ItemRejected(ValueError):
    """An item that cannot be accepted; the message is the reason."""


@dataclass(frozen=True)
class Checked:
    index: int
    id: str
    topic: str
    primitive: str
    payload: dict[str, Any]


@functools.lru_cache(maxsize=1)
def _known_topics() -> dict[str, tuple[str, PrimitiveSpec]]:
    """Registry primitive -> (its validated observation topic, its spec)."""
    return {
        name: (attacker_observation(name), spec) for name, spec in registry().primitives.items()
    }


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numeric_value_ok(v: Any) -> bool:
    """What the engine accepts for a numeric primitive."""
    if v is None or isinstance(v, bool):
        return True
    try:
        return isinstance(v, (int, float, str)) and math.isfinite(float(v))
    except (ValueError, OverflowError):
        return False


def _opt_str(item: dict[str, Any], name: str, max_len: int) -> str | None:
    v = item.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise ItemRejected(f"{name} must be a non-empty string of at most {max_len} characters")
    return v


def check_item(
    index: int,
    item: Any,
    *,
    source: str,
    max_value_bytes: int,
    new_id: Callable[[], str] = lambda: uuid_mod.uuid4().hex,
) -> Checked:
    """Validate one item and build its bus payload; :class:`ItemRejected`."""
    if not isinstance(item, dict):
        raise ItemRejected("item must be a JSON object")
    unknown = set(item) - ITEM_FIELDS
    if unknown:
        names = ", ".join(sorted(str(k)[:40] for k in unknown)[:5])
        raise ItemRejected(f"unknown field(s): {names}")
    attacker = item.get("attacker_uuid")
    if not isinstance(attacker, str) or not attacker or len(attacker) > MAX_ATTACKER_UUID:
        raise ItemRejected(
            f"attacker_uuid must be a non-empty string of at most {MAX_ATTACKER_UUID} characters"
        )
    primitive = item.get("primitive")
    if not isinstance(primitive, str) or not primitive or len(primitive) > MAX_PRIMITIVE:
        raise ItemRejected("primitive must be a non-empty dotted name")
    known = _known_topics().get(primitive)
    if known is None:
        try:
            attacker_observation(primitive)
        except ValueError as exc:
            raise ItemRejected(f"primitive: {exc}") from None
        raise ItemRejected(f"unknown primitive {primitive!r}")
    topic, spec = known
    if "value" not in item:
        raise ItemRejected("value is required")
    value = item["value"]
    try:
        value_size = len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError) as exc:  # pragma: no cover - came from JSON
        raise ItemRejected(f"value is not JSON: {exc}") from None
    if value_size > max_value_bytes:
        raise ItemRejected(f"value is {value_size} bytes, above the limit of {max_value_bytes}")
    if spec.merger_kind == "numeric" and not _numeric_value_ok(value):
        raise ItemRejected(f"{primitive} is numeric: value must be a finite number")
    ts = item.get("ts")
    if not _finite_number(ts):
        raise ItemRejected("ts must be a finite number")
    confidence = item.get("confidence")
    if confidence is not None and not (_finite_number(confidence) and 0.0 <= confidence <= 1.0):
        raise ItemRejected("confidence must be null or a number in [0, 1]")
    oid = item.get("id")
    if oid is None:
        oid = new_id()
    elif not isinstance(oid, str) or not _ID_RE.match(oid):
        raise ItemRejected("id must be 1-64 characters of [A-Za-z0-9_-]")
    window = item.get("window")
    if window is None:
        window = {"start_ts": ts, "end_ts": ts}
    else:
        if (
            not isinstance(window, dict)
            or set(window) != {"start_ts", "end_ts"}
            or not _finite_number(window["start_ts"])
            or not _finite_number(window["end_ts"])
        ):
            raise ItemRejected("window must be {start_ts, end_ts} with finite numbers")
        if window["end_ts"] < window["start_ts"]:
            raise ItemRejected("window end_ts is before start_ts")
    src = _opt_str(item, "source", MAX_SOURCE) or source
    evidence = _opt_str(item, "evidence_ref", MAX_EVIDENCE_REF) or f"api:{oid}"
    identity_ref = _opt_str(item, "identity_ref", MAX_IDENTITY_REF)
    version = item.get("v", 1)
    if version != 1 or isinstance(version, bool):
        raise ItemRejected("v must be 1")
    ip_raw = item.get("attacker_ip")
    ip: str | None = None
    if ip_raw is not None:
        if not isinstance(ip_raw, str) or len(ip_raw) > 64:
            raise ItemRejected("attacker_ip must be an IP address")
        try:
            ip = str(ipaddress.ip_address(ip_raw.strip()))
        except ValueError:
            raise ItemRejected(f"attacker_ip is not a valid IP address: {ip_raw[:64]!r}") from None
    payload: dict[str, Any] = {
        "primitive": primitive,
        "value": value,
        "confidence": 1.0 if confidence is None else confidence,
        "window": window,
        "source": src,
        "evidence_ref": evidence,
        "identity_ref": identity_ref,
        "id": oid,
        "ts": ts,
        "v": 1,
        "attacker_uuid": attacker,
    }
    if ip is not None:
        payload["attacker_ip"] = ip
    if len(orjson.dumps(payload)) > 2 * max_value_bytes + 4096:
        raise ItemRejected("observation too large")
    if _worker_check is not None:
        try:
            _worker_check(topic, payload, oid, max_value_bytes=max_value_bytes)
        except _worker_rejected as exc:
            raise ItemRejected(str(exc)) from None
    return Checked(index=index, id=oid, topic=topic, primitive=primitive, payload=payload)


# ---- body handling -------------------------------------------------------------------------
async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refusing (413) more than ``limit`` bytes while reading."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise payload_too_large(f"request body larger than {limit} bytes", limit)
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise payload_too_large(f"request body larger than {limit} bytes", limit)
    return bytes(buf)


class _BadLine:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_items(body: bytes, mimetype: str, max_items: int) -> list[Any]:
    """Items of a JSON array / single object, or of NDJSON (an unparseable
    line becomes a rejected item). 400 / 413 as documented."""
    if mimetype in NDJSON_TYPES:
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        if len(lines) > max_items:
            raise payload_too_large(f"{len(lines)} items, above the limit of {max_items}")
        items: list[Any] = []
        for ln in lines:
            try:
                items.append(orjson.loads(ln))
            except orjson.JSONDecodeError as exc:
                items.append(_BadLine(f"invalid JSON: {exc}"))
        if items and all(isinstance(i, _BadLine) for i in items):
            reason = items[0].reason
            raise bad_request(f"invalid NDJSON: no line is JSON (line 1: {reason})")
        return items
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid JSON: {exc}") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise bad_request("the body must be a JSON array of observations (or one observation)")
    if len(doc) > max_items:
        raise payload_too_large(f"{len(doc)} items, above the limit of {max_items}")
    return doc


def _check_content_type(request: web.Request) -> str:
    mimetype = request.content_type.lower()
    if mimetype not in ACCEPTED_TYPES:
        raise unsupported_media_type(
            "Unsupported Media Type: expected application/json, application/x-ndjson "
            f"or application/jsonl, got {request.content_type or 'none'}"
        )
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8", "us-ascii"):
        raise unsupported_media_type(f"Unsupported charset {charset[:40]!r}: use utf-8")
    return mimetype


# ---- the route -----------------------------------------------------------------------------
@routes.post("/api/v1/observations", name=ROUTE_NAME)
@require(*INGEST_ROLES)
async def ingest(request: web.Request, principal: Principal) -> web.StreamResponse:
    settings: Settings = request.app[SETTINGS]
    counters = request.app[COUNTERS]
    mimetype = _check_content_type(request)
    body = await read_body(request, settings.max_body_bytes)
    items = parse_items(body, mimetype, settings.max_batch_items)
    if not items:
        raise bad_request("empty batch: no observations in the request body")

    source = f"api:{principal.username}"
    good: list[Checked] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if isinstance(item, _BadLine):
            rejected.append({"index": i, "reason": item.reason})
            continue
        try:
            c = check_item(i, item, source=source, max_value_bytes=settings.max_value_bytes)
        except ItemRejected as exc:
            rejected.append({"index": i, "reason": str(exc)})
            continue
        if c.id in seen:
            rejected.append({"index": i, "reason": f"duplicate id {c.id!r} in this batch"})
            continue
        seen.add(c.id)
        good.append(c)
    counters["observations_rejected_total"] = counters.get("observations_rejected_total", 0) + len(
        rejected
    )
    if not good:
        raise unprocessable(rejected)

    accepted_ids, failure = await _publish(request, good, rejected)
    counters["observations_accepted_total"] = counters.get("observations_accepted_total", 0) + len(
        accepted_ids
    )
    if failure is not None:
        counters["ingest_unavailable_total"] = counters.get("ingest_unavailable_total", 0) + 1
        log.warning(
            "ingest by %s: bus unavailable after %d of %d observations: %s",
            principal.username,
            len(accepted_ids),
            len(good),
            failure,
        )
        raise service_unavailable(
            f"observations cannot be accepted durably right now: {failure}",
            retry_after=1.0,
            extra={"accepted": len(accepted_ids), "ids": accepted_ids},
        )
    rejected.sort(key=lambda r: int(r["index"]))
    if not accepted_ids:
        raise unprocessable(rejected)
    return json_response(
        {"accepted": len(accepted_ids), "ids": accepted_ids, "rejected": rejected}, status=202
    )


async def _publish(
    request: web.Request, good: list[Checked], rejected: list[dict[str, Any]]
) -> tuple[list[str], str | None]:
    """Publish in concurrent chunks; stop at the first chunk the bus could not
    take. Returns the accepted ids and the failure (None: all accepted)."""
    bus = request.app[BUS]
    accepted: list[str] = []
    for start in range(0, len(good), PUBLISH_CHUNK):
        chunk = good[start : start + PUBLISH_CHUNK]
        results: list[Event | BaseException] = await asyncio.gather(
            *(
                bus.publish_durable(c.topic, c.payload, event_type=c.primitive, event_id=c.id)
                for c in chunk
            ),
            return_exceptions=True,
        )
        failure: str | None = None
        for c, res in zip(chunk, results):
            if isinstance(res, Event):
                accepted.append(c.id)
            elif isinstance(res, BusPayloadTooLarge):
                rejected.append({"index": c.index, "reason": f"too large for the bus: {res}"})
            elif isinstance(res, (BusError, RuntimeError, asyncio.TimeoutError, OSError)):
                failure = failure or str(res) or type(res).__name__
            elif isinstance(res, (ValueError, TypeError)):
                rejected.append({"index": c.index, "reason": f"not publishable: {res}"})
            elif isinstance(res, BaseException):
                raise res
        if failure is not None:
            return accepted, failure
    return accepted, None
