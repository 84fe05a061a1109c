"""Operability endpoints: liveness, readiness and Prometheus metrics.

``GET /healthz``
    Liveness: ``200 {"status": "ok"}`` whenever the process answers HTTP at
    all. It checks nothing else, so an orchestrator does not restart a healthy
    process because the database is down.
``GET /readyz``
    Readiness: ``200`` only when the store answers a trivial query (bounded by
    :data:`PING_TIMEOUT`; concurrent probes share one query), the bus is
    connected and, if this process runs the attribution worker, the worker is
    running with a fresh heartbeat (monotonic now - ``last_heartbeat`` <
    ``3 * max(1, heartbeat_interval)``). Otherwise ``503``. The body is always
    ``{"status": "ok" | "unready", "checks": {"store": bool, "bus": bool,
    "worker": bool | null}, "bus": {"transport": str, "reconnects": int,
    "dropped": int}}``, where ``worker`` is null when no worker runs in this
    process and ``bus`` holds the transport's counters (reconnections since
    start, events dropped by a full queue): they do not decide readiness, they
    say why events may be missing.
``GET /metrics``
    The Prometheus text format (``text/plain; version=0.0.4``) of a
    per-application :class:`~prometheus_client.CollectorRegistry`. Each
    component brings its own collector, which reads its live numbers when
    scraped: the bus (``bus/metrics.py``), the worker (``worker/metrics.py``),
    the SSE relay (``server/sse_metrics.py``), the API counters and the
    connection guard (``server/api_metrics.py``); the request counts, the
    version and the store's dead letters are this module's. Nothing is global,
    so several apps can share a process. The standard ``process_*`` metrics
    come from :class:`ProcessCollector`. A collector that fails is logged and
    left out of that scrape.

None of the three asks for authentication. ``/healthz`` and ``/readyz`` show
only booleans and the bus counters. ``/metrics`` shows counters and gauges. It has no user,
attacker or token data, and request counts are labelled by route template
(``/api/v1/attackers/{uuid}/attribution``), never by raw path. Prometheus can
scrape it on the listen address. If the API is reachable from untrusted
networks, keep ``/metrics`` behind the reverse proxy's access rules (there is
no metrics token setting).

:func:`setup_ops` installs everything on an application (``create_app`` calls
it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from decnet_attr.bus.metrics import BusCollector
from decnet_attr.logs import RepeatFilter
from decnet_attr.metrics import PREFIX
from decnet_attr.server.api_metrics import ApiCollector, ConnectionsCollector
from decnet_attr.server.errors import json_response
from decnet_attr.server.keys import (
    BUS,
    COUNTERS,
    DUPLICATES_BY_SENSOR,
    OPS,
    SETTINGS,
    SSE_HUB,
    STORE,
    WORKER,
)
from decnet_attr.server.sse_metrics import HasStats, SseCollector
from decnet_attr.worker.metrics import WorkerCollector
from decnet_attr.worker.worker import AttributionWorker

log = logging.getLogger(__name__)
#: Per-probe / per-scrape failures (collapsed); readiness changes go to ``log``.
_noisy = logging.getLogger(f"{__name__}.probes")
_noisy.addFilter(RepeatFilter(60.0))

__all__ = [
    "CONTENT_TYPE",
    "OPS",
    "PING_TIMEOUT",
    "GuardedCollector",
    "OpsState",
    "healthz",
    "metrics",
    "readyz",
    "setup_ops",
]

#: The Prometheus text exposition format ``generate_latest`` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds ``/readyz`` waits for ``store.ping()`` before calling the store down.
PING_TIMEOUT = 1.0
#: Seconds ``/metrics`` waits for ``store.dead_letter_count()`` (else no sample).
DEAD_LETTER_TIMEOUT = 1.0
#: A worker heartbeat older than this many heartbeat intervals is stale.
HEARTBEAT_FACTOR = 3.0
#: Request methods kept as label values; anything else is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Route label of requests that matched no route (404, 405).
UNMATCHED = "unmatched"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RequestKey = tuple[str, str, str]  # (route, method, status)


@dataclass
class OpsState:
    """Per-application state of this module (``app[OPS]``)."""

    registry: CollectorRegistry
    #: (route template, method, status) -> requests answered
    requests: dict[RequestKey, int] = field(default_factory=dict)
    #: Dead letters counted by the last scrape (None: unknown)
    dead_letters: int | None = None
    #: The store ping in flight (shared by concurrent readiness probes)
    ping_task: asyncio.Task[bool] | None = None
    #: The last readiness answer (to log changes only)
    ready: bool | None = None


# ---- set-up --------------------------------------------------------------------------------
def setup_ops(app: web.Application) -> CollectorRegistry:
    """Add ``/healthz``, ``/readyz``, ``/metrics`` and the request-counting
    middleware (outermost, so it sees the final status) to *app*; returns the
    app's registry. Call it once, before the app starts."""
    registry = CollectorRegistry(auto_describe=False)
    state = OpsState(registry=registry)
    for name, collector in _collectors(app, state):
        registry.register(GuardedCollector(name, collector))
    ProcessCollector(registry=registry)
    app[OPS] = state
    app.middlewares.insert(0, _request_counter(state.requests))
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.on_cleanup.append(_cleanup)
    return registry


