"""Serving the application on a TCP socket without letting anonymous clients
exhaust it.

aiohttp's own server has no cap on connections and no deadline for a request
head; the process's file limit is then the only bound, and once it is hit
``accept()`` fails in a tight loop (one ERROR line per attempt) and even
``/healthz`` stops answering. :func:`make_runner` and :class:`GuardedSite`
(what ``serve`` uses) add, in front of aiohttp's protocol (one thin wrapper
per connection; nothing is parsed twice):

- **caps**: at most ``max_connections`` open connections in total and
  ``max_connections_per_ip`` from one address. A connection over a cap gets a
  canned ``503`` and is closed at once: no parser, no task, no log line (the
  refusals are counted, and logged at most once per interval);
- **a header deadline**: a new connection must complete its first request
  head within ``http_header_timeout`` seconds (slow-header clients);
- **an idle deadline**: between requests a keep-alive connection is closed
  after ``http_keepalive_timeout`` seconds (aiohttp's keep-alive timer, which
  also bounds the head of every later request);
- **dead peers**: TCP keepalive probes and ``TCP_USER_TIMEOUT`` on every
  socket, so a peer that vanished without a FIN (a closed laptop lid, a
  dropped NAT entry) is noticed by the kernel within ``dead_peer_timeout``
  seconds, also while data is waiting for it (an SSE stream's keepalives),
  and its connection (and stream slot) is freed;
- **the file limit**: :func:`raise_nofile_limit` lifts the soft limit to the
  hard one at start, and the total cap stays below it with a reserve for the
  store, the bus and the logs; should ``accept()`` still fail for lack of
  descriptors, that is logged once per interval, not once per attempt;
- **quiet errors**: malformed HTTP from a client is one rate-limited WARNING
  line (no traceback), and the access log never shows credentials
  (:func:`decnet_attr.logs.redact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from decnet_attr.bus.base import RateLimitedLog
from decnet_attr.config import Settings
from decnet_attr.identifiers import normalise_ip
from decnet_attr.logs import redact
from decnet_attr.server.errors import SERVER_HEADER
from decnet_attr.server.keys import CONNECTIONS

__all__ = [
    "ConnectionGuard",
    "GuardedSite",
    "RedactingAccessLogger",
    "ServerLog",
    "effective_max_connections",
    "make_runner",
    "raise_nofile_limit",
    "tune_socket",
]

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log, interval=10.0)

#: Descriptors kept free for everything but client connections (store, bus,
#: logs, the event loop, files the dashboard reads at start).
FD_RESERVE: Final = 64
#: What a connection over a cap gets before it is closed.
_REFUSAL_BODY: Final = b'{"detail":"Too many connections; try again later"}'
REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Server: " + SERVER_HEADER.encode() + b"\r\n\r\n" + _REFUSAL_BODY
)
_ACCEPT_FAILED: Final = "socket.accept() out of system resource"


# ---- the process's file limit --------------------------------------------------------------
def raise_nofile_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return int(soft if soft != resource.RLIM_INFINITY else target)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        return int(soft)
    log.info("open-file limit raised from %d to %d", soft, target)
    return int(target)


def effective_max_connections(wanted: int, nofile: int) -> int:
    """``wanted``, kept :data:`FD_RESERVE` descriptors below the file limit."""
    return max(1, min(wanted, nofile - FD_RESERVE))


# ---- sockets ---------------------------------------------------------------------------------
def tune_socket(transport: asyncio.BaseTransport, dead_peer_timeout: float) -> None:
    """TCP keepalive probes and ``TCP_USER_TIMEOUT`` so that the kernel drops a
    vanished peer within ``dead_peer_timeout`` seconds, idle or not."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    total = max(3, int(dead_peer_timeout))
    interval = max(1, total // 6)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # first probe after half the budget, then 3 probes: about dead_peer_timeout
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, total - 3 * interval))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        if user_timeout is not None:  # Linux: unacknowledged data for this long
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, total * 1000)


def _peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        try:
            return normalise_ip(str(peer[0]))
        except ValueError:
            return str(peer[0])
    return "unknown"


