"""``/api/v1/identities`` against the real app with the worker in process,
and the attacker and identity SSE streams following a real merge."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.server.app import create_app
from decnet_attr.worker import AttributionWorker
from tests.server.conftest import (
    ClientFactory,
    Harness,
    bearer,
    fast_passwords,
    make_settings,
)
from tests.server.sse_helpers import AiohttpClient, Reader, make_env, parse
from tests.worker.helpers import mk_obs, publish_all

pytestmark = pytest.mark.timeout(120)

HASSH = "toolchain.ssh.hassh_client"
MODALITY = "motor.input_modality"


@pytest.fixture
async def wh(tmp_path: Path, aiohttp_client: ClientFactory) -> Harness:
    settings = make_settings(tmp_path / "data", worker=True)
    app = create_app(settings, worker=True, passwords=fast_passwords(), auth_cache_ttl=0.0)
    client = await aiohttp_client(app)
    return Harness(app=app, client=client, settings=settings)


async def get(h: Harness, token: str, url: str, status: int = 200) -> Any:
    resp = await h.client.get(url, headers=bearer(token))
    assert resp.status == status, await resp.text()
    return await resp.json()


async def poll(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_identity_routes_after_a_merge(wh: Harness) -> None:
    sensor = await wh.token("probe", "sensor")
    viewer = await wh.token("analyst", "viewer")
    uuids = []
    for ip in ("198.51.100.1", "198.51.100.2"):
        resp = await wh.client.post("/api/v1/attackers", json={"ip": ip}, headers=bearer(sensor))
        uuids.append((await resp.json())["uuid"])
    a, b = uuids
    ts = time.time() - 100
    items = [
        {"attacker_uuid": a, "primitive": MODALITY, "value": "typed", "ts": ts},
        {"attacker_uuid": b, "primitive": MODALITY, "value": "pasted", "ts": ts + 1},
        {"attacker_uuid": a, "primitive": HASSH, "value": "feedface", "ts": ts + 2},
    ]
    resp = await wh.client.post("/api/v1/observations", json=items, headers=bearer(sensor))
    assert resp.status == 202

    async def identity(x: str) -> str | None:
        body = await get(wh, viewer, f"/api/v1/attackers/{x}/attribution")
        return body["identity_uuid"]  # type: ignore[no-any-return]

    await poll(lambda: _both(identity(a), identity(b)))
    before = {a: await identity(a), b: await identity(b)}
    assert before[a] != before[b]
    first = await get(wh, viewer, "/api/v1/identities")
    assert first["total"] == 2
    link = [{"attacker_uuid": b, "primitive": HASSH, "value": "feedface", "ts": ts + 3}]
    resp = await wh.client.post("/api/v1/observations", json=link, headers=bearer(sensor))
    assert resp.status == 202

    async def merged() -> bool:
        return await identity(a) == await identity(b)

    await poll(merged)
    winner = min(before.values())
    loser = max(before.values())
    assert await identity(a) == winner

    page = await get(wh, viewer, "/api/v1/identities?limit=10")
    assert (page["total"], page["limit"], page["offset"]) == (1, 10, 0)
    [entry] = page["data"]
    assert entry["uuid"] == winner and entry["attacker_count"] == 2
    assert entry["merged_into_uuid"] is None and entry["created_at"].endswith("Z")

    detail = await get(wh, viewer, f"/api/v1/identities/{winner}")
    assert detail["identity_uuid"] == winner
    assert [m["uuid"] for m in detail["attackers"]] == sorted([a, b])
    homes = {m["uuid"]: m["home_identity"] for m in detail["attackers"]}
    assert homes == before
    assert detail["fingerprints"] == [
        {"primitive": HASSH, "value": "feedface", "attacker_uuids": sorted([a, b])}
    ]
    # the identity's rows are what either attacker's attribution shows
    for x in (a, b):
        assert (await get(wh, viewer, f"/api/v1/attackers/{x}/attribution"))[
            "primitives"
        ] == detail["attribution"]
    modality = next(r for r in detail["attribution"] if r["primitive"] == MODALITY)
    assert modality["observation_count"] == 2
    [merge] = detail["merges"]
    assert (merge["kind"], merge["winner_uuid"], merge["loser_uuid"]) == ("merged", winner, loser)
    loser_attacker = a if before[a] == loser else b
    assert merge["attacker_uuids"] == [loser_attacker]
    assert merge["evidence"][0]["evidence"][0]["primitive"] == HASSH

    gone = await get(wh, viewer, f"/api/v1/identities/{loser}")
    assert gone["merged_into_uuid"] == winner and gone["attackers"] == []
    assert gone["merges"] == detail["merges"]

    obs = await get(wh, viewer, f"/api/v1/identities/{winner}/observations?limit=2")
    assert len(obs["data"]) == 2 and obs["next_before"] == obs["data"][-1]["seq"]
    rest = await get(
        wh, viewer, f"/api/v1/identities/{winner}/observations?before={obs['next_before']}"
    )
    assert rest["next_before"] is None
    every = obs["data"] + rest["data"]
    assert len(every) == 4
    assert [o["seq"] for o in every] == sorted((o["seq"] for o in every), reverse=True)
    assert {o["attacker_uuid"] for o in every} == {a, b}

    # errors
    missing = await get(wh, viewer, "/api/v1/identities/nope", 404)
    assert missing == {"detail": "Identity not found"}
    await get(wh, viewer, "/api/v1/identities/nope/observations", 404)
    assert "limit" in (await get(wh, viewer, "/api/v1/identities?limit=0", 400))["detail"]
    bad = await get(wh, viewer, f"/api/v1/identities/{winner}/observations?before=x", 400)
    assert "before" in bad["detail"]
    resp = await wh.client.get("/api/v1/identities")
    assert resp.status == 401
    await get(wh, sensor, "/api/v1/identities", 403)


async def _both(x: Any, y: Any) -> bool:
    return (await x) is not None and (await y) is not None


async def test_streams_follow_a_real_merge(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_keepalive=5.0)
    worker = AttributionWorker(
        make_settings(tmp_path / "w", batch_delay=0.001, multi_actor_tick=3600),
        env.bus,
        env.store,
    )
    await worker.start()
    try:
        a, b = "att-a", "att-b"
        await publish_all(
            env.bus, [mk_obs(a, MODALITY, "typed", 1.0), mk_obs(b, MODALITY, "typed", 2.0)]
        )
        ia = (await env.store.get_attacker(a)).identity_id  # type: ignore[union-attr]
        ib = (await env.store.get_attacker(b)).identity_id  # type: ignore[union-attr]
        assert ia and ib and ia != ib
        # watch the attacker whose identity will lose the merge
        watched, other = (a, b) if ia > ib else (b, a)
        winner, loser = min(ia, ib), max(ia, ib)
        stream = Reader(await env.open(watched))
        await stream.frames(3)  # keepalive, retry, snapshot
        ids = Reader(await env.open_identities())
        await ids.frames(3)
        await publish_all(env.bus, [mk_obs(a, HASSH, "h0", 3.0), mk_obs(b, HASSH, "h0", 4.0)])
        # the identity stream carries the merge in DECNET's names
        names = []
        while "merged" not in names:
            got = parse(await ids.event())
            names.append(got["event"])
            if got["event"] == "merged":
                payload = got["data"]["payload"]
                assert (payload["winner_uuid"], payload["loser_uuid"]) == (winner, loser)
        # the watched attacker's stream now gets the survivor's rows
        await publish_all(env.bus, [mk_obs(other, MODALITY, "typed", 5.0)])
        seen = set()
        while winner not in seen:
            got = parse(await stream.event())
            if got["event"].startswith("attribution."):
                seen.add(got["data"]["payload"]["identity_uuid"])
        assert env.hub.stats()["identities"] == 1
    finally:
        await worker.stop()
