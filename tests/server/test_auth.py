"""Authentication, roles, rate limits and SSE tickets (docs/decnet.md#auth-tokens
to #sse-connection-cap, with the gaps of #sse-ticket-hardening closed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from decnet_attr.bus import InProcessBus
from decnet_attr.config import ConfigError
from decnet_attr.server.app import create_app
from decnet_attr.server.auth import (
    Principal,
    authenticate_stream,
    load_jwt_secret,
    principal_still_valid,
)
from decnet_attr.store import StoreUnavailable
from tests.server.conftest import PASSWORD, Harness, HarnessFactory, bearer, make_settings

CREDENTIALS = {"detail": "Could not validate credentials"}
BAD_LOGIN = {"detail": "Invalid username or password"}
MUST_CHANGE = {"detail": "Password change required before accessing this resource"}
FORBIDDEN = {"detail": "Insufficient permissions"}
NOT_FOUND = {"detail": "Attacker not found"}

ATTRIBUTION = "/api/v1/attackers/nobody/attribution"
STREAM = "/_test/stream-auth"


async def _expect_401(resp: Any) -> None:
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.content_type == "application/json"
    assert await resp.json() == CREDENTIALS


def principal_json(p: Principal) -> dict[str, Any]:
    return {
        "user_uuid": p.user_uuid,
        "username": p.username,
        "role": p.role,
        "jti": p.jti,
        "exp": p.exp,
        "via_ticket": p.via_ticket,
        "iat": p.iat,
    }


def add_stream_route(app: web.Application) -> None:
    """A tiny route exercising the SSE relay's authentication callable."""

    async def handler(request: web.Request) -> web.Response:
        principal = await authenticate_stream(request)
        return web.json_response(principal_json(principal))

    app.router.add_get(STREAM, handler)


@pytest.fixture
async def sh(make_harness: HarnessFactory) -> Harness:
    """A harness with the stream-auth test route."""
    return await make_harness(setup=add_stream_route)


async def mint(h: Harness, token: str) -> str:
    resp = await h.client.post("/api/v1/auth/sse-ticket", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"ticket", "expires_in"}
    return str(body["ticket"])


# ---- login ----------------------------------------------------------------------------------
async def test_login_returns_a_token_with_the_pinned_claims(harness: Harness) -> None:
    user = await harness.add_user("alice", "viewer")
    resp = await harness.client.post(
        "/api/v1/auth/login", json={"username": "alice", "password": PASSWORD}
    )
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "must_change_password"}
    assert body["token_type"] == "bearer"
    assert body["must_change_password"] is False
    claims = jwt.decode(
        body["access_token"],
        harness.secret,
        algorithms=["HS256"],
        audience="decnet-dashboard",
        issuer="decnet",
    )
    assert set(claims) == {"uuid", "jti", "iat", "exp", "iss", "aud", "typ"}
    assert claims["uuid"] == user.uuid
    assert claims["typ"] == "access"
    assert claims["iss"] == "decnet"
    assert claims["aud"] == "decnet-dashboard"
    assert claims["exp"] - claims["iat"] == 240 * 60
    assert len(claims["jti"]) == 32 and int(claims["jti"], 16) >= 0
    assert abs(claims["iat"] - time.time()) < 5
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    assert harness.counters["logins_total"] == 1


async def test_two_logins_get_distinct_jtis(harness: Harness) -> None:
    await harness.add_user("alice")
    a = jwt.decode(await harness.login("alice"), options={"verify_signature": False})
    b = jwt.decode(await harness.login("alice"), options={"verify_signature": False})
    assert a["jti"] != b["jti"]


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong password!"), ("nobody", PASSWORD), ("ALICE", PASSWORD)],
)
async def test_bad_credentials_do_not_reveal_whether_the_user_exists(
    harness: Harness, username: str, password: str
) -> None:
    await harness.add_user("alice")
    resp = await harness.client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert resp.status == 401
    assert await resp.json() == BAD_LOGIN
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert harness.counters["login_failures_total"] == 1
    assert harness.counters["auth_failures_total"] == 1


async def test_disabled_user_cannot_log_in(harness: Harness) -> None:
    await harness.add_user("alice", disabled=True)
    resp = await harness.client.post(
        "/api/v1/auth/login", json={"username": "alice", "password": PASSWORD}
    )
    assert resp.status == 401
    assert await resp.json() == BAD_LOGIN


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"username": "alice"}, 422, "password: field required"),
        ({"password": PASSWORD}, 422, "username: field required"),
        (
            {"username": "alice", "password": "x" * 73},
            422,
            "password: must be at most 72 characters",
        ),
        ({"username": "alice", "password": 12345678901234}, 422, "password: must be a string"),
        ({"username": "", "password": PASSWORD}, 422, "username: must not be empty"),
        ([1, 2], 422, "the request body must be a JSON object, not an array"),
    ],
)
async def test_login_validation(harness: Harness, body: Any, status: int, detail: str) -> None:
    resp = await harness.client.post("/api/v1/auth/login", json=body)
    assert resp.status == status
    assert await resp.json() == {"detail": detail}


