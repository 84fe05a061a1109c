"""``decnet-attr serve``: the API (and, by default, the worker) in one process."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import stat
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import TextIO

from aiohttp import web

from decnet_attr.bus import BusError
from decnet_attr.config import ConfigError, Settings
from decnet_attr.server.app import create_app
from decnet_attr.server.connections import GuardedSite, make_runner
from decnet_attr.server.keys import AUTH, STORE, WORKER
from decnet_attr.store import StoreError, UserRow

log = logging.getLogger(__name__)

__all__ = ["bootstrap_admin", "ensure_data_dir", "serve"]

#: Seconds the runner waits for in-flight requests at shutdown.
SHUTDOWN_TIMEOUT = 10.0
INITIAL_ADMIN = "admin"


def ensure_data_dir(path: Path) -> None:
    """Create the data directory (mode 0700). An existing one that group or
    others can access is refused (:class:`ConfigError`): it holds the JWT
    secret and the database, and a shared directory (``/tmp``) must not be
    made private behind the operator's back."""
    p = Path(path)
    if not p.exists():
        p.mkdir(parents=True, mode=0o700)
        os.chmod(p, 0o700)  # mkdir's mode is filtered by the umask
        return
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"the data directory {p} is accessible by group/others (mode {mode:o}); "
            f"run: chmod 700 {p}"
        )


async def bootstrap_admin(app: web.Application, out: TextIO | None = None) -> str | None:
    """On a store without users, create ``admin`` with a random password that
    must be changed at first login; print the password once to ``out``
    (stdout). Returns the password, or None when users exist already."""
    store = app[STORE]
    if await store.count_users() > 0:
        return None
    password = secrets.token_urlsafe(18)
    password_hash = await app[AUTH].passwords.hash(password)
    now = time.time()
    user = UserRow(
        uuid=str(uuid_mod.uuid4()),
        username=INITIAL_ADMIN,
        password_hash=password_hash,
        role="admin",
        must_change_password=True,
        created_at=now,
        updated_at=now,
    )
    try:
        await store.create_user(user)
    except StoreError:
        # another process sharing the store created it first
        if await store.get_user_by_name(INITIAL_ADMIN) is not None:
            return None
        raise
    stream = out if out is not None else sys.stdout
    bar = "=" * 72
    stream.write(
        f"{bar}\n"
        "decnet-attr: created the initial administrator account\n"
        f"  username: {INITIAL_ADMIN}\n"
        f"  initial admin password: {password}\n"
        "  You must change it at first login. It is shown only this once.\n"
        f"{bar}\n"
    )
    stream.flush()
    log.warning("created the initial admin account (password printed on stdout)")
    return password


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def run_server(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT); 0 on a clean shutdown."""
    ensure_data_dir(settings.data_dir)
    app = create_app(settings)
    runner = make_runner(app, settings, shutdown_timeout=SHUTDOWN_TIMEOUT)
    stop_event = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    hits = {"n": 0}

    def on_signal(signum: int) -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop_event.set()

    for sig in signals:
        try:
            loop.add_signal_handler(sig, on_signal, int(sig))
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    code = 0
    try:
        try:
            await runner.setup()
            await bootstrap_admin(app)
        except (BusError, StoreError, OSError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        site = GuardedSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            log.error("cannot listen on %s: %s", _url(settings.host, settings.port), exc)
            return 1
        log.info(
            "decnet-attr API listening on %s (store %s, bus %s, worker %s)",
            _url(settings.host, settings.port),
            app[STORE].dialect,
            settings.bus_url.split("://", 1)[0],
            "on" if app[WORKER] is not None else "off",
        )
        await stop_event.wait()
    finally:
        t0 = time.monotonic()
        await runner.cleanup()
        log.info("stopped in %.2fs", time.monotonic() - t0)
        for sig in signals:
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
    return code


def serve(settings: Settings) -> int:
    """The ``serve`` sub-command."""
    try:
        return asyncio.run(run_server(settings))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers take SIGINT
        return 130
