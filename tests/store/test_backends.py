"""Backend selection, failure modes, locking and volume: the parts of the
contract that are about the machinery rather than the data."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import decnet_attr.store.sqlite as sqlite_mod
from decnet_attr._core import ValidatedBatch
from decnet_attr.store import (
    ObservationRow,
    Store,
    StoreError,
    StoreUnavailable,
    TicketRow,
    open_store,
)
from decnet_attr.store.postgres import PostgresStore
from decnet_attr.store.schema import MIGRATIONS, SEQ_BLOCK, split_statements
from decnet_attr.store.sqlite import SqliteStore
from tests.pgserver import PgServer, free_port, requires_postgres
from tests.store.conftest import obs, scalar, state

OpenAnother = Callable[[], Awaitable[Store]]


# ---- open_store ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///abs/path.db", "/abs/path.db"),
        ("sqlite://relative.db", "relative.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite://", ":memory:"),
        ("/var/lib/decnet-attr/attr.db", "/var/lib/decnet-attr/attr.db"),
        ("data/attr.db", "data/attr.db"),
    ],
)
def test_open_store_sqlite(url: str, path: str) -> None:
    st = open_store(url)
    assert isinstance(st, SqliteStore)
    assert st.path == path and st.dialect == "sqlite"


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:p@db:5432/attr", "postgres://db/attr", "postgresql://u@h/d?sslmode=disable"],
)
def test_open_store_postgres(url: str) -> None:
    st = open_store(url)
    assert isinstance(st, PostgresStore)
    assert st.url == url and st.dialect == "postgresql"


@pytest.mark.parametrize(
    "url",
    ["", "   ", "mysql://db/attr", "redis://x", "postgresql+asyncpg://h/d", "sqlite:///x?a=1"],
)
def test_open_store_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


async def test_sqlite_url_roundtrip(tmp_path: Path) -> None:
    st = open_store(f"sqlite://{tmp_path / 'a.db'}")
    await st.open()
    try:
        again = open_store(st.url)
        assert isinstance(again, SqliteStore) and again.path == str(tmp_path / "a.db")
    finally:
        await st.close()


async def test_sqlite_memory_store_works() -> None:
    st = open_store("sqlite://:memory:")
    await st.open()
    try:
        async with st.transaction() as tx:
            await tx.ensure_attackers([("a", None, 1.0)])
            await tx.ensure_identities(["a"], 1.0)
            await tx.insert_observations([obs("o", "a")])
        assert [len(b) async for b in st.iter_observations()] == [1]
    finally:
        await st.close()


# ---- unavailability -----------------------------------------------------------------------


async def test_sqlite_unreachable_path_is_unavailable(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "missing-dir" / "x.db")
    with pytest.raises(StoreUnavailable):
        await st.open()
    assert not await st.ping()
    with pytest.raises(StoreUnavailable):
        await st.get_attacker("a")


async def test_store_not_open_is_unavailable(tmp_path: Path) -> None:
    for st in (SqliteStore(tmp_path / "x.db"), PostgresStore("postgresql://127.0.0.1:1/x")):
        with pytest.raises(StoreUnavailable):
            await st.count_users()
        with pytest.raises(StoreUnavailable):
            async with st.transaction():
                pass
        assert not await st.ping()


@requires_postgres
async def test_postgres_refused_is_unavailable() -> None:
    st = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with pytest.raises(StoreUnavailable):
        await st.open()


@requires_postgres
async def test_postgres_restart(pg_server: PgServer) -> None:
    dsn = await pg_server.create_database()
    st = PostgresStore(dsn, min_size=2, max_size=4)
    await st.open()
    try:
        await st.revoke_token("j", 10.0)
        pg_server.stop()
        try:
            assert not await st.ping()
            with pytest.raises(StoreUnavailable):
                await st.is_token_revoked("j")
            with pytest.raises(StoreUnavailable):
                async with st.transaction() as tx:
                    await tx.ensure_attackers([("a", None, 1.0)])
        finally:
            pg_server.start()
        for _ in range(3):  # stale pooled connections are replaced
            if await st.ping():
                break
        assert await st.ping()
        assert await st.is_token_revoked("j")
        async with st.transaction() as tx:
            await tx.ensure_attackers([("a", None, 1.0)])
        assert await st.get_attacker("a") is not None
    finally:
        await st.close()
        await pg_server.drop_database(dsn)


# ---- SQLite without RETURNING -------------------------------------------------------------


async def test_sqlite_redeem_without_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_mod, "HAS_RETURNING", False)
    st = SqliteStore(tmp_path / "x.db")
    await st.open()
    try:
        t = TicketRow(ticket_hash="h", user_uuid="u", role="viewer", expires_at=10.0)
        assert await st.add_ticket(t, max_outstanding=1, now=1.0)
        got = await asyncio.gather(*(st.redeem_ticket("h", 2.0) for _ in range(5)))
        assert sum(g is not None for g in got) == 1
    finally:
        await st.close()


async def test_sqlite_too_old_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_mod, "SQLITE_VERSION", (3, 20, 0))
    st = SqliteStore(tmp_path / "x.db")
    with pytest.raises(StoreError, match="too old"):
        await st.open()


# ---- locking ------------------------------------------------------------------------------


async def test_locked_reads_wait_for_the_holder(store: Store, open_another: OpenAnother) -> None:
    """``load_states(lock=True)`` / ``multi_actor_signatures(lock=True)``: a second
    transaction wanting the same rows waits until the first commits, then sees
    its writes (row locks on PostgreSQL; the database write lock on SQLite)."""
    async with store.transaction() as tx:
        await tx.ensure_attackers([("a", None, 1.0)])
        ident = (await tx.ensure_identities(["a"], 1.0))[0]["a"]
        await tx.upsert_states([state(ident, "p", version=1)])
        await tx.set_multi_actor_signature(ident, ["p", "q"], 1.0)
    other = await open_another()
    cm = store.transaction()
    tx1 = await cm.__aenter__()
    try:
        await tx1.load_states([(ident, "p")], lock=True)
        await tx1.multi_actor_signatures([ident], lock=True)

        async def second() -> tuple[int, list[str]]:
            async with other.transaction() as tx2:
                rows = await tx2.load_states([(ident, "p")], lock=True)
                sigs = await tx2.multi_actor_signatures([ident], lock=True)
                return rows[(ident, "p")].version, sigs[ident]

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0.2)
        assert not task.done()
        await tx1.upsert_states([state(ident, "p", version=2)])
        await tx1.set_multi_actor_signature(ident, ["p", "q", "r"], 2.0)
    except BaseException as exc:
        await cm.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await cm.__aexit__(None, None, None)
    assert await task == (2, ["p", "q", "r"])


async def test_cancelled_transaction_rolls_back(store: Store) -> None:
    started = asyncio.Event()

    async def victim() -> None:
        async with store.transaction() as tx:
            await tx.ensure_attackers([("c", None, 1.0)])
            started.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(victim())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.get_attacker("c") is None
    async with store.transaction() as tx:
        await tx.ensure_attackers([("d", None, 1.0)])
    assert await store.get_attacker("d") is not None


# ---- volume -------------------------------------------------------------------------------


async def test_ten_thousand_rows_one_transaction(store: Store) -> None:
    attackers = [f"att-{i}" for i in range(50)]
    async with store.transaction() as tx:
        await tx.ensure_attackers([(a, None, 1.0) for a in attackers])
        mapping, formed = await tx.ensure_identities(attackers, 1.0)
    assert len(formed) == 50
    rows = [
        ObservationRow(
            id=uuid.uuid4().hex,
            attacker_uuid=attackers[i % 50],
            primitive=f"p.{i % 40}",
            value_json=str(i),
            ts=float(i // 7),
            evidence_ref=f"ev-{i // 2}",  # shared by row pairs, whose primitives differ
            identity_uuid=mapping[attackers[i % 50]],
        )
        for i in range(10_000)
    ]
    async with store.transaction() as tx:
        inserted = await tx.insert_observations(rows)
    assert inserted == list(range(10_000))
    async with store.transaction() as tx:
        assert await tx.insert_observations(rows[:5000]) == []
    assert await store.count_observations() == 10_000
    seen = 0
    last: tuple[float, int] = (-1.0, -1)
    async for batch in store.iter_observations(batch_size=3000):
        for o in batch:
            assert o.seq is not None
            assert (o.ts, o.seq) > last
            last = (o.ts, o.seq)
            seen += 1
    assert seen == 10_000
    assert await scalar(store, "SELECT count(DISTINCT seq) FROM observations") == 10_000


async def test_cancel_while_waiting_for_the_lock(store: Store, open_another: OpenAnother) -> None:
    """A transaction cancelled while it waits for the write/row lock leaves its
    store clean (SQLite: the BEGIN still runs in the driver thread and is
    rolled back; PostgreSQL: the query is cancelled and the connection reset)."""
    async with store.transaction() as tx:
        await tx.ensure_attackers([("a", None, 1.0)])
        ident = (await tx.ensure_identities(["a"], 1.0))[0]["a"]
        await tx.upsert_states([state(ident, "p", version=1)])
    other = await open_another()
    cm = store.transaction()
    tx1 = await cm.__aenter__()
    try:
        await tx1.load_states([(ident, "p")], lock=True)

        async def waiter() -> None:
            async with other.transaction() as tx2:
                await tx2.load_states([(ident, "p")], lock=True)
                await tx2.upsert_states([state(ident, "p", version=99)])

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tx1.upsert_states([state(ident, "p", version=2)])
    except BaseException as exc:
        await cm.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await cm.__aexit__(None, None, None)
    async with other.transaction() as tx3:
        assert (await tx3.load_states([(ident, "p")], lock=True))[(ident, "p")].version == 2
        await tx3.upsert_states([state(ident, "p", version=3)])
    got = await store.get_state(ident, "p")
    assert got is not None and got.version == 3


def _sqlite_at(path: Path, version: int) -> sqlite3.Connection:
    """A database file at schema ``version`` (the migrations up to it, as
    an older release applied them)."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    for m in MIGRATIONS:
        if m.version <= version:
            for stmt in split_statements(m.sqlite):
                con.execute(stmt)
            con.execute("INSERT INTO schema_migrations VALUES (?, 0)", (m.version,))
    return con


