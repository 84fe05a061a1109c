"""``/healthz``, ``/readyz`` and ``/metrics`` (server/ops.py) against the real
app factory: the in-app worker on the in-process bus + SQLite, and a real
``nats-server`` that is stopped and started again."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from decnet_attr.bus import Bus, InProcessBus
from decnet_attr.server import ops
from decnet_attr.server.app import create_app
from decnet_attr.server.keys import BUS, SSE_HUB, WORKER
from decnet_attr.worker import AttributionWorker
from tests.natsserver import NatsServer, requires_nats
from tests.server.conftest import (
    ClientFactory,
    Harness,
    HarnessFactory,
    bearer,
    fast_passwords,
    make_settings,
)
from tests.unixbroker import RawClient, UnixBroker, frame, short_socket_dir

SHELL = "environmental.shell_type"
MODALITY = "motor.input_modality"
INGEST = "/api/v1/observations"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
WorkerHarnessFactory = Callable[..., Awaitable[Harness]]


# ---- helpers --------------------------------------------------------------------------------
class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


async def scrape(client: TestClient[Any, Any]) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(await resp.text())


async def ready(client: TestClient[Any, Any]) -> tuple[int, Any]:
    """(status, body without its ``bus`` counters, which are checked here)."""
    resp = await client.get("/readyz")
    body = await resp.json()
    counters = body.pop("bus")
    assert set(counters) == {"transport", "reconnects", "dropped"}, counters
    assert all(isinstance(counters[k], int) for k in ("reconnects", "dropped"))
    return resp.status, body


async def wait_ready(
    client: TestClient[Any, Any], status: int, timeout: float = 5.0
) -> tuple[float, Any]:
    """Poll ``/readyz`` until it answers ``status``; returns (seconds, body)."""
    t0 = time.monotonic()
    while True:
        got, body = await ready(client)
        if got == status:
            return time.monotonic() - t0, body
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"/readyz still {got} {body} after {timeout}s, wanted {status}")
        await asyncio.sleep(0.05)


def obs(i: int, primitive: str = SHELL, value: str = "bash", **kw: Any) -> dict[str, Any]:
    return {
        "attacker_uuid": "att-ops-1",
        "primitive": primitive,
        "value": value,
        "ts": 1_700_000_000.0 + i,
        "id": f"ops-{i}",
        **kw,
    }


async def ingest(h: Harness, token: str, items: list[dict[str, Any]]) -> Any:
    resp = await h.client.post(
        INGEST,
        data=orjson.dumps(items),
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    assert resp.status == 202, await resp.text()
    return await resp.json()


def worker_of(h: Harness) -> AttributionWorker:
    w = h.app[WORKER]
    assert isinstance(w, AttributionWorker)
    return w


@pytest.fixture
async def make_worker_harness(
    tmp_path: Path, aiohttp_client: ClientFactory
) -> AsyncIterator[WorkerHarnessFactory]:
    """Like ``make_harness``, with the attribution worker running in the app."""

    async def make(*, bus: Bus | None = None, **overrides: Any) -> Harness:
        settings = make_settings(tmp_path / "wdata", worker=True, **overrides)
        app = create_app(
            settings, bus=bus, worker=True, passwords=fast_passwords(), auth_cache_ttl=0.0
        )
        client = await aiohttp_client(app)
        return Harness(app=app, client=client, settings=settings)

    yield make


@pytest.fixture
async def wh(make_worker_harness: WorkerHarnessFactory) -> Harness:
    return await make_worker_harness()


# ---- liveness and readiness -----------------------------------------------------------------
async def test_healthz_is_liveness_only(wh: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    resp = await wh.client.get("/healthz")  # no credentials needed
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    assert resp.headers["Cache-Control"] == "no-store"

    async def down() -> bool:
        return False

    monkeypatch.setattr(wh.store, "ping", down)
    resp = await wh.client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    assert (await wh.client.head("/healthz")).status == 200
    assert (await ready(wh.client))[0] == 503


async def test_readyz_without_and_with_worker(harness: Harness, wh: Harness) -> None:
    assert await ready(harness.client) == (
        200,
        {"status": "ok", "checks": {"store": True, "bus": True, "worker": None}},
    )
    assert await ready(wh.client) == (
        200,
        {"status": "ok", "checks": {"store": True, "bus": True, "worker": True}},
    )


async def test_readyz_follows_the_store(wh: Harness, sensor_token: str) -> None:
    await wh.store.close()
    assert await ready(wh.client) == (
        503,
        {"status": "unready", "checks": {"store": False, "bus": True, "worker": True}},
    )
    await wh.store.open()
    assert (await ready(wh.client))[0] == 200
    # and the app works again end to end
    await ingest(wh, sensor_token, [obs(0)])
    assert worker_of(wh).stats.merged == 1


@pytest.fixture
async def sensor_token(wh: Harness) -> str:
    return await wh.token("probe-ops", "sensor")


async def test_readyz_store_ping_is_bounded_and_shared(
    wh: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    release = asyncio.Event()

    async def hang() -> bool:
        nonlocal calls
        calls += 1
        await release.wait()
        return True

    monkeypatch.setattr(ops, "PING_TIMEOUT", 0.3)
    monkeypatch.setattr(wh.store, "ping", hang)
    t0 = time.monotonic()
    answers = await asyncio.gather(*(ready(wh.client) for _ in range(8)))
    elapsed = time.monotonic() - t0
    assert all(
        a == (503, {"status": "unready", "checks": {"store": False, "bus": True, "worker": True}})
        for a in answers
    )
    assert elapsed < 2.0
    assert calls == 1  # concurrent probes shared one ping
    release.set()
    monkeypatch.undo()
    assert (await ready(wh.client))[0] == 200


class FlakyBus(InProcessBus):
    """An in-process bus whose transport can be made to look down."""

    down = False

    @property
    def connected(self) -> bool:
        return super().connected and not self.down


async def test_readyz_follows_the_in_process_bus(
    make_worker_harness: WorkerHarnessFactory,
) -> None:
    bus = FlakyBus()
    await bus.connect()
    try:
        h = await make_worker_harness(bus=bus)
        assert (await ready(h.client))[0] == 200
        bus.down = True
        assert await ready(h.client) == (
            503,
            {"status": "unready", "checks": {"store": True, "bus": False, "worker": True}},
        )
        assert (await scrape(h.client)).get("decnet_attr_bus_connected") == 0.0
        bus.down = False
        assert (await ready(h.client))[0] == 200
        assert (await scrape(h.client)).get("decnet_attr_bus_connected") == 1.0
        await bus.close()  # terminal for the in-process bus
        status, body = await ready(h.client)
        assert status == 503 and body["checks"]["bus"] is False
        await h.client.close()
    finally:
        await bus.close()


async def test_readyz_follows_the_worker(wh: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="decnet_attr.server.ops")
    worker = worker_of(wh)
    assert (await ready(wh.client))[0] == 200
    await worker.stop()
    for _ in range(3):
        assert await ready(wh.client) == (
            503,
            {"status": "unready", "checks": {"store": True, "bus": True, "worker": False}},
        )
    assert (await scrape(wh.client)).get("decnet_attr_worker_running") == 0.0
    await worker.start()
    assert (await ready(wh.client))[0] == 200
    assert (await ready(wh.client))[0] == 200
    changes = [r.getMessage() for r in caplog.records if r.name == "decnet_attr.server.ops"]
    assert changes == ["not ready: worker", "ready again"]  # changes only, not every probe


async def test_readyz_notices_a_stuck_worker(
    make_worker_harness: WorkerHarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that never finishes stops the heartbeat: unready after
    3 x max(1, heartbeat_interval) = 3 s although the worker still 'runs'."""
    h = await make_worker_harness(heartbeat_interval=0.5)
    worker = worker_of(h)
    unblock = asyncio.Event()
    real_finish = worker._finish  # commits one batch (fetching goes on meanwhile)

    async def stuck(batch: Any, *rest: Any) -> None:
        await unblock.wait()
        await real_finish(batch, *rest)

    monkeypatch.setattr(worker, "_finish", stuck)
    publish = asyncio.create_task(
        h.bus.publish_durable(
            f"attacker.observation.{SHELL}",
            {"primitive": SHELL, "value": "bash", "ts": 1_700_000_000.0, "attacker_uuid": "a"},
            event_type=SHELL,
            event_id="stuck-1",
            timeout=30.0,
        )
    )
    try:
        waited, body = await wait_ready(h.client, 503, timeout=6.0)
        assert body["checks"] == {"store": True, "bus": True, "worker": False}
        assert worker.running
        assert 2.0 < waited < 6.0
        age = (await scrape(h.client)).get("decnet_attr_worker_heartbeat_age_seconds")
        assert age >= 3.0
    finally:
        unblock.set()
        await asyncio.wait_for(publish, 10.0)
    await wait_ready(h.client, 200, timeout=3.0)


