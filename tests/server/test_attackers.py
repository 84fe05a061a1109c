"""Attackers and the attribution endpoint (docs/decnet.md#attribution-endpoint, exact shapes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from decnet_attr.store import ObservationRow, StateRow
from tests.server.conftest import Harness, bearer

ROW_KEYS = {
    "primitive",
    "current_value",
    "state",
    "confidence",
    "observation_count",
    "last_change_ts",
    "last_observation_ts",
}


def state(identity: str, primitive: str, value: Any, st: str, **kw: Any) -> StateRow:
    base: dict[str, Any] = {
        "identity_uuid": identity,
        "primitive": primitive,
        "current_value_json": json.dumps(value),
        "state": st,
        "confidence": 0.75,
        "observation_count": 4,
        "last_change_ts": 1_700_000_001.5,
        "last_observation_ts": 1_700_000_002.25,
    }
    base.update(kw)
    return StateRow(**base)


async def seed(
    h: Harness,
    attacker: str,
    ip: str | None = None,
    *,
    ts: float = 1_700_000_000.0,
    identity: bool = True,
    states: Sequence[tuple[str, Any, str]] = (),
    observations: Sequence[tuple[str, Any, float]] = (),
) -> str | None:
    """Seed through the store's transaction API (as the worker does)."""
    async with h.store.transaction() as tx:
        await tx.ensure_attackers([(attacker, ip, ts)])
        ident: str | None = None
        if identity:
            mapping, _formed = await tx.ensure_identities([attacker], ts)
            ident = mapping[attacker]
            await tx.upsert_states([state(ident, p, v, s) for p, v, s in states])
        if observations:
            await tx.insert_observations(
                [
                    ObservationRow(
                        id=f"{attacker}-{i}",
                        attacker_uuid=attacker,
                        primitive=p,
                        value_json=json.dumps(v),
                        ts=t,
                        evidence_ref=f"ev-{attacker}-{i}",
                        confidence=1.0,
                        source="test",
                        identity_uuid=ident,
                    )
                    for i, (p, v, t) in enumerate(observations)
                ]
            )
    return ident


# ---- GET /attackers/{uuid}/attribution ---------------------------------------------------------
async def test_attribution_unknown_attacker_is_404_after_auth(harness: Harness) -> None:
    resp = await harness.client.get("/api/v1/attackers/ghost/attribution")
    assert resp.status == 401
    token = await harness.token("vic", "viewer")
    resp = await harness.client.get("/api/v1/attackers/ghost/attribution", headers=bearer(token))
    assert resp.status == 404
    assert await resp.json() == {"detail": "Attacker not found"}
    resp = await harness.client.get(
        "/api/v1/attackers/" + "x" * 300 + "/attribution", headers=bearer(token)
    )
    assert resp.status == 404
    assert await resp.json() == {"detail": "Attacker not found"}


