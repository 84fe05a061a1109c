"""The ``unix://`` bus client: frame decoding, and events received through a
DECNET-style broker (tests/unixbroker.py) from a bare publisher.

Run with ``make bench`` (or ``pytest benches/bench_unix.py --benchmark-enable``).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import orjson
from tests.unixbroker import RawClient, UnixBroker, short_socket_dir

from benches.conftest import record
from decnet_attr.bus.base import Event
from decnet_attr.bus.unix import Frame, FrameDecoder, UnixBus, encode_frame

FRAMES = 2000


def _envelope(i: int) -> bytes:
    payload = {
        "primitive": "motor.input_modality",
        "value": "typed" if i % 2 else "pasted",
        "confidence": 1.0,
        "window": {"start_ts": 1e9 + i, "end_ts": 1e9 + i},
        "source": "decnet/profiler/behave_shell/extract.py",
        "evidence_ref": f"session:{i}",
        "identity_ref": None,
        "id": f"{i:032x}",
        "ts": 1e9 + i,
        "v": 1,
        "attacker_uuid": f"att-{i % 50}",
    }
    return orjson.dumps(
        {
            "v": 1,
            "id": f"{i:032x}",
            "topic": "attacker.observation.motor.input_modality",
            "type": "motor.input_modality",
            "ts": 1e9 + i,
            "payload": payload,
        }
    )


def test_decode_evt_frames(benchmark: Any) -> None:
    """Bytes as they come off the socket (64 KiB reads) -> Events."""
    stream = b"".join(
        encode_frame("EVT", "attacker.observation.motor.input_modality", _envelope(i))
        for i in range(FRAMES)
    )
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

    def run() -> int:
        dec = FrameDecoder()
        n = 0
        for chunk in chunks:
            for item in dec.feed(chunk):
                assert isinstance(item, Frame)
                Event.from_dict(item.args, orjson.loads(item.body))
                n += 1
        return n

    assert run() == FRAMES
    benchmark(run)
    record(benchmark, "unix:// decode EVT frames -> Event", FRAMES)


async def _through_broker(n: int) -> float:
    d = short_socket_dir()
    try:
        async with UnixBroker(d / "bus.sock") as broker:
            bus = UnixBus(broker.path)
            await bus.connect()
            sub = bus.subscribe("attacker.observation.>")
            await sub.wait_ready(5)
            pub = await RawClient.open(broker.path)
            frames = [
                encode_frame("PUB", "attacker.observation.motor.input_modality", _envelope(i))
                for i in range(n)
            ]
            t0 = time.perf_counter()
            got = 0

            async def consume() -> None:
                nonlocal got
                async for _ev in sub:
                    got += 1
                    if got == n:
                        return

            task = asyncio.create_task(consume())
            for i in range(0, n, 200):  # below the broker's 1,024-frame queue
                pub.writer.write(b"".join(frames[i : i + 200]))
                await pub.writer.drain()
                while bus.stats()["received"] < i:
                    await asyncio.sleep(0)
            await asyncio.wait_for(task, 30)
            rate = n / (time.perf_counter() - t0)
            assert bus.stats()["dropped"] == 0
            await pub.close()
            await bus.close()
            return rate
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_events_through_the_broker(benchmark: Any) -> None:
    """Publisher -> test broker -> UnixBus -> subscription (all on this loop;
    the broker is Python too, so this bounds the client from below)."""
    n = 10_000
    rates: list[float] = []
    benchmark.pedantic(lambda: rates.append(asyncio.run(_through_broker(n))), rounds=3)
    benchmark.extra_info["events_per_s"] = max(rates)
    record(benchmark, "unix:// events through a test broker", n)


async def _worker_through_broker(n: int) -> float:
    from benches.bench_worker import as_events
    from decnet_attr.config import Settings
    from decnet_attr.store import open_store
    from decnet_attr.topics import attacker_observation
    from decnet_attr.worker import AttributionWorker

    d = short_socket_dir()
    try:
        async with UnixBroker(d / "bus.sock") as broker:
            settings = Settings(data_dir=d, bus_url=f"unix://{broker.path}", heartbeat_interval=30)
            store = open_store(settings.store_url)
            await store.open()
            bus = UnixBus(broker.path, durable_queue_size=1_000_000)
            await bus.connect()
            worker = AttributionWorker(settings, bus, store)
            await worker.start()
            await bus.flush()
            pub = await RawClient.open(broker.path)
            events = as_events(n, seed=23)
            frames = [
                encode_frame(
                    "PUB",
                    attacker_observation(o["primitive"]),
                    orjson.dumps({"type": o["primitive"], "payload": o}),
                )
                for o in events
            ]
            t0 = time.perf_counter()
            for i in range(0, n, 200):  # below the broker's 1,024-frame queue
                pub.writer.write(b"".join(frames[i : i + 200]))
                await pub.writer.drain()
                while bus.stats()["received"] < i:
                    await asyncio.sleep(0)
            deadline = time.monotonic() + 300
            while worker.stats.merged < n and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            rate = n / (time.perf_counter() - t0)
            assert worker.stats.merged == n and bus.stats()["dropped"] == 0, worker.health()
            await worker.stop()
            await pub.close()
            await bus.close()
            await store.close()
            return rate
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_worker_fed_through_the_broker(benchmark: Any) -> None:
    """Publisher -> test broker -> UnixBus -> worker (SQLite), 20k observations
    over 100k keys; broker, worker and publisher share one loop."""
    n = 20_000
    rates: list[float] = []
    benchmark.pedantic(lambda: rates.append(asyncio.run(_worker_through_broker(n))), rounds=2)
    benchmark.extra_info["obs_per_s"] = max(rates)
    record(benchmark, "unix:// worker (SQLite) fed through a test broker", n)
