"""Versioned schema migrations for both dialects.

Each migration is ``(version, sqlite_sql, postgres_sql)``; the SQL is a
script of statements separated by ``;`` at the end of a line. Applied
versions are recorded in ``schema_migrations(version, applied_at)``.

The migrations run inside one transaction at :meth:`Store.open`, so
re-opening is a no-op and two processes opening at once cannot both apply a
migration: the PostgreSQL backend takes a transaction-level advisory lock
first, the SQLite backend runs under ``BEGIN IMMEDIATE`` (the database write
lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from decnet_attr.store.base import (
    MULTI_ACTOR_FLAG_MIN,
    STATES,
    USER_UPDATE_FIELDS,
    AttackerAttribution,
    AttackerFilter,
    AttackerRow,
    AttackerSummary,
    AttributionView,
    Key,
    ObservationRow,
    StateRow,
    TicketRow,
    UserRow,
)

log = logging.getLogger(__name__)


class Migration(NamedTuple):
    version: int
    sqlite: str
    postgres: str


# Arbitrary constant key for pg_advisory_xact_lock (the bytes of "decnattr").
PG_MIGRATION_LOCK_KEY = 0x6465636E61747472

_SCHEMA_MIGRATIONS_SQLITE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
)
"""

_SCHEMA_MIGRATIONS_PG = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)
"""

_V1_SQLITE = """
CREATE TABLE attacker_identities (
    uuid TEXT PRIMARY KEY,
    schema_version INTEGER NOT NULL DEFAULT 1,
    campaign_id TEXT NULL,
    first_seen_at REAL NULL,
    last_seen_at REAL NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    confidence REAL NULL,
    observation_count INTEGER NOT NULL DEFAULT 0,
    merged_into_uuid TEXT NULL REFERENCES attacker_identities(uuid),
    notes TEXT NULL
);
CREATE INDEX ix_attacker_identities_updated_at ON attacker_identities(updated_at);
CREATE INDEX ix_attacker_identities_merged_into ON attacker_identities(merged_into_uuid);

CREATE TABLE attackers (
    uuid TEXT PRIMARY KEY,
    ip TEXT NULL UNIQUE,
    identity_id TEXT NULL REFERENCES attacker_identities(uuid),
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    rotation_count INTEGER NOT NULL DEFAULT 0,
    last_rotation_at REAL NULL
);
CREATE INDEX ix_attackers_identity_id ON attackers(identity_id);
CREATE INDEX ix_attackers_last_seen ON attackers(last_seen);

CREATE TABLE observations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    identity_ref TEXT NULL,
    primitive TEXT NOT NULL,
    value TEXT NOT NULL,
    confidence REAL NULL,
    window_start_ts REAL NULL,
    window_end_ts REAL NULL,
    source TEXT NULL,
    evidence_ref TEXT NOT NULL,
    envelope_v INTEGER NOT NULL DEFAULT 1,
    ts REAL NOT NULL,
    attacker_uuid TEXT NOT NULL REFERENCES attackers(uuid),
    identity_uuid TEXT NULL,
    merged INTEGER NOT NULL DEFAULT 1,
    CONSTRAINT uq_observations_evidence_primitive UNIQUE (evidence_ref, primitive)
);
CREATE INDEX ix_observations_attacker_primitive_ts
    ON observations(attacker_uuid, primitive, ts, seq);
CREATE INDEX ix_observations_identity_primitive_ts
    ON observations(identity_uuid, primitive, ts, seq);
CREATE INDEX ix_observations_primitive_ts ON observations(primitive, ts);
CREATE INDEX ix_observations_unmerged ON observations(seq) WHERE merged = 0;

CREATE TABLE attribution_state (
    identity_uuid TEXT NOT NULL REFERENCES attacker_identities(uuid),
    primitive TEXT NOT NULL,
    current_value TEXT NOT NULL,
    state TEXT NOT NULL,
    confidence REAL NOT NULL,
    observation_count INTEGER NOT NULL DEFAULT 0,
    last_change_ts REAL NOT NULL,
    last_observation_ts REAL NOT NULL,
    schema_version INTEGER NOT NULL DEFAULT 1,
    updated_at REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'categorical',
    "window" TEXT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (identity_uuid, primitive)
);
CREATE INDEX ix_attribution_state_state ON attribution_state(state);
CREATE INDEX ix_attribution_state_last_change ON attribution_state(last_change_ts);
CREATE INDEX ix_attribution_state_identity_state ON attribution_state(identity_uuid, state);

