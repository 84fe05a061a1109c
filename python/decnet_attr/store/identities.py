"""Identity roll-up storage: the queries behind merges, un-merges and the
identity API, written once for both backends.

A backend provides one guarded ``run(sql, params) -> rows`` on a transaction
(:meth:`Tx.identity_ops`) and on its read side (:meth:`Store.identity_reads`);
the SQL here is written with ``?`` placeholders, ``IN_LIST(?)`` for a list
parameter and ``IS_MERGED`` for "the engine has merged this observation",
and the backend's :class:`~decnet_attr.store.dialect.Dialect` turns them
into its form.

What is stored:

- ``attackers.identity_id`` is the attacker's *current* identity (the
  survivor after merges); ``attackers.home_identity`` the stub identity it
  started with, set the first time it moves (NULL: never moved);
- ``observations.identity_uuid`` follows the attacker's current identity
  (the series reads and state rows are keyed by it); ``attacker_uuid``
  never changes;
- ``attacker_identities.merged_into_uuid`` is set on an identity that lost
  all its attackers to a merge, and cleared when an un-merge revives it;
- ``identity_merges`` records every merge and un-merge: kind, winner,
  loser, the attackers moved, the evidence (JSON) and the time.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from decnet_attr.store.dialect import Dialect
from decnet_attr.store.rows import IDENTITY_FIELDS

Run = Callable[[str, Sequence[Any]], Awaitable[Sequence[Sequence[Any]]]]

#: The kinds of ``identity_merges`` rows.
MERGED = "merged"
UNMERGED = "unmerged"


@dataclass(frozen=True)
class Membership:
    attacker_uuid: str
    identity_uuid: str | None
    home_identity: str | None


class _Base:
    def __init__(self, run: Run, dialect: Dialect) -> None:
        self._run = run
        self.dialect = dialect

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self._run(self.dialect.sql(sql), list(params))]


_MEMBER_COLS = "uuid, identity_id, coalesce(home_identity, identity_id)"


class IdentityOps(_Base):
    """Writes and locked reads inside one store transaction."""

    async def memberships(
        self, attackers: Sequence[str], *, lock: bool = False
    ) -> dict[str, Membership]:
        """Current and home identity of the given attackers (locked on a
        shared store, in uuid order so two workers never deadlock)."""
        if not attackers:
            return {}
        rows = await self.rows(
            f"SELECT {_MEMBER_COLS} FROM attackers WHERE uuid IN_LIST(?) ORDER BY uuid"
            + (self.dialect.for_update if lock else ""),
            [self.dialect.list_param(sorted(set(attackers)))],
        )
        return {r[0]: Membership(r[0], r[1], r[2]) for r in rows}

    async def members_of(
        self, identities: Sequence[str], *, lock: bool = False
    ) -> dict[str, Membership]:
        """Every attacker whose current identity is one of ``identities``."""
        if not identities:
            return {}
        rows = await self.rows(
            f"SELECT {_MEMBER_COLS} FROM attackers WHERE identity_id IN_LIST(?) ORDER BY uuid"
            + (self.dialect.for_update if lock else ""),
            [self.dialect.list_param(sorted(set(identities)))],
        )
        return {r[0]: Membership(r[0], r[1], r[2]) for r in rows}

    async def created_at(self, identities: Sequence[str]) -> dict[str, float]:
        if not identities:
            return {}
        rows = await self.rows(
            "SELECT uuid, created_at FROM attacker_identities WHERE uuid IN_LIST(?)",
            [self.dialect.list_param(sorted(set(identities)))],
        )
        return {r[0]: float(r[1]) for r in rows}

    async def move(self, attackers: Sequence[str], identity: str) -> None:
        """Point attackers (and their observations) at ``identity``; the
        first move remembers where each came from."""
        if not attackers:
            return
        ids = self.dialect.list_param(sorted(set(attackers)))
        await self.rows(
            "UPDATE attackers SET home_identity = coalesce(home_identity, identity_id), "
            "identity_id = ? WHERE uuid IN_LIST(?)",
            [identity, ids],
        )
        # the rows found through their runs, and the runs themselves
        await self.rows(
            "UPDATE observations SET identity_uuid = ? "
            "WHERE seq IN (SELECT seq FROM observations_by_run WHERE run_attacker IN_LIST(?))",
            [identity, ids],
        )
        await self.rows(
            "UPDATE observation_runs SET identity_uuid = ? WHERE attacker_uuid IN_LIST(?)",
            [identity, ids],
        )

    async def set_merged_into(self, identity: str, target: str | None, now: float) -> None:
        await self.rows(
            "UPDATE attacker_identities SET merged_into_uuid = ?, updated_at = ? WHERE uuid = ?",
            [target, now, identity],
        )

    async def primitives_of(self, identity: str) -> list[str]:
        rows = await self.rows(
            "SELECT DISTINCT primitive FROM observations_by_run WHERE run_identity = ? AND IS_MERGED "
            "ORDER BY primitive",
            [identity],
        )
        return [r[0] for r in rows]

    async def series(self, identity: str, primitive: str) -> list[tuple[str, float]]:
        """The key's merged observations as ``(value_json, ts)`` in ts order."""
        rows = await self.rows(
            "SELECT value, ts FROM observations_by_run WHERE run_identity = ? AND primitive = ? "
            "AND IS_MERGED ORDER BY ts, seq",
            [identity, primitive],
        )
        return [(r[0], float(r[1])) for r in rows]

    async def state_primitives(self, identity: str) -> list[str]:
        rows = await self.rows(
            "SELECT primitive FROM attribution_state WHERE identity_uuid = ?", [identity]
        )
        return [r[0] for r in rows]

    async def delete_states(self, identity: str, primitives: Sequence[str]) -> None:
        if primitives:
            await self.rows(
                "DELETE FROM attribution_state WHERE identity_uuid = ? AND primitive IN_LIST(?)",
                [identity, self.dialect.list_param(sorted(set(primitives)))],
            )

    async def record(
        self,
        kind: str,
        winner: str,
        loser: str,
        attackers: Sequence[str],
        evidence: Any,
        ts: float,
    ) -> None:
        await self.rows(
            "INSERT INTO identity_merges (kind, winner_uuid, loser_uuid, attacker_uuids, "
            "evidence, ts) VALUES (?, ?, ?, ?, ?, ?)",
            [kind, winner, loser, json.dumps(sorted(attackers)), json.dumps(evidence), ts],
        )


