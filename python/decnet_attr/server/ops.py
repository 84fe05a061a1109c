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
    per-application :class:`~prometheus_client.CollectorRegistry`. One
    collector reads the live objects (worker stats, ``bus.stats()``,
    ``SseHub.stats()``, the app's ``COUNTERS``, the request counts) when it is
    scraped, so nothing is global and several apps can share a process. The
    standard ``process_*`` metrics come from :class:`ProcessCollector`.

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
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from decnet_attr.logs import RepeatFilter
from decnet_attr.server.errors import json_response
from decnet_attr.server.keys import (
    BUS,
    COUNTERS,
    DUPLICATES_BY_SENSOR,
    SETTINGS,
    SSE_HUB,
    STORE,
    WORKER,
)

log = logging.getLogger(__name__)
#: Per-probe / per-scrape failures (collapsed); readiness changes go to ``log``.
_noisy = logging.getLogger(f"{__name__}.probes")
_noisy.addFilter(RepeatFilter(60.0))

__all__ = [
    "CONTENT_TYPE",
    "OPS",
    "PING_TIMEOUT",
    "AppCollector",
    "OpsState",
    "healthz",
    "metrics",
    "readyz",
    "setup_ops",
]

PREFIX = "decnet_attr"
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


OPS = web.AppKey("ops", OpsState)


# ---- set-up --------------------------------------------------------------------------------
def setup_ops(app: web.Application) -> CollectorRegistry:
    """Add ``/healthz``, ``/readyz``, ``/metrics`` and the request-counting
    middleware (outermost, so it sees the final status) to *app*; returns the
    app's registry. Call it once, before the app starts."""
    registry = CollectorRegistry(auto_describe=False)
    state = OpsState(registry=registry)
    registry.register(AppCollector(app, state))
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
    except asyncio.TimeoutError:
        _noisy.warning("readiness: store ping timed out after %.1f s", PING_TIMEOUT)
    except Exception as exc:
        _noisy.warning("readiness: store ping failed: %s", exc)
    return False


def _worker_ok(app: web.Application) -> bool | None:
    """None: no worker in this process; else running with a fresh heartbeat."""
    worker = app[WORKER]
    if worker is None:
        return None
    if not bool(getattr(worker, "running", True)):
        return False
    beat = getattr(worker, "last_heartbeat", None)
    if not isinstance(beat, (int, float)):
        return True  # a worker without a heartbeat: running is all we know
    limit = HEARTBEAT_FACTOR * max(1.0, float(app[SETTINGS].heartbeat_interval))
    return monotonic() - float(beat) < limit


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
    except asyncio.TimeoutError:
        _noisy.warning("metrics: dead_letter_count timed out after %.1f s", DEAD_LETTER_TIMEOUT)
    except Exception as exc:
        _noisy.warning("metrics: dead_letter_count failed: %s", exc)
    return None


_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")

#: Worker counters: WorkerStats attribute -> (metric name without prefix/_total, help)
WORKER_COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("worker_observations_received", "Observation events the worker received."),
    "merged": ("worker_observations_merged", "Observations stored and merged into the engine."),
    "rejected": ("worker_observations_rejected", "Observation events that failed validation."),
    "dead_lettered": (
        "worker_observations_dead_lettered",
        "Rejected events stored as dead letters.",
    ),
    "duplicates": ("worker_observations_duplicate", "Observations dropped as already stored."),
    "redelivered": ("worker_observations_redelivered", "Observation events delivered again."),
    "pending_merged": ("worker_observations_pending_merged", "Stored-but-unmerged rows merged."),
    "batches": ("worker_batches", "Micro-batches committed."),
    "batch_failures": ("worker_batch_failures", "Failed micro-batch commit attempts."),
    "published": ("worker_events_published", "Events the worker published after commits."),
    "state_changes": ("worker_state_changes", "Attribution state changes."),
    "multi_actor_fired": ("worker_multi_actor_suspected", "multi_actor_suspected events fired."),
    "identities_formed": ("worker_identities_formed", "Stub identities created."),
    "identities_merged": (
        "worker_identities_merged",
        "Identity merges (attackers moved into another identity).",
    ),
    "identities_unmerged": (
        "worker_identities_unmerged",
        "Identity un-merges (attackers given back to a revived identity).",
    ),
    "attackers_observed": ("worker_attackers_observed", "attacker.observed events registered."),
}

