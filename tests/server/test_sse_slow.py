"""SSE relay: a slow consumer gets ``gap`` + a fresh snapshot (and is closed if
it overflows again soon) while a fast consumer of the same attacker gets
every event."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from decnet_attr import topics
from decnet_attr.config import Settings
from decnet_attr.server.sse.hub import SseHub, _Stream
from decnet_attr.server.sse.wire import Frame as _Frame
from tests.server.sse_helpers import (
    KEEPALIVE,
    RETRY,
    AiohttpClient,
    FakeAuth,
    FakePrincipal,
    RawClient,
    Reader,
    SseEnv,
    make_env,
    parse,
    seed_attacker,
)

A = "0b5e7a52-0000-4000-8000-00000000000a"
BLOB = "x" * 16_000


async def start_pair(env: SseEnv) -> tuple[Reader, list[bytes], asyncio.Task[None], RawClient]:
    fast = Reader(await env.open(A, user="fast"))
    await fast.frames(3)
    got: list[bytes] = []

    async def collect() -> None:
        with contextlib.suppress(Exception):
            while True:
                got.append(await fast.event(timeout=30))

    task = asyncio.create_task(collect())
    port = env.client.port
    assert port is not None
    slow = await RawClient.connect(
        port, f"/api/v1/attackers/{A}/events", {"X-Test-User": "slow"}, rcvbuf=4096
    )
    await env.wait(lambda: env.hub.stats()["streams_open"] == 2)
    return fast, got, task, slow


async def publish_until(env: SseEnv, stat: str, value: int, limit: int = 2000) -> int:
    n = 0
    while env.hub.stats()[stat] < value:
        n += 1
        assert n < limit, env.hub.stats()
        await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "n": n, "blob": BLOB})
        await asyncio.sleep(0.002)  # let the fast client read
    return n


async def test_slow_consumer_gets_gap_and_snapshot_fast_one_everything(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_queue_size=8, sse_keepalive=30.0)
    await seed_attacker(env.store, A, observations=[("p.q", "v", 1.7e9)])
    _fast, got, task, slow = await start_pair(env)

    n = await publish_until(env, "gaps", 1)
    stats = env.hub.stats()
    assert stats["frames_dropped"] >= 9
    assert stats["streams_open"] == 2
    await env.wait(lambda: len(got) == n)
    assert [parse(f)["data"]["payload"]["n"] for f in got] == list(range(1, n + 1))
    assert [parse(f)["id"] for f in got] == [env.eid(i) for i in range(1, n + 1)]

    # the slow client catches up: frames, then gap + snapshot, then live again
    await slow.read_head()
    frames = []
    while True:
        f = await slow.frame()
        frames.append(f)
        if f.startswith(b"event: snapshot\n") and len(frames) > 3:
            break
    assert frames[:3][:2] == [KEEPALIVE, RETRY]
    assert frames[2].startswith(b"event: snapshot\nid: " + env.eid(0).encode() + b"\n")
    live = frames[3:-2]
    seqs = [parse(f)["data"]["payload"]["n"] for f in live]
    assert seqs == list(range(1, len(seqs) + 1))  # a prefix, in order
    gap = frames[-2]
    dropped = stats["frames_dropped"]
    assert gap == b'event: gap\ndata: {"dropped":%d}\n\n' % dropped
    snap = parse(frames[-1])
    assert snap["data"]["attacker_uuid"] == A
    assert snap["data"]["observations"][0]["value"] == "v"
    snap_seq = int(snap["id"].rsplit("-", 1)[1])
    assert len(seqs) < snap_seq <= n
    # whatever was queued after the overflow follows, then live events
    await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "n": n + 1})
    rest = []
    while True:
        ev = parse(await slow.event())
        rest.append(int(ev["id"].rsplit("-", 1)[1]))
        if ev["data"]["payload"]["n"] == n + 1:
            break
    assert rest == list(range(snap_seq + 1, n + 2))
    assert env.hub.stats()["gaps"] == 1
    assert env.hub.stats()["closed_slow"] == 0
    task.cancel()
    slow.close()


async def test_slow_consumer_overflowing_again_is_closed(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(aiohttp_client, tmp_path, sse_queue_size=8, sse_keepalive=30.0)
    await seed_attacker(env.store, A)
    _fast, got, task, slow = await start_pair(env)
    n = await publish_until(env, "closed_slow", 1)
    stats = env.hub.stats()
    assert stats["gaps"] == 1
    assert stats["streams_open"] == 1
    await env.wait(lambda: len(got) == n)
    assert [parse(f)["data"]["payload"]["n"] for f in got] == list(range(1, n + 1))
    # the slow connection was aborted
    await slow.read_all(timeout=2.0)
    assert slow.eof
    slow.close()
    task.cancel()


def test_stream_overflow_unit() -> None:
    """Drive a stream directly with a 2-frame queue."""
    hub = SseHub(
        settings=Settings(sse_queue_size=2),
        bus=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        authenticate=FakeAuth().authenticate,
        still_valid=FakeAuth().still_valid,
        gap_close_window=0.0,
    )
    p = FakePrincipal("u", "u", "viewer", None, None)
    s = _Stream(hub, A, p)
    hub._streams[s] = None
    frames = [_Frame(i, b"event: x\nid: e-%d\ndata: {}\n\n" % i) for i in range(1, 10)]
    s.offer(frames[0])
    s.offer(frames[1])
    assert [f.seq for f in s.queue] == [1, 2]
    s.offer(frames[2])  # overflow: queue cleared, gap pending with the newest seq
    assert not s.queue
    assert s.resync is not None and s.resync.gap and s.resync.seq == 3
    assert s.resync.head == b'event: gap\ndata: {"dropped":3}\n\n'
    assert hub.stats()["gaps"] == 1 and hub.stats()["frames_dropped"] == 3
    s.offer(frames[3])  # queued behind the resync
    assert [f.seq for f in s.queue] == [4]
    # the gap was delivered; a later overflow (outside the window) is another gap
    s.resync = None
    s.offer(frames[4])
    s.offer(frames[5])
    assert s.resync is not None and s.resync.head == b'event: gap\ndata: {"dropped":3}\n\n'
    assert not s.closed
    # overflowing while the gap is still pending: closed
    for f in frames[6:9]:
        s.offer(f)
    assert s.closed and s.reason == "slow"
    assert hub.stats()["closed_slow"] == 1
    assert hub.stats()["streams_open"] == 0
    s.offer(frames[0])  # ignored once closed
    assert not s.queue


def test_frame_chunk_encoding() -> None:
    raw = b"event: x\nid: e-1\ndata: {}\n\n"
    f = _Frame(1, raw)
    assert f.data == b"%x\r\n%b\r\n" % (len(raw), raw)
    assert f.raw() == raw
