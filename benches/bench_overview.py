"""The overview stream's cost per client under ingest: flat, whatever the rate.

One process: the :class:`~decnet_attr.server.sse.SseHub` on the in-process
bus and a SQLite store, served on 127.0.0.1, ``CLIENTS`` overview streams
read by aiohttp clients, and a publisher handing the bus observation
batches as the API does (one ``attacker.observation.batch`` event of
``BATCH`` observations per HTTP body). Two runs of ``RUN_SECONDS``: no
ingest, then ``INGEST_RATE`` observations per second.

Figures, printed and kept in the benchmark's ``extra_info`` (nothing is
asserted but the frame bound): frames and bytes per second per client, and
the process CPU (server, publisher and clients together) per second of the
run, for each run. The frame rate is bounded by ``OVERVIEW_INTERVAL``: the
counters are coalesced, so the bytes a client receives do not grow with the
ingest rate; the CPU difference between the runs is the bus and the relay
counting batches (never expanding them).

Run with ``make bench`` (about 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from tests.server.sse_helpers import FakeAuth, build_app

from decnet_attr import topics
from decnet_attr.bus import get_bus
from decnet_attr.bus.memory import InProcessBus
from decnet_attr.config import Settings
from decnet_attr.server.overview import OVERVIEW_INTERVAL
from decnet_attr.store import open_store

CLIENTS = 20
RUN_SECONDS = 3.0
INGEST_RATE = 100_000
BATCH = 1_000
#: One observation line of a batch, about as long as a real one.
LINE = (
    '{"attacker_uuid":"0b5e7a52-0000-4000-8000-000000000001",'
    '"primitive":"environmental.shell_type","value":"bash","ts":1700000000.0,'
    '"evidence_ref":"shard:decky-1/ssh/session.log#42","confidence":0.9,"source":"sensor-1"}'
)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _client(session: aiohttp.ClientSession, url: str, out: dict[str, int]) -> None:
    async with session.get(url, headers={"X-Test-User": "bench"}) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            out["bytes"] += len(chunk)
            out["frames"] += chunk.count(b"event: overview\n")


async def _run(rate: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(sse_keepalive=15.0, sse_max_per_user=CLIENTS + 1)
        store = open_store(f"sqlite://{Path(tmp) / 'attr.db'}")
        bus = get_bus("memory://")
        assert isinstance(bus, InProcessBus)
        app, hub = build_app(settings, store, bus, FakeAuth())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/api/v1/overview/events"
        counts = [{"bytes": 0, "frames": 0} for _ in range(CLIENTS)]
        session = aiohttp.ClientSession()
        tasks = [asyncio.create_task(_client(session, url, c)) for c in counts]
        try:
            while hub.stats()["streams_open"] < CLIENTS:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            for c in counts:
                c["bytes"] = c["frames"] = 0
            payload = {"ndjson": "\n".join([LINE] * BATCH), "count": BATCH}
            per_tick = rate / BATCH / 100  # batches per 10 ms
            cpu0, t0 = _cpu(), time.monotonic()
            sent = 0.0
            while (now := time.monotonic()) - t0 < RUN_SECONDS:
                due = (now - t0) * 100 * per_tick
                while sent < due:
                    await bus.publish(topics.OBSERVATION_BATCH, payload, event_type="batch")
                    sent += 1
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - t0
            cpu = _cpu() - cpu0
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await session.close()
            await runner.cleanup()
        frames = sum(c["frames"] for c in counts) / CLIENTS / elapsed
        return {
            "ingest_obs_per_s": sent * BATCH / elapsed,
            "frames_per_s_per_client": frames,
            "bytes_per_s_per_client": sum(c["bytes"] for c in counts) / CLIENTS / elapsed,
            "cpu_s_per_s": cpu / elapsed,
        }


def test_overview_cost_per_client(benchmark: Any) -> None:
    results: dict[str, dict[str, float]] = {}

    def scenario() -> None:
        results["idle"] = asyncio.run(_run(0))
        results["ingest"] = asyncio.run(_run(INGEST_RATE))

    benchmark.pedantic(scenario, rounds=1, iterations=1)
    for name, r in results.items():
        benchmark.extra_info[name] = r
        print(
            f"\noverview, {name}: {r['ingest_obs_per_s']:,.0f} obs/s ingest, "
            f"{CLIENTS} clients: {r['frames_per_s_per_client']:.2f} frames/s and "
            f"{r['bytes_per_s_per_client']:,.0f} B/s per client, "
            f"process CPU {r['cpu_s_per_s'] * 100:.0f}%"
        )
    bound = 1 / OVERVIEW_INTERVAL
    assert results["ingest"]["frames_per_s_per_client"] <= bound + 0.5
