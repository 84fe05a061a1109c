"""``/api/v1/identities``: the identities attackers roll up into (paged
list, detail with members, fingerprints, attribution rows and merge
history, and the identity's observations). The identity event stream
(``/api/v1/identities/events``) is the SSE hub's."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from decnet_attr.server.auth import READ_ROLES, Principal, require
from decnet_attr.server.errors import json_response, not_found
from decnet_attr.server.keys import SETTINGS, STORE
from decnet_attr.server.routes.attackers import int_param
from decnet_attr.server.wire import attribution_row, identity_entry, iso_utc
from decnet_attr.store import Store

routes = web.RouteTableDef()

IDENTITY_NOT_FOUND_DETAIL = "Identity not found"
MAX_IDENTITY_UUID = 128
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 1000
OFFSET_MAX = 2_147_483_647
OBSERVATIONS_LIMIT_DEFAULT = 100
OBSERVATIONS_LIMIT_MAX = 1000
#: Distinct fingerprint values listed on an identity at most.
FINGERPRINTS_MAX = 200


async def _identity(request: web.Request) -> tuple[Store, str, dict[str, Any]]:
    uuid = request.match_info["uuid"]
    store = request.app[STORE]
    row = None
    if uuid and len(uuid) <= MAX_IDENTITY_UUID:
        row = await store.identity_reads().get(uuid)
    if row is None:
        raise not_found(IDENTITY_NOT_FOUND_DETAIL)
    return store, uuid, row


@routes.get("/api/v1/identities", name="identities_list")
@require(*READ_ROLES)
async def list_identities(request: web.Request, principal: Principal) -> web.StreamResponse:
    """``{total, limit, offset, data: [identity…]}``: identities that are not
    merged away, most recently updated first, each with ``attacker_count``."""
    limit = int_param(request, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX)
    offset = int_param(request, "offset", 0, 0, OFFSET_MAX)
    items, total = await request.app[STORE].identity_reads().page(limit, offset)
    return json_response(
        {
            "total": total,
            "limit": limit,
            "offset": offset,
            "data": [identity_entry(i) for i in items],
        }
    )


@routes.get("/api/v1/identities/{uuid}", name="identity_detail")
@require(*READ_ROLES)
async def identity_detail(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The identity (``merged_into_uuid`` set if it was merged away), its
    ``attackers``, its ``fingerprints`` (distinct values with the attackers
    that showed them), its ``attribution`` rows and its ``merges`` (every
    merge and un-merge it took part in, with the linking evidence)."""
    store, uuid, row = await _identity(request)
    reads = store.identity_reads()
    members = await reads.members(uuid)
    for m in members:
        m["first_seen"] = iso_utc(m["first_seen"])
        m["last_seen"] = iso_utc(m["last_seen"])
    fingerprints = await reads.fingerprints(
        uuid, list(request.app[SETTINGS].cluster_config().weights), FINGERPRINTS_MAX
    )
    rows = await store.attribution_for_identity(uuid)
    body = identity_entry(row)
    body.update(
        {
            "identity_uuid": uuid,
            "attacker_count": len(members),
            "attackers": members,
            "fingerprints": fingerprints,
            "attribution": [attribution_row(r) for r in rows],
            "merges": await reads.history(uuid),
        }
    )
    return json_response(body)


@routes.get("/api/v1/identities/{uuid}/observations", name="identity_observations")
@require(*READ_ROLES)
async def identity_observations(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The observations of the identity's attackers, newest first:
    ``{identity_uuid, limit, data: [...], next_before}``; pass
    ``before=<next_before>`` for the next page (null: no more)."""
    store, uuid, _row = await _identity(request)
    limit = int_param(request, "limit", OBSERVATIONS_LIMIT_DEFAULT, 1, OBSERVATIONS_LIMIT_MAX)
    before: int | None = None
    if request.query.get("before"):
        before = int_param(request, "before", 0, 1, 2**62)
    data = await store.identity_reads().observations(uuid, limit, before)
    next_before = data[-1]["seq"] if len(data) == limit else None
    return json_response(
        {"identity_uuid": uuid, "limit": limit, "data": data, "next_before": next_before}
    )