# ---- metrics --------------------------------------------------------------------------------
EXPECTED_FAMILIES = {
    "decnet_attr_info": "gauge",
    "decnet_attr_worker_observations_received": "counter",
    "decnet_attr_worker_observations_merged": "counter",
    "decnet_attr_worker_observations_rejected": "counter",
    "decnet_attr_worker_observations_dead_lettered": "counter",
    "decnet_attr_worker_observations_duplicate": "counter",
    "decnet_attr_worker_batch_size": "histogram",
    "decnet_attr_worker_merge_seconds": "histogram",
    "decnet_attr_worker_lag_seconds": "gauge",
    "decnet_attr_worker_running": "gauge",
    "decnet_attr_worker_heartbeat_age_seconds": "gauge",
    "decnet_attr_engine_keys": "gauge",
    "decnet_attr_bus_connected": "gauge",
    "decnet_attr_bus_dropped": "counter",
    "decnet_attr_bus_reconnects": "counter",
    "decnet_attr_sse_streams_open": "gauge",
    "decnet_attr_sse_events_sent": "counter",
    "decnet_attr_sse_events_dropped": "counter",
    "decnet_attr_sse_gaps": "counter",
    "decnet_attr_sse_stale": "counter",
    "decnet_attr_api_auth_failures": "counter",
    "decnet_attr_api_rate_limited": "counter",
    "decnet_attr_api_logins": "counter",
    "decnet_attr_http_requests": "counter",
    "decnet_attr_store_dead_letters": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
}


