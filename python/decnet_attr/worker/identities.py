"""Identity roll-up in the worker: the clusterer's components become store
identities, exactly.

Per batch (inside its transaction) :meth:`IdentityRollup.apply` feeds the
batch's fingerprint observations to the clusterer and reconciles the store
with what it says, for every attacker whose component changed or that
belongs to a linked component:

- the identity a component should have is the smallest (by uuid, as
  DECNET's clusterer picks winners) of its members' *home* identities (the
  stub identity each attacker started with);
- attackers whose current identity differs are moved (their observations
  follow; ``attacker_uuid`` never changes). An identity that loses all its
  attackers is *merged* into the one that received them (``identity.merged``,
  ``merged_into_uuid`` set); an identity that gets attackers back after
  having been merged away is *revived* (``identity.unmerged``, the
  un-merge: evidence was withdrawn);
- every identity involved is recomputed from its attackers' stored
  observations in ts order (the v0 merge over the union, as the oracle
  defines it): the engine's keys are evicted and refed, the state rows
  rewritten with complete windows, state events published, and the
  multi-actor rule re-evaluated;
- every move is recorded in ``identity_merges`` (winner, loser, attackers,
  evidence, time).

The reconciliation is idempotent: it compares the store with the
clusterer, so a batch whose transaction rolled back converges when it is
redelivered, and two workers racing on the same attackers (row locks on
PostgreSQL, one writer on SQLite) produce one merge: the second finds the
store already right.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from decnet_attr._core import Clusterer, ValidatedBatch
from decnet_attr.registry import registry
from decnet_attr.store.base import StateRow, Store, Tx
from decnet_attr.store.identities import MERGED, UNMERGED, IdentityOps, Membership
from decnet_attr.topics import (
    ATTRIBUTION_PROFILE_STATE_CHANGED,
    ATTRIBUTION_PROFILE_UPDATED,
    EVENT_TYPE_PROFILE_UPDATED,
    EVENT_TYPE_STATE_CHANGED,
    IDENTITY_MERGED,
    IDENTITY_OBSERVATION_LINKED,
    IDENTITY_UNMERGED,
)
from decnet_attr.worker.recompute import feed_series

if TYPE_CHECKING:
    from decnet_attr.worker.worker import AttributionWorker, Outgoing

log = logging.getLogger(__name__)

Key = tuple[str, str]

#: Stored fingerprint observations read per query (start-up, catch-up).
CATCH_UP_CHUNK = 20_000
#: Seqs re-read behind the newest seen (transactions commit out of seq order).
CATCH_UP_MARGIN = 2_000

#: Rounds of "a component reaches an identity, the identity reaches more
#: attackers" followed before reconciling (components are small).
MAX_CLOSURE_ROUNDS = 8


class IdentityRollup:
    """The worker's clusterer and the store reconciliation behind it."""

    def __init__(self, worker: AttributionWorker, clusterer: Clusterer) -> None:
        self.worker = worker
        self.clusterer = clusterer
        self.loaded = 0  # fingerprint observations fed from the store
        self.seen_seq = 0  # the newest stored seq fed
        self.primitives = sorted(p for p in registry().primitives if clusterer.is_fingerprint(p))

    # ---- feeding ---------------------------------------------------------------------
    async def load(self, store: Store) -> int:
        """Feed every stored fingerprint observation (a restart): the
        clusterer must know what linked the stored identities, or a
        reconciliation would split them."""
        before = self.loaded
        while await self.catch_up(store, margin=0):
            pass
        return self.loaded - before

    async def catch_up(self, store: Store, *, margin: int = CATCH_UP_MARGIN) -> int:
        """Feed fingerprint observations stored since the last call (by any
        worker sharing the store). ``margin`` seqs before the last one seen
        are read again: a concurrent transaction may commit a lower seq
        after a higher one is visible; feeding twice changes nothing."""
        reads = store.identity_reads()
        rows = await reads.fingerprints_after(
            max(0, self.seen_seq - margin), self.primitives, CATCH_UP_CHUNK
        )
        if rows:
            self.clusterer.add([(a, p, v) for _s, a, p, v in rows])
            fresh = sum(1 for s, *_ in rows if s > self.seen_seq)
            self.loaded += fresh
            self.seen_seq = max(self.seen_seq, rows[-1][0])
            return fresh
        return 0

    async def apply(
        self, tx: Tx, valid: ValidatedBatch, select: Sequence[int], now: float, touched: list[Key]
    ) -> list[Outgoing]:
        """Feed the selected observations of a batch, then reconcile the
        attackers that may need another identity (inside ``tx``)."""
        if self.worker.shared:
            # other workers' fingerprints, so links across workers are found
            await self.catch_up(self.worker.store)
        candidates = self.clusterer.add_batch(valid, list(select))
        if not candidates:
            return []
        return await self.reconcile(tx, candidates, now, touched)

    # ---- reconciliation --------------------------------------------------------------
    async def reconcile(
        self, tx: Tx, attackers: Sequence[str], now: float, touched: list[Key]
    ) -> list[Outgoing]:
        ops = tx.identity_ops()
        lock = self.worker.shared
        known: dict[str, Membership] = {}
        components: dict[str, tuple[str, ...]] = {}
        frontier = set(attackers)
        for _ in range(MAX_CLOSURE_ROUNDS):
            for a in list(frontier):
                if a not in components:
                    comp = tuple(self.clusterer.component(a))
                    for x in comp:
                        components[x] = comp
                    frontier.update(comp)
            new = [a for a in frontier if a not in known]
            if not new:
                break
            found = await ops.memberships(new, lock=lock)
            known.update(found)
            # the identities they are in, and the ones they came from (a
            # possible target: its current attackers must be known too)
            idents = {m.identity_uuid for m in found.values() if m.identity_uuid}
            idents |= {m.home_identity for m in found.values() if m.home_identity}
            more = await ops.members_of(sorted(idents), lock=lock)
            known.update(more)
            frontier = {a for a in more if a not in components}
            for a in new:
                known.setdefault(a, Membership(a, None, None))  # not stored (yet)
        stored = {a: m for a, m in known.items() if m.identity_uuid is not None}
        # the identity each stored attacker should have
        desired: dict[str, str] = {}
        for a in stored:
            if a in desired:
                continue
            comp = components.get(a) or tuple(self.clusterer.component(a))
            members = [x for x in comp if x in stored]
            homes = [h for x in members if (h := stored[x].home_identity) is not None]
            target = min(homes) if homes else stored[a].identity_uuid
            assert target is not None
            for x in members:
                desired[x] = target
        moves: dict[tuple[str, str], list[str]] = {}
        for a, mem in stored.items():
            want = desired.get(a, mem.identity_uuid)
            assert mem.identity_uuid is not None and want is not None
            if want != mem.identity_uuid:
                moves.setdefault((mem.identity_uuid, want), []).append(a)
        if not moves:
            return []
        return await self._apply_moves(ops, tx, stored, moves, now, touched)

    async def _apply_moves(
        self,
        ops: IdentityOps,
        tx: Tx,
        stored: dict[str, Membership],
        moves: dict[tuple[str, str], list[str]],
        now: float,
        touched: list[Key],
    ) -> list[Outgoing]:
        # the identities this changes are this transaction's alone (see
        # AttributionWorker.claim)
        self.worker.claim({i for pair in moves for i in pair})
        before: dict[str, set[str]] = {}
        for a, m in stored.items():
            assert m.identity_uuid is not None
            before.setdefault(m.identity_uuid, set()).add(a)
        after = {k: set(v) for k, v in before.items()}
        for (src, dst), group in moves.items():
            after[src].difference_update(group)
            after.setdefault(dst, set()).update(group)
        events: list[Outgoing] = []
        for (src, dst), group in sorted(moves.items()):
            await ops.move(group, dst)
            evidence = self._evidence(group, after[dst] - set(group))
            revived = not before.get(dst)
            if revived:
                # the un-merge: ``dst`` existed, was merged away, comes back
                kind = UNMERGED
                await ops.set_merged_into(dst, None, now)
                payload = {
                    "resurrected_uuid": dst,
                    "former_winner_uuid": src,
                    "identity_uuid": dst,
                    "attacker_uuids": sorted(group),
                    "evidence": evidence,
                    "ts": now,
                }
                await ops.record(kind, src, dst, group, evidence, now)
                events.append((IDENTITY_UNMERGED, payload, "unmerged"))
                self.worker.stats.identities_unmerged += 1
            else:
                kind = MERGED
                await ops.record(kind, dst, src, group, evidence, now)
                if not after[src]:
                    await ops.set_merged_into(src, dst, now)
                payload = {
                    "winner_uuid": dst,
                    "loser_uuid": src,
                    "identity_uuid": src,
                    "merged_into_uuid": dst,
                    "attacker_uuids": sorted(group),
                    "evidence": evidence,
                    "ts": now,
                }
                events.append((IDENTITY_MERGED, payload, "merged"))
                self.worker.stats.identities_merged += 1
                for a in sorted(group):
                    events.append(
                        (
                            IDENTITY_OBSERVATION_LINKED,
                            {"identity_uuid": dst, "observation_uuid": a, "attacker_uuid": a},
                            IDENTITY_OBSERVATION_LINKED,
                        )
                    )
            log.info("identity %s: %s -> %s (%d attackers)", kind, src, dst, len(group))
        involved = sorted({i for pair in moves for i in pair})
        for ident in involved:
            self.worker.set_attackers(ident, after.get(ident, set()))
        events.extend(await self._rebuild(ops, tx, involved, after, now, touched))
        events.extend(await self.worker.reevaluate_multi_actor(tx, involved, now))
        return events

    def _evidence(self, group: Sequence[str], others: set[str]) -> list[dict[str, Any]]:
        """The links between the moved attackers and the ones they join."""
        if not others:
            return []
        out = []
        for a, b, ev in self.clusterer.links(sorted(set(group) | others)):
            if (a in others) == (b in others):
                continue  # both moved, or both already there
            out.append(
                {
                    "attackers": [a, b],
                    "evidence": [
                        {
                            "primitive": p,
                            "value": v,
                            "other_value": o,
                            "distance": d,
                            "weight": w,
                        }
                        for p, v, o, d, w in ev
                    ],
                }
            )
        return out

    async def _rebuild(
        self,
        ops: IdentityOps,
        tx: Tx,
        identities: Sequence[str],
        members: dict[str, set[str]],
        now: float,
        touched: list[Key],
    ) -> list[Outgoing]:
        """Recompute every key of ``identities`` from their observations."""
        engine = self.worker.engine
        events: list[Outgoing] = []
        rows: list[StateRow] = []
        for ident in identities:
            prims = await ops.primitives_of(ident)
            stale = sorted(set(await ops.state_primitives(ident)) - set(prims))
            keys = [(ident, p) for p in sorted(set(prims) | set(stale))]
            prior = await tx.load_states(keys, lock=self.worker.shared)
            touched.extend(keys)
            engine.evict(keys)
            self.worker.forget_dirty(keys)
            await ops.delete_states(ident, stale)
            who = sorted(members.get(ident, ()))
            for p in prims:
                feed_series(engine, ident, p, await ops.series(ident, p))
            # the rows and events follow the worker's rules (StateTable)
            states = self.worker.rebuilt_states([(ident, p) for p in prims], prior, now)
            rows.extend(states.rows(StateRow, engine.export_windows(states.keys())))
            changes, _transitions = states.events(
                {ident: who},
                (ATTRIBUTION_PROFILE_STATE_CHANGED, EVENT_TYPE_STATE_CHANGED),
                (ATTRIBUTION_PROFILE_UPDATED, EVENT_TYPE_PROFILE_UPDATED),
            )
            events.extend(changes)
        if rows:
            await tx.upsert_states(rows)
        return events
