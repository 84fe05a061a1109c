"""NatsBus against a real nats-server (JetStream), started per test on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import pytest

from decnet_attr.bus import BusError, BusUnavailable, Event, Subscription
from decnet_attr.bus.nats import NatsBus
from tests.natsserver import NatsServer, free_port, requires_nats

NatsBusFactory = Callable[..., Awaitable[NatsBus]]

pytestmark = [requires_nats, pytest.mark.timeout(60)]

OBS = "attacker.observation.>"


async def next_event(sub: Subscription, timeout: float = 2.0) -> Event:
    return await asyncio.wait_for(sub.__anext__(), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_publish_subscribe_round_trip_preserves_id(nats_bus_factory: NatsBusFactory) -> None:
    publisher = await nats_bus_factory(name="pub")
    subscriber = await nats_bus_factory(name="sub")
    sub = subscriber.subscribe("attribution.>")
    await sub.wait_ready(timeout=5)
    ev = await publisher.publish(
        "attribution.profile.state_changed",
        {"identity_uuid": "i1", "new_state": "stable"},
        event_type="profile.state_changed",
        event_id="0123456789abcdef0123456789abcdef",
        ts=1700000000.25,
    )
    got = await next_event(sub)
    assert got == ev  # topic, payload, type, v, ts and id all preserved end to end
    assert got.id == "0123456789abcdef0123456789abcdef"
    assert publisher.stats()["published"] == 1
    assert subscriber.stats()["delivered"] == 1


@pytest.mark.parametrize("one_pass", [True, False], ids=["nats", "generic"])
async def test_publish_many_sends_each_in_order_and_skips_what_cannot_go(
    nats_bus_factory: NatsBusFactory, one_pass: bool
) -> None:
    """The worker's events in one call: each arrives as publish sends it
    (topic, type, id, payload, one time for the call), in order; an invalid
    topic or a payload that is not a dict is skipped and logged, the others
    still go. NATS's one-pass version and the generic one (publish each)
    agree."""
    from decnet_attr.bus.base import Bus

    publisher = await nats_bus_factory(name="pub")
    subscriber = await nats_bus_factory(name="sub")
    sub = subscriber.subscribe("attribution.>")
    await sub.wait_ready(timeout=5)
    events = [
        ("attribution.profile.updated", {"i": 0}, "profile.updated", "e0"),
        ("attribution.profile.>", {"i": 1}, "bad", "e1"),  # a wildcard is no topic
        ("attribution.profile.updated", ["not", "a", "dict"], "x", "e3"),
        ("attribution.a b", {"i": 3}, "bad", "e3"),  # nor is a space in it
        ("attribution.profile.state_changed", {"i": 4, "f": 0.1}, "state_changed", "e4"),
        ("attribution.profile.updated", {"i": 5}, "profile.updated", ""),
    ]
    publish_many = publisher.publish_many if one_pass else Bus.publish_many.__get__(publisher)
    before = time.time()
    assert await publish_many(events) == 3  # type: ignore[arg-type]
    got = [await next_event(sub) for _ in range(3)]
    assert [(e.topic, e.type, e.id, e.payload, e.v) for e in got[:2]] == [
        ("attribution.profile.updated", "profile.updated", "e0", {"i": 0}, 1),
        ("attribution.profile.state_changed", "state_changed", "e4", {"i": 4, "f": 0.1}, 1),
    ]
    assert len(got[2].id) == 32  # no id given: a fresh one
    assert all(before <= e.ts <= time.time() for e in got)
    assert publisher.stats()["published"] == 3
    await publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await publish_many(events[:1])  # type: ignore[arg-type]


async def test_publisher_sees_its_own_events(nats_bus: NatsBus) -> None:
    sub = nats_bus.subscribe("system.*.health")
    # no wait_ready: the bus orders its own SUB before the following PUB
    ev = await nats_bus.publish("system.attribution.health", {"worker": "attribution"})
    assert (await next_event(sub)).id == ev.id


async def test_subscribe_before_connect(nats_server: NatsServer) -> None:
    bus = NatsBus(nats_server.url)
    try:
        sub = bus.subscribe("a.>")
        await bus.connect()
        await bus.connect()  # idempotent
        await sub.wait_ready(timeout=5)
        ev = await bus.publish("a.b", {"k": 1})
        assert (await next_event(sub)).id == ev.id
    finally:
        await bus.close()


async def test_invalid_topics_and_closed_bus(nats_bus: NatsBus) -> None:
    for topic in ["attacker.observation.>", "a.*", "", "a..b", "a b"]:
        with pytest.raises(ValueError):
            await nats_bus.publish(topic, {})
        with pytest.raises(ValueError):
            await nats_bus.publish_durable(topic, {})
    with pytest.raises(ValueError):
        nats_bus.subscribe("a.>.b")
    await nats_bus.close()
    await nats_bus.close()
    with pytest.raises(RuntimeError):
        nats_bus.subscribe("a.>")
    with pytest.raises(RuntimeError):
        await nats_bus.publish("a.b", {})
    assert not nats_bus.connected


async def test_close_wakes_iterators(nats_bus: NatsBus) -> None:
    sub = nats_bus.subscribe("a.>")
    await sub.wait_ready(timeout=5)

    async def consume() -> list[Event]:
        return [ev async for ev in sub]

    task = asyncio.ensure_future(consume())
    await nats_bus.publish("a.b", {})
    await asyncio.sleep(0.1)
    await nats_bus.close()
    events = await asyncio.wait_for(task, 2)
    assert [e.topic for e in events] == ["a.b"]


async def test_subscription_aclose_unsubscribes(nats_bus: NatsBus) -> None:
    sub = nats_bus.subscribe("a.>")
    keep = nats_bus.subscribe("a.>")
    await nats_bus.publish("a.b", {})
    await next_event(sub)
    await sub.aclose()
    await nats_bus.publish("a.b", {})
    await next_event(keep)
    await next_event(keep)
    await nats_bus.flush()
    assert sub.pending == 0  # type: ignore[attr-defined]
    assert nats_bus.stats()["subscriptions"] == 1


async def test_backpressure_drop_oldest(nats_bus_factory: NatsBusFactory) -> None:
    bus = await nats_bus_factory(queue_size=2)
    sub = bus.subscribe("t.>")
    same = bus.subscribe("t.>")  # shares one NATS subscription, own queue
    for i in range(5):
        await bus.publish("t.x", {"i": i})
    await wait_until(lambda: bus.stats()["delivered"] == 10)
    assert [(await next_event(sub)).payload["i"] for _ in range(2)] == [3, 4]
    assert sub.dropped == 3 and same.dropped == 3
    assert bus.stats()["dropped"] == 6
    await same.aclose()
    await bus.publish("t.x", {"i": 5})
    assert (await next_event(sub)).payload["i"] == 5
    assert bus.stats()["dropped"] == 6


async def test_undecodable_messages_are_dropped_and_counted(
    nats_server: NatsServer, nats_bus: NatsBus
) -> None:
    sub = nats_bus.subscribe("raw.>")
    await sub.wait_ready(timeout=5)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.publish("raw.x", b"not json")
        await nc.publish("raw.x", b"[1]")
        await nc.publish("raw.x", b'{"id":"ok","payload":{"a":1},"topic":"spoofed"}')
        await nc.flush()
    finally:
        await nc.close()
    got = await next_event(sub)
    assert (got.id, got.topic, got.payload) == ("ok", "raw.x", {"a": 1})
    assert nats_bus.stats()["invalid"] == 2


# -- durable -------------------------------------------------------------------------------
async def test_publish_durable_and_fetch_ack(nats_bus_factory: NatsBusFactory) -> None:
    producer = await nats_bus_factory(name="sensor")
    worker = await nats_bus_factory(name="worker")
    sub = worker.subscribe(OBS)
    await sub.wait_ready(timeout=5)
    sent = [
        await producer.publish_durable(
            f"attacker.observation.motor.p{i}", {"i": i}, event_type=f"motor.p{i}"
        )
        for i in range(5)
    ]
    consumer = worker.durable_consumer(OBS, durable="attribution")
    got = await consumer.fetch(10, timeout=5)
    assert [d.event for d in got] == sent  # ids, ts, payloads preserved, in order
    assert not any(d.redelivered for d in got)
    for d in got:
        await d.ack()
    # durable events are fanned out to plain subscribers as well
    assert [(await next_event(sub)).id for _ in range(5)] == [e.id for e in sent]
    await worker.flush()
    assert await consumer.fetch(10, timeout=0.3) == []
    assert producer.stats()["durable_published"] == 5
    assert worker.stats()["durable_acked"] == 5
    await consumer.aclose()


async def test_publish_durable_dedupes_by_event_id(nats_bus: NatsBus) -> None:
    consumer = nats_bus.durable_consumer(OBS, durable="w")
    for _ in range(3):
        await nats_bus.publish_durable("attacker.observation.p", {"a": 1}, event_id="same-id")
    got = await consumer.fetch(10, timeout=1)
    assert [d.event.id for d in got] == ["same-id"]
    assert nats_bus.stats()["durable_duplicates"] == 2


async def test_publish_durable_outside_the_stream_is_unavailable(nats_bus: NatsBus) -> None:
    with pytest.raises(BusUnavailable):
        await nats_bus.publish_durable("attribution.profile.updated", {}, timeout=1)


async def test_fetch_times_out_empty(nats_bus: NatsBus) -> None:
    consumer = nats_bus.durable_consumer(OBS, durable="w")
    t0 = time.monotonic()
    assert await consumer.fetch(10, timeout=0.3) == []
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert await consumer.fetch(10, timeout=0.3) == []
    assert 0.2 <= time.monotonic() - t0 < 1.0


async def test_fetch_returns_when_first_message_arrives(nats_bus: NatsBus) -> None:
    consumer = nats_bus.durable_consumer(OBS, durable="w")
    assert await consumer.fetch(5, timeout=0.2) == []  # bind first

    async def later() -> None:
        await asyncio.sleep(0.2)
        await nats_bus.publish_durable("attacker.observation.p", {})

    task = asyncio.ensure_future(later())
    t0 = time.monotonic()
    got = await consumer.fetch(100, timeout=5)
    elapsed = time.monotonic() - t0
    await task
    assert len(got) == 1
    assert elapsed < 2.0
    await got[0].ack()


async def test_unacked_message_redelivered_after_ack_wait(nats_bus_factory: NatsBusFactory) -> None:
    bus = await nats_bus_factory(ack_wait=1.0)
    consumer = bus.durable_consumer(OBS, durable="w")
    ev = await bus.publish_durable("attacker.observation.p", {"x": 1})
    (first,) = await consumer.fetch(10, timeout=2)
    assert first.event.id == ev.id and not first.redelivered
    t0 = time.monotonic()
    (second,) = await consumer.fetch(10, timeout=5)
    assert time.monotonic() - t0 >= 0.5
    assert second.event.id == ev.id and second.redelivered
    await second.ack()
    assert await consumer.fetch(10, timeout=1.5) == []


async def test_nak_redelivers(nats_bus: NatsBus) -> None:
    consumer = nats_bus.durable_consumer(OBS, durable="w")
    ev = await nats_bus.publish_durable("attacker.observation.p", {})
    (first,) = await consumer.fetch(1, timeout=2)
    await first.nak()
    (second,) = await consumer.fetch(1, timeout=2)
    assert second.event.id == ev.id and second.redelivered
    await second.ack()


async def test_same_durable_name_shares_work(nats_bus_factory: NatsBusFactory) -> None:
    producer = await nats_bus_factory()
    proc_a = await nats_bus_factory(name="worker-a")
    proc_b = await nats_bus_factory(name="worker-b")
    sent = [
        (await producer.publish_durable(f"attacker.observation.p{i}", {"i": i})).id
        for i in range(20)
    ]
    a = proc_a.durable_consumer(OBS, durable="attribution")
    b = proc_b.durable_consumer(OBS, durable="attribution")
    seen_a: list[str] = []
    seen_b: list[str] = []
    # alternate: each member only gets what the other has not been handed
    while len(seen_a) + len(seen_b) < 20:
        for consumer, seen in ((a, seen_a), (b, seen_b)):
            batch = await consumer.fetch(5, timeout=2)
            seen.extend(d.event.id for d in batch)
            for d in batch:
                await d.ack()
    assert seen_a and seen_b
    assert not set(seen_a) & set(seen_b)
    assert sorted(seen_a + seen_b) == sorted(sent)
    # nothing left for anyone
    assert await a.fetch(10, timeout=0.3) == []
    assert await b.fetch(10, timeout=0.3) == []


async def test_consumer_close_returns_unacked_work(nats_bus_factory: NatsBusFactory) -> None:
    proc_a = await nats_bus_factory()
    proc_b = await nats_bus_factory()
    ev = await proc_a.publish_durable("attacker.observation.p", {})
    a = proc_a.durable_consumer(OBS, durable="w")
    (got,) = await a.fetch(1, timeout=2)
    await a.aclose()  # naks what it did not ack
    with pytest.raises(BusError):
        await a.fetch(1, timeout=0.1)
    b = proc_b.durable_consumer(OBS, durable="w")
    (again,) = await b.fetch(1, timeout=3)
    assert again.event.id == ev.id == got.event.id and again.redelivered
    await again.ack()


async def test_fetch_on_closed_bus_raises(nats_bus: NatsBus) -> None:
    consumer = nats_bus.durable_consumer(OBS, durable="w")
    assert await consumer.fetch(1, timeout=0.2) == []
    pending = asyncio.ensure_future(consumer.fetch(1, timeout=10))
    await asyncio.sleep(0.1)
    await nats_bus.close()
    with pytest.raises(BusError):
        await asyncio.wait_for(pending, 3)
    with pytest.raises(BusError):
        await consumer.fetch(1, timeout=0.1)


async def test_stream_persists_across_bus_instances(nats_bus_factory: NatsBusFactory) -> None:
    first = await nats_bus_factory()
    ev = await first.publish_durable("attacker.observation.p", {})
    await first.close()
    # a worker that starts later still gets it (durable consumer, deliver all)
    second = await nats_bus_factory()
    consumer = second.durable_consumer(OBS, durable="late")
    (got,) = await consumer.fetch(10, timeout=2)
    assert got.event.id == ev.id
    await got.ack()


# -- availability --------------------------------------------------------------------------
async def test_connect_to_dead_port_is_bounded() -> None:
    bus = NatsBus(f"nats://127.0.0.1:{free_port()}", connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable):
        await bus.connect()
    assert time.monotonic() - t0 < 3.0
    assert not bus.connected
    # publishing lazily connects, and fails the same bounded way
    with pytest.raises(BusUnavailable):
        await bus.publish("a.b", {})
    await bus.close()


async def test_publish_durable_while_disconnected_raises_after_timeout(
    nats_server: NatsServer, nats_bus: NatsBus
) -> None:
    consumer = nats_bus.durable_consumer(OBS, durable="w")
    await nats_bus.publish_durable("attacker.observation.p", {})
    await nats_server.astop()
    await wait_until(lambda: not nats_bus.connected)
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable):
        await nats_bus.publish_durable("attacker.observation.p", {}, timeout=0.5)
    assert time.monotonic() - t0 < 2.0
    # fetch while disconnected: an empty batch after its timeout, not an error
    assert await consumer.fetch(10, timeout=0.3) == []
    await nats_server.astart()
    await wait_until(lambda: nats_bus.stats()["reconnects"] >= 1, timeout=10)
    assert nats_bus.connected
    got = await consumer.fetch(10, timeout=3)
    assert len(got) >= 1  # the stored event survived the restart


async def test_server_restart_loses_no_acked_event(
    nats_server: NatsServer, nats_bus_factory: NatsBusFactory
) -> None:
    """A publisher keeps publishing durably (retrying with the same event id)
    while the server restarts: every publish that returned is later fetched."""
    producer = await nats_bus_factory(name="sensor")
    consumer_bus = await nats_bus_factory(name="worker")
    consumer = consumer_bus.durable_consumer(OBS, durable="attribution")
    assert await consumer.fetch(1, timeout=0.2) == []  # create the consumer

    acked: list[str] = []
    failures = 0
    stop = asyncio.Event()

    async def publisher() -> None:
        nonlocal failures
        i = 0
        while not stop.is_set():
            eid = f"evt-{i:06d}"
            while True:
                try:
                    await producer.publish_durable(
                        "attacker.observation.p", {"i": i}, event_id=eid, timeout=0.5
                    )
                except BusUnavailable:
                    failures += 1
                    await asyncio.sleep(0.05)
                    continue
                acked.append(eid)
                break
            i += 1
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(publisher())
    await wait_until(lambda: len(acked) >= 20)
    await nats_server.astop()
    await asyncio.sleep(0.5)
    await nats_server.astart()
    await wait_until(lambda: producer.stats()["reconnects"] >= 1, timeout=10)
    n_at_restart = len(acked)
    await wait_until(lambda: len(acked) >= n_at_restart + 20, timeout=15)
    stop.set()
    await asyncio.wait_for(task, 10)

    assert failures >= 1  # the outage was seen by the publisher
    received: set[str] = set()
    deadline = time.monotonic() + 15
    while not set(acked) <= received and time.monotonic() < deadline:
        for d in await consumer.fetch(200, timeout=1.0):
            received.add(d.event.id)
            await d.ack()
    missing = sorted(set(acked) - received)
    assert not missing, f"{len(missing)} acked events lost: {missing[:5]}"
    assert producer.stats()["reconnects"] >= 1
    assert consumer_bus.stats()["reconnects"] >= 1
    assert producer.connected and consumer_bus.connected


async def test_connected_reflects_server_state(nats_server: NatsServer, nats_bus: NatsBus) -> None:
    assert nats_bus.connected
    sub = nats_bus.subscribe("a.>")
    await sub.wait_ready(timeout=5)
    await nats_server.astop()
    await wait_until(lambda: not nats_bus.connected)
    await nats_server.astart()
    await wait_until(lambda: nats_bus.connected, timeout=10)
    await wait_until(lambda: nats_bus.stats()["reconnects"] >= 1, timeout=10)
    assert nats_bus.stats()["disconnects"] >= 1
    # subscriptions are replayed after the reconnect
    await sub.wait_ready(timeout=5)
    ev = await nats_bus.publish("a.b", {})
    assert (await next_event(sub)).id == ev.id


async def test_worker_can_start_before_the_server() -> None:
    """A durable consumer polls quietly while no server is up, then works."""
    server = NatsServer()  # not started yet
    bus = NatsBus(server.url, connect_timeout=0.5, reconnect_time_wait=0.1)
    try:
        consumer = bus.durable_consumer(OBS, durable="w")
        t0 = time.monotonic()
        assert await consumer.fetch(10, timeout=0.2) == []
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(BusUnavailable):
            await bus.publish_durable("attacker.observation.p", {}, timeout=0.5)
        await server.astart()
        ev = await bus.publish_durable("attacker.observation.p", {}, timeout=5)
        (got,) = await consumer.fetch(10, timeout=3)
        assert got.event.id == ev.id
        await got.ack()
    finally:
        await bus.close()
        server.cleanup()


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.DECNET_OBSERVATIONS.attribution.3.17.9.1733100000000000000.0",
        "$JS.ACK._.ABCDEFHASH.DECNET_OBSERVATIONS.attribution-p1.1.2.2.1733100000000000000.5.xyz",
        "$JS.ACK.hub.ABCDEFHASH.S.c.12.2.2.1733100000000000000.5",
    ],
)
def test_delivery_count_read_from_the_reply_subject_as_nats_py_reads_it(reply: str) -> None:
    from nats.aio.msg import Msg

    from decnet_attr.bus.nats import _delivered

    assert _delivered(reply) == Msg.Metadata._from_reply(reply).num_delivered


def test_delivery_count_of_a_reply_subject_of_no_known_form_is_zero() -> None:
    from decnet_attr.bus.nats import _delivered

    bad = (
        None,
        "",
        "_INBOX.abc",
        "$JS.ACK.S.c.x.1.1.1.0",
        "$JS.API.X.Y.1.2.3.4.5",
        "$JS.ACK.a.b.c.d.1.2.3.4",
    )
    for reply in bad:
        assert _delivered(reply) == 0
