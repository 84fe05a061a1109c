"""The store's interfaces, one per concern, and :class:`Store`, their composition.

- :class:`Tx`: the writes of one worker batch, inside ONE transaction;
- :class:`StoreLifecycle`: open, close, readiness, transactions;
- :class:`AttributionStore`: attackers, observations, attribution state, retention;
- :class:`IdentityStore`: the identities attackers roll up to;
- :class:`AuthStore`: users, revoked tokens and SSE tickets;
- :class:`DeadLetterStore`: what the worker could not process.

The database is the source of truth. The worker does all of one
micro-batch's writes inside one transaction (:meth:`Store.transaction`);
the API reads outside transactions. Every write is a native upsert
(``INSERT … ON CONFLICT``), never select-then-write.

Both backends implement them through one SQL store written over a dialect
(:mod:`decnet_attr.store.sql`); the data classes are in
:mod:`decnet_attr.store.models`, the errors in :mod:`decnet_attr.store.errors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from decnet_attr.store.errors import StoreConflict, StoreError, StoreIntegrity, StoreUnavailable
from decnet_attr.store.models import (
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
    TicketRow,
    UserRow,
    truncate_payload,
)
from decnet_attr.store.rows import ObsParams, obs_params

if TYPE_CHECKING:
    from decnet_attr._core import Engine, StateWrite, ValidatedBatch
    from decnet_attr.store.identities import IdentityOps, IdentityReads


class Tx(ABC):
    """Writes of one worker batch, inside one transaction."""

    @abstractmethod
    async def ensure_attackers(self, items: Sequence[tuple[str, str | None, float]]) -> None:
        """Register attackers ``(uuid, ip or None, seen_ts)`` that do not exist yet.

        Idempotent. When the ip is already taken by another attacker the new
        attacker is registered without an ip. For existing attackers,
        ``first_seen``/``last_seen`` widen to include ``seen_ts``.
        """

    @abstractmethod
    async def ensure_identities(
        self, attacker_uuids: Sequence[str], now: float
    ) -> tuple[dict[str, str], list[str]]:
        """The stub identity of each attacker, created atomically if missing.

        Compare-and-set (docs/decnet.md#identity-compare-and-set): the identity row is inserted,
        then ``UPDATE attackers SET identity_id = ? WHERE uuid = ? AND
        identity_id IS NULL``; a loser deletes its row and uses the winner's.
        Returns ``({attacker_uuid: identity_uuid}, [identity uuids formed by
        this call])``. Unknown attackers are left out of the mapping.
        Identity uuids are 32 lowercase hex chars.
        """

    def committed_reads(self) -> Tx:
        """Reads of what is committed, which need not wait for this
        transaction's writer (a pipelined store: its COMMITs in flight are
        not visible there, so the caller overlays what it wrote since).
        Others: the transaction itself."""
        return self

    async def form_identities(
        self, attacker_uuids: Sequence[str], known: Mapping[str, str], now: float
    ) -> tuple[dict[str, str], list[str]]:
        """:meth:`ensure_identities` for the store's only writer, which knows
        the identities of the attackers in ``known`` (its own writes,
        committed or in flight): the others are read committed and the
        missing ones formed without waiting for the writer; an attacker
        given an identity meanwhile by anybody else fails the transaction
        with :class:`StoreConflict`. By default, :meth:`ensure_identities`."""
        return await self.ensure_identities(attacker_uuids, now)

    async def insert_observations(self, rows: Sequence[ObservationRow]) -> list[int]:
        """Insert observations; duplicates (same ``id``, or same
        ``(evidence_ref, primitive)``) are skipped. Returns the indexes into
        ``rows`` that were inserted, in order. Sequence numbers are assigned
        in ``rows`` order."""
        return await self.insert_observation_rows([obs_params(r) for r in rows])

    async def insert_validated(
        self, batch: ValidatedBatch, identity_of: Mapping[str, str]
    ) -> list[int]:
        """Insert the accepted items of a validated batch under their
        identities; returns the positions (in the batch) that were new."""
        return await self.insert_observation_rows(batch.rows(identity_of))

    @abstractmethod
    async def insert_observation_rows(self, rows: Sequence[ObsParams]) -> list[int]:
        """:meth:`insert_observations` for rows already in the table's column
        order (``schema.OBS_INSERT_COLS``; ``ValidatedBatch.rows()``)."""

    @abstractmethod
    async def load_states(self, keys: Sequence[Key], *, lock: bool = False) -> dict[Key, StateRow]:
        """The state rows (with windows) of these keys. ``lock=True`` takes
        row locks (``SELECT … FOR UPDATE`` in key order on PostgreSQL; the
        SQLite transaction already holds the write lock)."""

    @abstractmethod
    async def upsert_states(
        self, rows: Sequence[StateRow], *, created: Collection[Key] = ()
    ) -> None:
        """Insert or replace these rows (``version`` is written as given).

        ``created``: the keys the caller found without a row (under the
        transaction's locks) and now creates. On a store several workers
        write, a row that appeared meanwhile for one of them (another worker
        created it: there was no row to lock) raises :class:`StoreConflict`,
        so that the batch runs again on the row as it is now, instead of
        replacing it and losing the other worker's observations. A store
        with one writer has nobody to race."""

    async def write_states(
        self, states: StateWrite, engine: Engine, loaded: Collection[Key]
    ) -> None:
        """A batch's state rows with the retained windows ``engine`` holds,
        on a store several workers write: a row built on none (version 1:
        the key was found without a row, ``loaded`` holds the others that
        were read) is created, and a row created for one of them meanwhile
        raises :class:`StoreConflict` (see :meth:`upsert_states`)."""
        keys = states.keys()
        rows = states.rows(StateRow, engine.export_windows(keys))
        await self.upsert_states(rows, created=[k for k, r in zip(keys, rows) if r.version == 1])

    async def upsert_state_values(self, states: StateWrite) -> None:
        """A batch's state rows (see ``StateWrite``) without their windows:
        a new row gets no window (``window_seq`` 0: replay its whole series),
        an existing row keeps the window it has. Only stores with
        ``lazy_windows``."""
        raise NotImplementedError

    async def save_windows(self, windows: Sequence[tuple[str, str, str]], seq: int | None) -> None:
        """Write ``(identity, primitive, window_json)`` as covering the keys'
        observations up to ``seq`` (None: every observation stored so far,
        this transaction's included). Only stores with ``lazy_windows``."""
        raise NotImplementedError

    async def save_windows_of(self, engine: Engine, keys: Sequence[Key], seq: int | None) -> None:
        """:meth:`save_windows` of the windows ``engine`` holds for ``keys``
        (a key it does not hold is left as it is)."""
        windows = engine.export_windows(keys)
        await self.save_windows(
            [(k[0], k[1], w) for k, w in zip(keys, windows, strict=True) if w is not None], seq
        )

    async def max_observation_seq(self) -> int:
        """The newest observation seq (0 when there is none)."""
        raise NotImplementedError

    async def series_after(self, identity_uuid: str, primitive: str, seq: int) -> list[Any]:
        """``(value_json, ts)`` of the key's merged observations with a larger
        seq, in seq order (what a stored window does not cover yet)."""
        raise NotImplementedError

    @abstractmethod
    async def multi_actor_primitives(self, identity_uuids: Sequence[str]) -> dict[str, list[str]]:
        """For each identity, its primitives currently in ``multi_actor``
        (sorted; identities with none are left out)."""

    @abstractmethod
    async def multi_actor_signatures(
        self, identity_uuids: Sequence[str], *, lock: bool = False
    ) -> dict[str, list[str]]:
        """The last fired primitive set per identity (persisted dedupe)."""

    @abstractmethod
    async def set_multi_actor_signature(
        self, identity_uuid: str, primitives: Sequence[str] | None, now: float
    ) -> None:
        """Record a fired set, or ``None`` to re-arm (delete)."""

    @abstractmethod
    async def insert_dead_letters(self, rows: Sequence[DeadLetter]) -> None: ...

    @abstractmethod
    async def mark_merged(self, seqs: Sequence[int], identity_by_seq: dict[int, str]) -> None:
        """Mark stored-but-unmerged observations as merged (and record the
        identity they were merged into)."""

    @abstractmethod
    def identity_ops(self) -> IdentityOps:
        """Identity merges and un-merges inside this transaction."""


class StoreLifecycle(ABC):
    """Open, close, readiness and write transactions."""

    dialect: str  # "sqlite" or "postgresql"
    url: str
    #: The store writes retained windows lazily (:meth:`Tx.save_windows`,
    #: replay on load) — the embedded single-writer store.
    lazy_windows: bool = False

    @abstractmethod
    async def open(self) -> None:
        """Connect and run the versioned migrations."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> bool:
        """True when a trivial query succeeds (readiness)."""

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One write transaction: committed on normal exit, rolled back on
        an exception. SQLite: ``BEGIN IMMEDIATE``."""

    @abstractmethod
    async def schema_version(self) -> int: ...


class AttributionStore(ABC):
    """Attackers, their observations and attribution state, and retention."""

    @abstractmethod
    async def get_attacker(self, uuid: str) -> AttackerRow | None: ...

    @abstractmethod
    async def register_attacker(
        self, ip: str, uuid: str | None, now: float
    ) -> tuple[AttackerRow, bool]:
        """Idempotent by ip: returns the existing attacker for that ip, else
        creates one (with ``uuid`` if given, else a new dashed uuid4).
        Returns ``(row, created)``. A ``uuid`` already used by another ip
        raises :class:`StoreError`."""

    @abstractmethod
    async def list_attackers(
        self,
        *,
        limit: int,
        offset: int,
        sort: str = "last_seen",
        descending: bool = True,
        uuid: str | None = None,
        search: str | None = None,
        service: str | None = None,
        filters: AttackerFilter | None = None,
    ) -> tuple[list[AttackerSummary], int]:
        """A page of attackers and the total count of those matching. ``sort``:
        ``last_seen`` | ``first_seen`` | ``ip`` | ``events`` (observation count).
        Filters: ``uuid`` (exactly that attacker), ``search`` (case-insensitive
        substring of the ip or uuid), ``service`` (attackers with an observation
        whose evidence reference is a shard of that service,
        ``shard:<decky>/<service>/…``) and ``filters`` (:class:`AttackerFilter`)."""

    @abstractmethod
    async def attacker_evidence(self, attacker_uuids: Sequence[str]) -> dict[str, list[str]]:
        """The distinct shard evidence references (``shard:…``) of these
        attackers' observations, sorted; attackers with none are left out."""

    @abstractmethod
    async def overview_counts(self) -> dict[str, Any]:
        """The fleet's totals: ``{"attackers": n, "identities": n (not merged),
        "states": {state: primitives in it, for every state}}``."""

    async def attacker_attribution(self, attacker_uuid: str) -> AttackerAttribution | None:
        """The attribution endpoint's read: None for an unknown attacker, else
        its identity and that identity's rows ordered by primitive (byte
        order), without the retained windows. Backends override this with one
        query; this default uses two (the reference the tests compare with)."""
        attacker = await self.get_attacker(attacker_uuid)
        if attacker is None:
            return None
        if attacker.identity_id is None:
            return AttackerAttribution(None, [])
        rows = await self.attribution_for_identity(attacker.identity_id)
        views = [
            AttributionView(
                r.primitive,
                r.current_value_json,
                r.state,
                r.confidence,
                r.observation_count,
                r.last_change_ts,
                r.last_observation_ts,
            )
            for r in rows
        ]
        views.sort(key=lambda v: v.primitive)
        return AttackerAttribution(attacker.identity_id, views)

    @abstractmethod
    async def attribution_for_identity(self, identity_uuid: str) -> list[StateRow]:
        """Every state row of an identity, ordered by primitive."""

    @abstractmethod
    async def get_state(self, identity_uuid: str, primitive: str) -> StateRow | None: ...

    @abstractmethod
    async def multi_actor_identities(self, min_primitives: int) -> dict[str, list[str]]:
        """Identities with at least ``min_primitives`` rows in
        ``multi_actor``: ``{identity: sorted primitives}``."""

    @abstractmethod
    async def latest_observations(self, attacker_uuid: str) -> list[dict[str, Any]]:
        """Latest observation per primitive of an attacker, ordered by
        primitive: ``{primitive, value, confidence, ts, source}`` (``value``
        decoded). Ties on ts go to the higher seq (deterministic)."""

    async def series_after(self, identity_uuid: str, primitive: str, seq: int) -> list[Any]:
        """:meth:`Tx.series_after` outside a transaction (stores with
        ``lazy_windows``)."""
        raise NotImplementedError

    @abstractmethod
    async def recent_values(
        self, identity_uuid: str, primitive: str, limit: int
    ) -> list[dict[str, Any]]:
        """The last ``limit`` observations of a key in series order (ts, seq):
        ``{ts, value, confidence, attacker_uuid}``."""

    @abstractmethod
    def iter_observations(self, *, batch_size: int = 5000) -> AsyncIterator[list[ObservationRow]]:
        """All merged-or-not observations with an identity, ordered by
        ``(ts, seq)``, in batches (for recompute)."""

    @abstractmethod
    async def count_observations(self) -> int: ...

    @abstractmethod
    async def pending_observations(self, *, after_seq: int, limit: int) -> list[ObservationRow]:
        """Stored but not merged (``merged = false``), by seq."""

    @abstractmethod
    async def replace_all_states(self, rows: Sequence[StateRow]) -> None:
        """Recompute: replace the whole ``attribution_state`` table (one
        transaction) and clear the multi-actor dedupe."""

    async def stored_positions(self, batch: ValidatedBatch) -> list[int]:
        """Positions of the batch's accepted items that were stored before
        (same id, or same ``(evidence_ref, primitive)``): what the API
        reports as duplicates. Best effort: the insert's own dedupe is what
        guarantees exactly once."""
        return []

    @abstractmethod
    async def mark_observations(self, now: float) -> int:
        """Note the newest observation seq at ``now`` (a retention mark);
        returns it."""

    @abstractmethod
    async def retention_cut(self, before: float) -> int:
        """The newest seq stored before ``before`` (by the marks; 0: none)."""

    @abstractmethod
    async def stale_window_keys(self, seq: int, limit: int) -> list[Key]:
        """Keys whose stored window stops before ``seq`` (lazy windows):
        pruning up to ``seq`` would take observations they still need."""

    @abstractmethod
    async def prune_observations(self, upto_seq: int, *, chunk: int = 50_000) -> int:
        """Delete merged observations with ``seq <= upto_seq`` in chunks of
        ``chunk`` rows (one transaction each) and marks older than the cut;
        returns how many went."""


class IdentityStore(ABC):
    """The identities attackers roll up to."""

    @abstractmethod
    async def recent_identities(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently updated identities, newest first:
        ``{uuid, campaign_id, merged_into_uuid, first_seen_at, last_seen_at,
        created_at, updated_at, confidence, observation_count}`` (epoch times)."""

    @abstractmethod
    def identity_reads(self) -> IdentityReads:
        """The identity API's reads (pages, members, merge history)."""

    @abstractmethod
    async def attackers_of_identity(self, identity_uuid: str) -> list[str]:
        """Attacker uuids pointing at this identity (sorted)."""


class AuthStore(ABC):
    """Users, revoked tokens and SSE tickets."""

    @abstractmethod
    async def create_user(self, user: UserRow) -> None:
        """Raises :class:`StoreError` if the username exists."""

    @abstractmethod
    async def get_user(self, uuid: str) -> UserRow | None: ...

    @abstractmethod
    async def get_user_by_name(self, username: str) -> UserRow | None: ...

    @abstractmethod
    async def list_users(self) -> list[UserRow]: ...

    @abstractmethod
    async def update_user(self, uuid: str, **fields: Any) -> None:
        """Update any of password_hash, role, must_change_password, disabled,
        tokens_valid_from (updated_at is set)."""

    @abstractmethod
    async def count_users(self) -> int: ...

    @abstractmethod
    async def revoke_token(self, jti: str, expires_at: float) -> None: ...

    @abstractmethod
    async def is_token_revoked(self, jti: str) -> bool: ...

    @abstractmethod
    async def add_ticket(self, ticket: TicketRow, *, max_outstanding: int, now: float) -> bool:
        """Store a ticket unless the user already has ``max_outstanding``
        unexpired tickets (returns False then). Expired tickets are swept."""

    @abstractmethod
    async def redeem_ticket(self, ticket_hash: str, now: float) -> TicketRow | None:
        """Atomically delete and return the ticket (single use), None when
        absent; an expired ticket is deleted and None returned."""

    @abstractmethod
    async def purge_expired(self, now: float) -> None:
        """Drop expired revoked-token and ticket rows."""


class DeadLetterStore(ABC):
    """What the worker could not process (written by :meth:`Tx.insert_dead_letters`)."""

    @abstractmethod
    async def dead_letter_count(self) -> int: ...


class Store(StoreLifecycle, AttributionStore, IdentityStore, AuthStore, DeadLetterStore):
    """The whole store: every interface above, on one database."""


__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "MULTI_ACTOR_FLAG_MIN",
    "STATES",
    "USER_UPDATE_FIELDS",
    "AttackerAttribution",
    "AttackerFilter",
    "AttackerRow",
    "AttackerSummary",
    "AttributionStore",
    "AttributionView",
    "AuthStore",
    "DeadLetter",
    "DeadLetterStore",
    "IdentityStore",
    "Key",
    "ObsParams",
    "ObservationRow",
    "RecomputeStats",
    "StateRow",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreIntegrity",
    "StoreLifecycle",
    "StoreUnavailable",
    "TicketRow",
    "Tx",
    "UserRow",
    "obs_params",
    "truncate_payload",
]
