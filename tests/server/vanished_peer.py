"""Run inside a private network namespace (``unshare -n``) by
test_sse_deadline.py: serve the real app on that namespace's loopback, open
an SSE stream, then take the loopback down (the client vanishes: no FIN, no
RST, nothing acknowledged) and print, as JSON, how long the server took to
free the stream's slot."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from decnet_attr.server.app import create_app
from decnet_attr.server.connections import GuardedSite, make_runner
from decnet_attr.server.keys import AUTH, SSE_HUB
from tests.server.conftest import fast_passwords, make_settings
from tests.server.sse_helpers import RawClient, seed_attacker

ATTACKER = "0b5e7a52-0000-4000-8000-0000000000e1"
BOUND = 20.0


async def loopback(state: str) -> None:
    proc = await asyncio.create_subprocess_exec("ip", "link", "set", "lo", state)
    assert await proc.wait() == 0, f"ip link set lo {state} failed"


async def main(data_dir: Path) -> dict[str, float | int | str]:
    await loopback("up")
    settings = make_settings(data_dir, dead_peer_timeout=3.0, sse_keepalive=0.5)
    app = create_app(settings, worker=False, passwords=fast_passwords())
    runner = make_runner(app, settings)
    await runner.setup()
    try:
        site = GuardedSite(runner, "127.0.0.1", 0)
        await site.start()
        from tests.server.conftest import Harness

        h = Harness(app=app, client=None, settings=settings)  # type: ignore[arg-type]
        user = await h.add_user("vic", "viewer")
        token, _claims = app[AUTH].issue_token(user)
        await seed_attacker(h.store, ATTACKER)
        hub = app[SSE_HUB]
        client = await RawClient.connect(
            site.port,
            f"/api/v1/attackers/{ATTACKER}/events",
            {"Authorization": f"Bearer {token}"},
        )
        await client.read_head()
        while hub.stats()["streams_open"] != 1:
            await asyncio.sleep(0.01)
        await loopback("down")
        t0 = time.monotonic()
        while hub.stats()["streams_open"] and time.monotonic() - t0 < BOUND:
            await asyncio.sleep(0.05)
        return {
            "freed_after": time.monotonic() - t0,
            "streams_open": hub.stats()["streams_open"],
        }
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
