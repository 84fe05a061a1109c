"""``/api/v1/auth/*``: login, logout, change-password, me, sse-ticket."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from decnet_attr.audit import audit
from decnet_attr.server.auth import (
    PASSWORD_MAX_LENGTH,
    READ_ROLES,
    USERNAME_MAX_LENGTH,
    Principal,
    password_problem,
    require,
)
from decnet_attr.server.errors import (
    json_response,
    read_json_object,
    unauthorized,
    unprocessable,
)
from decnet_attr.server.keys import AUTH, SETTINGS
from decnet_attr.server.ratelimit import client_ip

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


def _str_field(body: dict[str, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    if value is None:
        raise unprocessable(f"{name}: field required")
    if not isinstance(value, str):
        raise unprocessable(f"{name}: must be a string")
    if not value:
        raise unprocessable(f"{name}: must not be empty")
    if len(value) > max_length:
        raise unprocessable(f"{name}: must be at most {max_length} characters")
    return value


def _address(request: web.Request) -> str:
    return client_ip(request, trust_forwarded_for=request.app[SETTINGS].trust_forwarded_for)


def _token_body(token: str, must_change: bool) -> dict[str, Any]:
    return {"access_token": token, "token_type": "bearer", "must_change_password": must_change}


@routes.post("/api/v1/auth/login", name="auth_login")
async def login(request: web.Request) -> web.StreamResponse:
    """``{username, password}`` → ``{access_token, token_type, must_change_password}``."""
    auth = request.app[AUTH]
    body = await read_json_object(request)
    username = _str_field(body, "username", USERNAME_MAX_LENGTH * 2)
    password = _str_field(body, "password", PASSWORD_MAX_LENGTH)
    token, user = await auth.login(username, password, address=_address(request))
    return json_response(_token_body(token, user.must_change_password))


@routes.post("/api/v1/auth/logout", name="auth_logout")
@require(allow_must_change=True)
async def logout(request: web.Request, principal: Principal) -> web.StreamResponse:
    """Denylist this token until it expires; open streams using it close."""
    await request.app[AUTH].revoke(principal)
    audit("logout", "ok", user=principal.username, address=_address(request))
    return json_response({"message": "Logged out"})


@routes.post("/api/v1/auth/change-password", name="auth_change_password")
@require(allow_must_change=True)
async def change_password(request: web.Request, principal: Principal) -> web.StreamResponse:
    """``{old_password, new_password}`` → a fresh token; every older token of
    the user stops working."""
    auth = request.app[AUTH]
    address = _address(request)
    wait = auth.password_limiter.retry_after(principal.user_uuid)
    if wait > 0:
        audit("password_change", "throttled", user=principal.username, address=address)
        raise auth.rate_limited("Too many password change attempts; try again later", wait)
    auth.password_limiter.record(principal.user_uuid)
    body = await read_json_object(request)
    old = _str_field(body, "old_password", PASSWORD_MAX_LENGTH)
    new = body.get("new_password")
    if new == old:
        raise unprocessable("new_password: must differ from the old password")
    problem = password_problem(new, username=principal.username)
    if problem is not None:
        raise unprocessable(f"new_password: {problem}")
    assert isinstance(new, str)
    try:
        token, user = await auth.change_password(principal, old, new)
    except web.HTTPBadRequest:
        audit("password_change", "failed", user=principal.username, address=address)
        raise
    audit("password_change", "ok", user=user.username, address=address)
    return json_response(_token_body(token, user.must_change_password))


@routes.get("/api/v1/auth/me", name="auth_me")
@require(allow_must_change=True)
async def me(request: web.Request, principal: Principal) -> web.StreamResponse:
    user = await request.app[AUTH].get_user(principal.user_uuid)
    if user is None:  # pragma: no cover - deleted between the two reads
        raise unauthorized()
    return json_response(
        {
            "uuid": user.uuid,
            "username": user.username,
            "role": user.role,
            "must_change_password": user.must_change_password,
            "created_at": user.created_at,
            "token_expires_at": principal.exp,
        }
    )


@routes.post("/api/v1/auth/sse-ticket", name="auth_sse_ticket")
@require(*READ_ROLES)
async def sse_ticket(request: web.Request, principal: Principal) -> web.StreamResponse:
    """A single-use ticket for ``GET …/events?ticket=`` (EventSource cannot
    send headers). The request body is ignored."""
    ticket, expires_in = await request.app[AUTH].mint_ticket(principal)
    return json_response({"ticket": ticket, "expires_in": expires_in})
