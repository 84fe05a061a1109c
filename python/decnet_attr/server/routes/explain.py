"""``GET /api/v1/attackers/{uuid}/attribution/{primitive}/explain``: why a
badge says what it says.

The answer is :func:`decnet_attr.worker.recompute.explain_state`: the stored
window replayed through the engine, with the rule that decided the state, its
description, the measured quantities next to the thresholds they were compared
against (``detail`` and ``thresholds``), the stored row and the previous state.

Same gate as the attribution endpoint (header JWT, viewer or admin): 401, then
403, then 404 ``{"detail": "Attacker not found"}`` for an unknown attacker and
404 ``{"detail": "Attribution not found"}`` for a primitive without a row.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from aiohttp import web

from decnet_attr.server.auth import READ_ROLES, Principal, require
from decnet_attr.server.errors import ATTACKER_NOT_FOUND_DETAIL, json_response, not_found
from decnet_attr.server.keys import SETTINGS, STORE

log = logging.getLogger(__name__)

__all__ = ["ATTRIBUTION_NOT_FOUND_DETAIL", "json_safe", "routes"]

routes = web.RouteTableDef()

ATTRIBUTION_NOT_FOUND_DETAIL = "Attribution not found"
#: Longest attacker uuid looked up (as the other attacker routes).
MAX_ATTACKER_UUID = 128
#: Longest primitive name looked up (as the ingest route accepts).
MAX_PRIMITIVE = 200
#: Nesting depth :func:`json_safe` follows (values come from attackers).
MAX_DEPTH = 64


def json_safe(value: Any, _depth: int = 0) -> Any:
    """``value`` with only JSON types: non-finite floats become None, tuples
    and sets lists, mapping keys strings, anything else its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _depth >= MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return [json_safe(v, _depth + 1) for v in sorted(value, key=repr)]
    return str(value)


@routes.get("/api/v1/attackers/{uuid}/attribution/{primitive}/explain", name="attribution_explain")
@require(*READ_ROLES)
async def explain(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The explanation of one attribution row of the attacker's identity."""
    from decnet_attr.worker.recompute import explain_state

    uuid = request.match_info["uuid"]
    primitive = request.match_info["primitive"]
    if not uuid or len(uuid) > MAX_ATTACKER_UUID:
        raise not_found(ATTACKER_NOT_FOUND_DETAIL)
    store = request.app[STORE]
    attacker = await store.get_attacker(uuid)
    if attacker is None:
        raise not_found(ATTACKER_NOT_FOUND_DETAIL)
    if not primitive or len(primitive) > MAX_PRIMITIVE or attacker.identity_id is None:
        raise not_found(ATTRIBUTION_NOT_FOUND_DETAIL)
    result = await explain_state(store, request.app[SETTINGS], uuid, primitive)
    if result is None:
        raise not_found(ATTRIBUTION_NOT_FOUND_DETAIL)
    return json_response(json_safe(result))