async def test_sqlite_v5_data_survive_the_write_friendly_layout(tmp_path: Path) -> None:
    """A database written by the v5 layout (unique constraints, four indexes
    per observation) migrates to the appended layout with its rows, and the
    exactly-once admission knows them after the migration."""
    path = tmp_path / "old.db"
    con = _sqlite_at(path, 5)
    con.execute("INSERT INTO attackers (uuid, ip, first_seen, last_seen) VALUES ('a1', NULL, 1, 1)")
    con.execute(
        "INSERT INTO observations (id, primitive, value, evidence_ref, ts, attacker_uuid) "
        "VALUES ('o1', 'environmental.shell_type', '\"bash\"', 'ev1', 1.0, 'a1')"
    )
    con.commit()
    con.close()
    st = open_store(f"sqlite://{path}")
    await st.open()
    try:
        assert await st.schema_version() == max(m.version for m in MIGRATIONS)
        assert await st.count_observations() == 1
        latest = await st.latest_observations("a1")
        assert [(o["primitive"], o["value"]) for o in latest] == [
            ("environmental.shell_type", "bash")
        ]
        again = obs("o1", "a1", "environmental.shell_type", "bash", 2.0, evidence="ev-new")
        same_evidence = obs("o2", "a1", "environmental.shell_type", "zsh", 3.0, evidence="ev1")
        async with st.transaction() as tx:
            assert await tx.insert_observations([again, same_evidence]) == []
        assert await st.count_observations() == 1
    finally:
        await st.close()