async def test_login_password_of_exactly_72_characters_is_accepted(harness: Harness) -> None:
    await harness.add_user("alice", password="p" * 72)
    assert await harness.login("alice", "p" * 72)


async def test_login_rejects_non_json_and_bad_json(harness: Harness) -> None:
    resp = await harness.client.post(
        "/api/v1/auth/login", data="username=alice", headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 415
    assert (await resp.json())["detail"].startswith("Unsupported Media Type")
    resp = await harness.client.post(
        "/api/v1/auth/login", data="{nope", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["detail"].startswith("invalid JSON: ")
    resp = await harness.client.post("/api/v1/auth/login")
    assert resp.status == 422
    assert await resp.json() == {"detail": "a JSON request body is required"}


async def test_login_rehashes_outdated_password_hashes(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    user = await h.add_user("alice")
    # The app's hasher has other parameters than the stored hash: upgraded at login.
    from argon2 import PasswordHasher

    from decnet_attr.server.auth import Passwords

    h.auth.passwords = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    await h.login("alice")
    stored = await h.store.get_user(user.uuid)
    assert stored is not None
    assert stored.password_hash != user.password_hash
    assert "m=16,t=2,p=1" in stored.password_hash
    await h.login("alice")


# ---- token resolution matrix ------------------------------------------------------------------
async def test_no_token(harness: Harness) -> None:
    await _expect_401(await harness.client.get(ATTRIBUTION))
    assert harness.counters["auth_failures_total"] == 1


@pytest.mark.parametrize(
    "header",
    ["Basic YWxpY2U6cGFzcw==", "Bearer", "Bearer ", "Bearer not.a.jwt", "Bearer " + "a" * 5000],
)
async def test_malformed_authorization(harness: Harness, header: str) -> None:
    await _expect_401(await harness.client.get(ATTRIBUTION, headers={"Authorization": header}))


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"iss": "someone-else"}, id="wrong-iss"),
        pytest.param({"aud": "another-app"}, id="wrong-aud"),
        pytest.param({"typ": "refresh"}, id="wrong-typ"),
        pytest.param({"exp": int(time.time()) - 10}, id="expired"),
        pytest.param({"jti": None}, id="missing-jti"),
        pytest.param({"uuid": None}, id="missing-uuid"),
        pytest.param({"iat": None}, id="missing-iat"),
        pytest.param({"exp": None}, id="missing-exp"),
        pytest.param({"iss": None}, id="missing-iss"),
        pytest.param({"aud": None}, id="missing-aud"),
        pytest.param({"typ": None}, id="missing-typ"),
        pytest.param({"uuid": "no-such-user"}, id="unknown-user"),
        pytest.param({"iat": int(time.time()) + 3600}, id="issued-in-the-future"),
    ],
)
async def test_invalid_tokens(harness: Harness, claims: dict[str, Any]) -> None:
    user = await harness.add_user("alice", "admin")
    good = harness.forge(user)
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(good))).status == 404
    await _expect_401(
        await harness.client.get(ATTRIBUTION, headers=bearer(harness.forge(user, **claims)))
    )


async def test_bad_signature(harness: Harness) -> None:
    user = await harness.add_user("alice", "admin")
    token = harness.forge(user, secret="another-secret-that-is-long-enough-0123456789")
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(token)))


async def test_alg_none_is_refused(harness: Harness) -> None:
    user = await harness.add_user("alice", "admin")
    claims = jwt.decode(harness.forge(user), options={"verify_signature": False})
    token = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(token)))


async def test_logout_revokes_the_token_and_broadcasts(harness: Harness) -> None:
    await harness.add_user("alice", "viewer")
    token = await harness.login("alice")
    other = await harness.login("alice")
    sub = harness.bus.subscribe("system.auth.revoked")
    resp = await harness.client.post("/api/v1/auth/logout", headers=bearer(token))
    assert resp.status == 200
    assert await resp.json() == {"message": "Logged out"}
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(token)))
    await _expect_401(await harness.client.post("/api/v1/auth/logout", headers=bearer(token)))
    # another session of the same user is unaffected
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(other))).status == 404
    event = await asyncio.wait_for(sub.__anext__(), 2)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert event.topic == "system.auth.revoked"
    assert event.payload == {"user_uuid": harness.users["alice"].uuid, "jti": claims["jti"]}
    assert await harness.store.is_token_revoked(claims["jti"])
    await sub.aclose()


async def test_token_older_than_tokens_valid_from(harness: Harness) -> None:
    user = await harness.add_user("alice", "viewer")
    old = harness.forge(user, iat=int(time.time()) - 100)
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(old))).status == 404
    current = await harness.login("alice")
    resp = await harness.client.post(
        "/api/v1/auth/change-password",
        json={"old_password": PASSWORD, "new_password": "A brand-new passw0rd"},
        headers=bearer(current),
    )
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "must_change_password"}
    assert body["must_change_password"] is False
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(old)))
    # the token that changed the password is revoked as well (same-second iat)
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(current)))
    fresh = body["access_token"]
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(fresh))).status == 404
    stored = await harness.store.get_user(user.uuid)
    assert stored is not None and stored.tokens_valid_from is not None
    assert abs(stored.tokens_valid_from - time.time()) < 5
    # the new password works, the old one does not
    assert await harness.login("alice", "A brand-new passw0rd")
    resp = await harness.client.post(
        "/api/v1/auth/login", json={"username": "alice", "password": PASSWORD}
    )
    assert resp.status == 401


