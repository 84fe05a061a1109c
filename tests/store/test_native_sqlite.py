"""The Rust SQLite connection the store writes through (``_core.SqliteConnection``
and its async facade ``NativeConnection``): values, errors as the ``sqlite3``
module raises them, the GIL released while statements run, and closing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from decnet_attr._core import SqliteConnection
from decnet_attr.store.base import StoreError, StoreUnavailable
from decnet_attr.store.sqlite import SQLITE, NativeConnection

_map_error = SQLITE.map_error


def test_values_round_trip(tmp_path: Path) -> None:
    c = SqliteConnection(str(tmp_path / "x.db"))
    c.execute("CREATE TABLE t (a, b, c, d, e, f)")
    c.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?)",
        [(None, 1, 2.5, "é\x00x", b"\x00\xff", True), [None, -(2**63), 1e308, "", b"", False]],
    )
    rows = c.execute("SELECT a, b, c, d, e, f, typeof(f) FROM t ORDER BY rowid")
    assert rows == [
        (None, 1, 2.5, "é\x00x", b"\x00\xff", 1, "integer"),
        (None, -(2**63), 1e308, "", b"", 0, "integer"),
    ]
    # numbered parameters, as the store's upserts use them
    assert c.execute("SELECT ?2, ?1, ?2", ("a", "b")) == [("b", "a", "b")]
    assert c.execute("CREATE TABLE u (x)") == []
    # the same file seen through Python's own driver
    other = sqlite3.connect(tmp_path / "x.db")
    assert other.execute("SELECT count(*) FROM t").fetchone() == (2,)
    other.close()
    c.close()


def test_bad_parameters_are_typed_errors(tmp_path: Path) -> None:
    c = SqliteConnection(str(tmp_path / "x.db"))
    c.execute("CREATE TABLE t (a)")
    with pytest.raises(OverflowError):
        c.execute("INSERT INTO t VALUES (?)", (2**64,))
    with pytest.raises(TypeError, match="parameter 1"):
        c.execute("INSERT INTO t VALUES (?)", ([1],))
    with pytest.raises(TypeError):
        c.execute("INSERT INTO t VALUES (?)", {"a": 1})
    with pytest.raises(sqlite3.ProgrammingError, match="bindings"):
        c.executemany("INSERT INTO t VALUES (?)", [(1, 2)])
    with pytest.raises(sqlite3.ProgrammingError, match="one statement"):
        c.execute("SELECT 1; SELECT 2")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        c.execute("SELECT * FROM missing")
    # a failed executemany stops at the bad set; the earlier ones ran (as in
    # sqlite3); the caller's transaction decides what survives
    c.execute("CREATE TABLE u (a UNIQUE)")
    c.execute("BEGIN")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE") as info:
        c.executemany("INSERT INTO u VALUES (?)", [(1,), (2,), (1,), (3,)])
    assert info.value.sqlite_errorname == "SQLITE_CONSTRAINT"
    assert info.value.sqlite_errorcode & 0xFF == sqlite3.SQLITE_CONSTRAINT
    assert c.in_transaction
    c.execute("ROLLBACK")
    assert not c.in_transaction
    assert c.execute("SELECT count(*) FROM u") == [(0,)]
    assert isinstance(_map_error(info.value), StoreError)
    c.close()


def test_lock_timeout_maps_to_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "x.db")
    a = SqliteConnection(path)
    a.execute("PRAGMA journal_mode = WAL")
    a.execute("CREATE TABLE t (a)")
    b = SqliteConnection(path, 0.05)
    a.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked") as info:
        b.execute("BEGIN IMMEDIATE")
    assert info.value.sqlite_errorname == "SQLITE_BUSY"
    assert isinstance(_map_error(info.value), StoreUnavailable)
    a.execute("COMMIT")
    b.execute("BEGIN IMMEDIATE")
    b.execute("COMMIT")
    a.close()
    b.close()


def test_statements_run_without_the_gil(tmp_path: Path) -> None:
    """While one thread runs a long statement, Python keeps running in
    another (with the GIL held, the counter could not move)."""
    c = SqliteConnection(str(tmp_path / "x.db"))
    done = threading.Event()
    result: list[object] = []

    def heavy() -> None:
        result.append(
            c.execute(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) "
                "SELECT count(*) FROM n"
            )
        )
        done.set()

    t = threading.Thread(target=heavy)
    spins = 0
    t.start()
    while not done.is_set():
        spins += 1
    t.join()
    assert result == [[(3000001,)]]
    assert spins > 10_000, spins
    c.close()


def test_the_writer_runs_and_answers_while_python_holds_the_gil(tmp_path: Path) -> None:
    """The writer's thread never takes the GIL: a job queued to it runs to
    its end, result and all, while this thread holds the GIL in one long C
    call (a sort, which never lets another thread in), and the result is
    there to take before this thread lets go of the GIL. A writer that
    needed the GIL at any point could not have queued it yet (the control:
    ``SqliteConnection`` called from a Python thread)."""
    import os
    import select
    import sys
    import time

    from decnet_attr._core import SqliteWriter

    r, w = os.pipe()
    os.set_blocking(w, False)
    writer = SqliteWriter(str(tmp_path / "x.db"), w)
    sql = (
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 300000) "
        "SELECT count(*) FROM n"
    )
    try:
        t0 = time.perf_counter()
        writer.execute(writer.current, sql, None, True)
        select.select([r], [], [], 10)
        job = time.perf_counter() - t0
        os.read(r, 64)
        writer.take()
        # a sort of ints in scrambled order: one C call that never runs
        # Python code, so no other thread gets the GIL until it returns;
        # sized to take well over the job's time
        n = 250_000
        while True:
            data = [(i * 2654435761) % 1_000_003 for i in range(n)]
            t0 = time.perf_counter()
            sorted(data)
            took = time.perf_counter() - t0
            if took > 5 * job or n >= 16_000_000:
                break
            n *= 2
        # with a long switch interval this thread keeps the GIL from the
        # sort to the check even if another thread asks for it
        switch = sys.getswitchinterval()
        sys.setswitchinterval(100.0)
        try:
            # the control: the same job on a Python thread, which needs the
            # GIL to hand its result over, has not done so by then
            plain = SqliteConnection(str(tmp_path / "y.db"))
            handed: list[object] = []
            thread = threading.Thread(target=lambda: handed.append(plain.execute(sql)))
            thread.start()
            sorted(data)
            control = list(handed)
            ticket = writer.execute(writer.current, sql, None, True)
            sorted(data)  # holds the GIL throughout
            got = writer.take()
        finally:
            sys.setswitchinterval(switch)
        thread.join()
        plain.close()
        assert control == [] and handed == [[(300001,)]]
        assert got == [(ticket, [(300001,)], None)], (job, took)
        assert select.select([r], [], [], 0)[0]  # and it said so on the pipe
        writer.close()
        writer.join()
    finally:
        os.close(r)
        os.close(w)


async def test_facade_orders_calls_and_closes(tmp_path: Path) -> None:
    conn = await NativeConnection.connect(str(tmp_path / "x.db"), 5.0)
    await conn.execute("CREATE TABLE t (a)")
    await conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    assert await conn.execute_fetchall("SELECT count(*), sum(a) FROM t") == [(1000, 499500)]
    await conn.close()
    await conn.close()  # twice is harmless
    with pytest.raises(ValueError, match="no active connection") as info:
        await conn.execute("SELECT 1")
    assert isinstance(_map_error(info.value), StoreUnavailable)
    raw = SqliteConnection(str(tmp_path / "y.db"))
    raw.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        raw.execute("SELECT 1")


async def test_store_writes_a_file_through_the_native_connection(tmp_path: Path) -> None:
    from decnet_attr.store.sqlite import SqliteStore

    st = SqliteStore(tmp_path / "attr.db")
    await st.open()
    try:
        assert isinstance(st._w, NativeConnection)
    finally:
        await st.close()
    mem = SqliteStore(":memory:")  # one connection serves reads and writes: aiosqlite
    await mem.open()
    try:
        assert not isinstance(mem._w, NativeConnection) and mem._r is mem._w
    finally:
        await mem.close()


async def test_a_failed_deferred_write_fails_its_commit_and_nothing_after(tmp_path: Path) -> None:
    """Deferred writes run on the writer thread while the caller goes on; if
    one fails, its transaction is rolled back at once and every later call
    of it raises its error (the COMMIT too), so it cannot commit without it;
    once settled, the next transaction runs."""
    conn = await NativeConnection.connect(str(tmp_path / "x.db"), 5.0)
    await conn.execute("CREATE TABLE t (a NOT NULL)")
    seq = conn.number()
    await conn.begin(seq)
    conn.defer("INSERT INTO t VALUES (?)", [(1,), (2,)])
    conn.defer("INSERT INTO t VALUES (?)", [(3,), (None,)])  # fails
    conn.defer("INSERT INTO t VALUES (?)", [(4,)])  # skipped
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        await conn.execute("SELECT count(*) FROM t")
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        await conn.commit(seq)
    assert conn.settle(seq) and not conn.settle(seq)  # settled once
    await conn.rollback(seq)  # already rolled back: nothing to do
    # the connection works again, deferred writes included
    seq = conn.number()
    await conn.begin(seq, deferred=True)
    assert await conn.execute("SELECT count(*) FROM t") == [(0,)]
    conn.defer("INSERT INTO t VALUES (?)", [(5,)])
    await conn.commit(seq)
    assert await conn.execute("SELECT a FROM t") == [(5,)]
    await conn.close()
    with pytest.raises(ValueError, match="no active connection"):
        conn.defer("INSERT INTO t VALUES (?)", [(6,)])


async def test_a_transaction_built_on_one_that_fails_fails_too(tmp_path: Path) -> None:
    """Pipelined: the second transaction is begun and written while the
    first one's COMMIT is still queued. When the first fails, the second
    (built on its outcome) fails with StoreConflict and leaves nothing,
    until the failure is settled; a transaction begun after that commits."""
    from decnet_attr.store.errors import StoreConflict

    conn = await NativeConnection.connect(str(tmp_path / "x.db"), 5.0)
    await conn.execute("CREATE TABLE t (a NOT NULL)")
    first = conn.number()
    await conn.begin(first, deferred=True)
    conn.defer("INSERT INTO t VALUES (?)", [(1,), (None,)])  # fails
    first_done = conn.commit(first)
    second = conn.number()
    await conn.begin(second, deferred=True)
    conn.defer("INSERT INTO t VALUES (?)", [(2,)])
    second_done = conn.commit(second)
    with pytest.raises(sqlite3.IntegrityError):
        await first_done
    with pytest.raises(StoreConflict, match="earlier transaction"):
        await second_done
    assert conn.settle(second) and not conn.settle(first)  # one failure, settled once
    await conn.rollback(first)
    await conn.rollback(second)
    third = conn.number()
    await conn.begin(third, deferred=True)
    conn.defer("INSERT INTO t VALUES (?)", [(3,)])
    await conn.commit(third)
    assert await conn.execute("SELECT a FROM t") == [(3,)]
    await conn.close()


async def test_a_compare_and_set_that_finds_the_row_changed_fails_the_transaction(
    tmp_path: Path,
) -> None:
    from decnet_attr.store.errors import StoreConflict

    conn = await NativeConnection.connect(str(tmp_path / "x.db"), 5.0)
    await conn.execute("CREATE TABLE t (k PRIMARY KEY, v)")
    await conn.executemany("INSERT INTO t VALUES (?, ?)", [(1, None), (2, "taken")])
    seq = conn.number()
    await conn.begin(seq, deferred=True)
    conn.defer_expecting("UPDATE t SET v = ? WHERE k = ? AND v IS NULL", [("x", 1)], "row")
    await conn.commit(seq)
    seq = conn.number()
    await conn.begin(seq, deferred=True)
    conn.defer_expecting(
        "UPDATE t SET v = ? WHERE k = ? AND v IS NULL", [("y", 1), ("y", 2)], "row"
    )
    with pytest.raises(StoreConflict, match="row changed meanwhile"):
        await conn.commit(seq)
    conn.settle(seq)
    assert await conn.execute("SELECT k, v FROM t ORDER BY k") == [(1, "x"), (2, "taken")]
    await conn.close()


async def test_a_transaction_whose_deferred_write_fails_commits_nothing(tmp_path: Path) -> None:
    from decnet_attr import Engine
    from decnet_attr._core import StateTable
    from decnet_attr.registry import value_kind_for
    from decnet_attr.store.base import StoreIntegrity
    from decnet_attr.store.sqlite import SqliteStore

    st = SqliteStore(tmp_path / "attr.db")
    await st.open()
    try:
        async with st.transaction() as tx:
            await tx.ensure_attackers([("a1", None, 1.0)])
            ident = (await tx.ensure_identities(["a1"], 1.0))[0]["a1"]
        prim = "motor.input_modality"

        def states_of(identity: str) -> Any:
            engine = Engine()
            obs = {"identity_uuid": identity, "primitive": prim, "value": "typed", "ts": 2.0}
            return StateTable(value_kind_for).write(engine.ingest([obs]), None, 3.0)

        good = states_of(ident)
        bad = states_of("no-such-identity")  # its row breaks the foreign key
        with pytest.raises(StoreIntegrity):
            async with st.transaction() as tx:
                await tx.ensure_attackers([("a2", None, 1.0)])
                await tx.upsert_state_values(good)
                await tx.upsert_state_values(bad)  # deferred: fails on the writer thread
        # nothing of that transaction was committed, and the store goes on
        assert await st.get_state(ident, prim) is None
        assert await st.get_attacker("a2") is None
        async with st.transaction() as tx:
            await tx.upsert_state_values(good)
        row = await st.get_state(ident, prim)
        assert row is not None and (row.version, row.current_value_json) == (1, '"typed"')
    finally:
        await st.close()


async def test_inserted_rows_take_the_seqs_their_runs_announce(tmp_path: Path) -> None:
    """``insert_validated`` with the runs statement: each stretch of one
    attacker after the run of its seqs; rows not merged yet, one run each."""
    import orjson

    from decnet_attr.config import Settings
    from decnet_attr.observations import validate
    from decnet_attr.store.sqlite import _SQL_INSERT_OBS, _SQL_INSERT_RUN, SqliteStore
    from tests.worker.helpers import assert_runs_cover_rows

    path = tmp_path / "attr.db"
    store = SqliteStore(path)
    await store.open()
    try:
        async with store.transaction() as tx:
            await tx.ensure_attackers([("a", None, 0.0), ("b", None, 0.0)])
        items = [
            {"attacker_uuid": who, "primitive": "environmental.shell_type", "value": "bash",
             "ts": 1e9 + i, "id": f"o{i}"}
            for i, who in enumerate("aabba")
        ]  # fmt: skip
        batch = validate(b"\n".join(orjson.dumps(o) for o in items), Settings())
        conn = SqliteConnection(str(path))
        for merged in (True, False):
            conn.execute("BEGIN IMMEDIATE")
            conn.insert_validated(
                _SQL_INSERT_OBS, batch, {"a": "i-a"}, batch.by_attacker(), merged, _SQL_INSERT_RUN
            )
            conn.execute("COMMIT")
        conn.close()
        runs = await store._reader().execute_fetchall(  # type: ignore[attr-defined]
            "SELECT first_seq, last_seq, attacker_uuid, n FROM observation_runs ORDER BY first_seq"
        )
        assert [tuple(r) for r in runs] == [
            (1, 3, "a", 3), (4, 5, "b", 2),  # merged: one run per attacker
            (6, 6, "a", 1), (7, 7, "a", 1), (8, 8, "a", 1), (9, 9, "b", 1), (10, 10, "b", 1),
        ]  # fmt: skip
        await assert_runs_cover_rows(store)
    finally:
        await store.close()


_MEMORY_USED = """
import ctypes, sys
{first}
lib = ctypes.CDLL("libsqlite3.so.0")
lib.sqlite3_memory_used.restype = ctypes.c_int64
conn = sqlite3.connect(":memory:")
conn.execute("CREATE TABLE t (x)")
conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
print(decnet_attr._core.SQLITE_MEMORY_STATISTICS_OFF, lib.sqlite3_memory_used())
"""


@pytest.mark.parametrize(
    ("first", "off"),
    [("import decnet_attr, sqlite3", True), ("import sqlite3, decnet_attr", False)],
)
def test_memory_statistics_are_off_when_the_package_comes_first(first: str, off: bool) -> None:
    # SQLite counts every allocation under one process-wide mutex unless told
    # not to before it starts; importing the package first tells it (the
    # CLI does), importing sqlite3 first leaves the counting on, and both work
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_USED.format(first=first)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert out[0] == str(off)
    assert (int(out[1]) == 0) is off