#: A store written before observation runs: three attackers of two
#: identities, their rows interleaved, a3's last two not merged yet.
_SHELL = "environmental.shell_type"
_OLD_ROWS = [
    ("a1", "i1"), ("a1", "i1"), ("a2", "i2"), ("a1", "i1"), ("a3", "i1"), ("a3", None),
    ("a3", None),
]  # fmt: skip


def _old_store_sql() -> list[tuple[str, tuple[Any, ...]]]:
    """The statements (``?`` placeholders) that write that store's rows."""
    out: list[tuple[str, tuple[Any, ...]]] = [
        ("INSERT INTO attacker_identities (uuid, created_at, updated_at) VALUES (?, 0, 0)", (i,))
        for i in ("i1", "i2")
    ]
    out += [
        (
            "INSERT INTO attackers (uuid, identity_id, first_seen, last_seen) VALUES (?, ?, 1, 1)",
            (a, ident),
        )
        for a, ident in (("a1", "i1"), ("a2", "i2"), ("a3", "i1"))
    ]
    out += [
        (
            "INSERT INTO observations (id, primitive, value, evidence_ref, ts, attacker_uuid, "
            "identity_uuid, merged) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (f"o{n}", _SHELL, f'"v{n}"', f"ev{n}", float(n), a, ident, ident is not None),
        )
        for n, (a, ident) in enumerate(_OLD_ROWS)
    ]
    return out