BUS_GAUGES = frozenset({"subscriptions", "durable_pending", "durable_consumers", "outbox_pending"})
BUS_HELP: dict[str, str] = {
    "published": "Events published on the bus by this process.",
    "delivered": "Events delivered to this process's subscribers.",
    "dropped": "Events dropped because a queue (subscriber, durable group, outbox) was full.",
    "reconnects": "Reconnections of the bus transport.",
    "disconnects": "Losses of the bus connection.",
    "received": "Events received from the broker (unix://).",
    "malformed": "Malformed frames or events from the broker, skipped (unix://).",
    "oversized": "Oversized frames from the broker, skipped (unix://).",
    "outbox_pending": "Events waiting to be sent to the broker (unix://).",
    "outbox_dropped": "Events dropped because the outbox to the broker was full (unix://).",
    "durable_dropped": "Events dropped because a durable queue was full.",
    "subscriptions": "Open bus subscriptions.",
    "durable_pending": "Durable deliveries not acknowledged yet.",
}

SSE_RENAME = {"frames_sent": "events_sent", "frames_dropped": "events_dropped"}
SSE_GAUGES = frozenset({"streams_open", "channels", "identities", "users", "handlers"})
SSE_HELP: dict[str, str] = {
    "streams_open": "Open SSE streams.",
    "events_sent": "SSE frames written to streams.",
    "events_dropped": "SSE frames dropped for slow streams.",
    "gaps": "SSE gap notices sent after drops.",
    "stale": "SSE stale notices (cursor not resumable, or resync).",
}

