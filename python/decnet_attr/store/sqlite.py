"""The embedded store: one SQLite file in WAL mode.

Two connections: a *writer* (every write, every :meth:`transaction`, under an
asyncio lock so one coroutine at a time owns it) and a *reader* for the API's
reads (WAL readers never block the writer). The reader is aiosqlite; the
writer of a database file is :class:`NativeConnection`, the Rust
``SqliteConnection`` on a thread of its own, which runs each call with the
GIL released (aiosqlite's driver takes the GIL back for every row of an
``executemany``, so a big batch mostly waits for the event loop). Transactions are
``BEGIN IMMEDIATE`` so the database write lock is taken up front and
several processes on one file serialise instead of deadlocking;
``busy_timeout`` (30 s) makes them wait for each other.

Batch writes use ``executemany`` with one prepared statement; id lists are
passed as one JSON array parameter and expanded with ``json_each`` so the
SQL text (and so the prepared statement) does not depend on the list size.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import sqlite3
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from os import PathLike
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from decnet_attr._core import Dedupe, SqliteConnection, ValidatedBatch
from decnet_attr.identifiers import ip_key
from decnet_attr.store.base import (
    AttackerAttribution,
    AttackerFilter,
    AttackerRow,
    AttackerSummary,
    DeadLetter,
    Key,
    ObservationRow,
    StateRow,
    Store,
    StoreError,
    StoreUnavailable,
    TicketRow,
    Tx,
    UserRow,
    truncate_payload,
)
from decnet_attr.store.files import private_db_files
from decnet_attr.store.identities import SQLITE, IdentityOps, IdentityReads
from decnet_attr.store.schema import (
    ATTACKER_COLS,
    EVIDENCE_SQL,
    OBS_INSERT_COLS,
    OBS_SELECT_COLS,
    OVERVIEW_STATES_SQL,
    OVERVIEW_TOTALS_SQL,
    STATE_COLS,
    TICKET_COLS,
    USER_COLS,
    attacker_attribution_from_rows,
    attacker_from_row,
    dedupe_states,
    evidence_from_rows,
    identities_from_rows,
    list_attackers_sql,
    list_filters,
    merge_attacker_items,
    migrate_sqlite,
    observation_from_row,
    overview_counts_from_rows,
    recent_identities_sql,
    state_from_row,
    summaries_from_rows,
    ticket_from_row,
    user_from_row,
    user_update_sets,
)

if TYPE_CHECKING:
    from typing import ParamSpec

    P = ParamSpec("P")

R = TypeVar("R")

log = logging.getLogger(__name__)

SQLITE_VERSION: tuple[int, ...] = sqlite3.sqlite_version_info
#: Upserts (3.24), window functions (3.25), ``NULLS LAST``-free portable SQL.
MIN_SQLITE_VERSION = (3, 25, 0)
#: ``DELETE … RETURNING`` needs 3.35; older libraries take a select-then-delete
#: path under the write lock instead.
HAS_RETURNING = SQLITE_VERSION >= (3, 35, 0)

_UNAVAILABLE_CODES = frozenset(
    {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_NOTADB"}
)


def _map_error(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreError(f"integrity error: {exc}")
    if isinstance(exc, sqlite3.Error):
        name = str(getattr(exc, "sqlite_errorname", "") or "")
        base = name.split("_", 2)
        family = "_".join(base[:2]) if len(base) >= 2 else name
        msg = str(exc)
        if (
            name in _UNAVAILABLE_CODES
            or family in _UNAVAILABLE_CODES
            or "database is locked" in msg
            or "unable to open database" in msg
            or "disk I/O error" in msg
        ):
            return StoreUnavailable(f"sqlite unavailable: {exc}")
        return StoreError(f"sqlite error: {exc}")
    if isinstance(exc, OSError):
        return StoreUnavailable(f"sqlite unavailable: {exc}")
    if _closed_connection(exc):
        return StoreUnavailable("sqlite connection is closed")
    return StoreError(f"sqlite error: {exc!r}")


class NativeConnection:
    """The subset of aiosqlite's connection API the store uses, over the Rust
    :class:`~decnet_attr._core.SqliteConnection`, with every call run in
    order on one dedicated thread. As with aiosqlite, a call whose awaiting
    task is cancelled may still run: a later ``ROLLBACK`` undoes it."""

    def __init__(self, conn: SqliteConnection) -> None:
        self._conn = conn
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._closed = False

    @classmethod
    async def connect(cls, path: str, timeout: float) -> NativeConnection:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(None, SqliteConnection, path, timeout)
        return cls(conn)

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        if self._closed:
            raise ValueError("no active connection")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return await self._run(self._conn.execute, sql, params)

    execute_fetchall = execute

    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        await self._run(self._conn.executemany, sql, params)

    async def executemany_changes(self, sql: str, params: Sequence[Sequence[Any]]) -> list[int]:
        """Rows changed by each parameter set."""
        return await self._run(self._conn.executemany_changes, sql, params)

    async def insert_validated(
        self,
        sql: str,
        batch: ValidatedBatch,
        identity_of: Mapping[str, str],
        select: Sequence[int],
    ) -> int:
        return await self._run(self._conn.insert_validated, sql, batch, identity_of, select)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self._run(self._conn.close)
        finally:
            self._closed = True
            self._thread.shutdown(wait=False)


def _closed_connection(exc: BaseException) -> bool:
    """aiosqlite's (and :class:`NativeConnection`'s) ValueError for a closed
    connection."""
    text = str(exc)
    return isinstance(exc, ValueError) and (
        "no active connection" in text or "Connection closed" in text
    )


def _is_db_error(exc: BaseException) -> bool:
    return isinstance(exc, (sqlite3.Error, OSError)) or _closed_connection(exc)


def _param(i: int) -> str:
    """The ``i``-th (1-based) query parameter placeholder."""
    return f"?{i}"


def _guard(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate driver errors into :class:`StoreError` / :class:`StoreUnavailable`."""

    @functools.wraps(fn)
    async def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if _is_db_error(exc):
                raise _map_error(exc) from exc
            raise

    return inner


