"""Helpers for the SSE relay tests: a minimal app around :class:`SseHub` with
fake authentication, store seeding, and two SSE readers (aiohttp's client,
and a raw socket client that sees the HTTP bytes and can stop reading)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from decnet_attr.bus import get_bus
from decnet_attr.bus.memory import InProcessBus
from decnet_attr.config import Settings
from decnet_attr.server.sse import SseHub
from decnet_attr.store import ObservationRow, StateRow, Store, open_store

KEEPALIVE = b": keepalive\n\n"
RETRY = b"retry: 3000\n\n"

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


# ---- fake auth ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FakePrincipal:
    user_uuid: str
    username: str
    role: str
    jti: str | None
    exp: float | None
    via_ticket: bool = False


def _json_error(cls: type[web.HTTPException], detail: str) -> web.HTTPException:
    return cls(text=orjson.dumps({"detail": detail}).decode(), content_type="application/json")


@dataclass
class FakeAuth:
    """``X-Test-User: alice`` (or ``?ticket=alice``) authenticates as ``alice``;
    ``X-Test-Role`` (default viewer), ``X-Test-Jti``, ``X-Test-Exp`` shape the
    principal. ``invalid`` users fail ``still_valid``."""

    invalid: set[str] = field(default_factory=set)
    checks: int = 0

    async def authenticate(self, request: web.Request) -> FakePrincipal:
        user = request.headers.get("X-Test-User") or request.query.get("ticket")
        if not user:
            raise _json_error(web.HTTPUnauthorized, "Not authenticated")
        role = request.headers.get("X-Test-Role", "viewer")
        if role not in ("viewer", "admin"):
            raise _json_error(web.HTTPForbidden, "Insufficient permissions")
        exp_text = request.headers.get("X-Test-Exp")
        return FakePrincipal(
            user_uuid=f"u-{user}",
            username=user,
            role=role,
            jti=request.headers.get("X-Test-Jti", f"jti-{user}"),
            exp=float(exp_text) if exp_text else None,
            via_ticket="ticket" in request.query,
        )

    async def still_valid(self, app: web.Application, principal: Any, now: float) -> bool:
        self.checks += 1
        return principal.user_uuid not in {f"u-{u}" for u in self.invalid}


# ---- the environment ---------------------------------------------------------------------
@dataclass
class SseEnv:
    settings: Settings
    store: Store
    bus: InProcessBus
    hub: SseHub
    auth: FakeAuth
    client: TestClient[Any, Any]

    @property
    def epoch(self) -> str:
        return self.hub.epoch

    def eid(self, seq: int) -> str:
        return f"{self.hub.epoch}-{seq}"

    async def open(
        self, attacker: str, user: str = "alice", headers: dict[str, str] | None = None, **kw: Any
    ) -> ClientResponse:
        h = {"X-Test-User": user} if user else {}
        h.update(headers or {})
        return await self.client.get(f"/api/v1/attackers/{attacker}/events", headers=h, **kw)

    async def open_identities(
        self, user: str = "alice", headers: dict[str, str] | None = None, **kw: Any
    ) -> ClientResponse:
        h = {"X-Test-User": user} if user else {}
        h.update(headers or {})
        return await self.client.get("/api/v1/identities/events", headers=h, **kw)

    async def open_overview(
        self, user: str = "alice", headers: dict[str, str] | None = None, **kw: Any
    ) -> ClientResponse:
        h = {"X-Test-User": user} if user else {}
        h.update(headers or {})
        return await self.client.get("/api/v1/overview/events", headers=h, **kw)

    async def publish(
        self, topic: str, payload: dict[str, Any], event_type: str = "", ts: float = 1.7e9
    ) -> None:
        """Publish and wait until the relay has routed it (events of different
        subscription patterns are not ordered among themselves)."""
        before = self.hub.stats()["events_in"]
        await self.hub.bus.publish(topic, payload, event_type=event_type, ts=ts)
        await wait_for(lambda: self.hub.stats()["events_in"] > before)

    async def wait(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        await wait_for(cond, timeout)


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def build_app(
    settings: Settings, store: Store, bus: InProcessBus, auth: FakeAuth, **hub_kw: Any
) -> tuple[web.Application, SseHub]:
    hub = SseHub(
        settings=settings,
        bus=bus,
        store=store,
        authenticate=auth.authenticate,
        still_valid=auth.still_valid,
        **hub_kw,
    )
    app = web.Application()
    app.router.add_get("/api/v1/attackers/{uuid}/events", hub.handle)
    app.router.add_get("/api/v1/identities/events", hub.handle_identities)
    app.router.add_get("/api/v1/overview/events", hub.handle_overview)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await bus.connect()
        await hub.start(app)
        try:
            yield
        finally:
            await hub.stop()
            await bus.close()
            await store.close()

    async def on_shutdown(app: web.Application) -> None:
        await hub.stop()

    app.cleanup_ctx.append(ctx)
    app.on_shutdown.append(on_shutdown)
    return app, hub


async def make_env(
    aiohttp_client: AiohttpClient, tmp_path: Path, hub_kw: dict[str, Any] | None = None, **kw: Any
) -> SseEnv:
    defaults: dict[str, Any] = {"sse_keepalive": 0.2}
    defaults.update(kw)
    settings = Settings(**defaults)
    store = open_store(f"sqlite://{tmp_path / 'attr.db'}")
    bus = get_bus("memory://")
    assert isinstance(bus, InProcessBus)
    auth = FakeAuth()
    app, hub = build_app(settings, store, bus, auth, **(hub_kw or {}))
    client = await aiohttp_client(app)
    return SseEnv(settings, store, bus, hub, auth, client)


# ---- seeding -----------------------------------------------------------------------------
async def seed_attacker(
    store: Store,
    uuid: str,
    *,
    identity: bool = False,
    ip: str | None = None,
    observations: Sequence[tuple[str, Any, float]] = (),
    states: Sequence[tuple[str, Any, str]] = (),
) -> str | None:
    """Create an attacker (with a stub identity if asked), observations
    ``(primitive, value, ts)`` and state rows ``(primitive, value, state)``.
    Returns the identity uuid."""
    ident: str | None = None
    async with store.transaction() as tx:
        await tx.ensure_attackers([(uuid, ip, 1.7e9)])
        if identity or states:
            mapping, _formed = await tx.ensure_identities([uuid], 1.7e9)
            ident = mapping[uuid]
        rows = [
            ObservationRow(
                id=f"{uuid}-{i}",
                attacker_uuid=uuid,
                primitive=p,
                value_json=orjson.dumps(v).decode(),
                ts=ts,
                evidence_ref=f"ev-{uuid}-{i}",
                confidence=0.9,
                source="sensor-1",
                identity_uuid=ident,
            )
            for i, (p, v, ts) in enumerate(observations)
        ]
        if rows:
            await tx.insert_observations(rows)
        if states:
            assert ident is not None
            await tx.upsert_states(
                [
                    StateRow(
                        identity_uuid=ident,
                        primitive=p,
                        current_value_json=orjson.dumps(v).decode(),
                        state=st,
                        confidence=0.75,
                        observation_count=4,
                        last_change_ts=1.7e9 + 1,
                        last_observation_ts=1.7e9 + 2,
                    )
                    for p, v, st in states
                ]
            )
    return ident


# ---- frames ------------------------------------------------------------------------------
def live_frame(name: str, eid: str, topic: str, etype: str, ts: float, payload: Any) -> bytes:
    data = orjson.dumps({"topic": topic, "type": etype, "ts": ts, "payload": payload})
    return b"event: %b\nid: %b\ndata: %b\n\n" % (name.encode(), eid.encode(), data)


def snapshot_frame(eid: str, body: dict[str, Any]) -> bytes:
    return b"event: snapshot\nid: %b\ndata: %b\n\n" % (eid.encode(), orjson.dumps(body))


def parse(frame: bytes) -> dict[str, Any]:
    """``{"event", "id", "data"}`` of one frame (data JSON-decoded)."""
    out: dict[str, Any] = {}
    for line in frame.decode().split("\n"):
        if not line or line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        out[key] = orjson.loads(value) if key == "data" else value
    return out


class Reader:
    """Frames (``...\\n\\n``) from an aiohttp client response."""

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp

    async def frame(self, timeout: float = 5.0) -> bytes:
        data = await asyncio.wait_for(self.resp.content.readuntil(b"\n\n"), timeout)
        if not data.endswith(b"\n\n"):
            raise EOFError(data)
        return data

    async def frames(self, n: int, timeout: float = 5.0) -> list[bytes]:
        return [await self.frame(timeout) for _ in range(n)]

    async def event(self, timeout: float = 5.0) -> bytes:
        """The next frame that is not a keepalive comment."""
        while True:
            f = await self.frame(timeout)
            if f != KEEPALIVE:
                return f

    async def eof(self, timeout: float = 5.0) -> bytes:
        """Read to the end of the response (skipping keepalives); the rest."""
        rest = await asyncio.wait_for(self.resp.content.read(), timeout)
        return rest.replace(KEEPALIVE, b"")


class RawClient:
    """An HTTP/1.x SSE client on a raw socket: sees the exact bytes, can stop
    reading (small receive buffer) to play a slow consumer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.body = b""
        self.head = b""
        self.chunked = True
        self.eof = False

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        headers: dict[str, str],
        *,
        rcvbuf: int | None = None,
        version: str = "1.1",
    ) -> RawClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        lines = [f"GET {path} HTTP/{version}", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        return cls(sock)

    async def _recv(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), timeout)
        if not data:
            self.eof = True
            raise EOFError("connection closed")
        self.buf += data

    async def read_head(self, timeout: float = 5.0) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            await self._recv(timeout)
        self.head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.chunked = b"transfer-encoding: chunked" in self.head.lower()
        return self.head

    def _dechunk(self) -> None:
        if not self.head:
            return
        if not self.chunked:
            self.body += self.buf
            self.buf = b""
            return
        while True:
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            size = int(line, 16)
            if len(rest) < size + 2:
                return
            assert rest[size : size + 2] == b"\r\n", rest[: size + 2]
            self.body += rest[:size]
            self.buf = rest[size + 2 :]
            if size == 0:
                self.eof = True
                return

    async def frame(self, timeout: float = 5.0) -> bytes:
        while True:
            self._dechunk()
            if b"\n\n" in self.body:
                frame, _, self.body = self.body.partition(b"\n\n")
                return frame + b"\n\n"
            if self.eof:
                raise EOFError(self.body)
            await self._recv(timeout)

    async def event(self, timeout: float = 5.0) -> bytes:
        while True:
            f = await self.frame(timeout)
            if f != KEEPALIVE:
                return f

    async def read_all(self, timeout: float = 5.0) -> None:
        """Drain the socket until nothing arrives for a moment (or EOF)."""
        try:
            if not self.head:
                await self.read_head(timeout)
            while not self.eof:
                await self._recv(timeout)
                self._dechunk()
        except (TimeoutError, EOFError, ConnectionError):
            pass
        self._dechunk()

    def close(self) -> None:
        self.sock.close()
