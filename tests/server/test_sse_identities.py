"""``GET /api/v1/identities/events``: DECNET's identity stream (snapshot, then
every ``identity.*`` event named without its root), sharing the attacker
streams' authentication, per-user cap and resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from decnet_attr import topics
from tests.server.sse_helpers import (
    KEEPALIVE,
    RETRY,
    AiohttpClient,
    Reader,
    SseEnv,
    live_frame,
    make_env,
    parse,
    seed_attacker,
)

A = "0b5e7a52-0000-4000-8000-00000000000a"
B = "0b5e7a52-0000-4000-8000-00000000000b"


@pytest.fixture
async def env(aiohttp_client: AiohttpClient, tmp_path: Path) -> SseEnv:
    return await make_env(aiohttp_client, tmp_path)


async def test_snapshot_then_identity_events_exact_bytes(env: SseEnv) -> None:
    ident = await seed_attacker(env.store, A, identity=True)
    assert ident is not None
    resp = await env.open_identities()
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    reader = Reader(resp)
    keep, retry, snap = await reader.frames(3)
    assert (keep, retry) == (KEEPALIVE, RETRY)
    iso = "2023-11-14T22:13:20.000000Z"  # 1.7e9, when seed_attacker formed it
    assert snap == b"event: snapshot\nid: %b\ndata: %b\n\n" % (
        env.eid(0).encode(),
        orjson.dumps(
            {
                "identities": [
                    {
                        "uuid": ident,
                        "campaign_id": None,
                        "merged_into_uuid": None,
                        "first_seen_at": iso,
                        "last_seen_at": iso,
                        "created_at": iso,
                        "updated_at": iso,
                        "confidence": None,
                        "observation_count": 1,
                    }
                ]
            }
        ),
    )
    formed = {"identity_uuid": "i-2", "attacker_uuid": B, "ts": 1.7e9}
    await env.publish(topics.IDENTITY_FORMED, formed, "formed")
    assert await reader.event() == live_frame(
        "formed", env.eid(1), topics.IDENTITY_FORMED, "formed", 1.7e9, formed
    )
    # attacker and attribution events are not identity events
    await env.publish("attacker.observation.motor.x", {"attacker_uuid": A, "value": 1})
    await env.publish(
        topics.ATTRIBUTION_PROFILE_STATE_CHANGED, {"identity_uuid": ident, "primitive": "p"}
    )
    linked = {"identity_uuid": ident, "observation_uuid": "o-1"}
    await env.publish(topics.IDENTITY_OBSERVATION_LINKED, linked, "linked")
    merged = {"identity_uuid": "i-2", "merged_into_uuid": ident}
    await env.publish(topics.IDENTITY_MERGED, merged)
    got = [parse(await reader.event()) for _ in range(2)]
    assert [(g["event"], g["data"]["payload"]) for g in got] == [
        ("observation.linked", linked),
        ("merged", merged),
    ]
    resp.close()


async def test_snapshot_newest_identities_first_and_empty(env: SseEnv) -> None:
    resp = await env.open_identities()
    reader = Reader(resp)
    assert parse((await reader.frames(3))[2])["data"] == {"identities": []}
    resp.close()
    async with env.store.transaction() as tx:
        await tx.ensure_attackers([(A, None, 10.0), (B, None, 20.0)])
        await tx.ensure_identities([A], 10.0)
        await tx.ensure_identities([B], 20.0)
    resp = await env.open_identities()
    snap = parse((await Reader(resp).frames(3))[2])["data"]
    a, b = (await env.store.get_attacker(A)), (await env.store.get_attacker(B))
    assert a is not None and b is not None
    assert [i["uuid"] for i in snap["identities"]] == [b.identity_id, a.identity_id]
    resp.close()


async def test_shares_the_per_user_cap_and_frees_it(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_max_per_user=2, sse_keepalive=15.0)
    await seed_attacker(env.store, A)
    attacker = await env.open(A)
    ids = await env.open_identities()
    assert attacker.status == ids.status == 200
    await Reader(ids).frames(3)
    third = await env.open_identities()
    assert third.status == 429
    assert await third.json() == {"detail": "SSE connection limit (2) reached"}
    assert (await env.open_identities(user="bob")).status == 200
    ids.close()  # the page reloads: the next stream opens at once
    again = await env.open_identities()
    assert again.status == 200
    for r in (attacker, again):
        r.close()


async def test_auth_required(env: SseEnv) -> None:
    resp = await env.open_identities(user="")
    assert resp.status == 401
    assert await resp.json() == {"detail": "Not authenticated"}
    resp = await env.open_identities(headers={"X-Test-Role": "sensor"})
    assert resp.status == 403
    assert env.hub.stats()["streams_open"] == 0


async def test_resume_with_last_event_id(env: SseEnv) -> None:
    resp = await env.open_identities()
    reader = Reader(resp)
    await reader.frames(3)
    await env.publish(topics.IDENTITY_FORMED, {"identity_uuid": "i-1"})
    first = parse(await reader.event())
    resp.close()
    await env.publish(topics.IDENTITY_FORMED, {"identity_uuid": "i-2"})
    await env.publish(topics.IDENTITY_UNMERGED, {"identity_uuid": "i-1"})
    resumed = await env.open_identities(headers={"Last-Event-ID": first["id"]})
    r2 = Reader(resumed)
    assert (await r2.frames(2)) == [KEEPALIVE, RETRY]
    got = [parse(await r2.event()) for _ in range(2)]
    assert [(g["event"], g["data"]["payload"]["identity_uuid"]) for g in got] == [
        ("formed", "i-2"),
        ("unmerged", "i-1"),
    ]
    resumed.close()
    # an unknown cursor: stale, then a fresh snapshot
    stale = await env.open_identities(headers={"Last-Event-ID": "nope-1"})
    r3 = Reader(stale)
    await r3.frames(2)
    assert parse(await r3.event()) == {"event": "stale", "data": {"reason": "unknown epoch"}}
    assert parse(await r3.event())["event"] == "snapshot"
    stale.close()


async def test_decnet_named_merge_and_unmerge_repoint_attacker_streams(env: SseEnv) -> None:
    await seed_attacker(env.store, A)
    r = Reader(await env.open(A))
    await r.frames(3)
    loser, winner = "c" * 32, "b" * 32
    await env.publish(topics.IDENTITY_FORMED, {"identity_uuid": loser, "attacker_uuid": A})
    # DECNET's clusterer names only winner and loser
    await env.publish(topics.IDENTITY_MERGED, {"winner_uuid": winner, "loser_uuid": loser})
    changed = {"identity_uuid": winner, "primitive": "p", "new_state": "stable", "ts": 1.0}
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, changed, "profile.state_changed")
    assert parse(await asyncio.wait_for(r.event(), 3.0))["data"]["payload"] == changed
    # the un-merge gives the attacker back to the resurrected identity
    await env.publish(
        topics.IDENTITY_UNMERGED,
        {"resurrected_uuid": loser, "former_winner_uuid": winner, "attacker_uuids": [A]},
    )
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, changed, "profile.state_changed")
    back = dict(changed, identity_uuid=loser)
    await env.publish(topics.ATTRIBUTION_PROFILE_STATE_CHANGED, back, "profile.state_changed")
    assert parse(await asyncio.wait_for(r.event(), 3.0))["data"]["payload"] == back
