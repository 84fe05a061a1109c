"""The Server-Sent-Events relay, in two halves:

- :mod:`~decnet_attr.server.sse.wire`: the bytes on the connection (frames,
  keepalives, ``retry:``, ``stale`` / ``gap`` / ``error``, the
  ``Last-Event-ID`` cursor and the resume buffer that answers it);
- :mod:`~decnet_attr.server.sse.hub`: the fan-out (one set of bus
  subscriptions per process, the attacker / identity / overview channels,
  the router, each stream's queue, and the request handlers the routes in
  :mod:`decnet_attr.server.routes.events` call).
"""

from __future__ import annotations

from decnet_attr.server.sse.hub import PATTERNS, SYSTEM_AUTH_REVOKED, PrincipalLike, SseHub
from decnet_attr.server.sse.wire import SSE_HEADERS

__all__ = ["PATTERNS", "SSE_HEADERS", "SYSTEM_AUTH_REVOKED", "PrincipalLike", "SseHub"]
