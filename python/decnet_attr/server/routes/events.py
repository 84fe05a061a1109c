"""The event streams (Server-Sent Events): an attacker's, the identities' and
the overview's. Each route hands the request to the application's SSE relay
(:class:`decnet_attr.server.sse.SseHub`), which authenticates it and serves
the stream."""

from __future__ import annotations

from aiohttp import web

from decnet_attr.server.keys import SSE_HUB

routes = web.RouteTableDef()


@routes.get("/api/v1/attackers/{uuid}/events", name="attacker_events")
async def attacker_events(request: web.Request) -> web.StreamResponse:
    return await request.app[SSE_HUB].handle(request)


@routes.get("/api/v1/identities/events", name="identity_events")
async def identity_events(request: web.Request) -> web.StreamResponse:
    return await request.app[SSE_HUB].handle_identities(request)


@routes.get("/api/v1/overview/events", name="overview_events")
async def overview_events(request: web.Request) -> web.StreamResponse:
    return await request.app[SSE_HUB].handle_overview(request)
