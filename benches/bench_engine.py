"""Engine benchmarks. Run with ``make bench``.

- ``Engine.ingest_json`` and ``Engine.ingest`` throughput with batches of 1k
  and 10k observations over 10k, 100k and 1M distinct keys, next to
  ``orjson.loads`` of the same bytes (the cost of just parsing them in
  Python);
- a DECNET-style baseline (per observation: take the key's whole series and
  recompute it in pure Python) at series lengths 10, 100 and 1000, next to
  the engine merging into keys with that much history;
- engine memory per key at 1M keys.

Workload, warm engines and the timed call come from ``decnet_attr.benchkit``
(the code ``decnet-attr bench`` measures with). Each case
records ``obs_per_s`` in the benchmark's extra_info; the summary table is
printed at the end of the run (benches/conftest.py).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import orjson
import pytest

from benches import baseline
from benches.conftest import record
from decnet_attr import Engine, benchkit
from decnet_attr.benchkit import EMITTED, batches, ingest_once, json_array, ndjson, observations

KEYS = [10_000, 100_000, 1_000_000]
SIZES = [1_000, 10_000]

_engines: dict[int, tuple[Engine, list[list[dict[str, Any]]]]] = {}


def warm_engine(keys: int) -> tuple[Engine, list[list[dict[str, Any]]]]:
    """benchkit's warm engine, one at a time (they are large)."""
    if keys not in _engines:
        _engines.clear()
        gc.collect()
        _engines[keys] = benchkit.warm_engine(keys)
    return _engines[keys]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("keys", KEYS)
def test_ingest_json(benchmark: Any, keys: int, size: int) -> None:
    eng, fresh = warm_engine(keys)
    payloads = benchkit.payloads(fresh, size)
    it = iter(range(10**9))

    def run() -> None:
        ingest_once(eng, payloads[next(it) % len(payloads)])

    benchmark.pedantic(run, rounds=max(20, 60_000 // size), iterations=1, warmup_rounds=2)
    record(benchmark, f"ingest_json keys={keys:,} batch={size:,}", size)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("keys", [100_000])
def test_ingest_ndjson(benchmark: Any, keys: int, threads: int) -> None:
    """NDJSON (what sensors and DECNET exports send), batches of 10k; with
    threads=2 the parse runs on the second core while this one merges."""
    eng, fresh = warm_engine(keys)
    payloads = benchkit.payloads(fresh, 10_000, ndjson)
    it = iter(range(10**9))

    def run() -> None:
        ingest_once(eng, payloads[next(it) % len(payloads)], threads)

    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=2)
    record(benchmark, f"ingest_json NDJSON keys={keys:,} batch=10,000 threads={threads}", 10_000)


def test_orjson_ndjson_floor(benchmark: Any) -> None:
    """The same NDJSON bytes through orjson: one loads() per line."""
    fresh = observations(100_000, 60_000, seed=12, ts0=2.0e9)
    payloads = [ndjson(fresh[i : i + 10_000]) for i in range(0, len(fresh), 10_000)]
    it = iter(range(10**9))

    def run() -> None:
        loads = orjson.loads
        for line in payloads[next(it) % len(payloads)].splitlines():
            loads(line)

    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=2)
    record(benchmark, "orjson.loads per NDJSON line (parse floor) batch=10,000", 10_000)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("keys", KEYS)
def test_ingest_dicts(benchmark: Any, keys: int, size: int) -> None:
    eng, fresh = warm_engine(keys)
    chunks = [b[i : i + size] for b in fresh for i in range(0, len(b), size)]
    it = iter(range(10**9))

    def run() -> None:
        eng.ingest(chunks[next(it) % len(chunks)])

    benchmark.pedantic(run, rounds=max(20, 60_000 // size), iterations=1, warmup_rounds=2)
    record(benchmark, f"ingest keys={keys:,} batch={size:,}", size)


@pytest.mark.parametrize("size", SIZES)
def test_orjson_loads_same_bytes(benchmark: Any, size: int) -> None:
    fresh = observations(100_000, 60_000, seed=12, ts0=2.0e9)
    payloads = [json_array(fresh[i : i + size]) for i in range(0, len(fresh), size)]
    it = iter(range(10**9))

    def run() -> None:
        orjson.loads(payloads[next(it) % len(payloads)])

    benchmark.pedantic(run, rounds=max(20, 60_000 // size), iterations=1, warmup_rounds=2)
    record(benchmark, f"orjson.loads (parse floor) batch={size:,}", size)


@pytest.mark.parametrize("length", [10, 100, 1000])
def test_decnet_style_baseline(benchmark: Any, length: int) -> None:
    """Per observation: load the key's whole series (a list here: no DB, the
    baseline's best case) and recompute it in pure Python."""
    series = baseline.series("motor.input_modality", length)
    n = 200 if length <= 100 else 40

    def run() -> None:
        baseline.merge_per_observation(series, n)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, f"DECNET-style recompute, series length {length}", n)


@pytest.mark.parametrize("mode", ["array", "ndjson-2-threads"])
@pytest.mark.parametrize("length", [10, 100, 1000])
def test_engine_with_history(benchmark: Any, length: int, mode: str) -> None:
    """The engine merging into keys that already hold `length` observations
    (its cost does not depend on the history); as a JSON array on one
    thread, and as NDJSON parsed on a second thread."""
    eng = Engine()
    keys = 1000
    hist = [
        {
            "identity_uuid": f"{k:032x}",
            "primitive": "motor.input_modality",
            "value": "typed",
            "ts": float(t),
        }
        for t in range(length)
        for k in range(keys)
    ]
    eng.ingest(hist)
    encode = json_array if mode == "array" else ndjson
    threads = 1 if mode == "array" else 2
    new = [
        encode(
            [
                {
                    "identity_uuid": f"{k:032x}",
                    "primitive": "motor.input_modality",
                    "value": "typed",
                    "ts": float(length + r),
                }
                for k in range(keys)
            ]
        )
        for r in range(50)
    ]
    it = iter(range(10**9))

    def run() -> None:
        eng.ingest_json(new[next(it) % len(new)], threads=threads)

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=1)
    record(benchmark, f"engine, keys with {length} observations of history ({mode})", keys)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_per_key_at_1m_keys(benchmark: Any) -> None:
    _engines.clear()
    gc.collect()
    keys = 1_000_000
    idents = keys // len(EMITTED) + 1
    data = [
        json_array(b)
        for b in batches(observations(keys, idents * len(EMITTED) * 3, seed=5, sweep=True), 20_000)
    ]
    gc.collect()
    before = _rss()
    eng = Engine()

    def fill() -> None:
        for d in data:
            eng.ingest_json(d)

    benchmark.pedantic(fill, rounds=1, iterations=1)
    gc.collect()
    per_key = (_rss() - before) / len(eng)
    benchmark.extra_info["keys"] = len(eng)
    benchmark.extra_info["rss_bytes_per_key"] = per_key
    benchmark.extra_info["heap_estimate_bytes_per_key"] = eng.stats()["heap_bytes"] / len(eng)
    record(
        benchmark,
        f"memory: {per_key:.0f} B/key RSS at {len(eng):,} keys "
        f"(engine's own estimate {eng.stats()['heap_bytes'] / len(eng):.0f} B/key)",
        len(data) * 20_000,
    )
    assert len(eng) >= keys
