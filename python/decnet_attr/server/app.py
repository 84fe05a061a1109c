"""The aiohttp application: one factory, one route table, typed app keys and
``cleanup_ctx`` for every resource.

Start-up order: store → bus → auth (revocation listener) → SSE hub → worker.
Shutdown (aiohttp's runner): the sites stop accepting connections, then
``on_shutdown`` closes the SSE streams so their handlers return, then the
contexts unwind in reverse: the worker stops (drains the batch in hand, so
every 202 already given stays true), the bus closes, the store closes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from decnet_attr.bus import Bus, get_bus
from decnet_attr.config import Settings
from decnet_attr.store import Store, store_for

if TYPE_CHECKING:
    from decnet_attr.server.auth import Authenticator, Passwords

log = logging.getLogger(__name__)

__all__ = [
    "AUTH",
    "BUS",
    "COUNTERS",
    "DUPLICATES_BY_SENSOR",
    "SETTINGS",
    "SSE_HUB",
    "STORE",
    "WORKER",
    "create_app",
]

# ---- application keys ----------------------------------------------------------------------
SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BUS = web.AppKey("bus", Bus)
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
#: Plain counters (name -> int) the metrics endpoint exports: auth_failures_total,
#: login_failures_total, logins_total, rate_limited_total, tickets_minted_total,
#: tickets_redeemed_total, observations_accepted_total, observations_rejected_total,
#: ingest_unavailable_total, http_5xx_total.
COUNTERS: web.AppKey[dict[str, int]] = web.AppKey("counters")
#: Observations a sensor sent again (already stored), by sensor user name.
DUPLICATES_BY_SENSOR: web.AppKey[dict[str, int]] = web.AppKey("duplicates_by_sensor")
#: The in-process AttributionWorker, or None.
WORKER: web.AppKey[Any] = web.AppKey("worker")
#: The SSE relay (decnet_attr.server.sse.SseHub), or None while it does not exist.
SSE_HUB = web.AppKey("sse_hub", object)

COUNTER_NAMES = (
    "auth_failures_total",
    "login_failures_total",
    "logins_total",
    "rate_limited_total",
    "tickets_minted_total",
    "tickets_redeemed_total",
    "observations_accepted_total",
    "observations_rejected_total",
    "ingest_unavailable_total",
    "http_5xx_total",
)

#: Largest body of the ordinary JSON routes (login, attackers, …); the ingest
#: route reads its body itself, bounded by ``settings.max_body_bytes``.
JSON_BODY_LIMIT = 1024 * 1024


def _sse_module() -> Any:
    try:
        from decnet_attr.server import sse
    except ModuleNotFoundError as exc:  # pragma: no cover - being written
        if exc.name != "decnet_attr.server.sse":
            raise
        return None
    return sse


def _worker_class() -> Any:
    try:
        from decnet_attr.worker import AttributionWorker
    except ModuleNotFoundError as exc:  # pragma: no cover - being written
        if not (exc.name or "").startswith("decnet_attr.worker"):
            raise
        return None
    return AttributionWorker


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
    from decnet_attr.server import routes_attackers, routes_auth, routes_identities, routes_ingest
    from decnet_attr.server.auth import (
        Authenticator,
        authenticate_stream,
        load_jwt_secret,
        principal_still_valid,
    )
    from decnet_attr.server.errors import (
        content_type_middleware,
        make_error_middleware,
        security_headers,
    )

    secret = load_jwt_secret(settings)  # ConfigError before anything is opened
    own_store = store is None
    own_bus = bus is None
    if own_store and not settings.db_url:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    the_store = store if store is not None else store_for(settings)
    the_bus = bus if bus is not None else get_bus(settings.bus_url, **settings.bus_options())

    counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
    app = web.Application(
        middlewares=[make_error_middleware(counters), content_type_middleware],
        client_max_size=JSON_BODY_LIMIT,
    )
    auth = Authenticator(
        settings,
        the_store,
        secret,
        bus=the_bus,
        passwords=passwords,
        counters=counters,
        cache_ttl=auth_cache_ttl,
    )
    app.on_response_prepare.append(security_headers)
    app[SETTINGS] = settings
    app[STORE] = the_store
    app[BUS] = the_bus
    app[AUTH] = auth
    app[COUNTERS] = counters
    app[DUPLICATES_BY_SENSOR] = {}

    run_worker = _want_worker(settings, worker)
    the_worker: Any = None
    if run_worker:
        worker_cls = _worker_class()
        if worker_cls is None:
            if worker is True:
                raise RuntimeError("decnet_attr.worker is not available")
            log.warning("decnet_attr.worker is not available: running without the worker")
        else:
            the_worker = worker_cls(settings, the_bus, the_store)
    app[WORKER] = the_worker

    sse = _sse_module()
    hub: Any = None
    if sse is not None:
        hub = sse.SseHub(
            settings=settings,
            bus=the_bus,
            store=the_store,
            authenticate=authenticate_stream,
            still_valid=principal_still_valid,
        )
        app.router.add_get("/api/v1/attackers/{uuid}/events", hub.handle, name="attacker_events")
        app.router.add_get(
            "/api/v1/identities/events", hub.handle_identities, name="identity_events"
        )
        app.router.add_get("/api/v1/overview/events", hub.handle_overview, name="overview_events")
        sse_key = getattr(sse, "SSE_HUB", None)
        if isinstance(sse_key, web.AppKey):  # the relay's own typed key, same object
            app[sse_key] = hub
    app[SSE_HUB] = hub

    app.add_routes(routes_auth.routes)
    app.add_routes(routes_attackers.routes)
    app.add_routes(routes_identities.routes)
    app.add_routes(routes_ingest.routes)
    # ---- dashboard (dashboard.py: "/" and "/static/…") and the explain route ----------------
    from decnet_attr.server import routes_explain
    from decnet_attr.server.dashboard import setup_dashboard

    app.add_routes(routes_explain.routes)
    setup_dashboard(app)
    # ---- end dashboard ----------------------------------------------------------------------
    # ---- ops (ops.py): /healthz (liveness), /readyz, /metrics, request counting -------------
    from decnet_attr.server.ops import setup_ops

    setup_ops(app)
    # ---- end ops ----------------------------------------------------------------------------
    if settings.cors_origins:  # last: it covers every route registered above
        from decnet_attr.server.cors import setup_cors

        setup_cors(app, settings.cors_origins)

    # ---- lifecycle -------------------------------------------------------------------------
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

    hub_state = {"stopped": True}

    async def stop_hub() -> None:
        if hub is not None and not hub_state["stopped"]:
            hub_state["stopped"] = True
            await hub.stop()

    async def sse_ctx(app: web.Application) -> AsyncIterator[None]:
        if hub is not None:
            await hub.start(app)
            hub_state["stopped"] = False
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

    app.cleanup_ctx.extend([store_ctx, bus_ctx, auth_ctx, sse_ctx, worker_ctx])
    app.on_shutdown.append(on_shutdown)
    return app
