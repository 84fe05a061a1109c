"""The attribution worker plugged into a DECNET-style Unix-socket broker
(tests/unixbroker.py): DECNET-shaped observation events published by a bare
protocol client come back as ``attribution.profile.*`` events with DECNET's
payload fields; a broker restart mid-stream is survived; ``decnet-attr
worker`` alone on PostgreSQL does the same."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.bus import get_bus
from decnet_attr.bus.unix import UnixBus
from decnet_attr.store import Store
from decnet_attr.topics import ATTACKER_OBSERVED, OBSERVATION_PATTERN, attacker_observation
from decnet_attr.worker import AttributionWorker
from tests.unixbroker import RawClient, UnixBroker, short_socket_dir
from tests.worker.conftest import (
    P_ALT1,
    P_ALT2,
    StoreFactory,
    WorkerProcess,
    Workload,
    assert_one_identity_per_attacker,
    assert_states_equal_oracle,
    assert_stored_exactly_once,
    stored_count,
    wait_until,
    worker_settings,
)
from tests.worker.helpers import mk_obs, query

pytestmark = pytest.mark.timeout(90)

#: DECNET's payload fields (the worker adds more; these must all be there).
STATE_CHANGED_FIELDS = {
    "identity_uuid",
    "primitive",
    "old_state",
    "new_state",
    "current_value",
    "confidence",
    "observation_count",
    "ts",
}
MULTI_ACTOR_FIELDS = {"identity_uuid", "primitives", "evidence_summary", "confidence", "ts"}


@pytest.fixture
async def broker() -> AsyncIterator[UnixBroker]:
    d = short_socket_dir()
    try:
        async with UnixBroker(d / "bus.sock") as b:
            yield b
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def clients() -> AsyncIterator[list[RawClient]]:
    opened: list[RawClient] = []
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


class Listener:
    """A DECNET subscriber (its SSE relay, its webhook worker) on the broker."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(EOFError, ConnectionError, asyncio.IncompleteReadError):
            while True:
                self.events.append(await self.client.next_event(timeout=3600))

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [env for t, env in self.events if t == topic]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def open_listener(broker: UnixBroker, clients: list[RawClient]) -> Listener:
    c = await RawClient.open(broker.path, "decnet-sse")
    clients.append(c)
    await c.sub("attribution.>", "identity.>")
    await broker.wait_for_patterns("attribution.>", "identity.>")
    return Listener(c)


async def publish_raw(client: RawClient, items: list[dict[str, Any]]) -> None:
    for o in items:  # as DECNET's profiler: type = the primitive
        await client.pub(attacker_observation(o["primitive"]), o, o["primitive"])


