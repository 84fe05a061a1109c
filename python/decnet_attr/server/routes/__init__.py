"""The API's routes, one module per resource; each module declares its
handlers in a ``routes`` table (:class:`aiohttp.web.RouteTableDef`) and reads
the application's resources through :mod:`decnet_attr.server.keys`.

To add a route: write the handler in its resource's module (or a new module
listed in :data:`TABLES`). A route that accepts a body other than JSON
checks its content type itself and is named in :data:`OWN_CONTENT_TYPE`.
"""

from __future__ import annotations

from aiohttp import web

from decnet_attr.server.routes import attackers, auth, events, explain, identities, ingest

__all__ = ["OWN_CONTENT_TYPE", "TABLES"]

#: Every API route table, in registration order. The event streams come
#: first: ``/api/v1/identities/events`` would otherwise match
#: ``/api/v1/identities/{uuid}``.
TABLES: tuple[web.RouteTableDef, ...] = (
    events.routes,
    auth.routes,
    attackers.routes,
    identities.routes,
    ingest.routes,
    explain.routes,
)

#: The routes that check their request's content type themselves (after
#: authentication); every other POST/PUT/PATCH body must be JSON.
OWN_CONTENT_TYPE = frozenset({ingest.ROUTE_NAME})
