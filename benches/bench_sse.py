"""SSE relay at scale: 1k and 10k concurrent streams.

The server is a real aiohttp server in its own process (``python -m
benches.bench_sse serve``): the :class:`~decnet_attr.server.sse.SseHub` on
the in-process bus, a seeded SQLite store, trivial authentication, and a
publisher inside the server process driven by ``POST /bench/run`` (a timer
publishing ``attacker.scored`` events round-robin over the attackers). The
client (this pytest process) opens the streams on raw asyncio sockets and
measures publish→client latency from the event ``ts`` (the bus stamps it at
publish; same machine clock).

Figures, printed (targets are not asserted):

- p50 / p99 publish→client latency at ~20,000 deliveries/s
  (target p99 <= 50 ms);
- server CPU per delivered event: ``getrusage(RUSAGE_SELF)`` of the server
  over the run / deliveries; "net" subtracts a run publishing the same rate
  to attackers nobody watches (publisher + bus + router look-up)
  (target <= 5 us);
- memory per idle stream: server RSS delta / streams (target <= 8 KB).

Run with ``make bench``; about a minute in total.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DELIVERIES_PER_S = 20_000
STREAMS_PER_ATTACKER = 10
RUN_SECONDS = 3.0
#: A session end emits up to 38 observations for one attacker at once (docs/decnet.md#session-burst).
BURST = 38
CONNECT_CONCURRENCY = 256


def _raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------------------------------
# server process
# ------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _sys_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def attacker_uuid(i: int) -> str:
    return f"bench-{i:08d}-0000-4000-8000-000000000000"


async def _seed(store: Any, attackers: int) -> None:
    import orjson

    from decnet_attr.store import ObservationRow, StateRow

    async with store.transaction() as tx:
        uuids = [attacker_uuid(i) for i in range(attackers)]
        await tx.ensure_attackers([(u, None, 1.7e9) for u in uuids])
        mapping, _ = await tx.ensure_identities(uuids, 1.7e9)
        obs, states = [], []
        for u in uuids:
            for j, p in enumerate(("motor.typing.cadence", "toolchain.shell", "locale.keyboard")):
                obs.append(
                    ObservationRow(
                        id=f"{u}-{j}",
                        attacker_uuid=u,
                        primitive=p,
                        value_json=orjson.dumps(f"v{j}").decode(),
                        ts=1.7e9 + j,
                        evidence_ref=f"ev-{u}-{j}",
                        confidence=0.9,
                        source="bench",
                        identity_uuid=mapping[u],
                    )
                )
                states.append(
                    StateRow(
                        identity_uuid=mapping[u],
                        primitive=p,
                        current_value_json=orjson.dumps(f"v{j}").decode(),
                        state="stable",
                        confidence=0.8,
                        observation_count=5,
                        last_change_ts=1.7e9,
                        last_observation_ts=1.7e9 + j,
                    )
                )
        await tx.insert_observations(obs)
        await tx.upsert_states(states)


async def _serve(port: int, attackers: int, db: str) -> None:
    from dataclasses import dataclass

    from aiohttp import web

    from decnet_attr.bus.memory import InProcessBus
    from decnet_attr.config import Settings
    from decnet_attr.server.sse import SseHub
    from decnet_attr.store import open_store

    @dataclass(frozen=True)
    class Principal:
        user_uuid: str
        username: str
        role: str = "viewer"
        jti: str | None = None
        exp: float | None = None
        via_ticket: bool = False

    async def authenticate(request: web.Request) -> Principal:
        user = request.headers.get("X-User", "anon")
        return Principal(user, user)

    async def still_valid(app: web.Application, principal: Any, now: float) -> bool:
        return True

    settings = Settings(sse_max_per_user=1_000_000, sse_keepalive=15.0)
    store = open_store(f"sqlite://{db}")
    await store.open()
    await _seed(store, attackers)
    bus = InProcessBus(queue_size=1 << 16)
    await bus.connect()
    hub = SseHub(
        settings=settings,
        bus=bus,
        store=store,
        authenticate=authenticate,
        still_valid=still_valid,
    )
    loop = asyncio.get_running_loop()
    quit_ = asyncio.Event()

    async def stats(request: web.Request) -> web.Response:
        gc.collect()
        return web.json_response({"rss": _rss(), "cpu": _cpu(), **hub.stats()})

    async def run(request: web.Request) -> web.Response:
        rate = float(request.query["rate"])
        duration = float(request.query["duration"])
        live = request.query.get("targets", "live") == "live"
        burst = int(request.query.get("burst", 1))
        n_att = int(request.query.get("attackers", attackers))
        targets = [attacker_uuid(i) if live else f"ghost-{i}" for i in range(n_att)]
        s0, c0, t0, k0 = hub.stats(), _cpu(), loop.time(), _sys_cpu()
        n = 0
        while (elapsed := loop.time() - t0) < duration:
            due = (int(elapsed * rate) - n) // burst * burst
            for _ in range(due):
                target = targets[(n // burst) % n_att]
                await bus.publish("attacker.scored", {"attacker_uuid": target, "n": n})
                n += 1
            await asyncio.sleep(0.002)
        wall = loop.time() - t0
        await asyncio.sleep(0.3)  # stragglers (queued streams)
        c1, s1, k1 = _cpu(), hub.stats(), _sys_cpu()
        return web.json_response(
            {
                "published": n,
                "wall": wall,
                "cpu": c1 - c0,
                "sys": k1 - k0,
                "frames": s1["frames_sent"] - s0["frames_sent"],
                "dropped": s1["frames_dropped"] - s0["frames_dropped"],
                "gaps": s1["gaps"] - s0["gaps"],
            }
        )

    async def stop(request: web.Request) -> web.Response:
        quit_.set()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/v1/attackers/{uuid}/events", hub.handle)
    app.router.add_get("/bench/stats", stats)
    app.router.add_post("/bench/run", run)
    app.router.add_post("/bench/quit", stop)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=8192)
    await site.start()
    await hub.start(app)
    print("READY", flush=True)
    await quit_.wait()
    await hub.stop()
    await runner.cleanup()
    await bus.close()
    await store.close()


def _server_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--attackers", type=int, required=True)
    ap.add_argument("--db", required=True)
    args = ap.parse_args(argv)
    _raise_nofile(65536)
    asyncio.run(_serve(args.port, args.attackers, args.db))


# ------------------------------------------------------------------------------------------
# client
# ------------------------------------------------------------------------------------------
TS_RE = re.compile(rb'data: \{"topic":"[^"]*","type":"[^"]*","ts":([0-9.eE+-]+)')


class _Recorder:
    def __init__(self) -> None:
        self.on = False
        self.latencies: list[float] = []
        self.frames = 0


class _SseClient(asyncio.Protocol):
    def __init__(self, request: bytes, ready: asyncio.Future[None], rec: _Recorder) -> None:
        self.request = request
        self.ready = ready
        self.rec = rec
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        done, self.buf = buf[: end + 2], buf[end + 2 :]
        if not self.ready.done():
            if b"event: snapshot" in done:
                self.ready.set_result(None)
            return
        rec = self.rec
        if rec.on:
            for m in TS_RE.finditer(done):
                rec.latencies.append(now - float(m.group(1)))
                rec.frames += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the snapshot: {exc}"))


async def _get_json(port: int, method: str, path: str, timeout: float = 60.0) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close"
    writer.write(request.encode() + b"\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def _scenario(port: int, streams: int, attackers: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    rec = _Recorder()
    base = await _get_json(port, "GET", "/bench/stats")
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    transports: list[asyncio.Transport] = []

    async def open_one(i: int) -> None:
        req = (
            f"GET /api/v1/attackers/{attacker_uuid(i % attackers)}/events HTTP/1.1\r\n"
            f"Host: bench\r\nX-User: u{i % 1000}\r\n\r\n"
        ).encode()
        async with sem:
            ready: asyncio.Future[None] = loop.create_future()
            t, _ = await loop.create_connection(
                lambda: _SseClient(req, ready, rec), "127.0.0.1", port
            )
            transports.append(t)
            await asyncio.wait_for(ready, 60)

    t0 = time.monotonic()
    await asyncio.gather(*(open_one(i) for i in range(streams)))
    connect_s = time.monotonic() - t0
    await asyncio.sleep(1.0)
    idle = await _get_json(port, "GET", "/bench/stats")
    assert idle["streams_open"] == streams, idle

    rate = DELIVERIES_PER_S * attackers / streams
    out: dict[str, Any] = {
        "streams": streams,
        "attackers": attackers,
        "connect_s": connect_s,
        "kb_per_idle_stream": (idle["rss"] - base["rss"]) / streams / 1024,
    }
    for mode, burst in (("uniform", 1), ("burst", BURST)):
        query = f"rate={rate}&duration={RUN_SECONDS}&burst={burst}"
        baseline = await _get_json(port, "POST", f"/bench/run?{query}&targets=none")
        rec.latencies, rec.frames = [], 0
        rec.on = True
        run = await _get_json(port, "POST", f"/bench/run?{query}")
        await asyncio.sleep(0.2)
        rec.on = False
        lat = rec.latencies
        frames = max(run["frames"], 1)
        out[mode] = {
            "events_per_s": run["published"] / run["wall"],
            "deliveries_per_s": run["frames"] / run["wall"],
            "server_frames": run["frames"],
            "client_frames": rec.frames,
            "dropped": run["dropped"],
            "gaps": run["gaps"],
            "p50_ms": _pct(lat, 0.50) * 1e3,
            "p99_ms": _pct(lat, 0.99) * 1e3,
            "max_ms": max(lat, default=float("nan")) * 1e3,
            "cpu_us_per_delivery": run["cpu"] / frames * 1e6,
            "cpu_us_per_delivery_net": (run["cpu"] - baseline["cpu"]) / frames * 1e6,
            "sys_us_per_delivery_net": (run["sys"] - baseline["sys"]) / frames * 1e6,
        }
    for t in transports:
        t.close()
    await asyncio.sleep(0.2)  # let the transports actually close
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(streams: int) -> dict[str, Any]:
    _raise_nofile(streams + 1024)
    attackers = max(1, streams // STREAMS_PER_ATTACKER)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        with subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benches.bench_sse",
                "serve",
                "--port",
                str(port),
                "--attackers",
                str(attackers),
                "--db",
                str(Path(tmp) / "attr.db"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line.strip() == "READY", line
                result = asyncio.run(_scenario(port, streams, attackers))
                asyncio.run(_get_json(port, "POST", "/bench/quit"))
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return result


def _report(r: dict[str, Any]) -> str:
    lines = [
        f"\nSSE relay, {r['streams']:,} streams over {r['attackers']:,} attackers "
        f"(opened in {r['connect_s']:.1f} s); "
        f"server memory {r['kb_per_idle_stream']:.1f} KB per idle stream (target <= 8 KB)"
    ]
    for mode, what in (
        ("uniform", "events spread over attackers (1 frame per write)"),
        ("burst", f"bursts of {BURST} events per attacker (a session end)"),
    ):
        m = r[mode]
        lines.append(
            f"  {mode}: {what}\n"
            f"    {m['events_per_s']:,.0f} events/s -> {m['deliveries_per_s']:,.0f} deliveries/s "
            f"(server {m['server_frames']:,}, client saw {m['client_frames']:,}; "
            f"dropped {m['dropped']}, gaps {m['gaps']})\n"
            f"    latency p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms, "
            f"max {m['max_ms']:.1f} ms (target p99 <= 50 ms)\n"
            f"    server CPU {m['cpu_us_per_delivery']:.2f} us/delivery, "
            f"{m['cpu_us_per_delivery_net']:.2f} us net of the publisher, of which kernel "
            f"{m['sys_us_per_delivery_net']:.2f} us (target <= 5 us)"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("streams", [1_000, 10_000])
def test_sse_streams(benchmark: Any, streams: int) -> None:
    results: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: results.append(run_case(streams)), rounds=1, iterations=1)
    r = results[0]
    benchmark.extra_info.update(r)
    print(_report(r))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _server_main(sys.argv[2:])
    else:
        for n in [int(a) for a in sys.argv[1:]] or (1_000, 10_000):
            print(_report(run_case(n)))