def _json_list(items: Sequence[Any]) -> str:
    return json.dumps(list(items), separators=(",", ":"))


def _state_params(s: StateRow, now: float) -> tuple[Any, ...]:
    return (
        s.identity_uuid,
        s.primitive,
        s.current_value_json,
        s.state,
        s.confidence,
        s.observation_count,
        s.last_change_ts,
        s.last_observation_ts,
        s.kind,
        s.window_json,
        s.version,
        s.updated_at or now,
        s.previous_state,
    )


# ---- SQL ----------------------------------------------------------------------------------

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

#: A state row's values: every column but the key and the retained window.
_STATE_VALUE_COLS = (
    "current_value",
    "state",
    "confidence",
    "observation_count",
    "last_change_ts",
    "last_observation_ts",
    "kind",
    "version",
    "updated_at",
    "previous_state",
)
_SET_VALUES = ",\n    ".join(f"{c} = excluded.{c}" for c in _STATE_VALUE_COLS)

_SQL_UPSERT_STATE = f"""
INSERT INTO attribution_state ({STATE_COLS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (identity_uuid, primitive) DO UPDATE SET
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
UPDATE attribution_state SET {", ".join(f"{c} = ?" for c in _STATE_VALUE_COLS)}
WHERE identity_uuid = ? AND primitive = ?
"""

_SQL_SAVE_WINDOW = (
    'UPDATE attribution_state SET "window" = ?, window_seq = ? '
    "WHERE identity_uuid = ? AND primitive = ?"
)

_SQL_SERIES_AFTER = (
    "SELECT value, ts FROM observations WHERE identity_uuid = ? AND seq > ? "
    "AND primitive = ? AND merged = 1 ORDER BY seq"
)

_SQL_LOAD_STATES = (
    "SELECT "
    + ", ".join(f"s.{c.strip()}" for c in STATE_COLS.split(","))
    + ", s.window_seq FROM json_each(?) k JOIN attribution_state s"
    " ON s.identity_uuid = json_extract(k.value, '$[0]')"
    " AND s.primitive = json_extract(k.value, '$[1]')"
)

