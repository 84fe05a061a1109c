"""Start a real ``nats-server`` (with JetStream) for tests.

Reusable by every test suite::

    from tests.natsserver import NatsServer, requires_nats

    @requires_nats
    def test_something():
        with NatsServer() as srv:
            ...  # connect to srv.url

The server listens on 127.0.0.1 only, on a free port chosen at construction,
and stores JetStream data in a private temporary directory. :meth:`NatsServer.stop`
followed by :meth:`NatsServer.start` restarts it on the *same* port and store
directory, so persisted streams and consumers survive the restart. Leaving the
context (sync or async) kills the process and removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

__all__ = ["NatsServer", "free_port", "nats_server_path", "requires_nats"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class _PortInUse(Exception):
    pass


def nats_server_path() -> str | None:
    """Absolute path of the ``nats-server`` binary, or ``None`` if not installed."""
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in (
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/sbin/nats-server",
    ):
        if Path(candidate).is_file():
            return candidate
    return None


requires_nats = pytest.mark.skipif(nats_server_path() is None, reason="nats-server not installed")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on *host* a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """A ``nats-server -js`` subprocess bound to 127.0.0.1 on a free port."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: str | None = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = _START_TIMEOUT,
    ) -> None:
        binary = nats_server_path()
        if binary is None:
            raise RuntimeError("nats-server not installed")
        self.binary = binary
        self._auto_port = port is None
        self.port = port if port is not None else free_port(self.host)
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="decnet-attr-nats-")
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    # -- properties -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> str:
        return str(Path(self.store_dir) / "nats-server.log")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """The server's combined stdout/stderr so far (for failure messages)."""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> NatsServer:
        """Start (or restart) the server; block until it accepts connections."""
        if self.running:
            return self
        # A free port probed earlier may be grabbed by someone else before the
        # server binds it: on the first start with an auto-chosen port, retry.
        attempts = 3 if (self._auto_port and self.starts == 0) else 1
        for attempt in range(attempts):
            try:
                return self._start_once()
            except _PortInUse:
                if attempt == attempts - 1:
                    raise RuntimeError(f"port {self.port} in use:\n{self.log_text()}") from None
                self.port = free_port(self.host)
        return self

    def _start_once(self) -> NatsServer:
        self._close_log()
        self._log = open(self.log_path, "ab")
        self._log_offset = self._log.tell()
        cmd = [
            self.binary,
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            self.store_dir,
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(kill=True)
            raise
        self.starts += 1
        return self

    def _current_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            proc = self._proc
            log = self._current_log()
            if proc is None or proc.poll() is not None:
                if "address already in use" in log.lower():
                    raise _PortInUse
                raise RuntimeError(f"nats-server exited during start-up:\n{log}")
            # "Server is ready" is logged by *our* process once it listens (a bare
            # TCP probe could reach another process that owns the port).
            if "Server is ready" in log:
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                        s.settimeout(1.0)
                        banner = s.recv(4096)
                    if banner.startswith(b"INFO ") and b'"jetstream":true' in banner:
                        return
                    last_err = RuntimeError(f"unexpected banner {banner[:200]!r}")
                except OSError as exc:
                    last_err = exc
            time.sleep(0.02)
        raise RuntimeError(
            f"nats-server not ready on {self.url} after {self.start_timeout}s "
            f"({last_err}):\n{self._current_log()}"
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, graceful JetStream flush; SIGKILL if *kill* or stuck)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                if kill:
                    proc.kill()
                else:
                    proc.terminate()
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=_STOP_TIMEOUT)
            else:
                proc.wait()
        self._close_log()

    def restart(self) -> NatsServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and delete the store directory if we created it."""
        self.stop(kill=True)
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()

    # -- async-friendly variants --------------------------------------------------------------
    async def astart(self) -> NatsServer:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.start)
        return self

    async def astop(self, *, kill: bool = False) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.stop(kill=kill))

    # -- context managers ---------------------------------------------------------------------
    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> NatsServer:
        return await self.astart()

    async def __aexit__(self, *exc_info: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.cleanup)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.url} {state} store={self.store_dir}>"
