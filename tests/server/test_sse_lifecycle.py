"""SSE relay: streams end on revocation / invalidation / expiry / shutdown;
bus outages; no leaks over many connect/disconnect cycles."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

from decnet_attr import topics
from decnet_attr.bus.memory import InProcessBus
from decnet_attr.server.sse import PATTERNS, SYSTEM_AUTH_REVOKED
from tests.server.sse_helpers import (
    KEEPALIVE,
    AiohttpClient,
    RawClient,
    Reader,
    SseEnv,
    live_frame,
    make_env,
    parse,
    seed_attacker,
)

A = "0b5e7a52-0000-4000-8000-00000000000a"
B = "0b5e7a52-0000-4000-8000-00000000000b"


async def opened(env: SseEnv, attacker: str = A, user: str = "alice", **headers: str) -> Reader:
    resp = await env.open(attacker, user=user, headers=headers)
    assert resp.status == 200
    r = Reader(resp)
    await r.frames(3)
    return r


# ---- revocation, invalidation, expiry -----------------------------------------------------
async def test_revocation_event_closes_matching_streams(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_keepalive=30.0)
    await seed_attacker(env.store, A)
    a_j1 = await opened(env, **{"X-Test-Jti": "j1"})
    a_j2 = await opened(env, **{"X-Test-Jti": "j2"})
    bob = await opened(env, user="bob")
    await env.publish(SYSTEM_AUTH_REVOKED, {"user_uuid": "u-alice", "jti": "j1"})
    assert await a_j1.eof(timeout=1.0) == b""  # just ends: no error frame
    assert env.hub.stats()["closed_revoked"] == 1
    # the others still get events
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "score": 1})
    assert parse(await a_j2.event())["event"] == "attacker.scored"
    assert parse(await bob.event())["event"] == "attacker.scored"
    # jti null (password change, disabled user): every stream of the user
    await env.publish(SYSTEM_AUTH_REVOKED, {"user_uuid": "u-alice", "jti": None})
    assert await a_j2.eof(timeout=1.0) == b""
    stats = env.hub.stats()
    assert stats["closed_revoked"] == 2
    assert stats["streams_open"] == 1
    bob.resp.close()


async def test_still_valid_recheck_closes_stream(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(
        aiohttp_client, tmp_path, sse_keepalive=30.0, hub_kw={"revalidate_interval": 0.1}
    )
    await seed_attacker(env.store, A)
    alice = await opened(env)
    bob = await opened(env, user="bob")
    await env.wait(lambda: env.auth.checks >= 2)
    env.auth.invalid.add("alice")
    assert await alice.eof(timeout=2.0) == b""
    assert env.hub.stats()["closed_revoked"] == 1
    assert env.hub.stats()["streams_open"] == 1
    bob.resp.close()


async def test_stream_closes_at_token_expiry(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_keepalive=30.0)
    await seed_attacker(env.store, A)
    t0 = time.time()
    r = await opened(env, **{"X-Test-Exp": str(t0 + 0.6)})
    assert await r.eof(timeout=3.0) == b""
    took = time.time() - t0
    assert 0.55 <= took < 0.9  # at exp, not at the next housekeeping tick (1 s here)
    assert env.hub.stats()["closed_expired"] == 1


async def test_stop_ends_streams_promptly(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_keepalive=30.0)
    await seed_attacker(env.store, A)
    readers = [await opened(env, user=f"user{i}") for i in range(5)]
    t0 = time.monotonic()
    await env.hub.stop()
    for r in readers:
        assert await r.eof(timeout=1.0) == b""
    assert time.monotonic() - t0 < 1.0
    stats = env.hub.stats()
    assert stats["streams_open"] == 0 and stats["handlers"] == 0 and stats["users"] == 0
    assert env.bus.stats()["subscriptions"] == 0  # released
    resp = await env.open(A)
    assert resp.status == 503
    assert await resp.json() == {"detail": "Event stream unavailable"}
    await env.hub.stop()  # idempotent


async def test_graceful_app_shutdown_not_held_by_streams(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_keepalive=30.0)
    await seed_attacker(env.store, A)
    r = await opened(env)
    t0 = time.monotonic()
    await env.client.close()  # runs on_shutdown (hub.stop) then the server's graceful shutdown
    assert time.monotonic() - t0 < 2.0
    assert env.hub.stats()["streams_open"] == 0
    r.resp.close()


# ---- bus outages -------------------------------------------------------------------------
async def test_bus_closed_keepalives_continue_then_resubscribe(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, hub_kw={"max_backoff": 0.4})
    await seed_attacker(env.store, A)
    r = await opened(env)
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "score": 1})
    assert parse(await r.event())["id"] == env.eid(1)
    assert env.hub.stats()["bus_connected"] is True

    await env.bus.close()
    await env.wait(lambda: env.hub.stats()["bus_connected"] is False)
    # the stream stays open with keepalives (sse_keepalive=0.2)
    assert await r.frame(timeout=1.0) == KEEPALIVE
    assert await r.frame(timeout=1.0) == KEEPALIVE
    # resubscribe attempts fail on the closed bus, with backoff
    await asyncio.sleep(0.5)
    assert env.hub.stats()["bus_resubscribes"] == 0

    new_bus = InProcessBus()
    await new_bus.connect()
    env.hub.set_bus(new_bus)
    await env.wait(lambda: env.hub.stats()["bus_connected"] is True)
    assert env.hub.stats()["bus_resubscribes"] == 1
    assert new_bus.stats()["subscriptions"] == len(PATTERNS)
    # events may have been lost: stale + fresh snapshot, old cursors no longer resume
    assert await r.event() == b'event: stale\ndata: {"reason":"bus reconnected"}\n\n'
    snap = parse(await r.event())
    assert snap["event"] == "snapshot"
    assert snap["id"] == env.eid(2)
    await new_bus.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "score": 2}, ts=1.7e9)
    assert await r.event() == live_frame(
        "attacker.scored",
        env.eid(3),
        "attacker.scored",
        "",
        1.7e9,
        {"attacker_uuid": A, "score": 2},
    )
    r.resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    resp = await env.open(A, headers={"Last-Event-ID": env.eid(1)})
    frames = await Reader(resp).frames(3)
    assert frames[2] == b'event: stale\ndata: {"reason":"cursor evicted"}\n\n'
    resp.close()
    await env.hub.stop()
    await new_bus.close()


class FlakyBus(InProcessBus):
    """An in-process bus whose transport can 'drop' (as a NATS client does
    while it reconnects: subscriptions survive, events in between are lost)."""

    down = False
    reconnects = 0

    @property
    def connected(self) -> bool:
        return not self.down and super().connected

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "reconnects": self.reconnects}


async def test_transport_blip_resynchronises_streams(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path)
    env.hub.set_bus(flaky := FlakyBus())
    await flaky.connect()
    await seed_attacker(env.store, A)
    await env.wait(lambda: env.hub.stats()["bus_connected"] is True)
    r = await opened(env)
    resyncs = env.hub.stats()["resyncs"]
    # seen down by the housekeeping tick
    flaky.down = True
    await asyncio.sleep(0.3)
    assert env.hub.stats()["bus_connected"] is False
    flaky.down = False
    await env.wait(lambda: env.hub.stats()["resyncs"] == resyncs + 1)
    assert env.hub.stats()["bus_connected"] is True
    assert await r.event() == b'event: stale\ndata: {"reason":"bus reconnected"}\n\n'
    assert parse(await r.event())["event"] == "snapshot"
    # too short to be seen, but the reconnect counter moved
    flaky.reconnects += 1
    await env.wait(lambda: env.hub.stats()["resyncs"] == resyncs + 2)
    assert await r.event() == b'event: stale\ndata: {"reason":"bus reconnected"}\n\n'
    assert parse(await r.event())["event"] == "snapshot"
    r.resp.close()
    await env.hub.stop()
    await flaky.close()


# ---- leaks -------------------------------------------------------------------------------
CYCLES = 10_000
CONCURRENCY = 50


async def test_no_leaks_over_many_connect_disconnect_cycles(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(
        aiohttp_client,
        tmp_path,
        sse_keepalive=0.2,
        sse_max_per_user=CONCURRENCY,
        hub_kw={"resume_ttl": 0.2},
    )
    attackers = [f"0b5e7a52-0000-4000-8000-{i:012x}" for i in range(10)]
    for a in attackers:
        await seed_attacker(env.store, a, identity=True, observations=[("p.q", "v", 1.7e9)])
    port = env.client.port
    assert port is not None

    async def cycle(i: int) -> None:
        a = attackers[i % len(attackers)]
        c = await RawClient.connect(
            port, f"/api/v1/attackers/{a}/events", {"X-Test-User": f"user{i % 5}"}
        )
        await c.read_head()
        assert [await c.frame() for _ in range(2)] == [KEEPALIVE, b"retry: 3000\n\n"]
        assert (await c.frame()).startswith(b"event: snapshot\n")
        c.close()

    async def worker(k: int) -> None:
        for i in range(k, CYCLES, CONCURRENCY):
            await cycle(i)

    async def publisher() -> None:
        n = 0
        while not done.is_set():
            n += 1
            await env.bus.publish(
                topics.ATTACKER_SCORED, {"attacker_uuid": attackers[n % 10], "score": n}
            )
            await asyncio.sleep(0.001)

    # warm up, then take the baseline
    for i in range(CONCURRENCY):
        await cycle(i)
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    done = asyncio.Event()
    pub = asyncio.create_task(publisher())
    t0 = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    elapsed = time.monotonic() - t0
    done.set()
    await pub
    await env.wait(lambda: env.hub.stats()["handlers"] == 0, timeout=5.0)
    stats = env.hub.stats()
    assert stats["streams_open"] == 0
    assert stats["users"] == 0
    assert stats["streams_total"] >= CYCLES
    assert stats["channels"] <= len(attackers)
    assert stats["identities"] <= len(attackers)
    assert env.bus.stats()["subscriptions"] == len(PATTERNS)
    assert not env.hub._streams and not env.hub._by_user
    # idle resume buffers are dropped after resume_ttl
    await env.wait(lambda: env.hub.stats()["channels"] == 0, timeout=3.0)
    assert env.hub.stats()["identities"] == 0
    assert not env.hub._idle and not env.hub._by_identity
    await asyncio.sleep(0.1)
    gc.collect()
    assert len(asyncio.all_tasks()) <= tasks_before
    print(f"\n{CYCLES} SSE connect/disconnect cycles in {elapsed:.1f} s")
