"""Versioned schema migrations for both dialects.

Each migration is ``(version, sqlite_sql, postgres_sql)``; the SQL is a
script of statements separated by ``;`` at the end of a line. A migration
both dialects share is written once with the column types that differ as
``{placeholders}`` (:func:`_ddl`). Applied
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
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Migration(NamedTuple):
    version: int
    sqlite: str
    postgres: str


#: The column types that differ between the dialects; the DDL below names
#: them ``{real}``, ``{serial}``, … and :func:`_ddl` writes both versions.
_SQLITE_TYPES = {
    "real": "REAL",
    "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "bigint": "INTEGER",
    "flag_on": "INTEGER NOT NULL DEFAULT 1",
    "flag_off": "INTEGER NOT NULL DEFAULT 0",
    "unmerged": "merged = 0",
    "merged": "merged = 1",
    "same": "IS",
    "runs_join": "CROSS JOIN",
}
_POSTGRES_TYPES = {
    "real": "DOUBLE PRECISION",
    "serial": "BIGSERIAL PRIMARY KEY",
    "bigint": "BIGINT",
    "flag_on": "BOOLEAN NOT NULL DEFAULT TRUE",
    "flag_off": "BOOLEAN NOT NULL DEFAULT FALSE",
    "unmerged": "NOT merged",
    "merged": "merged",
    "same": "IS NOT DISTINCT FROM",
    "runs_join": "JOIN",
}


def _ddl(template: str) -> tuple[str, str]:
    """A migration written once: its SQLite and PostgreSQL scripts."""
    return template.format(**_SQLITE_TYPES), template.format(**_POSTGRES_TYPES)


# Arbitrary constant key for pg_advisory_xact_lock (the bytes of "decnattr").
PG_MIGRATION_LOCK_KEY = 0x6465636E61747472

_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at {real} NOT NULL
)
"""

_V1 = """
CREATE TABLE attacker_identities (
    uuid TEXT PRIMARY KEY,
    schema_version INTEGER NOT NULL DEFAULT 1,
    campaign_id TEXT NULL,
    first_seen_at {real} NULL,
    last_seen_at {real} NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    confidence {real} NULL,
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
    first_seen {real} NOT NULL,
    last_seen {real} NOT NULL,
    rotation_count INTEGER NOT NULL DEFAULT 0,
    last_rotation_at {real} NULL
);
CREATE INDEX ix_attackers_identity_id ON attackers(identity_id);
CREATE INDEX ix_attackers_last_seen ON attackers(last_seen);

CREATE TABLE observations (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    identity_ref TEXT NULL,
    primitive TEXT NOT NULL,
    value TEXT NOT NULL,
    confidence {real} NULL,
    window_start_ts {real} NULL,
    window_end_ts {real} NULL,
    source TEXT NULL,
    evidence_ref TEXT NOT NULL,
    envelope_v INTEGER NOT NULL DEFAULT 1,
    ts {real} NOT NULL,
    attacker_uuid TEXT NOT NULL REFERENCES attackers(uuid),
    identity_uuid TEXT NULL,
    merged {flag_on},
    CONSTRAINT uq_observations_evidence_primitive UNIQUE (evidence_ref, primitive)
);
CREATE INDEX ix_observations_attacker_primitive_ts
    ON observations(attacker_uuid, primitive, ts, seq);
CREATE INDEX ix_observations_identity_primitive_ts
    ON observations(identity_uuid, primitive, ts, seq);
CREATE INDEX ix_observations_primitive_ts ON observations(primitive, ts);
CREATE INDEX ix_observations_unmerged ON observations(seq) WHERE {unmerged};

CREATE TABLE attribution_state (
    identity_uuid TEXT NOT NULL REFERENCES attacker_identities(uuid),
    primitive TEXT NOT NULL,
    current_value TEXT NOT NULL,
    state TEXT NOT NULL,
    confidence {real} NOT NULL,
    observation_count INTEGER NOT NULL DEFAULT 0,
    last_change_ts {real} NOT NULL,
    last_observation_ts {real} NOT NULL,
    schema_version INTEGER NOT NULL DEFAULT 1,
    updated_at {real} NOT NULL,
    kind TEXT NOT NULL DEFAULT 'categorical',
    "window" TEXT NULL,
    version {bigint} NOT NULL DEFAULT 0,
    PRIMARY KEY (identity_uuid, primitive)
);
CREATE INDEX ix_attribution_state_state ON attribution_state(state);
CREATE INDEX ix_attribution_state_last_change ON attribution_state(last_change_ts);
CREATE INDEX ix_attribution_state_identity_state ON attribution_state(identity_uuid, state);

CREATE TABLE multi_actor_log (
    identity_uuid TEXT PRIMARY KEY,
    primitives TEXT NOT NULL,
    fired_at {real} NOT NULL
);

CREATE TABLE dead_letters (
    seq {serial},
    received_at {real} NOT NULL,
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
    must_change_password {flag_off},
    disabled {flag_off},
    tokens_valid_from {real} NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL
);

CREATE TABLE revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at {real} NOT NULL
);

CREATE TABLE sse_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_uuid TEXT NOT NULL,
    role TEXT NOT NULL,
    expires_at {real} NOT NULL,
    created_at {real} NOT NULL
);
CREATE INDEX ix_sse_tickets_user_expires ON sse_tickets(user_uuid, expires_at)
"""

