"""What the SQLite writer pays per observation, by table layout. Run with
``make bench`` (or ``-k layout``).

The embedded worker is bound by its writer thread: the SQL of a batch (the
observation rows, the state rows, the COMMIT) costs more than everything
else together. This bench times only that SQL, on the Rust connection the
store writes through (the GIL released), for the same 100,000 observations
of the sustained bench (``benchkit.as_events``: sessions of 38 primitives of
one attacker) in batches of 2,000, one transaction each:

- ``rows``: today's layout: one ``observations`` row per observation (the
  store's own insert), grouped by attacker with one ``observation_runs``
  row per group (schema v10), and one ``attribution_state`` row per key
  (the store's own upsert of the state values);
- ``chunks``: a candidate observation log: one row per attacker per batch
  holding that attacker's observations of the batch as one JSON array,
  indexed by (attacker, seq) and (identity, seq) as the rows are today;
  state rows as today;
- ``chunks + identity states``: the same log, and one state row per
  identity holding its primitives' states as one JSON object.

The two candidates are measurements for the layout decision
(``benches/RESULTS.md``), not code the store runs.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from benches.conftest import record
from decnet_attr._core import SqliteConnection
from decnet_attr.benchkit import as_events
from decnet_attr.config import Settings
from decnet_attr.observations import validate
from decnet_attr.store.sqlite import (
    _SQL_INSERT_OBS,
    _SQL_INSERT_RUN,
    _SQL_UPSERT_STATE_VALUES,
    SqliteStore,
)

N = 100_000
BATCH = 2_000
LAYOUTS = ("rows", "chunks", "chunks + identity states")

_CHUNKS_DDL = (
    "CREATE TABLE obs_chunks (seq INTEGER PRIMARY KEY, attacker_uuid TEXT NOT NULL, "
    "identity_uuid TEXT, first_ts REAL, last_ts REAL, n INTEGER, body BLOB NOT NULL)",
    "CREATE INDEX ix_chunks_attacker ON obs_chunks(attacker_uuid, seq)",
    "CREATE INDEX ix_chunks_identity ON obs_chunks(identity_uuid, seq)",
    "CREATE TABLE identity_states (identity_uuid TEXT PRIMARY KEY, body BLOB NOT NULL, "
    "version INTEGER NOT NULL) WITHOUT ROWID",
)
_INSERT_CHUNK = (
    "INSERT INTO obs_chunks (attacker_uuid, identity_uuid, first_ts, last_ts, n, body) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_IDENTITY_STATES = (
    "INSERT INTO identity_states VALUES (?, ?, 1) ON CONFLICT (identity_uuid) "
    "DO UPDATE SET body = excluded.body, version = version + 1"
)


def _database(directory: Path) -> SqliteConnection:
    """The store's schema in a fresh file, opened as the store's writer is."""
    path = directory / "attr.db"

    async def create() -> None:
        store = SqliteStore(path)
        await store.open()
        await store.close()

    asyncio.run(create())
    conn = SqliteConnection(str(path))
    for pragma in (
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        f"PRAGMA cache_size = -{SqliteStore.cache_kib}",
        f"PRAGMA wal_autocheckpoint = {SqliteStore.wal_autocheckpoint_pages}",
        # the attackers and identities the rows point to are not written here
        "PRAGMA foreign_keys = OFF",
    ):
        conn.execute(pragma)
    for ddl in _CHUNKS_DDL:
        conn.execute(ddl)
    return conn


def _statements(layout: str, part: list[dict[str, Any]], now: float) -> list[tuple[str, list]]:
    """The writes of one batch in ``layout``: (sql, parameter sets)."""
    states = [
        (
            o["attacker_uuid"],
            o["primitive"],
            orjson.dumps(o["value"]).decode(),
            "stable",
            0.5,
            1,
            o["ts"],
            o["ts"],
            "categorical",
            1,
            now,
            None,
        )
        for o in part
    ]
    if layout == "rows":
        # the observation rows as the store writes them (its column order),
        # grouped by attacker, each group after its run (schema v10)
        batch = validate(b"\n".join(orjson.dumps(o) for o in part), Settings())
        rows = batch.rows(
            {o["attacker_uuid"]: o["attacker_uuid"] for o in part}, batch.by_attacker()
        )
        out: list[tuple[str, list[Any]]] = []
        for a, group in itertools.groupby(rows, key=lambda r: r[11]):
            group_rows = list(group)
            out += [(_SQL_INSERT_RUN, [(len(group_rows), a, a)]), (_SQL_INSERT_OBS, group_rows)]
        return [*out, (_SQL_UPSERT_STATE_VALUES, states)]
    by_attacker: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for o in part:
        by_attacker[o["attacker_uuid"]].append(o)
    chunks = [
        (a, a, obs[0]["ts"], obs[-1]["ts"], len(obs), orjson.dumps(obs))
        for a, obs in by_attacker.items()
    ]
    if layout == "chunks":
        return [(_INSERT_CHUNK, chunks), (_SQL_UPSERT_STATE_VALUES, states)]
    per_identity = [
        (a, orjson.dumps({o["primitive"]: [o["value"], "stable", 0.5, 1, o["ts"]] for o in obs}))
        for a, obs in by_attacker.items()
    ]
    return [(_INSERT_CHUNK, chunks), (_UPSERT_IDENTITY_STATES, per_identity)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writer_sql_per_layout(benchmark: Any, layout: str) -> None:
    events = as_events(N)
    now = time.time()
    work = [_statements(layout, events[i : i + BATCH], now) for i in range(0, N, BATCH)]
    dirs: list[tempfile.TemporaryDirectory[str]] = []

    def setup() -> tuple[tuple[SqliteConnection], dict[str, Any]]:
        d = tempfile.TemporaryDirectory()
        dirs.append(d)
        return (_database(Path(d.name)),), {}

    def run(conn: SqliteConnection) -> None:
        for batch in work:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in batch:
                conn.executemany(sql, params)
            conn.execute("COMMIT")
        conn.close()

    try:
        benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    finally:
        for d in dirs:
            d.cleanup()
    record(benchmark, f"SQLite writer SQL only, layout {layout!r} (100k observations)", N)