async def test_attribution_without_identity(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    await seed(harness, "att-1", "192.0.2.1", identity=False)
    resp = await harness.client.get("/api/v1/attackers/att-1/attribution", headers=bearer(token))
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {"identity_uuid": None, "primitives": []}
    assert await resp.read() == b'{"identity_uuid":null,"primitives":[]}'


async def test_attribution_identity_without_rows(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    ident = await seed(harness, "att-1")
    resp = await harness.client.get("/api/v1/attackers/att-1/attribution", headers=bearer(token))
    assert await resp.json() == {"identity_uuid": ident, "primitives": []}


async def test_attribution_rows_exact(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    ident = await seed(
        harness,
        "att-1",
        "192.0.2.1",
        states=[
            ("toolchain.c2.beacon_interval_ms", 1500.5, "drifting"),
            ("environmental.shell_type", "bash", "stable"),
            ("temporal.circadian.hour_histogram", [1, 2, 3], "unknown"),
            ("motor.digraph_simhash", {"h": "abc", "n": [1]}, "multi_actor"),
            ("cognitive.cognitive_load", None, "conflicted"),
        ],
    )
    assert ident is not None and len(ident) == 32
    resp = await harness.client.get("/api/v1/attackers/att-1/attribution", headers=bearer(token))
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"identity_uuid", "primitives"}
    assert body["identity_uuid"] == ident
    assert [r["primitive"] for r in body["primitives"]] == [
        "cognitive.cognitive_load",
        "environmental.shell_type",
        "motor.digraph_simhash",
        "temporal.circadian.hour_histogram",
        "toolchain.c2.beacon_interval_ms",
    ]
    for row in body["primitives"]:
        assert set(row) == ROW_KEYS
    common = {
        "confidence": 0.75,
        "observation_count": 4,
        "last_change_ts": 1_700_000_001.5,
        "last_observation_ts": 1_700_000_002.25,
    }
    assert body["primitives"] == [
        {"primitive": "cognitive.cognitive_load", "current_value": None, "state": "conflicted"}
        | common,
        {"primitive": "environmental.shell_type", "current_value": "bash", "state": "stable"}
        | common,
        {
            "primitive": "motor.digraph_simhash",
            "current_value": {"h": "abc", "n": [1]},
            "state": "multi_actor",
        }
        | common,
        {
            "primitive": "temporal.circadian.hour_histogram",
            "current_value": [1, 2, 3],
            "state": "unknown",
        }
        | common,
        {
            "primitive": "toolchain.c2.beacon_interval_ms",
            "current_value": 1500.5,
            "state": "drifting",
        }
        | common,
    ]
    # key order inside a row follows DECNET's
    raw = (await resp.read()).decode()
    first = raw.index('"primitive"')
    assert raw[first:].startswith(
        '"primitive":"cognitive.cognitive_load","current_value":null,"state":"conflicted",'
        '"confidence":0.75,"observation_count":4,"last_change_ts":1700000001.5,'
        '"last_observation_ts":1700000002.25}'
    )


async def test_attribution_shares_the_identity_of_linked_attackers(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    ident = await seed(harness, "att-1", states=[("environmental.shell_type", "zsh", "stable")])
    other = await seed(harness, "att-2", states=[("environmental.shell_type", "sh", "stable")])
    assert ident != other
    resp = await harness.client.get("/api/v1/attackers/att-2/attribution", headers=bearer(token))
    body = await resp.json()
    assert body["identity_uuid"] == other
    assert [r["current_value"] for r in body["primitives"]] == ["sh"]


# ---- POST /attackers -------------------------------------------------------------------------
async def test_register_attacker(harness: Harness) -> None:
    token = await harness.token("root", "admin")
    resp = await harness.client.post(
        "/api/v1/attackers", json={"ip": "2001:DB8::1", "uuid": "att-42"}, headers=bearer(token)
    )
    assert resp.status == 201
    body = await resp.json()
    assert body["uuid"] == "att-42"
    assert body["ip"] == "2001:db8::1"
    assert body["identity_id"] is None
    assert set(body) == {
        "uuid",
        "ip",
        "identity_id",
        "first_seen",
        "last_seen",
        "rotation_count",
        "last_rotation_at",
    }
    # idempotent by ip (with or without the uuid)
    for payload in ({"ip": "2001:db8:0::1", "uuid": "att-42"}, {"ip": "2001:db8::1"}):
        again = await harness.client.post("/api/v1/attackers", json=payload, headers=bearer(token))
        assert again.status == 200
        assert await again.json() == body
    row = await harness.store.get_attacker("att-42")
    assert row is not None and row.ip == "2001:db8::1"


async def test_register_attacker_generates_a_uuid(harness: Harness) -> None:
    token = await harness.token("root", "admin")
    resp = await harness.client.post(
        "/api/v1/attackers", json={"ip": " 198.51.100.9 "}, headers=bearer(token)
    )
    assert resp.status == 201
    body = await resp.json()
    assert len(body["uuid"]) == 36 and body["uuid"].count("-") == 4
    assert body["ip"] == "198.51.100.9"


async def test_register_attacker_conflicts(harness: Harness) -> None:
    token = await harness.token("root", "admin")
    first = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.1", "uuid": "att-1"}, headers=bearer(token)
    )
    assert first.status == 201
    # the uuid belongs to another ip
    resp = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.2", "uuid": "att-1"}, headers=bearer(token)
    )
    assert resp.status == 409
    assert await resp.json() == {"detail": "attacker att-1 is already registered with another ip"}
    # the ip belongs to another uuid
    resp = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.1", "uuid": "att-2"}, headers=bearer(token)
    )
    assert resp.status == 409
    assert await resp.json() == {"detail": "ip 192.0.2.1 is already registered as attacker att-1"}
    assert await harness.store.get_attacker("att-2") is None