# v2: an SSE ticket remembers the access token it was minted with (jti, iat,
# exp) so that redemption re-checks revocation and the tokens_valid_from cutoff.
_V2 = """
ALTER TABLE sse_tickets ADD COLUMN token_jti TEXT NULL;
ALTER TABLE sse_tickets ADD COLUMN token_iat {real} NULL;
ALTER TABLE sse_tickets ADD COLUMN token_exp {real} NULL
"""

# v3: the state before the last transition, so `explain` can say where a
# badge came from.
_V3 = """
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
_V7 = """
ALTER TABLE attribution_state ADD COLUMN window_seq {bigint} NULL
"""

# v8: retention marks. The worker notes now and then "at time T the newest
# observation seq was S"; pruning a horizon deletes the seq range up to the
# newest mark older than it (arrival order, in bulk), never row by row.
_V8 = """
CREATE TABLE observation_marks (
    at {real} PRIMARY KEY,
    seq {bigint} NOT NULL
)
"""

# v9: identities that roll up. An attacker's identity can now change when
# the clusterer links it to others: ``home_identity`` remembers the stub
# identity it started with (NULL: still ``identity_id``), so an un-merge
# knows where it goes back. ``identity_merges`` is the audit trail: every
# merge and un-merge with the attackers it moved and the evidence.
_V9 = """
ALTER TABLE attackers ADD COLUMN home_identity TEXT NULL;
CREATE TABLE identity_merges (
    id {serial},
    kind TEXT NOT NULL,
    winner_uuid TEXT NOT NULL,
    loser_uuid TEXT NOT NULL,
    attacker_uuids TEXT NOT NULL,
    evidence TEXT NOT NULL,
    ts {real} NOT NULL
);
CREATE INDEX ix_identity_merges_winner ON identity_merges(winner_uuid, id);
CREATE INDEX ix_identity_merges_loser ON identity_merges(loser_uuid, id)
"""

#: Runs for the observations above the newest run: consecutive merged seqs
#: of one attacker and identity, each stretch one run, and a run of its own
#: for each row not merged yet (merging it gives its run its identity).
#: Schema v10 (SQLite) and v13 (PostgreSQL) cut the stored rows so; each
#: backend runs it again at every open, for rows written since by something
#: other than the store (one INSERT at a time, no run). ``n`` is how many
#: rows the run holds.
_COVER_RUNS = """
INSERT INTO observation_runs (first_seq, last_seq, attacker_uuid, identity_uuid, n)
SELECT min(seq), max(seq), attacker_uuid, identity_uuid, count(*) FROM (
    SELECT seq, attacker_uuid, identity_uuid, sum(brk) OVER (ORDER BY seq) AS grp FROM (
        SELECT seq, attacker_uuid, identity_uuid,
            CASE WHEN {merged} AND lag({merged}) OVER w
                AND attacker_uuid {same} lag(attacker_uuid) OVER w
                AND identity_uuid {same} lag(identity_uuid) OVER w THEN 0 ELSE 1 END AS brk
        FROM observations
        WHERE seq > coalesce(
            (SELECT last_seq FROM observation_runs ORDER BY first_seq DESC LIMIT 1), 0)
        WINDOW w AS (ORDER BY seq)) AS cut) AS grouped