async def test_decnet_events_in_attribution_events_out(
    tmp_path: Path,
    broker: UnixBroker,
    clients: list[RawClient],
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    settings = worker_settings(tmp_path, f"unix://{broker.path}")
    bus = get_bus(settings.bus_url, **settings.bus_options())
    assert isinstance(bus, UnixBus)
    await bus.connect()
    store = await make_store(settings.store_url)
    w = AttributionWorker(settings, bus, store)
    await w.start()
    workers.append(w)
    try:
        # no sleep: the broker has the worker's SUBs once flush returns
        await bus.flush()
        await broker.wait_for_patterns(OBSERVATION_PATTERN, ATTACKER_OBSERVED, timeout=0)
        listener = await open_listener(broker, clients)
        profiler = await RawClient.open(broker.path, "profiler")
        clients.append(profiler)

        await profiler.pub(
            ATTACKER_OBSERVED, {"attacker_uuid": "att-u1", "attacker_ip": "192.0.2.7"}, "observed"
        )
        items = [
            mk_obs("att-u1", p, v if k % 2 == 0 else w_, 1_000.0 + 10 * k + j)
            for k in range(5)
            for j, (p, v, w_) in enumerate([(P_ALT1, "typed", "pasted"), (P_ALT2, "bash", "zsh")])
        ]
        await publish_raw(profiler, items)

        async def alerted() -> bool:
            return bool(listener.of("attribution.profile.multi_actor_suspected"))

        await wait_until(alerted, 15, "multi_actor_suspected back on the DECNET bus")
        changed = listener.of("attribution.profile.state_changed")
        assert changed, listener.events
        for env in changed:
            assert env["type"] == "profile.state_changed"
            assert STATE_CHANGED_FIELDS <= set(env["payload"]), env
        last = {env["payload"]["primitive"]: env["payload"] for env in changed}
        assert set(last) == {P_ALT1, P_ALT2}
        assert changed[0]["payload"]["old_state"] is None
        finals = {p: pl["new_state"] for p, pl in last.items()}
        assert finals == {P_ALT1: "multi_actor", P_ALT2: "multi_actor"}
        (alert,) = listener.of("attribution.profile.multi_actor_suspected")
        assert alert["type"] == "profile.multi_actor_suspected"
        assert MULTI_ACTOR_FIELDS <= set(alert["payload"])
        assert alert["payload"]["primitives"] == sorted([P_ALT1, P_ALT2])
        assert alert["payload"]["evidence_summary"] == "2 primitives flagged multi_actor"
        assert alert["payload"]["confidence"] == 0.6
        (formed,) = listener.of("identity.formed")
        assert formed["payload"]["attacker_uuid"] == "att-u1"
        assert alert["payload"]["identity_uuid"] == formed["payload"]["identity_uuid"]

        await assert_stored_exactly_once(store, {o["id"] for o in items})
        await assert_states_equal_oracle(store, items, ["att-u1"])
        ip = await query(store, "SELECT ip FROM attackers WHERE uuid = 'att-u1'")
        assert ip == [("192.0.2.7",)]
        assert w.stats.attackers_observed == 1

        # the broker re-stamps envelope ids: the payload's id and the
        # (evidence_ref, primitive) pair still de-duplicate a re-publication
        again = dict(items[0])
        other_id = mk_obs("att-u1", P_ALT1, "typed", 2_000.0)
        other_id["evidence_ref"] = items[2]["evidence_ref"]
        await publish_raw(profiler, [again, other_id])
        await wait_until(
            lambda: _ge(w.stats.received, len(items) + 2), 10, "re-publications received"
        )
        await asyncio.sleep(0.2)
        assert w.stats.duplicates == 2
        assert await stored_count(store) == len(items)
    finally:
        await w.stop()
        await bus.close()


async def _ge(a: int, b: int) -> bool:
    return a >= b


async def test_broker_restart_mid_stream(
    tmp_path: Path,
    broker: UnixBroker,
    clients: list[RawClient],
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    settings = worker_settings(tmp_path, f"unix://{broker.path}")
    bus = UnixBus(broker.path, reconnect_min=0.05, reconnect_max=0.5)
    await bus.connect()
    store = await make_store(settings.store_url)
    w = AttributionWorker(settings, bus, store)
    await w.start()
    workers.append(w)
    try:
        await bus.flush()
        wl = Workload(3, tag="rs")
        items = wl.distinct
        half = len(items) // 2
        profiler = await RawClient.open(broker.path, "profiler")
        clients.append(profiler)
        await publish_raw(profiler, items[:half])

        async def first_half() -> bool:
            return await stored_count(store) == half

        await wait_until(first_half, 20, "first half stored")
        await broker.stop()
        await wait_until(lambda: _ge(bus.stats()["disconnects"], 1), 5, "outage noticed")
        assert not bus.connected and w.running
        await broker.start()
        await wait_until(lambda: _ge(bus.stats()["reconnects"], 1), 10, "reconnected")
        # the worker's health (its heartbeat; `decnet-attr worker` has no HTTP)
        assert w.health()["reconnects"] == bus.stats()["reconnects"] >= 1
        await bus.flush()  # the worker's SUBs are back before the profiler goes on
        listener = await open_listener(broker, clients)
        profiler = await RawClient.open(broker.path, "profiler")
        clients.append(profiler)
        await publish_raw(profiler, items[half:])

        async def everything() -> bool:
            return await stored_count(store) == len(items)

        await wait_until(everything, 30, "second half stored after the restart")
        await assert_stored_exactly_once(store, wl.ids)
        await assert_states_equal_oracle(store, items, wl.attackers)
        # and what the worker published after the restart reached DECNET's side
        await wait_until(
            lambda: _ge(len(listener.of("attribution.profile.state_changed")), 1),
            10,
            "state changes after the restart",
        )
        st = bus.stats()
        assert (st["reconnects"], st["malformed"], st["oversized"]) == (1, 0, 0)
        assert w.running
    finally:
        await w.stop()
        await bus.close()


async def test_decnet_attr_worker_alone_on_the_socket_and_postgres(
    broker: UnixBroker,
    clients: list[RawClient],
    pg_dsn: str,
    make_store: StoreFactory,
    spawn_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    proc = spawn_worker(bus_url=f"unix://{broker.path}", db_url=pg_dsn, data_dir=tmp_path / "d")
    store: Store = await make_store(pg_dsn)
    peer = await broker.wait_for_patterns(OBSERVATION_PATTERN, ATTACKER_OBSERVED, timeout=30)
    assert peer.name.startswith("decnet-attr[")
    listener = await open_listener(broker, clients)
    profiler = await RawClient.open(broker.path, "profiler")
    clients.append(profiler)
    wl = Workload(3, tag="pg")
    await publish_raw(profiler, wl.distinct)

    async def stored() -> bool:
        assert proc.alive(), proc.log()
        return await stored_count(store) == len(wl.distinct)

    await wait_until(stored, 30, "the worker stored everything", lambda: _log(proc))
    await assert_stored_exactly_once(store, wl.ids)
    await assert_states_equal_oracle(store, wl.distinct, wl.attackers)
    ident = await assert_one_identity_per_attacker(store, wl.attackers)

    async def alerts() -> bool:
        return len(listener.of("attribution.profile.multi_actor_suspected")) == len(wl.multi)

    await wait_until(alerts, 15, "multi-actor alerts on the DECNET bus")
    got = sorted(
        e["payload"]["identity_uuid"]
        for e in listener.of("attribution.profile.multi_actor_suspected")
    )
    assert got == sorted(ident[a] for a in wl.multi)

    # the broker restarts: the worker process reconnects on its own
    await broker.stop()
    await broker.start()
    await broker.wait_for_patterns(OBSERVATION_PATTERN, ATTACKER_OBSERVED, timeout=30)

    async def said_reconnected() -> bool:  # the log line may trail the SUBs
        return "reconnected to the DECNET bus" in proc.log()

    await wait_until(said_reconnected, 10, "the reconnect logged", lambda: _log(proc))
    profiler = await RawClient.open(broker.path, "profiler")
    clients.append(profiler)
    late = [mk_obs(wl.attackers[0], P_ALT1, "typed", 5_000_000.0)]
    await publish_raw(profiler, late)

    async def late_stored() -> bool:
        return await stored_count(store) == len(wl.distinct) + 1

    await wait_until(late_stored, 20, "stored after the broker restart", lambda: _log(proc))
    proc.signal(signal.SIGTERM)
    assert await proc.wait(10.0) == 0, proc.log()
    assert "attribution worker stopped" in proc.log()


async def _log(proc: WorkerProcess) -> str:
    return proc.log()
