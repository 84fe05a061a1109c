"""Start a real, throwaway PostgreSQL server for tests.

Reusable by every test suite::

    from tests.pgserver import PgServer, pg_server, requires_postgres  # noqa: F401

    async def test_something(pg_server):          # session-scoped fixture
        dsn = await pg_server.create_database()   # a fresh, empty database
        ...
        await pg_server.drop_database(dsn)

The binaries come from the newest ``/usr/lib/postgresql/<version>/bin``.
PostgreSQL refuses to run as root, so when the tests run as root ``initdb``
and ``pg_ctl`` run as the ``postgres`` user (``runuser``) on a temporary
directory handed to that user. The cluster uses trust authentication,
listens on 127.0.0.1 on a free port, keeps its unix socket inside the
temporary directory and runs with ``fsync=off`` (test data only).
:meth:`PgServer.stop` then :meth:`PgServer.start` restarts it on the same
port and data directory. :meth:`PgServer.cleanup` (also run at interpreter
exit) stops it and deletes the directory.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

__all__ = [
    "PgServer",
    "free_port",
    "pg_bin_dir",
    "pg_server",
    "requires_postgres",
]

_PG_ROOT = Path("/usr/lib/postgresql")
_START_TIMEOUT = 30
_RUN_AS = "postgres"


def pg_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<N>/bin`` with ``initdb`` and ``pg_ctl``."""
    if not _PG_ROOT.is_dir():
        return None
    found: list[tuple[tuple[int, ...], Path]] = []
    for child in _PG_ROOT.iterdir():
        bin_dir = child / "bin"
        if not ((bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()):
            continue
        nums = tuple(int(x) for x in re.findall(r"\d+", child.name)) or (0,)
        found.append((nums, bin_dir))
    if not found:
        return None
    found.sort()
    return found[-1][1]


requires_postgres = pytest.mark.skipif(pg_bin_dir() is None, reason="postgresql not installed")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on *host* a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class PgServer:
    """A PostgreSQL cluster in a temporary directory, on 127.0.0.1:<free port>."""

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, *, port: int | None = None, start_timeout: int = _START_TIMEOUT) -> None:
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise RuntimeError("postgresql not installed")
        self.bin_dir = bin_dir
        digits = re.findall(r"\d+", bin_dir.parent.name)
        self.major = int(digits[0]) if digits else 0
        self.port = port if port is not None else free_port(self.host)
        self.start_timeout = start_timeout
        self.as_root = _is_root()
        self.base_dir = Path(tempfile.mkdtemp(prefix="decnet-attr-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self.socket_dir.mkdir()
        if self.as_root:
            shutil.chown(self.base_dir, _RUN_AS, _RUN_AS)
            shutil.chown(self.socket_dir, _RUN_AS, _RUN_AS)
        self._initialised = False
        self._running = False
        self._cleaned = False
        atexit.register(self.cleanup)

    # -- helpers ------------------------------------------------------------------------------
    def _cmd(self, name: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / name), *args]
        if self.as_root:
            runuser = shutil.which("runuser")
            if runuser:
                return [runuser, "-u", _RUN_AS, "--", *cmd]
            return ["su", _RUN_AS, "-s", "/bin/sh", "-c", subprocess.list2cmdline(cmd)]
        return cmd

    def _run(self, name: str, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(
            self._cmd(name, *args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=str(self.base_dir),
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{name} failed ({proc.returncode}):\n"
                f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}\n"
                f"{self.log_text()}"
            )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- properties ---------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._running

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> PgServer:
        """Start (or restart, same data directory and port); block until ready."""
        if self._running:
            return self
        if not self._initialised:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            self._initialised = True
        opts = " ".join(
            [
                f"-h {self.host}",
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
                "-c log_min_messages=warning",
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(self.start_timeout),
            "-o",
            opts,
            "start",
            timeout=self.start_timeout + 10,
        )
        self._running = True
        self._wait_tcp()
        return self

    def _wait_tcp(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not listening:\n{self.log_text()}") from None
                time.sleep(0.05)

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, clean shutdown)."""
        if not self._running:
            return
        self._running = False
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self) -> PgServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory (idempotent)."""
        if self._cleaned:
            return
        self._cleaned = True
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.cleanup)

    # -- databases ----------------------------------------------------------------------------
    async def create_database(self, name: str | None = None) -> str:
        """Create a fresh database (``t_<random>`` by default); returns its DSN."""
        import asyncpg

        name = name or f"t_{secrets.token_hex(6)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        conn = await asyncpg.connect(self.dsn)
        try:
            # (PostgreSQL >= 15's default WAL_LOG strategy: no checkpoint per database)
            await conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        finally:
            await conn.close()
        return self.dsn_for(name)

    async def drop_database(self, dsn_or_name: str) -> None:
        import asyncpg

        name = dsn_or_name.rsplit("/", 1)[-1]
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PgServer {self.dsn} {state} dir={self.base_dir}>"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole session (skips when not installed)."""
    if pg_bin_dir() is None:
        pytest.skip("postgresql not installed")
    srv = PgServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()