def check_histogram(s: Scrape, name: str) -> tuple[float, float]:
    """Buckets are cumulative, end with +Inf == _count; returns (count, sum)."""
    buckets = sorted(
        ((float(dict(labels)["le"]), v) for labels, v in s.series(f"{name}_bucket").items()),
    )
    assert buckets[-1][0] == float("inf")
    values = [v for _, v in buckets]
    assert values == sorted(values)
    count = s.get(f"{name}_count")
    assert values[-1] == count
    return count, s.get(f"{name}_sum")


async def test_metrics_families_and_counters_follow_real_work(
    wh: Harness, sensor_token: str
) -> None:
    before = await scrape(wh.client)
    for name, typ in EXPECTED_FAMILIES.items():
        assert before.types.get(name) == typ, name
    assert before.get("decnet_attr_worker_observations_received_total") == 0
    assert before.get("decnet_attr_engine_keys") == 0
    assert check_histogram(before, "decnet_attr_worker_batch_size") == (0, 0)

    items = [obs(i, evidence_ref=f"shard:d1/ssh/x#{i}") for i in (0, 1)]
    items.append(obs(2, MODALITY, "typed", evidence_ref="shard:d1/ssh/x#2"))
    assert (await ingest(wh, sensor_token, items))["accepted"] == 3
    after = await scrape(wh.client)
    assert after.get("decnet_attr_worker_observations_received_total") == 3
    assert after.get("decnet_attr_worker_observations_merged_total") == 3
    assert after.get("decnet_attr_api_observations_accepted_total") == 3
    assert after.get("decnet_attr_engine_keys") == 2  # one identity, two primitives
    assert after.get("decnet_attr_worker_lag_seconds") > 365 * 86400  # ts from 2023
    # the API hands the body to the bus as one message
    assert after.get("decnet_attr_bus_durable_published_total") == 1
    batches = after.get("decnet_attr_worker_batches_total")
    assert batches >= 1
    assert check_histogram(after, "decnet_attr_worker_batch_size") == (batches, 3)
    count, seconds = check_histogram(after, "decnet_attr_worker_merge_seconds")
    assert count == batches and seconds > 0
    assert (
        after.get("decnet_attr_http_requests_total", route=INGEST, method="POST", status="202") == 1
    )

    # the same ids again: answered as duplicates, never published again
    resent = await ingest(wh, sensor_token, items)
    assert (resent["accepted"], len(resent["duplicates"])) == (0, 3)
    same = await scrape(wh.client)
    assert same.get("decnet_attr_worker_observations_received_total") == 3
    assert same.get("decnet_attr_api_observations_duplicate_total") == 3
    # new ids for the same evidence: duplicates too (by (evidence_ref, primitive))
    await ingest(wh, sensor_token, [{**item, "id": f"{item['id']}-again"} for item in items])
    again = await scrape(wh.client)
    assert again.get("decnet_attr_worker_observations_received_total") == 3
    assert again.get("decnet_attr_worker_observations_merged_total") == 3
    assert again.get("decnet_attr_api_observations_duplicate_total") == 6
    assert (
        again.get("decnet_attr_api_observations_duplicate_by_sensor_total", sensor="probe-ops") == 6
    )

    # an event the worker refuses becomes a dead letter
    await wh.bus.publish_durable(
        f"attacker.observation.{SHELL}", {"garbage": True}, event_type=SHELL, event_id="bad-1"
    )
    dead = await scrape(wh.client)
    assert dead.get("decnet_attr_worker_observations_rejected_total") == 1
    assert dead.get("decnet_attr_worker_observations_dead_lettered_total") == 1
    assert dead.get("decnet_attr_store_dead_letters") == 1


