"""Fixtures for the API tests: the real app factory (``create_app``) on a
temporary data directory with the SQLite store and the in-process bus, served
by ``aiohttp_client`` on 127.0.0.1, plus helpers to create users through the
store and to log in."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher

from decnet_attr.bus import Bus, Event, batch_observations
from decnet_attr.config import Settings
from decnet_attr.server.app import AUTH, BUS, COUNTERS, STORE, create_app
from decnet_attr.server.auth import Authenticator, Passwords
from decnet_attr.store import Store, UserRow
from tests.pgserver import pg_server  # noqa: F401  (session fixture, for the PostgreSQL tests)

PASSWORD = "correct horse battery staple"
#: argon2 at its cheapest (tests only): hashes still verify like real ones.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def fast_passwords() -> Passwords:
    return Passwords(FAST_HASHER)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "worker": False,
        # these tests read what a 202 accepted right after it: the worker's
        # commit answers the POST; the journal (202 once written) has its
        # own tests in test_ingest_journal.py
        "ingest_journal": False,
        "login_rate": 1000,
        "ticket_rate": 1000,
    }
    base.update(overrides)
    return Settings(**base)


@dataclass
class Harness:
    """One running app and a client for it."""

    app: web.Application
    client: TestClient[Any, Any]
    settings: Settings
    users: dict[str, UserRow] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def bus(self) -> Bus:
        return self.app[BUS]

    @property
    def auth(self) -> Authenticator:
        return self.app[AUTH]

    @property
    def counters(self) -> dict[str, int]:
        return self.app[COUNTERS]

    @property
    def secret(self) -> str:
        return (Path(self.settings.data_dir) / "jwt.secret").read_text().strip()

    async def add_user(
        self,
        name: str,
        role: str = "viewer",
        *,
        password: str = PASSWORD,
        must_change: bool = False,
        disabled: bool = False,
    ) -> UserRow:
        now = time.time()
        user = UserRow(
            uuid=str(uuid_mod.uuid4()),
            username=name,
            password_hash=FAST_HASHER.hash(password),
            role=role,
            must_change_password=must_change,
            disabled=disabled,
            created_at=now,
            updated_at=now,
        )
        await self.store.create_user(user)
        self.users[name] = user
        return user

    async def login(self, name: str, password: str = PASSWORD) -> str:
        resp = await self.client.post(
            "/api/v1/auth/login", json={"username": name, "password": password}
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return str(body["access_token"])

    async def token(self, name: str, role: str = "viewer", **kw: Any) -> str:
        """Create ``name`` with ``role`` and log in."""
        await self.add_user(name, role, **kw)
        return await self.login(name)

    def forge(self, user: UserRow, *, secret: str | None = None, **claims: Any) -> str:
        """A token signed like the app's (or with ``secret``); ``claims``
        override or, with the value ``None``, remove claims."""
        now = int(time.time())
        body: dict[str, Any] = {
            "uuid": user.uuid,
            "jti": uuid_mod.uuid4().hex,
            "iat": now,
            "exp": now + 3600,
            "iss": self.settings.jwt_issuer,
            "aud": self.settings.jwt_audience,
            "typ": "access",
        }
        for k, v in claims.items():
            if v is None:
                body.pop(k, None)
            else:
                body[k] = v
        return jwt.encode(body, secret or self.secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(
    tmp_path: Path, aiohttp_client: ClientFactory
) -> AsyncIterator[HarnessFactory]:
    """``await make_harness(**settings_overrides, data_dir=…, store=…, bus=…,
    cache_ttl=…, setup=fn(app))``: apps on a shared tmp data dir by default."""

    async def make(
        *,
        data_dir: Path | None = None,
        store: Store | None = None,
        bus: Bus | None = None,
        cache_ttl: float = 0.0,
        setup: Callable[[web.Application], None] | None = None,
        **overrides: Any,
    ) -> Harness:
        settings = make_settings(data_dir or tmp_path / "data", **overrides)
        app = create_app(
            settings,
            store=store,
            bus=bus,
            worker=False,
            passwords=fast_passwords(),
            auth_cache_ttl=cache_ttl,
        )
        if setup is not None:
            setup(app)
        client = await aiohttp_client(app)
        return Harness(app=app, client=client, settings=settings)

    yield make


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


@pytest.fixture
async def observations_consumer(harness: Harness) -> AsyncIterator[list[Event]]:
    """A stub durable consumer (what the worker does): fetch, record, ack."""
    got: list[Event] = []
    consumer = harness.bus.durable_consumer("attacker.observation.>", durable="attribution")

    async def run() -> None:
        while True:
            for d in await consumer.fetch(500, timeout=0.2):
                # the API hands a body over as one batch: record its observations
                got.extend(batch_observations(d.event) or [d.event])
                await d.ack()

    task = asyncio.create_task(run())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await consumer.aclose()
