"""The scale-out store: PostgreSQL through an asyncpg pool.

The worker's hot writes, a batch's observations and state rows, go to the
server as binary ``COPY`` streams the Rust core encodes (Python never
builds their rows); the other batch writes are single set-based statements
over ``unnest($1::text[], …)`` arrays, with native ``INSERT … ON CONFLICT``.
Row locks are taken with ``SELECT … ORDER BY key FOR UPDATE`` so concurrent
workers lock in one order.
Transactions are READ COMMITTED (PostgreSQL's default): compare-and-set
updates re-check their ``WHERE`` against the newest committed row version.

The queries both backends share are in :mod:`decnet_attr.store.sql`; this
module holds the PostgreSQL dialect (driver calls, error classes), the pool
and the set-based batch writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson

from decnet_attr._core import Engine, StateWrite, ValidatedBatch
from decnet_attr.store.dialect import Dialect, driver_errors, guard
from decnet_attr.store.errors import (
    StoreConflict,
    StoreError,
    StoreIntegrity,
    StoreUnavailable,
)
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
    ticket_from_row,
)
from decnet_attr.store.schema import SEQ_BLOCK, migrate_postgres
from decnet_attr.store.sql import (
    MERGED_RUN_SQL,
    PRUNE_MARKS_SQL,
    PRUNE_RUNS_SQL,
    SqlStore,
    SqlTx,
)

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 10.0

#: Driver errors that mean "the server cannot be used right now".
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.InternalClientError,  # protocol state broken by a lost connection
    OSError,
    asyncio.TimeoutError,
)


class PostgresDialect(Dialect):
    name = "postgresql"
    tokens = {
        "IN_LIST(?)": "= ANY(?::text[])",
        "NOT_MERGED": "NOT merged",
        "IS_MERGED": "merged",
        " BYTE_ORDER": ' COLLATE "C"',
        "UNINDEXED ": "",
    }
    numbered = True
    for_update = " FOR UPDATE"

    def list_param(self, values: Sequence[Any]) -> Any:
        return list(values)

    def in_network(self, add: Callable[[Any], str], net: tuple[str, str, str]) -> str:
        return f"inet(a.ip) <<= {add(net[0])}::cidr"

    async def rows(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await conn.fetch(sql, *params))

    async def execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        await conn.execute(sql, *params)

    def is_integrity(self, exc: BaseException) -> bool:
        return isinstance(exc, asyncpg.IntegrityConstraintViolationError)

    def map_error(self, exc: BaseException, conn: Any = None) -> StoreError | None:
        """By the driver's exception classes (SQLSTATE); a client-side
        ``InterfaceError`` is unavailability when ``conn`` is closed."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
            detail = getattr(exc, "detail", None)
            constraint = getattr(exc, "constraint_name", None)
            msg = (
                f"integrity error ({constraint}): {exc}"
                if constraint
                else f"integrity error: {exc}"
            )
            if detail:
                msg += f" ({detail})"
            return StoreIntegrity(msg)
        if isinstance(exc, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
            return StoreConflict(f"transaction conflict, retry: {exc}")
        if isinstance(exc, asyncpg.QueryCanceledError):
            return StoreError(f"query cancelled: {exc}")
        if isinstance(exc, _UNAVAILABLE):
            return StoreUnavailable(f"postgresql unavailable: {exc!r}")
        if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg.DataError):
            if conn is not None and conn.is_closed():
                return StoreUnavailable(f"postgresql unavailable: {exc}")
        if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
            return StoreError(f"postgresql error: {exc!r}")
        return None


POSTGRES = PostgresDialect()


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

#: The columns of an observation's ``COPY``: its seq (schema v13: taken from
#: the writer's block), then the columns in the order rows give them
#: (``OBS_INSERT_COLS``).
_OBS_COLUMNS = ["seq", *(c.strip() for c in OBS_INSERT_COLS.split(","))]

#: Takes a block of seqs (``SEQ_BLOCK``) and writes the runs of the rows
#: about to be copied into it, ``(offset in the block, count, attacker,
#: identity)`` each; returns the block's first seq. Rows in a block of
#: their own are consecutive whatever other writers do meanwhile.
_SQL_BLOCK_RUNS = f"""
WITH block AS (SELECT nextval('observation_blocks') * {SEQ_BLOCK} AS base),
runs AS (
    INSERT INTO observation_runs (first_seq, last_seq, attacker_uuid, identity_uuid, n)
    SELECT block.base + u.o, block.base + u.o + u.n - 1, u.a, u.i, u.n
    FROM block, unnest($1::int8[], $2::int4[], $3::text[], $4::text[]) AS u(o, n, a, i)
)
SELECT base FROM block
"""