GROUP BY grp, attacker_uuid, identity_uuid
"""
COVER_RUNS_SQLITE, COVER_RUNS_POSTGRES = _ddl(_COVER_RUNS)

#: The observation runs, their two indexes and the view reads go through
#: (schema v10 on SQLite, v13 on PostgreSQL). Observations are appended in
#: seq order; one ``observation_runs`` row per attacker per written batch
#: (its rows take consecutive seqs) says which seq range holds which
#: attacker's rows, under which identity. Reads by attacker or identity
#: find the runs by index and then the rows by seq range
#: (``observations_by_run``; runs do not overlap, so ordered by their last
#: seq they are in seq order, and a lower bound on seq bounds the runs too;
#: on SQLite CROSS JOIN keeps the runs the outer loop whatever the planner
#: guesses): one run row per attacker per batch where every observation
#: added an entry to two indexes. A run counts its rows (``n``, kept exact
#: by retention), so an attacker's observation count is a sum over its
#: runs, not a count of its rows.
_RUNS = """
CREATE TABLE observation_runs (
    first_seq {bigint} PRIMARY KEY,
    last_seq {bigint} NOT NULL,
    attacker_uuid TEXT NOT NULL,
    identity_uuid TEXT NULL,
    n INTEGER NOT NULL
);
{cover};
DROP INDEX IF EXISTS ix_observations_attacker_seq;
DROP INDEX IF EXISTS ix_observations_identity_seq;
CREATE INDEX ix_observation_runs_attacker ON observation_runs(attacker_uuid, last_seq);
CREATE INDEX ix_observation_runs_identity ON observation_runs(identity_uuid, last_seq);
CREATE VIEW observations_by_run AS
SELECT o.*, r.attacker_uuid AS run_attacker, r.identity_uuid AS run_identity,
    r.last_seq AS run_last
