"""SSE relay: event ids, Last-Event-ID resume, stale cursors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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
    snapshot_frame,
)

A = "0b5e7a52-0000-4000-8000-00000000000a"
B = "0b5e7a52-0000-4000-8000-00000000000b"
EMPTY: dict[str, Any] = {
    "attacker_uuid": A,
    "observations": [],
    "identity_uuid": None,
    "attribution": [],
}


def scored(env: SseEnv, seq: int, score: int, attacker: str = A) -> bytes:
    return live_frame(
        "attacker.scored",
        env.eid(seq),
        "attacker.scored",
        "",
        1.7e9,
        {"attacker_uuid": attacker, "score": score},
    )


async def publish_scores(env: SseEnv, scores: range, attacker: str = A) -> None:
    for n in scores:
        await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": attacker, "score": n})


@pytest.fixture
async def env(aiohttp_client: AiohttpClient, tmp_path: Path) -> SseEnv:
    e = await make_env(aiohttp_client, tmp_path, sse_resume_buffer=4)
    await seed_attacker(e.store, A)
    await seed_attacker(e.store, B)
    return e


async def test_resume_replays_exactly_the_missed_frames(env: SseEnv) -> None:
    resp = await env.open(A)
    r = Reader(resp)
    frames = await r.frames(3)
    assert parse(frames[2])["id"] == env.eid(0)
    await publish_scores(env, range(1, 4))
    got = [await r.event() for _ in range(3)]
    assert got == [scored(env, i, i) for i in range(1, 4)]
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    # missed while disconnected (B's event is not A's business)
    await publish_scores(env, range(4, 5))
    await publish_scores(env, range(5, 6), attacker=B)
    await publish_scores(env, range(6, 7))

    resp = await env.open(A, headers={"Last-Event-ID": env.eid(3)})
    assert resp.status == 200
    r = Reader(resp)
    # B has no stream: its event was not even framed (no id used)
    assert await r.frames(4) == [KEEPALIVE, RETRY, scored(env, 4, 4), scored(env, 5, 6)]
    # ...then live
    await publish_scores(env, range(7, 8))
    assert await r.event() == scored(env, 6, 7)
    assert env.hub.stats()["resumes"] == 1
    resp.close()


async def test_resume_by_query_parameter_and_from_the_snapshot_id(env: SseEnv) -> None:
    resp = await env.open(A)
    snap = parse((await Reader(resp).frames(3))[2])
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    await publish_scores(env, range(1, 3))
    resp = await env.open(A, params={"last_event_id": snap["id"]})
    r = Reader(resp)
    assert await r.frames(4) == [KEEPALIVE, RETRY, scored(env, 1, 1), scored(env, 2, 2)]
    resp.close()


async def test_resume_with_nothing_missed_sends_only_the_preamble(env: SseEnv) -> None:
    rb = await env.open(B, user="bob")
    await publish_scores(env, range(1, 3), attacker=B)
    resp = await env.open(A)
    r = Reader(resp)
    frames = await r.frames(3)
    assert parse(frames[2])["id"] == env.eid(2)
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 1)
    resp = await env.open(A, headers={"Last-Event-ID": env.eid(2)})
    r = Reader(resp)
    assert await r.frames(2) == [KEEPALIVE, RETRY]
    await publish_scores(env, range(3, 4))
    assert await r.event() == scored(env, 3, 3)
    resp.close()
    rb.close()


@pytest.mark.parametrize(
    ("cursor", "reason"),
    [
        ("deadbeef-1", "unknown epoch"),
        ("garbage", "malformed cursor"),
        ("x-1e3", "malformed cursor"),
        ("x-\u00b2", "malformed cursor"),
        (None, "unknown cursor"),  # this epoch, a seq not issued yet
    ],
)
async def test_unknown_cursor_gets_stale_then_snapshot(
    env: SseEnv, cursor: str | None, reason: str
) -> None:
    rb = await env.open(B, user="bob")
    await publish_scores(env, range(1, 2), attacker=B)
    if cursor is None:
        cursor = env.eid(99)
    resp = await env.open(A, headers={"Last-Event-ID": cursor})
    frames = await Reader(resp).frames(4)
    assert frames[:2] == [KEEPALIVE, RETRY]
    assert frames[2] == b'event: stale\ndata: {"reason":"%b"}\n\n' % reason.encode()
    assert frames[3] == snapshot_frame(env.eid(1), EMPTY)
    assert env.hub.stats()["stale"] == 1
    resp.close()
    rb.close()


async def test_evicted_cursor_gets_stale(env: SseEnv) -> None:
    # sse_resume_buffer=4: 6 missed frames do not fit
    resp = await env.open(A)
    await Reader(resp).frames(3)
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    await publish_scores(env, range(1, 7))
    resp = await env.open(A, headers={"Last-Event-ID": env.eid(0)})
    frames = await Reader(resp).frames(4)
    assert frames[2] == b'event: stale\ndata: {"reason":"cursor evicted"}\n\n'
    assert frames[3] == snapshot_frame(env.eid(6), EMPTY)
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    # a cursor still inside the buffer resumes
    resp = await env.open(A, headers={"Last-Event-ID": env.eid(2)})
    assert await Reader(resp).frames(6) == [KEEPALIVE, RETRY] + [
        scored(env, i, i) for i in range(3, 7)
    ]
    resp.close()


async def test_idle_buffer_dropped_after_ttl(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    env = await make_env(aiohttp_client, tmp_path, hub_kw={"resume_ttl": 0.2})
    await seed_attacker(env.store, A)
    resp = await env.open(A)
    await Reader(resp).frames(3)
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0)
    await publish_scores(env, range(1, 2))  # buffered while the channel lives
    await env.wait(lambda: env.hub.stats()["channels"] == 0)
    await publish_scores(env, range(2, 3))  # nobody listens: not even framed
    assert env.hub.stats()["events_routed"] == 1
    resp = await env.open(A, headers={"Last-Event-ID": env.eid(0)})
    frames = await Reader(resp).frames(4)
    assert frames[2] == b'event: stale\ndata: {"reason":"cursor evicted"}\n\n'
    assert parse(frames[3])["event"] == "snapshot"
    resp.close()


async def test_ids_increase_and_are_shared_by_streams(env: SseEnv) -> None:
    r1 = Reader(await env.open(A))
    r2 = Reader(await env.open(A, user="bob"))
    await r1.frames(3)
    await r2.frames(3)
    await publish_scores(env, range(1, 6))
    f1 = [parse(await r1.event())["id"] for _ in range(5)]
    f2 = [parse(await r2.event())["id"] for _ in range(5)]
    assert f1 == f2 == [env.eid(i) for i in range(1, 6)]
    r1.resp.close()
    r2.resp.close()


async def test_disconnect_detected_without_traffic(env: SseEnv) -> None:
    resp = await env.open(A)
    await Reader(resp).frames(3)
    resp.close()
    await env.wait(lambda: env.hub.stats()["streams_open"] == 0, timeout=2.0)
    await asyncio.sleep(0)
