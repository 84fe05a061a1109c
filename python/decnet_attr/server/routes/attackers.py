"""``/api/v1/attackers``: list, detail, registration and the attribution
endpoint (docs/decnet.md#attribution-endpoint, byte-compatible)."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from typing import Any

from aiohttp import web

from decnet_attr.identifiers import (
    ATTACKER_UUID_PROBLEM,
    is_attacker_uuid,
    network_keys,
    normalise_ip,
)
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
from decnet_attr.server.keys import STORE
from decnet_attr.server.wire import attribution_row, iso_utc
from decnet_attr.store import (
    STATES,
    AttackerFilter,
    AttackerRow,
    AttackerSummary,
    StoreError,
    StoreUnavailable,
)
from decnet_attr.store.queries import SHARD_REF_PREFIX

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: Longest attacker uuid looked up (the worker accepts up to 128 characters).
MAX_ATTACKER_UUID = 128
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 1000
LIST_OFFSET_MAX = 2_147_483_647
#: Longest ``search`` / ``service`` filter accepted.
LIST_FILTER_MAX = 256
#: ``sort_by`` values: DECNET's three (``recent``: last seen first; ``active``: most
#: observations first; ``traversals``: DECNET puts traversing attackers first, and
#: we know of none, so it is ``recent``) and our own (which honour ``order``).
LIST_SORT_BY: dict[str, str | None] = {
    "recent": None,
    "active": "events",
    "traversals": None,
    "last_seen": "last_seen",
    "first_seen": "first_seen",
    "observations": "events",
    "ip": "ip",
}
#: Shortest IPv4 network accepted by the ``ip`` filter (it is searched as the
#: text prefixes that cover it: at most 128 of them).
IP_NETWORK_MIN_PREFIX = 8
#: Shortest IPv6 network accepted (a /16 is already a large share of the space).
IP6_NETWORK_MIN_PREFIX = 16
#: ``seen_within`` units (a bare number is seconds).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Longest ``seen_within`` accepted: a year.
SEEN_WITHIN_MAX = 366 * 86400
_IP_PREFIX_RE = re.compile(r"^[0-9a-fA-F.:]{1,45}$")
_UUID_PREFIX_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_DURATION_RE = re.compile(r"^(\d{1,9})([smhd]?)$")
_BOOL_PARAM = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
#: Filter values DECNET's client may send for "no filter".
_NO_FILTER = frozenset({"", "null", "NULL", "undefined"})


def shard_parts(refs: list[str]) -> tuple[list[str], list[str]]:
    """``(services, deckies)`` named by shard evidence references
    (``shard:<decky>/<service>/<file>#<session>``), each sorted and distinct."""
    services: set[str] = set()
    deckies: set[str] = set()
    for ref in refs:
        parts = ref[len(SHARD_REF_PREFIX) :].split("/", 2)
        if ref.startswith(SHARD_REF_PREFIX) and len(parts) == 3 and parts[0] and parts[1]:
            deckies.add(parts[0])
            services.add(parts[1])
    return sorted(services), sorted(deckies)


def attacker_entry(s: AttackerSummary, refs: list[str]) -> dict[str, Any]:
    """One attacker in DECNET's ``AttackerEntry`` shape (times as ISO-8601 UTC;
    what we do not track present with its empty value) plus ours: the
    identity, its per-state counts and the multi-actor flag."""
    a = s.attacker
    services, deckies = shard_parts(refs)
    return {
        "uuid": a.uuid,
        "ip": a.ip or "",
        "first_seen": iso_utc(a.first_seen),
        "last_seen": iso_utc(a.last_seen),
        "event_count": s.observation_count,
        "service_count": len(services),
        "decky_count": len(deckies),
        "services": services,
        "deckies": deckies,
        "traversal_path": None,
        "is_traversal": False,
        "bounty_count": 0,
        "credential_count": 0,
        "fingerprints": [],
        "commands": [],
        "country_code": None,
        "country_source": None,
        "asn": None,
        "as_name": None,
        "asn_source": None,
        "updated_at": iso_utc(a.last_seen),
        # ours
        "identity_id": a.identity_id,
        "observation_count": s.observation_count,
        "state_counts": {st: int(s.state_counts.get(st, 0)) for st in STATES},
        "multi_actor": s.multi_actor,
        "rotation_count": a.rotation_count,
        "last_rotation_at": iso_utc(a.last_rotation_at),
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


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
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


def _filter_param(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw in _NO_FILTER:
        return None
    if len(raw) > LIST_FILTER_MAX:
        raise bad_request(f"{name} must be at most {LIST_FILTER_MAX} characters")
    return raw


def ipv4_network_cover(net: ipaddress.IPv4Network) -> tuple[list[str], list[str]]:
    """``(addresses, text_prefixes)`` whose union is exactly *net*: dotted
    octets up to the last whole octet of the prefix, then each value the next
    octet can take (whole addresses once the fourth octet is reached)."""
    octets = str(net.network_address).split(".")
    whole, rest = divmod(net.prefixlen, 8)
    if whole == 4:
        return [str(net.network_address)], []
    head = octets[:whole]
    if rest == 0:
        return [], [".".join(head) + "."]
    first = int(octets[whole])
    values = range(first, first + (1 << (8 - rest)))
    if whole == 3:
        return [".".join([*head, str(v)]) for v in values], []
    return [], [".".join([*head, str(v)]) + "." for v in values]


def _ip_filter(raw: str) -> dict[str, tuple[Any, ...]]:
    """The ``ip`` parameter: an address (exact), a network in CIDR notation
    (IPv4 or IPv6), or the start of an address as text (``10.0.``,
    ``2001:db8:``)."""
    text = raw.strip()
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise bad_request(f"ip is not a valid network: {raw[:64]!r}") from None
        if isinstance(net, ipaddress.IPv6Network):
            if net.prefixlen < IP6_NETWORK_MIN_PREFIX:
                raise bad_request(f"ip: IPv6 networks must be /{IP6_NETWORK_MIN_PREFIX} or longer")
            lo, hi = network_keys(net)
            return {"networks": ((str(net), lo, hi),)}
        if net.prefixlen < IP_NETWORK_MIN_PREFIX:
            raise bad_request(f"ip: networks must be /{IP_NETWORK_MIN_PREFIX} or longer")
        exact, prefixes = ipv4_network_cover(net)
        return {"ips": tuple(exact), "ip_prefixes": tuple(prefixes)}
    try:
        return {"ips": (str(ipaddress.ip_address(text)),)}
    except ValueError:
        pass
    if not _IP_PREFIX_RE.match(text):
        raise bad_request(f"ip must be an address, an IPv4 network or its start, got {raw[:64]!r}")
    return {"ip_prefixes": (text.lower(),)}


def attacker_filter(request: web.Request, now: float) -> AttackerFilter:
    """The list's search filters from the query string (400 for a bad one):
    ``ip``, ``attacker`` / ``identity`` (uuid prefixes), ``state`` (comma-separated
    states, any of them), ``multi_actor`` (true/false), ``seen_within``
    (seconds, or a number with ``s``/``m``/``h``/``d``)."""
    kw: dict[str, Any] = {}
    ip = _filter_param(request, "ip")
    if ip:
        kw.update(_ip_filter(ip))
    for name in ("attacker", "identity"):
        prefix = _filter_param(request, name)
        if prefix:
            if not _UUID_PREFIX_RE.match(prefix):
                raise bad_request(f"{name} must be 1-64 characters of [A-Za-z0-9-]")
            kw[f"{name}_prefix"] = prefix
    state = _filter_param(request, "state")
    if state:
        states = tuple(dict.fromkeys(st.strip() for st in state.split(",") if st.strip()))
        bad = [st for st in states if st not in STATES]
        if bad or not states:
            raise bad_request(f"state must be among {', '.join(STATES)}, got {state[:64]!r}")
        kw["states"] = states
    flag = _filter_param(request, "multi_actor")
    if flag:
        if flag.lower() not in _BOOL_PARAM:
            raise bad_request(f"multi_actor must be true or false, got {flag[:40]!r}")
        kw["multi_actor"] = _BOOL_PARAM[flag.lower()]
    within = _filter_param(request, "seen_within")
    if within:
        m = _DURATION_RE.match(within.strip())
        seconds = int(m.group(1)) * DURATION_UNITS[m.group(2) or "s"] if m else -1
        if not 0 < seconds <= SEEN_WITHIN_MAX:
            raise bad_request(
                f"seen_within must be a duration such as 900, 15m, 1h or 7d "
                f"(at most {SEEN_WITHIN_MAX // 86400} d), got {within[:40]!r}"
            )
        kw["seen_since"] = now - seconds
    return AttackerFilter(**kw)


@routes.get("/api/v1/attackers", name="attackers_list")
@require(*READ_ROLES)
async def list_attackers(request: web.Request, principal: Principal) -> web.StreamResponse:
    """DECNET's page shape ``{total, limit, offset, data: [AttackerEntry…]}``.
    Query: ``limit``, ``offset``, ``sort_by`` (:data:`LIST_SORT_BY`), ``order``
    (``asc``/``desc``, for our own sorts), ``search``, ``service`` and the
    filters of :func:`attacker_filter`."""
    limit = int_param(request, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX)
    offset = int_param(request, "offset", 0, 0, LIST_OFFSET_MAX)
    sort_by = request.query.get("sort_by") or "recent"
    if sort_by not in LIST_SORT_BY:
        raise bad_request(f"sort_by must be one of {', '.join(LIST_SORT_BY)}, got {sort_by[:40]!r}")
    sort = LIST_SORT_BY[sort_by]
    order = (request.query.get("order") or "desc").lower()
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be asc or desc, got {order[:40]!r}")
    descending = order == "desc" if sort is not None else True
    store = request.app[STORE]
    items, total = await store.list_attackers(
        limit=limit,
        offset=offset,
        sort=sort or "last_seen",
        descending=descending,
        search=_filter_param(request, "search"),
        service=_filter_param(request, "service"),
        filters=attacker_filter(request, time.time()),
    )
    evidence = await store.attacker_evidence([s.attacker.uuid for s in items]) if items else {}
    body = {
        "total": total,
        "limit": limit,
        "offset": offset,
        "data": [attacker_entry(s, evidence.get(s.attacker.uuid, [])) for s in items],
    }
    return json_response(body)


@routes.get("/api/v1/attackers/{uuid}", name="attacker_detail")
@require(*READ_ROLES)
async def attacker_detail(request: web.Request, principal: Principal) -> web.StreamResponse:
    """DECNET's ``AttackerData``: the list entry plus the fields of the page
    (``observations``: the latest per primitive, epoch ``ts``) and ours
    (``identity_uuid``, ``attribution`` rows as the attribution endpoint gives
    them)."""
    store = request.app[STORE]
    uuid = request.match_info["uuid"]
    found = None
    if uuid and len(uuid) <= MAX_ATTACKER_UUID:
        found, _ = await store.list_attackers(limit=1, offset=0, uuid=uuid)
    if not found:
        raise not_found(ATTACKER_NOT_FOUND_DETAIL)
    summary = found[0]
    observations = await store.latest_observations(uuid)
    attribution = await store.attacker_attribution(uuid)
    evidence = await store.attacker_evidence([uuid])
    body = attacker_entry(summary, evidence.get(uuid, []))
    body.update(
        {
            "ptr_record": None,
            "behavior": None,
            "service_activity": {"interacted": body["services"], "scanned": []},
            "ip_leaks": [],
            "ip_leaks_total": 0,
            "observations": observations,
            "identity_uuid": summary.attacker.identity_id,
            "attribution": [attribution_row(r) for r in attribution.rows] if attribution else [],
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