async def test_a_token_of_the_same_second_does_not_survive_a_password_change(
    harness: Harness,
) -> None:
    """Security review item 4: ``iat`` was whole seconds and compared with
    ``floor(tokens_valid_from)``, so a token issued in the same second as a
    password change (but before it) lived on."""
    user = await harness.add_user("alice", "viewer")
    now = int(time.time())
    await harness.store.update_user(user.uuid, tokens_valid_from=now + 0.5)
    same_second_before = harness.forge(user, iat=now)
    same_second_after = harness.forge(user, iat=now + 0.75)
    earlier = harness.forge(user, iat=now - 1)
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(same_second_before)))
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(earlier)))
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(same_second_after))).status == 404


async def test_issued_tokens_carry_a_sub_second_iat(harness: Harness) -> None:
    """A second login just before a password change is cut off by it, and the
    token the change returns works, whatever the clock's second boundaries."""
    user = await harness.add_user("alice", "viewer")
    other_session = await harness.login("alice")
    claims = jwt.decode(other_session, options={"verify_signature": False})
    assert isinstance(claims["iat"], float)
    current = await harness.login("alice")
    resp = await harness.client.post(
        "/api/v1/auth/change-password",
        json={"old_password": PASSWORD, "new_password": "A brand-new passw0rd"},
        headers=bearer(current),
    )
    assert resp.status == 200
    fresh = (await resp.json())["access_token"]
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(other_session)))
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(fresh))).status == 404
    stored = await harness.store.get_user(user.uuid)
    assert stored is not None and stored.tokens_valid_from is not None
    assert jwt.decode(fresh, options={"verify_signature": False})["iat"] >= stored.tokens_valid_from


async def test_disabled_user_token_stops_working(harness: Harness) -> None:
    token = await harness.token("alice", "viewer")
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(token))).status == 404
    await harness.store.update_user(harness.users["alice"].uuid, disabled=True)
    await _expect_401(await harness.client.get(ATTRIBUTION, headers=bearer(token)))


async def test_must_change_password_flow(harness: Harness) -> None:
    await harness.add_user("admin", "admin", must_change=True)
    resp = await harness.client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": PASSWORD}
    )
    body = await resp.json()
    assert body["must_change_password"] is True
    token = body["access_token"]
    for method, path in [
        ("GET", ATTRIBUTION),
        ("GET", "/api/v1/attackers"),
        ("GET", "/api/v1/attackers/x"),
        ("POST", "/api/v1/auth/sse-ticket"),
        ("POST", "/api/v1/attackers"),
        ("POST", "/api/v1/observations"),
    ]:
        resp = await harness.client.request(method, path, headers=bearer(token), json={})
        assert resp.status == 403, (method, path)
        assert await resp.json() == MUST_CHANGE
    me = await harness.client.get("/api/v1/auth/me", headers=bearer(token))
    assert me.status == 200
    me_body = await me.json()
    assert me_body["username"] == "admin"
    assert me_body["role"] == "admin"
    assert me_body["must_change_password"] is True
    resp = await harness.client.post(
        "/api/v1/auth/change-password",
        json={"old_password": PASSWORD, "new_password": "Much better passw0rd!"},
        headers=bearer(token),
    )
    assert resp.status == 200
    new = (await resp.json())["access_token"]
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(new))).status == 404
    me = await harness.client.get("/api/v1/auth/me", headers=bearer(new))
    assert (await me.json())["must_change_password"] is False


async def test_must_change_user_can_log_out(harness: Harness) -> None:
    await harness.add_user("bob", "viewer", must_change=True)
    token = await harness.login("bob")
    resp = await harness.client.post("/api/v1/auth/logout", headers=bearer(token))
    assert resp.status == 200
    await _expect_401(await harness.client.get("/api/v1/auth/me", headers=bearer(token)))


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (
            {"old_password": "wrong password!", "new_password": "A brand-new passw0rd"},
            400,
            "Old password is incorrect",
        ),
        (
            {"old_password": PASSWORD, "new_password": "short"},
            422,
            "new_password: password must be at least 12 characters",
        ),
        (
            {"old_password": PASSWORD, "new_password": "x" * 73},
            422,
            "new_password: password must be at most 72 bytes (UTF-8)",
        ),
        (
            {"old_password": PASSWORD, "new_password": PASSWORD},
            422,
            "new_password: must differ from the old password",
        ),
        ({"old_password": PASSWORD}, 422, "new_password: password must be a string"),
    ],
)
async def test_change_password_validation(
    harness: Harness, body: dict[str, Any], status: int, detail: str
) -> None:
    token = await harness.token("alice", "viewer")
    resp = await harness.client.post(
        "/api/v1/auth/change-password", json=body, headers=bearer(token)
    )
    assert resp.status == status
    assert await resp.json() == {"detail": detail}
    # nothing changed: the token still works
    assert (await harness.client.get(ATTRIBUTION, headers=bearer(token))).status == 404