async def test_register_adopts_an_attacker_known_only_by_uuid(harness: Harness) -> None:
    token = await harness.token("sam", "sensor")
    await seed(harness, "att-7", None, identity=False)
    resp = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.7", "uuid": "att-7"}, headers=bearer(token)
    )
    assert resp.status == 200
    assert (await resp.json())["ip"] == "192.0.2.7"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "ip must be an IPv4 or IPv6 address"),
        ({"ip": 12}, "ip must be an IPv4 or IPv6 address"),
        ({"ip": "999.1.1.1"}, "ip is not a valid IP address: '999.1.1.1'"),
        ({"ip": "example.com"}, "ip is not a valid IP address: 'example.com'"),
        ({"ip": "192.0.2.1", "uuid": ""}, "uuid must be 1-64 characters of [A-Za-z0-9-]"),
        ({"ip": "192.0.2.1", "uuid": "a b"}, "uuid must be 1-64 characters of [A-Za-z0-9-]"),
        ({"ip": "192.0.2.1", "uuid": "a" * 65}, "uuid must be 1-64 characters of [A-Za-z0-9-]"),
        ({"ip": "192.0.2.1", "uuid": 5}, "uuid must be 1-64 characters of [A-Za-z0-9-]"),
        ({"ip": "192.0.2.1", "name": "x"}, "unknown field(s): name"),
    ],
)
async def test_register_attacker_validation(
    harness: Harness, body: dict[str, Any], detail: str
) -> None:
    token = await harness.token("sam", "sensor")
    resp = await harness.client.post("/api/v1/attackers", json=body, headers=bearer(token))
    assert resp.status == 422
    assert await resp.json() == {"detail": detail}


