"""The HTTP side's numbers for Prometheus.

- :class:`ApiCollector`: the app's plain counters (``app[COUNTERS]``, counted
  by authentication, ingest and the error middleware; declared in
  :data:`API_STATS`) as ``decnet_attr_api_…``, and the duplicates per sensor;
- :class:`ConnectionsCollector`: the connection guard's counters
  (``decnet_attr_http_connections_…``) when ``make_runner`` installed one.

Request counts by route are ``server/ops.py``'s, which counts them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from decnet_attr.metrics import PREFIX, Stat, counter, gauge, stat_families
from decnet_attr.server.connections import CONNECTIONS

__all__ = ["API_STATS", "CONNECTION_STATS", "ApiCollector", "ConnectionsCollector"]

#: The keys of ``app[COUNTERS]`` (series ``decnet_attr_api_<key without _total>``).
API_STATS: dict[str, Stat] = {
    "auth_failures_total": counter("Requests refused for missing or invalid credentials."),
    "login_failures_total": counter("Failed logins."),
    "logins_total": counter("Successful logins."),
    "rate_limited_total": counter("Requests refused by a rate limit (429)."),
    "tickets_minted_total": counter("SSE tickets issued."),
    "tickets_redeemed_total": counter("SSE tickets redeemed."),
    "observations_accepted_total": counter("Observations accepted by POST /api/v1/observations."),
    "observations_rejected_total": counter("Observations refused by POST /api/v1/observations."),
    "ingest_unavailable_total": counter("Ingest requests answered 503 (bus unavailable)."),
    "ingest_backpressure_total": counter(
        "Ingest requests answered 503 because the pipeline is behind."
    ),
    "ingest_inflight": gauge("Observations handed to the bus and not yet acknowledged durable."),
    "observations_duplicate_total": counter(
        "Observations sent again that were already stored (202 duplicates)."
    ),
    "http_5xx_total": counter("Responses with a 5xx status."),
}

#: The keys of ``ConnectionGuard.stats()`` (series ``decnet_attr_http_<key>``).
CONNECTION_STATS: dict[str, Stat] = {
    "connections_open": gauge("Open HTTP connections."),
    "connections_max": gauge("The cap on open HTTP connections."),
    "connections_refused": counter("Connections refused over the total or per-address cap."),
    "connections_header_timeouts": counter(
        "Connections closed for not sending a request head in time."
    ),
}


class ApiCollector(Collector):
    def __init__(self, counters: Mapping[str, int], by_sensor: Mapping[str, int]) -> None:
        self.counters = counters
        self.by_sensor = by_sensor

    def collect(self) -> Iterator[Metric]:
        yield from stat_families(f"{PREFIX}_api", self.counters, API_STATS, "API")
        family = CounterMetricFamily(
            f"{PREFIX}_api_observations_duplicate_by_sensor",
            "Observations a sensor sent again (already stored), by sensor.",
            labels=["sensor"],
        )
        for sensor, n in sorted(self.by_sensor.items()):
            family.add_metric([sensor], float(n))
        yield family


class ConnectionsCollector(Collector):
    """Looks the guard up at scrape time: ``make_runner`` installs it after
    the app is built (tests and embedders serve without one)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        guard = self.app.get(CONNECTIONS)
        if guard is not None:
            yield from stat_families(f"{PREFIX}_http", guard.stats(), CONNECTION_STATS, "HTTP")
