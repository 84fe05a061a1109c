"""API throughput.

- ``GET /api/v1/attackers/{uuid}/attribution`` requests per second with N
  concurrent keep-alive clients;
- ``POST /api/v1/observations`` observations per second, end to end: a 202
  means the in-process worker committed the batch (durable acceptance).

The server is the real thing (``decnet_attr.server.main.serve``: aiohttp's
runner on 127.0.0.1, SQLite store, in-process bus, no worker) in its own
process, so that the load generator does not share its event loop or GIL.
The store is seeded with one attacker whose identity has 38 attribution rows
(one per primitive DECNET emits), the size of a fully profiled attacker.
Every request is authenticated (JWT decode, user and revocation look-ups).
The ingest case runs the worker in the server process and sends the
session-end bursts of ``benches/workload.py`` (38 primitives per attacker).

Run with ``make bench`` (``--benchmark-enable``); a few seconds per case.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from argon2 import PasswordHasher

from decnet_attr.config import Settings
from decnet_attr.registry import registry
from decnet_attr.server.main import serve
from decnet_attr.store import StateRow, UserRow, open_store

ATTACKER = "bench-attacker-0001"
PASSWORD = "benchmark password"
ROWS = 38
ROUNDS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(settings: Settings) -> None:
    store = open_store(settings.store_url)
    await store.open()
    try:
        now = time.time()
        hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        for name, role in (("bench", "viewer"), ("sensor", "sensor")):
            await store.create_user(
                UserRow(
                    uuid=str(uuid_mod.uuid4()),
                    username=name,
                    password_hash=hasher.hash(PASSWORD),
                    role=role,
                    created_at=now,
                    updated_at=now,
                )
            )
        emitted = sorted(p.name for p in registry().primitives.values() if p.decnet_emits)
        async with store.transaction() as tx:
            await tx.ensure_attackers([(ATTACKER, "198.51.100.77", now)])
            mapping, _ = await tx.ensure_identities([ATTACKER], now)
            ident = mapping[ATTACKER]
            await tx.upsert_states(
                [
                    StateRow(
                        identity_uuid=ident,
                        primitive=p,
                        current_value_json=json.dumps(f"value-{i % 3}"),
                        state=("stable", "drifting", "unknown")[i % 3],
                        confidence=0.8,
                        observation_count=12,
                        last_change_ts=now - 100,
                        last_observation_ts=now,
                    )
                    for i, p in enumerate(emitted[:ROWS])
                ]
            )
    finally:
        await store.close()


class Server:
    def __init__(self, tmp: Path, *, worker: bool = False, **settings: Any) -> None:
        self.port = _free_port()
        self.settings = Settings(
            data_dir=tmp / "data",
            port=self.port,
            worker=worker,
            login_rate=1_000_000,
            log_level="WARNING",
            **settings,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Any = None

    def __enter__(self) -> Server:
        from decnet_attr.server.auth import load_jwt_secret

        self.settings.data_dir.mkdir(mode=0o700)
        load_jwt_secret(self.settings)
        asyncio.run(_seed(self.settings))
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=serve, args=(self.settings,), daemon=True)
        self.proc.start()
        asyncio.run(self._wait_ready())
        return self

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"{self.base}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("benchmark server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: graceful shutdown
            self.proc.join(15)
            if self.proc.is_alive():  # pragma: no cover
                self.proc.kill()
                self.proc.join()


async def _token(base: str, username: str = "bench") -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/api/v1/auth/login", json={"username": username, "password": PASSWORD}
        ) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["access_token"])


async def _load(base: str, token: str, clients: int, total: int) -> float:
    """``total`` requests over ``clients`` keep-alive connections; req/s."""
    url = f"{base}/api/v1/attackers/{ATTACKER}/attribution"
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=clients)
    remaining = total
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async with http.get(url) as r:  # correctness of what is measured
            body = await r.json()
            assert r.status == 200 and len(body["primitives"]) == ROWS

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with http.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise AssertionError(f"status {resp.status}")

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return total / elapsed


@pytest.mark.parametrize(("clients", "total"), [(1, 1000), (32, 3000)])
def test_attribution_endpoint_throughput(
    benchmark: Any, tmp_path: Path, clients: int, total: int
) -> None:
    with Server(tmp_path) as server:
        token = asyncio.run(_token(server.base))
        rates: list[float] = []

        def one_round() -> None:
            rates.append(asyncio.run(_load(server.base, token, clients, total)))

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = max(rates)
    benchmark.extra_info["requests"] = total
    benchmark.extra_info["clients"] = clients
    benchmark.extra_info["req_per_s"] = round(best, 1)
    print(
        f"\nattribution endpoint ({ROWS} rows, authenticated): "
        f"{best:,.0f} req/s with {clients} concurrent client(s) "
        f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)})"
    )


INGEST_BATCH = 2000
INGEST_SENSORS = 4
INGEST_TOTAL = 48_000


def _ingest_bodies(round_no: int) -> list[bytes]:
    """NDJSON bodies of workload observations (fresh ids every round)."""
    from benches.workload import observations

    items = observations(keys=38 * 200, n=INGEST_TOTAL, seed=round_no)
    out: list[dict[str, Any]] = []
    for i, o in enumerate(items):
        out.append(
            {
                "attacker_uuid": f"att-{o['identity_uuid'][-8:]}",
                "primitive": o["primitive"],
                "value": o["value"],
                "ts": o["ts"],
                "id": f"r{round_no}-{i}",
            }
        )
    return [
        b"\n".join(json.dumps(x).encode() for x in out[i : i + INGEST_BATCH])
        for i in range(0, len(out), INGEST_BATCH)
    ]


MERGED = "decnet_attr_worker_observations_merged_total"


async def _merged(http: aiohttp.ClientSession, base: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(MERGED + " "):
                return float(line.split()[1])
    raise AssertionError(f"{MERGED} missing from /metrics")


async def _ingest(base: str, token: str, bodies: list[bytes]) -> tuple[float, float, int]:
    """Post ``bodies`` from INGEST_SENSORS concurrent sensors (a 503 is
    retried after its Retry-After, as a sensor does). Returns observations/s
    answered 202, observations/s merged (from the first POST until the
    worker has merged them all), and how many 503s were answered."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
    queue = list(reversed(bodies))
    accepted = 0
    refused = 0
    async with aiohttp.ClientSession() as http:
        before = await _merged(http, base)

        async def sensor() -> None:
            nonlocal accepted, refused
            while queue:
                body = queue.pop()
                while True:
                    async with http.post(
                        f"{base}/api/v1/observations", data=body, headers=headers
                    ) as resp:
                        result = await resp.json()
                        if resp.status == 503:
                            refused += 1
                            await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                            continue
                        assert resp.status == 202, result
                        assert result["rejected"] == [], result["rejected"][:3]
                        accepted += result["accepted"]
                        break

        t0 = time.perf_counter()
        await asyncio.gather(*(sensor() for _ in range(INGEST_SENSORS)))
        answered = time.perf_counter() - t0
        while await _merged(http, base) < before + INGEST_TOTAL:
            await asyncio.sleep(0.025)  # a scrape costs the server's loop: not too often
        merged = time.perf_counter() - t0
    assert accepted == INGEST_TOTAL
    return accepted / answered, accepted / merged, refused


