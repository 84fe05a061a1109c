"""The durable groups held in this process (``bus/local.py``), the same on the
in-process bus and on DECNET's Unix-socket bus (whose local path needs no
broker: the groups are fed by this process's own publishes here)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from decnet_attr.bus import Bus
from decnet_attr.bus.memory import InProcessBus
from decnet_attr.bus.unix import UnixBus

ACK_WAIT = 0.2


@pytest.fixture(params=["memory", "unix"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bus]:
    the_bus: Bus
    if request.param == "memory":
        the_bus = InProcessBus(ack_wait=ACK_WAIT)
        await the_bus.connect()
    else:  # never connected: PUBs wait in the outbox, the local groups work
        the_bus = UnixBus(tmp_path / "no-broker.sock", ack_wait=ACK_WAIT)
    try:
        yield the_bus
    finally:
        await the_bus.close()


async def test_the_first_of_nak_and_ack_decides(bus: Bus) -> None:
    consumer = bus.durable_consumer("t.>", durable="g")
    await bus.publish("t.x", {"i": 1})  # a plain publish reaches the group too
    (first,) = await consumer.fetch(10, timeout=1.0)
    await first.nak()
    await first.ack()  # after the nak: does not count
    assert bus.stats()["durable_acked"] == 0
    (again,) = await consumer.fetch(10, timeout=1.0)
    assert again.redelivered and not first.redelivered
    await again.ack()
    st = bus.stats()
    assert (st["durable_acked"], st["durable_redelivered"], st["durable_pending"]) == (1, 1, 0)
    await consumer.aclose()


async def test_a_late_ack_after_ack_wait_still_counts_once(bus: Bus) -> None:
    consumer = bus.durable_consumer("t.>", durable="g")
    await bus.publish("t.x", {"i": 1})
    (first,) = await consumer.fetch(10, timeout=1.0)
    await asyncio.sleep(ACK_WAIT * 2)
    (again,) = await consumer.fetch(10, timeout=1.0)  # not acked in time: out again
    assert again.redelivered
    await first.ack()  # the consumer committed it after all
    await again.ack()
    st = bus.stats()
    assert (st["durable_acked"], st["durable_redelivered"], st["durable_pending"]) == (1, 1, 0)
    assert await consumer.fetch(10, timeout=0.05) == []
    await consumer.aclose()


async def test_a_closing_consumer_gives_its_deliveries_back(bus: Bus) -> None:
    first = bus.durable_consumer("t.>", durable="g")
    second = bus.durable_consumer("t.>", durable="g")
    for i in range(3):
        await bus.publish(f"t.{i}", {"i": i})
    taken = await first.fetch(2, timeout=1.0)
    assert [d.event.payload["i"] for d in taken] == [0, 1]
    await first.aclose()
    got = await second.fetch(10, timeout=1.0)
    assert sorted((d.event.payload["i"], d.redelivered) for d in got) == [
        (0, True),
        (1, True),
        (2, False),
    ]
    with pytest.raises(ValueError, match="already reads"):
        bus.durable_consumer("other.>", durable="g")
    await second.aclose()
