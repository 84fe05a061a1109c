"""The scale-out store: PostgreSQL through an asyncpg pool.

Batch writes are single set-based statements over ``unnest($1::text[], …)``
arrays, with native ``INSERT … ON CONFLICT``; row locks are taken with
``SELECT … ORDER BY key FOR UPDATE`` so concurrent workers lock in one order.
Transactions are READ COMMITTED (PostgreSQL's default): compare-and-set
updates re-check their ``WHERE`` against the newest committed row version.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from decnet_attr._core import ValidatedBatch
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
    StoreConflict,
    StoreError,
    StoreUnavailable,
    TicketRow,
    Tx,
    UserRow,
    truncate_payload,
)
from decnet_attr.store.identities import POSTGRES, IdentityOps, IdentityReads
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
    match_inserted,
    merge_attacker_items,
    migrate_postgres,
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

_CLOSE_TIMEOUT = 10.0


def _is_db_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            OSError,
            asyncio.TimeoutError,
        ),
    )


def _map_error(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        detail = getattr(exc, "detail", None)
        constraint = getattr(exc, "constraint_name", None)
        msg = f"integrity error ({constraint}): {exc}" if constraint else f"integrity error: {exc}"
        if detail:
            msg += f" ({detail})"
        return StoreError(msg)
    if isinstance(exc, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
        return StoreConflict(f"transaction conflict, retry: {exc}")
    if isinstance(exc, asyncpg.QueryCanceledError):
        return StoreError(f"query cancelled: {exc}")
    if isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now
            asyncpg.exceptions.InsufficientResourcesError,  # too many connections
            asyncpg.InternalClientError,  # protocol state broken by a lost connection
            OSError,
            asyncio.TimeoutError,
        ),
    ):
        return StoreUnavailable(f"postgresql unavailable: {exc!r}")
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg.DataError):
        text = str(exc)
        if "closed" in text or "closing" in text or "not connected" in text:
            return StoreUnavailable(f"postgresql unavailable: {exc}")
    return StoreError(f"postgresql error: {exc!r}")


def _param(i: int) -> str:
    """The ``i``-th (1-based) query parameter placeholder."""
    return f"${i}"


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


def _f(x: float | None) -> float | None:
    return None if x is None else float(x)


# ---- SQL ----------------------------------------------------------------------------------

_SQL_INSERT_NEW_ATTACKERS = """
INSERT INTO attackers (uuid, ip, first_seen, last_seen)
SELECT u.uuid, u.ip, u.f, u.l
FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[]) AS u(uuid, ip, f, l)
ORDER BY u.uuid
ON CONFLICT DO NOTHING
RETURNING uuid
"""

# Existing attackers widen first/last seen; attackers whose ip is taken by
# another attacker are inserted without ip.
_SQL_UPSERT_ATTACKERS_NO_IP = """
INSERT INTO attackers (uuid, ip, first_seen, last_seen)
SELECT u.uuid, NULL, u.f, u.l
FROM unnest($1::text[], $2::float8[], $3::float8[]) AS u(uuid, f, l)
ORDER BY u.uuid
ON CONFLICT (uuid) DO UPDATE SET
    first_seen = LEAST(attackers.first_seen, EXCLUDED.first_seen),
    last_seen = GREATEST(attackers.last_seen, EXCLUDED.last_seen)
WHERE EXCLUDED.first_seen < attackers.first_seen OR EXCLUDED.last_seen > attackers.last_seen
"""

_SQL_INSERT_OBS = f"""
INSERT INTO observations ({OBS_INSERT_COLS})
SELECT u.id, u.identity_ref, u.primitive, u.value, u.confidence, u.window_start_ts,
       u.window_end_ts, u.source, u.evidence_ref, u.envelope_v, u.ts, u.attacker_uuid,
       u.identity_uuid, u.merged
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[],
    $7::float8[], $8::text[], $9::text[], $10::int4[], $11::float8[], $12::text[],
    $13::text[], $14::bool[]
) WITH ORDINALITY AS u(id, identity_ref, primitive, value, confidence, window_start_ts,
                       window_end_ts, source, evidence_ref, envelope_v, ts, attacker_uuid,
                       identity_uuid, merged, ord)