async def _block_with_runs(conn: Any, runs: Sequence[tuple[int, str, str | None]]) -> int:
    """A new block of seqs and the runs ``(count, attacker, identity)`` of
    the rows to be written into it, in order; the block's first seq."""
    offsets: list[int] = []
    at = 0
    for n, _a, _i in runs:
        offsets.append(at)
        at += n
    if at > SEQ_BLOCK:
        raise ValueError(f"{at} rows do not fit in one block of {SEQ_BLOCK} seqs")
    return int(
        await conn.fetchval(
            _SQL_BLOCK_RUNS,
            offsets,
            [n for n, _a, _i in runs],
            [a for _n, a, _i in runs],
            [i for _n, _a, i in runs],
        )
    )


#: The positions (from 1) of the items whose id, or whose ``(evidence_ref,
#: primitive)``, is stored already; the items as one JSON parameter,
#: ``[[id, evidence_ref, primitive], …]`` (``ValidatedBatch.admission_json``).
#: Each item is looked up by the unique indexes: a lateral subquery with a
#: limit is run per item, where ``EXISTS`` let the planner hash the whole
#: table instead (its choice whenever its figures for the table were small:
#: measured in the pipeline at 100k rows, 5–7 µs per observation against
#: 2.2 for the lookups).
_SQL_STORED = """
SELECT e.i FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, i)
LEFT JOIN LATERAL (SELECT 1 AS hit FROM observations o WHERE o.id = e.v->>0 LIMIT 1) a ON TRUE
LEFT JOIN LATERAL (
    SELECT 1 AS hit FROM observations o
    WHERE o.evidence_ref = e.v->>1 AND o.primitive = e.v->>2 LIMIT 1
) b ON TRUE
WHERE a.hit IS NOT NULL OR b.hit IS NOT NULL
"""


async def _stored(conn: Any, items_json: str) -> set[int]:
    """Positions (from 0) of the items stored already (see ``_SQL_STORED``)."""
    found = await conn.fetch(_SQL_STORED, items_json)
    return {int(r[0]) - 1 for r in found}


async def _require(conn: Any, table: str, uuids: Collection[str], what: str) -> None:
    """Every one of ``uuids`` names a row of ``table`` (attackers,
    identities), or :class:`StoreIntegrity`: the check a foreign key made
    per written row, made once per batch (schema v11)."""
    wanted = sorted(set(uuids))
    if not wanted:
        return
    found = await conn.fetch(f"SELECT uuid FROM {table} WHERE uuid = ANY($1::text[])", wanted)
    if len(found) < len(wanted):
        missing = sorted(set(wanted) - {r[0] for r in found})
        raise StoreIntegrity(f"unknown {what}: {', '.join(missing[:5])[:500]}")


async def _copy_observations(conn: Any, **source: Any) -> None:
    """New observation rows by ``COPY`` (a binary stream as ``source=``, or
    ``records=``), in the order given (their seqs follow it).

    The unique indexes keep the guarantee: a row stored already fails the
    ``COPY`` with :class:`StoreConflict`. A batch's first, optimistic copy
    (``insert_validated``) then checks which items are stored
    (``_stored``) and copies the others; a copy made after that check fails
    only on a row another writer stored since, and the batch runs again (it
    will find that row).
    ``COPY`` writes each row once, where ``INSERT … ON CONFLICT`` inserts
    speculatively and checks every unique index for each row: measured, a
    quarter less of the server's time per observation, the check included.
    """
    try:
        if "records" in source:
            await conn.copy_records_to_table("observations", columns=_OBS_COLUMNS, **source)
        else:
            await conn.copy_to_table(
                "observations", columns=_OBS_COLUMNS, format="binary", **source
            )
    except asyncpg.UniqueViolationError as exc:
        raise StoreConflict(
            f"an observation was stored by another writer meanwhile: {exc}"
        ) from exc


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

_SQL_CREATE_STATES = _SQL_INSERT_STATES + "ON CONFLICT DO NOTHING RETURNING 1"

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


#: The state table's columns in ``STATE_COLS`` order (a ``StateWrite``'s
#: ``COPY`` streams).
_STATE_COLUMNS = [c.strip().strip('"') for c in STATE_COLS.split(",")]

