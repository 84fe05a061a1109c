"""The overview stream's cost per client under ingest: flat, whatever the rate.

One process: the :class:`~decnet_attr.server.sse.SseHub` on the in-process
bus and a SQLite store, served on 127.0.0.1, overview streams read by
aiohttp clients, and a publisher handing the bus observation batches as the
API does (one ``attacker.observation.batch`` event of ``BATCH`` observations
per HTTP body). Runs of ``RUN_SECONDS`` (:data:`RUNS`): 20 clients and no
ingest, 20 clients at 100k obs/s, 200 clients at 100k obs/s.

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

#: (clients, observations per second) of each run
RUNS = {"idle": (20, 0), "ingest": (20, 100_000), "ingest, 10x clients": (200, 100_000)}
RUN_SECONDS = 3.0
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


async def _run(clients: int, rate: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(sse_keepalive=15.0, sse_max_per_user=clients + 1)
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
        counts = [{"bytes": 0, "frames": 0} for _ in range(clients)]
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        tasks = [asyncio.create_task(_client(session, url, c)) for c in counts]
        try:
            while hub.stats()["streams_open"] < clients:
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
        frames = sum(c["frames"] for c in counts) / clients / elapsed
        return {
            "clients": clients,
            "ingest_obs_per_s": sent * BATCH / elapsed,
            "frames_per_s_per_client": frames,
            "bytes_per_s_per_client": sum(c["bytes"] for c in counts) / clients / elapsed,
            "cpu_s_per_s": cpu / elapsed,
        }


def test_overview_cost_per_client(benchmark: Any) -> None:
    results: dict[str, dict[str, float]] = {}

    def scenario() -> None:
        for name, (clients, rate) in RUNS.items():
            results[name] = asyncio.run(_run(clients, rate))

    benchmark.pedantic(scenario, rounds=1, iterations=1)
    for name, r in results.items():
        benchmark.extra_info[name] = r
        print(
            f"\noverview, {name}: {r['ingest_obs_per_s']:,.0f} obs/s ingest, "
            f"{r['clients']:.0f} clients: {r['frames_per_s_per_client']:.2f} frames/s and "
            f"{r['bytes_per_s_per_client']:,.0f} B/s per client, "
            f"process CPU {r['cpu_s_per_s'] * 100:.0f}%"
        )
    few, many = results["ingest"], results["ingest, 10x clients"]
    per_client = (many["cpu_s_per_s"] - few["cpu_s_per_s"]) / (many["clients"] - few["clients"])
    benchmark.extra_info["cpu_s_per_s_per_client"] = per_client
    print(f"process CPU per added client at 100k obs/s: {per_client * 1e6:,.0f} us/s")
    bound = 1 / OVERVIEW_INTERVAL
    assert few["frames_per_s_per_client"] <= bound + 0.5
