from __future__ import annotations

import asyncio
import logging
import time

import pytest

from decnet_attr.bus import BusError, BusUnavailable, Delivery, Event, Subscription
from decnet_attr.bus.memory import InProcessBus

pytestmark = pytest.mark.timeout(30)

OBS = "attacker.observation.>"


async def next_event(sub: Subscription, timeout: float = 1.0) -> Event:
    return await asyncio.wait_for(sub.__anext__(), timeout)


async def assert_empty(sub: Subscription, wait: float = 0.05) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(sub.__anext__(), wait)


# -- fan-out -------------------------------------------------------------------------------
async def test_fan_out_by_pattern(memory_bus: InProcessBus) -> None:
    all_obs = memory_bus.subscribe(OBS)
    one = memory_bus.subscribe("attacker.observation.motor.x")
    star = memory_bus.subscribe("attacker.*")
    attribution = memory_bus.subscribe("attribution.>")

    ev = await memory_bus.publish("attacker.observation.motor.x", {"v": 1}, event_type="motor.x")
    assert ev.topic == "attacker.observation.motor.x" and ev.type == "motor.x"
    assert await next_event(all_obs) is ev
    assert await next_event(one) is ev
    await assert_empty(star)
    await assert_empty(attribution)

    ev2 = await memory_bus.publish("attacker.scored", {})
    assert await next_event(star) is ev2
    await assert_empty(all_obs)
    stats = memory_bus.stats()
    assert stats["published"] == 2
    assert stats["delivered"] == 3
    assert stats["subscriptions"] == 4


