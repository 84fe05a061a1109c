"""The embedded store: one SQLite file in WAL mode.

Two connections: a *writer* (every write, every :meth:`transaction`, under an
asyncio lock so one coroutine at a time owns it) and a *reader* for the API's
reads (WAL readers never block the writer). The reader is aiosqlite; the
writer of a database file is :class:`NativeConnection`, over the Rust
``SqliteWriter``: a thread of its own that runs the calls in order and never
takes the GIL (aiosqlite's driver takes the GIL back for every row of an
``executemany``, and any Python thread needs it around every call, so a
writer thread mostly waits for the event loop). Transactions are
``BEGIN IMMEDIATE`` so the database write lock is taken up front and
several processes on one file serialise instead of deadlocking;
``busy_timeout`` (30 s) makes them wait for each other.

Writes whose result a batch does not need (the observation rows, the state
values, the windows, the attackers) are *deferred*: queued on the writer
thread while the event loop builds the rest of the transaction, instead of
awaited one by one. Calls still run in order; a failed deferred write fails
its transaction, the ``COMMIT`` included (:meth:`NativeConnection.defer`).
The worker's batch transactions are pipelined: the next one is built while
the writer commits the one before (:meth:`SqliteStore.transaction`); its reads
of committed rows go to a third connection, native too.

Batch writes use ``executemany`` with one prepared statement; id lists are
passed as one JSON array parameter and expanded with ``json_each`` so the
SQL text (and so the prepared statement) does not depend on the list size.

The queries both backends share are in :mod:`decnet_attr.store.sql`; this
module holds the SQLite dialect (driver calls, error codes), the native
writer connection, the lifecycle and the batch writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sqlite3
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from os import PathLike
from typing import Any

import aiosqlite
import orjson

from decnet_attr._core import (
    STATE_VALUE_COLUMNS,
    Dedupe,
    Engine,
    SqliteWriter,
    StateWrite,
    ValidatedBatch,
)
from decnet_attr.identifiers import ip_key
from decnet_attr.store.dialect import Dialect, driver_errors, guard
from decnet_attr.store.errors import (
    ConnectionClosed,
    StoreError,
    StoreIntegrity,
    StoreUnavailable,
)
from decnet_attr.store.files import private_db_files
from decnet_attr.store.models import (
    AttackerRow,
    DeadLetter,
    Key,
    ObservationRow,
    StateRow,
    TicketRow,
    truncate_payload,
)
from decnet_attr.store.queries import ALL_OBSERVATIONS_SQL
from decnet_attr.store.rows import (
    ATTACKER_COLS,
    OBS_INSERT_COLS,
    STATE_COLS,
    TICKET_COLS,
    attacker_from_row,
    dedupe_states,
    merge_attacker_items,
    observation_from_row,
    run_spans,
    state_from_row,
    state_params,
    ticket_from_row,
)
from decnet_attr.store.schema import migrate_sqlite
from decnet_attr.store.sql import (
    MERGED_RUN_SQL,
    PRUNE_MARKS_SQL,
    PRUNE_RUNS_SQL,
    SqlStore,
    SqlTx,
)

log = logging.getLogger(__name__)

SQLITE_VERSION: tuple[int, ...] = sqlite3.sqlite_version_info
#: Upserts (3.24), window functions (3.25), ``NULLS LAST``-free portable SQL.
MIN_SQLITE_VERSION = (3, 25, 0)
#: ``DELETE … RETURNING`` needs 3.35; older libraries take a select-then-delete
#: path under the write lock instead.
HAS_RETURNING = SQLITE_VERSION >= (3, 35, 0)

#: Result codes (primary families) that mean "the database cannot be used
#: right now" rather than "this statement is wrong".
_UNAVAILABLE_CODES = frozenset(
    {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_NOTADB"}
)
_LOCK_CODES = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})


def _code_family(exc: BaseException) -> str:
    """The primary result code of a SQLite error (``SQLITE_IOERR_WRITE`` ->
    ``SQLITE_IOERR``), from the name the driver attaches to it."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    parts = name.split("_", 2)
    return "_".join(parts[:2]) if len(parts) >= 2 else name


def _connection_closed(conn: Any) -> bool:
    """``conn`` cannot run statements any more (closed, or never opened)."""
    if conn is None:
        return True
    if isinstance(conn, NativeConnection):
        return conn.closed
    # aiosqlite's own test before it refuses a call with a ValueError
    return not getattr(conn, "_running", False) or getattr(conn, "_connection", None) is None