#: The session's scratch table for the state rows a batch updates (emptied
#: at each commit; temporary tables write no WAL), and their way from it
#: into the table: each row found by the primary key, and taken out of the
#: scratch table by the same statement (a second write in one transaction
#: starts from an empty one).
_SQL_STATE_SCRATCH = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS state_scratch "
    "(LIKE attribution_state INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)

_SQL_UPDATE_FROM_SCRATCH = f"""
WITH moved AS (DELETE FROM state_scratch RETURNING {STATE_COLS}),
written AS (
    INSERT INTO attribution_state ({STATE_COLS}) SELECT {STATE_COLS} FROM moved
    ON CONFLICT (identity_uuid, primitive) DO UPDATE SET
        {", ".join(f'"{c}" = EXCLUDED."{c}"' for c in _STATE_COLUMNS[2:])}
    WHERE attribution_state.version = EXCLUDED.version - 1
    RETURNING xmax = 0 AS inserted
)
SELECT count(*) FROM written WHERE NOT inserted
"""


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


# ---- the transaction --------------------------------------------------------------------------


class PostgresTx(SqlTx):
    """Writes of one batch on one pooled connection inside one transaction."""

    _dialect = POSTGRES

    @guard
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

    @guard
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

    @guard
    async def insert_validated(
        self, batch: ValidatedBatch, identity_of: Mapping[str, str]
    ) -> list[int]:
        """The new items go in as one binary ``COPY`` encoded in Rust.

        Optimistic: a batch is copied whole first (less the items repeating
        an earlier one), inside a savepoint, since a batch almost never holds
        anything stored already (the API answers a re-sent body's items as
        duplicates and does not publish them). Only when a unique index
        refuses a row does the batch go back to the savepoint, look up which
        items are stored (``_stored``), and copy the others. The lookup cost
        the server two index probes per item on every batch."""
        conn = self._c()
        if not len(batch):
            return []
        # grouped by attacker: each attacker's rows take consecutive seqs,
        # one run (schema v13)
        new = batch.by_attacker(batch.unrepeated([]))
        await _require(conn, "attackers", [a for a, _ip, _ts in batch.attackers(new)], "attacker")
        await conn.execute("SAVEPOINT copy_new")
        try:
            await self._copy_validated(conn, batch, identity_of, new)
        except StoreConflict:
            await conn.execute("ROLLBACK TO SAVEPOINT copy_new")
        else:
            await conn.execute("RELEASE SAVEPOINT copy_new")
            return new
        new = batch.by_attacker(
            batch.unrepeated(sorted(await _stored(conn, batch.admission_json())))
        )
        if new:
            await self._copy_validated(conn, batch, identity_of, new)
        return new

    @staticmethod
    async def _copy_validated(
        conn: Any, batch: ValidatedBatch, identity_of: Mapping[str, str], positions: list[int]
    ) -> None:
        """The items at ``positions`` (grouped by attacker) by one binary
        ``COPY`` encoded in Rust per block of seqs, after their runs."""
        for at in range(0, len(positions), SEQ_BLOCK):
            part = positions[at : at + SEQ_BLOCK]
            runs = [(n, a, identity_of.get(a)) for a, n in batch.attacker_runs(part)]
            first = await _block_with_runs(conn, runs)
            # a memoryview: asyncpg would take bytes for a file name
            stream = memoryview(batch.copy_rows(identity_of, part, first_seq=first))
            await _copy_observations(conn, source=stream)

    @guard
    async def insert_observation_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[int]:
        conn = self._c()
        if not rows:
            return []
        stored = await _stored(conn, orjson.dumps([(r[0], r[8], r[2]) for r in rows]).decode())
        # the first of several rows with one id or (evidence_ref, primitive)
        seen: set[Any] = set()
        new: list[int] = []
        for i, r in enumerate(rows):
            if i in stored or r[0] in seen or (r[8], r[2]) in seen:
                continue
            seen.add(r[0])
            seen.add((r[8], r[2]))
            new.append(i)
        if new:
            await _require(conn, "attackers", [rows[i][11] for i in new], "attacker")
            records = [
                (
                    *r[:4],
                    _f(r[4]),
                    _f(r[5]),
                    _f(r[6]),
                    *r[7:9],
                    int(r[9]),
                    float(r[10]),
                    r[11],
                    r[12],
                    bool(r[13]),
                )
                for r in (rows[i] for i in new)
            ]
            # in the order given, one block of seqs per SEQ_BLOCK rows
            for at in range(0, len(records), SEQ_BLOCK):
                part = records[at : at + SEQ_BLOCK]
                first = await _block_with_runs(
                    conn, [(end - start, *part[start][11:13]) for start, end in run_spans(part)]
                )
                await _copy_observations(
                    conn, records=[(first + k, *r) for k, r in enumerate(part)]
                )
        return new

    @guard
    async def load_states(self, keys: Sequence[Key], *, lock: bool = False) -> dict[Key, StateRow]:
        conn = self._c()
        if not keys:
            return {}
        cols = ", ".join(f"s.{c.strip()}" for c in STATE_COLS.split(","))
        sql = (
            f"SELECT {cols} FROM attribution_state s "
            "JOIN jsonb_array_elements($1::jsonb) AS k(v) "
            "ON s.identity_uuid = k.v->>0 AND s.primitive = k.v->>1 "
            "ORDER BY s.identity_uuid, s.primitive"
        )
        if lock:
            sql += " FOR UPDATE OF s"  # in key order (the sort comes first)
        # the keys as one JSON parameter: two text arrays cost the driver a
        # check and an encoding per element
        rows = await conn.fetch(sql, orjson.dumps(list(set(keys))).decode())
        return {(r[0], r[1]): state_from_row(r) for r in rows}

    @guard
    async def upsert_states(
        self, rows: Sequence[StateRow], *, created: Collection[Key] = ()
    ) -> None:
        conn = self._c()
        if not rows:
            return
        await _require(conn, "attacker_identities", [r.identity_uuid for r in rows], "identity")
        new = set(created)
        fresh = [r for r in rows if (r.identity_uuid, r.primitive) in new] if new else []
        if fresh:
            # rows nobody had: inserted only if still nobody has them (another
            # worker may have created one since this batch found none)
            made = await conn.fetch(_SQL_CREATE_STATES, *_state_arrays(fresh))
            if len(made) < len({(r.identity_uuid, r.primitive) for r in fresh}):
                raise StoreConflict("a state row was created by another writer meanwhile")
            rows = [r for r in rows if (r.identity_uuid, r.primitive) not in new]
            if not rows:
                return
        await conn.execute(_SQL_UPSERT_STATES, *_state_arrays(rows))

    @guard
    async def write_states(
        self, states: StateWrite, engine: Engine, loaded: Collection[Key]
    ) -> None:
        """Both kinds of rows go to the server as binary ``COPY`` streams
        encoded in Rust: the new rows straight into the table (a row another
        worker created meanwhile fails it on the primary key: the batch runs
        again), the others into a scratch table this session keeps, then
        into the table by one upsert. (An ``UPDATE … FROM`` the scratch
        table leaves the join to the planner, which hashed the whole state
        table whenever its figures for it were small.)

        An updated row is written only over the version it was built on
        (its own version less one): a worker builds on the rows it wrote
        last without reading them back, and a row another writer changed
        meanwhile (another worker, a roll-up) fails the batch with
        :class:`StoreConflict`, which runs again on the rows as they are."""
        conn = self._c()
        created = states.created
        if created:
            await _require(conn, "attacker_identities", states.identities(), "identity")
            try:
                await conn.copy_to_table(
                    "attribution_state",
                    source=memoryview(states.copy_rows(engine, True)),
                    columns=_STATE_COLUMNS,
                    format="binary",
                )
            except asyncpg.UniqueViolationError as exc:
                raise StoreConflict("a state row was created by another writer meanwhile") from exc
        if created < len(states):
            await conn.execute(_SQL_STATE_SCRATCH)
            await conn.copy_to_table(
                "state_scratch",
                source=memoryview(states.copy_rows(engine, False)),
                columns=_STATE_COLUMNS,
                format="binary",
            )
            # each row must update the version it was built on: one that
            # did not find it was changed meanwhile, and one that was
            # inserted had been deleted meanwhile (a roll-up). An inserted
            # row's xmax is 0; an updated one's carries the lock the update
            # took.
            updated = await conn.fetchval(_SQL_UPDATE_FROM_SCRATCH)
            if updated < len(states) - created:
                raise StoreConflict("a state row was changed by another writer meanwhile")

    @guard
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

    @guard
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
        # the run holding each row takes its identity (a run is one attacker's)
        await conn.executemany(
            POSTGRES.sql(MERGED_RUN_SQL), [(identity_by_seq.get(s), s) for s in uniq]
        )


