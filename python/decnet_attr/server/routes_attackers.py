"""``/api/v1/attackers``: list, detail, registration and the attribution
endpoint (reference §6.5, byte-compatible)."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from decnet_attr.identifiers import ATTACKER_UUID_PROBLEM, is_attacker_uuid, normalise_ip
from decnet_attr.server.app import STORE
from decnet_attr.server.auth import READ_ROLES, REGISTER_ROLES, Principal, require
from decnet_attr.server.errors import (
    ATTACKER_NOT_FOUND_DETAIL,
    bad_request,
    conflict,
    json_response,
    not_found,
    read_json_object,
    unprocessable,
)
from decnet_attr.store import (
    STATES,
    AttackerRow,
    AttributionView,
    StateRow,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: Longest attacker uuid looked up (the worker accepts up to 128 characters).
MAX_ATTACKER_UUID = 128
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500
LIST_OFFSET_MAX = 10_000_000
LIST_SORTS = ("last_seen", "first_seen", "ip")


def attribution_row(row: AttributionView | StateRow) -> dict[str, Any]:
    """One row of the attribution endpoint: exactly these seven keys."""
    return {
        "primitive": row.primitive,
        "current_value": orjson.loads(row.current_value_json),
        "state": row.state,
        "confidence": row.confidence,
        "observation_count": row.observation_count,
        "last_change_ts": row.last_change_ts,
        "last_observation_ts": row.last_observation_ts,
    }


def attacker_body(a: AttackerRow) -> dict[str, Any]:
    return {
        "uuid": a.uuid,
        "ip": a.ip,
        "identity_id": a.identity_id,
        "first_seen": a.first_seen,
        "last_seen": a.last_seen,
        "rotation_count": a.rotation_count,
        "last_rotation_at": a.last_rotation_at,
    }


async def _attacker_or_404(request: web.Request) -> AttackerRow:
    uuid = request.match_info["uuid"]
    if not uuid or len(uuid) > MAX_ATTACKER_UUID:
        raise not_found(ATTACKER_NOT_FOUND_DETAIL)
    attacker = await request.app[STORE].get_attacker(uuid)
    if attacker is None:
        raise not_found(ATTACKER_NOT_FOUND_DETAIL)
    return attacker


@routes.get("/api/v1/attackers/{uuid}/attribution", name="attacker_attribution")
@require(*READ_ROLES)
async def attribution(request: web.Request, principal: Principal) -> web.StreamResponse:
    """``{"identity_uuid": null|str, "primitives": [row, ...]}``, rows ordered by
    primitive (``unknown`` rows included). Header JWT only."""
    uuid = request.match_info["uuid"]
    found = None
    if uuid and len(uuid) <= MAX_ATTACKER_UUID:
        # one query: the attacker's identity and its rows (no retained windows)
        found = await request.app[STORE].attacker_attribution(uuid)
    if found is None:
        raise not_found(ATTACKER_NOT_FOUND_DETAIL)
    return json_response(
        {
            "identity_uuid": found.identity_uuid,
            "primitives": [attribution_row(r) for r in found.rows],
        }
    )


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}, got {value}")
    return value


@routes.get("/api/v1/attackers", name="attackers_list")
@require(*READ_ROLES)
async def list_attackers(request: web.Request, principal: Principal) -> web.StreamResponse:
    """A page of attackers with their identity's per-state counts."""
    limit = _int_param(request, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX)
    offset = _int_param(request, "offset", 0, 0, LIST_OFFSET_MAX)
    sort = request.query.get("sort") or "last_seen"
    if sort not in LIST_SORTS:
        raise bad_request(f"sort must be one of {', '.join(LIST_SORTS)}, got {sort[:40]!r}")
    order = (request.query.get("order") or "desc").lower()
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be asc or desc, got {order[:40]!r}")
    items, total = await request.app[STORE].list_attackers(
        limit=limit, offset=offset, sort=sort, descending=order == "desc"
    )
    body = {
        "items": [
            {
                "uuid": s.attacker.uuid,
                "ip": s.attacker.ip,
                "identity_id": s.attacker.identity_id,
                "first_seen": s.attacker.first_seen,
                "last_seen": s.attacker.last_seen,
                "state_counts": {st: int(s.state_counts.get(st, 0)) for st in STATES},
                "multi_actor": s.multi_actor,
                "observation_count": s.observation_count,
            }
            for s in items
        ],
        "total": total,
        "limit": limit,
        "offset": offset,
    }
    return json_response(body)


@routes.get("/api/v1/attackers/{uuid}", name="attacker_detail")
@require(*READ_ROLES)
async def attacker_detail(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The attacker, its latest observation per primitive and its attribution."""
    store = request.app[STORE]
    attacker = await _attacker_or_404(request)
    observations = await store.latest_observations(attacker.uuid)
    found = await store.attacker_attribution(attacker.uuid)
    rows = found.rows if found is not None else []
    multi = sum(1 for r in rows if r.state == "multi_actor") >= 2
    body = attacker_body(attacker)
    body.update(
        {
            "identity_uuid": attacker.identity_id,
            "multi_actor": multi,
            "observations": observations,
            "attribution": [attribution_row(r) for r in rows],
        }
    )
    return json_response(body)


#: What a caller that cannot read attackers (a sensor) learns from registering
#: one: the uuid to send its observations under, nothing of the attribution.
SENSOR_REGISTRATION_FIELDS = ("uuid", "ip")
#: The 409 detail such a caller gets (it names neither the uuid nor the ip).
SENSOR_CONFLICT_DETAIL = "the uuid or the ip is already registered with another attacker"


@routes.post("/api/v1/attackers", name="attackers_register")
@require(*REGISTER_ROLES)
async def register_attacker(request: web.Request, principal: Principal) -> web.StreamResponse:
    """``{ip, uuid?}``: idempotent by ip; 201 when created, 200 when it existed,
    409 when the uuid belongs to another ip.

    A caller without read access (a sensor) gets only ``{uuid, ip}`` back and
    a 409 that names nothing: registering is not a way to read attackers."""
    reader = principal.role in READ_ROLES
    body = await read_json_object(request)
    try:
        ip = normalise_ip(body.get("ip"))
    except ValueError as exc:
        raise unprocessable(str(exc)) from None
    uuid = body.get("uuid")
    if uuid is not None and not is_attacker_uuid(uuid):
        raise unprocessable(ATTACKER_UUID_PROBLEM)
    unknown = sorted(set(body) - {"ip", "uuid"})
    if unknown:
        raise unprocessable(f"unknown field(s): {', '.join(k[:40] for k in unknown[:5])}")
    store = request.app[STORE]
    try:
        row, created = await store.register_attacker(ip, uuid, time.time())
    except StoreUnavailable:
        raise
    except StoreError:
        # The uuid exists with another ip (or lost a race to a concurrent insert).
        existing = await store.get_attacker(uuid) if uuid is not None else None
        if existing is not None and existing.ip != ip:
            raise conflict(
                f"attacker {uuid} is already registered with another ip"
                if reader
                else SENSOR_CONFLICT_DETAIL
            ) from None
        raise
    if uuid is not None and row.uuid != uuid:
        raise conflict(
            f"ip {ip} is already registered as attacker {row.uuid}"
            if reader
            else SENSOR_CONFLICT_DETAIL
        )
    if created:
        log.info("attacker %s registered for %s by %s", row.uuid, ip, principal.username)
    out = attacker_body(row)
    if not reader:
        out = {k: out[k] for k in SENSOR_REGISTRATION_FIELDS}
    return json_response(out, status=201 if created else 200)