class SqliteDialect(Dialect):
    name = "sqlite"
    tokens = {
        "IN_LIST(?)": "IN (SELECT value FROM json_each(?))",
        "NOT_MERGED": "merged = 0",
        "IS_MERGED": "merged = 1",
        "GREATEST(": "max(",
        " BYTE_ORDER": "",
        "UNINDEXED ": "+",
    }

    def list_param(self, values: Sequence[Any]) -> Any:
        return _json_list(list(values))

    def flag(self, value: Any) -> Any:
        return int(bool(value))

    def in_network(self, add: Callable[[Any], str], net: tuple[str, str, str]) -> str:
        # ip_key() is registered on the reader connection (identifiers.ip_key)
        return f"ip_key(a.ip) BETWEEN {add(net[1])} AND {add(net[2])}"

    async def rows(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await conn.execute_fetchall(sql, params))

    async def execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        await conn.execute(sql, params)

    def is_integrity(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def map_error(self, exc: BaseException, conn: Any = None) -> StoreError | None:
        """By type and SQLite result code; a plain ``ValueError`` is the
        driver refusing a call on a closed connection only when ``conn`` is
        closed (``None``: no connection)."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, ConnectionClosed) or (
            type(exc) is ValueError and _connection_closed(conn)
        ):
            return StoreUnavailable("sqlite connection is closed")
        if isinstance(exc, sqlite3.IntegrityError):
            return StoreIntegrity(f"integrity error: {exc}")
        if isinstance(exc, sqlite3.Error):
            if _code_family(exc) in _UNAVAILABLE_CODES:
                return StoreUnavailable(f"sqlite unavailable: {exc}")
            return StoreError(f"sqlite error: {exc}")
        if isinstance(exc, OSError):
            return StoreUnavailable(f"sqlite unavailable: {exc}")
        return None


def _json_list(values: list[Any]) -> str:
    """A JSON array parameter (for ``json_each``); orjson, which is much
    faster on the thousands of keys of a batch, unless a text holds a lone
    surrogate (which UTF-8 cannot encode)."""
    try:
        return orjson.dumps(values).decode()
    except orjson.JSONEncodeError:
        return json.dumps(values, separators=(",", ":"))


SQLITE = SqliteDialect()


class NativeConnection:
    """The subset of aiosqlite's connection API the store uses, over the Rust
    :class:`~decnet_attr._core.SqliteWriter`: every call is a job run in
    order on the writer's own thread, which never takes the GIL; results
    come back through a pipe the event loop watches. As with aiosqlite, a
    call whose awaiting task is cancelled may still run: a later
    ``ROLLBACK`` undoes it.

    Transactions are numbered (:meth:`number`) and every call carries the
    number of the latest one, so a transaction can be pipelined: its
    ``COMMIT`` queued (:meth:`commit`) while the next one is already being
    built on the loop. A write that fails without anyone waiting for it
    (:meth:`defer`) or a failed ``COMMIT`` rolls its transaction back at
    once and *dooms* it and every later one: their calls raise (the failed
    transaction's own error, :class:`StoreConflict` for the later ones,
    which were built on its outcome) until the store has dealt with the
    failure (:meth:`settle`). So no transaction can commit without one of
    its writes, nor on top of one that did not commit."""

    def __init__(self, writer: SqliteWriter, pipe: tuple[int, int]) -> None:
        self._w = writer
        self._pipe = pipe
        self._closed = False
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(pipe[0], self._ready)

    @classmethod
    async def connect(cls, path: str, timeout: float) -> NativeConnection:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)  # a full pipe delays a byte, never the writer
        try:
            writer = await loop.run_in_executor(None, SqliteWriter, path, w, timeout)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        return cls(writer, (r, w))

    @property
    def closed(self) -> bool:
        return self._closed

    def _ready(self) -> None:
        """Results are ready (the writer wrote to the pipe)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self._pipe[0], 1 << 16)
        waiting = self._waiting
        for ticket, rows, err in self._w.take():
            fut = waiting.pop(ticket, None)
            if fut is None or fut.done():
                continue
            if err is None:
                fut.set_result(rows)
            else:
                fut.set_exception(err)

    def _check(self) -> None:
        if self._closed:
            raise ConnectionClosed("no active connection")

    def _future(self, ticket: int) -> asyncio.Future[Any]:
        fut = self._loop.create_future()
        self._waiting[ticket] = fut
        return fut

    def number(self) -> int:
        """The number of a new transaction: later calls belong to it."""
        return self._w.number()

    async def begin(self, seq: int, *, deferred: bool = False) -> None:
        """``BEGIN IMMEDIATE`` of transaction ``seq`` (:meth:`number`).
        ``deferred``: queued, not awaited (if it fails, the transaction is
        doomed and its next call raises)."""
        self._check()
        ticket = self._w.begin(seq, not deferred)
        if ticket is not None:
            await self._future(ticket)

    def commit(self, seq: int) -> asyncio.Future[None]:
        """Queue the ``COMMIT`` of transaction ``seq``; its outcome."""
        self._check()
        return self._future(self._w.commit(seq))

    def settle(self, seq: int) -> bool:
        """The store has dealt with the failure that doomed transaction
        ``seq``: calls from now on run again. False if there was nothing to
        settle (``seq`` not doomed, or settled before)."""
        return self._w.settle(seq)

    def defer(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Queue an ``executemany`` whose result nobody waits for: the caller
        goes on (the loop builds the transaction's next rows) while the
        writer runs it. Calls run in order, so a later read sees it; if it
        fails, the transaction is doomed (see the class)."""
        self._check()
        self._w.execute(self._w.current, sql, params, False)

    def defer_expecting(self, sql: str, params: Sequence[Sequence[Any]], what: str) -> None:
        """:meth:`defer` of a compare-and-set: each parameter set must change
        exactly one row, or the transaction is doomed with
        :class:`StoreConflict` (someone else changed the row first)."""
        self._check()
        self._w.execute(self._w.current, sql, params, False, what)

    def defer_states(
        self, update_sql: str, insert_sql: str, states: StateWrite, same_sql: str | None = None
    ) -> None:
        """The rows of a batch's ``StateWrite`` (bound in Rust), deferred as
        :meth:`defer` is: ``update_sql`` for the rows written before,
        ``insert_sql`` for the new ones; ``same_sql`` (if given) for the rows
        written before whose state stays."""
        self._check()
        self._w.execute_states(self._w.current, update_sql, insert_sql, states, same_sql)

    def defer_windows(
        self, sql: str, engine: Engine, keys: Sequence[Key], window_seq: int | None
    ) -> None:
        """The retained windows of ``keys``, exported from ``engine`` and
        bound in Rust (see ``SqliteWriter.execute_windows``), deferred as
        :meth:`defer` is."""
        self._check()
        self._w.execute_windows(self._w.current, sql, engine, keys, window_seq)

    def defer_validated(
        self,
        sql: str,
        batch: ValidatedBatch,
        identity_of: Mapping[str, str],
        select: Sequence[int],
    ) -> None:
        """The insert of a batch's selected items (rows bound straight from
        the batch, see ``SqliteConnection.insert_validated``), deferred as
        :meth:`defer` is."""
        self._check()
        self._w.insert_validated(
            self._w.current, sql, batch, dict(identity_of), list(select), _SQL_INSERT_RUN
        )

    async def rollback(self, seq: int | None = None) -> None:
        """``ROLLBACK`` of transaction ``seq`` if it is still open (None:
        whatever is open)."""
        self._check()
        await self._future(self._w.rollback(seq))

    async def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        self._check()
        sets = None if params is None else [params]
        ticket = self._w.execute(self._w.current, sql, sets, True)
        assert ticket is not None  # waited for: always a ticket
        rows: list[tuple[Any, ...]] = await self._future(ticket)
        return rows

    execute_fetchall = execute

    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._check()
        ticket = self._w.execute(self._w.current, sql, params, True)
        assert ticket is not None  # waited for: always a ticket
        await self._future(ticket)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            ticket = self._w.close()
            if ticket is not None:
                with contextlib.suppress(Exception):
                    await self._future(ticket)
            await self._loop.run_in_executor(None, self._w.join)
        finally:
            # the writer thread has ended: nobody writes to the pipe any more
            self._loop.remove_reader(self._pipe[0])
            for fd in self._pipe:
                os.close(fd)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed("no active connection"))
            self._waiting.clear()


# ---- SQL -----------------------------------------------------------------------------------

_SQL_ENSURE_ATTACKER = """
INSERT INTO attackers (uuid, ip, first_seen, last_seen)
VALUES (
    ?1,
    CASE WHEN ?2 IS NULL OR EXISTS (SELECT 1 FROM attackers x WHERE x.ip = ?2)
         THEN NULL ELSE ?2 END,
    ?3,
    ?4
)
ON CONFLICT (uuid) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen),
    last_seen = max(last_seen, excluded.last_seen)