API_HELP: dict[str, str] = {
    "auth_failures_total": "Requests refused for missing or invalid credentials.",
    "login_failures_total": "Failed logins.",
    "logins_total": "Successful logins.",
    "rate_limited_total": "Requests refused by a rate limit (429).",
    "tickets_minted_total": "SSE tickets issued.",
    "tickets_redeemed_total": "SSE tickets redeemed.",
    "observations_accepted_total": "Observations accepted by POST /api/v1/observations.",
    "observations_rejected_total": "Observations refused by POST /api/v1/observations.",
    "ingest_unavailable_total": "Ingest requests answered 503 (bus unavailable).",
    "ingest_backpressure_total": "Ingest requests answered 503 because the pipeline is behind.",
    "ingest_inflight": "Observations handed to the bus and not yet acknowledged durable.",
    "observations_duplicate_total": "Observations sent again that were already stored (202 duplicates).",
    "http_5xx_total": "Responses with a 5xx status.",
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _base(name: str) -> str:
    name = _NAME_RE.sub("_", name)
    return name[: -len("_total")] if name.endswith("_total") else name


def histogram_family(name: str, doc: str, hist: Any) -> HistogramMetricFamily:
    """A worker ``Histogram`` (bounds in ``buckets``; ``counts`` per bucket,
    the last one above every bound) as cumulative Prometheus buckets."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(hist.buckets, hist.counts):
        running += int(n)
        buckets.append((repr(float(bound)), float(running)))
    buckets.append(("+Inf", float(max(running, int(hist.count)))))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(hist.sum))


class AppCollector(Collector):
    """Reads the application's live objects at scrape time. A section that
    fails is logged and left out; the scrape still answers."""

    def __init__(self, app: web.Application, state: OpsState) -> None:
        self.app = app
        self.state = state

    def collect(self) -> Iterable[Metric]:
        sections: tuple[Callable[[], Iterator[Metric]], ...] = (
            self._info,
            self._api,
            self._duplicates,
            self._http,
            self._bus,
            self._worker,
            self._sse,
            self._store,
            self._connections,
        )
        for section in sections:
            try:
                families = list(section())
            except Exception:
                _noisy.warning("metrics: %s failed", section.__name__, exc_info=True)
                continue
            yield from families

    # -- sections ------------------------------------------------------------------------
    def _info(self) -> Iterator[Metric]:
        from decnet_attr import __version__

        store = self.app[STORE]
        info = GaugeMetricFamily(
            f"{PREFIX}_info",
            "decnet-attr version and backends (value 1).",
            labels=["version", "bus", "store"],
        )
        info.add_metric(
            [str(__version__), str(self.app[BUS].name), str(getattr(store, "dialect", ""))], 1.0
        )
        yield info

    def _api(self) -> Iterator[Metric]:
        counters = self.app[COUNTERS]
        for key, value in sorted(counters.items()):
            v = _number(value)
            if v is None:
                continue
            doc = API_HELP.get(key, f"API counter {key}.")
            if key.endswith("_total"):
                yield CounterMetricFamily(f"{PREFIX}_api_{_base(key)}", doc, value=v)
            else:  # a level, not a count
                yield GaugeMetricFamily(f"{PREFIX}_api_{key}", doc, value=v)

    def _duplicates(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_api_observations_duplicate_by_sensor",
            "Observations a sensor sent again (already stored), by sensor.",
            labels=["sensor"],
        )
        for sensor, n in sorted(self.app[DUPLICATES_BY_SENSOR].items()):
            family.add_metric([sensor], float(n))
        yield family

    def _http(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), n in sorted(self.state.requests.items()):
            family.add_metric([route, method, status], float(n))
        yield family

    def _bus(self) -> Iterator[Metric]:
        bus = self.app[BUS]
        yield GaugeMetricFamily(
            f"{PREFIX}_bus_connected",
            "1 while the bus transport is usable.",
            value=_flag(bus.connected),
        )
        for key, value in sorted(bus.stats().items()):
            v = _number(value)
            if v is None:
                continue
            base = _base(key)
            doc = BUS_HELP.get(key, f"Bus statistic {key}.")
            if key in BUS_GAUGES:
                yield GaugeMetricFamily(f"{PREFIX}_bus_{base}", doc, value=v)
            else:
                yield CounterMetricFamily(f"{PREFIX}_bus_{base}", doc, value=v)

    def _worker(self) -> Iterator[Metric]:
        worker = self.app[WORKER]
        if worker is None:
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_worker_running",
            "1 while the in-process attribution worker runs.",
            value=_flag(getattr(worker, "running", False)),
        )
        beat = getattr(worker, "last_heartbeat", None)
        if isinstance(beat, (int, float)) and beat > 0:
            yield GaugeMetricFamily(
                f"{PREFIX}_worker_heartbeat_age_seconds",
                "Seconds since the worker's consumer loop last turned.",
                value=max(0.0, monotonic() - float(beat)),
            )
        engine = getattr(worker, "engine", None)
        if engine is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_engine_keys",
                "(identity, primitive) keys held by the engine.",
                value=float(len(engine)),
            )
        stats = getattr(worker, "stats", None)
        if stats is None:
            return
        for attr, (name, doc) in WORKER_COUNTERS.items():
            v = _number(getattr(stats, attr, None))
            if v is not None:
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=v)
        lag = _number(getattr(stats, "lag_seconds", None))
        if lag is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_worker_lag_seconds",
                "Commit time minus the newest observation ts of the last batch.",
                value=lag,
            )
        last = _number(getattr(stats, "last_batch_at", None))
        if last:
            yield GaugeMetricFamily(
                f"{PREFIX}_worker_last_batch_timestamp_seconds",
                "Unix time of the last committed batch.",
                value=last,
            )
        for attr, name, doc in (
            ("batch_size", "worker_batch_size", "Events per micro-batch."),
            ("merge_seconds", "worker_merge_seconds", "Seconds to store and merge one batch."),
        ):
            hist = getattr(stats, attr, None)
            if hist is not None:
                yield histogram_family(f"{PREFIX}_{name}", doc, hist)

    def _sse(self) -> Iterator[Metric]:
        hub: Any = self.app.get(SSE_HUB)
        if hub is None:
            return
        closed = CounterMetricFamily(
            f"{PREFIX}_sse_streams_closed",
            "SSE streams closed by the server, by reason.",
            labels=["reason"],
        )
        for key, value in sorted(hub.stats().items()):
            v = _number(value)
            if v is None:
                continue
            if key.startswith("closed_"):
                closed.add_metric([key[len("closed_") :]], v)
                continue
            name = SSE_RENAME.get(key, key)
            doc = SSE_HELP.get(name, f"SSE relay statistic {key}.")
            if key in SSE_GAUGES or isinstance(value, bool):
                yield GaugeMetricFamily(f"{PREFIX}_sse_{_base(name)}", doc, value=v)
            else:
                yield CounterMetricFamily(f"{PREFIX}_sse_{_base(name)}", doc, value=v)
        yield closed

    def _connections(self) -> Iterator[Metric]:
        from decnet_attr.server.keys import CONNECTIONS

        guard = self.app.get(CONNECTIONS)
        if guard is None:  # not served by make_runner (tests, embedding)
            return
        stats = guard.stats()
        yield GaugeMetricFamily(
            f"{PREFIX}_http_connections_open",
            "Open HTTP connections.",
            value=float(stats["connections_open"]),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_http_connections_max",
            "The cap on open HTTP connections.",
            value=float(stats["connections_max"]),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_http_connections_refused",
            "Connections refused over the total or per-address cap.",
            value=float(stats["connections_refused"]),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_http_connections_header_timeouts",
            "Connections closed for not sending a request head in time.",
            value=float(stats["connections_header_timeouts"]),
        )

    def _store(self) -> Iterator[Metric]:
        count = self.state.dead_letters
        if count is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_store_dead_letters",
                "Dead letters (rejected events) held by the store.",
                value=float(count),
            )


def _flag(value: Any) -> float:
    return 1.0 if value else 0.0