async def test_metrics_auth_and_request_counts(wh: Harness) -> None:
    token = await wh.token("analyst", "viewer")
    for attacker in ("11111111-aaaa", "22222222-bbbb"):
        resp = await wh.client.get(
            f"/api/v1/attackers/{attacker}/attribution", headers=bearer(token)
        )
        assert resp.status == 404
    resp = await wh.client.get("/api/v1/attackers/x/attribution", headers=bearer("not-a-jwt"))
    assert resp.status == 401
    assert (await wh.client.get("/no/such/path/p12345q")).status == 404
    assert (await wh.client.delete("/healthz")).status == 405
    resp = await wh.client.post("/api/v1/auth/login", json={"username": "analyst", "password": "x"})
    assert resp.status == 401

    s = await scrape(wh.client)
    route = "/api/v1/attackers/{uuid}/attribution"
    assert s.get("decnet_attr_http_requests_total", route=route, method="GET", status="404") == 2
    assert s.get("decnet_attr_http_requests_total", route=route, method="GET", status="401") == 1
    assert (
        s.get("decnet_attr_http_requests_total", route="unmatched", method="GET", status="404") == 1
    )
    assert (
        s.get("decnet_attr_http_requests_total", route="unmatched", method="DELETE", status="405")
        == 1
    )
    assert "11111111-aaaa" not in s.text and "p12345q" not in s.text  # templates, not raw paths
    assert s.get("decnet_attr_api_auth_failures_total") == wh.counters["auth_failures_total"] >= 1
    assert s.get("decnet_attr_api_logins_total") == 1
    assert s.get("decnet_attr_api_login_failures_total") == 1
    # a route's label never depends on the request: all series use known routes
    routes = {dict(labels)["route"] for labels in s.series("decnet_attr_http_requests_total")}
    known = {r.canonical for r in wh.app.router.resources()} | {"unmatched"}
    assert routes <= known


async def test_metrics_rate_limited_counter(make_harness: HarnessFactory) -> None:
    h = await make_harness(login_rate=1)
    await h.add_user("rl")
    body = {"username": "rl", "password": "wrong"}
    statuses = [(await h.client.post("/api/v1/auth/login", json=body)).status for _ in range(3)]
    assert statuses[-1] == 429
    s = await scrape(h.client)
    assert s.get("decnet_attr_api_rate_limited_total") == statuses.count(429) >= 1
    assert s.get(
        "decnet_attr_http_requests_total", route="/api/v1/auth/login", method="POST", status="429"
    ) == statuses.count(429)


async def test_metrics_without_worker_has_no_worker_families(harness: Harness) -> None:
    s = await scrape(harness.client)
    assert not [name for name in s.types if name.startswith("decnet_attr_worker_")]
    assert "decnet_attr_engine_keys" not in s.types
    assert "decnet_attr_bus_connected" in s.types


