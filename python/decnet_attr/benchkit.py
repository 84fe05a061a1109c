"""Measuring code shared by ``benches/`` (pytest-benchmark) and
``decnet-attr bench`` (sizing a deployment on this machine): the
DECNET-shaped workload, the engine operation that is timed, and the
bounded runs of the engine and of the pipeline.

Workload: a session end produces a burst of one observation per emitted
primitive (38 of them) for one attacker. ``keys`` = identities × 38.
Values are mostly the identity's habit (80 %), otherwise random among the
registry's allowed values; hash primitives rotate 20 % of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import multiprocessing
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from decnet_attr import Engine
from decnet_attr.registry import registry

EMITTED = [p for p in registry().primitives.values() if p.decnet_emits]


# ---- workload -------------------------------------------------------------------------


def observations(
    keys: int, n: int, *, seed: int = 7, ts0: float = 1.7e9, sweep: bool = False
) -> list[dict[str, Any]]:
    """`n` observations over `keys` keys (identities × 38). Sessions pick a
    random identity, or with ``sweep`` go round-robin so every key exists."""
    rnd = random.Random(seed)
    idents = max(1, -(-keys // len(EMITTED)) if sweep else keys // len(EMITTED))
    out: list[dict[str, Any]] = []
    ts = ts0
    session = 0
    while len(out) < n:
        ident = session % idents if sweep else rnd.randrange(idents)
        session += 1
        ts += 1.0
        for spec in EMITTED:
            if spec.kind == "hash":
                value: Any = f"{rnd.getrandbits(64) if rnd.random() < 0.2 else ident:016x}"
            elif not spec.allowed:
                value = "en-US"
            else:
                pick = rnd.randrange(1 << 30) if rnd.random() < 0.2 else ident
                value = spec.allowed[pick % len(spec.allowed)]
            out.append(
                {
                    "identity_uuid": f"{ident:032x}",
                    "primitive": spec.name,
                    "value": value,
                    "ts": ts,
                    "confidence": 1.0,
                }
            )
    return out[:n]


def batches(obs: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [obs[i : i + size] for i in range(0, len(obs), size)]


def ndjson(batch: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(o) for o in batch) + b"\n"


def json_array(batch: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(batch)


# ---- engine ---------------------------------------------------------------------------


def warm_engine(keys: int, *, fresh: int = 60_000) -> tuple[Engine, list[list[dict[str, Any]]]]:
    """An engine holding `keys` keys (every identity had two sessions), plus
    `fresh` new observations (later ts) in batches of 10k for the timed
    calls."""
    eng = Engine()
    idents = max(1, keys // len(EMITTED))
    warm = observations(keys, idents * len(EMITTED) * 2, seed=11, sweep=True)
    for b in batches(warm, 20_000):
        eng.ingest(b)
    new = observations(keys, fresh, seed=12, ts0=2.0e9)
    return eng, batches(new, 10_000)


def payloads(
    fresh: list[list[dict[str, Any]]], size: int, encode: Callable[[Any], bytes] = json_array
) -> list[bytes]:
    """The fresh observations cut into `size`-observation request bodies."""
    return [encode(b[i : i + size]) for b in fresh for i in range(0, len(b), size)]


def ingest_once(engine: Engine, payload: bytes, threads: int = 1) -> None:
    """The timed operation: one request body merged by the engine."""
    engine.ingest_json(payload, threads=threads)


@dataclass(frozen=True)
class Sample:
    what: str
    batch: int
    workers: int
    obs_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def measure_engine(keys: int, size: int, seconds: float, threads: int = 1) -> Sample:
    """Merge `size`-observation JSON bodies into an engine holding `keys`
    keys for about `seconds`; per-call latency and throughput."""
    eng, fresh = warm_engine(keys)
    bodies = payloads(fresh, size)
    lat: list[float] = []
    gc.collect()
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end or i < 3:
        t = time.perf_counter()
        ingest_once(eng, bodies[i % len(bodies)], threads)
        lat.append(time.perf_counter() - t)
        i += 1
    lat.sort()
    return Sample(
        "engine",
        size,
        1,
        size * len(lat) / sum(lat),
        1000 * statistics.median(lat),
        1000 * _percentile(lat, 0.99),
        len(lat),
    )


def _measure_engine_job(args: tuple[int, int, float]) -> Sample:
    return measure_engine(*args)


def measure_engine_processes(keys: int, size: int, seconds: float, workers: int) -> Sample:
    """`workers` processes, each with its own engine (a shard of the keys),
    measured at the same time; throughputs add up."""
    if workers == 1:
        return measure_engine(keys, size, seconds)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        parts = list(pool.map(_measure_engine_job, [(keys // workers, size, seconds)] * workers))
    return Sample(
        "engine",
        size,
        workers,
        sum(p.obs_per_s for p in parts),
        max(p.p50_ms for p in parts),
        max(p.p99_ms for p in parts),
        sum(p.calls for p in parts),
    )


# ---- pipeline -------------------------------------------------------------------------


def as_events(n: int, keys: int = 100_000, seed: int = 21) -> list[dict[str, Any]]:
    """Observations as sensors publish them (attacker, id, evidence_ref)."""
    out = observations(keys, n, seed=seed)
    t0 = time.time() - 86_400.0  # recent: the validator refuses ts far ahead
    for i, o in enumerate(out):
        o["attacker_uuid"] = o.pop("identity_uuid")
        o["id"] = f"b{seed}-{i}"
        o["evidence_ref"] = f"bench:{seed}:{i}"
        o["ts"] = t0 + i * 1e-3  # unique, increasing
    return out


async def run_pipeline(settings: Any, bus: Any, store: Any, events: list[dict[str, Any]]) -> float:
    """Publish `events` to a started worker and wait until it merged them
    all; seconds from the first publish. Written only against the worker's
    public start/stop/stats and the bus's publish."""
    from decnet_attr.topics import attacker_observation
    from decnet_attr.worker import AttributionWorker

    worker = AttributionWorker(settings, bus, store)
    await worker.start()
    try:
        t0 = time.perf_counter()
        for o in events:
            await bus.publish(attacker_observation(o["primitive"]), o, event_id=o["id"])
        deadline = time.monotonic() + 120
        while worker.stats.merged + worker.stats.duplicates < len(events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker merged {worker.stats.merged}/{len(events)}")
            await asyncio.sleep(0.005)
        return time.perf_counter() - t0
    finally:
        await worker.stop()


@contextlib.asynccontextmanager
async def deployment(
    tmp: Path, batch_max: int, bus_url: str = "", db_url: str = ""
) -> AsyncIterator[tuple[Any, Any, Any]]:
    """Settings, a connected bus and an open store: the embedded deployment
    (in-process bus + SQLite in `tmp`) by default, or a running NATS +
    PostgreSQL."""
    from decnet_attr.bus import get_bus
    from decnet_attr.config import Settings
    from decnet_attr.store import store_for

    settings = Settings(
        data_dir=tmp,
        bus_url=bus_url or "memory://",
        db_url=db_url,
        batch_max=batch_max,
        heartbeat_interval=30,
    )
    store = store_for(settings)
    await store.open()
    options = settings.bus_options()  # as `serve` builds it (the ingest journal included)
    if not bus_url:
        options["durable_queue_size"] = 1_000_000
    bus = get_bus(settings.bus_url, **options)
    await bus.connect()
    try:
        yield settings, bus, store
    finally:
        await bus.close()
        await store.close()


async def measure_pipeline(
    batch_max: int, n: int, *, bus_url: str = "", db_url: str = "", seed: int = 21
) -> Sample:
    """Sustained obs/s of one worker at `batch_max`; the per-batch time is
    a full batch at that rate."""
    events = as_events(n, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        async with deployment(Path(d), batch_max, bus_url, db_url) as (settings, bus, store):
            seconds = await run_pipeline(settings, bus, store, events)
    rate = n / seconds
    per_batch = 1000 * min(batch_max, n) / rate
    return Sample(
        "NATS+PostgreSQL" if bus_url else "embedded",
        batch_max,
        1,
        rate,
        per_batch,
        per_batch,
        math.ceil(n / batch_max),
    )


# ---- sizing ---------------------------------------------------------------------------

#: Plan for this share of a measured rate, leaving room for bursts.
HEADROOM = 0.6


def recommend(samples: Sequence[Sample], target: float, cores: int) -> dict[str, Any]:
    """The batch size and worker count for `target` obs/s from the pipeline
    samples (the engine's are an upper bound): the smallest batch whose
    rate, times HEADROOM, per worker covers the target with the fewest
    workers; workers beyond the cores do not add throughput."""
    pipe = [s for s in samples if s.what != "engine"] or list(samples)
    best: tuple[int, int, Sample] | None = None
    for s in sorted(pipe, key=lambda s: s.batch):
        per_worker = s.obs_per_s * HEADROOM
        workers = max(1, math.ceil(target / per_worker)) if per_worker > 0 else 10**6
        if best is None or workers < best[0]:
            best = (workers, s.batch, s)
    assert best is not None
    workers, batch, s = best
    return {
        "target_obs_per_s": target,
        "batch_max": batch,
        "workers": workers,
        "measured_obs_per_s": round(s.obs_per_s),
        "deployment": s.what,
        "fits_this_machine": workers <= cores,
    }