async def test_change_password_is_rate_limited(harness: Harness) -> None:
    token = await harness.token("alice", "viewer")
    bad = {"old_password": "wrong password!", "new_password": "A brand-new passw0rd"}
    for _ in range(5):
        resp = await harness.client.post(
            "/api/v1/auth/change-password", json=bad, headers=bearer(token)
        )
        assert resp.status == 400
    resp = await harness.client.post(
        "/api/v1/auth/change-password", json=bad, headers=bearer(token)
    )
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1


async def test_me(harness: Harness) -> None:
    token = await harness.token("sam", "sensor")
    resp = await harness.client.get("/api/v1/auth/me", headers=bearer(token))
    assert resp.status == 200
    body = await resp.json()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert body == {
        "uuid": harness.users["sam"].uuid,
        "username": "sam",
        "role": "sensor",
        "must_change_password": False,
        "created_at": pytest.approx(harness.users["sam"].created_at),
        "token_expires_at": claims["exp"],
    }


# ---- roles ------------------------------------------------------------------------------------
OBS = [{"attacker_uuid": "a1", "primitive": "environmental.shell_type", "value": "bash", "ts": 1.0}]

ROUTES: list[tuple[str, str, Any, dict[str, int]]] = [
    # method, path, json body, role -> expected status
    ("GET", ATTRIBUTION, None, {"admin": 404, "viewer": 404, "sensor": 403}),
    ("GET", "/api/v1/attackers", None, {"admin": 200, "viewer": 200, "sensor": 403}),
    ("GET", "/api/v1/attackers/nobody", None, {"admin": 404, "viewer": 404, "sensor": 403}),
    (
        "POST",
        "/api/v1/attackers",
        {"ip": "192.0.2.1"},
        {"admin": 201, "viewer": 403, "sensor": 201},
    ),
    # no durable consumer in this app: an allowed ingest gets the 503
    ("POST", "/api/v1/observations", OBS, {"admin": 503, "viewer": 403, "sensor": 503}),
    ("POST", "/api/v1/auth/sse-ticket", None, {"admin": 200, "viewer": 200, "sensor": 403}),
    ("GET", "/api/v1/auth/me", None, {"admin": 200, "viewer": 200, "sensor": 200}),
    ("POST", "/api/v1/auth/logout", None, {"admin": 200, "viewer": 200, "sensor": 200}),
]


@pytest.mark.parametrize("role", ["admin", "viewer", "sensor"])
@pytest.mark.parametrize(("method", "path", "body", "expected"), ROUTES)
async def test_role_matrix(
    harness: Harness,
    role: str,
    method: str,
    path: str,
    body: Any,
    expected: dict[str, int],
) -> None:
    token = await harness.token(f"user-{role}", role)
    resp = await harness.client.request(method, path, json=body, headers=bearer(token))
    assert resp.status == expected[role], await resp.text()
    if expected[role] == 403:
        assert await resp.json() == FORBIDDEN
    # and without any token: 401 before anything else
    await _expect_401(await harness.client.request(method, path, json=body))


# ---- rate limits --------------------------------------------------------------------------
async def test_login_rate_limit_per_ip(make_harness: HarnessFactory) -> None:
    h = await make_harness(login_rate=3, login_window=300.0)
    for i in range(3):
        resp = await h.client.post(
            "/api/v1/auth/login", json={"username": f"user{i}", "password": "whatever-123"}
        )
        assert resp.status == 401
    # a different username, same IP: limited; X-Forwarded-For is not trusted by default
    resp = await h.client.post(
        "/api/v1/auth/login",
        json={"username": "someone-else", "password": "whatever-123"},
        headers={"X-Forwarded-For": "198.51.100.7"},
    )
    assert resp.status == 429
    assert await resp.json() == {"detail": "Too many login attempts; try again later"}
    retry = int(resp.headers["Retry-After"])
    assert 290 <= retry <= 300
    assert h.counters["rate_limited_total"] == 1


async def test_login_rate_limit_per_username(make_harness: HarnessFactory) -> None:
    h = await make_harness(login_rate=3, login_window=300.0, trust_forwarded_for=True)
    await h.add_user("alice")
    for i in range(3):
        resp = await h.client.post(
            "/api/v1/auth/login",
            json={"username": "alice", "password": "wrong password!"},
            headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
        )
        assert resp.status == 401
    # the username is hot: an address that failed before gets no further guess
    resp = await h.client.post(
        "/api/v1/auth/login",
        json={"username": "Alice", "password": "another guess!"},
        headers={"X-Forwarded-For": "203.0.113.1"},
    )
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    # a fresh address with the right password is not blocked (security review item 2)
    resp = await h.client.post(
        "/api/v1/auth/login",
        json={"username": "alice", "password": PASSWORD},
        headers={"X-Forwarded-For": "203.0.113.50"},
    )
    assert resp.status == 200


