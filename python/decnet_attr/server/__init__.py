"""The aiohttp API: auth (JWT, roles, SSE tickets), attackers and attribution,
sensor ingest, the SSE relay, and the ``serve`` / ``users`` commands.

>>> from decnet_attr.server.app import create_app
>>> app = create_app(settings)            # aiohttp web.Application

Where things are: :mod:`~decnet_attr.server.app` builds the application,
:mod:`~decnet_attr.server.keys` declares what it holds, the API's handlers
are in :mod:`~decnet_attr.server.routes` (one module per resource) and the
event streams in :mod:`~decnet_attr.server.sse`.
"""