WHERE excluded.first_seen < first_seen OR excluded.last_seen > last_seen
"""

_SQL_INSERT_OBS = f"""
INSERT INTO observations ({OBS_INSERT_COLS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""

#: The run of the next ``?1`` rows, all of attacker ``?2`` (identity ``?3``),
#: written just before them (schema v10). One writer, inside its
#: transaction: the rows take the seqs after the highest ever given out.
_SQL_INSERT_RUN = """
INSERT INTO observation_runs (first_seq, last_seq, attacker_uuid, identity_uuid, n)
SELECT s + 1, s + ?1, ?2, ?3, ?1 FROM (SELECT coalesce(
    (SELECT seq FROM sqlite_sequence WHERE name = 'observations'), 0) AS s)
"""

#: A state row's values: every column but the key and the retained window,
#: in the order ``StateWrite`` binds them (written once, in Rust).
_STATE_VALUE_COLS = STATE_VALUE_COLUMNS
_SET_VALUES = ",\n    ".join(f"{c} = excluded.{c}" for c in _STATE_VALUE_COLS)

_SQL_INSERT_STATE = f"""
INSERT INTO attribution_state ({STATE_COLS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_SQL_UPSERT_STATE = f"""{_SQL_INSERT_STATE}ON CONFLICT (identity_uuid, primitive) DO UPDATE SET
    {_SET_VALUES},
    "window" = excluded."window",
    window_seq = NULL
"""

# the same without the window: a new row gets none (window_seq 0: its whole
# series is replayed on load), an existing row keeps the one it has
_SQL_UPSERT_STATE_VALUES = f"""
INSERT INTO attribution_state (identity_uuid, primitive, {", ".join(_STATE_VALUE_COLS)},
    "window", window_seq)
VALUES ({", ".join("?" * (len(_STATE_VALUE_COLS) + 2))}, NULL, 0)
ON CONFLICT (identity_uuid, primitive) DO UPDATE SET
    {_SET_VALUES}
"""

_SQL_UPDATE_STATE_VALUES = f"""
UPDATE attribution_state SET {", ".join(f"{c} = ?{i}" for i, c in enumerate(_STATE_VALUE_COLS, 1))}
WHERE identity_uuid = ?{len(_STATE_VALUE_COLS) + 1} AND primitive = ?{len(_STATE_VALUE_COLS) + 2}
"""

#: The same for a row whose state stays: bound alike, it leaves ``state``
#: and ``previous_state`` (they are what they were) and so the index on
#: ``state``, which SQLite rewrites for every row whose SET names it
#: (1.3-2 us a row, measured).
_SQL_UPDATE_SAME_STATE_VALUES = f"""
UPDATE attribution_state SET {
    ", ".join(
        f"{c} = ?{i}"
        for i, c in enumerate(_STATE_VALUE_COLS, 1)
        if c not in ("state", "previous_state")
    )
}
WHERE identity_uuid = ?{len(_STATE_VALUE_COLS) + 1} AND primitive = ?{len(_STATE_VALUE_COLS) + 2}
"""

_SQL_SAVE_WINDOW = (
    'UPDATE attribution_state SET "window" = ?1, '
    "window_seq = coalesce(?2, (SELECT coalesce(max(seq), 0) FROM observations)) "
    "WHERE identity_uuid = ?3 AND primitive = ?4"
)

# an identity formed by the only writer (form_identities): its times are its
# attacker's, as ensure_attackers has just written them
_SQL_FORM_IDENTITY = (
    "INSERT INTO attacker_identities (uuid, schema_version, first_seen_at, last_seen_at, "
    "created_at, updated_at, observation_count) "
    "SELECT ?1, 1, first_seen, last_seen, ?3, ?3, 1 FROM attackers WHERE uuid = ?2"
)
_SQL_CLAIM_IDENTITY = (
    "UPDATE attackers SET identity_id = ?1 WHERE uuid = ?2 AND identity_id IS NULL"
)
_SQL_IDENTITIES_OF = (
    "SELECT uuid, identity_id FROM attackers WHERE uuid IN (SELECT value FROM json_each(?))"
)

_SQL_LOAD_STATES = (
    "SELECT "
    + ", ".join(f"s.{c.strip()}" for c in STATE_COLS.split(","))
    + ", s.window_seq FROM json_each(?) k JOIN attribution_state s"
    " ON s.identity_uuid = json_extract(k.value, '$[0]')"
    " AND s.primitive = json_extract(k.value, '$[1]')"
)


# ---- the transaction ----------------------------------------------------------------------


class SqliteTx(SqlTx):
    """Writes of one batch on the writer connection, inside ``BEGIN IMMEDIATE``."""

    _dialect = SQLITE

    def __init__(self, conn: Any, dedupe: Dedupe, reader: Any = None) -> None:
        super().__init__(conn)
        self._dedupe = dedupe
        # the store's reader, when this transaction is pipelined
        self._reader = reader

    def committed_reads(self) -> SqliteTx:
        if self._reader is None:
            return self
        return SqliteTx(self._reader, self._dedupe)

    @guard
    async def form_identities(
        self, attacker_uuids: Sequence[str], known: Mapping[str, str], now: float
    ) -> tuple[dict[str, str], list[str]]:
        conn = self._c()
        if self._reader is None or not isinstance(conn, NativeConnection):
            return await self.ensure_identities(attacker_uuids, now)
        mapping: dict[str, str] = {}
        missing: list[str] = []
        for a in attacker_uuids:
            ident = known.get(a)
            if ident is None:
                missing.append(a)
            else:
                mapping[a] = ident
        if not missing:
            return mapping, []
        missing = sorted(set(missing))
        rows = await self._reader.execute_fetchall(
            _SQL_IDENTITIES_OF, (SQLITE.list_param(missing),)
        )
        stored = {a: i for a, i in rows if i is not None}
        formed: list[str] = []
        claims: list[tuple[str, str]] = []
        for a in missing:
            ident = stored.get(a)
            if ident is None:
                ident = uuid_mod.uuid4().hex
                formed.append(ident)
                claims.append((ident, a))
            mapping[a] = ident
        if claims:
            conn.defer(_SQL_FORM_IDENTITY, [(i, a, now) for i, a in claims])
            conn.defer_expecting(_SQL_CLAIM_IDENTITY, claims, "an attacker's identity")
        return mapping, formed

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._write_many(self._c(), self._dialect.sql(sql), [params])

    @staticmethod
    async def _write_many(conn: Any, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """A write whose result the batch does not need: deferred on the
        native writer (its error surfaces at the latest at COMMIT)."""
        if isinstance(conn, NativeConnection):
            conn.defer(sql, params)
        else:
            await conn.executemany(sql, params)

    @guard
    async def ensure_attackers(self, items: Sequence[tuple[str, str | None, float]]) -> None:
        conn = self._c()
        params = merge_attacker_items(items)
        if not params:
            return
        await self._write_many(conn, _SQL_ENSURE_ATTACKER, params)

    @guard
    async def ensure_identities(
        self, attacker_uuids: Sequence[str], now: float
    ) -> tuple[dict[str, str], list[str]]:
        conn = self._c()
        wanted = sorted(set(attacker_uuids))
        if not wanted:
            return {}, []
        rows = await conn.execute_fetchall(
            "SELECT uuid, identity_id, first_seen, last_seen FROM attackers "
            "WHERE uuid IN (SELECT value FROM json_each(?))",
            (SQLITE.list_param(wanted),),
        )
        mapping: dict[str, str] = {}
        proposed: dict[str, str] = {}  # attacker -> identity we try to install
        ident_params: list[tuple[Any, ...]] = []
        for auuid, ident, first, last in rows:
            if ident is not None:
                mapping[auuid] = ident
            else:
                new = uuid_mod.uuid4().hex
                proposed[auuid] = new
                ident_params.append((new, first, last, now, now))
        formed: list[str] = []
        if proposed:
            await conn.executemany(
                "INSERT INTO attacker_identities (uuid, schema_version, first_seen_at, "
                "last_seen_at, created_at, updated_at, observation_count) "
                "VALUES (?, 1, ?, ?, ?, ?, 1)",
                ident_params,
            )
            # Compare-and-set: only an attacker still without identity takes ours.
            await conn.executemany(
                _SQL_CLAIM_IDENTITY, [(ident, auuid) for auuid, ident in proposed.items()]
            )
            final = await conn.execute_fetchall(
                _SQL_IDENTITIES_OF, (SQLITE.list_param(sorted(proposed)),)
            )
            losers: list[str] = []
            won = dict(final)
            for auuid, ident in proposed.items():
                actual = won.get(auuid)
                if actual == ident:
                    formed.append(ident)
                    mapping[auuid] = ident
                else:
                    losers.append(ident)
                    if actual is not None:
                        mapping[auuid] = actual
            if losers:
                await conn.execute(
                    "DELETE FROM attacker_identities WHERE uuid IN "
                    "(SELECT value FROM json_each(?))",
                    (SQLITE.list_param(losers),),
                )
        return mapping, formed

    @guard
    async def insert_observation_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[int]:
        conn = self._c()
        if not rows:
            return []
        # exactly once: admitted in memory (taken back if the transaction
        # rolls back), then appended; no unique index to maintain on disk
        new = self._dedupe.admit_rows(rows)
        if new:
            await _insert_with_runs(conn, rows if len(new) == len(rows) else [rows[i] for i in new])
        return new

    @guard
    async def insert_validated(
        self, batch: ValidatedBatch, identity_of: Mapping[str, str]
    ) -> list[int]:
        conn = self._c()
        # stored (and so merged) grouped by attacker: each attacker's rows of
        # the batch take consecutive seqs, one run (schema v10)
        new = batch.by_attacker(self._dedupe.admit_batch(batch))
        if new:
            if isinstance(conn, NativeConnection):
                conn.defer_validated(_SQL_INSERT_OBS, batch, identity_of, new)
            else:
                await _insert_with_runs(conn, batch.rows(identity_of, new))
        return new

    @guard
    async def load_states(self, keys: Sequence[Key], *, lock: bool = False) -> dict[Key, StateRow]:
        conn = self._c()
        if not keys:
            return {}
        # The writer already holds the database write lock (BEGIN IMMEDIATE).
        rows = await conn.execute_fetchall(_SQL_LOAD_STATES, (_json_list(list(set(keys))),))
        return {(r[0], r[1]): state_from_row(r) for r in rows}

    @guard
    async def upsert_states(
        self, rows: Sequence[StateRow], *, created: Collection[Key] = ()
    ) -> None:
        # one writer per file: nobody creates a row meanwhile (``created``)
        conn = self._c()
        if not rows:
            return
        now = time.time()
        await conn.executemany(
            _SQL_UPSERT_STATE, [state_params(r, now) for r in dedupe_states(rows)]
        )

    @guard
    async def upsert_state_values(self, states: StateWrite) -> None:
        conn = self._c()
        if not len(states):
            return
        # a row written before (version > 1) is updated in place: one
        # primary-key probe instead of an insert attempt and then an update
        if isinstance(conn, NativeConnection):
            conn.defer_states(
                _SQL_UPDATE_STATE_VALUES,
                _SQL_UPSERT_STATE_VALUES,
                states,
                _SQL_UPDATE_SAME_STATE_VALUES,
            )
            return
        updates, inserts = states.params()
        if updates:
            await conn.executemany(_SQL_UPDATE_STATE_VALUES, updates)
        if inserts:
            await conn.executemany(_SQL_UPSERT_STATE_VALUES, inserts)

    @guard
    async def save_windows(self, windows: Sequence[tuple[str, str, str]], seq: int | None) -> None:
        conn = self._c()
        if windows:
            await self._write_many(conn, _SQL_SAVE_WINDOW, [(w, seq, i, p) for i, p, w in windows])

    @guard
    async def save_windows_of(self, engine: Engine, keys: Sequence[Key], seq: int | None) -> None:
        conn = self._c()
        if not isinstance(conn, NativeConnection):
            await super().save_windows_of(engine, keys, seq)
        elif keys:
            conn.defer_windows(_SQL_SAVE_WINDOW, engine, keys, seq)

    @guard
    async def insert_dead_letters(self, rows: Sequence[DeadLetter]) -> None:
        conn = self._c()
        if not rows:
            return
        now = time.time()
        await conn.executemany(
            "INSERT INTO dead_letters (received_at, topic, event_id, reason, payload) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (
                    r.received_at or now,
                    r.topic,
                    r.event_id,
                    r.reason,
                    truncate_payload(r.payload_json),
                )
                for r in rows
            ],
        )

    @guard
    async def mark_merged(self, seqs: Sequence[int], identity_by_seq: dict[int, str]) -> None:
        conn = self._c()
        if not seqs:
            return
        marks = [(identity_by_seq.get(s), s) for s in sorted(set(seqs))]
        await conn.executemany(
            "UPDATE observations SET merged = 1, identity_uuid = coalesce(?, identity_uuid) "
            "WHERE seq = ?",
            marks,
        )
        # the run holding each row takes its identity (a run is one attacker's)
        await conn.executemany(MERGED_RUN_SQL, marks)


async def _insert_with_runs(conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
    """Observation rows (``OBS_INSERT_COLS`` order) on a Python connection,
    each run (``run_spans``) after its ``observation_runs`` row, as the
    native writer does."""
    for start, end in run_spans(rows):
        attacker, identity = rows[start][11:13]
        await conn.execute(_SQL_INSERT_RUN, (end - start, attacker, identity))
        await conn.executemany(_SQL_INSERT_OBS, rows[start:end])


class SqliteStore(SqlStore):
    """A :class:`Store` on one SQLite file (WAL)."""

    dialect = SQLITE.name
    _dialect = SQLITE

    #: Page cache per connection, KiB.
    cache_kib = 64 * 1024
    #: WAL pages after which a committing writer checkpoints itself (a stall);
    #: normally the background checkpointer keeps the WAL far below this.
    wal_autocheckpoint_pages = 50000
    #: Bytes the WAL file is cut back to when it restarts (PRAGMA
    #: journal_size_limit). Above what the background checkpointer lets it
    #: reach, so a busy WAL keeps its size and is overwritten in place: cut
    #: back to 64 MiB, it grew again on every cycle, and extending a file
    #: cost the writer's COMMITs ~15 % (measured: 904 / 998 / 980 ms of
    #: COMMIT for 200k observations, against 781 / 805 / 837 ms uncut).
    wal_size_limit = 256 * 1024 * 1024
    #: Seconds between background PASSIVE checkpoints (0: none). They run on a
    #: connection (and thread) of their own, so commits never wait for the
    #: WAL to be copied back into the database file.
    checkpoint_interval = 0.5
    #: Writer connection of a database file: the Rust one (False: aiosqlite,
    #: kept for side-by-side measurements).
    native_writer = True
    lazy_windows = True
    #: Exactly-once horizon: the newest observations whose ids and
    #: (evidence_ref, primitive) pairs are remembered (about 170 bytes each).
    dedupe_window = 2_000_000

    def __init__(self, path: str | PathLike[str], *, dedupe_window: int | None = None) -> None:
        self.path = str(path)
        if dedupe_window is not None:
            self.dedupe_window = dedupe_window
        self.url = f"sqlite://{self.path}" if self.path.startswith("/") else self.path
        self._memory = self.path == ":memory:" or self.path == ""
        self._w: Any = None
        self._r: Any = None
        # the committed reads of pipelined transactions: a native connection
        # too, so they never wait for the GIL (see transaction)
        self._cr: NativeConnection | None = None
        self._wlock = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()
        # the COMMITs queued and not done yet (pipelined transactions)
        self._pending: list[asyncio.Future[None]] = []
        #: Run when a failed transaction doomed others (see :meth:`_failed`).
        self.on_failure: Callable[[], None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self.dedupe = Dedupe(self.dedupe_window)

    # ---- lifecycle -------------------------------------------------------------------------
    @staticmethod
    async def _set_wal(conn: Any) -> None:
        """Switch to WAL. Changing the journal mode needs an exclusive lock and
        SQLite does not apply busy_timeout to it, so several processes opening
        a fresh file at once get "database is locked": retry for a while."""
        delay = 0.01
        for _ in range(200):
            try:
                await conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if _code_family(exc) not in _LOCK_CODES:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
        await conn.execute("PRAGMA journal_mode = WAL")

    async def _connect(self, *, native: bool = False) -> Any:
        conn: Any
        if native:
            conn = await NativeConnection.connect(self.path, 30.0)
        else:
            conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            if not native:  # the reads' network filter (list_attackers)
                await conn.create_function("ip_key", 1, ip_key, deterministic=True)
            await conn.execute("PRAGMA busy_timeout = 30000")
            await conn.execute("PRAGMA foreign_keys = ON")
            if not self._memory:
                await self._set_wal(conn)
            await conn.execute("PRAGMA synchronous = NORMAL")
            # A bigger page cache keeps the observation indexes' hot pages in memory
            # (the default is 2 MiB); temporary b-trees (sorts) stay in memory.
            await conn.execute(f"PRAGMA cache_size = -{self.cache_kib}")
            await conn.execute("PRAGMA temp_store = MEMORY")
            # Checkpoints (the only fsyncs with synchronous=NORMAL) every ~40 MiB of
            # WAL instead of ~4 MiB: random-key index inserts dirty many pages per
            # batch, so this is the biggest lever on sustained write throughput.
            await conn.execute(f"PRAGMA wal_autocheckpoint = {self.wal_autocheckpoint_pages}")
            await conn.execute(f"PRAGMA journal_size_limit = {self.wal_size_limit}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._w is not None:
            return
        if SQLITE_VERSION < MIN_SQLITE_VERSION:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; decnet-attr needs >= "
                + ".".join(map(str, MIN_SQLITE_VERSION))
            )
        try:
            if not self._memory:
                private_db_files(self.path)
            self._w = await self._connect(native=self.native_writer and not self._memory)
            await migrate_sqlite(self._w)
            self._r = self._w if self._memory else await self._connect()
            if isinstance(self._w, NativeConnection):
                self._cr = await self._connect(native=True)
            await self._load_dedupe()
        except Exception:
            await self.close()
            with driver_errors(self):
                raise
        if not self._memory and self.checkpoint_interval > 0:
            self._checkpointer = asyncio.create_task(
                self._checkpoint_loop(), name="sqlite-checkpointer"
            )
        log.debug("sqlite store open at %s (sqlite %s)", self.path, sqlite3.sqlite_version)

    async def _load_dedupe(self) -> None:
        """Remember the newest stored observations (the dedupe horizon)."""
        self.dedupe.clear()
        rows = await self._reader().execute_fetchall(
            "SELECT id, evidence_ref, primitive FROM (SELECT seq, id, evidence_ref, primitive "
            "FROM observations ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (self.dedupe.capacity,),
        )
        self.dedupe.load([(r[0], r[1], r[2]) for r in rows])

    async def _checkpoint_loop(self) -> None:
        conn = None
        try:
            conn = await self._connect()
            while True:
                await asyncio.sleep(self.checkpoint_interval)
                try:
                    await conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or locked: try again next time
                    log.debug("background checkpoint skipped: %s", exc)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # never let the checkpointer take the store down
            log.warning("background checkpointer stopped: %s", exc)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._pending:  # COMMITs still queued
            await asyncio.wait(list(self._pending))
        if self._background:  # rollbacks of cancelled BEGINs still queued
            await asyncio.gather(*self._background, return_exceptions=True)
        w, r, cr = self._w, self._r, self._cr
        self._w = self._r = self._cr = None
        for conn in (cr, r, w) if r is not w else (w,):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # pragma: no cover - closing a broken connection
                    log.debug("error closing sqlite connection", exc_info=True)

    def _writer(self) -> Any:
        if self._w is None:
            raise StoreUnavailable("sqlite store is not open")
        return self._w

    def _reader(self) -> Any:
        if self._r is None:
            raise StoreUnavailable("sqlite store is not open")
        return self._r

    @property
    def pipelined(self) -> bool:
        """Whether :meth:`transaction` can pipeline (``handover``): a file
        written through the native connection, read through another."""
        return self._cr is not None

    @asynccontextmanager
    async def transaction(
        self,
        handover: Callable[[asyncio.Future[None]], None] | None = None,
    ) -> AsyncIterator[SqliteTx]:
        """A write transaction (``BEGIN IMMEDIATE``).

        With ``handover`` (and :attr:`pipelined`), the transaction is
        pipelined: its ``BEGIN`` is queued rather than awaited, and at the end
        its ``COMMIT`` is queued, ``handover`` gets the future of its outcome
        and the next transaction may begin at once, built on top of this one
        while the writer commits it; leaving the block still waits for the
        commit. If a transaction fails, the later ones already begun fail too
        (with :class:`StoreConflict`), and :attr:`on_failure` runs before any
        new one begins: the caller drops what it holds in memory about the
        transactions in flight. At most one COMMIT is pending when a
        transaction begins."""
        conn = self._writer()
        native = isinstance(conn, NativeConnection)
        pipe = handover is not None and native
        await self._wlock.acquire()
        release = True
        seq = 0
        try:
            while len(self._pending) > 1:
                await asyncio.wait([self._pending[0]])
            try:
                if native:
                    seq = conn.number()
                    await conn.begin(seq, deferred=pipe)
                else:
                    await conn.execute("BEGIN IMMEDIATE")
            except BaseException as exc:
                if not isinstance(exc, (sqlite3.Error, StoreError)):
                    # Cancelled while BEGIN waits for the database lock: it still runs
                    # in the driver thread. Roll it back in the background, keeping
                    # the writer locked until then, so the caller returns at once.
                    release = False
                    task = asyncio.ensure_future(self._rollback_then_release(conn, seq or None))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                elif native and seq:
                    await self._failed(conn, seq)
                with driver_errors(self):
                    raise
            self.dedupe.begin(seq)
            tx = SqliteTx(conn, self.dedupe, self._cr if pipe else None)
            try:
                yield tx
            except BaseException:
                tx._open = False
                await self._failed(conn, seq)
                raise
            tx._open = False
            if not native:
                try:
                    await conn.execute("COMMIT")
                except BaseException:
                    await self._failed(conn, seq)
                    with driver_errors(self):
                        raise
                self.dedupe.commit()
                return
            done = conn.commit(seq)
            self._pending.append(done)
            done.add_done_callback(functools.partial(self._settled, seq))
            if pipe:
                assert handover is not None
                handover(done)
                self._wlock.release()
                release = False
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                # the COMMIT still runs: a failure is dealt with all the same
                watch = asyncio.ensure_future(self._watch(conn, seq, done))
                self._background.add(watch)
                watch.add_done_callback(self._background.discard)
                raise
            except BaseException:
                if release:
                    await self._failed(conn, seq)
                else:
                    async with self._wlock:
                        await self._failed(conn, seq)
                with driver_errors(self):
                    raise
        finally:
            if release:
                self._wlock.release()

    async def _watch(
        self,
        conn: Any,
        seq: int,
        done: asyncio.Future[None],
    ) -> None:
        with contextlib.suppress(BaseException):
            await done
        if done.cancelled() or done.exception() is not None:
            async with self._wlock:
                await self._failed(conn, seq)

    def _settled(self, seq: int, done: asyncio.Future[None]) -> None:
        """A COMMIT's outcome, whoever still waits for it."""
        with contextlib.suppress(ValueError):
            self._pending.remove(done)
        if done.cancelled() or done.exception() is not None:
            self.dedupe.rollback(seq)
        else:
            self.dedupe.commit(seq)

    async def _failed(self, conn: Any, seq: int) -> None:
        """Transaction ``seq`` failed (the writer lock held): once every
        COMMIT in flight has its outcome, let new transactions run and roll
        back. If the failure doomed transactions (see
        :class:`NativeConnection`), :attr:`on_failure` runs first, once per
        failure: whoever pipelines drops what it holds in memory about the
        transactions in flight."""
        if not isinstance(conn, NativeConnection):
            self.dedupe.rollback()
            await self._rollback(conn)
            return
        self.dedupe.rollback(seq)
        others = [f for f in self._pending if not f.done()]
        if others:
            await asyncio.wait(others)
        if conn.settle(seq) and self.on_failure is not None:
            self.on_failure()
        await self._rollback(conn, seq)

    async def _rollback_then_release(self, conn: Any, seq: int | None = None) -> None:
        try:
            await self._rollback(conn, seq)
        finally:
            self._wlock.release()

    @staticmethod
    async def _rollback(conn: Any, seq: int | None = None) -> None:
        """Roll back (on the native writer: transaction ``seq`` if it is still
        open). aiosqlite runs queued statements even when the awaiting task
        was cancelled, so a cancelled ``BEGIN``/statement may still be
        pending: this ``ROLLBACK`` is queued behind it and undoes it."""
        try:
            if isinstance(conn, NativeConnection):
                await conn.rollback(seq)
            else:
                await conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            # SQLITE_ERROR: no transaction is active (nothing to undo)
            if _code_family(exc) != "SQLITE_ERROR":
                log.warning("sqlite rollback failed: %s", exc)
        except Exception:
            log.warning("sqlite rollback failed", exc_info=True)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Any]:
        """The writer for a short write outside :meth:`transaction` (BEGIN IMMEDIATE)."""
        async with self.transaction() as tx:
            yield tx._conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Any]:
        yield self._reader()

    def _driver_error(self, exc: BaseException) -> StoreError | None:
        closed = _connection_closed(self._r) or _connection_closed(self._w)
        return SQLITE.map_error(exc, None if closed else self._r)

    # ---- attackers -------------------------------------------------------------------------
    @guard
    async def register_attacker(
        self, ip: str, uuid: str | None, now: float
    ) -> tuple[AttackerRow, bool]:
        async with self._write() as conn:
            rows = await conn.execute_fetchall(
                f"SELECT {ATTACKER_COLS} FROM attackers WHERE ip = ?", (ip,)
            )
            if rows:
                return attacker_from_row(rows[0]), False
            if uuid is not None:
                rows = await conn.execute_fetchall(
                    f"SELECT {ATTACKER_COLS} FROM attackers WHERE uuid = ?", (uuid,)
                )
                if rows:
                    existing = attacker_from_row(rows[0])
                    if existing.ip is not None:
                        raise StoreError(f"attacker {uuid} is already registered with another ip")
                    # Known only by uuid so far (bus observation without ip): adopt the ip.
                    await conn.execute("UPDATE attackers SET ip = ? WHERE uuid = ?", (ip, uuid))
                    return dataclasses.replace(existing, ip=ip), False
            new_uuid = uuid if uuid is not None else str(uuid_mod.uuid4())
            await conn.execute(
                "INSERT INTO attackers (uuid, ip, first_seen, last_seen) VALUES (?, ?, ?, ?)",
                (new_uuid, ip, now, now),
            )
            return AttackerRow(
                uuid=new_uuid, ip=ip, identity_id=None, first_seen=now, last_seen=now
            ), True

    # ---- attribution -----------------------------------------------------------------------
    async def iter_observations(
        self, *, batch_size: int = 5000
    ) -> AsyncIterator[list[ObservationRow]]:
        own = not self._memory
        with driver_errors(self):
            conn = await self._connect() if own else self._reader()
        try:
            cur = await conn.execute(ALL_OBSERVATIONS_SQL)
            try:
                while True:
                    batch = await cur.fetchmany(batch_size)
                    if not batch:
                        break
                    yield [observation_from_row(r) for r in batch]
            finally:
                await cur.close()
        except Exception as exc:
            err = SQLITE.map_error(exc, conn)
            if err is None:
                raise
            raise err from exc
        finally:
            if own:
                await conn.close()

    @guard
    async def replace_all_states(self, rows: Sequence[StateRow]) -> None:
        now = time.time()
        async with self._write() as conn:
            await conn.execute("DELETE FROM attribution_state")
            await conn.execute("DELETE FROM multi_actor_log")
            if rows:
                await conn.executemany(
                    _SQL_INSERT_STATE,
                    [state_params(r, now) for r in dedupe_states(rows)],
                )

    async def stored_positions(self, batch: ValidatedBatch) -> list[int]:
        return self.dedupe.seen_batch(batch)

    # ---- retention ---------------------------------------------------------------------------
    @guard
    async def mark_observations(self, now: float) -> int:
        async with self._write() as conn:
            rows = await conn.execute_fetchall("SELECT coalesce(max(seq), 0) FROM observations")
            seq = int(rows[0][0])
            await conn.execute(
                "INSERT INTO observation_marks (at, seq) VALUES (?, ?) "
                "ON CONFLICT (at) DO UPDATE SET seq = excluded.seq",
                (now, seq),
            )
        return seq

    @guard
    async def prune_observations(self, upto_seq: int, *, chunk: int = 50_000) -> int:
        rows = await self._reader().execute_fetchall(
            "SELECT coalesce(min(seq), 0) FROM observations"
        )
        low = int(rows[0][0])
        deleted = 0
        while low and low <= upto_seq:  # rowid ranges: pages freed in bulk
            high = min(low + chunk - 1, upto_seq)
            async with self._write() as conn:
                await conn.execute(
                    "DELETE FROM observations WHERE seq BETWEEN ? AND ? AND merged = 1",
                    (low, high),
                )
                n = await conn.execute_fetchall("SELECT changes()")
                for stmt in PRUNE_RUNS_SQL:
                    await conn.execute(stmt, (low, high))
            deleted += int(n[0][0])
            low = high + 1
        async with self._write() as conn:
            await conn.execute(PRUNE_MARKS_SQL, (upto_seq,))
        return deleted

    # ---- users and auth --------------------------------------------------------------------
    @guard
    async def redeem_ticket(self, ticket_hash: str, now: float) -> TicketRow | None:
        if HAS_RETURNING:
            async with self._wlock:
                rows = await self._writer().execute_fetchall(
                    f"DELETE FROM sse_tickets WHERE ticket_hash = ? RETURNING {TICKET_COLS}",
                    (ticket_hash,),
                )
        else:
            async with self._write() as conn:
                rows = await conn.execute_fetchall(
                    f"SELECT {TICKET_COLS} FROM sse_tickets WHERE ticket_hash = ?", (ticket_hash,)
                )
                if rows:
                    await conn.execute(
                        "DELETE FROM sse_tickets WHERE ticket_hash = ?", (ticket_hash,)
                    )
        if not rows:
            return None
        ticket = ticket_from_row(rows[0])
        if ticket.expires_at <= now:
            return None
        return ticket