ORDER BY u.ord
ON CONFLICT DO NOTHING
RETURNING id, evidence_ref, primitive
"""

_STATE_UNNEST = """
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::int4[], $7::float8[],
    $8::float8[], $9::text[], $10::text[], $11::int8[], $12::float8[], $13::text[]
) AS u(identity_uuid, primitive, current_value, state, confidence, observation_count,
       last_change_ts, last_observation_ts, kind, win, version, updated_at, previous_state)
"""

_SQL_INSERT_STATES = f"""
INSERT INTO attribution_state ({STATE_COLS})
SELECT u.identity_uuid, u.primitive, u.current_value, u.state, u.confidence,
       u.observation_count, u.last_change_ts, u.last_observation_ts, u.kind, u.win,
       u.version, u.updated_at, u.previous_state
{_STATE_UNNEST}
ORDER BY u.identity_uuid, u.primitive
"""

_SQL_UPSERT_STATES = (
    _SQL_INSERT_STATES
    + """
ON CONFLICT (identity_uuid, primitive) DO UPDATE SET
    current_value = EXCLUDED.current_value,
    state = EXCLUDED.state,
    confidence = EXCLUDED.confidence,
    observation_count = EXCLUDED.observation_count,
    last_change_ts = EXCLUDED.last_change_ts,
    last_observation_ts = EXCLUDED.last_observation_ts,
    kind = EXCLUDED.kind,
    "window" = EXCLUDED."window",
    version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at,
    previous_state = EXCLUDED.previous_state
