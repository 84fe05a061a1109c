"""The aiohttp API: auth (JWT, roles, SSE tickets), attackers and attribution,
sensor ingest, the SSE relay, and the ``serve`` / ``users`` commands.

>>> from decnet_attr.server.app import create_app
>>> app = create_app(settings)            # aiohttp web.Application
"""
