from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import pytest

from decnet_attr.bus import (
    Bus,
    Event,
    Subscription,
    publish_safely,
    run_control_listener,
    run_health_heartbeat,
)
from decnet_attr.bus.memory import InProcessBus
from decnet_attr.bus.nats import NatsBus
from tests.natsserver import requires_nats

pytestmark = pytest.mark.timeout(30)


async def next_event(sub: Subscription, timeout: float = 2.0) -> Event:
    return await asyncio.wait_for(sub.__anext__(), timeout)


# -- publish_safely ------------------------------------------------------------------------
async def test_publish_safely_none_bus() -> None:
    assert await publish_safely(None, "a.b", {}) is False


async def test_publish_safely_success(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe("a.>")
    assert await publish_safely(memory_bus, "a.b", {"x": 1}, "t") is True
    ev = await next_event(sub)
    assert (ev.payload, ev.type) == ({"x": 1}, "t")


async def test_publish_safely_never_raises_and_rate_limits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = InProcessBus()
    await bus.close()
    with caplog.at_level(logging.WARNING, logger="decnet_attr.bus.helpers"):
        assert await publish_safely(bus, "rl.closed.topic", {}) is False
        assert await publish_safely(bus, "rl.closed.topic", {}) is False
        assert await publish_safely(InProcessBus(), "bad topic", {}) is False
    messages = [r.getMessage() for r in caplog.records if r.name == "decnet_attr.bus.helpers"]
    assert len([m for m in messages if "rl.closed.topic" in m]) == 1
    assert any("bad topic" in m for m in messages)


async def test_publish_safely_transport_failure_is_swallowed() -> None:
    bus = NatsBus("nats://127.0.0.1:1", connect_timeout=0.3)
    assert await publish_safely(bus, "a.b", {}) is False
    await bus.close()


# -- heartbeat -----------------------------------------------------------------------------
async def _heartbeat_publishes_immediately(bus: Bus) -> None:
    sub = bus.subscribe("system.*.health")
    await sub.wait_ready(timeout=5)
    counters = {"events_in": 0}

    def extra() -> Mapping[str, Any]:
        counters["events_in"] += 7
        return {"events_in": counters["events_in"], "queue_depth": 3}

    before = time.time()
    task = asyncio.ensure_future(
        run_health_heartbeat(bus, "attribution", interval=60.0, extra=extra)
    )
    ev = await next_event(sub, timeout=2.0)
    assert ev.topic == "system.attribution.health"
    assert ev.type == "health"
    assert ev.payload["worker"] == "attribution"
    assert before <= ev.payload["ts"] <= time.time()
    assert ev.payload["events_in"] == 7 and ev.payload["queue_depth"] == 3
    # interval is 60 s: no second beat yet
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(sub.__anext__(), 0.2)
    task.cancel()
    await asyncio.wait_for(task, 1.0)  # cancellation ends it cleanly (no CancelledError)
    assert task.done() and not task.cancelled()
    await sub.aclose()


async def test_heartbeat_memory(memory_bus: InProcessBus) -> None:
    await _heartbeat_publishes_immediately(memory_bus)


@requires_nats
async def test_heartbeat_nats(nats_bus: NatsBus) -> None:
    await _heartbeat_publishes_immediately(nats_bus)


async def test_heartbeat_repeats_and_survives_failing_extra(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe("system.w.health")

    def broken() -> Mapping[str, Any]:
        raise RuntimeError("boom")

    task = asyncio.ensure_future(run_health_heartbeat(memory_bus, "w", interval=0.05, extra=broken))
    first = await next_event(sub)
    second = await next_event(sub)
    assert set(first.payload) == {"worker", "ts"}
    assert second.payload["ts"] >= first.payload["ts"]
    task.cancel()
    await asyncio.wait_for(task, 1.0)


async def test_heartbeat_none_bus_and_closed_bus() -> None:
    task = asyncio.ensure_future(run_health_heartbeat(None, "w", interval=0.01))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait_for(task, 1.0)
    bus = InProcessBus()
    await bus.close()
    task = asyncio.ensure_future(run_health_heartbeat(bus, "w", interval=0.01))
    await asyncio.sleep(0.05)
    assert not task.done()  # failures are logged, the loop keeps going
    task.cancel()
    await asyncio.wait_for(task, 1.0)


async def test_heartbeat_validates_worker() -> None:
    with pytest.raises(ValueError):
        await run_health_heartbeat(None, "bad.worker", interval=1)


# -- control listener ----------------------------------------------------------------------
@pytest.fixture
def no_kill(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def fake_kill(*args: Any) -> None:
        calls.append(args)
        raise AssertionError("the control listener must not signal the process")

    monkeypatch.setattr(os, "kill", fake_kill)
    if hasattr(os, "killpg"):
        monkeypatch.setattr(os, "killpg", fake_kill)
    return calls


async def _control_stop(bus: Bus, no_kill: list[tuple[Any, ...]]) -> None:
    stop = asyncio.Event()
    other_stop = asyncio.Event()
    task = asyncio.ensure_future(run_control_listener(bus, "attribution", stop))
    other = asyncio.ensure_future(run_control_listener(bus, "mutator", other_stop))
    probe = bus.subscribe("system.attribution.control")
    await probe.wait_ready(timeout=5)
    await asyncio.sleep(0.1)  # let the listeners subscribe (NATS: SUB on the wire)
    await bus.publish("system.attribution.control", {"action": "start", "requested_by": "bob"})
    await bus.publish("system.attribution.control", {"requested_by": "bob"})
    await next_event(probe)
    await next_event(probe)
    await asyncio.sleep(0.05)
    assert not stop.is_set() and not task.done()
    await bus.publish(
        "system.attribution.control",
        {"action": "stop", "requested_by": "alice", "ts": time.time()},
    )
    await asyncio.wait_for(task, 2.0)
    assert stop.is_set()
    assert not other_stop.is_set() and not other.done()  # only THAT worker stops
    assert no_kill == []
    other_stop.set()  # setting the event from outside ends a listener too
    await asyncio.wait_for(other, 2.0)
    await probe.aclose()


async def test_control_stop_memory(
    memory_bus: InProcessBus,
    no_kill: list[tuple[Any, ...]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="decnet_attr.bus.helpers"):
        await _control_stop(memory_bus, no_kill)
    assert any("alice" in r.getMessage() for r in caplog.records)


@requires_nats
async def test_control_stop_nats(nats_bus: NatsBus, no_kill: list[tuple[Any, ...]]) -> None:
    await _control_stop(nats_bus, no_kill)


async def test_control_listener_returns_when_bus_closes(no_kill: list[tuple[Any, ...]]) -> None:
    bus = InProcessBus()
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_control_listener(bus, "w", stop))
    await asyncio.sleep(0.01)
    await bus.close()
    await asyncio.wait_for(task, 1.0)
    assert not stop.is_set()
    # on an already closed bus it returns at once
    await asyncio.wait_for(run_control_listener(bus, "w", stop), 1.0)


async def test_control_listener_none_bus_waits_for_stop() -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_control_listener(None, "w", stop))
    await asyncio.sleep(0.02)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 1.0)


# -- thread-safe publisher -----------------------------------------------------------------
async def test_thread_safe_publisher(memory_bus: InProcessBus) -> None:
    import threading

    from decnet_attr.bus import make_thread_safe_publisher

    sub = memory_bus.subscribe("t.>")
    publish = make_thread_safe_publisher(memory_bus, asyncio.get_running_loop())
    thread = threading.Thread(target=lambda: [publish("t.x", {"i": i}, "k") for i in range(3)])
    thread.start()
    thread.join(5)
    got = [await next_event(sub) for _ in range(3)]
    assert [(e.payload["i"], e.type) for e in got] == [(0, "k"), (1, "k"), (2, "k")]
    make_thread_safe_publisher(None, asyncio.get_running_loop())("t.x", {})  # no-op
    await memory_bus.close()
    publish("t.x", {})  # closed bus: dropped, no error
