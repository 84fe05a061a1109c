"""The SQL store written once over a dialect: the dialects' SQL, the focused
interfaces ``Store`` is made of, and what the backends themselves hold."""

from __future__ import annotations

import inspect
import json

from decnet_attr.store import Store
from decnet_attr.store.base import (
    AttributionStore,
    AuthStore,
    DeadLetterStore,
    IdentityStore,
    StoreLifecycle,
)
from decnet_attr.store.postgres import POSTGRES
from decnet_attr.store.sqlite import SQLITE, SqliteStore

# ---- the dialects' SQL -----------------------------------------------------------------------


def test_shared_sql_in_each_dialect() -> None:
    text = "SELECT a FROM t WHERE x = ? AND y IN_LIST(?) AND IS_MERGED ORDER BY a BYTE_ORDER"
    assert SQLITE.sql(text) == (
        "SELECT a FROM t WHERE x = ? AND y IN (SELECT value FROM json_each(?)) "
        "AND merged = 1 ORDER BY a"
    )
    assert POSTGRES.sql(text) == (
        'SELECT a FROM t WHERE x = $1 AND y = ANY($2::text[]) AND merged ORDER BY a COLLATE "C"'
    )
    assert POSTGRES.sql("a = ?1 OR b = ?1 AND NOT_MERGED") == "a = $1 OR b = $1 AND NOT merged"
    assert SQLITE.sql("GREATEST(a, b)") == "max(a, b)"
    assert SQLITE.list_param(["a", "b"]) == '["a","b"]'
    # non-ASCII as it is; a lone surrogate (no UTF-8 for it) escaped
    assert json.loads(SQLITE.list_param(["é", "\ud800"])) == ["é", "\ud800"]
    assert POSTGRES.list_param(("a", "b")) == ["a", "b"]


# ---- the interfaces --------------------------------------------------------------------------


def test_store_is_the_composition_of_focused_interfaces() -> None:
    parts = (StoreLifecycle, AttributionStore, IdentityStore, AuthStore, DeadLetterStore)
    assert all(issubclass(Store, p) for p in parts)
    owners: dict[str, list[str]] = {}
    for p in parts:
        for name, member in vars(p).items():
            if inspect.isfunction(member):
                owners.setdefault(name, []).append(p.__name__)
    assert {n: o for n, o in owners.items() if len(o) > 1} == {}
    # every interface stays small enough to read at once
    assert max(sum(inspect.isfunction(m) for m in vars(p).values()) for p in parts) <= 24


def test_backends_only_hold_what_differs() -> None:
    """A query both backends run alike is written once (in ``SqlStore`` /
    ``SqlTx``); a backend overrides only the hooks that hand out its
    connections, never a shared query."""
    from decnet_attr.store.postgres import PostgresStore, PostgresTx
    from decnet_attr.store.sql import SqlStore, SqlTx
    from decnet_attr.store.sqlite import SqliteTx

    def methods(cls: type) -> set[str]:
        return {n for n, m in vars(cls).items() if inspect.isfunction(m)}

    hooks = {"__init__", "_read", "_write", "_driver_error", "_lock_tickets"}
    for backend in (SqliteStore, PostgresStore):
        assert methods(backend) & methods(SqlStore) <= hooks
    for tx in (SqliteTx, PostgresTx):
        # _write: how a write whose result nobody reads runs (SQLite defers it)
        assert methods(tx) & methods(SqlTx) <= {"__init__", "_write"}
    assert len(methods(SqlStore)) > len(methods(SqliteStore) | methods(PostgresStore))