CREATE TABLE multi_actor_log (
    identity_uuid TEXT PRIMARY KEY,
    primitives TEXT NOT NULL,
    fired_at REAL NOT NULL
);

CREATE TABLE dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    event_id TEXT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL
);

CREATE TABLE users (
    uuid TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    must_change_password INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0,
    tokens_valid_from REAL NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);

CREATE TABLE sse_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_uuid TEXT NOT NULL,
    role TEXT NOT NULL,
    expires_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX ix_sse_tickets_user_expires ON sse_tickets(user_uuid, expires_at)
"""

_V1_POSTGRES = """
CREATE TABLE attacker_identities (
    uuid TEXT PRIMARY KEY,
    schema_version INTEGER NOT NULL DEFAULT 1,
    campaign_id TEXT NULL,
    first_seen_at DOUBLE PRECISION NULL,
    last_seen_at DOUBLE PRECISION NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    confidence DOUBLE PRECISION NULL,
    observation_count INTEGER NOT NULL DEFAULT 0,
    merged_into_uuid TEXT NULL REFERENCES attacker_identities(uuid),
    notes TEXT NULL
);
CREATE INDEX ix_attacker_identities_updated_at ON attacker_identities(updated_at);
CREATE INDEX ix_attacker_identities_merged_into ON attacker_identities(merged_into_uuid);

CREATE TABLE attackers (
    uuid TEXT PRIMARY KEY,
    ip TEXT NULL UNIQUE,
    identity_id TEXT NULL REFERENCES attacker_identities(uuid),
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    rotation_count INTEGER NOT NULL DEFAULT 0,
    last_rotation_at DOUBLE PRECISION NULL
);
CREATE INDEX ix_attackers_identity_id ON attackers(identity_id);
CREATE INDEX ix_attackers_last_seen ON attackers(last_seen);

CREATE TABLE observations (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    identity_ref TEXT NULL,
    primitive TEXT NOT NULL,
    value TEXT NOT NULL,
    confidence DOUBLE PRECISION NULL,
    window_start_ts DOUBLE PRECISION NULL,
    window_end_ts DOUBLE PRECISION NULL,
    source TEXT NULL,
    evidence_ref TEXT NOT NULL,
    envelope_v INTEGER NOT NULL DEFAULT 1,
    ts DOUBLE PRECISION NOT NULL,
    attacker_uuid TEXT NOT NULL REFERENCES attackers(uuid),
    identity_uuid TEXT NULL,
    merged BOOLEAN NOT NULL DEFAULT TRUE,
    CONSTRAINT uq_observations_evidence_primitive UNIQUE (evidence_ref, primitive)
);
CREATE INDEX ix_observations_attacker_primitive_ts
    ON observations(attacker_uuid, primitive, ts, seq);
CREATE INDEX ix_observations_identity_primitive_ts
    ON observations(identity_uuid, primitive, ts, seq);
CREATE INDEX ix_observations_primitive_ts ON observations(primitive, ts);
CREATE INDEX ix_observations_unmerged ON observations(seq) WHERE NOT merged;

CREATE TABLE attribution_state (
    identity_uuid TEXT NOT NULL REFERENCES attacker_identities(uuid),
    primitive TEXT NOT NULL,
    current_value TEXT NOT NULL,
    state TEXT NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    observation_count INTEGER NOT NULL DEFAULT 0,
    last_change_ts DOUBLE PRECISION NOT NULL,
    last_observation_ts DOUBLE PRECISION NOT NULL,
    schema_version INTEGER NOT NULL DEFAULT 1,
    updated_at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL DEFAULT 'categorical',
    "window" TEXT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (identity_uuid, primitive)
);
CREATE INDEX ix_attribution_state_state ON attribution_state(state);
CREATE INDEX ix_attribution_state_last_change ON attribution_state(last_change_ts);
CREATE INDEX ix_attribution_state_identity_state ON attribution_state(identity_uuid, state);