async def _assert_old_rows_cut_into_runs(st: Store) -> None:
    """That store's rows, once migrated, lie in runs that cover each row
    once, the reads by attacker and identity answer as the indexes did, and
    merging a row gives its run (and only its) the identity."""
    from tests.worker.helpers import assert_runs_cover_rows

    runs = await st._rows(  # type: ignore[attr-defined]
        "SELECT first_seq, last_seq, attacker_uuid, identity_uuid FROM observation_runs "
        "ORDER BY first_seq"
    )
    assert [tuple(r) for r in runs] == [
        (1, 2, "a1", "i1"),
        (3, 3, "a2", "i2"),
        (4, 4, "a1", "i1"),
        (5, 5, "a3", "i1"),
        (6, 6, "a3", None),  # a row not merged yet: a run of its own
        (7, 7, "a3", None),
    ]
    await assert_runs_cover_rows(st)
    assert [v["value"] for v in await st.recent_values("i1", _SHELL, 10)] == [
        "v0", "v1", "v3", "v4",
    ]  # fmt: skip
    latest = await st.latest_observations("a1")
    assert [(o["primitive"], o["value"]) for o in latest] == [(_SHELL, "v3")]
    assert [r.id for r in await st.pending_observations(after_seq=0, limit=10)] == ["o5", "o6"]
    async with st.transaction() as tx:
        await tx.mark_merged([6], {6: "i1"})
    await assert_runs_cover_rows(st)


async def test_sqlite_rows_of_v9_are_cut_into_runs(tmp_path: Path) -> None:
    """Schema v10 finds observations by attacker or identity through runs of
    consecutive seqs; rows written before it (attackers interleaved, one
    not merged yet) are cut into runs that cover each row once, and the
    reads by attacker and identity answer as the indexes did."""
    from tests.worker.helpers import assert_runs_cover_rows

    path = tmp_path / "v9.db"
    con = _sqlite_at(path, 9)
    for sql, params in _old_store_sql():
        con.execute(sql, params)
    con.commit()
    con.close()
    st = SqliteStore(path)
    await st.open()
    try:
        await _assert_old_rows_cut_into_runs(st)
        # retention cutting through a run: the run keeps counting what is left
        assert await st.prune_observations(1, chunk=1) == 1
        await assert_runs_cover_rows(st)
        summaries, _ = await st.list_attackers(limit=10, offset=0, sort="events")
        counts = [(s.attacker.uuid, s.observation_count) for s in summaries]
        assert counts == [("a3", 3), ("a1", 2), ("a2", 1)]
    finally:
        await st.close()
    # a row written by another tool (no run) gets its run at the next open
    con = sqlite3.connect(path)
    con.execute(
        "INSERT INTO observations (id, primitive, value, evidence_ref, ts, attacker_uuid, "
        "identity_uuid) VALUES ('o9', ?, '\"v9\"', 'ev9', 9.0, 'a2', 'i2')",
        (_SHELL,),
    )
    con.commit()
    con.close()
    st = SqliteStore(path)
    await st.open()
    try:
        await assert_runs_cover_rows(st)
        assert [v["value"] for v in await st.recent_values("i2", _SHELL, 10)] == ["v2", "v9"]
    finally:
        await st.close()