# ---- GET /attackers ------------------------------------------------------------------------
async def test_list_attackers(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    await seed(
        harness,
        "att-a",
        "192.0.2.30",
        ts=100.0,
        states=[
            ("environmental.shell_type", "bash", "multi_actor"),
            ("motor.input_modality", "typed", "multi_actor"),
            ("cognitive.cognitive_load", "low", "stable"),
        ],
    )
    await seed(harness, "att-b", "192.0.2.10", ts=300.0, identity=False)
    await seed(
        harness,
        "att-c",
        None,
        ts=200.0,
        states=[("environmental.shell_type", "zsh", "drifting")],
        observations=[
            ("environmental.shell_type", "zsh", 200.0),
            ("motor.input_modality", "typed", 200.0),
        ],
    )
    resp = await harness.client.get("/api/v1/attackers", headers=bearer(token))
    assert resp.status == 200
    body = await resp.json()
    assert list(body) == ["total", "limit", "offset", "data"]
    assert body["total"] == 3 and body["limit"] == 50 and body["offset"] == 0
    assert [i["uuid"] for i in body["data"]] == ["att-b", "att-c", "att-a"]
    items = {i["uuid"]: i for i in body["data"]}
    zero = {"unknown": 0, "stable": 0, "drifting": 0, "conflicted": 0, "multi_actor": 0}
    assert items["att-a"] == {
        "uuid": "att-a",
        "ip": "192.0.2.30",
        "first_seen": "1970-01-01T00:01:40.000000Z",
        "last_seen": "1970-01-01T00:01:40.000000Z",
        "event_count": 0,
        "service_count": 0,
        "decky_count": 0,
        "services": [],
        "deckies": [],
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
        "updated_at": "1970-01-01T00:01:40.000000Z",
        "identity_id": items["att-a"]["identity_id"],
        "observation_count": 0,
        "state_counts": zero | {"multi_actor": 2, "stable": 1},
        "multi_actor": True,
        "rotation_count": 0,
        "last_rotation_at": None,
    }
    assert items["att-b"]["identity_id"] is None
    assert items["att-b"]["state_counts"] == zero
    assert items["att-b"]["multi_actor"] is False
    assert items["att-c"]["ip"] == ""  # registered without an ip: DECNET's type is a string
    assert items["att-c"]["observation_count"] == items["att-c"]["event_count"] == 2
    assert items["att-c"]["state_counts"] == zero | {"drifting": 1}

    async def order(**params: Any) -> list[str]:
        r = await harness.client.get("/api/v1/attackers", params=params, headers=bearer(token))
        assert r.status == 200, await r.text()
        return [i["uuid"] for i in (await r.json())["data"]]

    assert await order(sort_by="recent") == ["att-b", "att-c", "att-a"]
    assert await order(sort_by="traversals") == ["att-b", "att-c", "att-a"]
    assert await order(sort_by="active") == ["att-c", "att-b", "att-a"]  # ties: last seen
    assert await order(sort_by="last_seen", order="asc") == ["att-a", "att-c", "att-b"]
    assert await order(sort_by="first_seen", order="asc") == ["att-a", "att-c", "att-b"]
    assert await order(sort_by="ip", order="asc") == ["att-b", "att-a", "att-c"]  # null ip last
    assert await order(limit=1, offset=1) == ["att-c"]
    assert await order(limit=2, offset=5) == []
    r = await harness.client.get(
        "/api/v1/attackers", params={"limit": 1, "offset": 1}, headers=bearer(token)
    )
    page = await r.json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"limit": "0"}, "limit must be between 1 and 1000, got 0"),
        ({"limit": "1001"}, "limit must be between 1 and 1000, got 1001"),
        ({"limit": "ten"}, "limit must be an integer, got 'ten'"),
        ({"offset": "-1"}, "offset must be between 0 and 2147483647, got -1"),
        (
            {"sort_by": "uuid"},
            "sort_by must be one of recent, active, traversals, last_seen, first_seen, observations, ip, "
            "got 'uuid'",
        ),
        ({"order": "up"}, "order must be asc or desc, got 'up'"),
        ({"search": "x" * 257}, "search must be at most 256 characters"),
        ({"service": "x" * 257}, "service must be at most 256 characters"),
    ],
)
async def test_list_attackers_bad_params(
    harness: Harness, params: dict[str, str], detail: str
) -> None:
    token = await harness.token("vic", "viewer")
    resp = await harness.client.get("/api/v1/attackers", params=params, headers=bearer(token))
    assert resp.status == 400
    assert await resp.json() == {"detail": detail}