# ---- the guard -------------------------------------------------------------------------------
@dataclass
class ConnectionGuard:
    """Connection caps and deadlines of one listening server (see the module)."""

    max_connections: int
    max_per_ip: int
    header_timeout: float
    dead_peer_timeout: float
    open: int = 0
    by_address: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    header_timeouts: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, nofile: int) -> ConnectionGuard:
        """The guard for ``settings``. Behind a proxy (``trust_forwarded_for``)
        every connection comes from the proxy, so only the total cap applies."""
        total = effective_max_connections(settings.max_connections, nofile)
        return cls(
            max_connections=total,
            max_per_ip=total if settings.trust_forwarded_for else settings.max_connections_per_ip,
            header_timeout=settings.http_header_timeout,
            dead_peer_timeout=settings.dead_peer_timeout,
        )

    def stats(self) -> dict[str, int]:
        return {
            "connections_open": self.open,
            "connections_refused": self.refused,
            "connections_header_timeouts": self.header_timeouts,
            "connections_max": self.max_connections,
        }

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False when over a cap."""
        if self.open >= self.max_connections:
            self._refuse("total", address)
            return False
        n = self.by_address.get(address, 0)
        if n >= self.max_per_ip:
            self._refuse("per-address", address)
            return False
        self.open += 1
        self.by_address[address] = n + 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        n = self.by_address.get(address, 0) - 1
        if n > 0:
            self.by_address[address] = n
        else:
            self.by_address.pop(address, None)

    def _refuse(self, which: str, address: str) -> None:
        self.refused += 1
        _rl.warning(
            f"refused-{which}",
            "connection from %s refused: %s connection cap reached (%d open, %d refused so far)",
            address,
            which,
            self.open,
            self.refused,
        )

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` around aiohttp's."""

        def make() -> asyncio.Protocol:
            return _GuardedProtocol(self, factory)

        return make


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every callback to aiohttp's protocol, after the admission
    check, and watches the first request head's deadline."""

    __slots__ = ("_address", "_factory", "_guard", "_inner", "_tail", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._address = ""
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        address = _peer_address(transport)
        guard = self._guard
        if not guard.admit(address):
            with contextlib.suppress(Exception):
                transport.write(REFUSAL)
            transport.close()
            return
        self._address = address
        self._transport = transport
        tune_socket(transport, guard.dead_peer_timeout)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(guard.header_timeout, self._head_too_slow)
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def _head_too_slow(self) -> None:
        self._timer = None
        self._guard.header_timeouts += 1
        _rl.warning(
            "header-timeout",
            "closed a connection from %s: no complete request head within %.0f s",
            self._address,
            self._guard.header_timeout,
        )
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        if self._timer is not None:
            # only the first request head is watched; its end is a blank line
            seen = self._tail + data[:16384]
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        inner, self._inner = self._inner, None
        self._transport = None
        if inner is None:
            return
        self._guard.release(self._address)
        inner.connection_lost(exc)  # type: ignore[arg-type]  # asyncio passes Exception | None


# ---- logging ---------------------------------------------------------------------------------
class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, minus the tracebacks a client can cause:
    malformed HTTP and vanished clients are one rate-limited WARNING line."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, (HttpProcessingError, ConnectionError)):
            text = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _rl.warning(
                f"client-{type(exc).__name__}",
                "bad request from a client: %s: %s",
                type(exc).__name__,
                text[:200],
            )
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kw)


class RedactingAccessLogger(AbstractAccessLogger):
    """One access log line per request, credentials taken out
    (``?ticket=…``, tokens): ``address "METHOD path?query HTTP/x.y" status
    bytes seconds "referer" "user-agent"``."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        v = request.version
        line = (
            f'{request.remote} "{request.method} {request.path_qs} HTTP/{v.major}.{v.minor}" '
            f"{response.status} {response.body_length} {time:.6f}s "
            f'"{request.headers.get("Referer", "-")}" "{request.headers.get("User-Agent", "-")}"'
        )
        self.logger.info(redact(line))


def _accept_error_handler(
    previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]:
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> object:
        message = str(context.get("message", ""))
        if message.startswith(_ACCEPT_FAILED):
            _rl.warning(
                "accept-failed",
                "accept() failed: %s (out of file descriptors? new connections wait)",
                context.get("exception"),
            )
            return None
        if previous is not None:
            return previous(loop, context)
        loop.default_exception_handler(context)
        return None

    return handle


# ---- start-up --------------------------------------------------------------------------------
def make_runner(
    app: web.Application, settings: Settings, *, shutdown_timeout: float = 10.0
) -> web.AppRunner:
    """An :class:`~aiohttp.web.AppRunner` for ``app`` with the keep-alive
    deadline, the quiet server log and the redacting access log. Raises the
    process's file limit and puts a :class:`ConnectionGuard` in
    ``app[CONNECTIONS]`` for :class:`GuardedSite`."""
    nofile = raise_nofile_limit()
    app[CONNECTIONS] = ConnectionGuard.from_settings(settings, nofile)
    return web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=settings.http_keepalive_timeout,
        access_log_class=RedactingAccessLogger,
        logger=ServerLog(),
    )


class GuardedSite(web.BaseSite):
    """Like :class:`~aiohttp.web.TCPSite`, with every connection going
    through the app's :class:`ConnectionGuard`; accept failures are logged at
    most once per interval while the site runs."""

    __slots__ = ("_guard", "_host", "_port", "_restore")

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        super().__init__(runner, backlog=128)
        self._guard = runner.app[CONNECTIONS]
        self._host = host
        self._port = port
        self._restore: Callable[[], None] | None = None

    @property
    def guard(self) -> ConnectionGuard:
        return self._guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        sockets = getattr(self._server, "sockets", None)
        if sockets:
            return int(sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            self._guard.wrap(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        previous = loop.get_exception_handler()
        loop.set_exception_handler(_accept_error_handler(previous))
        self._restore = functools.partial(loop.set_exception_handler, previous)
        guard = self._guard
        log.info(
            "accepting at most %d connections (%d per address)",
            guard.max_connections,
            guard.max_per_ip,
        )

    async def stop(self) -> None:
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()
        await super().stop()
