"""The security review's API findings (issue 11), one section per item; each
test failed before the fix. Connection-level items (1, 7, 10's access log)
are in test_connections.py and test_sse_deadline.py, item 8 in
tests/store/test_file_modes.py and test_users_cli.py, item 4 in test_auth.py."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from decnet_attr.logs import configure_logging
from decnet_attr.server.password_policy import password_problem
from decnet_attr.server.ratelimit import LoginThrottle
from tests.server.conftest import PASSWORD, Harness, HarnessFactory, bearer

LOGIN = "/api/v1/auth/login"
STRONG = "Tangerine-Orbit-42"


def xff(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def login(h: Harness, user: str, password: str, address: str) -> int:
    resp = await h.client.post(
        LOGIN, json={"username": user, "password": password}, headers=xff(address)
    )
    return resp.status


# ---- item 2: nobody can lock the owner out -------------------------------------------------
async def test_wrong_passwords_from_elsewhere_do_not_lock_the_owner_out(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(login_rate=10, login_window=300.0, trust_forwarded_for=True)
    await h.add_user("dave")
    for _ in range(10):
        assert await login(h, "dave", "wrong password!", "198.51.100.66") in (401, 429)
    # the attacker's address is throttled ...
    assert await login(h, "dave", PASSWORD, "198.51.100.66") == 429
    # ... the owner, from an address with no failures, is not
    assert await login(h, "dave", PASSWORD, "203.0.113.5") == 200


async def test_a_slow_guesser_cannot_keep_admin_out(make_harness: HarnessFactory) -> None:
    h = await make_harness(login_rate=3, login_window=300.0, trust_forwarded_for=True)
    await h.add_user("admin", "admin")
    for i in range(6):  # guesses from ever new addresses (a botnet)
        assert await login(h, "admin", f"guess number {i}", f"192.0.2.{i + 1}") == 401
    assert await login(h, "admin", PASSWORD, "203.0.113.9") == 200


async def test_only_failures_count(make_harness: HarnessFactory) -> None:
    h = await make_harness(login_rate=3, login_window=300.0, trust_forwarded_for=True)
    await h.add_user("erin")
    for _ in range(8):  # many successful logins from one address: never throttled
        assert await login(h, "erin", PASSWORD, "203.0.113.7") == 200


def test_back_off_per_address_and_username_doubles() -> None:
    now = [1000.0]
    t = LoginThrottle(100, 300.0, base=1.0, cap=60.0, free=3, clock=lambda: now[0])
    waits = []
    for _ in range(10):
        assert t.retry_after("a", "u") == 0.0
        t.begin("a")
        t.end("a", "u", ok=False)
        waits.append(t.retry_after("a", "u"))
        now[0] += waits[-1]
    assert waits == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    # another username from the same address, and the same username from
    # another address, are not held by this pair's back-off
    assert t.retry_after("a", "v") == 0.0
    assert t.retry_after("b", "u") == 0.0
    # a success clears the pair
    t.begin("a")
    t.end("a", "u", ok=True)
    assert t.retry_after("a", "u") == 0.0


def test_logins_in_flight_count_against_the_address() -> None:
    t = LoginThrottle(3, 300.0)
    for _ in range(3):
        assert t.retry_after("a", "u") == 0.0
        t.begin("a")  # three guesses checked concurrently
    assert t.retry_after("a", "u") > 0
    for _ in range(3):
        t.end("a", "u", ok=None)
    assert t.retry_after("a", "u") == 0.0


# ---- item 3: the audit log ------------------------------------------------------------------
@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def audit_lines(text: str, event: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"audit {event} " in ln]


async def test_ten_logins_in_one_second_are_ten_audit_lines(
    make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    h = await make_harness(trust_forwarded_for=True)
    names = [f"user{i}" for i in range(10)]
    for i, name in enumerate(names):
        await h.add_user(name, "admin" if i == 3 else "viewer")
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    configure_logging("text", "INFO")  # the real handler, with its repeat filter
    t0 = time.monotonic()
    statuses = await asyncio.gather(
        *(login(h, n, PASSWORD, f"203.0.113.{i + 1}") for i, n in enumerate(names))
    )
    assert time.monotonic() - t0 < 1.0
    assert statuses == [200] * 10
    lines = audit_lines(buf.getvalue(), "login")
    assert len(lines) == 10, buf.getvalue()
    for i, name in enumerate(names):
        line = next(ln for ln in lines if f"user={name} " in ln)
        assert "outcome=ok" in line and f"address=203.0.113.{i + 1}" in line
    assert "suppressed" not in buf.getvalue()


async def test_failed_logins_password_changes_and_logouts_are_audited(
    make_harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    h = await make_harness(trust_forwarded_for=True)
    for name in ("ann", "ben", "cat"):
        await h.add_user(name)
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    configure_logging("json", "INFO")
    assert await login(h, "ann", "not the password", "192.0.2.50") == 401
    assert await login(h, "nobody", "not the password", "192.0.2.51") == 401
    for name in ("ann", "ben", "cat"):
        token = await h.login(name)
        resp = await h.client.post(
            "/api/v1/auth/change-password",
            json={"old_password": PASSWORD, "new_password": STRONG},
            headers=bearer(token),
        )
        assert resp.status == 200
        fresh = (await resp.json())["access_token"]
        resp = await h.client.post("/api/v1/auth/logout", headers=bearer(fresh))
        assert resp.status == 200
    import json

    records = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    audit = [r for r in records if r["logger"] == "decnet_attr.audit"]
    failed = [
        (r["user"], r["address"])
        for r in audit
        if r["event"] == "login" and r["outcome"] == "failed"
    ]
    assert failed == [("ann", "192.0.2.50"), ("nobody", "192.0.2.51")]
    changes = [r["user"] for r in audit if r["event"] == "password_change"]
    assert changes == ["ann", "ben", "cat"]
    assert [r["user"] for r in audit if r["event"] == "logout"] == ["ann", "ben", "cat"]


async def test_refused_tickets_are_audited(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="decnet_attr.audit"):
        resp = await harness.client.get("/api/v1/attackers/a1/events", params={"ticket": "A" * 43})
    assert resp.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "decnet_attr.audit"]
    assert len(lines) == 1 and lines[0].startswith("audit ticket_refused outcome=refused")


def test_a_forged_username_cannot_forge_an_audit_line(caplog: pytest.LogCaptureFixture) -> None:
    from decnet_attr.audit import audit

    with caplog.at_level(logging.INFO, logger="decnet_attr.audit"):
        audit(
            "login",
            "failed",
            user="x outcome=ok\naudit login outcome=ok user=admin",
            address="1.2.3.4",
        )
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line
    assert line.startswith('audit login outcome=failed user="x outcome=ok\\naudit')


# ---- item 9: password policy -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("aaaaaaaaaaaa", "mix at least 3"),
        ("abcdefghijkl", "mix at least 3"),
        ("Password123!", "too easy to guess"),
        ("Qwertyuiop1!", "too easy to guess"),
        ("é" * 37, "at most 72 bytes"),  # 37 characters, 74 bytes
        ("Aa1!", "at least 12 characters"),
    ],
)
def test_weak_passwords_are_refused(password: str, problem: str) -> None:
    found = password_problem(password, username="dave")
    assert found is not None and problem in found


@pytest.mark.parametrize("password", [STRONG, "A brand-new passw0rd", "Xk9#mQ2$vL7pRt"])
def test_strong_passwords_pass(password: str) -> None:
    assert password_problem(password, username="dave") is None


def test_the_username_counts_as_guessable() -> None:
    # strong for anyone else, guessable for the user whose name it is built on
    assert password_problem("Xqvtrlmw2024!", username="someone") is None
    assert password_problem("Xqvtrlmw2024!", username="xqvtrlmw") is not None


async def test_change_password_applies_the_policy(harness: Harness) -> None:
    token = await harness.token("vic")
    resp = await harness.client.post(
        "/api/v1/auth/change-password",
        json={"old_password": PASSWORD, "new_password": "aaaaaaaaaaaa"},
        headers=bearer(token),
    )
    assert resp.status == 422
    assert "mix at least 3" in (await resp.json())["detail"]


# ---- item 10: no credentials in any log line ---------------------------------------------
def test_every_log_line_is_redacted(monkeypatch: pytest.MonkeyPatch, root_logging: None) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    configure_logging("text", "INFO")
    token = jwt.encode({"uuid": "u"}, "k" * 32, algorithm="HS256")
    logging.getLogger("decnet_attr.test").warning(
        "stream %s failed", "/api/v1/attackers/a/events?ticket=SeCrEtTiCkEt123456&x=1"
    )
    logging.getLogger("aiohttp.access").info('1.2.3.4 "GET /x?token=%s HTTP/1.1" 200', token)
    logging.getLogger("other").info("header Authorization: Bearer %s", token)
    out = buf.getvalue()
    assert "SeCrEtTiCkEt123456" not in out and token not in out
    assert out.count("[redacted]") == 3
    assert "ticket=[redacted]&x=1" in out


# ---- item 11: one host, one attacker; one uuid rule ---------------------------------------
@pytest.mark.parametrize(
    ("first", "second"),
    [("203.0.113.7", "::ffff:203.0.113.7"), ("fe80::1%eth0", "fe80::1%eth1")],
)
async def test_one_host_registers_once(harness: Harness, first: str, second: str) -> None:
    token = await harness.token("root", "admin")
    a = await harness.client.post("/api/v1/attackers", json={"ip": first}, headers=bearer(token))
    b = await harness.client.post("/api/v1/attackers", json={"ip": second}, headers=bearer(token))
    assert (a.status, b.status) == (201, 200)
    assert (await a.json())["uuid"] == (await b.json())["uuid"]


@pytest.mark.parametrize("uuid", ["a\u202eb", "<img src=x>", "a b", "a/b", "x" * 65])
async def test_registration_refuses_hostile_uuids(harness: Harness, uuid: str) -> None:
    token = await harness.token("root", "admin")
    resp = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.9", "uuid": uuid}, headers=bearer(token)
    )
    assert resp.status == 422


# ---- item 12: small holes ----------------------------------------------------------------
async def test_a_sensor_learns_nothing_from_registering(harness: Harness) -> None:
    admin = await harness.token("root", "admin")
    sensor = await harness.token("probe", "sensor")
    first = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.1", "uuid": "att-1"}, headers=bearer(admin)
    )
    assert first.status == 201
    again = await harness.client.post(
        "/api/v1/attackers", json={"ip": "192.0.2.1"}, headers=bearer(sensor)
    )
    assert again.status == 200
    assert await again.json() == {"uuid": "att-1", "ip": "192.0.2.1"}
    for body in ({"ip": "192.0.2.1", "uuid": "att-2"}, {"ip": "192.0.2.2", "uuid": "att-1"}):
        resp = await harness.client.post("/api/v1/attackers", json=body, headers=bearer(sensor))
        assert resp.status == 409
        detail = (await resp.json())["detail"]
        assert "att-1" not in detail and "192.0.2" not in detail


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", LOGIN, {"username": "vic", "password": PASSWORD}),
        ("GET", "/api/v1/auth/me", None),
        ("GET", "/api/v1/attackers", None),
        ("GET", "/api/v1/attackers/nope", None),
        ("POST", LOGIN, {"username": "vic", "password": "wrong password!"}),
    ],
)
async def test_api_answers_are_not_stored_and_name_no_versions(
    harness: Harness, method: str, path: str, body: Any
) -> None:
    token = await harness.token("vic")
    resp = await harness.client.request(method, path, json=body, headers=bearer(token))
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Server"] == "decnet-attr"


async def test_the_dashboard_names_no_versions(harness: Harness) -> None:
    resp = await harness.client.get("/")
    assert resp.headers["Server"] == "decnet-attr"


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"exp": 1e300}, id="exp-1e300"),
        pytest.param({"exp": int(time.time()) + 30 * 86400}, id="a-month"),
    ],
)
async def test_tokens_living_longer_than_the_maximum_are_refused(
    harness: Harness, claims: dict[str, Any]
) -> None:
    user = await harness.add_user("vic")
    token = harness.forge(user, **claims)
    resp = await harness.client.get("/api/v1/auth/me", headers=bearer(token))
    assert resp.status == 401
    ok = harness.forge(user)  # one hour: within the 4-hour maximum
    assert (await harness.client.get("/api/v1/auth/me", headers=bearer(ok))).status == 200


async def test_rate_limit_keys_use_the_same_address_normal_form(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(login_rate=2, login_window=300.0, trust_forwarded_for=True)
    assert await login(h, "x", "wrong password!", "198.51.100.66") == 401
    assert await login(h, "y", "wrong password!", "::ffff:198.51.100.66") == 401
    # the same host under its mapped spelling: its allowance is used up
    assert await login(h, "z", "wrong password!", "198.51.100.66") == 429