async def test_each_app_has_its_own_registry(make_harness: HarnessFactory, tmp_path: Path) -> None:
    a = await make_harness(data_dir=tmp_path / "a")
    b = await make_harness(data_dir=tmp_path / "b")
    for _ in range(3):
        assert (await a.client.get("/healthz")).status == 200
    sa, sb = await scrape(a.client), await scrape(b.client)
    hz = {"route": "/healthz", "method": "GET", "status": "200"}
    assert sa.get("decnet_attr_http_requests_total", **hz) == 3
    assert ("decnet_attr_http_requests_total", frozenset(hz.items())) not in sb.samples
    for s in (sa, sb):  # ProcessCollector registered on both: no clash
        assert s.get("process_cpu_seconds_total") > 0
    assert a.app[ops.OPS].registry is not b.app[ops.OPS].registry


async def test_a_failing_source_does_not_break_the_scrape(
    wh: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub = wh.app[SSE_HUB]
    assert hub is not None

    def boom() -> dict[str, Any]:
        raise RuntimeError("stats exploded")

    async def no_count() -> int:
        raise RuntimeError("store broken")

    monkeypatch.setattr(hub, "stats", boom)
    monkeypatch.setattr(wh.store, "dead_letter_count", no_count)
    s = await scrape(wh.client)
    assert not [n for n in s.types if n.startswith("decnet_attr_sse_")]
    assert "decnet_attr_store_dead_letters" not in s.types
    assert s.get("decnet_attr_worker_running") == 1
    assert "metrics: _sse failed" in caplog.text


def test_histogram_family_makes_buckets_cumulative() -> None:
    # the worker's histograms are prometheus-client's, exposed without _created
    from prometheus_client import Histogram

    from decnet_attr.metrics import without_created

    h = Histogram("x", "doc", buckets=(1, 10, 100), registry=None)
    for v in (0.5, 1, 5, 50, 500, 5000):
        h.observe(v)
    (fam,) = [without_created(m) for m in h.collect()]
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert got == {
        ("x_bucket", "1.0"): 2,
        ("x_bucket", "10.0"): 3,
        ("x_bucket", "100.0"): 4,
        ("x_bucket", "+Inf"): 6,
        ("x_count", None): 6,
        ("x_sum", None): 5556.5,
    }


# ---- NATS -----------------------------------------------------------------------------------
@requires_nats
async def test_readyz_and_metrics_follow_a_real_nats_server(
    tmp_path: Path, aiohttp_client: ClientFactory
) -> None:
    async with NatsServer() as srv:
        settings = make_settings(tmp_path / "data", worker=True, bus_url=srv.url)
        app = create_app(settings, worker=True, passwords=fast_passwords())
        client = await aiohttp_client(app)
        h = Harness(app=app, client=client, settings=settings)
        try:
            await wait_ready(client, 200, timeout=5.0)
            token = await h.token("probe-nats", "sensor")

            await srv.astop()
            _, body = await wait_ready(client, 503, timeout=5.0)
            assert body["checks"]["bus"] is False and body["checks"]["store"] is True
            assert (await scrape(client)).get("decnet_attr_bus_connected") == 0

            await srv.astart()
            await wait_ready(client, 200, timeout=15.0)
            s = await scrape(client)
            assert s.get("decnet_attr_bus_connected") == 1
            assert s.get("decnet_attr_bus_reconnects_total") >= 1

            # the worker resumes too: an observation ingested now gets merged
            await ingest(h, token, [obs(0)])
            deadline = time.monotonic() + 20.0
            while (await scrape(client)).get("decnet_attr_worker_observations_merged_total") < 1:
                assert time.monotonic() < deadline, "worker did not merge after the restart"
                await asyncio.sleep(0.1)
        finally:
            await client.close()


# ---- DECNET's Unix-socket bus -----------------------------------------------------------------
async def test_serve_on_decnets_unix_bus(tmp_path: Path, aiohttp_client: ClientFactory) -> None:
    """``serve`` with its worker on a DECNET-style broker: HTTP ingest is
    merged and reaches DECNET's subscribers, a broker restart shows in
    /readyz and /metrics, a malformed frame is counted."""
    sock_dir = short_socket_dir()
    async with UnixBroker(sock_dir / "bus.sock") as broker:
        settings = make_settings(tmp_path / "data", worker=True, bus_url=f"unix://{broker.path}")
        app = create_app(settings, worker=True, passwords=fast_passwords())
        client = await aiohttp_client(app)
        h = Harness(app=app, client=client, settings=settings)
        decnet = await RawClient.open(broker.path, "decnet-sse")
        try:
            await wait_ready(client, 200, timeout=5.0)
            body = await (await client.get("/readyz")).json()
            assert body["bus"] == {"transport": "unix", "reconnects": 0, "dropped": 0}
            token = await h.token("probe-unix", "sensor")
            await decnet.sub("attacker.observation.>", "attribution.>")
            await broker.wait_for_patterns("attacker.observation.>", "attribution.>")

            await ingest(h, token, [obs(0)])  # 202: the in-process worker committed it
            topics: list[str] = []
            while "attribution.profile.state_changed" not in topics:
                topic, envelope = await decnet.next_event(timeout=5.0)
                topics.append(topic)
                if topic.startswith("attacker.observation."):
                    assert envelope["payload"]["id"] == "ops-0"
            assert topics[0] == f"attacker.observation.{SHELL}"

            broker.inject(frame("EVT", "attacker.observed", b"{oops"))
            broker.inject(b"EVT x\n" + (2 * 1024 * 1024).to_bytes(4, "big") + b"0" * 2**21)
            deadline = time.monotonic() + 5.0
            while app[BUS].stats()["oversized"] < 1:
                assert time.monotonic() < deadline, app[BUS].stats()
                await asyncio.sleep(0.02)
            await broker.stop()
            _, body = await wait_ready(client, 503, timeout=5.0)
            assert body["checks"]["bus"] is False and body["checks"]["store"] is True
            await broker.start()
            _, body = await wait_ready(client, 200, timeout=10.0)
            s = await scrape(client)
            assert s.get("decnet_attr_bus_connected") == 1
            assert s.get("decnet_attr_bus_reconnects_total") == 1
            assert s.get("decnet_attr_bus_malformed_total") == 1
            assert s.get("decnet_attr_bus_oversized_total") == 1
            assert s.get("decnet_attr_bus_outbox_pending") == 0
            assert s.types["decnet_attr_bus_outbox_pending"] == "gauge"
            resp = await client.get("/readyz")
            assert (await resp.json())["bus"] == {
                "transport": "unix",
                "reconnects": 1,
                "dropped": 0,
            }
        finally:
            await decnet.close()
            await client.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


async def test_api_only_process_on_the_unix_bus_refuses_ingest_with_503(
    tmp_path: Path, aiohttp_client: ClientFactory
) -> None:
    """Without a worker in the process, DECNET's broker cannot promise that an
    observation reaches one: 503, never a 202 that could be a lie."""
    sock_dir = short_socket_dir()
    async with UnixBroker(sock_dir / "bus.sock") as broker:
        settings = make_settings(tmp_path / "data", worker=False, bus_url=f"unix://{broker.path}")
        app = create_app(settings, worker=False, passwords=fast_passwords())
        client = await aiohttp_client(app)
        h = Harness(app=app, client=client, settings=settings)
        try:
            await wait_ready(client, 200, timeout=5.0)
            token = await h.token("probe-unix-api", "sensor")
            resp = await client.post(
                INGEST,
                data=orjson.dumps([obs(0)]),
                headers={**bearer(token), "Content-Type": "application/json"},
            )
            assert resp.status == 503, await resp.text()
            assert "no durable consumer" in (await resp.json())["detail"]
            assert (await scrape(client)).get("decnet_attr_api_ingest_unavailable_total") == 1
        finally:
            await client.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


async def test_a_resent_observation_is_answered_duplicate(wh: Harness) -> None:
    """Stored before (same id, or same evidence and primitive, whoever sent
    it): answered per item as a duplicate and not published again; counted
    per sensor."""
    first_sensor = await wh.token("first-sensor", "sensor")
    other_sensor = await wh.token("other-sensor", "sensor")
    first = [obs(i, evidence_ref=f"shard:d1/ssh/dup#{i}") for i in (0, 1)]
    assert (await ingest(wh, first_sensor, first))["accepted"] == 2
    resent = [first[0], {**first[1], "id": "obs-again"}, obs(2)]
    assert await ingest(wh, other_sensor, resent) == {
        "accepted": 1,
        "ids": [resent[2]["id"]],
        "rejected": [],
        "duplicates": [{"index": 0, "id": first[0]["id"]}, {"index": 1, "id": "obs-again"}],
    }
    metrics = await scrape(wh.client)
    assert metrics.get("decnet_attr_worker_observations_received_total") == 3
    assert (
        metrics.get("decnet_attr_api_observations_duplicate_by_sensor_total", sensor="other-sensor")
        == 2
    )
