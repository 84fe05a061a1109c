"""Row mapping: the column lists the store's SQL selects and inserts, and the
conversions between those rows and the store's data classes (both
directions), written once for every backend."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from decnet_attr.store.models import (
    MULTI_ACTOR_FLAG_MIN,
    STATES,
    AttackerAttribution,
    AttackerRow,
    AttackerSummary,
    AttributionView,
    Key,
    ObservationRow,
    StateRow,
    TicketRow,
    UserRow,
)


def _columns(cls: type[Any]) -> str:
    """The columns of a table whose row class names them, in field order (so
    a selected row builds the object positionally)."""
    return ", ".join(f.name for f in dataclasses.fields(cls))


ATTACKER_COLS = _columns(AttackerRow)

STATE_COLS = (
    "identity_uuid, primitive, current_value, state, confidence, observation_count, "
    'last_change_ts, last_observation_ts, kind, "window", version, updated_at, previous_state'
)

OBS_INSERT_COLS = (
    "id, identity_ref, primitive, value, confidence, window_start_ts, window_end_ts, "
    "source, evidence_ref, envelope_v, ts, attacker_uuid, identity_uuid, merged"
)

# 14 columns; the backends append the identity column as the 15th.
OBS_SELECT_COLS = (
    "o.seq, o.id, o.attacker_uuid, o.primitive, o.value, o.ts, o.evidence_ref, "
    "o.confidence, o.window_start_ts, o.window_end_ts, o.source, o.identity_ref, "
    "o.envelope_v, o.merged"
)

USER_COLS = _columns(UserRow)

TICKET_COLS = _columns(TicketRow)


def attacker_from_row(r: Sequence[Any]) -> AttackerRow:
    return AttackerRow(*r[:7])


def attacker_attribution_from_rows(rows: Sequence[Sequence[Any]]) -> AttackerAttribution | None:
    """From ``attackers LEFT JOIN attribution_state`` rows: ``identity_id``
    then the seven :class:`AttributionView` columns (NULL without rows)."""
    if not rows:
        return None
    identity = rows[0][0]
    if identity is None or rows[0][1] is None:
        return AttackerAttribution(identity, [])
    return AttackerAttribution(
        identity,
        [AttributionView(r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows],
    )


def state_from_row(r: Sequence[Any]) -> StateRow:
    """From ``STATE_COLS`` (and ``window_seq``, when selected): the
    :class:`StateRow` fields in order."""
    return StateRow(*r)


def observation_from_row(r: Sequence[Any]) -> ObservationRow:
    """From ``OBS_SELECT_COLS`` + the identity column."""
    return ObservationRow(
        seq=r[0],
        id=r[1],
        attacker_uuid=r[2],
        primitive=r[3],
        value_json=r[4],
        ts=r[5],
        evidence_ref=r[6],
        confidence=r[7],
        window_start_ts=r[8],
        window_end_ts=r[9],
        source=r[10],
        identity_ref=r[11],
        envelope_v=r[12],
        merged=bool(r[13]),
        identity_uuid=r[14],
    )


def user_from_row(r: Sequence[Any]) -> UserRow:
    # the flags are 0/1 on SQLite
    return UserRow(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6], r[7], r[8])


def ticket_from_row(r: Sequence[Any]) -> TicketRow:
    return TicketRow(*r)


def dedupe_states(rows: Sequence[StateRow]) -> list[StateRow]:
    """Last row per key wins (a batch may carry one key twice)."""
    by_key: dict[Key, StateRow] = {}
    for r in rows:
        by_key[(r.identity_uuid, r.primitive)] = r
    return list(by_key.values())


def merge_attacker_items(
    items: Sequence[tuple[str, str | None, float]],
) -> list[tuple[str, str | None, float, float]]:
    """``(uuid, ip, seen_ts)`` items folded per uuid into ``(uuid, ip, first, last)``,
    sorted by uuid (a stable lock order); the first non-null ip wins."""
    merged: dict[str, list[Any]] = {}
    for uuid, ip, ts in items:
        cur = merged.get(uuid)
        if cur is None:
            merged[uuid] = [uuid, ip, ts, ts]
        else:
            if cur[1] is None:
                cur[1] = ip
            cur[2] = min(cur[2], ts)
            cur[3] = max(cur[3], ts)
    return [(m[0], m[1], float(m[2]), float(m[3])) for m in (merged[k] for k in sorted(merged))]


#: The identity columns :meth:`Store.recent_identities` returns, in this order.
IDENTITY_FIELDS: tuple[str, ...] = (
    "uuid",
    "campaign_id",
    "merged_into_uuid",
    "first_seen_at",
    "last_seen_at",
    "created_at",
    "updated_at",
    "confidence",
    "observation_count",
)


def identities_from_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(IDENTITY_FIELDS, r)) for r in rows]


def evidence_from_rows(rows: Sequence[Sequence[Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for uuid, ref in rows:
        out.setdefault(uuid, []).append(ref)
    return out


def overview_counts_from_rows(
    totals: Sequence[Any], states: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """``{"attackers", "identities", "states": {state: n for every state}}``."""
    by_state = dict.fromkeys(STATES, 0)
    for st, n in states:
        if st in by_state:
            by_state[st] = int(n)
    return {"attackers": int(totals[0]), "identities": int(totals[1]), "states": by_state}


def summaries_from_rows(rows: Sequence[Sequence[Any]]) -> list[AttackerSummary]:
    """:class:`AttackerSummary` objects from :func:`list_attackers_sql` rows."""
    out: list[AttackerSummary] = []
    for r in rows:
        counts = {st: int(r[8 + i]) for i, st in enumerate(STATES)}
        out.append(
            AttackerSummary(
                attacker=attacker_from_row(r[:7]),
                state_counts=counts,
                multi_actor=counts["multi_actor"] >= MULTI_ACTOR_FLAG_MIN,
                observation_count=int(r[7]),
            )
        )
    return out


#: One observations-table row, in ``OBS_INSERT_COLS`` order (what
#: ``ValidatedBatch.rows()`` builds in Rust).
ObsParams = tuple[Any, ...]


def obs_params(r: ObservationRow) -> ObsParams:
    """An :class:`ObservationRow` as an insert tuple (``OBS_INSERT_COLS`` order)."""
    return (
        r.id,
        r.identity_ref,
        r.primitive,
        r.value_json,
        r.confidence,
        r.window_start_ts,
        r.window_end_ts,
        r.source,
        r.evidence_ref,
        r.envelope_v,
        r.ts,
        r.attacker_uuid,
        r.identity_uuid,
        1 if r.merged else 0,
    )


def run_spans(rows: Sequence[Sequence[Any]]) -> list[tuple[int, int]]:
    """``[start, end)`` of each observation run of ``rows`` (``OBS_INSERT_COLS``
    order, stored in that order): consecutive merged rows of one attacker
    and identity make one run, a row not merged yet a run of its own
    (merging it gives its run its identity; see ``schema._COVER_RUNS``)."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(rows):
        key = tuple(rows[start][11:14])
        end = start + 1
        while end < len(rows) and key[2] and tuple(rows[end][11:14]) == key:
            end += 1
        spans.append((start, end))
        start = end
    return spans