# ---- GET /attackers/{uuid} -------------------------------------------------------------------
async def test_attacker_detail(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    ident = await seed(
        harness,
        "att-1",
        "192.0.2.1",
        ts=50.0,
        states=[
            ("environmental.shell_type", "zsh", "multi_actor"),
            ("motor.input_modality", "typed", "multi_actor"),
        ],
        observations=[
            ("environmental.shell_type", "bash", 10.0),
            ("environmental.shell_type", "zsh", 30.0),
            ("motor.input_modality", "typed", 20.0),
        ],
    )
    resp = await harness.client.get("/api/v1/attackers/att-1", headers=bearer(token))
    assert resp.status == 200
    body = await resp.json()
    iso = "1970-01-01T00:00:50.000000Z"
    assert body == {
        "uuid": "att-1",
        "ip": "192.0.2.1",
        "first_seen": iso,
        "last_seen": iso,
        "event_count": 3,
        "service_count": 0,
        "decky_count": 0,
        "services": [],
        "deckies": [],
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
        "updated_at": iso,
        "identity_id": ident,
        "observation_count": 3,
        "state_counts": {
            "unknown": 0,
            "stable": 0,
            "drifting": 0,
            "conflicted": 0,
            "multi_actor": 2,
        },
        "multi_actor": True,
        "rotation_count": 0,
        "last_rotation_at": None,
        "ptr_record": None,
        "behavior": None,
        "service_activity": {"interacted": [], "scanned": []},
        "ip_leaks": [],
        "ip_leaks_total": 0,
        "identity_uuid": ident,
        "observations": [
            {
                "primitive": "environmental.shell_type",
                "value": "zsh",
                "confidence": 1.0,
                "ts": 30.0,
                "source": "test",
            },
            {
                "primitive": "motor.input_modality",
                "value": "typed",
                "confidence": 1.0,
                "ts": 20.0,
                "source": "test",
            },
        ],
        "attribution": [
            {
                "primitive": "environmental.shell_type",
                "current_value": "zsh",
                "state": "multi_actor",
                "confidence": 0.75,
                "observation_count": 4,
                "last_change_ts": 1_700_000_001.5,
                "last_observation_ts": 1_700_000_002.25,
            },
            {
                "primitive": "motor.input_modality",
                "current_value": "typed",
                "state": "multi_actor",
                "confidence": 0.75,
                "observation_count": 4,
                "last_change_ts": 1_700_000_001.5,
                "last_observation_ts": 1_700_000_002.25,
            },
        ],
    }


async def test_attacker_detail_without_identity(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    await seed(harness, "att-1", identity=False)
    resp = await harness.client.get("/api/v1/attackers/att-1", headers=bearer(token))
    body = await resp.json()
    assert body["identity_uuid"] is None
    assert body["observations"] == []
    assert body["attribution"] == []
    assert body["multi_actor"] is False
    resp = await harness.client.get("/api/v1/attackers/nope", headers=bearer(token))
    assert resp.status == 404
    assert await resp.json() == {"detail": "Attacker not found"}


# ---- the store read behind the endpoint -----------------------------------------------------
TRICKY = [  # byte order differs from most locales' collation ('.' < '_' < letters)
    "motor.shell_mastery.tab_completion",
    "motor.shellx",
    "motor.shell",
    "motor.shell_mastery",
    "Motor.upper",
]


async def test_default_store_read_matches_the_backend_query(harness: Harness) -> None:
    from decnet_attr.store import Store

    ident = await seed(harness, "att-1", states=[(p, i, "stable") for i, p in enumerate(TRICKY)])
    await seed(harness, "att-2", identity=False)
    for uuid in ("att-1", "att-2", "nobody"):
        fast = await harness.store.attacker_attribution(uuid)
        slow = await Store.attacker_attribution(harness.store, uuid)
        assert fast == slow
    found = await harness.store.attacker_attribution("att-1")
    assert found is not None and found.identity_uuid == ident
    assert [r.primitive for r in found.rows] == sorted(TRICKY)


async def test_attribution_on_postgresql(make_harness: Any, pg_server: Any) -> None:
    dsn = await pg_server.create_database()
    try:
        h = await make_harness(db_url=dsn)
        token = await h.token("vic", "viewer")
        ident = await seed(h, "att-1", states=[(p, i, "stable") for i, p in enumerate(TRICKY)])
        resp = await h.client.get("/api/v1/attackers/att-1/attribution", headers=bearer(token))
        body = await resp.json()
        assert body["identity_uuid"] == ident
        assert [r["primitive"] for r in body["primitives"]] == sorted(TRICKY)
        assert all(set(r) == ROW_KEYS for r in body["primitives"])
        assert {r["primitive"]: r["current_value"] for r in body["primitives"]} == {
            p: i for i, p in enumerate(TRICKY)
        }
        await seed(h, "att-2", identity=False)
        resp = await h.client.get("/api/v1/attackers/att-2/attribution", headers=bearer(token))
        assert await resp.json() == {"identity_uuid": None, "primitives": []}
        resp = await h.client.get("/api/v1/attackers/att-3/attribution", headers=bearer(token))
        assert resp.status == 404
        resp = await h.client.get("/api/v1/attackers/att-1", headers=bearer(token))
        assert [r["primitive"] for r in (await resp.json())["attribution"]] == sorted(TRICKY)
        await h.client.close()
    finally:
        await pg_server.drop_database(dsn)