class PostgresStore(SqlStore):
    """A :class:`Store` on PostgreSQL (asyncpg pool)."""

    dialect = POSTGRES.name
    _dialect = POSTGRES

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
                # every execution planned for the tables as they are now: a
                # prepared statement's generic plan, made while a table was
                # small, is kept until the next ANALYZE (hash joins and
                # hashed subplans over tables that have since grown by
                # millions of rows). Planning costs tens of microseconds a
                # statement; the worker runs about a dozen a batch.
                server_settings={"plan_cache_mode": "force_custom_plan"},
            )
            async with self._pool.acquire() as conn:
                await migrate_postgres(conn)
        except Exception:
            await self.close()
            with driver_errors(self):
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

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        pool = self._p()
        with driver_errors(self):
            conn = await pool.acquire()
        try:
            yield conn
        except asyncpg.InterfaceError as exc:
            # the driver's refusal of a call on a connection that went away
            err = POSTGRES.map_error(exc, conn)
            if not isinstance(err, StoreUnavailable):
                raise
            raise err from exc
        finally:
            try:
                await pool.release(conn)
            except Exception:
                log.debug("releasing a postgresql connection failed", exc_info=True)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        async with self._conn() as conn:
            tr = conn.transaction()
            with driver_errors(self):
                await tr.start()
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
            # A failed COMMIT leaves nothing applied; release() resets the
            # connection (ROLLBACK) if the transaction is still open.
            with driver_errors(self):
                await tr.commit()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Any]:
        async with self._conn() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Any]:
        async with self._conn() as conn, conn.transaction():
            yield conn

    async def _lock_tickets(self, conn: Any, user_uuid: str) -> None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('sse-ticket:' || $1, 0))", user_uuid
        )

    # ---- attackers -------------------------------------------------------------------------
    @guard
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

    # ---- attribution -----------------------------------------------------------------------
    async def iter_observations(
        self, *, batch_size: int = 5000
    ) -> AsyncIterator[list[ObservationRow]]:
        with driver_errors(self):
            async with self._conn() as conn, conn.transaction(readonly=True):
                cur = await conn.cursor(ALL_OBSERVATIONS_SQL)
                while True:
                    batch = await cur.fetch(batch_size)
                    if not batch:
                        break
                    yield [observation_from_row(r) for r in batch]

    @guard
    async def replace_all_states(self, rows: Sequence[StateRow]) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute("LOCK TABLE attribution_state, multi_actor_log IN EXCLUSIVE MODE")
            await conn.execute("DELETE FROM attribution_state")
            await conn.execute("DELETE FROM multi_actor_log")
            if rows:
                await _require(
                    conn, "attacker_identities", [r.identity_uuid for r in rows], "identity"
                )
                await conn.execute(_SQL_INSERT_STATES, *_state_arrays(rows))

    @guard
    async def stored_positions(self, batch: ValidatedBatch) -> list[int]:
        if not len(batch):
            return []
        async with self._conn() as conn:
            return sorted(await _stored(conn, batch.admission_json()))

    # ---- retention ---------------------------------------------------------------------------
    @guard
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

    @guard
    async def prune_observations(self, upto_seq: int, *, chunk: int = 50_000) -> int:
        deleted = 0
        async with self._conn() as conn:
            low = int(await conn.fetchval("SELECT coalesce(min(seq), 0) FROM observations"))
            while low and low <= upto_seq:
                # chunks of rows, not of seq numbers: seqs come in blocks
                # (schema v13) that a batch fills only in part
                high = await conn.fetchval(
                    "SELECT seq FROM observations WHERE seq >= $1 ORDER BY seq OFFSET $2 LIMIT 1",
                    low,
                    chunk - 1,
                )
                high = upto_seq if high is None else min(int(high), upto_seq)
                async with conn.transaction():
                    status = await conn.execute(
                        "DELETE FROM observations WHERE seq BETWEEN $1 AND $2 AND merged",
                        low,
                        high,
                    )
                    for stmt in PRUNE_RUNS_SQL:
                        await conn.execute(POSTGRES.sql(stmt), low, high)
                deleted += int(status.split()[-1])
                low = int(
                    await conn.fetchval(
                        "SELECT coalesce(min(seq), 0) FROM observations WHERE seq > $1", high
                    )
                )
            await conn.execute(POSTGRES.sql(PRUNE_MARKS_SQL), upto_seq)
        return deleted

    # ---- users and auth --------------------------------------------------------------------
    @guard
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


__all__ = ["PostgresStore", "PostgresTx"]
