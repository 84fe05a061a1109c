"""Security review items 1, 7 and 10 against a real listening server
(``make_runner`` + ``GuardedSite``, as ``serve`` runs them) on 127.0.0.1:
connection caps with a cheap refusal, header and keep-alive deadlines, TCP
dead-peer detection, the file limit, quiet client errors and a redacted
access log. Every test holds a bounded number of sockets for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from decnet_attr.server import connections
from decnet_attr.server.app import create_app
from decnet_attr.server.connections import (
    FD_RESERVE,
    GuardedSite,
    effective_max_connections,
    make_runner,
    raise_nofile_limit,
)
from decnet_attr.server.keys import COUNTERS
from tests.server.conftest import fast_passwords, make_settings

ATTACKER = "127.0.0.2"  # the hostile client's source address (the prober uses 127.0.0.1)


@dataclass
class Live:
    app: web.Application
    runner: web.AppRunner
    site: GuardedSite

    @property
    def port(self) -> int:
        return self.site.port


Start = Callable[..., Awaitable[Live]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(setup: Callable[[web.Application], None] | None = None, **kw: Any) -> Live:
        settings = make_settings(tmp_path / "data", **kw)
        app = create_app(settings, worker=False, passwords=fast_passwords())
        if setup is not None:
            setup(app)
        runner = make_runner(app, settings)
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0)
        await site.start()
        return Live(app, runner, site)

    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture(autouse=True)
def fresh_rate_limits() -> None:
    """The rate-limited log lines of earlier tests must not hide this test's."""
    connections._rl._state.clear()


async def connect(port: int, source: str = ATTACKER) -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, bytes, float]:
    """One ``Connection: close`` request; (status, raw response, seconds)."""
    t0 = time.perf_counter()
    reader, writer = await connect(port, source)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    elapsed = time.perf_counter() - t0
    writer.close()
    status = int(raw.split(b" ", 2)[1]) if raw else 0
    return status, raw, elapsed


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), timeout)
            if not chunk:
                return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


# ---- item 1: connection exhaustion ---------------------------------------------------------
async def test_slow_and_silent_clients_cannot_starve_the_server(serve: Start) -> None:
    live = await serve(max_connections_per_ip=16, http_header_timeout=1.0)
    port = live.port
    assert (await get(port, "/healthz"))[0] == 200  # warm-up
    held = [await connect(port) for _ in range(40)]
    await asyncio.sleep(0.2)
    guard = live.site.guard
    assert guard.stats()["connections_open"] == 16
    assert guard.stats()["connections_refused"] == 24

    # the refused ones got a canned 503 and were closed at once
    async def first_bytes(reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await asyncio.wait_for(reader.read(12), 0.1)
        except TimeoutError:
            return None  # nothing: admitted, waiting for a request

    heads = await asyncio.gather(*(first_bytes(r) for r, _w in held))
    assert heads.count(b"HTTP/1.1 503") == 24
    admitted = [conn for conn, head in zip(held, heads) if head is None]
    assert len(admitted) == 16
    # half of the admitted ones trickle a request head that never ends (slowloris)
    for _reader, writer in admitted[::2]:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
    await asyncio.sleep(0.2)
    for _reader, writer in admitted[::2]:
        writer.write(b"X-Slow: 1\r\n")

    # the server answers another client at once
    status, _raw, elapsed = await get(port, "/healthz")
    assert status == 200
    assert elapsed < 0.1, elapsed

    # the admitted ones are cut at the header deadline, slow or silent
    t0 = time.monotonic()
    assert all([await closed_by_server(r, 3.0) for r, _w in admitted])
    assert time.monotonic() - t0 < 2.5
    await asyncio.sleep(0.05)
    assert guard.stats()["connections_open"] == 0
    assert guard.stats()["connections_header_timeouts"] == 16
    for _r, w in held:
        w.close()


async def test_total_cap(serve: Start) -> None:
    live = await serve(max_connections=5, max_connections_per_ip=100)
    held = [await connect(live.port) for _ in range(5)]
    await asyncio.sleep(0.05)
    status, raw, _ = await get(live.port, "/healthz", source="127.0.0.3")
    assert status == 503
    assert b"Retry-After: 1" in raw and b"Too many connections" in raw
    for _r, w in held:
        w.close()
    await asyncio.sleep(0.1)
    assert (await get(live.port, "/healthz", source="127.0.0.3"))[0] == 200
    _status, raw, _ = await get(live.port, "/metrics", source="127.0.0.3")
    assert b"decnet_attr_http_connections_refused_total 1.0" in raw
    assert b"decnet_attr_http_connections_max 5.0" in raw


async def test_idle_keep_alive_connections_are_closed(serve: Start) -> None:
    live = await serve(http_keepalive_timeout=0.5)
    reader, writer = await connect(live.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    assert await closed_by_server(reader, 3.0)
    assert 0.3 < time.monotonic() - t0 < 2.0
    writer.close()


async def test_sockets_detect_vanished_peers(serve: Start) -> None:
    """Keepalive probes and TCP_USER_TIMEOUT: a peer gone without a FIN is
    dropped by the kernel within ``dead_peer_timeout`` seconds."""

    async def sockopts(request: web.Request) -> web.Response:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        opts = {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
        return web.json_response(opts)

    live = await serve(
        setup=lambda app: app.router.add_get("/t/sockopts", sockopts), dead_peer_timeout=30.0
    )
    status, raw, _ = await get(live.port, "/t/sockopts")
    assert status == 200
    import json

    opts = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert opts["keepalive"] == 1
    assert opts["user_timeout"] == 30_000
    assert opts["idle"] + opts["interval"] * opts["count"] <= 30


def test_the_soft_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        got = raise_nofile_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
        assert got == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, got), hard))
    # the total cap stays below the limit
    assert effective_max_connections(4096, 256) == 256 - FD_RESERVE
    assert effective_max_connections(100, 1 << 20) == 100