async def test_sqlite_state_filters_on_a_few_identities_use_the_primary_key(
    tmp_path: Path,
) -> None:
    """Reading some identities' multi-actor rows (every batch does) and the
    attacker list's per-state counts go through the state table's primary
    key: through the index on ``state`` they read every row in that state."""
    from decnet_attr.store.queries import list_attackers_sql
    from decnet_attr.store.sql import MULTI_ACTOR_PRIMITIVES_SQL
    from decnet_attr.store.sqlite import SQLITE

    st = SqliteStore(tmp_path / "attr.db")
    await st.open()
    try:
        conn = st._reader()  # type: ignore[attr-defined]
        for sql, params in (
            (MULTI_ACTOR_PRIMITIVES_SQL, ("[]",)),
            (list_attackers_sql("last_seen", True, "", "?", "?"), (10, 0)),
        ):
            plan = " | ".join(
                str(r[3])
                for r in await conn.execute_fetchall(
                    "EXPLAIN QUERY PLAN " + SQLITE.sql(sql), params
                )
            )
            assert "ix_attribution_state_state" not in plan, plan
            assert "sqlite_autoindex_attribution_state_1" in plan, plan
    finally:
        await st.close()


@requires_postgres
async def test_postgres_plans_are_made_for_the_tables_as_they_are(pg_server: PgServer) -> None:
    """The admission check looks each item up by the unique indexes, also
    when it was first run (prepared, planned) on an empty table and the
    table has grown since. Planned on an empty observations table, its
    ``EXISTS`` form hashed the whole table, and kept that plan (a prepared
    statement's generic plan, until autovacuum's next ANALYZE): every
    stored observation read for each batch, 2 s a batch at 1M rows. The
    plan the last execution used is read back through ``auto_explain``."""
    from decnet_attr.store.postgres import _stored

    dsn = await pg_server.create_database()
    st = PostgresStore(dsn, min_size=1, max_size=1)
    await st.open()
    try:
        async with st._conn() as conn:  # type: ignore[attr-defined]
            await conn.execute("ALTER TABLE observations SET (autovacuum_enabled = false)")
            items = orjson.dumps([(f"x{i}", f"ev-x{i}", "p") for i in range(500)]).decode()
            for _ in range(8):  # past the custom plans a prepared statement starts with
                assert await _stored(conn, items) == set()
            await conn.execute(
                "INSERT INTO observations (id, primitive, value, evidence_ref, ts, attacker_uuid) "
                "SELECT 'o' || g, 'p', '1', 'e' || g, 0, 'a' FROM generate_series(1, 200000) g"
            )
            plans: list[str] = []

            def note(_conn: object, msg: object) -> None:
                plans.append(str(msg))

            conn.add_log_listener(note)
            await conn.execute(
                "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
                "SET auto_explain.log_level = notice"
            )
            assert await _stored(conn, items) == set()
            used = [p for p in plans if "jsonb_array_elements" in p]
            assert used and "Seq Scan on observations" not in used[-1], used
            assert "Index Only Scan using observations_id_key" in used[-1]
            conn.remove_log_listener(note)
    finally:
        await st.close()
        await pg_server.drop_database(dsn)


