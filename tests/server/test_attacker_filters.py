"""Search, filters and sorts of ``GET /api/v1/attackers``, the same on SQLite
and PostgreSQL: ip (exact, text prefix, IPv4 or IPv6 network), attacker and identity
uuid prefixes, states present, the multi-actor flag, last seen within a
window, sorted by last seen, first seen or observations, paged."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from decnet_attr.server.routes.attackers import ipv4_network_cover
from tests.server.conftest import Harness, HarnessFactory, bearer
from tests.server.test_attackers import seed

MA = [("a.one", 1, "multi_actor"), ("a.two", 2, "multi_actor")]

#: uuid, ip, first/last seen (seconds before now), states, observations
FLEET: list[tuple[str, str, float, list[tuple[str, Any, str]], int]] = [
    ("aa11-one", "10.0.0.5", 60.0, [("p.x", 1, "stable")], 3),
    ("aa22-two", "10.0.1.7", 7200.0, [("p.x", 1, "drifting")], 1),
    ("bb33-three", "10.0.16.9", 3 * 86400.0, MA, 5),
    ("bb44-four", "192.168.1.20", 30.0, [("a.one", 1, "multi_actor")], 2),
    ("cc55-five", "2001:db8::7", 600.0, [], 0),
]


@pytest.fixture(params=["sqlite", "postgresql"])
async def fleet(
    request: pytest.FixtureRequest, make_harness: HarnessFactory
) -> AsyncIterator[tuple[Harness, dict[str, str], dict[str, str]]]:
    """A harness on the backend with :data:`FLEET` seeded; a viewer's headers
    and each attacker's identity uuid."""
    pg: Any = None
    dsn = ""
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_server")
        dsn = await pg.create_database()
        h = await make_harness(db_url=dsn)
    else:
        h = await make_harness()
    identities: dict[str, str] = {}
    now = time.time()  # seeded just before the test reads: the windows hold
    try:
        for uuid, ip, ago, states, n_obs in FLEET:
            ts = now - ago
            ident = await seed(
                h,
                uuid,
                ip,
                ts=ts,
                states=states,
                observations=[("p.x", i, ts) for i in range(n_obs)],
            )
            assert ident is not None
            identities[uuid] = ident
        headers = bearer(await h.token("vic", "viewer"))
        yield h, headers, identities
    finally:
        await h.client.close()
        if pg is not None:
            await pg.drop_database(dsn)


async def uuids(h: Harness, headers: dict[str, str], query: str) -> list[str]:
    resp = await h.client.get(f"/api/v1/attackers?{query}", headers=headers)
    body = await resp.json()
    assert resp.status == 200, body
    assert body["total"] >= len(body["data"])
    return [a["uuid"] for a in body["data"]]


async def test_ip_filters(fleet: Any) -> None:
    h, hd, _ = fleet
    assert await uuids(h, hd, "ip=10.0.0.5") == ["aa11-one"]
    assert await uuids(h, hd, "ip=10.0.0.50") == []
    # an address is exact; a text prefix is the start of the address
    assert await uuids(h, hd, "ip=10.0.1") == ["aa22-two", "bb33-three"]
    assert await uuids(h, hd, "ip=10.0.") == ["aa11-one", "aa22-two", "bb33-three"]
    assert await uuids(h, hd, "ip=192.168.1.2") == []  # an address: exact
    assert await uuids(h, hd, "ip=2001:DB8:") == ["cc55-five"]
    assert await uuids(h, hd, "ip=2001:db8::7") == ["cc55-five"]
    # IPv4 networks: whole octets and not
    assert await uuids(h, hd, "ip=10.0.0.0/24") == ["aa11-one"]
    assert await uuids(h, hd, "ip=10.0.0.0/23") == ["aa11-one", "aa22-two"]
    assert await uuids(h, hd, "ip=10.0.16.0/20") == ["bb33-three"]
    assert await uuids(h, hd, "ip=10.0.0.0/20") == ["aa11-one", "aa22-two"]
    assert sorted(await uuids(h, hd, "ip=10.0.0.0/8")) == ["aa11-one", "aa22-two", "bb33-three"]
    assert await uuids(h, hd, "ip=10.0.0.4/30") == ["aa11-one"]
    assert await uuids(h, hd, "ip=10.0.0.0/30") == []
    assert await uuids(h, hd, "ip=192.168.1.20/32") == ["bb44-four"]


async def test_ipv6_networks(fleet: Any) -> None:
    h, hd, _ = fleet
    now = time.time()
    for uuid, ip in (
        ("dd66-six", "2001:db8:0:1::5"),  # compressed forms differ: no text prefix
        ("ee77-seven", "2001:db9::1"),
        ("ff88-eight", "::ffff:10.9.9.9"),  # stored as 10.9.9.9
    ):
        assert await seed(h, uuid, ip, ts=now, states=[], observations=[]) is not None
    assert await uuids(h, hd, "ip=2001:db8::/32") == ["dd66-six", "cc55-five"]
    assert await uuids(h, hd, "ip=2001:db8::/64") == ["cc55-five"]
    assert await uuids(h, hd, "ip=2001:db8:0:1::/64") == ["dd66-six"]
    assert await uuids(h, hd, "ip=2001:db8::/31") == ["ee77-seven", "dd66-six", "cc55-five"]
    assert await uuids(h, hd, "ip=2001:db8::7/128") == ["cc55-five"]
    # an IPv4 attacker lies in the IPv4-mapped IPv6 network
    assert await uuids(h, hd, "ip=::ffff:10.9.9.0/120") == ["ff88-eight"]


