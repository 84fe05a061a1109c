"""Typed store errors.

The store maps driver errors by their type and code (never by searching
their text), so callers decide by class: :class:`StoreUnavailable` (try
later), :class:`StoreConflict` (run again), :class:`StoreIntegrity` (the data
was refused), :class:`StoreError` (anything else)."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest

import decnet_attr
from decnet_attr.store import Store, StoreError, StoreIntegrity, StoreUnavailable, UserRow
from decnet_attr.store.errors import ConnectionClosed
from decnet_attr.store.sqlite import SQLITE, SqliteStore

PACKAGE = Path(decnet_attr.__file__).parent

_EXC_NAMES = {"exc", "e", "err", "error"}


def _text_of_exception(node: ast.expr, aliases: set[str]) -> bool:
    """``node`` is ``str(<exception>)`` or a name bound to it."""
    if isinstance(node, ast.Name):
        return node.id in aliases
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "str"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id in _EXC_NAMES
    )


def _message_searches(tree: ast.AST) -> list[int]:
    """Lines where an exception's text is searched (``"x" in str(exc)``,
    ``text = str(exc)`` then ``"x" in text``)."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _text_of_exception(node.value, set()):
            aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.In, ast.NotIn)) for op in node.ops
        ):
            if any(_text_of_exception(c, aliases) for c in node.comparators):
                found.append(node.lineno)
    return sorted(found)


def test_no_code_decides_by_an_error_message() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line in _message_searches(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE)}:{line}")
    assert offenders == []


def test_the_message_check_sees_the_old_patterns() -> None:
    old = (
        "try:\n    f()\nexcept E as exc:\n"
        "    if 'locked' not in str(exc):\n        raise\n"
        "def m(exc):\n    text = str(exc)\n    return 'closed' in text\n"
    )
    assert _message_searches(ast.parse(old)) == [4, 8]


# ---- SQLite: by result code ----------------------------------------------------------------


def _sqlite_error(cls: type[sqlite3.Error], message: str, name: str) -> sqlite3.Error:
    exc = cls(message)
    exc.sqlite_errorname = name
    return exc


@pytest.mark.parametrize(
    "name", ["SQLITE_BUSY", "SQLITE_LOCKED_SHAREDCACHE", "SQLITE_IOERR_WRITE", "SQLITE_CANTOPEN"]
)
def test_sqlite_unavailable_by_code(name: str) -> None:
    err = SQLITE.map_error(_sqlite_error(sqlite3.OperationalError, "whatever it says", name))
    assert isinstance(err, StoreUnavailable)


def test_sqlite_other_codes_are_plain_errors() -> None:
    # the words do not matter, the code does
    exc = _sqlite_error(sqlite3.OperationalError, "database is locked", "SQLITE_ERROR")
    err = SQLITE.map_error(exc)
    assert type(err) is StoreError
    integrity = _sqlite_error(sqlite3.IntegrityError, "UNIQUE failed", "SQLITE_CONSTRAINT")
    assert isinstance(SQLITE.map_error(integrity), StoreIntegrity)


def test_sqlite_closed_connection_is_unavailable() -> None:
    assert isinstance(SQLITE.map_error(ConnectionClosed("x")), StoreUnavailable)
    # a plain ValueError is the driver's "closed" only when there is no connection
    assert isinstance(SQLITE.map_error(ValueError("x"), None), StoreUnavailable)
    assert SQLITE.map_error(KeyError("x")) is None


async def test_reader_closed_under_the_store_is_unavailable(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "x.db")
    await st.open()
    try:
        await st._reader().close()  # the aiosqlite reader goes away
        with pytest.raises(StoreUnavailable):
            await st.count_users()
        # our own ValueErrors (an unknown sort) are not mistaken for it
        st2 = SqliteStore(tmp_path / "y.db")
        await st2.open()
        try:
            with pytest.raises(ValueError, match="unknown sort"):
                await st2.list_attackers(limit=1, offset=0, sort="nope")
        finally:
            await st2.close()
    finally:
        await st.close()


async def test_duplicate_user_is_an_integrity_error(store: Store) -> None:
    await store.create_user(UserRow(uuid="u1", username="alice", password_hash="h", role="admin"))
    with pytest.raises(StoreIntegrity, match="username 'alice' already exists"):
        await store.create_user(UserRow(uuid="u2", username="alice", password_hash="h", role="a"))
    with pytest.raises(StoreIntegrity, match="user 'u1' already exists"):
        await store.create_user(UserRow(uuid="u1", username="bob", password_hash="h", role="a"))
    assert [u.username for u in await store.list_users()] == ["alice"]
