"""Storage backends: SQLite (embedded default) and PostgreSQL (scale-out).

``open_store(url)`` picks the backend from the URL; call ``await store.open()``
before use and ``await store.close()`` at shutdown.

The modules: ``base`` (the interfaces), ``models`` (the data classes),
``errors`` (the typed errors), ``sql`` (the SQL both backends share),
``dialect`` (what differs between them), ``sqlite`` / ``postgres`` (each
backend's driver, lifecycle and batch writes), ``rows`` (row mapping),
``queries`` (the attacker list's query), ``schema`` (the migrations),
``identities`` (identity roll-up queries), ``files`` (SQLite file modes).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from decnet_attr.store.base import (
    DEAD_LETTER_MAX_BYTES,
    MULTI_ACTOR_FLAG_MIN,
    STATES,
    USER_UPDATE_FIELDS,
    AttackerAttribution,
    AttackerFilter,
    AttackerRow,
    AttackerSummary,
    AttributionView,
    DeadLetter,
    Key,
    ObservationRow,
    RecomputeStats,
    StateRow,
    Store,
    StoreConflict,
    StoreError,
    StoreIntegrity,
    StoreUnavailable,
    TicketRow,
    Tx,
    UserRow,
    truncate_payload,
)

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


if TYPE_CHECKING:
    from decnet_attr.config import Settings


def store_for(settings: Settings) -> Store:
    """The store ``settings`` describe (not opened yet)."""
    return open_store(settings.store_url, dedupe_window=settings.dedupe_window)


def open_store(url: str, *, dedupe_window: int | None = None) -> Store:
    """A store for ``url`` (not opened yet).

    - ``sqlite:///abs/path.db`` (also ``sqlite://relative.db``,
      ``sqlite://:memory:``) or a plain filesystem path -> :class:`SqliteStore`;
    - ``postgresql://…`` or ``postgres://…`` -> :class:`PostgresStore`;
    - anything else -> :class:`ValueError`.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("empty store url")
    lowered = url.lower()
    if lowered.startswith(("postgresql://", "postgres://")):
        from decnet_attr.store.postgres import PostgresStore

        return PostgresStore(url)
    if lowered.startswith("sqlite://"):
        from decnet_attr.store.sqlite import SqliteStore

        path = url[len("sqlite://") :]
        if path in ("", "/:memory:"):
            path = ":memory:"
        if "?" in path:
            raise ValueError(f"query parameters are not supported in sqlite urls: {url!r}")
        return SqliteStore(path, dedupe_window=dedupe_window)
    if _SCHEME.match(url):
        raise ValueError(f"unsupported store url {url!r} (use sqlite:///path or postgresql://…)")
    from decnet_attr.store.sqlite import SqliteStore

    return SqliteStore(url, dedupe_window=dedupe_window)


__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "MULTI_ACTOR_FLAG_MIN",
    "STATES",
    "USER_UPDATE_FIELDS",
    "AttackerAttribution",
    "AttackerFilter",
    "AttackerRow",
    "AttackerSummary",
    "AttributionView",
    "DeadLetter",
    "Key",
    "ObservationRow",
    "RecomputeStats",
    "StateRow",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreIntegrity",
    "StoreUnavailable",
    "TicketRow",
    "Tx",
    "UserRow",
    "open_store",
    "store_for",
    "truncate_payload",
]
