"""Shared helpers for the worker tests."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from decnet_attr.bus import Bus
from decnet_attr.registry import value_kind_for
from decnet_attr.store import Store
from decnet_attr.topics import attacker_observation
from tests import oracle

_counter = 0


def mk_obs(
    attacker: str, primitive: str, value: Any, ts: float, *, ip: str | None = None
) -> dict[str, Any]:
    """An observation event payload as DECNET's profiler publishes it (docs/decnet.md#observation-event)."""
    global _counter
    _counter += 1
    oid = f"o{_counter:08d}"
    out: dict[str, Any] = {
        "primitive": primitive,
        "value": value,
        "confidence": 1.0,
        "window": {"start_ts": ts, "end_ts": ts},
        "source": "tests",
        "evidence_ref": f"ev:{oid}",
        "identity_ref": None,
        "id": oid,
        "ts": ts,
        "v": 1,
        "attacker_uuid": attacker,
    }
    if ip:
        out["attacker_ip"] = ip
    return out


def own_hash(attacker: str, value: int) -> str:
    """A 64-bit hash value (16 hex digits) of one attacker: a 32-bit prefix
    of its own (CRC-32 of its name; two names' prefixes are within 3 bits of
    each other with odds of about 1 in 200,000), so test values never link
    attackers into one identity (the clusterer treats digraph SimHashes as
    fingerprints)."""
    return f"{zlib.crc32(attacker.encode()):08x}{value:08x}"


async def publish_all(bus: Bus, items: Iterable[dict[str, Any]], timeout: float = 10.0) -> None:
    """Durable publishes: each returns once the worker committed it."""
    await asyncio.gather(
        *(
            bus.publish_durable(
                attacker_observation(o["primitive"]), o, event_id=o["id"], timeout=timeout
            )
            for o in items
        )
    )


def oracle_states(obs: list[dict[str, Any]]) -> dict[tuple[str, str], oracle.OState]:
    """Expected state per (attacker, primitive) from the whole series sorted by
    ts (ties in publish order). Keys use "" for the identity (one per attacker)."""
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in obs:
        series.setdefault((o["attacker_uuid"], o["primitive"]), []).append(o)
    return {
        ("" if len({a for a, _ in series}) == 1 else a, p): oracle.aggregate(
            oracle.sort_series(s), value_kind_for(p)
        )
        for (a, p), s in series.items()
    }


class _Row:
    def __init__(
        self, current_value: Any, state: str, confidence: float, count: int, last_ts: float
    ) -> None:
        self.current_value = current_value
        self.state = state
        self.confidence = confidence
        self.observation_count = count
        self.last_observation_ts = last_ts


async def stored_states(store: Store, attackers: list[str]) -> dict[tuple[str, str], Any]:
    import json

    out: dict[tuple[str, str], Any] = {}
    for a in attackers:
        att = await store.get_attacker(a)
        if att is None or att.identity_id is None:
            continue
        for r in await store.attribution_for_identity(att.identity_id):
            key = ("" if len(attackers) == 1 else a, r.primitive)
            out[key] = _Row(
                json.loads(r.current_value_json),
                r.state,
                r.confidence,
                r.observation_count,
                r.last_observation_ts,
            )
    return out


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def query(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Raw read for assertions (test-only)."""
    if store.dialect == "sqlite":
        conn = store._r  # type: ignore[attr-defined]
        return [tuple(r) for r in await conn.execute_fetchall(sql)]
    pool = store._pool  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(sql)]


async def assert_runs_cover_rows(store: Store) -> None:
    """Every observation lies in exactly one run, its run names its
    attacker and identity (reads by attacker or identity find rows through
    the runs: schema v10 on SQLite, v13 on PostgreSQL), runs do not
    overlap, and each run counts its rows."""
    uncovered = await query(
        store,
        "SELECT seq, n FROM (SELECT o.seq, (SELECT count(*) FROM observation_runs r "
        "WHERE o.seq BETWEEN r.first_seq AND r.last_seq) AS n FROM observations o) AS c "
        "WHERE n <> 1",
    )
    assert uncovered == [], uncovered
    wrong = await query(
        store,
        "SELECT seq, attacker_uuid, run_attacker, identity_uuid, run_identity "
        "FROM observations_by_run "
        "WHERE attacker_uuid <> run_attacker OR identity_uuid IS DISTINCT FROM run_identity",
    )
    assert wrong == [], wrong
    overlapping = await query(
        store,
        "SELECT a.first_seq FROM observation_runs a JOIN observation_runs b "
        "ON b.first_seq > a.first_seq AND b.first_seq <= a.last_seq",
    )
    assert overlapping == [], overlapping
    miscounted = await query(
        store,
        "SELECT first_seq, n FROM observation_runs r WHERE n <> (SELECT count(*) "
        "FROM observations o WHERE o.seq BETWEEN r.first_seq AND r.last_seq)",
    )
    assert miscounted == [], miscounted