CREATE TABLE multi_actor_log (
    identity_uuid TEXT PRIMARY KEY,
    primitives TEXT NOT NULL,
    fired_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE dead_letters (
    seq BIGSERIAL PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL,
    event_id TEXT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL
);

CREATE TABLE users (
    uuid TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    must_change_password BOOLEAN NOT NULL DEFAULT FALSE,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    tokens_valid_from DOUBLE PRECISION NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE sse_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_uuid TEXT NOT NULL,
    role TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX ix_sse_tickets_user_expires ON sse_tickets(user_uuid, expires_at)
"""

# v2: an SSE ticket remembers the access token it was minted with (jti, iat,
# exp) so that redemption re-checks revocation and the tokens_valid_from cutoff.
_V2_SQLITE = """
ALTER TABLE sse_tickets ADD COLUMN token_jti TEXT NULL;
ALTER TABLE sse_tickets ADD COLUMN token_iat REAL NULL;
ALTER TABLE sse_tickets ADD COLUMN token_exp REAL NULL
"""

_V2_POSTGRES = """
ALTER TABLE sse_tickets ADD COLUMN token_jti TEXT NULL;
ALTER TABLE sse_tickets ADD COLUMN token_iat DOUBLE PRECISION NULL;
ALTER TABLE sse_tickets ADD COLUMN token_exp DOUBLE PRECISION NULL
"""

# v3: the state before the last transition, so `explain` can say where a
# badge came from.
_V3_SQLITE = """
ALTER TABLE attribution_state ADD COLUMN previous_state TEXT NULL
"""

_V3_POSTGRES = """
ALTER TABLE attribution_state ADD COLUMN previous_state TEXT NULL
"""

# v4: drop two indexes no query uses; every observation insert and state
# upsert paid for them (the worker's write path is index-bound).
_V4 = """
DROP INDEX IF EXISTS ix_observations_primitive_ts;
DROP INDEX IF EXISTS ix_attribution_state_last_change
"""

# v5: every state upsert paid for ``(identity_uuid, state)``, which the
# primary key's ``identity_uuid`` prefix already serves (an identity has at
# most one row per primitive, so the state filter reads a few dozen rows).
_V5 = """
DROP INDEX IF EXISTS ix_attribution_state_identity_state
"""

# v6 (SQLite): a write-friendly observations table. Its two UNIQUE
# constraints and two (attacker|identity, primitive, ts, seq) indexes put
# four random-key B-tree inserts on every observation, so every commit
# rewrote pages all over the file (13-20 us per observation on a 2-core
# machine). Now rows are appended in seq order with one secondary index per
# reader, (attacker_uuid, seq), on which a sensor session's rows are neighbours;
# the same holds for (identity_uuid, seq), which the series reads use;
# exactly-once admission moves into the store's memory (``Dedupe``, rebuilt
# from the newest rows at open). The table is rebuilt: SQLite cannot drop a
# table constraint in place. PostgreSQL, the shared store that several
# workers write, keeps its unique constraints and takes the same two
# secondary indexes.
_V6_SQLITE = """
CREATE TABLE observations_v6 (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    identity_ref TEXT NULL,
    primitive TEXT NOT NULL,
    value TEXT NOT NULL,
    confidence REAL NULL,
    window_start_ts REAL NULL,
    window_end_ts REAL NULL,
    source TEXT NULL,
    evidence_ref TEXT NOT NULL,
    envelope_v INTEGER NOT NULL DEFAULT 1,
    ts REAL NOT NULL,
    attacker_uuid TEXT NOT NULL REFERENCES attackers(uuid),
    identity_uuid TEXT NULL,
    merged INTEGER NOT NULL DEFAULT 1
);
INSERT INTO observations_v6 (seq, id, identity_ref, primitive, value, confidence,
    window_start_ts, window_end_ts, source, evidence_ref, envelope_v, ts, attacker_uuid,
    identity_uuid, merged)
SELECT seq, id, identity_ref, primitive, value, confidence, window_start_ts, window_end_ts,
    source, evidence_ref, envelope_v, ts, attacker_uuid, identity_uuid, merged
FROM observations ORDER BY seq;
DROP TABLE observations;
ALTER TABLE observations_v6 RENAME TO observations;
CREATE INDEX ix_observations_attacker_seq ON observations(attacker_uuid, seq);
CREATE INDEX ix_observations_identity_seq ON observations(identity_uuid, seq);
CREATE INDEX ix_observations_unmerged ON observations(seq) WHERE merged = 0
"""

_V6_POSTGRES = """
DROP INDEX IF EXISTS ix_observations_attacker_primitive_ts;
DROP INDEX IF EXISTS ix_observations_identity_primitive_ts;
CREATE INDEX ix_observations_attacker_seq ON observations(attacker_uuid, seq);
CREATE INDEX ix_observations_identity_seq ON observations(identity_uuid, seq)
"""

# v7: where a state row's retained window stands. NULL: the window is
# complete (written with the row). A number: the window covers the key's
# observations up to that seq, and later ones are replayed from the
# observations table when the key is loaded — the embedded store writes
# windows in the background (coalesced) instead of with every batch.
_V7_SQLITE = """
ALTER TABLE attribution_state ADD COLUMN window_seq INTEGER NULL
"""

_V7_POSTGRES = """
ALTER TABLE attribution_state ADD COLUMN window_seq BIGINT NULL
"""

# v8: retention marks. The worker notes now and then "at time T the newest
# observation seq was S"; pruning a horizon deletes the seq range up to the
# newest mark older than it (arrival order, in bulk), never row by row.
_V8_SQLITE = """
CREATE TABLE observation_marks (
    at REAL PRIMARY KEY,
    seq INTEGER NOT NULL
)
"""

_V8_POSTGRES = """
CREATE TABLE observation_marks (
    at DOUBLE PRECISION PRIMARY KEY,
    seq BIGINT NOT NULL
)
"""

# v9: identities that roll up. An attacker's identity can now change when
# the clusterer links it to others: ``home_identity`` remembers the stub
# identity it started with (NULL: still ``identity_id``), so an un-merge
# knows where it goes back. ``identity_merges`` is the audit trail: every
# merge and un-merge with the attackers it moved and the evidence.
_V9_SQLITE = """
ALTER TABLE attackers ADD COLUMN home_identity TEXT NULL;
CREATE TABLE identity_merges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    winner_uuid TEXT NOT NULL,
    loser_uuid TEXT NOT NULL,
    attacker_uuids TEXT NOT NULL,
    evidence TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX ix_identity_merges_winner ON identity_merges(winner_uuid, id);
CREATE INDEX ix_identity_merges_loser ON identity_merges(loser_uuid, id)
"""

_V9_POSTGRES = """
ALTER TABLE attackers ADD COLUMN home_identity TEXT NULL;
CREATE TABLE identity_merges (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    winner_uuid TEXT NOT NULL,
    loser_uuid TEXT NOT NULL,
    attacker_uuids TEXT NOT NULL,
    evidence TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX ix_identity_merges_winner ON identity_merges(winner_uuid, id);
CREATE INDEX ix_identity_merges_loser ON identity_merges(loser_uuid, id)
"""

MIGRATIONS: list[Migration] = [
    Migration(1, _V1_SQLITE, _V1_POSTGRES),
    Migration(2, _V2_SQLITE, _V2_POSTGRES),
    Migration(3, _V3_SQLITE, _V3_POSTGRES),
    Migration(4, _V4, _V4),
    Migration(5, _V5, _V5),
    Migration(6, _V6_SQLITE, _V6_POSTGRES),
    Migration(7, _V7_SQLITE, _V7_POSTGRES),
    Migration(8, _V8_SQLITE, _V8_POSTGRES),
    Migration(9, _V9_SQLITE, _V9_POSTGRES),
]

LATEST_VERSION = max(m.version for m in MIGRATIONS)


def split_statements(script: str) -> list[str]:
    """Split a migration script into statements (``;`` at the end of a line).

    SQLite's ``executescript`` would commit the migration transaction, so the
    SQLite backend runs the statements one by one.
    """
    out: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        stripped = line.rstrip()
        if stripped.endswith(";"):
            current.append(stripped[:-1])
            stmt = "\n".join(current).strip()
            if stmt:
                out.append(stmt)
            current = []
        else:
            current.append(line)
    tail = "\n".join(current).strip()
    if tail:
        out.append(tail)
    return out


async def migrate_sqlite(conn: Any) -> list[int]:
    """Apply pending migrations on an aiosqlite connection in autocommit mode.

    Runs ``BEGIN IMMEDIATE`` … ``COMMIT`` itself; returns the versions applied.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(_SCHEMA_MIGRATIONS_SQLITE)
        rows = await conn.execute_fetchall("SELECT version FROM schema_migrations")
        done = {int(r[0]) for r in rows}
        applied: list[int] = []
        for mig in MIGRATIONS:
            if mig.version in done:
                continue
            for stmt in split_statements(mig.sqlite):
                await conn.execute(stmt)
            await conn.execute(
                "INSERT INTO schema_migrations(version, applied_at) VALUES (?, ?)",
                (mig.version, time.time()),
            )
            applied.append(mig.version)
        await conn.execute("COMMIT")
    except BaseException:
        try:
            await conn.execute("ROLLBACK")
        except Exception:  # pragma: no cover - the connection is gone
            log.debug("rollback after failed migration failed", exc_info=True)
        raise
    if applied:
        log.info("sqlite schema migrated to version %d (applied %s)", max(applied), applied)
    return applied


async def migrate_postgres(conn: Any) -> list[int]:
    """Apply pending migrations on an asyncpg connection (own transaction)."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_MIGRATION_LOCK_KEY)
        await conn.execute(_SCHEMA_MIGRATIONS_PG)
        rows = await conn.fetch("SELECT version FROM schema_migrations")
        done = {int(r["version"]) for r in rows}
        for mig in MIGRATIONS:
            if mig.version in done:
                continue
            await conn.execute(mig.postgres)
            await conn.execute(
                "INSERT INTO schema_migrations(version, applied_at) VALUES ($1, $2)",
                mig.version,
                time.time(),
            )
            applied.append(mig.version)
    if applied:
        log.info("postgresql schema migrated to version %d (applied %s)", max(applied), applied)
    return applied


# ---- query helpers shared by both backends -------------------------------------------------

ATTACKER_COLS = "uuid, ip, identity_id, first_seen, last_seen, rotation_count, last_rotation_at"

STATE_COLS = (
    "identity_uuid, primitive, current_value, state, confidence, observation_count, "
    'last_change_ts, last_observation_ts, kind, "window", version, updated_at, previous_state'
)

OBS_INSERT_COLS = (
    "id, identity_ref, primitive, value, confidence, window_start_ts, window_end_ts, "
    "source, evidence_ref, envelope_v, ts, attacker_uuid, identity_uuid, merged"
)

# 14 columns; the backends append the identity column as the 15th.
OBS_SELECT_COLS = (
    "o.seq, o.id, o.attacker_uuid, o.primitive, o.value, o.ts, o.evidence_ref, "
    "o.confidence, o.window_start_ts, o.window_end_ts, o.source, o.identity_ref, "
    "o.envelope_v, o.merged"
)

USER_COLS = (
    "uuid, username, password_hash, role, must_change_password, disabled, "
    "tokens_valid_from, created_at, updated_at"
)

TICKET_COLS = (
    "ticket_hash, user_uuid, role, expires_at, created_at, token_jti, token_iat, token_exp"
)


def attacker_from_row(r: Sequence[Any]) -> AttackerRow:
    return AttackerRow(
        uuid=r[0],
        ip=r[1],
        identity_id=r[2],
        first_seen=r[3],
        last_seen=r[4],
        rotation_count=r[5],
        last_rotation_at=r[6],
    )


def attacker_attribution_from_rows(rows: Sequence[Sequence[Any]]) -> AttackerAttribution | None:
    """From ``attackers LEFT JOIN attribution_state`` rows: ``identity_id``
    then the seven :class:`AttributionView` columns (NULL without rows)."""
    if not rows:
        return None
    identity = rows[0][0]
    if identity is None or rows[0][1] is None:
        return AttackerAttribution(identity, [])
    return AttackerAttribution(
        identity,
        [AttributionView(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows],
    )


def state_from_row(r: Sequence[Any]) -> StateRow:
    return StateRow(
        identity_uuid=r[0],
        primitive=r[1],
        current_value_json=r[2],
        state=r[3],
        confidence=r[4],
        observation_count=r[5],
        last_change_ts=r[6],
        last_observation_ts=r[7],
        kind=r[8],
        window_json=r[9],
        version=r[10],
        updated_at=r[11],
        previous_state=r[12],
        window_seq=r[13] if len(r) > 13 else None,
    )


def observation_from_row(r: Sequence[Any]) -> ObservationRow:
    """From ``OBS_SELECT_COLS`` + the identity column."""
    return ObservationRow(
        seq=r[0],
        id=r[1],
        attacker_uuid=r[2],
        primitive=r[3],
        value_json=r[4],
        ts=r[5],
        evidence_ref=r[6],
        confidence=r[7],
        window_start_ts=r[8],
        window_end_ts=r[9],
        source=r[10],
        identity_ref=r[11],
        envelope_v=r[12],
        merged=bool(r[13]),
        identity_uuid=r[14],
    )


def user_from_row(r: Sequence[Any]) -> UserRow:
    return UserRow(
        uuid=r[0],
        username=r[1],
        password_hash=r[2],
        role=r[3],
        must_change_password=bool(r[4]),
        disabled=bool(r[5]),
        tokens_valid_from=r[6],
        created_at=r[7],
        updated_at=r[8],
    )


def ticket_from_row(r: Sequence[Any]) -> TicketRow:
    return TicketRow(
        ticket_hash=r[0],
        user_uuid=r[1],
        role=r[2],
        expires_at=r[3],
        created_at=r[4],
        token_jti=r[5],
        token_iat=r[6],
        token_exp=r[7],
    )


def dedupe_states(rows: Sequence[StateRow]) -> list[StateRow]:
    """Last row per key wins (a batch may carry one key twice)."""
    by_key: dict[Key, StateRow] = {}
    for r in rows:
        by_key[(r.identity_uuid, r.primitive)] = r
    return list(by_key.values())


def merge_attacker_items(
    items: Sequence[tuple[str, str | None, float]],
) -> list[tuple[str, str | None, float, float]]:
    """``(uuid, ip, seen_ts)`` items folded per uuid into ``(uuid, ip, first, last)``,
    sorted by uuid (a stable lock order); the first non-null ip wins."""
    merged: dict[str, list[Any]] = {}
    for uuid, ip, ts in items:
        cur = merged.get(uuid)
        if cur is None:
            merged[uuid] = [uuid, ip, ts, ts]
        else:
            if cur[1] is None:
                cur[1] = ip
            cur[2] = min(cur[2], ts)
            cur[3] = max(cur[3], ts)
    return [(m[0], m[1], float(m[2]), float(m[3])) for m in (merged[k] for k in sorted(merged))]


def match_inserted(rows: Sequence[tuple[Any, ...]], inserted: Sequence[Sequence[Any]]) -> list[int]:
    """Indexes into ``rows`` (insert tuples) of the rows the database reports
    as inserted.

    ``inserted`` holds ``(id, evidence_ref, primitive)`` of the new rows. Within
    a batch the first of several identical rows is the one that got in (the
    others conflicted with it).
    """
    first: dict[tuple[str, str, str], int] = {}
    for i, r in enumerate(rows):
        first.setdefault((r[0], r[8], r[2]), i)
    out: list[int] = []
    for ins in inserted:
        idx = first.get((ins[0], ins[1], ins[2]))
        if idx is not None:
            out.append(idx)
    out.sort()
    return out


_LIST_SORTS = {"last_seen": "last_seen", "first_seen": "first_seen", "ip": "ip"}
#: The observation count of attacker ``p`` (the list's ``observation_count``).
_EVENT_COUNT = "(SELECT count(*) FROM observations o WHERE o.attacker_uuid = {a}.uuid)"
#: The list sorts: the attackers-table columns plus ``events`` (most observations first).
LIST_SORTS: tuple[str, ...] = (*_LIST_SORTS, "events")

#: Evidence references of sensor shards: ``shard:<decky>/<service>/<file>#<session>``.
SHARD_REF_PREFIX = "shard:"


def like_pattern(text: str) -> str:
    """``text`` with the LIKE wildcards escaped (use with ``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_order(sort: str, descending: bool, alias: str) -> str:
    """``ORDER BY`` of :meth:`Store.list_attackers` (NULL ips last, uuid tie-break;
    ``events``: most observations first, then the latest seen)."""
    d = "DESC" if descending else "ASC"
    if sort == "events":
        return f"{_EVENT_COUNT.format(a=alias)} {d}, {alias}.last_seen {d}, {alias}.uuid {d}"
    if sort not in _LIST_SORTS:
        raise ValueError(f"unknown sort {sort!r}; expected one of {sorted(LIST_SORTS)}")
    col = f"{alias}.{_LIST_SORTS[sort]}"
    nulls_last = f"({col} IS NULL) ASC, " if sort == "ip" else ""
    return f"{nulls_last}{col} {d}, {alias}.uuid {d}"


def _multi_actor_count(a: str) -> str:
    return (
        "(SELECT count(*) FROM attribution_state s "
        f"WHERE s.identity_uuid = {a}.identity_id AND s.state = 'multi_actor')"
    )


def list_filters(
    param: Callable[[int], str],
    *,
    uuid: str | None = None,
    search: str | None = None,
    service: str | None = None,
    filters: AttackerFilter | None = None,
    in_network: Callable[[Callable[[Any], str], tuple[str, str, str]], str] | None = None,
) -> tuple[str, list[Any]]:
    """``WHERE`` clause (or "") and its parameters for :meth:`Store.list_attackers`:
    an exact attacker uuid; ``search``, a case-insensitive substring of the ip or
    the uuid; ``service``, attackers with an observation from a shard of that
    service; ``filters`` (:class:`AttackerFilter`). Parameters are numbered from 1.
    ``in_network(add, (cidr, first_key, last_key))`` is the dialect's test
    that ``a.ip`` lies in a network (``add(value)`` binds a parameter)."""
    conds: list[str] = []
    params: list[Any] = []

    def add(value: Any) -> str:
        params.append(value)
        return param(len(params))

    def any_of(values: Sequence[Any]) -> str:
        return ", ".join(add(v) for v in values)

    if uuid is not None:
        conds.append(f"a.uuid = {add(uuid)}")
    if search:
        n = add(f"%{like_pattern(search.lower())}%")
        conds.append(f"(lower(a.ip) LIKE {n} ESCAPE '\\' OR lower(a.uuid) LIKE {n} ESCAPE '\\')")
    if service:
        n = add(f"{SHARD_REF_PREFIX}%/{like_pattern(service)}/%")
        conds.append(
            "EXISTS (SELECT 1 FROM observations o WHERE o.attacker_uuid = a.uuid "
            f"AND o.evidence_ref LIKE {n} ESCAPE '\\')"
        )
    f = filters or AttackerFilter()
    ip_conds: list[str] = []
    if f.ips:
        ip_conds.append(f"a.ip IN ({any_of(f.ips)})")
    by_length: dict[int, list[str]] = {}
    for prefix in f.ip_prefixes:
        by_length.setdefault(len(prefix), []).append(prefix)
    for length, prefixes in sorted(by_length.items()):
        # the length is an int computed here, never text from the request
        ip_conds.append(f"substr(a.ip, 1, {int(length)}) IN ({any_of(prefixes)})")
    for cidr, lo, hi in f.networks:
        if in_network is None:
            raise ValueError("this store cannot filter by network")
        ip_conds.append(in_network(add, (cidr, lo, hi)))
    if ip_conds:
        conds.append(f"({' OR '.join(ip_conds)})")
    if f.attacker_prefix:
        n = add(f"{like_pattern(f.attacker_prefix.lower())}%")
        conds.append(f"lower(a.uuid) LIKE {n} ESCAPE '\\'")
    if f.identity_prefix:
        n = add(f"{like_pattern(f.identity_prefix.lower())}%")
        conds.append(f"lower(a.identity_id) LIKE {n} ESCAPE '\\'")
    if f.states:
        conds.append(
            "EXISTS (SELECT 1 FROM attribution_state s WHERE s.identity_uuid = a.identity_id "
            f"AND s.state IN ({any_of(f.states)}))"
        )
    if f.multi_actor is not None:
        op = ">=" if f.multi_actor else "<"
        conds.append(f"{_multi_actor_count('a')} {op} {int(MULTI_ACTOR_FLAG_MIN)}")
    if f.seen_since is not None:
        conds.append(f"a.last_seen >= {add(float(f.seen_since))}")
    return (f"WHERE {' AND '.join(conds)}" if conds else ""), params


def list_attackers_sql(
    sort: str, descending: bool, where: str, limit_param: str, offset_param: str
) -> str:
    """The page, each attacker's observation count and its identity's per-state
    counts, in one query (lookups on the observations' attacker index and the
    state table's primary key, for the page's rows only). ``where``
    comes from :func:`list_filters`. The total is a second, plain ``count(*)``
    with the same ``where``."""
    counts = ",\n".join(
        "    (SELECT count(*) FROM attribution_state s WHERE s.identity_uuid = p.identity_id "
        f"AND s.state = '{st}') AS c_{st}"
        for st in STATES
    )
    return f"""
WITH page AS (
    SELECT a.uuid, a.ip, a.identity_id, a.first_seen, a.last_seen, a.rotation_count,
           a.last_rotation_at
    FROM attackers a
    {where}
    ORDER BY {list_order(sort, descending, "a")}
    LIMIT {limit_param} OFFSET {offset_param}
)
SELECT p.uuid, p.ip, p.identity_id, p.first_seen, p.last_seen, p.rotation_count,
       p.last_rotation_at,
    {_EVENT_COUNT.format(a="p")} AS n_obs,
{counts}
FROM page p
ORDER BY {list_order(sort, descending, "p")}
"""


#: The fleet's totals for the overview stream: attackers, live (unmerged)
#: identities, then one row per attribution state with its primitive count.
OVERVIEW_TOTALS_SQL = (
    "SELECT (SELECT count(*) FROM attackers), "
    "(SELECT count(*) FROM attacker_identities WHERE merged_into_uuid IS NULL)"
)
OVERVIEW_STATES_SQL = "SELECT state, count(*) FROM attribution_state GROUP BY state"


def overview_counts_from_rows(
    totals: Sequence[Any], states: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """``{"attackers", "identities", "states": {state: n for every state}}``."""
    by_state = dict.fromkeys(STATES, 0)
    for st, n in states:
        if st in by_state:
            by_state[st] = int(n)
    return {"attackers": int(totals[0]), "identities": int(totals[1]), "states": by_state}


#: Distinct shard references of some attackers' observations (``{ids}``: placeholders).
EVIDENCE_SQL = (
    "SELECT DISTINCT attacker_uuid, evidence_ref FROM observations "
    "WHERE attacker_uuid IN ({ids}) AND evidence_ref LIKE '" + SHARD_REF_PREFIX + "%' "
    "ORDER BY attacker_uuid, evidence_ref"
)


#: The identity columns :meth:`Store.recent_identities` returns, in this order.
IDENTITY_FIELDS: tuple[str, ...] = (
    "uuid",
    "campaign_id",
    "merged_into_uuid",
    "first_seen_at",
    "last_seen_at",
    "created_at",
    "updated_at",
    "confidence",
    "observation_count",
)


def recent_identities_sql(limit_param: str) -> str:
    return (
        f"SELECT {', '.join(IDENTITY_FIELDS)} FROM attacker_identities "
        f"ORDER BY updated_at DESC, uuid DESC LIMIT {limit_param}"
    )


def identities_from_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(IDENTITY_FIELDS, r)) for r in rows]


def evidence_from_rows(rows: Sequence[Sequence[Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for uuid, ref in rows:
        out.setdefault(uuid, []).append(ref)
    return out


def summaries_from_rows(rows: Sequence[Sequence[Any]]) -> list[AttackerSummary]:
    """:class:`AttackerSummary` objects from :func:`list_attackers_sql` rows."""
    out: list[AttackerSummary] = []
    for r in rows:
        counts = {st: int(r[8 + i]) for i, st in enumerate(STATES)}
        out.append(
            AttackerSummary(
                attacker=attacker_from_row(r[:7]),
                state_counts=counts,
                multi_actor=counts["multi_actor"] >= MULTI_ACTOR_FLAG_MIN,
                observation_count=int(r[7]),
            )
        )
    return out


def user_update_sets(
    fields: dict[str, Any], param: Callable[[int], str], *, bools_as_int: bool
) -> tuple[str, list[Any]]:
    """``SET`` clause and parameters for :meth:`Store.update_user` (names whitelisted)."""
    unknown = set(fields) - USER_UPDATE_FIELDS - {"updated_at"}
    if unknown:
        raise ValueError(f"cannot update user field(s): {', '.join(sorted(unknown))}")
    values = dict(fields)
    if values.get("updated_at") is None:
        values["updated_at"] = time.time()
    sets: list[str] = []
    params: list[Any] = []
    for i, (name, value) in enumerate(sorted(values.items()), start=1):
        v = value
        if name in ("must_change_password", "disabled"):
            v = int(bool(value)) if bools_as_int else bool(value)
        sets.append(f"{name} = {param(i)}")
        params.append(v)
    return ", ".join(sets), params