async def test_publisher_receives_its_own_events(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe("system.w.health")
    ev = await memory_bus.publish("system.w.health", {"a": 1})
    got = await next_event(sub)
    assert got.id == ev.id and got.payload == {"a": 1}


async def test_event_id_and_ts_preserved(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe(OBS)
    await memory_bus.publish("attacker.observation.p", {}, event_id="fixed-id", ts=12.0)
    got = await next_event(sub)
    assert (got.id, got.ts) == ("fixed-id", 12.0)


async def test_fifo_order(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe(OBS)
    for i in range(50):
        await memory_bus.publish("attacker.observation.p", {"i": i})
    assert [(await next_event(sub)).payload["i"] for _ in range(50)] == list(range(50))


@pytest.mark.parametrize("one_pass", [True, False], ids=["in-process", "generic"])
async def test_publish_many_sends_each_in_order_and_skips_what_cannot_go(
    memory_bus: InProcessBus, one_pass: bool
) -> None:
    """The worker publishes a batch's events in one call: each goes out as
    publish would send it (topic, type, id, payload), in order; an invalid
    topic or a payload that is not a dict is skipped and logged, and the
    others still go. The in-process bus's one-pass version and the generic
    one (publish each) agree."""
    from decnet_attr.bus.base import Bus

    sub = memory_bus.subscribe("attribution.>")
    other = memory_bus.subscribe("identity.>")
    events = [
        ("attribution.profile.updated", {"i": 0}, "profile.updated", "e0"),
        ("attribution.profile.>", {"i": 1}, "bad", "e1"),  # a wildcard is no topic
        ("identity.formed", {"i": 2}, "formed", "e2"),
        ("attribution.profile.updated", ["not", "a", "dict"], "x", "e3"),
        ("attribution.profile.state_changed", {"i": 4}, "state_changed", "e4"),
    ]
    publish_many = memory_bus.publish_many if one_pass else Bus.publish_many.__get__(memory_bus)
    assert await publish_many(events) == 3  # type: ignore[arg-type]
    got = [await next_event(sub), await next_event(sub)]
    assert [(e.topic, e.type, e.id, e.payload) for e in got] == [
        ("attribution.profile.updated", "profile.updated", "e0", {"i": 0}),
        ("attribution.profile.state_changed", "state_changed", "e4", {"i": 4}),
    ]
    assert (await next_event(other)).id == "e2"
    await assert_empty(sub)
    assert memory_bus.stats()["published"] == 3
    await memory_bus.close()
    with pytest.raises(RuntimeError, match="closed"):
        await publish_many(events[:1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic", ["attacker.observation.>", "attacker.*", "", "a..b", "a b", "a.", ">", "x" * 600]
)
async def test_publish_rejects_invalid_topics(memory_bus: InProcessBus, topic: str) -> None:
    with pytest.raises(ValueError):
        await memory_bus.publish(topic, {})
    with pytest.raises(ValueError):
        await memory_bus.publish_durable(topic, {})


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "a b", "a.b*"])
async def test_subscribe_rejects_invalid_patterns(memory_bus: InProcessBus, pattern: str) -> None:
    with pytest.raises(ValueError):
        memory_bus.subscribe(pattern)


async def test_payload_must_be_a_dict(memory_bus: InProcessBus) -> None:
    with pytest.raises(TypeError):
        await memory_bus.publish("a.b", [1])  # type: ignore[arg-type]


async def test_backpressure_drop_oldest(caplog: pytest.LogCaptureFixture) -> None:
    bus = InProcessBus(queue_size=2)
    async with bus:
        sub = bus.subscribe("t.>")
        with caplog.at_level(logging.WARNING, logger="decnet_attr.bus.base"):
            for i in range(5):
                await bus.publish("t.x", {"i": i})
        got = [await next_event(sub), await next_event(sub)]
        await assert_empty(sub)
        assert [e.payload["i"] for e in got] == [3, 4]
        assert got[-1].payload["i"] == 4
        assert sub.dropped == 3
        assert bus.stats()["dropped"] == 3
        assert bus.stats()["delivered"] == 5
        # drops are never silent, but rate-limited: one WARNING for the burst
        warnings = [r for r in caplog.records if "queue full" in r.getMessage()]
        assert len(warnings) == 1
        # closed subscriptions still count in the bus total
        await sub.aclose()
        assert bus.stats()["dropped"] == 3
        assert bus.stats()["subscriptions"] == 0


async def test_close_wakes_iterators_and_ends_subscriptions() -> None:
    bus = InProcessBus()
    await bus.connect()
    sub = bus.subscribe("a.>")
    received: list[Event] = []

    async def consume() -> None:
        async for ev in sub:
            received.append(ev)

    task = asyncio.ensure_future(consume())
    await bus.publish("a.b", {"n": 1})
    await asyncio.sleep(0.01)
    await bus.close()
    await asyncio.wait_for(task, 1.0)
    assert [e.payload for e in received] == [{"n": 1}]
    assert bus.closed and not bus.connected
    await bus.close()  # idempotent


async def test_close_drains_already_queued_events() -> None:
    bus = InProcessBus()
    sub = bus.subscribe("a.>")
    await bus.publish("a.b", {"n": 1})
    await bus.close()
    assert [e.payload async for e in sub] == [{"n": 1}]


async def test_closed_bus_rejects_use() -> None:
    bus = InProcessBus()
    await bus.connect()
    await bus.close()
    with pytest.raises(RuntimeError):
        bus.subscribe("a.>")
    with pytest.raises(RuntimeError):
        await bus.publish("a.b", {})
    with pytest.raises(RuntimeError):
        await bus.publish_durable("a.b", {})
    with pytest.raises(RuntimeError):
        bus.durable_consumer("a.>", durable="w")
    with pytest.raises(RuntimeError):
        await bus.connect()


async def test_subscription_aclose_unregisters_and_ends_iteration(
    memory_bus: InProcessBus,
) -> None:
    sub = memory_bus.subscribe("a.>")
    other = memory_bus.subscribe("a.>")
    await memory_bus.publish("a.b", {})
    async with sub:
        pass
    await sub.aclose()  # idempotent
    with pytest.raises(StopAsyncIteration):
        await next_event(sub)
    await memory_bus.publish("a.b", {})
    assert memory_bus.stats()["subscriptions"] == 1
    assert memory_bus.stats()["delivered"] == 3  # 2 for the first, 1 for the second
    assert (await next_event(other)).topic == "a.b"


async def test_route_cache_follows_subscribe_and_unsubscribe(memory_bus: InProcessBus) -> None:
    await memory_bus.publish("x.y", {"n": 0})  # caches the (empty) route for x.y
    late = memory_bus.subscribe("x.*")
    await memory_bus.publish("x.y", {"n": 1})
    assert (await next_event(late)).payload == {"n": 1}
    await late.aclose()
    again = memory_bus.subscribe("x.y")
    await memory_bus.publish("x.y", {"n": 2})
    assert (await next_event(again)).payload == {"n": 2}
    assert memory_bus.stats()["delivered"] == 2


async def test_route_cache_is_bounded() -> None:
    bus = InProcessBus(route_cache_size=8)
    sub = bus.subscribe("t.*")
    for i in range(50):
        await bus.publish(f"t.n{i}", {})
    assert len(bus._route) <= 8
    assert sub.pending == 50  # type: ignore[attr-defined]
    await bus.close()


# -- durable -------------------------------------------------------------------------------
async def test_publish_durable_without_consumer_is_unavailable(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe(OBS)
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable):
        await memory_bus.publish_durable("attacker.observation.p", {}, timeout=5)
    assert time.monotonic() - t0 < 1.0
    await assert_empty(sub)  # nothing fanned out either
    # a consumer on another pattern does not help
    memory_bus.durable_consumer("attribution.>", durable="other")
    with pytest.raises(BusUnavailable):
        await memory_bus.publish_durable("attacker.observation.p", {})


async def test_publish_durable_waits_for_ack(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="attribution")
    acked_at: list[float] = []

    async def worker() -> None:
        batch = await consumer.fetch(10, timeout=2.0)
        assert len(batch) == 1
        await asyncio.sleep(0.2)  # "commit"
        acked_at.append(time.monotonic())
        await batch[0].ack()

    task = asyncio.ensure_future(worker())
    t0 = time.monotonic()
    ev = await memory_bus.publish_durable(
        "attacker.observation.p", {"v": 1}, event_type="p", timeout=5
    )
    returned_at = time.monotonic()
    await asyncio.wait_for(task, 1)
    assert acked_at and returned_at >= acked_at[0]
    assert returned_at - t0 >= 0.2
    assert ev.type == "p"
    stats = memory_bus.stats()
    assert stats["durable_pending"] == 0
    assert stats["durable_acked"] == 1
    await consumer.aclose()


async def test_publish_durable_times_out_without_ack(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="w")
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable):
        await memory_bus.publish_durable("attacker.observation.p", {}, event_id="e1", timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 1.0
    # the event stays queued (at-least-once); a retry with the same id is de-duplicated
    assert memory_bus.stats()["durable_pending"] == 1

    async def ack_all() -> int:
        batch = await consumer.fetch(10, 1.0)
        for d in batch:
            await d.ack()
        return len(batch)

    task = asyncio.ensure_future(ack_all())
    await memory_bus.publish_durable("attacker.observation.p", {}, event_id="e1", timeout=2)
    assert await task == 1
    assert memory_bus.stats()["durable_pending"] == 0
    # a retry after the ack returns at once
    await asyncio.wait_for(
        memory_bus.publish_durable("attacker.observation.p", {}, event_id="e1"), 0.5
    )


async def test_durable_events_are_fanned_out_too(memory_bus: InProcessBus) -> None:
    sub = memory_bus.subscribe(OBS)
    consumer = memory_bus.durable_consumer(OBS, durable="w")

    async def ack_one() -> None:
        (d,) = await consumer.fetch(1, 1.0)
        await d.ack()

    task = asyncio.ensure_future(ack_one())
    ev = await memory_bus.publish_durable("attacker.observation.p", {"x": 1})
    await task
    assert (await next_event(sub)).id == ev.id


async def test_plain_publish_reaches_durable_consumers(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="w")
    ev = await memory_bus.publish("attacker.observation.p", {"x": 1})
    await memory_bus.publish("attribution.profile.updated", {})
    batch = await consumer.fetch(10, 0.5)
    assert [d.event.id for d in batch] == [ev.id]


async def test_nak_redelivers(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="w")
    ev = await memory_bus.publish("attacker.observation.p", {})
    (first,) = await consumer.fetch(10, 1.0)
    assert not first.redelivered
    assert await consumer.fetch(10, 0.05) == []  # in flight, not redelivered yet
    await first.nak()
    (second,) = await consumer.fetch(10, 1.0)
    assert second.event.id == ev.id
    assert second.redelivered
    await second.ack()
    await second.ack()  # idempotent
    assert await consumer.fetch(10, 0.05) == []
    assert memory_bus.stats()["durable_pending"] == 0


async def test_nak_with_delay(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="w")
    await memory_bus.publish("attacker.observation.p", {})
    (first,) = await consumer.fetch(1, 1.0)
    t0 = time.monotonic()
    await first.nak(delay=0.2)
    (second,) = await consumer.fetch(1, 2.0)
    assert time.monotonic() - t0 >= 0.15
    assert second.redelivered


async def test_unacked_deliveries_return_when_consumer_closes(memory_bus: InProcessBus) -> None:
    a = memory_bus.durable_consumer(OBS, durable="w")
    b = memory_bus.durable_consumer(OBS, durable="w")
    ev = await memory_bus.publish("attacker.observation.p", {})
    (got,) = await a.fetch(10, 1.0)
    assert got.event.id == ev.id
    assert await b.fetch(10, 0.05) == []
    await a.aclose()
    (again,) = await b.fetch(10, 1.0)
    assert again.event.id == ev.id and again.redelivered
    await got.ack()  # a late ack from the closed member still counts as committed
    await again.ack()
    assert memory_bus.stats()["durable_pending"] == 0
    with pytest.raises(BusError):
        await a.fetch(1, 0.1)


async def test_ack_wait_expiry_redelivers() -> None:
    bus = InProcessBus(ack_wait=0.2)
    consumer = bus.durable_consumer(OBS, durable="w")
    await bus.publish("attacker.observation.p", {})
    (first,) = await consumer.fetch(1, 1.0)
    t0 = time.monotonic()
    (second,) = await consumer.fetch(1, 2.0)
    assert time.monotonic() - t0 >= 0.15
    assert second.redelivered and second.event.id == first.event.id
    await first.nak()  # stale: ignored
    await second.ack()
    assert await consumer.fetch(1, 0.05) == []
    await bus.close()


async def test_competing_consumers_share_without_duplicates(memory_bus: InProcessBus) -> None:
    a = memory_bus.durable_consumer(OBS, durable="w")
    b = memory_bus.durable_consumer(OBS, durable="w")
    sent = [(await memory_bus.publish(f"attacker.observation.p{i}", {})).id for i in range(10)]
    batch_a = await a.fetch(5, 1.0)
    batch_b = await b.fetch(5, 1.0)
    ids_a = [d.event.id for d in batch_a]
    ids_b = [d.event.id for d in batch_b]
    assert len(ids_a) == len(ids_b) == 5
    assert not set(ids_a) & set(ids_b)
    assert ids_a + ids_b == sent
    # a different durable name is an independent group that gets everything
    c = memory_bus.durable_consumer(OBS, durable="audit")
    assert await c.fetch(100, 0.05) == []  # joined after the fact: nothing replayed


async def test_same_durable_name_different_pattern_rejected(memory_bus: InProcessBus) -> None:
    memory_bus.durable_consumer(OBS, durable="w")
    with pytest.raises(ValueError):
        memory_bus.durable_consumer("attribution.>", durable="w")
    with pytest.raises(ValueError):
        memory_bus.durable_consumer(OBS, durable="bad.name")


async def test_fetch_micro_batching(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="w")
    t0 = time.monotonic()
    assert await consumer.fetch(10, 0.1) == []
    assert 0.08 <= time.monotonic() - t0 < 0.5

    async def publish_later() -> None:
        await asyncio.sleep(0.1)
        for i in range(5):
            await memory_bus.publish("attacker.observation.p", {"i": i})

    task = asyncio.ensure_future(publish_later())
    t0 = time.monotonic()
    first = await consumer.fetch(3, 5.0)
    elapsed = time.monotonic() - t0
    await task
    assert 0.05 <= elapsed < 1.0  # returned as soon as messages arrived
    rest = await consumer.fetch(10, 1.0)
    payloads = [d.event.payload["i"] for d in first + rest]
    assert sorted(payloads) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        await consumer.fetch(0, 1.0)


async def test_durable_backpressure() -> None:
    bus = InProcessBus(durable_queue_size=1)
    consumer = bus.durable_consumer(OBS, durable="w")

    async def slow_worker() -> list[float]:
        times = []
        for _ in range(2):
            (d,) = await consumer.fetch(1, 2.0)
            await asyncio.sleep(0.2)
            times.append(time.monotonic())
            await d.ack()
        return times

    task = asyncio.ensure_future(slow_worker())
    first = asyncio.ensure_future(bus.publish_durable("attacker.observation.p", {"n": 1}))
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await bus.publish_durable("attacker.observation.p", {"n": 2}, timeout=3)
    assert time.monotonic() - t0 >= 0.3  # waited for space, then for its own ack
    await first
    await task
    # queue full and nobody acks within the timeout -> BusUnavailable
    await bus.publish("attacker.observation.p", {"n": 3})  # fills the queue (unacked)
    with pytest.raises(BusUnavailable):
        await bus.publish_durable("attacker.observation.p", {"n": 4}, timeout=0.1)
    await bus.close()


async def test_close_fails_pending_durable_publishes_and_fetches() -> None:
    bus = InProcessBus()
    consumer = bus.durable_consumer(OBS, durable="w")
    pub = asyncio.ensure_future(bus.publish_durable("attacker.observation.p", {}, timeout=5))
    await asyncio.sleep(0.01)
    (d,) = await consumer.fetch(1, 1.0)
    fetch = asyncio.ensure_future(consumer.fetch(1, 5.0))
    await asyncio.sleep(0.01)
    await bus.close()
    with pytest.raises(BusUnavailable):
        await asyncio.wait_for(pub, 1)
    with pytest.raises(BusError):
        await asyncio.wait_for(fetch, 1)
    with pytest.raises(BusError):
        await consumer.fetch(1, 0.1)
    await d.ack()  # harmless after close


async def test_delivery_interface(memory_bus: InProcessBus) -> None:
    consumer = memory_bus.durable_consumer(OBS, durable="w")
    async with consumer:
        await memory_bus.publish("attacker.observation.p", {"x": 1}, event_id="id1")
        (d,) = await consumer.fetch(1, 1.0)
        assert isinstance(d, Delivery)
        assert d.event.id == "id1" and d.event.payload == {"x": 1}
        await d.ack()
    assert memory_bus.stats()["durable_consumers"] == 0


async def test_throughput_smoke() -> None:
    """The fan-out hot path stays cheap (loose bound; real numbers live in benches/)."""
    bus = InProcessBus(queue_size=200_000)
    subs = [bus.subscribe(OBS) for _ in range(3)]
    for i in range(20):
        bus.subscribe(f"system.w{i}.control")
    n = 30_000
    t0 = time.perf_counter()
    for i in range(n):
        await bus.publish("attacker.observation.motor.x", {"i": i})
    elapsed = time.perf_counter() - t0
    assert all(s.pending == n for s in subs)  # type: ignore[attr-defined]
    assert elapsed < 3.0, f"{n / elapsed:.0f} events/s"
    await bus.close()


async def test_a_group_remembers_the_newest_acked_ids_and_forgets_the_oldest_first(
    memory_bus: InProcessBus,
) -> None:
    from decnet_attr.bus.memory import _RECENT_ACKED

    consumer = memory_bus.durable_consumer(OBS, durable="w")
    for n in range(_RECENT_ACKED + 1):
        await memory_bus.publish("attacker.observation.p", {"n": n}, event_id=f"e{n}")
    acked = 0
    while acked < _RECENT_ACKED + 1:
        batch = await consumer.fetch(1000, 1.0)
        for d in batch:
            await d.ack()
        acked += len(batch)
    # e0 is the oldest and was forgotten; e1 is still known
    await memory_bus.publish("attacker.observation.p", {"n": 0}, event_id="e0")
    await memory_bus.publish("attacker.observation.p", {"n": 1}, event_id="e1")
    again = await consumer.fetch(10, 0.2)
    assert [d.event.id for d in again] == ["e0"]
    await consumer.aclose()


async def test_acked_deliveries_are_not_kept_until_ack_wait(memory_bus: InProcessBus) -> None:
    """A fetch arms one timer that expires the deliveries not acked within
    ack_wait. Once all of them are acked (or nacked) it goes, and with it
    the events: a worker acking 100k events a second kept three million
    events (and their payloads, entries and futures) alive for the 30 s
    default, and the garbage collector walked them all."""
    import gc
    import weakref

    consumer = memory_bus.durable_consumer(OBS, durable="w")
    for i in range(3):
        await memory_bus.publish("attacker.observation.p", {"i": i})
    got = await consumer.fetch(10, 1.0)
    assert len(got) == 3
    events = [weakref.ref(d.event) for d in got]
    await got[0].ack()
    await got[1].nak()  # back in the queue: delivered again below
    await got[2].ack()
    del got
    gc.collect()
    assert [e() is None for e in events] == [True, False, True]  # the nacked one waits
    (again,) = await consumer.fetch(10, 1.0)
    assert again.event.payload == {"i": 1} and again.redelivered
    await again.ack()
    del again
    gc.collect()
    assert all(e() is None for e in events)