async def test_forwarded_for_uses_the_rightmost_address(make_harness: HarnessFactory) -> None:
    h = await make_harness(login_rate=2, trust_forwarded_for=True)
    for i in range(2):
        resp = await h.client.post(
            "/api/v1/auth/login",
            json={"username": f"u{i}", "password": "whatever-123"},
            headers={"X-Forwarded-For": f"10.9.9.{i}, 198.51.100.1"},
        )
        assert resp.status == 401
    # the client-controlled left part changes, the proxy-appended address does not
    resp = await h.client.post(
        "/api/v1/auth/login",
        json={"username": "u9", "password": "whatever-123"},
        headers={"X-Forwarded-For": "10.1.1.1, 198.51.100.1"},
    )
    assert resp.status == 429


async def test_ticket_mint_rate_limit(make_harness: HarnessFactory) -> None:
    h = await make_harness(ticket_rate=3, max_tickets_per_user=100)
    token = await h.token("alice", "viewer")
    for _ in range(3):
        await mint(h, token)
    resp = await h.client.post("/api/v1/auth/sse-ticket", headers=bearer(token))
    assert resp.status == 429
    assert await resp.json() == {"detail": "Too many SSE tickets requested; try again later"}
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # per user: another user is not affected
    other = await h.token("bob", "viewer")
    await mint(h, other)


async def test_outstanding_ticket_cap(make_harness: HarnessFactory) -> None:
    h = await make_harness(setup=add_stream_route, max_tickets_per_user=2)
    token = await h.token("alice", "viewer")
    t1 = await mint(h, token)
    await mint(h, token)
    resp = await h.client.post("/api/v1/auth/sse-ticket", headers=bearer(token))
    assert resp.status == 429
    assert await resp.json() == {"detail": "Too many outstanding SSE tickets; try again later"}
    assert int(resp.headers["Retry-After"]) == 60
    # redeeming one frees a slot
    assert (await h.client.get(STREAM, params={"ticket": t1})).status == 200
    await mint(h, token)


# ---- SSE tickets ------------------------------------------------------------------------------
async def test_ticket_shape_and_hashed_storage(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    resp = await sh.client.post(
        "/api/v1/auth/sse-ticket", headers=bearer(token), json={"ignored": True}
    )
    body = await resp.json()
    ticket = body["ticket"]
    assert body["expires_in"] == 60
    assert len(ticket) == 43 and "." not in ticket
    db = Path(sh.settings.data_dir) / "attr.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT ticket_hash, user_uuid, role, token_jti FROM sse_tickets"
        ).fetchall()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert rows == [
        (
            hashlib.sha256(ticket.encode()).hexdigest(),
            sh.users["alice"].uuid,
            "viewer",
            claims["jti"],
        )
    ]
    raw = db.read_bytes() + (
        db.with_name("attr.db-wal").read_bytes() if db.with_name("attr.db-wal").exists() else b""
    )
    assert ticket.encode() not in raw


