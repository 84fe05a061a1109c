"""The SQL store, written once: every query both backends run alike.

:class:`SqlStore` and :class:`SqlTx` hold the statements (``?`` placeholders
and the tokens of :mod:`decnet_attr.store.dialect`) and the row mapping; a
backend subclasses them with its :class:`~decnet_attr.store.dialect.Dialect`,
how it hands out connections (:meth:`SqlStore._read`, :meth:`SqlStore._write`)
and the statements that really differ: the batch writes of the worker's
transaction (``executemany`` on SQLite, one set-based ``unnest`` statement on
PostgreSQL), attacker registration, retention, and the lifecycle.

To add a query: write it here once with ``?`` placeholders (``IN_LIST(?)``
for a list, bound with ``self._dialect.list_param``) and map its rows with
a function of :mod:`decnet_attr.store.rows`.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

from decnet_attr.store.base import Store, Tx
from decnet_attr.store.dialect import Dialect, guard
from decnet_attr.store.errors import StoreError, StoreIntegrity
from decnet_attr.store.identities import IdentityOps, IdentityReads
from decnet_attr.store.models import (
    AttackerAttribution,
    AttackerFilter,
    AttackerRow,
    AttackerSummary,
    Key,
    ObservationRow,
    StateRow,
    TicketRow,
    UserRow,
)
from decnet_attr.store.queries import (
    EVIDENCE_SQL,
    LATEST_OBSERVATIONS_SQL,
    OVERVIEW_STATES_SQL,
    OVERVIEW_TOTALS_SQL,
    list_attackers_sql,
    list_filters,
    recent_identities_sql,
    user_update_sets,
)
from decnet_attr.store.rows import (
    ATTACKER_COLS,
    OBS_SELECT_COLS,
    STATE_COLS,
    TICKET_COLS,
    USER_COLS,
    attacker_attribution_from_rows,
    attacker_from_row,
    evidence_from_rows,
    identities_from_rows,
    observation_from_row,
    overview_counts_from_rows,
    state_from_row,
    summaries_from_rows,
    ticket_params,
    user_from_row,
    user_params,
)

#: The multi-actor primitives of some identities (found by the primary key).
MULTI_ACTOR_PRIMITIVES_SQL = (
    "SELECT identity_uuid, primitive FROM attribution_state "
    "WHERE UNINDEXED state = 'multi_actor' AND identity_uuid IN_LIST(?) "
    "ORDER BY identity_uuid, primitive"
)

#: The runs that hold a seq in ``?1 .. ?2`` (from the one holding ``?1``).
_RUNS_MEETING = (
    "first_seq BETWEEN coalesce((SELECT max(first_seq) FROM observation_runs "
    "WHERE first_seq <= ?1), ?1) AND ?2"
)
#: After retention deleted the rows of seqs ``?1 .. ?2``: the runs the range
#: touched count their rows again, and those left without rows go.
PRUNE_RUNS_SQL = (
    "UPDATE observation_runs SET n = (SELECT count(*) FROM observations o "
    "WHERE o.seq BETWEEN observation_runs.first_seq AND observation_runs.last_seq) "
    f"WHERE {_RUNS_MEETING}",
    f"DELETE FROM observation_runs WHERE {_RUNS_MEETING} AND n = 0",
)
#: After pruning up to seq ``?1``: the marks that no longer bound anything.
PRUNE_MARKS_SQL = (
    "DELETE FROM observation_marks WHERE seq <= ?1 AND at < "
    "(SELECT max(at) FROM observation_marks WHERE seq <= ?1)"
)
#: The run holding seq ``?2`` takes identity ``?1`` (when not null) as its
#: row is merged: a row not merged yet has a run of its own.
MERGED_RUN_SQL = (
    "UPDATE observation_runs SET identity_uuid = coalesce(?1, identity_uuid) "
    "WHERE first_seq = (SELECT max(first_seq) FROM observation_runs WHERE first_seq <= ?2)"
)

_SERIES_AFTER = (
    "SELECT value, ts FROM observations_by_run "
    "WHERE run_identity = ?1 AND run_last > ?2 AND seq > ?2 AND primitive = ?3 AND IS_MERGED ORDER BY seq"
)


def _by_identity(rows: Sequence[Sequence[Any]]) -> dict[str, list[str]]:
    """``(identity, primitive)`` rows (ordered) as ``{identity: [primitives]}``."""
    out: dict[str, list[str]] = {}
    for ident, prim in rows:
        out.setdefault(ident, []).append(prim)
    return out


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


class SqlTx(Tx):
    """The transaction's statements both backends share (on one connection)."""

    _dialect: ClassVar[Dialect]

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._open = True

    def _c(self) -> Any:
        if not self._open:
            raise StoreError("transaction is finished")
        return self._conn

    def _driver_error(self, exc: BaseException) -> StoreError | None:
        return self._dialect.map_error(exc, self._conn)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._dialect.rows(self._c(), self._dialect.sql(sql), params)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._dialect.execute(self._c(), self._dialect.sql(sql), params)

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose result nobody reads: :meth:`_execute`, which a
        backend may defer until the commit (SQLite's native writer)."""
        await self._execute(sql, params)

    @guard
    async def max_observation_seq(self) -> int:
        rows = await self._rows("SELECT coalesce(max(seq), 0) FROM observations")
        return int(rows[0][0])

    @guard
    async def series_after(self, identity_uuid: str, primitive: str, seq: int) -> list[Any]:
        return await self._rows(_SERIES_AFTER, (identity_uuid, int(seq), primitive))

    @guard
    async def multi_actor_primitives(self, identity_uuids: Sequence[str]) -> dict[str, list[str]]:
        if not identity_uuids:
            return {}
        rows = await self._rows(
            MULTI_ACTOR_PRIMITIVES_SQL, (self._dialect.list_param(sorted(set(identity_uuids))),)
        )
        return _by_identity(rows)

    @guard
    async def multi_actor_signatures(
        self, identity_uuids: Sequence[str], *, lock: bool = False
    ) -> dict[str, list[str]]:
        if not identity_uuids:
            return {}
        rows = await self._rows(
            "SELECT identity_uuid, primitives FROM multi_actor_log "
            "WHERE identity_uuid IN_LIST(?) ORDER BY identity_uuid"
            + (self._dialect.for_update if lock else ""),
            (self._dialect.list_param(sorted(set(identity_uuids))),),
        )
        return {ident: list(json.loads(prims)) for ident, prims in rows}

    @guard
    async def set_multi_actor_signature(
        self, identity_uuid: str, primitives: Sequence[str] | None, now: float
    ) -> None:
        if primitives is None:
            await self._write(
                "DELETE FROM multi_actor_log WHERE identity_uuid = ?", (identity_uuid,)
            )
            return
        await self._write(
            "INSERT INTO multi_actor_log (identity_uuid, primitives, fired_at) VALUES (?, ?, ?) "
            "ON CONFLICT (identity_uuid) DO UPDATE SET primitives = excluded.primitives, "
            "fired_at = excluded.fired_at",
            (identity_uuid, json.dumps(sorted(primitives), separators=(",", ":")), float(now)),
        )

    def identity_ops(self) -> IdentityOps:
        return IdentityOps(self._run_sql, self._dialect)

    @guard
    async def _run_sql(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return await self._dialect.rows(self._c(), sql, params)


class SqlStore(Store):
    """The reads and small writes both backends share."""

    _dialect: ClassVar[Dialect]

    @abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Any]:
        """A connection for reads (outside any transaction)."""

    @abstractmethod
    def _write(self) -> AbstractAsyncContextManager[Any]:
        """A connection inside a short write transaction (committed on exit)."""

    def _driver_error(self, exc: BaseException) -> StoreError | None:
        return self._dialect.map_error(exc)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read (shared SQL)."""
        async with self._read() as conn:
            return await self._dialect.rows(conn, self._dialect.sql(sql), params)

    async def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        rows = await self._rows(sql, params)
        return int(rows[0][0])

    async def _write_all(self, *statements: tuple[str, Sequence[Any]]) -> None:
        """Run statements (shared SQL) in one write transaction."""
        async with self._write() as conn:
            for sql, params in statements:
                await self._dialect.execute(conn, self._dialect.sql(sql), params)

    async def ping(self) -> bool:
        try:
            rows = await self._rows("SELECT 1")
            return bool(rows and rows[0][0] == 1)
        except Exception:
            return False

    @guard
    async def schema_version(self) -> int:
        return await self._count("SELECT coalesce(max(version), 0) FROM schema_migrations")

    # ---- attackers -------------------------------------------------------------------------
    @guard
    async def get_attacker(self, uuid: str) -> AttackerRow | None:
        rows = await self._rows(f"SELECT {ATTACKER_COLS} FROM attackers WHERE uuid = ?", (uuid,))
        return attacker_from_row(rows[0]) if rows else None

    @guard
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
        d = self._dialect
        where, params = list_filters(
            d.param,
            uuid=uuid,
            search=search,
            service=service,
            filters=filters,
            in_network=d.in_network,
        )
        n = len(params)
        sql = list_attackers_sql(sort, descending, where, d.param(n + 1), d.param(n + 2))
        async with self._read() as conn:
            rows = await d.rows(conn, d.sql(sql), (*params, int(limit), int(offset)))
            cnt = await d.rows(conn, d.sql(f"SELECT count(*) FROM attackers a {where}"), params)
        return summaries_from_rows(rows), int(cnt[0][0])

    @guard
    async def attacker_evidence(self, attacker_uuids: Sequence[str]) -> dict[str, list[str]]:
        if not attacker_uuids:
            return {}
        rows = await self._rows(
            EVIDENCE_SQL.format(ids=_placeholders(len(attacker_uuids))), list(attacker_uuids)
        )
        return evidence_from_rows(rows)

    @guard
    async def overview_counts(self) -> dict[str, Any]:
        async with self._read() as conn:
            totals = await self._dialect.rows(conn, OVERVIEW_TOTALS_SQL)
            states = await self._dialect.rows(conn, OVERVIEW_STATES_SQL)
        return overview_counts_from_rows(tuple(totals[0]), states)

    @guard
    async def attacker_attribution(self, attacker_uuid: str) -> AttackerAttribution | None:
        rows = await self._rows(
            "SELECT a.identity_id, s.primitive, s.current_value, s.state, s.confidence, "
            "s.observation_count, s.last_change_ts, s.last_observation_ts "
            "FROM attackers a LEFT JOIN attribution_state s ON s.identity_uuid = a.identity_id "
            "WHERE a.uuid = ? ORDER BY s.primitive BYTE_ORDER",
            (attacker_uuid,),
        )
        return attacker_attribution_from_rows(rows)

    # ---- identities ------------------------------------------------------------------------
    @guard
    async def recent_identities(self, limit: int) -> list[dict[str, Any]]:
        return identities_from_rows(await self._rows(recent_identities_sql("?"), (int(limit),)))

    def identity_reads(self) -> IdentityReads:
        return IdentityReads(self._read_sql, self._dialect)

    @guard
    async def _read_sql(self, sql: str, params: Sequence[Any]) -> list[Any]:
        async with self._read() as conn:
            return await self._dialect.rows(conn, sql, params)

    @guard
    async def attackers_of_identity(self, identity_uuid: str) -> list[str]:
        rows = await self._rows(
            "SELECT uuid FROM attackers WHERE identity_id = ? ORDER BY uuid", (identity_uuid,)
        )
        return [r[0] for r in rows]

    # ---- attribution -----------------------------------------------------------------------
    @guard
    async def attribution_for_identity(self, identity_uuid: str) -> list[StateRow]:
        rows = await self._rows(
            f"SELECT {STATE_COLS} FROM attribution_state WHERE identity_uuid = ? "
            "ORDER BY primitive",
            (identity_uuid,),
        )
        return [state_from_row(r) for r in rows]

    @guard
    async def get_state(self, identity_uuid: str, primitive: str) -> StateRow | None:
        rows = await self._rows(
            f"SELECT {STATE_COLS}, window_seq FROM attribution_state "
            "WHERE identity_uuid = ? AND primitive = ?",
            (identity_uuid, primitive),
        )
        return state_from_row(rows[0]) if rows else None

    @guard
    async def multi_actor_identities(self, min_primitives: int) -> dict[str, list[str]]:
        rows = await self._rows(
            "SELECT identity_uuid, primitive FROM attribution_state "
            "WHERE state = 'multi_actor' AND identity_uuid IN ("
            "  SELECT identity_uuid FROM attribution_state WHERE state = 'multi_actor' "
            "  GROUP BY identity_uuid HAVING count(*) >= ?) "
            "ORDER BY identity_uuid, primitive",
            (int(min_primitives),),
        )
        return _by_identity(rows)

    @guard
    async def latest_observations(self, attacker_uuid: str) -> list[dict[str, Any]]:
        rows = await self._rows(LATEST_OBSERVATIONS_SQL, (attacker_uuid,))
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

    @guard
    async def series_after(self, identity_uuid: str, primitive: str, seq: int) -> list[Any]:
        return await self._rows(_SERIES_AFTER, (identity_uuid, int(seq), primitive))

    @guard
    async def recent_values(
        self, identity_uuid: str, primitive: str, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self._rows(
            "SELECT ts, value, confidence, attacker_uuid FROM observations_by_run "
            "WHERE run_identity = ? AND primitive = ? ORDER BY ts DESC, seq DESC LIMIT ?",
            (identity_uuid, primitive, int(limit)),
        )
        return [
            {"ts": r[0], "value": json.loads(r[1]), "confidence": r[2], "attacker_uuid": r[3]}
            for r in reversed(rows)
        ]

    @guard
    async def count_observations(self) -> int:
        return await self._count("SELECT count(*) FROM observations")

    @guard
    async def pending_observations(self, *, after_seq: int, limit: int) -> list[ObservationRow]:
        rows = await self._rows(
            f"SELECT {OBS_SELECT_COLS}, o.identity_uuid FROM observations o "
            "WHERE NOT_MERGED AND o.seq > ? ORDER BY o.seq LIMIT ?",
            (int(after_seq), int(limit)),
        )
        return [observation_from_row(r) for r in rows]

    # ---- retention ---------------------------------------------------------------------------
    @guard
    async def retention_cut(self, before: float) -> int:
        return await self._count(
            "SELECT coalesce(max(seq), 0) FROM observation_marks WHERE at < ?", (float(before),)
        )

    @guard
    async def stale_window_keys(self, seq: int, limit: int) -> list[Key]:
        rows = await self._rows(
            "SELECT identity_uuid, primitive FROM attribution_state "
            "WHERE window_seq IS NOT NULL AND window_seq < ? LIMIT ?",
            (int(seq), int(limit)),
        )
        return [(r[0], r[1]) for r in rows]

    @guard
    async def dead_letter_count(self) -> int:
        return await self._count("SELECT count(*) FROM dead_letters")

    # ---- users and auth --------------------------------------------------------------------
    @guard
    async def create_user(self, user: UserRow) -> None:
        d = self._dialect
        params = list(user_params(user, time.time()))
        params[4], params[5] = d.flag(params[4]), d.flag(params[5])
        try:
            await self._write_all(
                (f"INSERT INTO users ({USER_COLS}) VALUES ({_placeholders(9)})", params)
            )
        except Exception as exc:
            if not d.is_integrity(exc):
                raise
            if await self.get_user_by_name(user.username) is not None:
                raise StoreIntegrity(f"username {user.username!r} already exists") from exc
            raise StoreIntegrity(f"user {user.uuid!r} already exists") from exc

    @guard
    async def get_user(self, uuid: str) -> UserRow | None:
        rows = await self._rows(f"SELECT {USER_COLS} FROM users WHERE uuid = ?", (uuid,))
        return user_from_row(rows[0]) if rows else None

    @guard
    async def get_user_by_name(self, username: str) -> UserRow | None:
        rows = await self._rows(f"SELECT {USER_COLS} FROM users WHERE username = ?", (username,))
        return user_from_row(rows[0]) if rows else None

    @guard
    async def list_users(self) -> list[UserRow]:
        rows = await self._rows(f"SELECT {USER_COLS} FROM users ORDER BY username")
        return [user_from_row(r) for r in rows]

    @guard
    async def update_user(self, uuid: str, **fields: Any) -> None:
        sets, params = user_update_sets(fields, self._dialect.flag)
        await self._write_all((f"UPDATE users SET {sets} WHERE uuid = ?", [*params, uuid]))

    @guard
    async def count_users(self) -> int:
        return await self._count("SELECT count(*) FROM users")

    @guard
    async def revoke_token(self, jti: str, expires_at: float) -> None:
        await self._write_all(
            (
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) "
                "ON CONFLICT (jti) DO UPDATE SET expires_at = "
                "GREATEST(revoked_tokens.expires_at, excluded.expires_at)",
                (jti, float(expires_at)),
            )
        )

    @guard
    async def is_token_revoked(self, jti: str) -> bool:
        return bool(await self._rows("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)))

    async def _lock_tickets(self, conn: Any, user_uuid: str) -> None:
        """Serialise ticket issuance per user inside :meth:`add_ticket`'s
        transaction (nothing to do where a write transaction locks the
        whole database)."""

    @guard
    async def add_ticket(self, ticket: TicketRow, *, max_outstanding: int, now: float) -> bool:
        d = self._dialect
        now = float(now)
        async with self._write() as conn:
            await self._lock_tickets(conn, ticket.user_uuid)
            await d.execute(conn, d.sql("DELETE FROM sse_tickets WHERE expires_at <= ?"), (now,))
            rows = await d.rows(
                conn,
                d.sql("SELECT count(*) FROM sse_tickets WHERE user_uuid = ? AND expires_at > ?"),
                (ticket.user_uuid, now),
            )
            if int(rows[0][0]) >= max_outstanding:
                return False
            await d.execute(
                conn,
                d.sql(f"INSERT INTO sse_tickets ({TICKET_COLS}) VALUES ({_placeholders(8)})"),
                ticket_params(ticket, now),
            )
            return True

    @guard
    async def purge_expired(self, now: float) -> None:
        await self._write_all(
            ("DELETE FROM revoked_tokens WHERE expires_at <= ?", (float(now),)),
            ("DELETE FROM sse_tickets WHERE expires_at <= ?", (float(now),)),
        )


__all__ = ["SqlStore", "SqlTx"]
