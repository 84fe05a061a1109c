"""The aiohttp application: :func:`create_app` builds it from the settings,
one ``cleanup_ctx`` per resource.

Start-up order: store → bus → auth (revocation listener) → SSE hub → worker.
Shutdown (aiohttp's runner): the sites stop accepting connections, then
``on_shutdown`` closes the SSE streams so their handlers return, then the
contexts unwind in reverse: the worker stops (drains the batch in hand, so
every 202 already given stays true), the bus closes, the store closes.

What the application holds is in :mod:`decnet_attr.server.keys`; its routes
are in :mod:`decnet_attr.server.routes` (the dashboard's in
:mod:`decnet_attr.server.dashboard`, the probes' and ``/metrics`` in
:mod:`decnet_attr.server.ops`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from decnet_attr._core import Dedupe
from decnet_attr.bus import Bus, get_bus
from decnet_attr.config import Settings
from decnet_attr.server import routes
from decnet_attr.server.auth import (
    Authenticator,
    Passwords,
    authenticate_stream,
    load_jwt_secret,
    principal_still_valid,
)
from decnet_attr.server.cors import setup_cors
from decnet_attr.server.dashboard import setup_dashboard
from decnet_attr.server.errors import (
    make_content_type_middleware,
    make_error_middleware,
    security_headers,
)
from decnet_attr.server.keys import (
    AUTH,
    BUS,
    COUNTER_NAMES,
    COUNTERS,
    DUPLICATES_BY_SENSOR,
    HANDED_OVER,
    INGEST_FIRST,
    SETTINGS,
    SSE_HUB,
    STORE,
    WORKER,
)
from decnet_attr.server.ops import setup_ops
from decnet_attr.server.routes.ingest import INFLIGHT, IngestFirst
from decnet_attr.server.sse import SseHub
from decnet_attr.store import Store, store_for
from decnet_attr.worker import AttributionWorker

__all__ = ["JSON_BODY_LIMIT", "create_app"]

#: Largest body of the ordinary JSON routes (login, attackers, …); the ingest
#: route reads its body itself, bounded by ``settings.max_body_bytes``.
JSON_BODY_LIMIT = 1024 * 1024

Context = Callable[[web.Application], AsyncIterator[None]]


def _want_worker(settings: Settings, worker: bool | str | None) -> bool:
    if worker is None or worker == "auto":
        return bool(settings.worker)
    if isinstance(worker, bool):
        return worker
    raise ValueError(f"worker must be True, False or 'auto', not {worker!r}")


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    bus: Bus | None = None,
    worker: bool | str | None = "auto",
    passwords: Passwords | None = None,
    auth_cache_ttl: float = 1.0,
) -> web.Application:
    """Build the API application.

    ``store``/``bus`` given: used as they are (already opened/connected; the
    caller closes them). Not given: built from ``settings`` and opened and
    closed with the application. ``worker``: ``"auto"`` (``settings.worker``),
    True or False: run the attribution worker in this process.
    ``passwords`` (argon2 parameters) and ``auth_cache_ttl`` are for tests and
    tuning. Raises :class:`~decnet_attr.config.ConfigError` for a weak JWT
    secret.
    """
    secret = load_jwt_secret(settings)  # ConfigError before anything is opened
    own_store = store is None
    own_bus = bus is None
    if own_store and not settings.db_url:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    the_store = store if store is not None else store_for(settings)
    the_bus = bus if bus is not None else get_bus(settings.bus_url, **settings.bus_options())

    counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
    app = web.Application(
        middlewares=[
            make_error_middleware(counters),
            make_content_type_middleware(routes.OWN_CONTENT_TYPE),
        ],
        client_max_size=JSON_BODY_LIMIT,
    )
    app.on_response_prepare.append(security_headers)
    auth = Authenticator(
        settings,
        the_store,
        secret,
        bus=the_bus,
        passwords=passwords,
        counters=counters,
        cache_ttl=auth_cache_ttl,
    )
    hub = SseHub(
        settings=settings,
        bus=the_bus,
        store=the_store,
        authenticate=authenticate_stream,
        still_valid=principal_still_valid,
    )
    the_worker = (
        AttributionWorker(settings, the_bus, the_store) if _want_worker(settings, worker) else None
    )
    app[SETTINGS] = settings
    app[STORE] = the_store
    app[BUS] = the_bus
    app[AUTH] = auth
    app[COUNTERS] = counters
    app[DUPLICATES_BY_SENSOR] = {}
    # what waits to be merged is bounded by ingest_queue_max (back-pressure),
    # so twice that covers every observation accepted and not merged yet
    app[HANDED_OVER] = Dedupe(2 * settings.ingest_queue_max)
    app[WORKER] = the_worker
    # sensors first while what waits to be merged has room under the bound
    app[INGEST_FIRST] = IngestFirst(
        lambda: the_bus.backlog() + counters.get(INFLIGHT, 0) < settings.ingest_queue_max
    )
    if the_worker is not None and not settings.ingest_waits_for_merge:
        # (a 202 that waits for the merge would only wait longer)
        the_worker.before_batch = app[INGEST_FIRST].wait
    app[SSE_HUB] = hub

    for table in routes.TABLES:
        app.add_routes(table)
    setup_dashboard(app)  # "/" and "/static/…"
    setup_ops(app)  # /healthz (liveness), /readyz, /metrics, request counting
    if settings.cors_origins:  # last: it covers every route registered above
        setup_cors(app, settings.cors_origins)

    # ---- lifecycle: one context per resource, in start-up order ----------------------------
    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        if own_store:
            await the_store.open()
        try:
            yield
        finally:
            if own_store:
                await the_store.close()

    async def bus_ctx(app: web.Application) -> AsyncIterator[None]:
        if own_bus:
            await the_bus.connect()
        try:
            yield
        finally:
            if own_bus:
                await the_bus.close()

    async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
        await auth.start()
        try:
            yield
        finally:
            await auth.stop()

    hub_started = False

    async def stop_hub() -> None:
        nonlocal hub_started
        if hub_started:
            hub_started = False
            await hub.stop()

    async def sse_ctx(app: web.Application) -> AsyncIterator[None]:
        nonlocal hub_started
        await hub.start(app)
        hub_started = True
        try:
            yield
        finally:
            await stop_hub()

    async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
        if the_worker is not None:
            await the_worker.start()
        try:
            yield
        finally:
            if the_worker is not None:
                await the_worker.stop()

    async def on_shutdown(app: web.Application) -> None:
        # Streams never end on their own: close them first so that the runner
        # does not wait for them (aiohttp waits for handlers before cleanup).
        await stop_hub()

    contexts: list[Context] = [store_ctx, bus_ctx, auth_ctx, sse_ctx, worker_ctx]
    app.cleanup_ctx.extend(contexts)
    app.on_shutdown.append(on_shutdown)
    return app
