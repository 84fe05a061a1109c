"""The SSE relay's numbers for Prometheus: :class:`SseCollector` reads
``hub.stats()`` when it is scraped (series ``decnet_attr_sse_…``). The hub
keeps its counters; what they are called on ``/metrics`` and what they mean
is declared here, in :data:`STATS`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from decnet_attr.metrics import PREFIX, Stat, counter, gauge, number, stat_families

__all__ = ["CLOSED_PREFIX", "STATS", "HasStats", "SseCollector"]


@runtime_checkable
class HasStats(Protocol):
    """What the collector needs of the hub."""

    def stats(self) -> dict[str, Any]: ...


#: ``stats()`` keys ``closed_<reason>`` are one family labelled by reason.
CLOSED_PREFIX = "closed_"

#: Every other key of ``SseHub.stats()`` (series ``decnet_attr_sse_<name>``).
STATS: dict[str, Stat] = {
    "streams_open": gauge("Open SSE streams."),
    "streams_total": counter("SSE streams opened."),
    "events_in": counter("Bus events the relay received."),
    "events_routed": counter("Bus events the relay routed to at least one stream."),
    "frames_sent": counter("SSE frames written to streams.", "events_sent"),
    "frames_dropped": counter("SSE frames dropped for slow streams.", "events_dropped"),
    "gaps": counter("SSE gap notices sent after drops."),
    "stale": counter("SSE stale notices (cursor not resumable, or resync)."),
    "resumes": counter("SSE streams resumed from Last-Event-ID."),
    "snapshots": counter("Snapshots read for SSE streams."),
    "rejected_cap": counter("SSE streams refused: the user had too many open (429)."),
    "bus_connected": gauge("1 while the relay's bus subscription is live."),
    "bus_resubscribes": counter("Times the relay subscribed to the bus again."),
    "resyncs": counter("Times every open stream was marked stale (relay resync)."),
    "bad_events": counter("Bus events the relay failed to route, skipped."),
    "overview_frames": counter("Overview frames built for the overview streams."),
    "channels": gauge("Attackers with at least one open stream."),
    "identities": gauge("Identities with at least one open stream."),
    "users": gauge("Users with at least one open stream."),
    "handlers": gauge("SSE request handlers running."),
}


class SseCollector(Collector):
    """One family per ``hub.stats()`` key, and the ``closed_<reason>``
    counters as ``decnet_attr_sse_streams_closed{reason=…}``."""

    def __init__(self, hub: HasStats) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        stats = self.hub.stats()
        closed = CounterMetricFamily(
            f"{PREFIX}_sse_streams_closed",
            "SSE streams closed by the server, by reason.",
            labels=["reason"],
        )
        for key, value in sorted(stats.items()):
            v = number(value)
            if key.startswith(CLOSED_PREFIX) and v is not None:
                closed.add_metric([key[len(CLOSED_PREFIX) :]], v)
        rest = {k: v for k, v in stats.items() if not k.startswith(CLOSED_PREFIX)}
        yield from stat_families(f"{PREFIX}_sse", rest, STATS, "SSE relay")
        yield closed
