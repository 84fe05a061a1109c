"""Cross-origin access for browser front-ends served from another origin
(DECNET's own UI runs on its own port). Off unless ``cors_origins`` lists
origins; then every route answers preflights and carries the CORS headers for
those origins only (aiohttp-cors does the protocol)."""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp_cors
from aiohttp import web

__all__ = ["ALLOW_HEADERS", "EXPOSE_HEADERS", "setup_cors"]

#: Request headers a cross-origin page may send.
ALLOW_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
#: Response headers a cross-origin page may read.
EXPOSE_HEADERS = ("Retry-After", "Content-Disposition")
#: Seconds a browser may cache a preflight answer.
PREFLIGHT_MAX_AGE = 600


def setup_cors(app: web.Application, origins: Iterable[str]) -> None:
    """Allow ``origins`` on every route registered so far (call it last).
    Bearer tokens travel in a header, so credentials (cookies) stay off."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        allow_methods="*",
        max_age=PREFLIGHT_MAX_AGE,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in list(app.router.routes()):
        cors.add(route)