_SQL_INSERT_STATE = f"""
INSERT INTO attribution_state ({STATE_COLS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_SQL_ATTACKER_ATTRIBUTION = (
    "SELECT a.identity_id, s.primitive, s.current_value, s.state, s.confidence, "
    "s.observation_count, s.last_change_ts, s.last_observation_ts "
    "FROM attackers a LEFT JOIN attribution_state s ON s.identity_uuid = a.identity_id "
    "WHERE a.uuid = ? ORDER BY s.primitive"
)

# ---- the transaction ----------------------------------------------------------------------


class SqliteTx(Tx):
    """Writes of one batch on the writer connection, inside ``BEGIN IMMEDIATE``."""

    def __init__(self, conn: Any, dedupe: Dedupe) -> None:
        self._conn = conn
        self._open = True
        self._dedupe = dedupe

    def _c(self) -> Any:
        if not self._open:
            raise StoreError("transaction is finished")
        return self._conn

    @_guard
    async def ensure_attackers(self, items: Sequence[tuple[str, str | None, float]]) -> None:
        conn = self._c()
        params = merge_attacker_items(items)
        if not params:
            return
        await conn.executemany(_SQL_ENSURE_ATTACKER, params)

    @_guard
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
            (_json_list(wanted),),
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
                "UPDATE attackers SET identity_id = ? WHERE uuid = ? AND identity_id IS NULL",
                [(ident, auuid) for auuid, ident in proposed.items()],
            )
            final = await conn.execute_fetchall(
                "SELECT uuid, identity_id FROM attackers "
                "WHERE uuid IN (SELECT value FROM json_each(?))",
                (_json_list(sorted(proposed)),),
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
                    (_json_list(losers),),
                )
        return mapping, formed

    @_guard
    async def insert_observation_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[int]:
        conn = self._c()
        if not rows:
            return []
        # exactly once: admitted in memory (taken back if the transaction
        # rolls back), then appended; no unique index to maintain on disk
        new = self._dedupe.admit_rows(rows)
        if new:
            await conn.executemany(
                _SQL_INSERT_OBS, rows if len(new) == len(rows) else [rows[i] for i in new]
            )
        return new

    @_guard
    async def insert_validated(
        self, batch: ValidatedBatch, identity_of: Mapping[str, str]
    ) -> list[int]:
        conn = self._c()
        new = self._dedupe.admit_batch(batch)
        if new:
            if isinstance(conn, NativeConnection):
                await conn.insert_validated(_SQL_INSERT_OBS, batch, identity_of, new)
            else:
                await conn.executemany(_SQL_INSERT_OBS, batch.rows(identity_of, new))
        return new

    @_guard
    async def load_states(self, keys: Sequence[Key], *, lock: bool = False) -> dict[Key, StateRow]:
        conn = self._c()
        if not keys:
            return {}
        # The writer already holds the database write lock (BEGIN IMMEDIATE).
        rows = await conn.execute_fetchall(_SQL_LOAD_STATES, (json.dumps(sorted(set(keys))),))
        return {(r[0], r[1]): state_from_row(r) for r in rows}

    @_guard
    async def upsert_states(self, rows: Sequence[StateRow]) -> None:
        conn = self._c()
        if not rows:
            return
        now = time.time()
        await conn.executemany(
            _SQL_UPSERT_STATE, [_state_params(r, now) for r in dedupe_states(rows)]
        )

    @_guard
    async def upsert_state_values(self, rows: Sequence[StateRow]) -> None:
        conn = self._c()
        if not rows:
            return
        now = time.time()
        new: list[tuple[Any, ...]] = []
        old: list[tuple[Any, ...]] = []
        for r in dedupe_states(rows):
            values = (
                r.current_value_json,
                r.state,
                r.confidence,
                r.observation_count,
                r.last_change_ts,
                r.last_observation_ts,
                r.kind,
                r.version,
                r.updated_at or now,
                r.previous_state,
            )
            # a row written before (version > 1) is updated in place: one
            # primary-key probe instead of an insert attempt and then an update
            if r.version > 1:
                old.append((*values, r.identity_uuid, r.primitive))
            else:
                new.append((r.identity_uuid, r.primitive, *values))
        if old:
            await conn.executemany(_SQL_UPDATE_STATE_VALUES, old)
        if new:
            await conn.executemany(_SQL_UPSERT_STATE_VALUES, new)

    @_guard
    async def save_windows(self, windows: Sequence[tuple[str, str, str]], seq: int) -> None:
        conn = self._c()
        if windows:
            await conn.executemany(_SQL_SAVE_WINDOW, [(w, seq, i, p) for i, p, w in windows])

    @_guard
    async def max_observation_seq(self) -> int:
        rows = await self._c().execute_fetchall("SELECT coalesce(max(seq), 0) FROM observations")
        return int(rows[0][0])

    @_guard
    async def series_after(self, identity_uuid: str, primitive: str, seq: int) -> list[Any]:
        return list(
            await self._c().execute_fetchall(
                _SQL_SERIES_AFTER, (identity_uuid, int(seq), primitive)
            )
        )

    @_guard
    async def multi_actor_primitives(self, identity_uuids: Sequence[str]) -> dict[str, list[str]]:
        conn = self._c()
        if not identity_uuids:
            return {}
        rows = await conn.execute_fetchall(
            "SELECT identity_uuid, primitive FROM attribution_state "
            "WHERE state = 'multi_actor' AND identity_uuid IN (SELECT value FROM json_each(?)) "
            "ORDER BY identity_uuid, primitive",
            (_json_list(sorted(set(identity_uuids))),),
        )
        out: dict[str, list[str]] = {}
        for ident, prim in rows:
            out.setdefault(ident, []).append(prim)
        return out

    @_guard
    async def multi_actor_signatures(
        self, identity_uuids: Sequence[str], *, lock: bool = False
    ) -> dict[str, list[str]]:
        conn = self._c()
        if not identity_uuids:
            return {}
        rows = await conn.execute_fetchall(
            "SELECT identity_uuid, primitives FROM multi_actor_log "
            "WHERE identity_uuid IN (SELECT value FROM json_each(?)) ORDER BY identity_uuid",
            (_json_list(sorted(set(identity_uuids))),),
        )
        return {ident: list(json.loads(prims)) for ident, prims in rows}

    @_guard
    async def set_multi_actor_signature(
        self, identity_uuid: str, primitives: Sequence[str] | None, now: float
    ) -> None:
        conn = self._c()
        if primitives is None:
            await conn.execute(
                "DELETE FROM multi_actor_log WHERE identity_uuid = ?", (identity_uuid,)
            )
            return
        await conn.execute(
            "INSERT INTO multi_actor_log (identity_uuid, primitives, fired_at) VALUES (?, ?, ?) "
            "ON CONFLICT (identity_uuid) DO UPDATE SET primitives = excluded.primitives, "
            "fired_at = excluded.fired_at",
            (identity_uuid, _json_list(sorted(primitives)), now),
        )

    @_guard
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

    @_guard
    async def mark_merged(self, seqs: Sequence[int], identity_by_seq: dict[int, str]) -> None:
        conn = self._c()
        if not seqs:
            return
        await conn.executemany(
            "UPDATE observations SET merged = 1, identity_uuid = coalesce(?, identity_uuid) "
            "WHERE seq = ?",
            [(identity_by_seq.get(s), s) for s in sorted(set(seqs))],
        )

    # ---- the store ----------------------------------------------------------------------------

    def identity_ops(self) -> IdentityOps:
        return IdentityOps(self._run_sql, SQLITE)

    @_guard
    async def _run_sql(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return list(await self._c().execute_fetchall(sql, params))


class SqliteStore(Store):
    """A :class:`Store` on one SQLite file (WAL)."""

    dialect = "sqlite"

    #: Page cache per connection, KiB.
    cache_kib = 64 * 1024
    #: WAL pages after which a committing writer checkpoints itself (a stall);
    #: normally the background checkpointer keeps the WAL far below this.
    wal_autocheckpoint_pages = 50000
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
        self._wlock = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()
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
                if "locked" not in str(exc) and "busy" not in str(exc):
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
            await conn.execute("PRAGMA journal_size_limit = 67108864")
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
            await self._load_dedupe()
        except Exception as exc:
            await self.close()
            if _is_db_error(exc):
                raise _map_error(exc) from exc
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
        if self._background:  # rollbacks of cancelled BEGINs still queued
            await asyncio.gather(*self._background, return_exceptions=True)
        w, r = self._w, self._r
        self._w = self._r = None
        for conn in (r, w) if r is not w else (w,):
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

    async def ping(self) -> bool:
        try:
            rows = await self._reader().execute_fetchall("SELECT 1")
            return bool(rows and rows[0][0] == 1)
        except Exception:
            return False

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        conn = self._writer()
        await self._wlock.acquire()
        release = True
        try:
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except BaseException as exc:
                if not isinstance(exc, sqlite3.Error):
                    # Cancelled while BEGIN waits for the database lock: it still runs
                    # in the driver thread. Roll it back in the background, keeping
                    # the writer locked until then, so the caller returns at once.
                    release = False
                    task = asyncio.ensure_future(self._rollback_then_release(conn))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                if isinstance(exc, Exception) and _is_db_error(exc):
                    raise _map_error(exc) from exc
                raise
            tx = SqliteTx(conn, self.dedupe)
            try:
                yield tx
            except BaseException:
                tx._open = False
                self.dedupe.rollback()
                await self._rollback(conn)
                raise
            tx._open = False
            try:
                await conn.execute("COMMIT")
            except BaseException as exc:
                self.dedupe.rollback()
                await self._rollback(conn)
                if isinstance(exc, Exception) and _is_db_error(exc):
                    raise _map_error(exc) from exc
                raise
            self.dedupe.commit()
        finally:
            if release:
                self._wlock.release()

    async def _rollback_then_release(self, conn: Any) -> None:
        try:
            await self._rollback(conn)
        finally:
            self._wlock.release()

    @staticmethod
    async def _rollback(conn: Any) -> None:
        """Roll back unconditionally. aiosqlite runs queued statements even when
        the awaiting task was cancelled, so a cancelled ``BEGIN``/statement may
        still be pending: this ``ROLLBACK`` is queued behind it and undoes it."""
        try:
            await conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if "no transaction is active" not in str(exc):
                log.warning("sqlite rollback failed: %s", exc)
        except Exception:
            log.warning("sqlite rollback failed", exc_info=True)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Any]:
        """The writer for a short write outside :meth:`transaction` (BEGIN IMMEDIATE)."""
        async with self.transaction() as tx:
            yield tx._conn

    @_guard
    async def schema_version(self) -> int:
        rows = await self._reader().execute_fetchall(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        )
        return int(rows[0][0])

    # ---- attackers -------------------------------------------------------------------------
    @_guard
    async def get_attacker(self, uuid: str) -> AttackerRow | None:
        rows = await self._reader().execute_fetchall(
            f"SELECT {ATTACKER_COLS} FROM attackers WHERE uuid = ?", (uuid,)
        )
        return attacker_from_row(rows[0]) if rows else None

    @_guard
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

    @_guard
    async def list_attackers(
        self,
        *,
        limit: int,
        offset: int,
        sort: str = "last_seen",
        descending: bool = True,
        uuid: str | None = None,
        search: str | None = None,
        service: str | None = None,
        filters: AttackerFilter | None = None,
    ) -> tuple[list[AttackerSummary], int]:
        where, params = list_filters(
            _param,
            uuid=uuid,
            search=search,
            service=service,
            filters=filters,
            # ip_key() is registered on the reader connection (identifiers.ip_key)
            in_network=lambda add, net: f"ip_key(a.ip) BETWEEN {add(net[1])} AND {add(net[2])}",
        )
        n = len(params)
        sql = list_attackers_sql(sort, descending, where, _param(n + 1), _param(n + 2))
        conn = self._reader()
        rows = await conn.execute_fetchall(sql, (*params, int(limit), int(offset)))
        cnt = await conn.execute_fetchall(f"SELECT count(*) FROM attackers a {where}", params)
        total = int(cnt[0][0])
        return summaries_from_rows(rows), total

    @_guard
    async def attacker_evidence(self, attacker_uuids: Sequence[str]) -> dict[str, list[str]]:
        if not attacker_uuids:
            return {}
        ids = ", ".join(_param(i) for i in range(1, len(attacker_uuids) + 1))
        rows = await self._reader().execute_fetchall(
            EVIDENCE_SQL.format(ids=ids), list(attacker_uuids)
        )
        return evidence_from_rows(rows)

    @_guard
    async def overview_counts(self) -> dict[str, Any]:
        conn = self._reader()
        totals = await conn.execute_fetchall(OVERVIEW_TOTALS_SQL)
        states = await conn.execute_fetchall(OVERVIEW_STATES_SQL)
        return overview_counts_from_rows(next(iter(totals)), list(states))

    @_guard
    async def recent_identities(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._reader().execute_fetchall(recent_identities_sql(_param(1)), (limit,))
        return identities_from_rows(rows)

    def identity_reads(self) -> IdentityReads:
        return IdentityReads(self._read_sql, SQLITE)

    @_guard
    async def _read_sql(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return list(await self._reader().execute_fetchall(sql, params))

    @_guard
    async def attackers_of_identity(self, identity_uuid: str) -> list[str]:
        rows = await self._reader().execute_fetchall(
            "SELECT uuid FROM attackers WHERE identity_id = ? ORDER BY uuid", (identity_uuid,)
        )
        return [r[0] for r in rows]

    @_guard
    async def attacker_attribution(self, attacker_uuid: str) -> AttackerAttribution | None:
        rows = await self._reader().execute_fetchall(_SQL_ATTACKER_ATTRIBUTION, (attacker_uuid,))
        return attacker_attribution_from_rows(rows)

    # ---- attribution -----------------------------------------------------------------------
    @_guard
    async def attribution_for_identity(self, identity_uuid: str) -> list[StateRow]:
        rows = await self._reader().execute_fetchall(
            f"SELECT {STATE_COLS} FROM attribution_state WHERE identity_uuid = ? "
            "ORDER BY primitive",
            (identity_uuid,),
        )
        return [state_from_row(r) for r in rows]

    @_guard
    async def get_state(self, identity_uuid: str, primitive: str) -> StateRow | None:
        rows = await self._reader().execute_fetchall(
            f"SELECT {STATE_COLS}, window_seq FROM attribution_state "
            "WHERE identity_uuid = ? AND primitive = ?",
            (identity_uuid, primitive),
        )
        return state_from_row(rows[0]) if rows else None

    @_guard
    async def multi_actor_identities(self, min_primitives: int) -> dict[str, list[str]]:
        rows = await self._reader().execute_fetchall(
            "SELECT identity_uuid, primitive FROM attribution_state "
            "WHERE state = 'multi_actor' AND identity_uuid IN ("
            "  SELECT identity_uuid FROM attribution_state WHERE state = 'multi_actor' "
            "  GROUP BY identity_uuid HAVING count(*) >= ?) "
            "ORDER BY identity_uuid, primitive",
            (int(min_primitives),),
        )
        out: dict[str, list[str]] = {}
        for ident, prim in rows:
            out.setdefault(ident, []).append(prim)
        return out

    @_guard
    async def latest_observations(self, attacker_uuid: str) -> list[dict[str, Any]]:
        rows = await self._reader().execute_fetchall(
            "SELECT primitive, value, confidence, ts, source FROM ("
            "  SELECT primitive, value, confidence, ts, source, row_number() OVER ("
            "    PARTITION BY primitive ORDER BY ts DESC, seq DESC) AS rn "
            "  FROM observations WHERE attacker_uuid = ?) "
            "WHERE rn = 1 ORDER BY primitive",
            (attacker_uuid,),
        )
        return [
            {
                "primitive": r[0],
                "value": json.loads(r[1]),
                "confidence": r[2],
                "ts": r[3],
                "source": r[4],
            }
            for r in rows
        ]

    @_guard
    async def series_after(self, identity_uuid: str, primitive: str, seq: int) -> list[Any]:
        return list(
            await self._reader().execute_fetchall(
                _SQL_SERIES_AFTER, (identity_uuid, int(seq), primitive)
            )
        )

    @_guard
    async def recent_values(
        self, identity_uuid: str, primitive: str, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._reader().execute_fetchall(
            "SELECT ts, value, confidence, attacker_uuid FROM observations "
            "WHERE identity_uuid = ? AND primitive = ? ORDER BY ts DESC, seq DESC LIMIT ?",
            (identity_uuid, primitive, int(limit)),
        )
        return [
            {"ts": r[0], "value": json.loads(r[1]), "confidence": r[2], "attacker_uuid": r[3]}
            for r in reversed(list(rows))
        ]

    async def iter_observations(
        self, *, batch_size: int = 5000
    ) -> AsyncIterator[list[ObservationRow]]:
        sql = (
            f"SELECT {OBS_SELECT_COLS}, a.identity_id FROM observations o "
            "JOIN attackers a ON a.uuid = o.attacker_uuid "
            "WHERE a.identity_id IS NOT NULL ORDER BY o.ts, o.seq"
        )
        own = not self._memory
        try:
            conn = await self._connect() if own else self._reader()
        except Exception as exc:
            if _is_db_error(exc):
                raise _map_error(exc) from exc
            raise
        try:
            cur = await conn.execute(sql)
            try:
                while True:
                    batch = await cur.fetchmany(batch_size)
                    if not batch:
                        break
                    yield [observation_from_row(r) for r in batch]
            finally:
                await cur.close()
        except Exception as exc:
            if _is_db_error(exc):
                raise _map_error(exc) from exc
            raise
        finally:
            if own:
                await conn.close()

    @_guard
    async def count_observations(self) -> int:
        rows = await self._reader().execute_fetchall("SELECT count(*) FROM observations")
        return int(rows[0][0])

    @_guard
    async def pending_observations(self, *, after_seq: int, limit: int) -> list[ObservationRow]:
        rows = await self._reader().execute_fetchall(
            f"SELECT {OBS_SELECT_COLS}, o.identity_uuid FROM observations o "
            "WHERE o.merged = 0 AND o.seq > ? ORDER BY o.seq LIMIT ?",
            (int(after_seq), int(limit)),
        )
        return [observation_from_row(r) for r in rows]

    @_guard
    async def replace_all_states(self, rows: Sequence[StateRow]) -> None:
        now = time.time()
        async with self._write() as conn:
            await conn.execute("DELETE FROM attribution_state")
            await conn.execute("DELETE FROM multi_actor_log")
            if rows:
                await conn.executemany(
                    _SQL_INSERT_STATE, [_state_params(r, now) for r in dedupe_states(rows)]
                )

    async def stored_positions(self, batch: ValidatedBatch) -> list[int]:
        return self.dedupe.seen_batch(batch)

    # ---- retention ---------------------------------------------------------------------------
    @_guard
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

    @_guard
    async def retention_cut(self, before: float) -> int:
        rows = await self._reader().execute_fetchall(
            "SELECT coalesce(max(seq), 0) FROM observation_marks WHERE at < ?", (before,)
        )
        return int(rows[0][0])

    @_guard
    async def stale_window_keys(self, seq: int, limit: int) -> list[Key]:
        rows = await self._reader().execute_fetchall(
            "SELECT identity_uuid, primitive FROM attribution_state "
            "WHERE window_seq IS NOT NULL AND window_seq < ? LIMIT ?",
            (int(seq), int(limit)),
        )
        return [(r[0], r[1]) for r in rows]

    @_guard
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
            deleted += int(n[0][0])
            low = high + 1
        async with self._write() as conn:
            await conn.execute(
                "DELETE FROM observation_marks WHERE seq <= ? AND at < "
                "(SELECT max(at) FROM observation_marks WHERE seq <= ?)",
                (upto_seq, upto_seq),
            )
        return deleted

    @_guard
    async def dead_letter_count(self) -> int:
        rows = await self._reader().execute_fetchall("SELECT count(*) FROM dead_letters")
        return int(rows[0][0])

    # ---- users and auth --------------------------------------------------------------------
    @_guard
    async def create_user(self, user: UserRow) -> None:
        now = time.time()
        async with self._write() as conn:
            taken = await conn.execute_fetchall(
                "SELECT 1 FROM users WHERE username = ?", (user.username,)
            )
            if taken:
                raise StoreError(f"username {user.username!r} already exists")
            await conn.execute(
                f"INSERT INTO users ({USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user.uuid,
                    user.username,
                    user.password_hash,
                    user.role,
                    int(user.must_change_password),
                    int(user.disabled),
                    user.tokens_valid_from,
                    user.created_at or now,
                    user.updated_at or user.created_at or now,
                ),
            )

    @_guard
    async def get_user(self, uuid: str) -> UserRow | None:
        rows = await self._reader().execute_fetchall(
            f"SELECT {USER_COLS} FROM users WHERE uuid = ?", (uuid,)
        )
        return user_from_row(rows[0]) if rows else None

    @_guard
    async def get_user_by_name(self, username: str) -> UserRow | None:
        rows = await self._reader().execute_fetchall(
            f"SELECT {USER_COLS} FROM users WHERE username = ?", (username,)
        )
        return user_from_row(rows[0]) if rows else None

    @_guard
    async def list_users(self) -> list[UserRow]:
        rows = await self._reader().execute_fetchall(
            f"SELECT {USER_COLS} FROM users ORDER BY username"
        )
        return [user_from_row(r) for r in rows]

    @_guard
    async def update_user(self, uuid: str, **fields: Any) -> None:
        sets, params = user_update_sets(fields, lambda _: "?", bools_as_int=True)
        params.append(uuid)
        async with self._write() as conn:
            await conn.execute(f"UPDATE users SET {sets} WHERE uuid = ?", params)

    @_guard
    async def count_users(self) -> int:
        rows = await self._reader().execute_fetchall("SELECT count(*) FROM users")
        return int(rows[0][0])

    @_guard
    async def revoke_token(self, jti: str, expires_at: float) -> None:
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) "
                "ON CONFLICT (jti) DO UPDATE SET expires_at = "
                "max(revoked_tokens.expires_at, excluded.expires_at)",
                (jti, expires_at),
            )

    @_guard
    async def is_token_revoked(self, jti: str) -> bool:
        rows = await self._reader().execute_fetchall(
            "SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)
        )
        return bool(rows)

    @_guard
    async def add_ticket(self, ticket: TicketRow, *, max_outstanding: int, now: float) -> bool:
        async with self._write() as conn:
            await conn.execute("DELETE FROM sse_tickets WHERE expires_at <= ?", (now,))
            rows = await conn.execute_fetchall(
                "SELECT count(*) FROM sse_tickets WHERE user_uuid = ? AND expires_at > ?",
                (ticket.user_uuid, now),
            )
            if int(rows[0][0]) >= max_outstanding:
                return False
            await conn.execute(
                f"INSERT INTO sse_tickets ({TICKET_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ticket.ticket_hash,
                    ticket.user_uuid,
                    ticket.role,
                    ticket.expires_at,
                    ticket.created_at or now,
                    ticket.token_jti,
                    ticket.token_iat,
                    ticket.token_exp,
                ),
            )
            return True

    @_guard
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

    @_guard
    async def purge_expired(self, now: float) -> None:
        async with self._write() as conn:
            await conn.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?", (now,))
            await conn.execute("DELETE FROM sse_tickets WHERE expires_at <= ?", (now,))
