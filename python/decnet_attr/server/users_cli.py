"""``decnet-attr users add|list|passwd|disable``: manage accounts in the same
store ``serve`` uses (same ``--data-dir`` / ``--db-url``).

Passwords are read from stdin: one line when stdin is not a terminal (for
scripts: ``echo "$PW" | decnet-attr users add bob --role viewer``), else
prompted twice without echo. Exit codes: 0 ok, 1 error (message on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import logging
import re
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import TextIO

from decnet_attr.audit import audit
from decnet_attr.config import Settings
from decnet_attr.server.auth import ROLES, Passwords, password_problem
from decnet_attr.server.main import ensure_data_dir
from decnet_attr.store import Store, StoreError, UserRow, store_for

log = logging.getLogger(__name__)

__all__ = ["UsageError", "read_password", "users_command"]

#: The ``address`` of audit events from this command.
CLI_ADDRESS = "local-cli"
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class UsageError(Exception):
    """A user-facing error: printed, exit code 1."""


def read_password(
    stdin: TextIO | None = None,
    *,
    prompt: str = "Password: ",
    confirm: bool = True,
    username: str | None = None,
) -> str:
    """One password from stdin (a line) or, on a terminal, from getpass."""
    src = stdin if stdin is not None else sys.stdin
    if src.isatty():
        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("Repeat password: ") != first:
            raise UsageError("the passwords do not match")
        password = first
    else:
        line = src.readline()
        if not line:
            raise UsageError("no password on stdin")
        password = line.rstrip("\r\n")
    problem = password_problem(password, username=username)
    if problem is not None:
        raise UsageError(problem)
    return password


def _fmt_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


async def _open(settings: Settings) -> Store:
    store = store_for(settings)
    await store.open()
    return store


async def _user(store: Store, name: str) -> UserRow:
    user = await store.get_user_by_name(name)
    if user is None:
        raise UsageError(f"no such user: {name}")
    return user


async def _run(args: argparse.Namespace, settings: Settings, out: TextIO) -> None:
    cmd = args.users_command
    password: str | None = None
    if cmd in ("add", "passwd"):
        if not USERNAME_RE.match(args.name):
            raise UsageError("the username must be 1-64 characters of [A-Za-z0-9_.@-]")
        password = read_password(prompt=f"Password for {args.name}: ", username=args.name)
    store = await _open(settings)
    try:
        passwords = Passwords()
        now = time.time()
        if cmd == "add":
            role = getattr(args, "role", None) or "viewer"
            if role not in ROLES:
                raise UsageError(f"role must be one of {', '.join(ROLES)}")
            assert password is not None
            if await store.get_user_by_name(args.name) is not None:
                raise UsageError(f"user {args.name} already exists")
            user = UserRow(
                uuid=str(uuid_mod.uuid4()),
                username=args.name,
                password_hash=await passwords.hash(password),
                role=role,
                must_change_password=False,
                created_at=now,
                updated_at=now,
            )
            try:
                await store.create_user(user)
            except StoreError as exc:
                raise UsageError(str(exc)) from None
            audit("user_added", "ok", user=args.name, address=CLI_ADDRESS, role=role)
            out.write(f"added user {args.name} ({role})\n")
        elif cmd == "list":
            users = await store.list_users()
            rows = [["USERNAME", "ROLE", "DISABLED", "MUST_CHANGE_PASSWORD", "CREATED"]]
            for u in users:
                rows.append(
                    [
                        u.username,
                        u.role,
                        "yes" if u.disabled else "no",
                        "yes" if u.must_change_password else "no",
                        _fmt_time(u.created_at),
                    ]
                )
            out.write(_table(rows) + "\n")
        elif cmd == "passwd":
            assert password is not None
            user = await _user(store, args.name)
            # An operator-set password is a temporary one: its owner must
            # choose their own at the next login unless told otherwise.
            must_change = not getattr(args, "no_must_change", False)
            await store.update_user(
                user.uuid,
                password_hash=await passwords.hash(password),
                must_change_password=must_change,
                tokens_valid_from=now,
            )
            audit(
                "user_password_set",
                "ok",
                user=args.name,
                address=CLI_ADDRESS,
                must_change_password=must_change,
            )
            then = " (to be changed at the next login)" if must_change else ""
            out.write(f"password of {args.name} changed{then}; their existing tokens are revoked\n")
        elif cmd == "disable":
            user = await _user(store, args.name)
            await store.update_user(user.uuid, disabled=True, tokens_valid_from=now)
            audit("user_disabled", "ok", user=args.name, address=CLI_ADDRESS)
            out.write(f"user {args.name} disabled; their existing tokens are revoked\n")
        else:  # pragma: no cover - argparse restricts the choices
            raise UsageError(f"unknown users command {cmd!r}")
    finally:
        await store.close()


def users_command(
    args: argparse.Namespace,
    settings: Settings,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run ``decnet-attr users …``; 0 on success, 1 on error."""
    o = out if out is not None else sys.stdout
    e = err if err is not None else sys.stderr
    try:
        if not settings.db_url:
            ensure_data_dir(Path(settings.data_dir))
        asyncio.run(_run(args, settings, o))
    except UsageError as exc:
        e.write(f"decnet-attr users: {exc}\n")
        return 1
    except StoreError as exc:
        e.write(f"decnet-attr users: store error: {exc}\n")
        return 1
    except OSError as exc:
        e.write(f"decnet-attr users: {exc}\n")
        return 1
    except (EOFError, KeyboardInterrupt):
        e.write("decnet-attr users: aborted\n")
        return 1
    o.flush()
    return 0
