"""Fixtures for the bus tests: an in-process bus, a real nats-server, NATS buses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from decnet_attr.bus.memory import InProcessBus
from decnet_attr.bus.nats import NatsBus
from tests.natsserver import NatsServer, nats_server_path

NatsBusFactory = Callable[..., Awaitable[NatsBus]]


@pytest.fixture
async def memory_bus() -> AsyncIterator[InProcessBus]:
    bus = InProcessBus()
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A fresh nats-server (JetStream, 127.0.0.1, private store) per test."""
    if nats_server_path() is None:
        pytest.skip("nats-server not installed")
    with NatsServer() as server:
        yield server


@pytest.fixture
async def nats_bus_factory(nats_server: NatsServer) -> AsyncIterator[NatsBusFactory]:
    """Build connected NatsBus instances (fast reconnects, short timeouts); all
    are closed at teardown."""
    buses: list[NatsBus] = []

    async def make(**kw: Any) -> NatsBus:
        options: dict[str, Any] = {
            "reconnect_time_wait": 0.1,
            "connect_timeout": 5.0,
            "request_timeout": 2.0,
        }
        options.update(kw)
        bus = NatsBus(nats_server.url, **options)
        buses.append(bus)
        await bus.connect()
        return bus

    try:
        yield make
    finally:
        for bus in buses:
            await bus.close()


@pytest.fixture
async def nats_bus(nats_bus_factory: NatsBusFactory) -> NatsBus:
    return await nats_bus_factory()