async def _cleanup(app: web.Application) -> None:
    task = app[OPS].ping_task
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _route_label(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return UNMATCHED
    resource = info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def _request_counter(counts: dict[RequestKey, int]) -> Any:
    @web.middleware
    async def ops_request_counter(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route_label(request)
        method = request.method if request.method in METHODS else "other"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            key = (route, method, str(exc.status))
            counts[key] = counts.get(key, 0) + 1
            raise
        except Exception:
            # the error middleware answers every exception; this is a backstop
            key = (route, method, "500")
            counts[key] = counts.get(key, 0) + 1
            raise
        key = (route, method, str(response.status))
        counts[key] = counts.get(key, 0) + 1
        return response

    return ops_request_counter


# ---- health --------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests."""
    return json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: store answers, bus connected, in-process worker alive."""
    app = request.app
    state = app[OPS]
    store_ok = await _store_ok(app, state)
    bus_ok = bool(app[BUS].connected)
    worker_ok = _worker_ok(app)
    ok = store_ok and bus_ok and worker_ok is not False
    checks: dict[str, bool | None] = {"store": store_ok, "bus": bus_ok, "worker": worker_ok}
    _note_readiness(state, ok, checks)
    return json_response(
        {"status": "ok" if ok else "unready", "checks": checks, "bus": _bus_counters(app)},
        status=200 if ok else 503,
        headers={"Cache-Control": "no-store"},
    )


#: ``bus.stats()`` keys shown by ``/readyz`` (every bus has them).
READY_BUS_COUNTERS = ("reconnects", "dropped")


def _bus_counters(app: web.Application) -> dict[str, Any]:
    bus = app[BUS]
    out: dict[str, Any] = {"transport": str(bus.name)}
    try:
        stats = bus.stats()
    except Exception as exc:  # readiness must answer whatever the bus does
        _noisy.warning("readiness: bus.stats() failed: %s", exc)
        stats = {}
    for key in READY_BUS_COUNTERS:
        out[key] = int(stats.get(key, 0))
    return out


async def _store_ok(app: web.Application, state: OpsState) -> bool:
    task = state.ping_task
    if task is None or task.done():
        task = state.ping_task = asyncio.ensure_future(_ping(app))
    # shielded: a probe that gives up does not cancel the ping others wait for
    return await asyncio.shield(task)


async def _ping(app: web.Application) -> bool:
    try:
        return bool(await asyncio.wait_for(app[STORE].ping(), PING_TIMEOUT))
    except TimeoutError:
        _noisy.warning("readiness: store ping timed out after %.1f s", PING_TIMEOUT)
    except Exception as exc:
        _noisy.warning("readiness: store ping failed: %s", exc)
    return False


def _worker_ok(app: web.Application) -> bool | None:
    """None: no worker in this process; else running with a fresh heartbeat."""
    worker: AttributionWorker | None = app[WORKER]
    if worker is None:
        return None
    if not worker.running:
        return False
    limit = HEARTBEAT_FACTOR * max(1.0, float(app[SETTINGS].heartbeat_interval))
    return monotonic() - worker.last_heartbeat < limit


def _note_readiness(state: OpsState, ok: bool, checks: Mapping[str, bool | None]) -> None:
    previous, state.ready = state.ready, ok
    if previous is ok:
        return
    if not ok:
        failed = ", ".join(name for name, value in checks.items() if value is False)
        log.warning("not ready: %s", failed)
    elif previous is not None:
        log.info("ready again")


# ---- metrics -------------------------------------------------------------------------------
async def metrics(request: web.Request) -> web.Response:
    """The app's registry in the Prometheus text format (no authentication)."""
    app = request.app
    state = app[OPS]
    state.dead_letters = await _dead_letters(app)
    return web.Response(
        body=generate_latest(state.registry),
        headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
    )


async def _dead_letters(app: web.Application) -> int | None:
    try:
        return int(await asyncio.wait_for(app[STORE].dead_letter_count(), DEAD_LETTER_TIMEOUT))
    except TimeoutError:
        _noisy.warning("metrics: dead_letter_count timed out after %.1f s", DEAD_LETTER_TIMEOUT)
    except Exception as exc:
        _noisy.warning("metrics: dead_letter_count failed: %s", exc)
    return None


class GuardedCollector(Collector):
    """A component's collector as registered here: when it fails, the
    failure is logged (``metrics: _<name> failed``, rate-limited) and its
    families are left out of this scrape; the others still answer."""

    def __init__(self, name: str, collector: Collector) -> None:
        self.name = name
        self.collector = collector

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self.collector.collect())
        except Exception:
            _noisy.warning("metrics: _%s failed", self.name, exc_info=True)
            return []


def _collectors(app: web.Application, state: OpsState) -> Iterator[tuple[str, Collector]]:
    """Every component's collector, in the order of the scrape."""
    yield "info", InfoCollector(app)
    counters: dict[str, int] = app[COUNTERS]
    by_sensor: dict[str, int] = app[DUPLICATES_BY_SENSOR]
    yield "api", ApiCollector(counters, by_sensor)
    yield "http", RequestCollector(state)
    yield "bus", BusCollector(app[BUS])
    worker = app[WORKER]
    if worker is not None:
        yield "worker", WorkerCollector(worker)
    hub = app.get(SSE_HUB)
    if isinstance(hub, HasStats):
        yield "sse", SseCollector(hub)
    yield "store", StoreCollector(state)
    yield "connections", ConnectionsCollector(app)


class InfoCollector(Collector):
    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        from decnet_attr import __version__

        info = GaugeMetricFamily(
            f"{PREFIX}_info",
            "decnet-attr version and backends (value 1).",
            labels=["version", "bus", "store"],
        )
        store = self.app[STORE]
        info.add_metric([str(__version__), str(self.app[BUS].name), str(store.dialect)], 1.0)
        yield info


class RequestCollector(Collector):
    """The requests the middleware counted."""

    def __init__(self, state: OpsState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), n in sorted(self.state.requests.items()):
            family.add_metric([route, method, status], float(n))
        yield family


class StoreCollector(Collector):
    """The dead letters the handler counted before the scrape (none when
    the store did not answer in time)."""

    def __init__(self, state: OpsState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        count = self.state.dead_letters
        if count is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_store_dead_letters",
                "Dead letters (rejected events) held by the store.",
                value=float(count),
            )