async def test_ticket_is_single_use(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    ticket = await mint(sh, token)
    resp = await sh.client.get(STREAM, params={"ticket": ticket})
    assert resp.status == 200
    p = await resp.json()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert p == {
        "user_uuid": sh.users["alice"].uuid,
        "username": "alice",
        "role": "viewer",
        "jti": claims["jti"],
        "exp": claims["exp"],
        "via_ticket": True,
        "iat": claims["iat"],
    }
    await _expect_401(await sh.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_expires(make_harness: HarnessFactory) -> None:
    h = await make_harness(setup=add_stream_route, ticket_ttl=0.2)
    token = await h.token("alice", "viewer")
    ticket = await mint(h, token)
    await asyncio.sleep(0.35)
    await _expect_401(await h.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_redeemed_by_a_second_app_sharing_the_store_file(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    a = await make_harness(setup=add_stream_route)
    b = await make_harness(setup=add_stream_route)  # same data dir: same SQLite file
    assert a.store is not b.store
    token = await a.token("alice", "admin")
    ticket = await mint(a, token)
    resp = await b.client.get(STREAM, params={"ticket": ticket})
    assert resp.status == 200
    assert (await resp.json())["username"] == "alice"
    # single use across processes too
    await _expect_401(await a.client.get(STREAM, params={"ticket": ticket}))
    await _expect_401(await b.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_of_a_user_disabled_after_minting(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    ticket = await mint(sh, token)
    await sh.store.update_user(sh.users["alice"].uuid, disabled=True)
    await _expect_401(await sh.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_of_a_logged_out_token(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    ticket = await mint(sh, token)
    assert (await sh.client.post("/api/v1/auth/logout", headers=bearer(token))).status == 200
    await _expect_401(await sh.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_older_than_tokens_valid_from(sh: Harness) -> None:
    user = await sh.add_user("alice", "viewer")
    token = sh.forge(user, iat=int(time.time()) - 100)
    ticket = await mint(sh, token)
    await sh.store.update_user(user.uuid, tokens_valid_from=time.time())
    await _expect_401(await sh.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_whose_token_expired(sh: Harness) -> None:
    user = await sh.add_user("alice", "viewer")
    token = sh.forge(user, exp=int(time.time()) + 1)
    ticket = await mint(sh, token)
    await asyncio.sleep(1.2)
    await _expect_401(await sh.client.get(STREAM, params={"ticket": ticket}))


async def test_ticket_after_role_change(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    ticket = await mint(sh, token)
    await sh.store.update_user(sh.users["alice"].uuid, role="sensor")
    await _expect_401(await sh.client.get(STREAM, params={"ticket": ticket}))


async def test_raw_jwt_as_ticket_is_refused(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    await _expect_401(await sh.client.get(STREAM, params={"ticket": token}))
    await _expect_401(await sh.client.get(STREAM, params={"token": token}))
    await _expect_401(await sh.client.get(STREAM, params={"ticket": "x" * 43}))
    await _expect_401(await sh.client.get(STREAM))


async def test_stream_bearer_header(sh: Harness) -> None:
    viewer = await sh.token("vic", "viewer")
    resp = await sh.client.get(STREAM, headers=bearer(viewer))
    assert resp.status == 200
    assert (await resp.json())["via_ticket"] is False
    sensor = await sh.token("sam", "sensor")
    resp = await sh.client.get(STREAM, headers=bearer(sensor))
    assert resp.status == 403
    assert await resp.json() == FORBIDDEN
    must = await sh.token("max", "viewer", must_change=True)
    resp = await sh.client.get(STREAM, headers=bearer(must))
    assert resp.status == 403
    assert await resp.json() == MUST_CHANGE
    # the header wins over a ticket, which stays unused
    ticket = await mint(sh, viewer)
    resp = await sh.client.get(STREAM, params={"ticket": ticket}, headers=bearer(viewer))
    assert (await resp.json())["via_ticket"] is False
    assert (await sh.client.get(STREAM, params={"ticket": ticket})).status == 200


async def test_ticket_of_a_user_flagged_must_change_after_minting(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    ticket = await mint(sh, token)
    await sh.store.update_user(sh.users["alice"].uuid, must_change_password=True)
    resp = await sh.client.get(STREAM, params={"ticket": ticket})
    assert resp.status == 403
    assert await resp.json() == MUST_CHANGE


async def test_tickets_are_not_accepted_on_the_attribution_endpoint(sh: Harness) -> None:
    token = await sh.token("alice", "viewer")
    ticket = await mint(sh, token)
    await _expect_401(await sh.client.get(ATTRIBUTION, params={"ticket": ticket}))
    # and the ticket was not consumed by that attempt
    assert (await sh.client.get(STREAM, params={"ticket": ticket})).status == 200


# ---- principal_still_valid --------------------------------------------------------------------
async def test_principal_still_valid(harness: Harness) -> None:
    token = await harness.token("alice", "viewer")
    principal, _user = await harness.auth.resolve_token(token)
    now = time.time()
    app = harness.app
    assert await principal_still_valid(app, principal, now)
    assert principal.exp is not None
    assert not await principal_still_valid(app, principal, principal.exp + 1)
    await harness.auth.revoke(principal)
    assert not await principal_still_valid(app, principal, now)

    token2 = await harness.login("alice")
    p2, _ = await harness.auth.resolve_token(token2)
    assert await principal_still_valid(app, p2, now)
    await harness.store.update_user(p2.user_uuid, tokens_valid_from=time.time() + 5)
    assert not await principal_still_valid(app, p2, now)
    await harness.store.update_user(p2.user_uuid, tokens_valid_from=None)
    assert await principal_still_valid(app, p2, now)
    await harness.store.update_user(p2.user_uuid, role="sensor")
    assert not await principal_still_valid(app, p2, now)
    await harness.store.update_user(p2.user_uuid, role="viewer", disabled=True)
    assert not await principal_still_valid(app, p2, now)


async def test_principal_still_valid_fails_closed_on_store_errors(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await harness.token("alice", "viewer")
    principal, _ = await harness.auth.resolve_token(token)

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise StoreUnavailable("down")

    monkeypatch.setattr(harness.store, "get_user", broken)
    assert not await principal_still_valid(harness.app, principal, time.time())


# ---- caches and cross-process revocation ------------------------------------------------------
async def test_revocation_reaches_another_process_through_the_bus(
    make_harness: HarnessFactory,
) -> None:
    bus = InProcessBus()
    await bus.connect()
    try:
        a = await make_harness(bus=bus)
        # b caches users and revocations for a long time: only the event can help
        b = await make_harness(bus=bus, cache_ttl=60.0)
        token = await a.token("alice", "viewer")
        assert (await b.client.get(ATTRIBUTION, headers=bearer(token))).status == 404
        assert (await a.client.post("/api/v1/auth/logout", headers=bearer(token))).status == 200
        for _ in range(50):
            resp = await b.client.get(ATTRIBUTION, headers=bearer(token))
            if resp.status == 401:
                break
            await asyncio.sleep(0.02)
        await _expect_401(resp)
    finally:
        await bus.close()


async def test_cache_serves_repeated_requests(make_harness: HarnessFactory) -> None:
    h = await make_harness(cache_ttl=60.0)
    token = await h.token("alice", "viewer")
    calls = {"get_user": 0, "is_token_revoked": 0}
    for name in calls:
        orig = getattr(h.store, name)

        def wrap(orig: Any = orig, name: str = name) -> Any:
            async def inner(*a: Any) -> Any:
                calls[name] += 1
                return await orig(*a)

            return inner

        setattr(h.store, name, wrap())
    for _ in range(5):
        assert (await h.client.get(ATTRIBUTION, headers=bearer(token))).status == 404
    assert calls == {"get_user": 1, "is_token_revoked": 1}
    # a local logout is seen at once despite the cache
    assert (await h.client.post("/api/v1/auth/logout", headers=bearer(token))).status == 200
    await _expect_401(await h.client.get(ATTRIBUTION, headers=bearer(token)))


# ---- the JWT secret -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "secret",
    ["changeme", "ChangeMe", "fallback-secret-key-change-me", "ADMIN", "x" * 31],
)
def test_weak_secrets_are_refused(tmp_path: Path, secret: str) -> None:
    with pytest.raises(ConfigError):
        create_app(make_settings(tmp_path, jwt_secret=secret), worker=False)


def test_generated_secret_file(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "d")
    secret = load_jwt_secret(settings)
    path = tmp_path / "d" / "jwt.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 64
    assert load_jwt_secret(settings) == secret  # reused
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["jwt.secret"]


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    load_jwt_secret(settings)
    os.chmod(tmp_path / "jwt.secret", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_jwt_secret(settings)


def test_weak_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwt.secret"
    path.write_text("secret\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError):
        load_jwt_secret(make_settings(tmp_path))


def test_explicit_secret_wins(tmp_path: Path) -> None:
    secret = "s" * 40
    assert load_jwt_secret(make_settings(tmp_path, jwt_secret=secret)) == secret
    assert not (tmp_path / "jwt.secret").exists()


# ---- errors -------------------------------------------------------------------------------
def add_boom(app: web.Application) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals /etc/passwd")

    app.router.add_get("/_test/boom", boom)


async def test_unexpected_errors_do_not_leak(make_harness: HarnessFactory) -> None:
    h = await make_harness(setup=add_boom)
    resp = await h.client.get("/_test/boom")
    assert resp.status == 500
    assert await resp.json() == {"detail": "Internal Server Error"}
    assert h.counters["http_5xx_total"] == 1


async def test_aiohttp_errors_are_json(harness: Harness) -> None:
    resp = await harness.client.get("/api/v1/nothing-here")
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not Found"}
    resp = await harness.client.delete("/api/v1/auth/login")
    assert resp.status == 405
    assert await resp.json() == {"detail": "Method Not Allowed"}
    assert "POST" in resp.headers["Allow"]


async def test_store_outage_is_a_503(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    token = await harness.token("alice", "viewer")

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise StoreUnavailable("database is locked")

    monkeypatch.setattr(harness.store, "attacker_attribution", broken)
    resp = await harness.client.get(ATTRIBUTION, headers=bearer(token))
    assert resp.status == 503
    assert await resp.json() == {"detail": "Service temporarily unavailable"}
    assert resp.headers["Retry-After"] == "1"


async def test_post_with_a_non_json_body_is_415(harness: Harness) -> None:
    token = await harness.token("alice", "admin")
    resp = await harness.client.post(
        "/api/v1/attackers",
        data=b"ip=1.2.3.4",
        headers={**bearer(token), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 415
    # POST without a body is not subject to the check
    resp = await harness.client.post("/api/v1/auth/sse-ticket", headers=bearer(token))
    assert resp.status == 200


async def test_unknown_route_is_404_whatever_the_body(harness: Harness) -> None:
    resp = await harness.client.post(
        "/api/v1/nothing", data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not Found"}


# ---- application lifecycle ------------------------------------------------------------------
async def test_healthz(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    resp = await harness.client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "ok",
        "checks": {"store": True, "bus": True, "worker": None},
        "bus": {"transport": "memory", "reconnects": 0, "dropped": 0},
    }

    async def down() -> bool:
        return False

    monkeypatch.setattr(harness.store, "ping", down)
    resp = await harness.client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {
        "status": "unready",
        "checks": {"store": False, "bus": True, "worker": None},
        "bus": {"transport": "memory", "reconnects": 0, "dropped": 0},
    }
    resp = await harness.client.get("/healthz")  # liveness does not depend on the store
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_startup_and_shutdown_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aiohttp_client: Any
) -> None:
    import decnet_attr.server.app as app_mod
    from decnet_attr.server.keys import BUS, SSE_HUB, STORE, WORKER
    from tests.server.conftest import fast_passwords

    events: list[str] = []

    class FakeWorker:
        def __init__(self, settings: Any, bus: Any, store: Any) -> None:
            assert bus is not None and store is not None
            self.running = False
            self.last_heartbeat = 0.0  # monotonic time of the last loop turn, as the worker's

        async def start(self) -> None:
            events.append("worker.start")
            self.running = True
            self.last_heartbeat = time.monotonic()

        async def stop(self) -> None:
            events.append("worker.stop")
            self.running = False

    monkeypatch.setattr(app_mod, "AttributionWorker", FakeWorker)
    app = create_app(make_settings(tmp_path, worker=True), passwords=fast_passwords())
    assert isinstance(app[WORKER], FakeWorker)

    def spy(obj: Any, name: str, label: str) -> None:
        orig = getattr(obj, name)

        async def wrapper(*a: Any, **kw: Any) -> Any:
            events.append(label)
            return await orig(*a, **kw)

        monkeypatch.setattr(obj, name, wrapper)

    spy(app[STORE], "open", "store.open")
    spy(app[STORE], "close", "store.close")
    spy(app[BUS], "connect", "bus.connect")
    spy(app[BUS], "close", "bus.close")
    hub = app[SSE_HUB]
    if hub is not None:
        spy(hub, "start", "sse.start")
        spy(hub, "stop", "sse.stop")
    client = await aiohttp_client(app)
    resp = await client.get("/readyz")
    assert (await resp.json())["checks"]["worker"] is True
    await client.close()
    sse_up = ["sse.start"] if hub is not None else []
    sse_down = ["sse.stop"] if hub is not None else []
    assert events == [
        "store.open",
        "bus.connect",
        *sse_up,
        "worker.start",
        *sse_down,  # on_shutdown: streams end before the worker drains
        "worker.stop",
        "bus.close",
        "store.close",
    ]


async def test_given_store_and_bus_are_left_open(tmp_path: Path, aiohttp_client: Any) -> None:
    from decnet_attr.store import open_store
    from tests.server.conftest import fast_passwords

    store = open_store(f"sqlite://{tmp_path / 'x.db'}")
    await store.open()
    bus = InProcessBus()
    await bus.connect()
    try:
        app = create_app(
            make_settings(tmp_path), store=store, bus=bus, worker=False, passwords=fast_passwords()
        )
        client = await aiohttp_client(app)
        assert (await client.get("/healthz")).status == 200
        await client.close()
        assert await store.ping()
        assert bus.connected
    finally:
        await bus.close()
        await store.close()


def test_worker_argument_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="worker must be"):
        create_app(make_settings(tmp_path), worker="yes")


# ---- scale-out: two API processes on one PostgreSQL database --------------------------------
async def test_tickets_and_revocation_across_apps_on_postgresql(
    make_harness: HarnessFactory, pg_server: Any
) -> None:
    dsn = await pg_server.create_database()
    try:
        a = await make_harness(db_url=dsn, setup=add_stream_route)
        b = await make_harness(db_url=dsn, setup=add_stream_route)
        assert a.store.dialect == b.store.dialect == "postgresql"
        token = await a.token("alice", "viewer")
        ticket = await mint(a, token)
        resp = await b.client.get(STREAM, params={"ticket": ticket})
        assert resp.status == 200
        body = await resp.json()
        assert body["via_ticket"] is True
        assert body["jti"] == jwt.decode(token, options={"verify_signature": False})["jti"]
        await _expect_401(await a.client.get(STREAM, params={"ticket": ticket}))
        # a ticket minted on a, the token logged out on b: refused on a
        ticket = await mint(a, token)
        assert (await b.client.post("/api/v1/auth/logout", headers=bearer(token))).status == 200
        await _expect_401(await a.client.get(STREAM, params={"ticket": ticket}))
        await _expect_401(await a.client.get(ATTRIBUTION, headers=bearer(token)))
        # outstanding cap is shared
        fresh = await b.login("alice")
        for _ in range(10):
            await mint(a if _ % 2 else b, fresh)
        resp = await a.client.post("/api/v1/auth/sse-ticket", headers=bearer(fresh))
        assert resp.status == 429
        await a.client.close()
        await b.client.close()
    finally:
        await pg_server.drop_database(dsn)


async def test_revocation_across_processes_over_nats(make_harness: HarnessFactory) -> None:
    from tests.natsserver import NatsServer, nats_server_path

    if nats_server_path() is None:
        pytest.skip("nats-server not installed")
    with NatsServer() as server:
        a = await make_harness(bus_url=server.url)
        b = await make_harness(bus_url=server.url, cache_ttl=60.0)  # only the event helps
        assert a.bus is not b.bus
        token = await a.token("alice", "viewer")
        assert (await b.client.get(ATTRIBUTION, headers=bearer(token))).status == 404
        assert (await a.client.post("/api/v1/auth/logout", headers=bearer(token))).status == 200
        for _ in range(100):
            resp = await b.client.get(ATTRIBUTION, headers=bearer(token))
            if resp.status == 401:
                break
            await asyncio.sleep(0.05)
        await _expect_401(resp)
        await a.client.close()
        await b.client.close()


async def test_run_server_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    import aiohttp

    from decnet_attr.server.main import run_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(tmp_path / "srv", port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(run_server(settings, stop))
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        out = capsys.readouterr().out
        password = out.split("initial admin password: ")[1].split()[0]
        async with http.post(
            f"http://127.0.0.1:{port}/api/v1/auth/login",
            json={"username": "admin", "password": password},
        ) as r:
            assert r.status == 200
            assert (await r.json())["must_change_password"] is True
    stop.set()
    assert await asyncio.wait_for(task, 15) == 0
    assert stat.S_IMODE((tmp_path / "srv").stat().st_mode) == 0o700
    # a second start finds the user: no new password
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        code = await run_server(settings.replace(port=taken), asyncio.Event())
    assert code == 1  # cannot listen
    assert "initial admin password" not in capsys.readouterr().out