def test_accept_failures_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        handle = connections._accept_error_handler(None)
        context = {
            "message": "socket.accept() out of system resource",
            "exception": OSError(24, "Too many open files"),
        }
        with caplog.at_level(logging.WARNING):
            for _ in range(500):
                handle(loop, dict(context))
        lines = [r for r in caplog.records if "accept() failed" in r.getMessage()]
        assert len(lines) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        loop.close()


# ---- item 7: client errors are quiet --------------------------------------------------------
async def test_malformed_http_is_one_warning_without_traceback(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    live = await serve()
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        for i in range(10):
            reader, writer = await connect(live.port)
            junk = b"Broken header line " + bytes([65 + i])
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n" + junk + b"\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
            assert raw[:16] in (b"HTTP/1.0 400 Bad", b"HTTP/1.1 400 Bad"), raw[:80]
            writer.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None
    assert "\n" not in warnings[0].getMessage()


async def test_client_gone_mid_body_is_not_a_500(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    live = await serve()
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            _reader, writer = await connect(live.port)
            writer.write(
                b"POST /api/v1/auth/login HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"username": "al'
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
        await asyncio.sleep(0.3)
    assert live.app[COUNTERS]["http_5xx_total"] == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not [r for r in caplog.records if r.exc_info]


# ---- item 10: credentials stay out of the access log ---------------------------------------
async def test_access_log_redacts_tickets_and_tokens(
    serve: Start, caplog: pytest.LogCaptureFixture
) -> None:
    live = await serve()
    ticket = "Tk" + "x" * 40
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJ1dWlkIjoiYWxpY2UifQ.c2lnbmF0dXJlc2lnbmF0dXJl"
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await get(live.port, f"/api/v1/attackers/a1/events?ticket={ticket}&last_event_id=3")
        await get(live.port, f"/api/v1/attackers/a1/events?ticket={jwt_like}")
        await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) == 2
    assert all("ticket=[redacted]" in line for line in lines), lines
    assert not any(ticket in line or jwt_like in line or "eyJ" in line for line in lines)
    assert "last_event_id=3" in lines[0]


def test_behind_a_proxy_only_the_total_cap_applies(tmp_path: Path) -> None:
    from decnet_attr.server.connections import ConnectionGuard

    direct = ConnectionGuard.from_settings(make_settings(tmp_path, max_connections=500), 1 << 16)
    assert (direct.max_connections, direct.max_per_ip) == (500, 64)
    proxied = ConnectionGuard.from_settings(
        make_settings(tmp_path, max_connections=500, trust_forwarded_for=True), 1 << 16
    )
    assert (proxied.max_connections, proxied.max_per_ip) == (500, 500)
