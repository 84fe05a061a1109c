"""``decnet-attr recompute`` and ``decnet-attr explain``.

recompute rebuilds every (identity, primitive) state from the stored
observations in series order (ts, then insertion order), e.g. after a
threshold change, and reports what changed; ``last_change_ts`` is the
observation time of the last state flip seen during the replay.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import orjson

from decnet_attr import Engine
from decnet_attr.config import Settings
from decnet_attr.progress import Progress
from decnet_attr.registry import value_kind_for
from decnet_attr.store import store_for
from decnet_attr.store.base import StateRow, Store

Key = tuple[str, str]


async def recompute(
    store: Store, settings: Settings, *, dry_run: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    engine = Engine(settings.make_thresholds(), max_value_bytes=settings.max_value_bytes)
    last_change: dict[Key, float] = {}
    previous: dict[Key, str | None] = {}
    total = 0
    async for batch in store.iter_observations(batch_size=5000):
        res = engine.ingest(
            [
                {
                    "identity_uuid": r.identity_uuid,
                    "primitive": r.primitive,
                    "value": orjson.loads(r.value_json),
                    "ts": r.ts,
                }
                for r in batch
            ]
        )
        for c in res:
            if c.state_changed:
                key = (c.identity_uuid, c.primitive)
                last_change[key] = c.state.last_observation_ts
                previous[key] = c.old_state.state if c.old_state is not None else None
        total += len(batch)
        if progress:
            progress.update(len(batch))
    keys = engine.keys()
    states = engine.get_many(keys)
    windows = engine.export_windows(keys)
    now = time.time()
    old: dict[Key, StateRow] = {}
    for ident in sorted({k[0] for k in keys}):
        for row in await store.attribution_for_identity(ident):
            old[(row.identity_uuid, row.primitive)] = row
    rows: list[StateRow] = []
    changed: list[dict[str, Any]] = []
    for key, st, window in zip(keys, states, windows):
        if st is None:
            continue
        prev = old.get(key)
        rows.append(
            StateRow(
                identity_uuid=key[0],
                primitive=key[1],
                current_value_json=orjson.dumps(st.current_value).decode(),
                state=st.state,
                confidence=st.confidence,
                observation_count=st.observation_count,
                last_change_ts=last_change.get(key, st.last_observation_ts),
                last_observation_ts=st.last_observation_ts,
                kind=value_kind_for(key[1]),
                window_json=window,
                version=(prev.version if prev else 0) + 1,
                updated_at=now,
                previous_state=previous.get(key),
            )
        )
        if prev is None or prev.state != st.state or abs(prev.confidence - st.confidence) > 1e-12:
            changed.append(
                {
                    "identity_uuid": key[0],
                    "primitive": key[1],
                    "old_state": prev.state if prev else None,
                    "new_state": st.state,
                    "old_confidence": prev.confidence if prev else None,
                    "new_confidence": st.confidence,
                }
            )
    dropped = [k for k in old if k not in set(keys)]
    if not dry_run:
        await store.replace_all_states(rows)
    return {
        "observations": total,
        "keys": len(rows),
        "changed": changed,
        "dropped": dropped,
        "dry_run": dry_run,
    }


def _open(settings: Settings) -> Store:
    if not settings.db_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return store_for(settings)


async def recompute_command(settings: Settings, *, dry_run: bool = False) -> int:
    store = _open(settings)
    await store.open()
    try:
        progress = Progress("recompute", await store.count_observations())
        report = await recompute(store, settings, dry_run=dry_run, progress=progress)
        progress.close()
    finally:
        await store.close()
    for ch in report["changed"]:
        print(f"{ch['identity_uuid']} {ch['primitive']}: {ch['old_state']} -> {ch['new_state']}")
    verb = "would change" if dry_run else "changed"
    print(
        f"recomputed {report['keys']} keys from {report['observations']} observations; "
        f"{len(report['changed'])} {verb}; {len(report['dropped'])} stale rows removed",
        file=sys.stderr,
    )
    return 0


def feed_series(engine: Engine, identity: str, primitive: str, series: list[Any]) -> None:
    """Merge stored ``(value_json, ts)`` rows of one key, in stored order."""
    if series:
        engine.ingest(
            [
                {
                    "identity_uuid": identity,
                    "primitive": primitive,
                    "value": orjson.loads(value),
                    "ts": ts,
                }
                for value, ts in series
            ]
        )


async def explain_state(
    store: Store, settings: Settings, attacker_uuid: str, primitive: str
) -> dict[str, Any] | None:
    """The explanation of an attacker's primitive from its stored window,
    or None when the attacker or the row does not exist."""
    attacker = await store.get_attacker(attacker_uuid)
    if attacker is None or attacker.identity_id is None:
        return None
    row = await store.get_state(attacker.identity_id, primitive)
    if row is None:
        return None
    engine = Engine(settings.make_thresholds(), max_value_bytes=settings.max_value_bytes)
    if row.window_json:
        errors = engine.import_windows([row.window_json])
        if errors:
            engine.clear()
    if row.window_seq is not None and (len(engine) or not row.window_json):
        # a lazily written window (or none yet): the stored observations past it
        after = row.window_seq if len(engine) else 0
        feed_series(
            engine,
            row.identity_uuid,
            primitive,
            await store.series_after(row.identity_uuid, primitive, after),
        )
    elif not len(engine):
        series = await store.recent_values(row.identity_uuid, primitive, 10**9)
        engine.ingest(
            [
                {
                    "identity_uuid": row.identity_uuid,
                    "primitive": primitive,
                    "value": o["value"],
                    "ts": o["ts"],
                }
                for o in series
            ]
        )
    ex = engine.explain(row.identity_uuid, primitive)
    if ex is None:
        return None
    ex["attacker_uuid"] = attacker_uuid
    ex["stored"] = {
        "state": row.state,
        "confidence": row.confidence,
        "observation_count": row.observation_count,
        "last_change_ts": row.last_change_ts,
        "last_observation_ts": row.last_observation_ts,
        "version": row.version,
    }
    ex["previous_state"] = row.previous_state
    ex["thresholds"] = engine.thresholds.to_dict()
    return ex


async def explain_command(settings: Settings, attacker_uuid: str, primitive: str) -> int:
    store = _open(settings)
    await store.open()
    try:
        ex = await explain_state(store, settings, attacker_uuid, primitive)
    finally:
        await store.close()
    if ex is None:
        print(
            f"decnet-attr: no attribution for attacker {attacker_uuid} primitive {primitive}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(ex, indent=2, ensure_ascii=False, default=str))
    return 0