def state_params(s: StateRow, now: float | None = None) -> tuple[Any, ...]:
    """A :class:`StateRow` as an insert tuple (``STATE_COLS`` order); a row
    without ``updated_at`` gets ``now``."""
    return (
        s.identity_uuid,
        s.primitive,
        s.current_value_json,
        s.state,
        s.confidence,
        s.observation_count,
        s.last_change_ts,
        s.last_observation_ts,
        s.kind,
        s.window_json,
        s.version,
        s.updated_at or (time.time() if now is None else now),
        s.previous_state,
    )


def user_params(user: UserRow, now: float) -> tuple[Any, ...]:
    """A :class:`UserRow` as an insert tuple (``USER_COLS`` order)."""
    return (
        user.uuid,
        user.username,
        user.password_hash,
        user.role,
        user.must_change_password,
        user.disabled,
        _float(user.tokens_valid_from),
        float(user.created_at or now),
        float(user.updated_at or user.created_at or now),
    )


def ticket_params(ticket: TicketRow, now: float) -> tuple[Any, ...]:
    """A :class:`TicketRow` as an insert tuple (``TICKET_COLS`` order)."""
    return (
        ticket.ticket_hash,
        ticket.user_uuid,
        ticket.role,
        float(ticket.expires_at),
        float(ticket.created_at or now),
        ticket.token_jti,
        _float(ticket.token_iat),
        _float(ticket.token_exp),
    )


def _float(x: float | None) -> float | None:
    return None if x is None else float(x)
