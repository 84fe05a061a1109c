"""The store's errors: what a caller can decide on, by type.

Every driver error a store method meets leaves it as one of these (the
dialect's ``map_error``, applied once by :func:`decnet_attr.store.dialect.guard`);
callers choose by class, never by the message:

- :class:`StoreUnavailable`: the database cannot be reached right now (not
  open, connection lost, locked past the busy timeout); try again later;
- :class:`StoreConflict`: the transaction lost to a concurrent one (deadlock,
  serialization failure); running it again is safe;
- :class:`StoreIntegrity`: the data was refused (a unique key taken, a
  constraint broken); running it again fails the same way;
- :class:`StoreError`: anything else the store failed at (the base class).
"""

from __future__ import annotations

__all__ = [
    "ConnectionClosed",
    "StoreConflict",
    "StoreError",
    "StoreIntegrity",
    "StoreUnavailable",
]


class StoreError(RuntimeError):
    """The store failed (connection lost, constraint, …)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now."""


class StoreConflict(StoreError):
    """The transaction lost to a concurrent one (deadlock, serialization
    failure): running it again is safe."""


class StoreIntegrity(StoreError):
    """The database refused the data (a unique key already taken, a
    constraint broken): running it again fails the same way."""


class ConnectionClosed(ValueError):
    """A call on a connection that is closed (the native SQLite writer's
    equivalent of aiosqlite's ``ValueError``); maps to :class:`StoreUnavailable`."""
