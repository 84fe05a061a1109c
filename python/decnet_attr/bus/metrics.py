"""The bus's numbers for Prometheus: :class:`BusCollector` reads
``bus.connected`` and ``bus.stats()`` when it is scraped. A transport that
counts something new declares it in :data:`STATS`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from decnet_attr.bus.base import Bus
from decnet_attr.metrics import PREFIX, Stat, counter, flag, gauge, stat_families

__all__ = ["STATS", "BusCollector"]

#: Every key of a transport's ``stats()`` (series ``decnet_attr_bus_<key>``).
STATS: dict[str, Stat] = {
    "published": counter("Events published on the bus by this process."),
    "delivered": counter("Events delivered to this process's subscribers."),
    "dropped": counter(
        "Events dropped because a queue (subscriber, durable group, outbox) was full."
    ),
    "subscriptions": gauge("Open bus subscriptions."),
    "reconnects": counter("Reconnections of the bus transport."),
    "disconnects": counter("Losses of the bus connection."),
    "invalid": counter("Messages from the broker that were not valid events (nats://)."),
    "received": counter("Events received from the broker (unix://)."),
    "malformed": counter("Malformed frames or events from the broker, skipped (unix://)."),
    "oversized": counter("Oversized frames from the broker, skipped (unix://)."),
    "outbox_pending": gauge("Events waiting to be sent to the broker (unix://)."),
    "outbox_dropped": counter(
        "Events dropped because the outbox to the broker was full (unix://)."
    ),
    "durable_published": counter("Events published durably (acknowledged by the transport)."),
    "durable_duplicates": counter(
        "Durable publications the stream already held (same message id, nats://)."
    ),
    "durable_delivered": counter("Durable deliveries to this process's consumers."),
    "durable_acked": counter("Durable deliveries acknowledged."),
    "durable_redelivered": counter("Durable deliveries made again (nak or timeout)."),
    "durable_dropped": counter("Events dropped because a durable queue was full."),
    "durable_pending": gauge("Durable deliveries not acknowledged yet."),
    "durable_consumers": gauge("Open durable consumers."),
    "journal_backlog": gauge(
        "Observations written to the ingest journal and not acknowledged yet (memory://)."
    ),
}


class BusCollector(Collector):
    """``decnet_attr_bus_connected`` and one family per ``stats()`` key."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_bus_connected",
            "1 while the bus transport is usable.",
            value=flag(self.bus.connected),
        )
        yield from stat_families(f"{PREFIX}_bus", self.bus.stats(), STATS, "Bus")
