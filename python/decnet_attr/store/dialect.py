"""What differs between the SQL backends, in one small interface.

The store's SQL is written once (:mod:`decnet_attr.store.sql`,
:mod:`decnet_attr.store.identities`) with ``?`` placeholders and a few
tokens; a :class:`Dialect` turns that text into its backend's, binds a list
parameter, runs a statement on a driver connection and maps the driver's
errors to the store's typed errors (:mod:`decnet_attr.store.errors`):

- ``?`` placeholders (``?N`` to reuse one): kept on SQLite; ``$1``, ``$2``,
  … in order (``$N``) on PostgreSQL;
- ``IN_LIST(?)``: ``IN (SELECT value FROM json_each(?))`` / ``= ANY(?::text[])``;
- ``IS_MERGED`` / ``NOT_MERGED``: ``merged = 1`` / ``merged = 0`` on SQLite,
  ``merged`` / ``NOT merged`` on PostgreSQL;
- ``GREATEST(``: SQLite's two-argument ``max(``;
- ``BYTE_ORDER`` after an ``ORDER BY`` term: nothing on SQLite (text compares
  by bytes), ``COLLATE "C"`` on PostgreSQL;
- ``UNINDEXED`` before a column: not to be looked up by its own index
  (SQLite's unary ``+``; nothing on PostgreSQL). A state filter on a few
  identities' rows goes through the primary key: SQLite's planner chose
  the index on ``state`` and read every ``multi_actor`` row of the table
  for each batch (9 ms a batch at 800k observations, measured).

A list parameter is one JSON array on SQLite (so the statement text, and
the prepared statement, do not depend on the list's length) and a text
array on PostgreSQL.

The SQLite dialect lives in :mod:`~decnet_attr.store.sqlite`, the PostgreSQL
one in :mod:`~decnet_attr.store.postgres` (each next to its driver).
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from decnet_attr.store.errors import StoreError

P = ParamSpec("P")
R = TypeVar("R")

_PLACEHOLDER = re.compile(r"\?(\d*)")


class Dialect(ABC):
    """One SQL backend: its SQL text, its list binding, its driver calls and
    its errors."""

    #: ``Store.dialect``: ``"sqlite"`` or ``"postgresql"``.
    name: str
    #: The tokens of the shared SQL and their text in this dialect.
    tokens: dict[str, str]
    #: ``?`` placeholders become ``$1``, ``$2``, … (PostgreSQL).
    numbered: bool = False
    #: Appended to a ``SELECT`` that takes row locks (PostgreSQL); SQLite's
    #: write transactions already hold the database write lock.
    for_update: str = ""

    def param(self, i: int) -> str:
        """The ``i``-th (1-based) placeholder."""
        return f"${i}" if self.numbered else f"?{i}"

    def sql(self, text: str) -> str:
        """Shared SQL (``?`` placeholders and the tokens) in this dialect."""
        return _translate(self, text)

    @abstractmethod
    def list_param(self, values: Sequence[Any]) -> Any:
        """One parameter binding a list for ``IN_LIST(?)``."""

    def flag(self, value: Any) -> Any:
        """A boolean column's value (SQLite stores 0/1)."""
        return bool(value)

    @abstractmethod
    def in_network(self, add: Callable[[Any], str], net: tuple[str, str, str]) -> str:
        """The test that ``a.ip`` lies in ``net`` ``(cidr, first ip_key, last ip_key)``;
        ``add(value)`` binds a parameter and returns its placeholder."""

    # ---- the driver ------------------------------------------------------------------------
    @abstractmethod
    async def rows(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run ``sql`` (already in this dialect) on ``conn``; its rows."""

    @abstractmethod
    async def execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement on ``conn``."""

    @abstractmethod
    def map_error(self, exc: BaseException, conn: Any = None) -> StoreError | None:
        """The store error for a driver error met on ``conn`` (None when
        ``exc`` is not a database error: it is raised as it is)."""

    def is_integrity(self, exc: BaseException) -> bool:
        """``exc`` is a constraint violation (a unique key taken, …)."""
        return False


@functools.lru_cache(maxsize=1024)
def _translate(dialect: Dialect, text: str) -> str:
    for token, value in dialect.tokens.items():
        text = text.replace(token, value)
    if not dialect.numbered:
        return text
    counter = iter(range(1, text.count("?") + 1))
    return _PLACEHOLDER.sub(lambda m: f"${m.group(1) or next(counter)}", text)


class _Guarded(Protocol):
    def _driver_error(self, exc: BaseException) -> StoreError | None: ...


@contextmanager
def driver_errors(owner: _Guarded) -> Iterator[None]:
    """Driver errors raised inside leave as store errors
    (``owner._driver_error``: its dialect's mapping, with the connection it
    uses); other exceptions pass through unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        err = owner._driver_error(exc)
        if err is None:
            raise
        raise err from exc


def guard(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """A store method (its first argument ``self``) run under :func:`driver_errors`."""

    @functools.wraps(fn)
    async def inner(*args: P.args, **kwargs: P.kwargs) -> R:
        owner = cast(_Guarded, args[0])
        with driver_errors(owner):
            return await fn(*args, **kwargs)

    return inner


__all__ = ["Dialect", "driver_errors", "guard"]
