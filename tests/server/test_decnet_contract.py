"""The contract of DECNET's own web front-end (``decnet_web``), pinned field by
field: the attackers list (``AttackerEntry`` and its query), the attacker page
(``AttackerData``, ``BehaviouralObservation``), the token claims it decodes,
the identity stream it opens, and CORS for a UI served from another origin."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from decnet_attr.config import ConfigError, Settings
from decnet_attr.store import ObservationRow
from tests.server.conftest import Harness, HarnessFactory, bearer

# Python types per TypeScript type: "string", "number" (int or float), "boolean",
# arrays, and "X | null".
STR, NUM, BOOL, LIST, DICT = (str,), (int, float), (bool,), (list,), (dict,)
NULL = (type(None),)

#: ``AttackerEntry`` (Attackers.tsx): every field and its type.
ATTACKER_ENTRY: dict[str, tuple[type, ...]] = {
    "uuid": STR,
    "ip": STR,
    "first_seen": STR,
    "last_seen": STR,
    "event_count": NUM,
    "service_count": NUM,
    "decky_count": NUM,
    "services": LIST,
    "deckies": LIST,
    "traversal_path": STR + NULL,
    "is_traversal": BOOL,
    "bounty_count": NUM,
    "credential_count": NUM,
    "fingerprints": LIST,
    "commands": LIST,
    "country_code": STR + NULL,
    "country_source": STR + NULL,
    "asn": NUM + NULL,
    "as_name": STR + NULL,
    "asn_source": STR + NULL,
    "updated_at": STR,
}
#: ``AttackerData`` (AttackerDetail/types.ts): the entry's fields plus these.
ATTACKER_DATA: dict[str, tuple[type, ...]] = {
    **ATTACKER_ENTRY,
    "identity_id": STR + NULL,
    "ptr_record": STR + NULL,
    "behavior": DICT + NULL,
    "service_activity": DICT,
    "ip_leaks": LIST,
    "ip_leaks_total": NUM,
    "observations": LIST,
}
#: ``BehaviouralObservation``.
OBSERVATION: dict[str, tuple[type, ...]] = {
    "primitive": STR,
    "value": (str, int, float, bool, list, dict, type(None)),
    "confidence": NUM,
    "ts": NUM,
    "source": STR,
}
#: Times DECNET's UI hands to ``new Date(...)``.
TIME_FIELDS = ("first_seen", "last_seen", "updated_at")


def check_types(obj: dict[str, Any], spec: dict[str, tuple[type, ...]]) -> None:
    missing = sorted(set(spec) - set(obj))
    assert not missing, f"missing fields: {missing}"
    for key, types in spec.items():
        value = obj[key]
        if bool not in types:
            assert not isinstance(value, bool), (key, value)
        assert isinstance(value, types), (key, value, types)


def check_iso_utc(value: str) -> None:
    from datetime import datetime

    assert value.endswith("Z"), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0


async def seed_shards(h: Harness) -> str:
    """Attacker ``att-1`` with observations from two shards (and one that is not)."""
    async with h.store.transaction() as tx:
        await tx.ensure_attackers([("att-1", "192.0.2.1", 1_700_000_000.5)])
        mapping, _ = await tx.ensure_identities(["att-1"], 1_700_000_000.5)
        ident = mapping["att-1"]
        refs = [
            ("motor.input_modality", "typed", "shard:decky-01/ssh/s.jsonl#a"),
            ("environmental.shell_type", "bash", "shard:decky-01/ssh/s.jsonl#a"),
            ("environmental.shell_type", "zsh", "shard:decky-02/telnet/t.jsonl#b"),
            ("toolchain.c2.beacon_interval_ms", 1500, "manual-import-7"),
        ]
        await tx.insert_observations(
            [
                ObservationRow(
                    id=f"o{i}",
                    attacker_uuid="att-1",
                    primitive=p,
                    value_json=json.dumps(v),
                    ts=1_700_000_010.0 + i,
                    evidence_ref=ref,
                    confidence=0.8,
                    source="decnet/profiler/behave_shell/extract.py",
                    identity_uuid=ident,
                )
                for i, (p, v, ref) in enumerate(refs)
            ]
        )
    return ident


# ---- AttackerEntry and the list query --------------------------------------------------------
async def test_attacker_entry_every_field_and_type(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    await seed_shards(harness)
    # exactly the query Attackers.tsx sends for page 1
    resp = await harness.client.get(
        "/api/v1/attackers?limit=50&offset=0&sort_by=recent", headers=bearer(token)
    )
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"total", "limit", "offset", "data"}
    assert (body["total"], body["limit"], body["offset"]) == (1, 50, 0)
    (entry,) = body["data"]
    check_types(entry, ATTACKER_ENTRY)
    for key in TIME_FIELDS:
        check_iso_utc(entry[key])
    assert entry["first_seen"] == "2023-11-14T22:13:20.500000Z"
    assert (entry["services"], entry["deckies"]) == (["ssh", "telnet"], ["decky-01", "decky-02"])
    assert (entry["service_count"], entry["decky_count"], entry["event_count"]) == (2, 2, 4)
    # the service chip's query and the search box's
    for query, expected in [
        ("service=ssh", 1),
        ("service=http", 0),
        ("search=192.0.2", 1),
        ("search=10.", 0),
        ("search=192.0.2&service=telnet", 1),
        ("search=undefined&service=null", 1),  # "no filter" as DECNET's client may say it
    ]:
        r = await harness.client.get(
            f"/api/v1/attackers?limit=50&offset=0&sort_by=active&{query}", headers=bearer(token)
        )
        page = await r.json()
        assert (page["total"], len(page["data"])) == (expected, expected), query


async def test_list_paging(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    async with harness.store.transaction() as tx:
        await tx.ensure_attackers(
            [(f"att-{i:02d}", f"198.51.100.{i}", 1_700_000_000.0 + i) for i in range(7)]
        )
    seen: list[str] = []
    for page_no in range(1, 5):  # Attackers.tsx: offset = (page - 1) * limit
        r = await harness.client.get(
            f"/api/v1/attackers?limit=3&offset={(page_no - 1) * 3}&sort_by=recent",
            headers=bearer(token),
        )
        page = await r.json()
        assert (page["total"], page["limit"], page["offset"]) == (7, 3, (page_no - 1) * 3)
        seen += [e["uuid"] for e in page["data"]]
    assert seen == [f"att-{i:02d}" for i in range(6, -1, -1)]  # newest first, each once


# ---- AttackerData ----------------------------------------------------------------------------
async def test_attacker_data_every_field_and_type(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    ident = await seed_shards(harness)
    resp = await harness.client.get("/api/v1/attackers/att-1", headers=bearer(token))
    assert resp.status == 200
    data = await resp.json()
    check_types(data, ATTACKER_DATA)
    for key in TIME_FIELDS:
        check_iso_utc(data[key])
    assert data["identity_id"] == ident
    # the arrays the page maps over are there
    for key in ("deckies", "services", "fingerprints", "commands", "ip_leaks", "observations"):
        assert isinstance(data[key], list), key
    assert data["service_activity"] == {"interacted": ["ssh", "telnet"], "scanned": []}
    assert [o["primitive"] for o in data["observations"]] == [
        "environmental.shell_type",
        "motor.input_modality",
        "toolchain.c2.beacon_interval_ms",
    ]
    for o in data["observations"]:
        check_types(o, OBSERVATION)
    assert data["observations"][0]["value"] == "zsh"  # the latest per primitive
    # the attribution endpoint keeps epoch floats (DECNET's shape there)
    r = await harness.client.get("/api/v1/attackers/att-1/attribution", headers=bearer(token))
    assert (await r.json()) == {"identity_uuid": ident, "primitives": []}


# ---- what App.tsx decodes from the token -------------------------------------------------------
async def test_token_claims_decnet_reads(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert isinstance(claims["exp"], (int, float)) and not isinstance(claims["exp"], bool)
    assert claims["uuid"] == harness.users["vic"].uuid
    assert (claims["iss"], claims["aud"]) == (
        harness.settings.jwt_issuer,
        harness.settings.jwt_audience,
    )


# ---- the identity stream, as useIdentityStream opens it -------------------------------------
async def test_identity_stream_with_a_ticket(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    r = await harness.client.post("/api/v1/auth/sse-ticket", headers=bearer(token))
    ticket = (await r.json())["ticket"]
    resp = await harness.client.get(f"/api/v1/identities/events?ticket={ticket}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    body = b""
    while b"event: snapshot" not in body:
        body += await resp.content.readany()
    resp.close()
    # single use
    again = await harness.client.get(f"/api/v1/identities/events?ticket={ticket}")
    assert again.status == 401


# ---- CORS ------------------------------------------------------------------------------------
UI = "http://localhost:5173"


async def test_cors_off_by_default(harness: Harness) -> None:
    token = await harness.token("vic", "viewer")
    resp = await harness.client.get("/api/v1/attackers", headers={**bearer(token), "Origin": UI})
    assert resp.status == 200
    assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    pre = await harness.client.options(
        "/api/v1/attackers",
        headers={"Origin": UI, "Access-Control-Request-Method": "GET"},
    )
    assert "Access-Control-Allow-Origin" not in pre.headers


async def test_cors_for_the_listed_origins_only(make_harness: HarnessFactory) -> None:
    h = await make_harness(cors_origins=(UI, "https://ui.example.org:8443"))
    token = await h.token("vic", "viewer")
    # the preflight of an authenticated GET (axios adds Authorization)
    pre = await h.client.options(
        "/api/v1/attackers",
        headers={
            "Origin": UI,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert pre.status == 200
    assert pre.headers["Access-Control-Allow-Origin"] == UI
    assert "GET" in pre.headers["Access-Control-Allow-Methods"]
    assert "AUTHORIZATION" in pre.headers["Access-Control-Allow-Headers"].upper()
    pre = await h.client.options(
        "/api/v1/auth/sse-ticket",
        headers={"Origin": UI, "Access-Control-Request-Method": "POST"},
    )
    assert pre.status == 200 and pre.headers["Access-Control-Allow-Origin"] == UI
    resp = await h.client.get("/api/v1/attackers", headers={**bearer(token), "Origin": UI})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == UI
    assert "Access-Control-Allow-Credentials" not in resp.headers
    # the event stream carries the headers too
    stream = await h.client.get(
        "/api/v1/identities/events", headers={**bearer(token), "Origin": UI}
    )
    assert stream.status == 200
    assert stream.headers["Access-Control-Allow-Origin"] == UI
    stream.close()
    # errors too: the UI's 401 interceptor must see the status, not a network error
    resp = await h.client.get("/api/v1/attackers", headers={"Origin": UI})
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == UI
    resp = await h.client.get("/api/v1/attackers/nobody", headers={**bearer(token), "Origin": UI})
    assert resp.status == 404 and resp.headers["Access-Control-Allow-Origin"] == UI
    # another origin gets nothing
    other = "http://evil.example"
    resp = await h.client.get("/api/v1/attackers", headers={**bearer(token), "Origin": other})
    assert "Access-Control-Allow-Origin" not in resp.headers
    pre = await h.client.options(
        "/api/v1/attackers", headers={"Origin": other, "Access-Control-Request-Method": "GET"}
    )
    assert pre.status == 403
    assert "Access-Control-Allow-Origin" not in pre.headers


def test_cors_origins_setting() -> None:
    env = {"DECNET_ATTR_CORS_ORIGINS": " http://localhost:5173, https://[::1]:8443 ,"}
    assert Settings.from_env(env).cors_origins == ("http://localhost:5173", "https://[::1]:8443")
    assert Settings.from_env({}).cors_origins == ()
    for bad in ("http://localhost:5173/", "localhost:5173", "ftp://x", "http://a/b"):
        with pytest.raises(ConfigError, match="cors_origins"):
            Settings.from_env({"DECNET_ATTR_CORS_ORIGINS": bad})
