"""``GET /api/v1/overview/events``: the fleet summary (snapshot, then coalesced
``overview`` frames at most twice a second whatever the ingest rate), every
``multi_actor_suspected`` as an ``alert`` and every new attacker as an
``attacker.new`` frame; the attacker streams' authentication and per-user cap."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from decnet_attr import topics
from decnet_attr.server.overview import COUNTS_INTERVAL, OVERVIEW_INTERVAL
from tests.server.sse_helpers import (
    KEEPALIVE,
    RETRY,
    AiohttpClient,
    Reader,
    SseEnv,
    make_env,
    parse,
    seed_attacker,
)

A = "0b5e7a52-0000-4000-8000-00000000000a"
B = "0b5e7a52-0000-4000-8000-00000000000b"
SUSPECTED = {
    "identity_uuid": "i-1",
    "primitives": ["a.one", "a.two"],
    "evidence_summary": "2 primitives flagged multi_actor",
    "attacker_uuids": [A],
    "evidence": {"a.one": {"values": ["x", "y", "x", "y"]}},
}


@pytest.fixture
async def env(aiohttp_client: AiohttpClient, tmp_path: Path) -> SseEnv:
    return await make_env(aiohttp_client, tmp_path)


async def next_named(reader: Reader, name: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame called *name* (others skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = parse(await reader.event(max(0.01, deadline - time.monotonic())))
        if frame.get("event") == name:
            return frame


async def test_snapshot_counts_alerts_and_new_attackers(env: SseEnv) -> None:
    await seed_attacker(env.store, A, states=[("a.one", 1, "multi_actor"), ("p.x", 2, "stable")])
    await seed_attacker(env.store, B, identity=True)
    # an alert from before the client connects is in its snapshot
    await env.publish(topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED, SUSPECTED, "suspected")
    resp = await env.open_overview()
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    reader = Reader(resp)
    assert await reader.frames(2) == [KEEPALIVE, RETRY]
    snap = parse(await reader.event())
    assert snap["event"] == "snapshot" and snap["id"].startswith(env.epoch)
    ov = snap["data"]["overview"]
    assert (ov["attackers"], ov["identities"]) == (2, 2)
    assert ov["states"] == {
        "stable": 1,
        "drifting": 0,
        "conflicted": 0,
        "multi_actor": 1,
        "unknown": 0,
    }
    assert ov["alerts_total"] == 1
    assert [a["payload"] for a in snap["data"]["alerts"]] == [SUSPECTED]

    # live: an alert and a new attacker, each as its own frame with an id
    second = dict(SUSPECTED, identity_uuid="i-2")
    await env.publish(topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED, second, "suspected")
    alert = await next_named(reader, "alert")
    assert alert["data"]["topic"] == topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED
    assert alert["data"]["payload"] == second
    assert alert["id"].startswith(env.epoch)
    formed = {"identity_uuid": "i-3", "attacker_uuid": "new-one", "ts": 1.7e9}
    await env.publish(topics.IDENTITY_FORMED, formed, "formed")
    new = await next_named(reader, "attacker.new")
    assert new["data"]["payload"] == formed
    # then the summary catches up (coalesced; no id: never replayed)
    summary = await next_named(reader, "overview")
    assert "id" not in summary
    assert summary["data"]["alerts_total"] == 2
    assert summary["data"]["new_attackers_total"] == 1
    # the newest alert first in a new client's snapshot
    other = await env.open_overview(user="bob")
    r2 = Reader(other)
    await r2.frames(2)
    snap2 = parse(await r2.event())
    assert [a["payload"]["identity_uuid"] for a in snap2["data"]["alerts"]] == ["i-2", "i-1"]
    for r in (resp, other):
        r.close()


async def test_frame_rate_is_bounded_while_observations_pour_in(env: SseEnv) -> None:
    resp = await env.open_overview()
    reader = Reader(resp)
    await reader.frames(3)
    batches, per_batch, seconds = 0, 200, 2.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for _ in range(20):
            await env.bus.publish(
                topics.OBSERVATION_BATCH, {"ndjson": "", "count": per_batch}, event_type="batch"
            )
            batches += 1
        await asyncio.sleep(0.005)
    frames: list[dict[str, Any]] = []
    until = time.monotonic() + OVERVIEW_INTERVAL * 3  # the last tick's frame
    with pytest.raises(asyncio.TimeoutError):
        while True:
            left = until - time.monotonic()
            frames.append(parse(await reader.event(timeout=max(left, 0.001))))
    elapsed = time.monotonic() - t0
    overview = [f for f in frames if f["event"] == "overview"]
    bound = elapsed / OVERVIEW_INTERVAL + 2  # the tick in flight at each end
    assert 2 <= len(overview) <= bound, (len(overview), bound)
    assert {f["event"] for f in frames} == {"overview"}
    last = overview[-1]["data"]
    # every observation counted from the batch sizes, none expanded
    assert last["observations_total"] == batches * per_batch
    assert max(f["data"]["ingest_rate"] for f in overview) > 0
    resp.close()


async def test_worker_health_from_the_bus(env: SseEnv) -> None:
    resp = await env.open_overview()
    reader = Reader(resp)
    await reader.frames(3)
    health = {"worker": "attribution", "running": True, "lag": 0.25, "merged": 12, "received": 14}
    await env.publish(topics.SYSTEM_ATTRIBUTION_HEALTH, health, "health")
    frame = await next_named(reader, "overview")
    (w,) = frame["data"]["workers"]
    assert {k: w[k] for k in health} == health
    assert frame["data"]["lag_seconds"] == 0.25
    resp.close()


async def test_shares_the_per_user_cap_and_needs_auth(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_max_per_user=2, sse_keepalive=15.0)
    await seed_attacker(env.store, A)
    attacker = await env.open(A)
    ov = await env.open_overview()
    assert attacker.status == ov.status == 200
    third = await env.open_overview()
    assert third.status == 429
    assert third.headers["Retry-After"]
    assert (await env.open_overview(user="")).status == 401
    assert (await env.open_overview(headers={"X-Test-Role": "sensor"})).status == 403
    for r in (attacker, ov):
        r.close()


async def test_resume_replays_alerts_else_stale_and_snapshot(env: SseEnv) -> None:
    watcher = await env.open_overview(user="bob")  # keeps the buffer alive
    resp = await env.open_overview()
    reader = Reader(resp)
    await reader.frames(3)
    await env.publish(topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED, SUSPECTED, "s")
    first = await next_named(reader, "alert")
    resp.close()
    await env.publish(topics.IDENTITY_FORMED, {"identity_uuid": "i-9", "attacker_uuid": B})
    resumed = await env.open_overview(headers={"Last-Event-ID": first["id"]})
    r2 = Reader(resumed)
    await r2.frames(2)
    got = parse(await r2.event())
    assert got["event"] == "attacker.new" and got["data"]["payload"]["attacker_uuid"] == B
    resumed.close()
    watcher.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    # nobody watching: nothing is buffered, so an old cursor gets a snapshot
    await env.publish(topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED, SUSPECTED, "s")
    late = await env.open_overview(headers={"Last-Event-ID": got["id"]})
    r3 = Reader(late)
    await r3.frames(2)
    assert parse(await r3.event()) == {"event": "stale", "data": {"reason": "cursor evicted"}}
    snap = parse(await r3.event())
    assert snap["event"] == "snapshot" and len(snap["data"]["alerts"]) == 2
    late.close()


async def test_totals_catch_up_after_the_last_event(env: SseEnv) -> None:
    """The store's totals are read at most every COUNTS_INTERVAL: a change
    that came in just after a read is still sent once the interval is over,
    not only with the next idle frame."""
    resp = await env.open_overview()
    reader = Reader(resp)
    await reader.frames(3)
    await seed_attacker(env.store, A, identity=True)
    await env.publish(topics.IDENTITY_FORMED, {"identity_uuid": "i-a", "attacker_uuid": A})
    while (await next_named(reader, "overview"))["data"]["attackers"] != 1:
        pass
    await seed_attacker(env.store, B, identity=True)
    t0 = time.monotonic()
    await env.publish(topics.IDENTITY_FORMED, {"identity_uuid": "i-b", "attacker_uuid": B})
    deadline = COUNTS_INTERVAL + OVERVIEW_INTERVAL * 3
    while (await next_named(reader, "overview", timeout=deadline))["data"]["attackers"] != 2:
        assert time.monotonic() - t0 < deadline
    assert time.monotonic() - t0 < deadline
    resp.close()