class IdentityReads(_Base):
    """The identity API's reads."""

    async def page(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Live identities (not merged away), most recently updated first,
        each with its member count; and how many there are."""
        cols = ", ".join(f"i.{c}" for c in IDENTITY_FIELDS)
        rows = await self.rows(
            f"SELECT {cols}, (SELECT count(*) FROM attackers a WHERE a.identity_id = i.uuid) "
            "FROM attacker_identities i WHERE i.merged_into_uuid IS NULL "
            "ORDER BY i.updated_at DESC, i.uuid DESC LIMIT ? OFFSET ?",
            [int(limit), int(offset)],
        )
        total = await self.rows(
            "SELECT count(*) FROM attacker_identities WHERE merged_into_uuid IS NULL"
        )
        out = []
        for r in rows:
            d = dict(zip(IDENTITY_FIELDS, r))
            d["attacker_count"] = int(r[len(IDENTITY_FIELDS)])
            out.append(d)
        return out, int(total[0][0])

    async def get(self, identity: str) -> dict[str, Any] | None:
        rows = await self.rows(
            f"SELECT {', '.join(IDENTITY_FIELDS)} FROM attacker_identities WHERE uuid = ?",
            [identity],
        )
        return dict(zip(IDENTITY_FIELDS, rows[0])) if rows else None

    async def members(self, identity: str) -> list[dict[str, Any]]:
        rows = await self.rows(
            "SELECT uuid, ip, first_seen, last_seen, coalesce(home_identity, identity_id) "
            "FROM attackers WHERE identity_id = ? ORDER BY uuid",
            [identity],
        )
        return [
            {
                "uuid": r[0],
                "ip": r[1],
                "first_seen": r[2],
                "last_seen": r[3],
                "home_identity": r[4],
            }
            for r in rows
        ]

    async def history(self, identity: str) -> list[dict[str, Any]]:
        rows = await self.rows(
            "SELECT id, kind, winner_uuid, loser_uuid, attacker_uuids, evidence, ts "
            "FROM identity_merges WHERE winner_uuid = ? OR loser_uuid = ? ORDER BY id",
            [identity, identity],
        )
        return [
            {
                "id": int(r[0]),
                "kind": r[1],
                "winner_uuid": r[2],
                "loser_uuid": r[3],
                "attacker_uuids": json.loads(r[4]),
                "evidence": json.loads(r[5]),
                "ts": r[6],
            }
            for r in rows
        ]

    async def fingerprints(
        self, identity: str, primitives: Sequence[str], limit: int
    ) -> list[dict[str, Any]]:
        """The identity's distinct fingerprint values, each with the
        attackers that showed it, most shared first."""
        rows = await self.rows(
            "SELECT primitive, value, attacker_uuid FROM observations_by_run "
            "WHERE run_identity = ? AND primitive IN_LIST(?) "
            "GROUP BY primitive, value, attacker_uuid ORDER BY primitive, value, attacker_uuid",
            [identity, self.dialect.list_param(sorted(set(primitives)))],
        )
        out: dict[tuple[str, str], list[str]] = {}
        for prim, value, attacker in rows:
            out.setdefault((prim, value), []).append(attacker)
        ranked = sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:limit]
        return [
            {"primitive": p, "value": json.loads(v), "attacker_uuids": who}
            for (p, v), who in ranked
        ]

    async def fingerprints_after(
        self, seq: int, primitives: Sequence[str], limit: int
    ) -> list[tuple[int, str, str, str]]:
        """Stored observations of the given primitives after ``seq``, in seq
        order: ``(seq, attacker_uuid, primitive, value_json)`` (the
        clusterer's start-up load, and how workers sharing a store learn
        each other's fingerprints)."""
        rows = await self.rows(
            "SELECT seq, attacker_uuid, primitive, value FROM observations "
            "WHERE seq > ? AND primitive IN_LIST(?) ORDER BY seq LIMIT ?",
            [int(seq), self.dialect.list_param(sorted(set(primitives))), int(limit)],
        )
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]

    async def observations(
        self, identity: str, limit: int, before_seq: int | None
    ) -> list[dict[str, Any]]:
        """The identity's observations, newest first (by arrival), a page
        of ``limit`` below ``before_seq``."""
        cond = "" if before_seq is None else " AND seq < ?"
        params: list[Any] = [identity]
        if before_seq is not None:
            params.append(int(before_seq))
        params.append(int(limit))
        rows = await self.rows(
            "SELECT seq, id, attacker_uuid, primitive, value, confidence, ts, source, "
            "evidence_ref FROM observations_by_run WHERE run_identity = ?"
            + cond
            # newest run first, then newest row: seq order, and the page
            # stops reading once it is full
            + " ORDER BY run_last DESC, seq DESC LIMIT ?",
            params,
        )
        return [
            {
                "seq": int(r[0]),
                "id": r[1],
                "attacker_uuid": r[2],
                "primitive": r[3],
                "value": json.loads(r[4]),
                "confidence": r[5],
                "ts": r[6],
                "source": r[7],
                "evidence_ref": r[8],
            }
            for r in rows
        ]