FROM observation_runs r {runs_join} observations o ON o.seq BETWEEN r.first_seq AND r.last_seq
"""

# v10 (SQLite): runs instead of the per-observation (attacker|identity, seq)
# indexes (``_RUNS``). The worker stores a batch's observations grouped by
# attacker, so an attacker's rows of one batch have consecutive seqs.
_V10_SQLITE = _RUNS.format(cover=COVER_RUNS_SQLITE.strip(), **_SQLITE_TYPES)

# v11 (PostgreSQL): no foreign key from an observation to its attacker, or
# from a state row to its identity. Each was a trigger per inserted row
# (a key-share lock on the referenced row, then the queued check): together
# ~17 % of the server's time per observation on the worker's path
# (measured: 32 -> 27 us of server CPU per observation). The store checks
# the referenced rows once per batch instead (``postgres._require``);
# neither attackers nor identities with rows pointing at them are ever
# deleted. SQLite keeps its keys (its check is an index probe in-process).
_V11_POSTGRES = """
ALTER TABLE observations DROP CONSTRAINT IF EXISTS observations_attacker_uuid_fkey;
ALTER TABLE attribution_state DROP CONSTRAINT IF EXISTS attribution_state_identity_uuid_fkey
"""

# v12 (PostgreSQL): room on every page of attribution_state for the next
# version of its rows. An update that leaves the indexed columns alone (the
# key, and ``state``: every update that is not a transition) stays on its
# page as a heap-only tuple, with no new entry in either index, when the
# page has room. Rows written in bulk (the worker's COPY of new rows) filled
# their pages, so each row's first update went to another page and into
# both indexes (measured, 30k such updates of 100k rows with windows:
# 14.9-16.3 -> 10.0-12.6 us of server CPU a row); later ones mostly found
# room left by earlier versions (20 batches of a tenth of the rows: 85 % ->
# 100 % heap-only). New pages only: stored rows keep theirs until they move.
_V12_POSTGRES = """
ALTER TABLE attribution_state SET (fillfactor = 80)
"""

#: Seqs a PostgreSQL writer takes at once (schema v13): one number from
#: ``observation_blocks`` is a block of this many consecutive seqs. Several
#: writers insert at once there, so the seqs of one batch are consecutive
#: (one run per attacker) only if the batch owns a block: a batch takes one
#: block per this many rows. A row inserted with the column's default
#: takes a whole block (2^47 blocks: at a thousand single-row inserts a
#: second, four thousand years).
SEQ_BLOCK = 1 << 16

# v13 (PostgreSQL): observation runs, as on SQLite since v10 (``_RUNS``).
# Each observation put an entry in (attacker_uuid, seq) and (identity_uuid,
# seq): measured, 100k observations by COPY in batches of 2,000, 9.3 -> 5.2
# us of server CPU an observation without them, the runs written. Seqs come
# in blocks (``SEQ_BLOCK``) so that writers working at once never interleave
# their rows; the first block lies above every stored seq.
_V13_POSTGRES = f"""
CREATE SEQUENCE observation_blocks;
SELECT setval('observation_blocks', coalesce(max(seq), 0) / {SEQ_BLOCK} + 1, false)
FROM observations;
ALTER TABLE observations ALTER COLUMN seq SET DEFAULT nextval('observation_blocks') * {SEQ_BLOCK};
{_RUNS.format(cover=COVER_RUNS_POSTGRES.strip(), **_POSTGRES_TYPES).strip()}
"""

MIGRATIONS: list[Migration] = [
    Migration(1, *_ddl(_V1)),
    Migration(2, *_ddl(_V2)),
    Migration(3, *_ddl(_V3)),
    Migration(4, _V4, _V4),
    Migration(5, _V5, _V5),
    Migration(6, _V6_SQLITE, _V6_POSTGRES),
    Migration(7, *_ddl(_V7)),
    Migration(8, *_ddl(_V8)),
    Migration(9, *_ddl(_V9)),
    Migration(10, _V10_SQLITE, "SELECT 1"),
    Migration(11, "SELECT 1", _V11_POSTGRES),
    Migration(12, "SELECT 1", _V12_POSTGRES),
    Migration(13, "SELECT 1", _V13_POSTGRES),
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
    """Apply pending migrations on an aiosqlite connection in autocommit mode,
    then give the observations written since the last open without a run
    their runs (:data:`COVER_RUNS_SQLITE`).

    Runs ``BEGIN IMMEDIATE`` … ``COMMIT`` itself; returns the versions applied.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(_SCHEMA_MIGRATIONS.format(**_SQLITE_TYPES))
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
        # rows written since the last open by something other than the store
        await conn.execute(COVER_RUNS_SQLITE)
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
        await conn.execute(_SCHEMA_MIGRATIONS.format(**_POSTGRES_TYPES))
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
        # rows written since the last open by something other than the store
        await conn.execute(COVER_RUNS_POSTGRES)
    if applied:
        log.info("postgresql schema migrated to version %d (applied %s)", max(applied), applied)
    return applied
