"""Security review item 1, SSE side: a stream whose client stops reading (or
vanished without a FIN) gives its slot back within the write deadline, and
stream sockets carry TCP keepalive / ``TCP_USER_TIMEOUT``."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decnet_attr import topics
from tests.server.sse_helpers import AiohttpClient, RawClient, make_env, seed_attacker

A = "0b5e7a52-0000-4000-8000-0000000000d1"
BLOB = "x" * 16_000


async def test_a_client_that_stops_reading_frees_its_slot_at_the_write_deadline(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    env = await make_env(
        aiohttp_client,
        tmp_path,
        sse_queue_size=100_000,  # never a gap: only the deadline can end it
        sse_keepalive=30.0,
        sse_write_timeout=0.5,
        dead_peer_timeout=20.0,
    )
    await seed_attacker(env.store, A, observations=[("p.q", "v", 1.7e9)])
    port = env.client.port
    assert port is not None
    stuck = await RawClient.connect(
        port, f"/api/v1/attackers/{A}/events", {"X-Test-User": "stuck"}, rcvbuf=4096
    )
    await env.wait(lambda: env.hub.stats()["streams_open"] == 1)
    stream = next(iter(env.hub._streams))
    assert stream.transport is not None
    sock = stream.transport.get_extra_info("socket")
    # the socket is set to notice a vanished peer by itself
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 20_000
    # small kernel buffers so that the transport backs up quickly
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    t0 = time.monotonic()
    stalled_at = None
    n = 0
    while env.hub.stats()["streams_open"]:
        n += 1
        assert n < 400 and time.monotonic() - t0 < 10, env.hub.stats()
        await env.publish(topics.ATTACKER_SCORED, {"attacker_uuid": A, "n": n, "blob": BLOB})
        await asyncio.sleep(0.01)
        if stalled_at is None and stream.draining:
            stalled_at = time.monotonic()
    assert stalled_at is not None
    assert time.monotonic() - stalled_at < 2.0
    assert env.hub.stats()["closed_slow"] == 1
    assert stream.user not in env.hub._by_user  # the cap slot is free
    stuck.close()


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (util-linux, iproute2)",
)
def test_a_vanished_client_frees_its_stream_slot(tmp_path: Path) -> None:
    """The client disappears without a FIN (the loopback of a private network
    namespace goes down): TCP_USER_TIMEOUT makes the kernel give up on the
    unacknowledged keepalives, and the slot is free within
    ``dead_peer_timeout`` (3 s here) plus a keepalive period, not after
    TCP's many-minute retransmission limit."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.server.vanished_peer", str(tmp_path / "d")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["streams_open"] == 0, result
    assert result["freed_after"] < 6.0, result