@requires_postgres
async def test_postgres_state_updates_that_keep_the_state_stay_on_their_page(
    pg_server: PgServer,
) -> None:
    """attribution_state leaves room on its pages, so that an update that
    changes no indexed column (not a transition) is a heap-only tuple: no
    new index entries, no other page. On the full pages a bulk write of new
    rows leaves, none of a batch's updates could stay."""
    dsn = await pg_server.create_database()
    st = PostgresStore(dsn, min_size=1, max_size=1)
    await st.open()
    try:
        async with st._conn() as conn:  # type: ignore[attr-defined]
            await conn.execute(
                "INSERT INTO attribution_state (identity_uuid, primitive, current_value, state, "
                "confidence, observation_count, last_change_ts, last_observation_ts, updated_at, "
                "\"window\") SELECT 'i' || (g / 38), 'p' || (g % 38), '\"v\"', 'stable', 0.5, 1, "
                "0, 0, 0, repeat('w', 300) FROM generate_series(1, 3000) g"
            )
            # a batch's updates: a tenth of the keys, on every page
            async with conn.transaction():
                await conn.execute(
                    "UPDATE attribution_state SET observation_count = observation_count + 1, "
                    "confidence = 0.6, updated_at = 1 WHERE substr(primitive, 2)::int % 10 = 3"
                )
                hot, updated = await conn.fetchrow(
                    "SELECT n_tup_hot_upd, n_tup_upd FROM pg_stat_xact_user_tables "
                    "WHERE relname = 'attribution_state'"
                )
        assert updated == 316  # p3, p13, p23, p33 of every identity
        assert hot == updated
    finally:
        await st.close()
        await pg_server.drop_database(dsn)