async def test_uuid_prefixes(fleet: Any) -> None:
    h, hd, identities = fleet
    assert await uuids(h, hd, "attacker=bb") == ["bb44-four", "bb33-three"]
    assert await uuids(h, hd, "attacker=BB33") == ["bb33-three"]
    assert await uuids(h, hd, "attacker=zz") == []
    ident = identities["aa22-two"]
    assert await uuids(h, hd, f"identity={ident[:8]}") == ["aa22-two"]
    assert await uuids(h, hd, f"identity={ident}") == ["aa22-two"]
    # "%" and "_" are literal characters, never LIKE wildcards
    resp = await h.client.get("/api/v1/attackers?attacker=a_", headers=hd)
    assert resp.status == 400


async def test_state_multi_actor_and_window(fleet: Any) -> None:
    h, hd, _ = fleet
    assert await uuids(h, hd, "state=multi_actor") == ["bb44-four", "bb33-three"]
    assert await uuids(h, hd, "state=drifting") == ["aa22-two"]
    assert await uuids(h, hd, "state=drifting,stable") == ["aa11-one", "aa22-two"]
    assert await uuids(h, hd, "state=conflicted") == []
    # the flag needs two multi-actor primitives, as the list's own field does
    assert await uuids(h, hd, "multi_actor=true") == ["bb33-three"]
    flagged = await h.client.get("/api/v1/attackers?multi_actor=true", headers=hd)
    assert all(a["multi_actor"] for a in (await flagged.json())["data"])
    assert "bb33-three" not in await uuids(h, hd, "multi_actor=false")
    assert len(await uuids(h, hd, "multi_actor=false")) == 4
    assert await uuids(h, hd, "seen_within=5m") == ["bb44-four", "aa11-one"]
    assert await uuids(h, hd, "seen_within=3h") == [
        "bb44-four",
        "aa11-one",
        "cc55-five",
        "aa22-two",
    ]
    assert await uuids(h, hd, "seen_within=90") == ["bb44-four", "aa11-one"]
    assert len(await uuids(h, hd, "seen_within=7d")) == 5
    # filters combine; the total counts the matches, not the page
    assert await uuids(h, hd, "state=multi_actor&seen_within=1h") == ["bb44-four"]
    resp = await h.client.get("/api/v1/attackers?ip=10.&limit=1&offset=1", headers=hd)
    body = await resp.json()
    assert body["total"] == 3 and len(body["data"]) == 1


async def test_sorts_and_paging(fleet: Any) -> None:
    h, hd, _ = fleet
    by_obs = await uuids(h, hd, "sort_by=observations")
    assert by_obs == ["bb33-three", "aa11-one", "bb44-four", "aa22-two", "cc55-five"]
    assert await uuids(h, hd, "sort_by=observations&order=asc") == by_obs[::-1]
    first = await uuids(h, hd, "sort_by=first_seen&order=asc")
    assert first == ["bb33-three", "aa22-two", "cc55-five", "aa11-one", "bb44-four"]
    assert await uuids(h, hd, "sort_by=last_seen") == first[::-1]
    pages = [
        await uuids(h, hd, f"sort_by=first_seen&order=asc&limit=2&offset={o}") for o in (0, 2, 4)
    ]
    assert [u for p in pages for u in p] == first
    # DECNET's own parameters are unchanged next to ours
    assert await uuids(h, hd, "sort_by=active&search=10.0.0") == ["aa11-one"]


@pytest.mark.parametrize(
    "query",
    [
        "ip=10.0.0.0/33",
        "ip=10.0.0.0/4",
        "ip=2001:db8::/8",
        "ip=hello",
        "attacker=a%25",
        "identity=x y",
        "state=sleepy",
        "state=,",
        "multi_actor=maybe",
        "seen_within=0",
        "seen_within=1w",
        "seen_within=400d",
        "sort_by=colour",
    ],
)
async def test_bad_filters_are_400(harness: Harness, query: str) -> None:
    headers = bearer(await harness.token("vic", "viewer"))
    resp = await harness.client.get(f"/api/v1/attackers?{query}", headers=headers)
    assert resp.status == 400
    assert isinstance((await resp.json())["detail"], str)


@pytest.mark.parametrize("cidr", ["10.0.0.0/8", "10.20.0.0/14", "172.16.0.0/12", "10.0.0.128/25"])
def test_ipv4_network_cover_is_exact(cidr: str) -> None:
    net = ipaddress.ip_network(cidr)
    exact, prefixes = ipv4_network_cover(net)  # type: ignore[arg-type]
    step = max(1, net.num_addresses // 4096)
    for i in range(0, net.num_addresses, step):
        text = str(net.network_address + i)
        assert text in exact or any(text.startswith(p) for p in prefixes), text
    outside = [net.network_address - 1, net.broadcast_address + 1]
    for addr in outside:
        text = str(addr)
        assert text not in exact and not any(text.startswith(p) for p in prefixes), text