def test_ingest_throughput(benchmark: Any, tmp_path: Path) -> None:
    pytest.importorskip("decnet_attr.worker", reason="the ingest bench needs the worker")
    with Server(tmp_path, worker=True) as server:
        token = asyncio.run(_token(server.base, "sensor"))
        rates: list[float] = []
        merged: list[float] = []
        refused: list[int] = []
        rounds = iter(range(100))

        def one_round() -> None:
            bodies = _ingest_bodies(next(rounds))
            rate, through, n503 = asyncio.run(_ingest(server.base, token, bodies))
            rates.append(rate)
            merged.append(through)
            refused.append(n503)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = max(rates)
    # the same with the 202 after the worker's commit (no journal), same run
    commit_rates: list[float] = []
    (tmp_path / "commit").mkdir()
    with Server(tmp_path / "commit", worker=True, ingest_journal=False) as server:
        token = asyncio.run(_token(server.base, "sensor"))
        for r in range(ROUNDS + 1):
            rate, _through, _n503 = asyncio.run(_ingest(server.base, token, _ingest_bodies(r)))
            if r:  # the first is the warm-up
                commit_rates.append(rate)
    # the same bytes straight into the Rust engine, in the same run
    from decnet_attr import Engine

    engine_rates = []
    for r in range(3):
        bodies = [b.replace(b'"attacker_uuid"', b'"identity_uuid"') for b in _ingest_bodies(50 + r)]
        eng = Engine()
        t0 = time.perf_counter()
        for body in bodies:
            eng.ingest_json(body)
        engine_rates.append(INGEST_TOTAL / (time.perf_counter() - t0))
    engine = max(engine_rates)
    benchmark.extra_info["observations"] = INGEST_TOTAL
    benchmark.extra_info["obs_per_s"] = round(best, 1)
    benchmark.extra_info["merged_obs_per_s"] = round(max(merged), 1)
    benchmark.extra_info["commit_obs_per_s"] = round(max(commit_rates), 1)
    benchmark.extra_info["engine_ingest_json_obs_per_s"] = round(engine, 1)

    def listed(xs: list[float]) -> str:
        return ", ".join(f"{x:,.0f}" for x in xs)

    print(
        f"\ningest (NDJSON batches of {INGEST_BATCH}, {INGEST_SENSORS} sensors, {INGEST_TOTAL:,} "
        f"observations a round)\n  202 once in the journal: {best:,.0f} obs/s (rounds: "
        f"{listed(rates)}; 503s: {refused})\n  all merged, from the first POST: "
        f"{max(merged):,.0f} obs/s (rounds: {listed(merged)})\n  202 after the worker's "
        f"commit (no journal): {max(commit_rates):,.0f} obs/s (rounds: {listed(commit_rates)})"
        f"\n  Engine.ingest_json on the same bytes: {engine:,.0f} obs/s; journal 202 rate "
        f"{best / engine:.1%} of it, commit 202 rate {max(commit_rates) / engine:.1%}"
    )
    from benches.bench_worker import record_rate

    record_rate("POST /api/v1/observations, 4 sensors, NDJSON x 2000, 202 once journaled", best)
    record_rate("  the same, until all merged", max(merged))
    record_rate("  the same, 202 after the worker's commit (no journal)", max(commit_rates))
    record_rate("Engine.ingest_json on the same bytes (same run)", engine)
