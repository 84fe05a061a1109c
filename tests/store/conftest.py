"""Fixtures for the store contract tests: every test runs on SQLite (through
the Rust writer connection, and again through aiosqlite) and on a real
PostgreSQL (a fresh database per test on one session-wide server)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.store import ObservationRow, StateRow, Store, open_store
from decnet_attr.store.postgres import PostgresStore
from decnet_attr.store.sqlite import SqliteStore
from tests.pgserver import PgServer, pg_server  # noqa: F401  (session fixture)

BACKENDS = ["sqlite", "sqlite-aiosqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A location (not yet migrated) for the backend under test."""
    if backend.startswith("sqlite"):
        yield f"sqlite://{tmp_path / 'attr.db'}"
        return
    srv: PgServer = request.getfixturevalue("pg_server")
    dsn = await srv.create_database()
    try:
        yield dsn
    finally:
        await srv.drop_database(dsn)


def _open_store(url: str, backend: str) -> Store:
    st = open_store(url)
    if backend == "sqlite-aiosqlite":
        assert isinstance(st, SqliteStore)
        st.native_writer = False
    return st


@pytest.fixture
async def store(store_url: str, backend: str) -> AsyncIterator[Store]:
    st = _open_store(store_url, backend)
    await st.open()
    try:
        yield st
    finally:
        await st.close()


@pytest.fixture
async def open_another(
    store_url: str, backend: str
) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Open more stores on the same database (other 'processes')."""
    opened: list[Store] = []

    async def _open() -> Store:
        st = _open_store(store_url, backend)
        await st.open()
        opened.append(st)
        return st

    try:
        yield _open
    finally:
        for st in opened:
            await st.close()


# ---- raw access for assertions (bypasses the store API) ----------------------------------


def _pg_sql(sql: str) -> str:
    n = 0

    def repl(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return re.sub(r"\?", repl, sql)


async def fetch(store: Store, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run a read query (``?`` placeholders) on the store's database."""
    if isinstance(store, SqliteStore):
        rows = await store._reader().execute_fetchall(sql, args)
        return [tuple(r) for r in rows]
    assert isinstance(store, PostgresStore)
    async with store._conn() as conn:
        rows = await conn.fetch(_pg_sql(sql), *args)
    return [tuple(r) for r in rows]


async def execute(store: Store, sql: str, *args: Any) -> None:
    """Run a write statement (``?`` placeholders) outside the store API."""
    if isinstance(store, SqliteStore):
        async with store._write() as conn:
            await conn.execute(sql, args)
        return
    assert isinstance(store, PostgresStore)
    async with store._conn() as conn:
        await conn.execute(_pg_sql(sql), *args)


async def scalar(store: Store, sql: str, *args: Any) -> Any:
    rows = await fetch(store, sql, *args)
    return rows[0][0] if rows else None


# ---- row builders --------------------------------------------------------------------------


def obs(
    id: str,
    attacker: str,
    primitive: str = "motor.input_modality",
    value: Any = "keyboard",
    ts: float = 1000.0,
    *,
    evidence: str | None = None,
    **kw: Any,
) -> ObservationRow:
    return ObservationRow(
        id=id,
        attacker_uuid=attacker,
        primitive=primitive,
        value_json=json.dumps(value),
        ts=ts,
        evidence_ref=evidence if evidence is not None else f"ev-{id}",
        **kw,
    )


def state(
    identity: str,
    primitive: str,
    st: str = "stable",
    *,
    value: Any = "keyboard",
    version: int = 1,
    **kw: Any,
) -> StateRow:
    fields: dict[str, Any] = {
        "confidence": 0.9,
        "observation_count": 3,
        "last_change_ts": 100.0,
        "last_observation_ts": 200.0,
        "updated_at": 300.0,
    }
    fields.update(kw)
    return StateRow(
        identity_uuid=identity,
        primitive=primitive,
        current_value_json=json.dumps(value),
        state=st,
        version=version,
        **fields,
    )