"""
)


def _state_arrays(rows: Sequence[StateRow]) -> list[list[Any]]:
    now = time.time()
    rows = sorted(dedupe_states(rows), key=lambda r: (r.identity_uuid, r.primitive))
    return [
        [r.identity_uuid for r in rows],
        [r.primitive for r in rows],
        [r.current_value_json for r in rows],
        [r.state for r in rows],
        [float(r.confidence) for r in rows],
        [int(r.observation_count) for r in rows],
        [float(r.last_change_ts) for r in rows],
        [float(r.last_observation_ts) for r in rows],
        [r.kind for r in rows],
        [r.window_json for r in rows],
        [int(r.version) for r in rows],
        [float(r.updated_at or now) for r in rows],
        [r.previous_state for r in rows],
    ]


# ---- the transaction ----------------------------------------------------------------------


class PostgresTx(Tx):
    """Writes of one batch on one pooled connection inside one transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._open = True

    def _c(self) -> Any:
        if not self._open:
            raise StoreError("transaction is finished")
        return self._conn

    @_guard
    async def ensure_attackers(self, items: Sequence[tuple[str, str | None, float]]) -> None:
        conn = self._c()
        merged = merge_attacker_items(items)
        if not merged:
            return
        with_ip = [m for m in merged if m[1] is not None]
        inserted: set[str] = set()
        if with_ip:
            # Any unique conflict (uuid exists, or ip taken) -> not inserted here.
            rows = await conn.fetch(
                _SQL_INSERT_NEW_ATTACKERS,
                [m[0] for m in with_ip],
                [m[1] for m in with_ip],
                [m[2] for m in with_ip],
                [m[3] for m in with_ip],
            )
            inserted = {r[0] for r in rows}
        rest = [m for m in merged if m[0] not in inserted]
        if rest:
            await conn.execute(
                _SQL_UPSERT_ATTACKERS_NO_IP,
                [m[0] for m in rest],
                [m[2] for m in rest],
                [m[3] for m in rest],
            )

    @_guard
    async def ensure_identities(
        self, attacker_uuids: Sequence[str], now: float
    ) -> tuple[dict[str, str], list[str]]:
        conn = self._c()
        wanted = sorted(set(attacker_uuids))
        if not wanted:
            return {}, []
        rows = await conn.fetch(
            "SELECT uuid, identity_id, first_seen, last_seen FROM attackers "
            "WHERE uuid = ANY($1::text[])",
            wanted,
        )
        mapping: dict[str, str] = {}
        proposed: dict[str, str] = {}
        firsts: list[float] = []
        lasts: list[float] = []
        for auuid, ident, first, last in sorted(rows, key=lambda r: r[0]):
            if ident is not None:
                mapping[auuid] = ident
            else:
                proposed[auuid] = uuid_mod.uuid4().hex
                firsts.append(first)
                lasts.append(last)
        formed: list[str] = []
        if not proposed:
            return mapping, formed
        auuids = list(proposed)
        idents = [proposed[a] for a in auuids]
        await conn.execute(
            "INSERT INTO attacker_identities (uuid, schema_version, first_seen_at, "
            "last_seen_at, created_at, updated_at, observation_count) "
            "SELECT u.i, 1, u.f, u.l, $4, $4, 1 "
            "FROM unnest($1::text[], $2::float8[], $3::float8[]) AS u(i, f, l)",
            idents,
            firsts,
            lasts,
            float(now),
        )
        # Lock the attacker rows in key order (no deadlock between workers), then
        # compare-and-set: only an attacker still without identity takes ours.
        await conn.execute(
            "SELECT 1 FROM attackers WHERE uuid = ANY($1::text[]) ORDER BY uuid FOR UPDATE",
            auuids,
        )
        won_rows = await conn.fetch(
            "UPDATE attackers a SET identity_id = u.i "
            "FROM unnest($1::text[], $2::text[]) AS u(a, i) "
            "WHERE a.uuid = u.a AND a.identity_id IS NULL "
            "RETURNING a.uuid",
            auuids,
            idents,
        )
        won = {r[0] for r in won_rows}
        lost = [a for a in auuids if a not in won]
        for a in auuids:
            if a in won:
                mapping[a] = proposed[a]
                formed.append(proposed[a])
        if lost:
            actual = await conn.fetch(
                "SELECT uuid, identity_id FROM attackers WHERE uuid = ANY($1::text[])", lost
            )
            for auuid, ident in actual:
                if ident is not None:
                    mapping[auuid] = ident
            await conn.execute(
                "DELETE FROM attacker_identities WHERE uuid = ANY($1::text[])",
                [proposed[a] for a in lost],
            )
        return mapping, formed

    @_guard
    async def insert_observation_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[int]:
        conn = self._c()
        if not rows:
            return []
        cols = list(zip(*rows))
        inserted = await conn.fetch(
            _SQL_INSERT_OBS,
            list(cols[0]),
            list(cols[1]),
            list(cols[2]),
            list(cols[3]),
            [_f(v) for v in cols[4]],
            [_f(v) for v in cols[5]],
            [_f(v) for v in cols[6]],
            list(cols[7]),
            list(cols[8]),
            [int(v) for v in cols[9]],
            [float(v) for v in cols[10]],
            list(cols[11]),
            list(cols[12]),
            [bool(v) for v in cols[13]],
        )
        return match_inserted(rows, inserted)

    @_guard
    async def load_states(self, keys: Sequence[Key], *, lock: bool = False) -> dict[Key, StateRow]:
        conn = self._c()
        if not keys:
            return {}
        cols = ", ".join(f"s.{c.strip()}" for c in STATE_COLS.split(","))
        sql = (
            f"SELECT {cols} FROM attribution_state s "
            "JOIN unnest($1::text[], $2::text[]) AS k(i, p) "
            "ON s.identity_uuid = k.i AND s.primitive = k.p "
            "ORDER BY s.identity_uuid, s.primitive"
        )
        if lock:
            sql += " FOR UPDATE OF s"
        uniq = sorted(set(keys))
        rows = await conn.fetch(sql, [k[0] for k in uniq], [k[1] for k in uniq])
        return {(r[0], r[1]): state_from_row(r) for r in rows}

    @_guard
    async def upsert_states(self, rows: Sequence[StateRow]) -> None:
        conn = self._c()
        if not rows:
            return
        await conn.execute(_SQL_UPSERT_STATES, *_state_arrays(rows))

    @_guard
    async def multi_actor_primitives(self, identity_uuids: Sequence[str]) -> dict[str, list[str]]:
        conn = self._c()
        if not identity_uuids:
            return {}
        rows = await conn.fetch(
            "SELECT identity_uuid, primitive FROM attribution_state "
            "WHERE state = 'multi_actor' AND identity_uuid = ANY($1::text[]) "
            "ORDER BY identity_uuid, primitive",
            sorted(set(identity_uuids)),
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
        sql = (
            "SELECT identity_uuid, primitives FROM multi_actor_log "
            "WHERE identity_uuid = ANY($1::text[]) ORDER BY identity_uuid"
        )
        if lock:
            sql += " FOR UPDATE"
        rows = await conn.fetch(sql, sorted(set(identity_uuids)))
        return {ident: list(json.loads(prims)) for ident, prims in rows}

    @_guard
    async def set_multi_actor_signature(
        self, identity_uuid: str, primitives: Sequence[str] | None, now: float
    ) -> None:
        conn = self._c()
        if primitives is None:
            await conn.execute(
                "DELETE FROM multi_actor_log WHERE identity_uuid = $1", identity_uuid
            )
            return
        await conn.execute(
            "INSERT INTO multi_actor_log (identity_uuid, primitives, fired_at) "
            "VALUES ($1, $2, $3) ON CONFLICT (identity_uuid) DO UPDATE SET "
            "primitives = EXCLUDED.primitives, fired_at = EXCLUDED.fired_at",
            identity_uuid,
            json.dumps(sorted(primitives), separators=(",", ":")),
            float(now),
        )

    @_guard
    async def insert_dead_letters(self, rows: Sequence[DeadLetter]) -> None:
        conn = self._c()
        if not rows:
            return
        now = time.time()
        await conn.execute(
            "INSERT INTO dead_letters (received_at, topic, event_id, reason, payload) "
            "SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::text[])",
            [float(r.received_at or now) for r in rows],
            [r.topic for r in rows],
            [r.event_id for r in rows],
            [r.reason for r in rows],
            [truncate_payload(r.payload_json) for r in rows],
        )

    @_guard
    async def mark_merged(self, seqs: Sequence[int], identity_by_seq: dict[int, str]) -> None:
        conn = self._c()
        if not seqs:
            return
        uniq = sorted(set(seqs))
        await conn.execute(
            "UPDATE observations o SET merged = TRUE, "
            "identity_uuid = COALESCE(u.i, o.identity_uuid) "
            "FROM unnest($1::int8[], $2::text[]) AS u(s, i) WHERE o.seq = u.s",
            uniq,
            [identity_by_seq.get(s) for s in uniq],
        )

    # ---- the store ----------------------------------------------------------------------------

    def identity_ops(self) -> IdentityOps:
        return IdentityOps(self._run_sql, POSTGRES)

    @_guard
    async def _run_sql(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return list(await self._c().fetch(sql, *params))


class PostgresStore(Store):
    """A :class:`Store` on PostgreSQL (asyncpg pool)."""

    dialect = "postgresql"

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0
    ) -> None:
        self.url = dsn
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self._pool: Any = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
            )
            async with self._pool.acquire() as conn:
                await migrate_postgres(conn)
        except Exception as exc:
            await self.close()
            if _is_db_error(exc):
                raise _map_error(exc) from exc
            raise
        log.debug("postgresql store open (pool %d..%d)", self.min_size, self.max_size)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT)
        except Exception:
            log.warning("postgresql pool did not close cleanly; terminating", exc_info=True)
            pool.terminate()

    def _p(self) -> Any:
        if self._pool is None:
            raise StoreUnavailable("postgresql store is not open")
        return self._pool

    async def ping(self) -> bool:
        try:
            async with self._p().acquire() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
        except Exception:
            return False

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        pool = self._p()
        try:
            conn = await pool.acquire()
        except Exception as exc:
            if _is_db_error(exc):
                raise _map_error(exc) from exc
            raise
        try:
            yield conn
        finally:
            try:
                await pool.release(conn)
            except Exception:
                log.debug("releasing a postgresql connection failed", exc_info=True)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        async with self._conn() as conn:
            tr = conn.transaction()
            try:
                await tr.start()
            except Exception as exc:
                if _is_db_error(exc):
                    raise _map_error(exc) from exc
                raise
            tx = PostgresTx(conn)
            try:
                yield tx
            except BaseException:
                tx._open = False
                try:
                    await tr.rollback()
                except Exception:
                    log.warning("postgresql rollback failed", exc_info=True)
                raise
            tx._open = False
            try:
                await tr.commit()
            except Exception as exc:
                # A failed COMMIT leaves nothing applied; release() resets the
                # connection (ROLLBACK) if the transaction is still open.
                if _is_db_error(exc):
                    raise _map_error(exc) from exc
                raise

    @_guard
    async def schema_version(self) -> int:
        async with self._conn() as conn:
            v = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return int(v)

    # ---- attackers -------------------------------------------------------------------------
    @_guard
    async def get_attacker(self, uuid: str) -> AttackerRow | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {ATTACKER_COLS} FROM attackers WHERE uuid = $1", uuid
            )
        return attacker_from_row(row) if row is not None else None

    @_guard
    async def register_attacker(
        self, ip: str, uuid: str | None, now: float
    ) -> tuple[AttackerRow, bool]:
        new_uuid = uuid if uuid is not None else str(uuid_mod.uuid4())
        async with self._conn() as conn:
            for _attempt in range(5):
                try:
                    row = await conn.fetchrow(
                        "INSERT INTO attackers (uuid, ip, first_seen, last_seen) "
                        "VALUES ($1, $2, $3, $3) ON CONFLICT (ip) DO NOTHING "
                        f"RETURNING {ATTACKER_COLS}",
                        new_uuid,
                        ip,
                        float(now),
                    )
                except asyncpg.UniqueViolationError:
                    # The uuid exists (the ip is free): adopt the ip if it has none.
                    existing = await conn.fetchrow(
                        f"SELECT {ATTACKER_COLS} FROM attackers WHERE uuid = $1", new_uuid
                    )
                    if existing is None:
                        continue
                    if existing["ip"] is not None and existing["ip"] != ip:
                        raise StoreError(
                            f"attacker {new_uuid} is already registered with another ip"
                        ) from None
                    if existing["ip"] == ip:
                        return attacker_from_row(existing), False
                    try:
                        row = await conn.fetchrow(
                            "UPDATE attackers SET ip = $2 WHERE uuid = $1 AND ip IS NULL "
                            f"RETURNING {ATTACKER_COLS}",
                            new_uuid,
                            ip,
                        )
                    except asyncpg.UniqueViolationError:
                        continue  # someone registered the ip meanwhile: look it up
                    if row is not None:
                        return attacker_from_row(row), False
                    continue
                if row is not None:
                    return attacker_from_row(row), True
                row = await conn.fetchrow(
                    f"SELECT {ATTACKER_COLS} FROM attackers WHERE ip = $1", ip
                )
                if row is not None:
                    return attacker_from_row(row), False
        raise StoreError(f"could not register attacker for ip {ip!r} (concurrent changes)")

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
            in_network=lambda add, net: f"inet(a.ip) <<= {add(net[0])}::cidr",
        )
        n = len(params)
        sql = list_attackers_sql(sort, descending, where, _param(n + 1), _param(n + 2))
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *params, int(limit), int(offset))
            total = int(await conn.fetchval(f"SELECT count(*) FROM attackers a {where}", *params))
        return summaries_from_rows(rows), total

    @_guard
    async def attacker_evidence(self, attacker_uuids: Sequence[str]) -> dict[str, list[str]]:
        if not attacker_uuids:
            return {}
        ids = ", ".join(_param(i) for i in range(1, len(attacker_uuids) + 1))
        async with self._conn() as conn:
            rows = await conn.fetch(EVIDENCE_SQL.format(ids=ids), *attacker_uuids)
        return evidence_from_rows(rows)

    @_guard
    async def overview_counts(self) -> dict[str, Any]:
        async with self._conn() as conn:
            totals = await conn.fetchrow(OVERVIEW_TOTALS_SQL)
            states = await conn.fetch(OVERVIEW_STATES_SQL)
        return overview_counts_from_rows(tuple(totals), states)

    @_guard
    async def recent_identities(self, limit: int) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            rows = await conn.fetch(recent_identities_sql(_param(1)), int(limit))
        return identities_from_rows(rows)

    def identity_reads(self) -> IdentityReads:
        return IdentityReads(self._read_sql, POSTGRES)

    @_guard
    async def _read_sql(self, sql: str, params: Sequence[Any]) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *params))

    @_guard
    async def attackers_of_identity(self, identity_uuid: str) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT uuid FROM attackers WHERE identity_id = $1 ORDER BY uuid", identity_uuid
            )
        return [r[0] for r in rows]

    @_guard
    async def attacker_attribution(self, attacker_uuid: str) -> AttackerAttribution | None:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT a.identity_id, s.primitive, s.current_value, s.state, s.confidence, "
                "s.observation_count, s.last_change_ts, s.last_observation_ts "
                "FROM attackers a LEFT JOIN attribution_state s "
                "ON s.identity_uuid = a.identity_id "
                'WHERE a.uuid = $1 ORDER BY s.primitive COLLATE "C"',
                attacker_uuid,
            )
        return attacker_attribution_from_rows(rows)

    # ---- attribution -----------------------------------------------------------------------
    @_guard
    async def attribution_for_identity(self, identity_uuid: str) -> list[StateRow]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {STATE_COLS} FROM attribution_state WHERE identity_uuid = $1 "
                "ORDER BY primitive",
                identity_uuid,
            )
        return [state_from_row(r) for r in rows]

    @_guard
    async def get_state(self, identity_uuid: str, primitive: str) -> StateRow | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {STATE_COLS} FROM attribution_state "
                "WHERE identity_uuid = $1 AND primitive = $2",
                identity_uuid,
                primitive,
            )
        return state_from_row(row) if row is not None else None

    @_guard
    async def multi_actor_identities(self, min_primitives: int) -> dict[str, list[str]]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT identity_uuid, primitive FROM attribution_state "
                "WHERE state = 'multi_actor' AND identity_uuid IN ("
                "  SELECT identity_uuid FROM attribution_state WHERE state = 'multi_actor' "
                "  GROUP BY identity_uuid HAVING count(*) >= $1) "
                "ORDER BY identity_uuid, primitive",
                int(min_primitives),
            )
        out: dict[str, list[str]] = {}
        for ident, prim in rows:
            out.setdefault(ident, []).append(prim)
        return out

    @_guard
    async def latest_observations(self, attacker_uuid: str) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT o.primitive, o.value, o.confidence, o.ts, o.source "
                "FROM (SELECT DISTINCT primitive FROM observations WHERE attacker_uuid = $1) p "
                "CROSS JOIN LATERAL ("
                "  SELECT i.primitive, i.value, i.confidence, i.ts, i.source FROM observations i "
                "  WHERE i.attacker_uuid = $1 AND i.primitive = p.primitive "
                "  ORDER BY i.ts DESC, i.seq DESC LIMIT 1) o "
                "ORDER BY o.primitive",
                attacker_uuid,
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
    async def recent_values(
        self, identity_uuid: str, primitive: str, limit: int
    ) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT ts, value, confidence, attacker_uuid FROM observations "
                "WHERE identity_uuid = $1 AND primitive = $2 "
                "ORDER BY ts DESC, seq DESC LIMIT $3",
                identity_uuid,
                primitive,
                int(limit),
            )
        return [
            {"ts": r[0], "value": json.loads(r[1]), "confidence": r[2], "attacker_uuid": r[3]}
            for r in reversed(rows)
        ]

    async def iter_observations(
        self, *, batch_size: int = 5000
    ) -> AsyncIterator[list[ObservationRow]]:
        sql = (
            f"SELECT {OBS_SELECT_COLS}, a.identity_id FROM observations o "
            "JOIN attackers a ON a.uuid = o.attacker_uuid "
            "WHERE a.identity_id IS NOT NULL ORDER BY o.ts, o.seq"
        )
        try:
            async with self._conn() as conn, conn.transaction(readonly=True):
                cur = await conn.cursor(sql)
                while True:
                    batch = await cur.fetch(batch_size)
                    if not batch:
                        break
                    yield [observation_from_row(r) for r in batch]
        except Exception as exc:
            if _is_db_error(exc):
                raise _map_error(exc) from exc
            raise

    @_guard
    async def count_observations(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM observations"))

    @_guard
    async def pending_observations(self, *, after_seq: int, limit: int) -> list[ObservationRow]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {OBS_SELECT_COLS}, o.identity_uuid FROM observations o "
                "WHERE NOT o.merged AND o.seq > $1 ORDER BY o.seq LIMIT $2",
                int(after_seq),
                int(limit),
            )
        return [observation_from_row(r) for r in rows]

    @_guard
    async def replace_all_states(self, rows: Sequence[StateRow]) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("LOCK TABLE attribution_state, multi_actor_log IN EXCLUSIVE MODE")
            await conn.execute("DELETE FROM attribution_state")
            await conn.execute("DELETE FROM multi_actor_log")
            if rows:
                await conn.execute(_SQL_INSERT_STATES, *_state_arrays(rows))

    @_guard
    async def stored_positions(self, batch: ValidatedBatch) -> list[int]:
        rows = batch.rows()
        if not rows:
            return []
        async with self._conn() as conn:
            found = await conn.fetch(
                "SELECT u.i FROM unnest($1::text[], $2::text[], $3::text[]) "
                "WITH ORDINALITY AS u(id, ev, prim, i) WHERE EXISTS ("
                "SELECT 1 FROM observations o WHERE o.id = u.id) OR EXISTS ("
                "SELECT 1 FROM observations o WHERE o.evidence_ref = u.ev AND o.primitive = u.prim)",
                [r[0] for r in rows],
                [r[8] for r in rows],
                [r[2] for r in rows],
            )
        return sorted(int(r[0]) - 1 for r in found)

    # ---- retention ---------------------------------------------------------------------------
    @_guard
    async def mark_observations(self, now: float) -> int:
        async with self._conn() as conn:
            return int(
                await conn.fetchval(
                    "INSERT INTO observation_marks (at, seq) "
                    "SELECT $1, coalesce(max(seq), 0) FROM observations "
                    "ON CONFLICT (at) DO UPDATE SET seq = EXCLUDED.seq RETURNING seq",
                    now,
                )
            )

    @_guard
    async def retention_cut(self, before: float) -> int:
        async with self._conn() as conn:
            return int(
                await conn.fetchval(
                    "SELECT coalesce(max(seq), 0) FROM observation_marks WHERE at < $1", before
                )
            )

    @_guard
    async def stale_window_keys(self, seq: int, limit: int) -> list[Key]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT identity_uuid, primitive FROM attribution_state "
                "WHERE window_seq IS NOT NULL AND window_seq < $1 LIMIT $2",
                int(seq),
                int(limit),
            )
        return [(r[0], r[1]) for r in rows]

    @_guard
    async def prune_observations(self, upto_seq: int, *, chunk: int = 50_000) -> int:
        deleted = 0
        async with self._conn() as conn:
            low = int(await conn.fetchval("SELECT coalesce(min(seq), 0) FROM observations"))
            while low and low <= upto_seq:
                high = min(low + chunk - 1, upto_seq)
                status = await conn.execute(
                    "DELETE FROM observations WHERE seq BETWEEN $1 AND $2 AND merged",
                    low,
                    high,
                )
                deleted += int(status.split()[-1])
                low = high + 1
            await conn.execute(
                "DELETE FROM observation_marks WHERE seq <= $1 AND at < "
                "(SELECT max(at) FROM observation_marks WHERE seq <= $1)",
                upto_seq,
            )
        return deleted

    @_guard
    async def dead_letter_count(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM dead_letters"))

    # ---- users and auth --------------------------------------------------------------------
    @_guard
    async def create_user(self, user: UserRow) -> None:
        now = time.time()
        async with self._conn() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO users ({USER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    user.uuid,
                    user.username,
                    user.password_hash,
                    user.role,
                    bool(user.must_change_password),
                    bool(user.disabled),
                    _f(user.tokens_valid_from),
                    float(user.created_at or now),
                    float(user.updated_at or user.created_at or now),
                )
            except asyncpg.UniqueViolationError as exc:
                if getattr(exc, "constraint_name", "") == "users_username_key":
                    raise StoreError(f"username {user.username!r} already exists") from exc
                raise StoreError(f"user {user.uuid!r} already exists") from exc

    @_guard
    async def get_user(self, uuid: str) -> UserRow | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT {USER_COLS} FROM users WHERE uuid = $1", uuid)
        return user_from_row(row) if row is not None else None

    @_guard
    async def get_user_by_name(self, username: str) -> UserRow | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {USER_COLS} FROM users WHERE username = $1", username
            )
        return user_from_row(row) if row is not None else None

    @_guard
    async def list_users(self) -> list[UserRow]:
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT {USER_COLS} FROM users ORDER BY username")
        return [user_from_row(r) for r in rows]

    @_guard
    async def update_user(self, uuid: str, **fields: Any) -> None:
        sets, params = user_update_sets(fields, _param, bools_as_int=False)
        params.append(uuid)
        async with self._conn() as conn:
            await conn.execute(f"UPDATE users SET {sets} WHERE uuid = ${len(params)}", *params)

    @_guard
    async def count_users(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM users"))

    @_guard
    async def revoke_token(self, jti: str, expires_at: float) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) "
                "ON CONFLICT (jti) DO UPDATE SET expires_at = "
                "GREATEST(revoked_tokens.expires_at, EXCLUDED.expires_at)",
                jti,
                float(expires_at),
            )

    @_guard
    async def is_token_revoked(self, jti: str) -> bool:
        async with self._conn() as conn:
            return bool(await conn.fetchval("SELECT 1 FROM revoked_tokens WHERE jti = $1", jti))

    @_guard
    async def add_ticket(self, ticket: TicketRow, *, max_outstanding: int, now: float) -> bool:
        async with self._conn() as conn, conn.transaction():
            # Serialise ticket issuance per user so the cap holds under concurrency.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('sse-ticket:' || $1, 0))",
                ticket.user_uuid,
            )
            await conn.execute("DELETE FROM sse_tickets WHERE expires_at <= $1", float(now))
            n = await conn.fetchval(
                "SELECT count(*) FROM sse_tickets WHERE user_uuid = $1 AND expires_at > $2",
                ticket.user_uuid,
                float(now),
            )
            if int(n) >= max_outstanding:
                return False
            await conn.execute(
                f"INSERT INTO sse_tickets ({TICKET_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                ticket.ticket_hash,
                ticket.user_uuid,
                ticket.role,
                float(ticket.expires_at),
                float(ticket.created_at or now),
                ticket.token_jti,
                None if ticket.token_iat is None else float(ticket.token_iat),
                None if ticket.token_exp is None else float(ticket.token_exp),
            )
            return True

    @_guard
    async def redeem_ticket(self, ticket_hash: str, now: float) -> TicketRow | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"DELETE FROM sse_tickets WHERE ticket_hash = $1 RETURNING {TICKET_COLS}",
                ticket_hash,
            )
        if row is None:
            return None
        ticket = ticket_from_row(row)
        return ticket if ticket.expires_at > now else None

    @_guard
    async def purge_expired(self, now: float) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("DELETE FROM revoked_tokens WHERE expires_at <= $1", float(now))
            await conn.execute("DELETE FROM sse_tickets WHERE expires_at <= $1", float(now))


__all__ = ["PostgresStore", "PostgresTx"]