@requires_postgres
async def test_postgres_looks_up_stored_items_only_when_a_copy_meets_one(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's observations are copied whole first, in a savepoint; the
    lookup of the stored ones runs only when a unique index refuses a row,
    and then the others are copied. Going back to the savepoint undoes only
    the copy: what the transaction wrote before it (a new attacker) stays."""
    import decnet_attr.store.postgres as pg_mod
    from decnet_attr.config import Settings
    from decnet_attr.observations import validate

    lookups: list[str] = []
    stored = pg_mod._stored

    async def spy(conn: object, items_json: str) -> set[int]:
        lookups.append(items_json)
        return await stored(conn, items_json)

    monkeypatch.setattr(pg_mod, "_stored", spy)

    def batch(*items: tuple[str, str, str]) -> object:
        return validate(
            b"\n".join(
                orjson.dumps(
                    {"id": i, "attacker_uuid": a, "primitive": "environmental.shell_type",
                     "value": "bash", "ts": 1e9, "evidence_ref": e}
                )
                for i, a, e in items
            ),
            Settings(),
        )  # fmt: skip

    dsn = await pg_server.create_database()
    st = PostgresStore(dsn, min_size=1, max_size=1)
    await st.open()
    try:
        async with st.transaction() as tx:
            await tx.ensure_attackers([("a", None, 1e9)])
            assert await tx.insert_validated(batch(("o1", "a", "e1"), ("o2", "a", "e2")), {}) == [
                0,
                1,
            ]  # type: ignore[arg-type]
        assert lookups == []
        async with st.transaction() as tx:
            await tx.ensure_attackers([("b", None, 1e9)])
            got = await tx.insert_validated(
                batch(("o1", "a", "x"), ("o3", "b", "e3"), ("o4", "a", "e2")),  # type: ignore[arg-type]
                {},
            )
            assert got == [1]
        assert len(lookups) == 1
        async with st._conn() as conn:  # type: ignore[attr-defined]
            assert await conn.fetchval("SELECT count(*) FROM attackers WHERE uuid = 'b'") == 1
            ids = [r[0] for r in await conn.fetch("SELECT id FROM observations ORDER BY seq")]
        assert ids == ["o1", "o2", "o3"]
    finally:
        await st.close()
        await pg_server.drop_database(dsn)


@requires_postgres
async def test_postgres_rows_of_v12_are_cut_into_runs(pg_server: PgServer) -> None:
    """Schema v13 finds observations by attacker or identity through runs
    of consecutive seqs, as SQLite does since v10; rows written before it
    (attackers interleaved, one not merged yet) are cut into runs that cover
    each row once, reads answer as the indexes did, and a row written later
    by another tool (the column's default seq) gets its run at the next
    open."""
    import asyncpg

    from decnet_attr.store.postgres import POSTGRES
    from tests.worker.helpers import assert_runs_cover_rows

    dsn = await pg_server.create_database()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
        for m in MIGRATIONS:
            if m.version <= 12:
                await conn.execute(m.postgres)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", m.version)
        for sql, params in _old_store_sql():
            await conn.execute(POSTGRES.sql(sql), *params)
    finally:
        await conn.close()
    st = PostgresStore(dsn, min_size=1, max_size=2)
    await st.open()
    try:
        assert await st.schema_version() == max(m.version for m in MIGRATIONS)
        await _assert_old_rows_cut_into_runs(st)
        # the store's own writes go above every older seq, in a block of their own
        async with st.transaction() as tx:
            assert await tx.insert_observations(
                [obs("o7", "a2", _SHELL, "v7", 7.0, identity_uuid="i2")]
            ) == [0]
        seqs = await st._rows("SELECT seq FROM observations ORDER BY seq", ())  # type: ignore[attr-defined]
        assert [r[0] for r in seqs][:7] == list(range(1, 8))
        assert seqs[-1][0] % SEQ_BLOCK == 0 and seqs[-1][0] > 7
        await assert_runs_cover_rows(st)
        # retention cutting through a run: the run keeps counting what is left
        assert await st.prune_observations(1, chunk=1) == 1
        await assert_runs_cover_rows(st)
        summaries, _ = await st.list_attackers(limit=10, offset=0, sort="events")
        counts = {s.attacker.uuid: s.observation_count for s in summaries}
        assert counts == {"a3": 3, "a1": 2, "a2": 2}
    finally:
        await st.close()
    # a row written by another tool (the default seq, no run) gets its run at the next open
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO observations (id, primitive, value, evidence_ref, ts, attacker_uuid, "
            "identity_uuid) VALUES ('o9', $1, '\"v9\"', 'ev9', 9.0, 'a2', 'i2')",
            _SHELL,
        )
    finally:
        await conn.close()
    st = PostgresStore(dsn, min_size=1, max_size=2)
    await st.open()
    try:
        await assert_runs_cover_rows(st)
        assert [v["value"] for v in await st.recent_values("i2", _SHELL, 10)] == [
            "v2", "v7", "v9",
        ]  # fmt: skip
    finally:
        await st.close()
        await pg_server.drop_database(dsn)


@requires_postgres
async def test_postgres_writers_at_once_keep_their_rows_in_runs(pg_server: PgServer) -> None:
    """Two writers copying batches of the same attackers at the same time:
    each batch's rows take a block of seqs of its own, so no run holds
    another writer's rows, and the reads by attacker and identity find
    exactly each one's rows."""
    from decnet_attr.config import Settings
    from decnet_attr.observations import validate
    from tests.worker.helpers import assert_runs_cover_rows

    dsn = await pg_server.create_database()
    st = PostgresStore(dsn, min_size=2, max_size=2)
    await st.open()
    try:
        async with st.transaction() as tx:
            await tx.ensure_attackers([("a", None, 1.0), ("b", None, 1.0)])
            ident, _ = await tx.ensure_identities(["a", "b"], 1.0)
        prim = "motor.input_modality"

        def body(w: int) -> bytes:
            lines = (
                orjson.dumps(
                    {
                        "attacker_uuid": "ab"[i % 2],
                        "primitive": prim,
                        "value": "typed",
                        "ts": 1.7e9 + i,
                        "id": f"w{w}-{i}",
                        "evidence_ref": f"w{w}:{i}",
                        "confidence": 1.0,
                    }
                )
                for i in range(20_000)
            )
            return b"\n".join(lines)

        batches = [validate(body(w), Settings()) for w in (1, 2)]

        async def write(batch: ValidatedBatch) -> list[int]:
            async with st.transaction() as tx:
                return await tx.insert_validated(batch, ident)

        done = await asyncio.gather(*(write(b) for b in batches))
        assert [len(d) for d in done] == [20_000, 20_000]
        await assert_runs_cover_rows(st)
        runs = await st._rows("SELECT count(*) FROM observation_runs", ())  # type: ignore[attr-defined]
        assert runs[0][0] == 4  # one per attacker and batch
        for a in ("a", "b"):
            assert [o["value"] for o in await st.latest_observations(a)] == ["typed"]
            got = await st.recent_values(ident[a], prim, 50_000)
            assert len(got) == 20_000
            assert {v["attacker_uuid"] for v in got} == {a}
    finally:
        await st.close()
        await pg_server.drop_database(dsn)
