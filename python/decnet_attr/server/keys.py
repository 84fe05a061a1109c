"""The application's typed keys: what ``app[...]`` holds, declared once.

Every server module reads the application's resources through these keys;
:func:`decnet_attr.server.app.create_app` sets them. This module imports no
other server module at run time (the server-side types are for the type
checker only), so any module may import it without forming a cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from decnet_attr._core import Dedupe
from decnet_attr.bus import Bus
from decnet_attr.config import Settings
from decnet_attr.store import Store

if TYPE_CHECKING:
    from decnet_attr.server.auth import Authenticator
    from decnet_attr.server.connections import ConnectionGuard
    from decnet_attr.server.ops import OpsState
    from decnet_attr.server.routes.ingest import IngestFirst
    from decnet_attr.server.sse import SseHub
    from decnet_attr.worker import AttributionWorker

__all__ = [
    "AUTH",
    "BUS",
    "CONNECTIONS",
    "COUNTERS",
    "COUNTER_NAMES",
    "DUPLICATES_BY_SENSOR",
    "HANDED_OVER",
    "INGEST_FIRST",
    "OPS",
    "SETTINGS",
    "SSE_HUB",
    "STORE",
    "WORKER",
]

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BUS = web.AppKey("bus", Bus)
#: Authentication, tokens, tickets and the revocation listener.
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
#: Plain API counters (name -> int; the names are :data:`COUNTER_NAMES`).
COUNTERS: web.AppKey[dict[str, int]] = web.AppKey("counters")
#: Observations a sensor sent again (already stored), by sensor user name.
DUPLICATES_BY_SENSOR: web.AppKey[dict[str, int]] = web.AppKey("duplicates_by_sensor")
#: What ingest handed over lately (ids and ``(evidence_ref, primitive)``
#: pairs), so that a retry of an observation accepted but not merged yet
#: is answered as a duplicate too (``routes/ingest.py``).
HANDED_OVER: web.AppKey[Dedupe] = web.AppKey("handed_over")
#: Sensors' bodies go first while the journal has room (routes/ingest.py).
INGEST_FIRST: web.AppKey[IngestFirst] = web.AppKey("ingest_first")
#: The in-process attribution worker, or None when it runs elsewhere.
WORKER: web.AppKey[AttributionWorker | None] = web.AppKey("worker")
#: The SSE relay.
SSE_HUB: web.AppKey[SseHub] = web.AppKey("sse_hub")
#: The serving guard (connection caps), set by ``connections.make_runner``;
#: absent when the app is served some other way (tests, embedding).
CONNECTIONS: web.AppKey[ConnectionGuard] = web.AppKey("connections")
#: Probes, request counts and the metrics registry (``server/ops.py``).
OPS: web.AppKey[OpsState] = web.AppKey("ops")

#: The keys of ``app[COUNTERS]``, all counts (``_total``).
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
