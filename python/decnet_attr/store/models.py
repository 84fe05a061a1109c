"""The store's data: the rows it reads and writes, and the facts about them.

Times are epoch seconds (float). JSON values (observation values,
``current_value``, retained windows) are held as JSON *text* so they come
back exactly as written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from decnet_attr import STATES as _STATES

Key = tuple[str, str]  # (identity_uuid, primitive)

#: The attribution-state vocabulary (every key of ``AttackerSummary.state_counts``).
STATES: tuple[str, ...] = _STATES

#: Dead-letter payloads are cut to this many UTF-8 bytes by the store.
DEAD_LETTER_MAX_BYTES = 64 * 1024

#: The ``UserRow`` fields :meth:`Store.update_user` accepts (plus ``updated_at``).
USER_UPDATE_FIELDS: frozenset[str] = frozenset(
    {"password_hash", "role", "must_change_password", "disabled", "tokens_valid_from"}
)


def truncate_payload(payload: str, limit: int = DEAD_LETTER_MAX_BYTES) -> str:
    """``payload`` cut to at most ``limit`` UTF-8 bytes (never inside a character;
    unencodable lone surrogates become ``?``)."""
    raw = payload.encode("utf-8", "replace")
    return raw[:limit].decode("utf-8", "ignore")


@dataclass(frozen=True)
class AttackerRow:
    uuid: str
    ip: str | None
    identity_id: str | None
    first_seen: float
    last_seen: float
    rotation_count: int = 0
    last_rotation_at: float | None = None


class AttributionView(NamedTuple):
    """The public columns of one ``attribution_state`` row (no retained window):
    what ``GET /attackers/{uuid}/attribution`` returns."""

    primitive: str
    current_value_json: str
    state: str
    confidence: float
    observation_count: int
    last_change_ts: float
    last_observation_ts: float


@dataclass(frozen=True)
class AttackerAttribution:
    """An attacker's identity (None: not formed yet) and its rows by primitive."""

    identity_uuid: str | None
    rows: list[AttributionView]


@dataclass(frozen=True)
class AttackerSummary:
    """An attacker for the dashboard list."""

    attacker: AttackerRow
    # state -> number of primitives of its identity in that state
    state_counts: dict[str, int]
    multi_actor: bool  # identity currently suspected (>= MULTI_ACTOR_FLAG_MIN multi_actor)
    observation_count: int


#: Primitives in ``multi_actor`` that make an attacker's identity "suspected" in
#: the list (its ``multi_actor`` flag and the ``multi_actor`` filter).
MULTI_ACTOR_FLAG_MIN = 2


@dataclass(frozen=True)
class AttackerFilter:
    """The list's search filters (all given ones must hold; empty: no filter).

    ``ips``: exact addresses (any); ``ip_prefixes``: text prefixes of the
    address (any; a CIDR network is given as the prefixes that cover it);
    ``attacker_prefix`` / ``identity_prefix``: case-insensitive prefixes of
    the attacker uuid / its identity uuid; ``states``: some primitive of the
    identity is in one of these states; ``multi_actor``: the flag of
    :class:`AttackerSummary` is set (True) or not (False); ``seen_since``:
    ``last_seen`` at or after this epoch time."""

    ips: tuple[str, ...] = ()
    ip_prefixes: tuple[str, ...] = ()
    # networks as (CIDR text, first ip_key, last ip_key): IPv6 ones (IPv4
    # networks come as ``ip_prefixes``)
    networks: tuple[tuple[str, str, str], ...] = ()
    attacker_prefix: str | None = None
    identity_prefix: str | None = None
    states: tuple[str, ...] = ()
    multi_actor: bool | None = None
    seen_since: float | None = None


@dataclass(slots=True)
class ObservationRow:
    """One stored observation (reference §5.2 ``observations``)."""

    id: str
    attacker_uuid: str
    primitive: str
    value_json: str  # the value as JSON text
    ts: float
    evidence_ref: str
    confidence: float | None = None
    window_start_ts: float | None = None
    window_end_ts: float | None = None
    source: str | None = None
    identity_ref: str | None = None
    envelope_v: int = 1
    identity_uuid: str | None = None  # the identity the worker merged it into
    merged: bool = True  # False: stored but not merged yet (bulk import)
    seq: int | None = None  # assigned by the store (monotonic insertion order)


@dataclass(slots=True)
class StateRow:
    """One ``attribution_state`` row plus what the engine needs to restart."""

    identity_uuid: str
    primitive: str
    current_value_json: str
    state: str
    confidence: float
    observation_count: int
    last_change_ts: float
    last_observation_ts: float
    kind: str = "categorical"
    window_json: str | None = None  # Engine.export_window() text
    version: int = 0  # incremented on every write of the row
    updated_at: float = 0.0
    previous_state: str | None = None  # the state before the last transition
    # None: ``window_json`` is complete. A seq: the window covers the key's
    # observations up to that seq (later ones are replayed on load).
    window_seq: int | None = None


@dataclass(slots=True)
class DeadLetter:
    topic: str
    reason: str
    payload_json: str  # truncated by the store to a bounded size
    event_id: str | None = None
    received_at: float = 0.0


@dataclass(frozen=True)
class UserRow:
    uuid: str
    username: str
    password_hash: str
    role: str  # admin | viewer | sensor
    must_change_password: bool = False
    disabled: bool = False
    tokens_valid_from: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class TicketRow:
    ticket_hash: str  # sha256 hex of the opaque ticket; the ticket itself is never stored
    user_uuid: str
    role: str
    expires_at: float
    created_at: float = 0.0
    # The access token the ticket was minted with (schema v2), so redemption can
    # re-check that it is not revoked, expired or older than ``tokens_valid_from``.
    token_jti: str | None = None
    token_iat: float | None = None
    token_exp: float | None = None


@dataclass
class RecomputeStats:
    keys: int = 0
    changed: list[tuple[str, str, str | None, str]] = field(default_factory=list)
