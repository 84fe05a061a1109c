"""``tune impact``: what a threshold change would do to the live store,
computed by the very replay ``recompute`` runs (in its dry-run mode), so
the forecast and the change cannot disagree; nothing is written.

``tune export``: the stored series as labelled NDJSON with an empty label
for an analyst to fill in.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, BinaryIO

import orjson

from decnet_attr.config import Settings
from decnet_attr.progress import Progress
from decnet_attr.store.base import Store
from decnet_attr.worker.recompute import recompute

Key = tuple[str, str]


async def impact(
    store: Store, current: Settings, proposed: Settings, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Badge transitions (old state -> new state, with counts) and the
    identities that would start or stop being multi-actor if ``proposed``'s
    thresholds replaced ``current``'s and ``recompute`` ran."""
    need_old = current.make_thresholds().multi_actor_min_primitives
    need_new = proposed.make_thresholds().multi_actor_min_primitives
    # every stored multi_actor row (identity -> primitives) before the change
    before: dict[str, set[str]] = {
        i: set(p) for i, p in (await store.multi_actor_identities(1)).items()
    }
    report = await recompute(store, proposed, dry_run=True, progress=progress)
    after = {i: set(p) for i, p in before.items()}
    moves: Counter[tuple[str | None, str]] = Counter()
    for ch in report["changed"]:
        key: Key = (ch["identity_uuid"], ch["primitive"])
        if ch["old_state"] != ch["new_state"]:
            moves[(ch["old_state"], ch["new_state"])] += 1
        prims = after.setdefault(key[0], set())
        if ch["new_state"] == "multi_actor":
            prims.add(key[1])
        else:
            prims.discard(key[1])
    for ident, prim in report["dropped"]:
        if ident in after:
            after[ident].discard(prim)
    was = {i for i, p in before.items() if len(p) >= need_old}
    will = {i for i, p in after.items() if len(p) >= need_new}
    return {
        "observations": report["observations"],
        "keys": report["keys"],
        "transitions": sorted(
            ({"from": a, "to": b, "count": n} for (a, b), n in moves.items()),
            key=lambda t: (-t["count"], str(t["from"]), t["to"]),
        ),
        "confidence_only": sum(1 for c in report["changed"] if c["old_state"] == c["new_state"]),
        "start_multi_actor": sorted(will - was),
        "stop_multi_actor": sorted(was - will),
        "dropped": len(report["dropped"]),
        "thresholds": proposed.make_thresholds().to_dict(),
    }


async def export(store: Store, out: BinaryIO, *, progress: Progress | None = None) -> int:
    """Write every stored observation (series order) with an empty label."""
    n = 0
    async for batch in store.iter_observations(batch_size=5000):
        for r in batch:
            out.write(
                orjson.dumps(
                    {
                        "identity_uuid": r.identity_uuid or r.attacker_uuid,
                        "attacker_uuid": r.attacker_uuid,
                        "primitive": r.primitive,
                        "value": orjson.loads(r.value_json),
                        "ts": r.ts,
                        "label": {
                            "state": None,
                            "family": "",
                            "change_point": False,
                            "operator": None,
                            "multi_actor": None,
                            "stationary": None,
                        },
                    }
                )
                + b"\n"
            )
        n += len(batch)
        if progress:
            progress.update(len(batch))
    return n
