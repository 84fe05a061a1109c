"""The store contract (``decnet_attr.store.base``), run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from decnet_attr.store import (
    DEAD_LETTER_MAX_BYTES,
    STATES,
    DeadLetter,
    Store,
    StoreError,
    TicketRow,
    UserRow,
)
from decnet_attr.store.schema import LATEST_VERSION
from tests.store.conftest import execute, fetch, obs, scalar, state

OpenAnother = Callable[[], Awaitable[Store]]


async def make_attacker(
    store: Store, uuid: str, ip: str | None = None, ts: float = 1000.0, *, identity: bool = True
) -> str | None:
    async with store.transaction() as tx:
        await tx.ensure_attackers([(uuid, ip, ts)])
        if not identity:
            return None
        mapping, _ = await tx.ensure_identities([uuid], ts)
    return mapping[uuid]


# ---- lifecycle and migrations ---------------------------------------------------------------


async def test_migrations_idempotent(store: Store, open_another: OpenAnother) -> None:
    assert await store.schema_version() == LATEST_VERSION
    assert await store.ping()
    await store.open()  # second open of the same instance: no-op
    other = await open_another()  # second "process": migrations already applied
    assert await other.schema_version() == LATEST_VERSION
    assert await scalar(store, "SELECT count(*) FROM schema_migrations") == LATEST_VERSION


async def test_concurrent_first_open_applies_once(store_url: str) -> None:
    from decnet_attr.store import open_store

    stores = [open_store(store_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        for s in stores:
            assert await s.schema_version() == LATEST_VERSION
        rows = await fetch(stores[0], "SELECT version FROM schema_migrations")
        assert sorted(r[0] for r in rows) == list(range(1, LATEST_VERSION + 1))
    finally:
        for s in stores:
            await s.close()


# ---- attackers ----------------------------------------------------------------------------


async def test_ensure_attackers_ip_conflict_and_widening(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.ensure_attackers([("a1", "10.0.0.1", 100.0)])
    async with store.transaction() as tx:
        await tx.ensure_attackers(
            [
                ("a2", "10.0.0.1", 150.0),  # ip taken by a1 -> registered without ip
                ("a1", "10.0.0.1", 50.0),  # widens first_seen
                ("a1", None, 300.0),  # widens last_seen
                ("b2", "10.0.0.2", 10.0),  # same ip twice in one batch
                ("b1", "10.0.0.2", 10.0),
            ]
        )
    a1 = await store.get_attacker("a1")
    assert a1 is not None
    assert (a1.ip, a1.first_seen, a1.last_seen, a1.identity_id) == ("10.0.0.1", 50.0, 300.0, None)
    a2 = await store.get_attacker("a2")
    assert a2 is not None and a2.ip is None and a2.first_seen == a2.last_seen == 150.0
    b1, b2 = await store.get_attacker("b1"), await store.get_attacker("b2")
    assert b1 is not None and b2 is not None
    assert {b1.ip, b2.ip} == {"10.0.0.2", None}
    assert b1.ip == "10.0.0.2"  # lock/insert order is by uuid
    assert await store.get_attacker("nope") is None
    # idempotent
    async with store.transaction() as tx:
        await tx.ensure_attackers([("a1", "10.0.0.1", 200.0)])
    again = await store.get_attacker("a1")
    assert again == a1


async def test_register_attacker_idempotent_by_ip(store: Store) -> None:
    row, created = await store.register_attacker("192.0.2.1", None, 10.0)
    assert created
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", row.uuid)
    assert (row.ip, row.first_seen, row.last_seen) == ("192.0.2.1", 10.0, 10.0)
    again, created2 = await store.register_attacker("192.0.2.1", None, 20.0)
    assert not created2 and again == row
    # a given uuid is used for a new ip; the same ip with another uuid returns the owner
    row2, created3 = await store.register_attacker("192.0.2.2", "fixed-uuid", 30.0)
    assert created3 and row2.uuid == "fixed-uuid"
    owner, created4 = await store.register_attacker("192.0.2.2", "other-uuid", 31.0)
    assert not created4 and owner.uuid == "fixed-uuid"
    # a uuid already bound to another ip
    with pytest.raises(StoreError):
        await store.register_attacker("192.0.2.3", "fixed-uuid", 40.0)
    assert await store.get_attacker("fixed-uuid") == row2
    # an attacker known without ip (bus) adopts the ip
    async with store.transaction() as tx:
        await tx.ensure_attackers([("no-ip", None, 5.0)])
    adopted, created5 = await store.register_attacker("192.0.2.9", "no-ip", 50.0)
    assert not created5 and adopted.uuid == "no-ip" and adopted.ip == "192.0.2.9"
    assert await store.get_attacker("no-ip") == adopted


async def test_register_attacker_concurrent_same_ip(
    store: Store, open_another: OpenAnother
) -> None:
    others = [store, await open_another(), await open_another()]
    results = await asyncio.gather(
        *(others[i % 3].register_attacker("198.51.100.7", None, float(i)) for i in range(12))
    )
    assert sum(created for _, created in results) == 1
    assert len({row.uuid for row, _ in results}) == 1
    assert await scalar(store, "SELECT count(*) FROM attackers") == 1


async def test_attackers_of_identity(store: Store) -> None:
    ident = await make_attacker(store, "b", "1.1.1.1")
    assert ident is not None
    await make_attacker(store, "a", "1.1.1.2", identity=False)
    assert await store.attackers_of_identity(ident) == ["b"]
    assert await store.attackers_of_identity("unknown") == []


# ---- identities (compare-and-set) ---------------------------------------------------------


async def test_ensure_identities_stub_rule(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.ensure_attackers([("a1", "1.2.3.4", 100.0), ("a1", None, 200.0)])
        await tx.ensure_attackers([("a2", None, 50.0)])
        mapping, formed = await tx.ensure_identities(["a1", "a2", "ghost", "a1"], 999.0)
    assert set(mapping) == {"a1", "a2"}  # unknown attackers left out
    assert sorted(formed) == sorted(mapping.values())
    for ident in formed:
        assert re.fullmatch(r"[0-9a-f]{32}", ident)
    rows = await fetch(
        store,
        "SELECT uuid, schema_version, first_seen_at, last_seen_at, created_at, updated_at, "
        "observation_count, merged_into_uuid FROM attacker_identities WHERE uuid = ?",
        mapping["a1"],
    )
    assert rows == [(mapping["a1"], 1, 100.0, 200.0, 999.0, 999.0, 1, None)]
    a1 = await store.get_attacker("a1")
    assert a1 is not None and a1.identity_id == mapping["a1"]
    # second call: same identities, nothing formed
    async with store.transaction() as tx:
        mapping2, formed2 = await tx.ensure_identities(["a1", "a2"], 1000.0)
    assert mapping2 == mapping and formed2 == []
    assert await scalar(store, "SELECT count(*) FROM attacker_identities") == 2


async def test_ensure_identities_concurrent_one_winner(
    store: Store, open_another: OpenAnother
) -> None:
    await make_attacker(store, "victim", "203.0.113.5", identity=False)
    stores = [store] + [await open_another() for _ in range(5)]

    async def worker(st: Store) -> tuple[dict[str, str], list[str]]:
        async with st.transaction() as tx:
            result = await tx.ensure_identities(["victim"], 500.0)
            await asyncio.sleep(0.02)  # hold the transaction open: overlap the others
            return result

    results = await asyncio.gather(*(worker(st) for st in stores))
    idents = {m["victim"] for m, _ in results}
    assert len(idents) == 1
    assert sum(len(f) for _, f in results) == 1
    (ident,) = idents
    attacker = await store.get_attacker("victim")
    assert attacker is not None and attacker.identity_id == ident
    # no dangling identity rows
    assert await fetch(store, "SELECT uuid FROM attacker_identities") == [(ident,)]


async def test_ensure_identities_cas_loser_uses_winner(
    store: Store, open_another: OpenAnother
) -> None:
    """Deterministic interleaving: tx1 forms the identity, tx2 starts before tx1
    commits (it waits for the lock) and must come back with tx1's identity."""
    await make_attacker(store, "x", None, identity=False)
    other = await open_another()
    cm1 = store.transaction()
    tx1 = await cm1.__aenter__()
    try:
        m1, f1 = await tx1.ensure_identities(["x"], 1.0)

        async def second() -> tuple[dict[str, str], list[str]]:
            async with other.transaction() as tx2:
                return await tx2.ensure_identities(["x"], 2.0)

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0.2)
        assert not task.done()  # blocked behind tx1
    except BaseException as exc:
        await cm1.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await cm1.__aexit__(None, None, None)
    m2, f2 = await task
    assert f1 == [m1["x"]] and m2 == m1 and f2 == []
    assert await scalar(store, "SELECT count(*) FROM attacker_identities") == 1


# ---- observations -------------------------------------------------------------------------


async def test_insert_observations_dedupe(store: Store) -> None:
    await make_attacker(store, "a")
    batch = [
        obs("o1", "a", evidence="e1"),
        obs("o2", "a", evidence="e2"),
        obs("o1", "a", evidence="e3"),  # duplicate id within the batch
        obs("o3", "a", evidence="e1"),  # duplicate (evidence, primitive) within the batch
        obs("o4", "a", "motor.digraph_simhash", "abc", evidence="e1"),  # other primitive: ok
        obs("o2", "a", evidence="e2"),  # exact duplicate
    ]
    async with store.transaction() as tx:
        assert await tx.insert_observations(batch) == [0, 1, 4]
    batch2 = [
        obs("o1", "a", evidence="zz"),  # id exists
        obs("o5", "a", evidence="e2"),  # evidence exists
        obs("o6", "a", evidence="e1"),  # evidence exists -> skipped ...
        obs("o6", "a", evidence="e6"),  # ... so this copy of o6 gets in
        obs("o7", "a", evidence="e7"),
    ]
    async with store.transaction() as tx:
        assert await tx.insert_observations(batch2) == [3, 4]
        assert await tx.insert_observations([]) == []
    rows = await fetch(store, "SELECT id, evidence_ref, seq FROM observations ORDER BY seq")
    assert [(r[0], r[1]) for r in rows] == [
        ("o1", "e1"),
        ("o2", "e2"),
        ("o4", "e1"),
        ("o6", "e6"),
        ("o7", "e7"),
    ]
    seqs = [r[2] for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert await store.count_observations() == 5


async def test_insert_observations_columns_roundtrip(store: Store) -> None:
    ident = await make_attacker(store, "a")
    row = obs(
        "full",
        "a",
        "toolchain.ssh.kex_algorithm_order",
        ["curve25519", {"k": [1, 2.5, None]}],
        1234.5,
        evidence="ev",
        confidence=0.75,
        window_start_ts=1200.0,
        window_end_ts=1230.0,
        source="sensor-1",
        identity_ref="ref",
        envelope_v=2,
        identity_uuid=ident,
        merged=False,
    )
    async with store.transaction() as tx:
        assert await tx.insert_observations([row]) == [0]
    (got,) = await store.pending_observations(after_seq=0, limit=10)
    assert got.seq is not None
    assert got == dataclasses.replace(row, seq=got.seq)
    assert json.loads(got.value_json) == ["curve25519", {"k": [1, 2.5, None]}]


async def test_insert_observation_unknown_attacker_is_store_error(store: Store) -> None:
    with pytest.raises(StoreError):
        async with store.transaction() as tx:
            await tx.insert_observations([obs("o1", "missing")])
    assert await store.count_observations() == 0


async def test_seq_is_monotonic_across_batches(store: Store) -> None:
    await make_attacker(store, "a")
    for b in range(3):
        async with store.transaction() as tx:
            rows = [obs(f"b{b}-{i}", "a", ts=float(100 - i)) for i in range(50)]
            assert await tx.insert_observations(rows) == list(range(50))
    rows = await fetch(store, "SELECT id FROM observations ORDER BY seq")
    assert [r[0] for r in rows] == [f"b{b}-{i}" for b in range(3) for i in range(50)]


async def test_latest_observations_tie_break_by_seq(store: Store) -> None:
    await make_attacker(store, "a")
    await make_attacker(store, "other", "9.9.9.9")
    async with store.transaction() as tx:
        await tx.insert_observations(
            [
                obs("1", "a", "p.b", "old", 10.0, source="s1", confidence=0.1),
                obs("2", "a", "p.b", {"new": [1]}, 20.0, source="s2", confidence=0.2),
                obs("3", "a", "p.b", "tie-first", 20.0, source="s3", confidence=0.3),
                obs("4", "a", "p.a", 42, 5.0),
                obs("5", "a", "p.a", 41, 4.0),
                obs("6", "other", "p.a", 99, 50.0),
            ]
        )
    async with store.transaction() as tx:  # later seq, same ts: wins the tie
        await tx.insert_observations([obs("7", "a", "p.b", ["tie", "last"], 20.0, source="s4")])
    assert await store.latest_observations("a") == [
        {"primitive": "p.a", "value": 42, "confidence": None, "ts": 5.0, "source": None},
        {
            "primitive": "p.b",
            "value": ["tie", "last"],
            "confidence": None,
            "ts": 20.0,
            "source": "s4",
        },
    ]
    assert await store.latest_observations("nobody") == []


async def test_recent_values_order(store: Store) -> None:
    await make_attacker(store, "a")
    await make_attacker(store, "b", "2.2.2.2")
    rows = [
        obs("1", "a", "p", "v1", 10.0, identity_uuid="I", confidence=0.5),
        obs("2", "b", "p", "v2", 30.0, identity_uuid="I"),
        obs("3", "a", "p", "v3", 20.0, identity_uuid="I"),
        obs("4", "a", "p", "v4", 30.0, identity_uuid="I"),  # tie on ts: after "2" by seq
        obs("5", "a", "q", "other primitive", 40.0, identity_uuid="I"),
        obs("6", "a", "p", "other identity", 50.0, identity_uuid="J"),
    ]
    async with store.transaction() as tx:
        await tx.insert_observations(rows)
    got = await store.recent_values("I", "p", 3)
    assert got == [
        {"ts": 20.0, "value": "v3", "confidence": None, "attacker_uuid": "a"},
        {"ts": 30.0, "value": "v2", "confidence": None, "attacker_uuid": "b"},
        {"ts": 30.0, "value": "v4", "confidence": None, "attacker_uuid": "a"},
    ]
    full = await store.recent_values("I", "p", 100)
    assert [g["value"] for g in full] == ["v1", "v3", "v2", "v4"]
    assert full[0]["confidence"] == 0.5
    assert await store.recent_values("I", "nope", 5) == []


async def test_iter_observations_order(store: Store) -> None:
    i_a = await make_attacker(store, "a")
    i_b = await make_attacker(store, "b", "2.2.2.2")
    await make_attacker(store, "c", "3.3.3.3", identity=False)
    async with store.transaction() as tx:
        await tx.insert_observations(
            [
                obs("1", "a", ts=30.0),
                obs("2", "b", ts=10.0, merged=False),
                obs("3", "c", ts=5.0),  # attacker without identity: skipped
                obs("4", "a", ts=10.0),  # ties with "2": seq order
                obs("5", "b", ts=20.0, identity_uuid="stale"),
            ]
        )
    batches = [b async for b in store.iter_observations(batch_size=2)]
    assert [len(b) for b in batches] == [2, 2]
    flat = [o for b in batches for o in b]
    assert [o.id for o in flat] == ["2", "4", "5", "1"]
    idents = {"a": i_a, "b": i_b}
    assert [o.identity_uuid for o in flat] == [idents[o.attacker_uuid] for o in flat]
    assert [o.merged for o in flat] == [False, True, True, True]
    assert all(o.seq is not None for o in flat)


async def test_iter_observations_empty(store: Store) -> None:
    assert [b async for b in store.iter_observations()] == []


async def test_pending_and_mark_merged(store: Store) -> None:
    ident = await make_attacker(store, "a")
    assert ident is not None
    async with store.transaction() as tx:
        await tx.insert_observations(
            [
                obs("m1", "a", merged=False),
                obs("m2", "a", merged=True),
                obs("m3", "a", merged=False),
                obs("m4", "a", merged=False, identity_uuid="pre"),
            ]
        )
    pending = await store.pending_observations(after_seq=0, limit=10)
    assert [p.id for p in pending] == ["m1", "m3", "m4"]
    assert all(not p.merged for p in pending)
    seqs = [p.seq for p in pending if p.seq is not None]
    page = await store.pending_observations(after_seq=seqs[0], limit=1)
    assert [p.id for p in page] == ["m3"]
    async with store.transaction() as tx:
        await tx.mark_merged([seqs[0], seqs[2]], {seqs[0]: ident})
        await tx.mark_merged([], {})
    left = await store.pending_observations(after_seq=0, limit=10)
    assert [p.id for p in left] == ["m3"]
    rows = await fetch(
        store, "SELECT id, identity_uuid FROM observations WHERE id IN ('m1', 'm4') ORDER BY id"
    )
    assert rows == [("m1", ident), ("m4", "pre")]  # no identity given: kept as is


# ---- attribution state --------------------------------------------------------------------


async def test_states_upsert_load_and_order(store: Store) -> None:
    ident = await make_attacker(store, "a")
    assert ident is not None
    rows = [
        state(ident, "temporal.weekend_cadence", "drifting", window_json='{"w":1}', kind="hash"),
        state(ident, "motor.input_modality", "stable"),
        state(ident, "cognitive.feedback_loop_engagement", "unknown", value=None),
    ]
    async with store.transaction() as tx:
        assert await tx.load_states([(ident, "motor.input_modality")]) == {}
        await tx.upsert_states(rows)
        loaded = await tx.load_states(
            [(ident, "motor.input_modality"), (ident, "missing"), (ident, "motor.input_modality")],
            lock=True,
        )
    assert loaded == {(ident, "motor.input_modality"): rows[1]}
    got = await store.attribution_for_identity(ident)
    assert [r.primitive for r in got] == [
        "cognitive.feedback_loop_engagement",
        "motor.input_modality",
        "temporal.weekend_cadence",
    ]
    assert got[2] == rows[0]
    assert got[0].current_value_json == "null"
    # upsert replaces every column; the last row of a key in one batch wins
    newer = state(
        ident,
        "motor.input_modality",
        "conflicted",
        value={"a": 1},
        version=2,
        confidence=0.4,
        observation_count=9,
        last_change_ts=111.0,
        last_observation_ts=222.0,
        updated_at=333.0,
        kind="numeric",
        window_json="[1,2]",
    )
    async with store.transaction() as tx:
        await tx.upsert_states([state(ident, "motor.input_modality", "drifting"), newer])
        assert await tx.load_states([(ident, "motor.input_modality")], lock=True) == {
            (ident, "motor.input_modality"): newer
        }
    assert await store.get_state(ident, "motor.input_modality") == newer
    assert await store.get_state(ident, "nope") is None
    assert await store.attribution_for_identity("nobody") == []


async def test_state_for_unknown_identity_is_store_error(store: Store) -> None:
    with pytest.raises(StoreError):
        async with store.transaction() as tx:
            await tx.upsert_states([state("no-such-identity", "p")])


async def test_multi_actor_queries_and_signatures(store: Store) -> None:
    i1 = await make_attacker(store, "a1", "1.1.1.1")
    i2 = await make_attacker(store, "a2", "1.1.1.2")
    i3 = await make_attacker(store, "a3", "1.1.1.3")
    assert i1 and i2 and i3
    async with store.transaction() as tx:
        await tx.upsert_states(
            [
                state(i1, "p.c", "multi_actor"),
                state(i1, "p.a", "multi_actor"),
                state(i1, "p.b", "stable"),
                state(i2, "p.a", "multi_actor"),
                state(i3, "p.z", "stable"),
            ]
        )
        assert await tx.multi_actor_primitives([i1, i2, i3, "ghost"]) == {
            i1: ["p.a", "p.c"],
            i2: ["p.a"],
        }
        assert await tx.multi_actor_primitives([]) == {}
        assert await tx.multi_actor_signatures([i1, i2]) == {}
        await tx.set_multi_actor_signature(i1, ["p.c", "p.a"], 10.0)
        await tx.set_multi_actor_signature(i2, ["p.a", "p.b"], 11.0)
        assert await tx.multi_actor_signatures([i1, i2, i3], lock=True) == {
            i1: ["p.a", "p.c"],
            i2: ["p.a", "p.b"],
        }
        await tx.set_multi_actor_signature(i1, ["p.a", "p.c", "p.d"], 12.0)
        await tx.set_multi_actor_signature(i2, None, 13.0)
        await tx.set_multi_actor_signature(i3, None, 13.0)  # absent: no-op
    async with store.transaction() as tx:
        assert await tx.multi_actor_signatures([i1, i2]) == {i1: ["p.a", "p.c", "p.d"]}
    ids = await store.multi_actor_identities(2)
    assert ids == {i1: ["p.a", "p.c"]}
    ones = await store.multi_actor_identities(1)
    assert list(ones) == sorted([i1, i2])
    assert await scalar(store, "SELECT fired_at FROM multi_actor_log") == 12.0


async def test_replace_all_states(store: Store) -> None:
    i1 = await make_attacker(store, "a1", "1.1.1.1")
    i2 = await make_attacker(store, "a2", "1.1.1.2")
    assert i1 and i2
    async with store.transaction() as tx:
        await tx.upsert_states([state(i1, "old.one"), state(i1, "old.two")])
        await tx.set_multi_actor_signature(i1, ["x", "y"], 1.0)
    fresh = [state(i2, "new.b", "drifting"), state(i1, "new.a", "multi_actor", version=7)]
    await store.replace_all_states(fresh)
    assert await store.attribution_for_identity(i1) == [fresh[1]]
    assert await store.attribution_for_identity(i2) == [fresh[0]]
    assert await scalar(store, "SELECT count(*) FROM multi_actor_log") == 0
    # a failing replacement leaves the table as it was
    with pytest.raises(StoreError):
        await store.replace_all_states([state(i1, "newer"), state("ghost", "x")])
    assert await store.attribution_for_identity(i1) == [fresh[1]]
    await store.replace_all_states([])
    assert await scalar(store, "SELECT count(*) FROM attribution_state") == 0


# ---- the dashboard list -------------------------------------------------------------------


async def test_list_attackers_counts_and_paging(store: Store) -> None:
    # a..e with last_seen 10..50; d has no identity; e has no ip
    ident = await make_attacker(store, "a", "10.0.0.4", 10.0)
    assert ident is not None
    async with store.transaction() as tx:
        await tx.ensure_attackers(
            [("b", "10.0.0.3", 20.0), ("c", "10.0.0.2", 30.0), ("d", "10.0.0.1", 40.0)]
        )
        await tx.ensure_attackers([("e", None, 50.0)])
        ic = (await tx.ensure_identities(["c"], 1.0))[0]["c"]
        ie = (await tx.ensure_identities(["e"], 1.0))[0]["e"]
    await store.close()
    await store.open()  # reads see committed data from a reopened store too
    # b is linked to a's identity (as the clusterer does): counts are per identity
    await execute(store, "UPDATE attackers SET identity_id = ? WHERE uuid = 'b'", ident)
    async with store.transaction() as tx:
        await tx.upsert_states(
            [
                state(ident, "p1", "multi_actor"),
                state(ident, "p2", "multi_actor"),
                state(ident, "p3", "stable"),
                state(ident, "p4", "unknown"),
                state(ic, "p1", "multi_actor"),
                state(ic, "p2", "conflicted"),
                state(ie, "p1", "drifting"),
            ]
        )
        await tx.insert_observations(
            [obs(f"a{i}", "a") for i in range(3)] + [obs("c1", "c"), obs("d1", "d")]
        )
    page, total = await store.list_attackers(limit=2, offset=0)
    assert total == 5
    assert [s.attacker.uuid for s in page] == ["e", "d"]
    e, d = page
    assert e.state_counts == {st: (1 if st == "drifting" else 0) for st in STATES}
    assert list(e.state_counts) == list(STATES)
    assert (e.multi_actor, e.observation_count) == (False, 0)
    assert d.state_counts == dict.fromkeys(STATES, 0)
    assert (d.multi_actor, d.observation_count, d.attacker.identity_id) == (False, 1, None)
    page2, total2 = await store.list_attackers(limit=2, offset=2)
    assert total2 == 5 and [s.attacker.uuid for s in page2] == ["c", "b"]
    c, b = page2
    assert c.multi_actor is False  # only one multi_actor primitive
    assert c.state_counts["multi_actor"] == 1 and c.state_counts["conflicted"] == 1
    assert c.observation_count == 1
    assert b.attacker.identity_id == ident and b.multi_actor is True
    assert b.state_counts["multi_actor"] == 2 and b.observation_count == 0
    page3, _ = await store.list_attackers(limit=10, offset=4)
    (a,) = page3
    assert a.attacker.uuid == "a" and a.multi_actor is True and a.observation_count == 3
    assert a.state_counts == {
        "unknown": 1,
        "stable": 1,
        "drifting": 0,
        "conflicted": 0,
        "multi_actor": 2,
    }
    empty, total3 = await store.list_attackers(limit=10, offset=10)
    assert empty == [] and total3 == 5
    asc, _ = await store.list_attackers(limit=10, offset=0, sort="last_seen", descending=False)
    assert [s.attacker.uuid for s in asc] == ["a", "b", "c", "d", "e"]
    by_ip, _ = await store.list_attackers(limit=10, offset=0, sort="ip", descending=False)
    assert [s.attacker.uuid for s in by_ip] == ["d", "c", "b", "a", "e"]  # NULL ip last
    by_ip_desc, _ = await store.list_attackers(limit=10, offset=0, sort="ip")
    assert [s.attacker.uuid for s in by_ip_desc] == ["a", "b", "c", "d", "e"]
    by_first, _ = await store.list_attackers(limit=1, offset=0, sort="first_seen")
    assert [s.attacker.uuid for s in by_first] == ["e"]
    with pytest.raises(ValueError):
        await store.list_attackers(limit=1, offset=0, sort="uuid; DROP TABLE attackers")


async def test_list_attackers_empty(store: Store) -> None:
    assert await store.list_attackers(limit=10, offset=0) == ([], 0)
    assert await store.attacker_evidence([]) == {}
    assert await store.attacker_evidence(["nobody"]) == {}


async def test_list_attackers_filters_and_evidence(store: Store) -> None:
    """DECNET's list query: ``search`` (ip or uuid substring, LIKE wildcards taken
    literally), ``service`` (a shard of that service), ``uuid``, and the
    ``events`` sort; ``attacker_evidence`` gives each attacker's shard refs."""
    async with store.transaction() as tx:
        await tx.ensure_attackers(
            [
                ("Att-one", "10.0.0.1", 10.0),
                ("att-two", "10.0.1.2", 20.0),
                ("att-three", "2001:db8::1", 30.0),
                ("att_four", None, 40.0),
            ]
        )
        await tx.insert_observations(
            [
                obs("o1", "Att-one", evidence="shard:decky-1/ssh/a.jsonl#s1"),
                obs("o2", "Att-one", "motor.x", evidence="shard:decky-1/ssh/a.jsonl#s1"),
                obs("o3", "Att-one", evidence="shard:decky-2/telnet/b.jsonl#s2"),
                obs("o4", "att-two", evidence="shard:decky-1/ssh_x/c.jsonl#s3"),
                obs("o5", "att-two", evidence="not-a-shard"),
                obs("o6", "att-three", evidence="shard:decky-9/http/d.jsonl#s4"),
            ]
        )

    async def uuids(**kw: Any) -> tuple[list[str], int]:
        page, total = await store.list_attackers(limit=10, offset=0, **kw)
        return [s.attacker.uuid for s in page], total

    assert await uuids(search="10.0.") == (["att-two", "Att-one"], 2)
    assert await uuids(search="DB8") == (["att-three"], 1)  # case-insensitive
    assert await uuids(search="att-o") == (["Att-one"], 1)  # the uuid, case-insensitive
    assert await uuids(search="_") == (["att_four"], 1)  # a literal underscore
    assert await uuids(search="%") == ([], 0)
    assert await uuids(service="ssh") == (["Att-one"], 1)  # not ssh_x
    assert await uuids(service="ssh_x") == (["att-two"], 1)
    assert await uuids(service="ssh%") == ([], 0)
    assert await uuids(service="telnet", search="10.0.0") == (["Att-one"], 1)
    assert await uuids(service="telnet", search="10.0.1") == ([], 0)
    assert await uuids(uuid="att-two") == (["att-two"], 1)
    assert await uuids(uuid="att") == ([], 0)
    assert await uuids(sort="events") == (["Att-one", "att-two", "att-three", "att_four"], 4)
    assert await uuids(sort="events", descending=False) == (
        ["att_four", "att-three", "att-two", "Att-one"],
        4,
    )
    page, total = await store.list_attackers(limit=1, offset=1, sort="events", service="ssh")
    assert (page, total) == ([], 1)
    assert await store.attacker_evidence(["Att-one", "att-two", "att_four", "ghost"]) == {
        "Att-one": ["shard:decky-1/ssh/a.jsonl#s1", "shard:decky-2/telnet/b.jsonl#s2"],
        "att-two": ["shard:decky-1/ssh_x/c.jsonl#s3"],
    }


# ---- dead letters -------------------------------------------------------------------------


async def test_dead_letters_truncation(store: Store) -> None:
    big = "x" * (DEAD_LETTER_MAX_BYTES + 5000)
    multibyte = "é" * DEAD_LETTER_MAX_BYTES  # 2 bytes each: cut on a character boundary
    async with store.transaction() as tx:
        await tx.insert_dead_letters(
            [
                DeadLetter(topic="t.a", reason="bad json", payload_json=big, event_id="e1"),
                DeadLetter(topic="t.b", reason="r", payload_json=multibyte, received_at=5.0),
                DeadLetter(topic="t.c", reason="r", payload_json='{"ok":true}'),
            ]
        )
        await tx.insert_dead_letters([])
    assert await store.dead_letter_count() == 3
    rows = await fetch(
        store, "SELECT topic, event_id, reason, payload, received_at FROM dead_letters ORDER BY seq"
    )
    assert rows[0][:3] == ("t.a", "e1", "bad json")
    assert rows[0][3] == "x" * DEAD_LETTER_MAX_BYTES
    assert rows[1][3] == "é" * (DEAD_LETTER_MAX_BYTES // 2) and rows[1][4] == 5.0
    assert rows[2][3] == '{"ok":true}' and rows[2][4] > 1_600_000_000


# ---- users and auth -----------------------------------------------------------------------


async def test_users_crud(store: Store) -> None:
    assert await store.count_users() == 0
    admin = UserRow(
        uuid="u1",
        username="admin",
        password_hash="h1",
        role="admin",
        must_change_password=True,
        created_at=10.0,
        updated_at=10.0,
    )
    viewer = UserRow(uuid="u2", username="bob", password_hash="h2", role="viewer")
    await store.create_user(admin)
    await store.create_user(viewer)
    assert await store.get_user("u1") == admin
    got = await store.get_user_by_name("bob")
    assert got is not None and got.uuid == "u2" and got.created_at > 0
    assert got.must_change_password is False and got.disabled is False
    assert [u.username for u in await store.list_users()] == ["admin", "bob"]
    assert await store.count_users() == 2
    with pytest.raises(StoreError, match="exists"):
        await store.create_user(UserRow(uuid="u3", username="admin", password_hash="x", role="a"))
    with pytest.raises(StoreError):
        await store.create_user(UserRow(uuid="u1", username="carol", password_hash="x", role="a"))
    await store.update_user(
        "u1", password_hash="h9", must_change_password=False, disabled=True, tokens_valid_from=55.5
    )
    u1 = await store.get_user("u1")
    assert u1 is not None
    assert (u1.password_hash, u1.must_change_password, u1.disabled, u1.tokens_valid_from) == (
        "h9",
        False,
        True,
        55.5,
    )
    assert u1.updated_at > 10.0 and u1.created_at == 10.0
    await store.update_user("u2", role="admin", updated_at=77.0)
    u2 = await store.get_user("u2")
    assert u2 is not None and u2.role == "admin" and u2.updated_at == 77.0
    with pytest.raises(ValueError):
        await store.update_user("u1", username="hacker")
    await store.update_user("ghost", role="viewer")  # unknown uuid: nothing happens
    assert await store.get_user("ghost") is None
    assert await store.get_user_by_name("ghost") is None
    assert await store.count_users() == 2


async def test_revoked_tokens(store: Store) -> None:
    assert not await store.is_token_revoked("j1")
    await store.revoke_token("j1", 100.0)
    await store.revoke_token("j1", 50.0)  # idempotent, keeps the later expiry
    await store.revoke_token("j2", 200.0)
    assert await store.is_token_revoked("j1") and await store.is_token_revoked("j2")
    await store.purge_expired(150.0)
    assert not await store.is_token_revoked("j1")
    assert await store.is_token_revoked("j2")


def ticket(h: str, user: str = "u1", expires: float = 100.0) -> TicketRow:
    return TicketRow(ticket_hash=h, user_uuid=user, role="viewer", expires_at=expires)


async def test_tickets_max_outstanding_and_expiry(store: Store) -> None:
    assert await store.add_ticket(ticket("t1"), max_outstanding=2, now=10.0)
    assert await store.add_ticket(ticket("t2", expires=20.0), max_outstanding=2, now=10.0)
    assert not await store.add_ticket(ticket("t3"), max_outstanding=2, now=10.0)
    assert await store.add_ticket(ticket("o1", user="u2"), max_outstanding=2, now=10.0)
    # t2 expired by now=30: swept, so there is room again
    assert await store.add_ticket(ticket("t4"), max_outstanding=2, now=30.0)
    assert await store.redeem_ticket("t2", 30.0) is None  # swept
    t1 = await store.redeem_ticket("t1", 30.0)
    assert t1 is not None and (t1.ticket_hash, t1.user_uuid, t1.role, t1.expires_at) == (
        "t1",
        "u1",
        "viewer",
        100.0,
    )
    assert t1.created_at == 10.0
    assert await store.redeem_ticket("t1", 30.0) is None  # single use
    # an expired ticket is deleted and not returned
    assert await store.redeem_ticket("t4", 100.0) is None
    assert await store.redeem_ticket("t4", 50.0) is None
    assert await store.redeem_ticket("never", 1.0) is None
    await store.purge_expired(1000.0)
    assert await scalar(store, "SELECT count(*) FROM sse_tickets") == 0


async def test_ticket_single_use_under_concurrent_redeem(
    store: Store, open_another: OpenAnother
) -> None:
    stores = [store, await open_another(), await open_another()]
    for n in range(5):
        assert await store.add_ticket(ticket(f"c{n}"), max_outstanding=10, now=1.0)
        results = await asyncio.gather(
            *(stores[i % 3].redeem_ticket(f"c{n}", 2.0) for i in range(9))
        )
        assert sum(r is not None for r in results) == 1


async def test_ticket_cap_under_concurrent_add(store: Store, open_another: OpenAnother) -> None:
    stores = [store, await open_another(), await open_another()]
    results = await asyncio.gather(
        *(stores[i % 3].add_ticket(ticket(f"k{i}"), max_outstanding=3, now=1.0) for i in range(12))
    )
    assert sum(results) == 3
    assert await scalar(store, "SELECT count(*) FROM sse_tickets") == 3


# ---- transactions -------------------------------------------------------------------------


class Boom(Exception):
    pass


async def test_rollback_on_exception_leaves_nothing(store: Store) -> None:
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.ensure_attackers([("r1", "5.5.5.5", 1.0)])
            mapping, _ = await tx.ensure_identities(["r1"], 1.0)
            await tx.insert_observations([obs("ro1", "r1")])
            await tx.upsert_states([state(mapping["r1"], "p")])
            await tx.set_multi_actor_signature(mapping["r1"], ["a", "b"], 1.0)
            await tx.insert_dead_letters([DeadLetter(topic="t", reason="r", payload_json="{}")])
            raise Boom
    for table in (
        "attackers",
        "attacker_identities",
        "observations",
        "attribution_state",
        "multi_actor_log",
        "dead_letters",
    ):
        assert await scalar(store, f"SELECT count(*) FROM {table}") == 0, table
    # the store is usable afterwards, and a finished Tx refuses work
    async with store.transaction() as tx:
        await tx.ensure_attackers([("r1", "5.5.5.5", 1.0)])
    with pytest.raises(StoreError):
        await tx.ensure_attackers([("r2", None, 1.0)])
    assert await store.get_attacker("r1") is not None
    assert await store.get_attacker("r2") is None


async def test_store_error_inside_transaction_rolls_back(store: Store) -> None:
    with pytest.raises(StoreError):
        async with store.transaction() as tx:
            await tx.ensure_attackers([("ok", None, 1.0)])
            await tx.insert_observations([obs("x", "no-such-attacker")])
    assert await store.get_attacker("ok") is None
    async with store.transaction() as tx:  # the connection is clean again
        await tx.ensure_attackers([("ok", None, 1.0)])
    assert await store.get_attacker("ok") is not None


async def test_concurrent_transactions_one_store(store: Store) -> None:
    """Many coroutines sharing one store: transactions serialise or pool cleanly."""

    async def work(n: int) -> list[int]:
        async with store.transaction() as tx:
            await tx.ensure_attackers([(f"w{n % 3}", None, float(n))])
            await tx.ensure_identities([f"w{n % 3}"], 1.0)
            return await tx.insert_observations([obs(f"w-{n}", f"w{n % 3}")])

    results = await asyncio.gather(*(work(n) for n in range(20)))
    assert results == [[0]] * 20
    assert await store.count_observations() == 20
    assert await scalar(store, "SELECT count(*) FROM attacker_identities") == 3


async def test_overview_counts(store: Store) -> None:
    empty = await store.overview_counts()
    assert empty == {"attackers": 0, "identities": 0, "states": dict.fromkeys(STATES, 0)}
    ia = await make_attacker(store, "a", "10.0.0.1")
    ib = await make_attacker(store, "b", "10.0.0.2")
    await make_attacker(store, "c", "10.0.0.3", identity=False)
    assert ia is not None and ib is not None
    async with store.transaction() as tx:
        await tx.upsert_states(
            [
                state(ia, "p1", "multi_actor"),
                state(ia, "p2", "multi_actor"),
                state(ia, "p3", "stable"),
                state(ib, "p1", "drifting"),
            ]
        )
    # a merged identity is not counted
    await execute(
        store, "UPDATE attacker_identities SET merged_into_uuid = ? WHERE uuid = ?", ia, ib
    )
    counts = await store.overview_counts()
    assert counts == {
        "attackers": 3,
        "identities": 1,
        "states": {"stable": 1, "drifting": 1, "conflicted": 0, "multi_actor": 2, "unknown": 0},
    }


async def test_reads_by_attacker_and_identity_after_interleaved_inserts(store: Store) -> None:
    """Attackers' observations interleaved in one insert: each attacker's
    and each identity's reads find exactly theirs (through runs of
    consecutive seqs: schema v10 on SQLite, v13 on PostgreSQL)."""
    from tests.worker.helpers import assert_runs_cover_rows

    ia, ib = await make_attacker(store, "a"), await make_attacker(store, "b")
    assert ia is not None and ib is not None
    order = ["a", "b", "a", "a", "b", "a"]
    rows = [
        obs(f"o{i}", who, value=f"v{i}", ts=1000.0 + i, identity_uuid={"a": ia, "b": ib}[who])
        for i, who in enumerate(order)
    ]
    async with store.transaction() as tx:
        assert await tx.insert_observations(rows) == list(range(len(rows)))
    await assert_runs_cover_rows(store)
    prim = "motor.input_modality"
    assert [v["value"] for v in await store.recent_values(ia, prim, 10)] == ["v0", "v2", "v3", "v5"]
    assert [v["value"] for v in await store.recent_values(ib, prim, 10)] == ["v1", "v4"]
    assert [o["value"] for o in await store.latest_observations("b")] == ["v4"]
    summaries, _ = await store.list_attackers(limit=10, offset=0, sort="events")
    assert [(s.attacker.uuid, s.observation_count) for s in summaries] == [("a", 4), ("b", 2)]
    # the identity's pages, newest first across its runs
    reads = store.identity_reads()
    first = await reads.observations(ia, 3, None)
    rest = await reads.observations(ia, 3, first[-1]["seq"])
    pages = [o["value"] for o in first + rest]
    assert sorted(pages) == ["v0", "v2", "v3", "v5"] and len(rest) == 1
    seqs = [o["seq"] for o in first + rest]
    assert seqs == sorted(seqs, reverse=True)


def _validated(items: list[dict[str, Any]]) -> Any:
    import orjson

    from decnet_attr.config import Settings
    from decnet_attr.observations import validate

    return validate(b"\n".join(orjson.dumps(o) for o in items), Settings())


def _item(id: str, evidence: str, primitive: str = "environmental.shell_type", **kw: Any) -> Any:
    item = {"id": id, "attacker_uuid": "a", "primitive": primitive, "value": "bash"}
    item.update(evidence_ref=evidence, ts=1e9 + len(id), **kw)
    return item


async def test_insert_validated_stores_each_item_once_with_every_column(store: Store) -> None:
    ident = await make_attacker(store, "a")
    assert ident is not None
    first = _validated(
        [
            _item("o1", "e1", confidence=0.25, source="sensor-1", identity_ref="ref",
                  window={"start_ts": 1e9 - 0.1, "end_ts": 1e9 + 1 / 3}),
            _item("o2", "e2"),
        ]
    )  # fmt: skip
    async with store.transaction() as tx:
        assert await tx.insert_validated(first, {"a": ident}) == [0, 1]
    second = _validated(
        [
            _item("o1", "zz"),  # id stored
            _item("o3", "e2"),  # (evidence_ref, primitive) stored
            _item("o4", "e4"),
            _item("o5", "e4"),  # repeats o4's (evidence_ref, primitive)
            _item(
                "o6", "e4", "toolchain.c2.beacon_interval_ms", value=0.1 + 0.2
            ),  # other primitive
        ]
    )
    async with store.transaction() as tx:
        assert await tx.insert_validated(second, {}) == [2, 4]  # o6 with no identity: pending
    rows = await fetch(
        store,
        "SELECT id, identity_ref, primitive, value, confidence, window_start_ts, window_end_ts, "
        "source, evidence_ref, envelope_v, ts, attacker_uuid, identity_uuid, merged "
        "FROM observations ORDER BY seq",
    )
    want = first.rows({"a": ident}) + second.rows({}, [2, 4])
    assert [(*r[:13], bool(r[13])) for r in rows] == [(*w[:13], bool(w[13])) for w in want]
    assert json.loads(rows[-1][3]) == 0.1 + 0.2  # floats exact


async def test_write_states_stores_the_rows_and_windows_the_engine_holds(store: Store) -> None:
    """The worker's state write on a store several workers share (on
    PostgreSQL, binary COPY streams) stores what the generic row path would:
    new rows, then updated ones beside new ones."""
    from decnet_attr import Engine, Thresholds
    from decnet_attr._core import StateTable
    from decnet_attr.registry import value_kind_for
    from decnet_attr.store.models import StateRow

    ident = await make_attacker(store, "a")
    assert ident is not None
    engine = Engine(Thresholds())
    table = StateTable(value_kind_for)
    shell, beacon, mode = (
        "environmental.shell_type",
        "toolchain.c2.beacon_interval_ms",
        "motor.input_modality",
    )

    def ob(primitive: str, value: Any, ts: float) -> dict[str, Any]:
        return {"identity_uuid": ident, "primitive": primitive, "value": value, "ts": ts}

    async def check(states: Any) -> None:
        want = states.rows(StateRow, engine.export_windows(states.keys()))
        async with store.transaction() as tx:
            got = await tx.load_states(states.keys())
        assert [got[(r.identity_uuid, r.primitive)] for r in want] == want

    batches = [
        [ob(shell, "bash", 1e9), ob(shell, "bash", 1e9 + 1), ob(beacon, 1000.5, 1e9 + 2)],
        # the shell changes its mind, the beacon drifts, a new key appears
        [ob(shell, "zsh", 1e9 + 3), ob(shell, "fish", 1e9 + 4), ob(beacon, 1 / 3, 1e9 + 5),
         ob(mode, "typed", 1e9 + 6)],
    ]  # fmt: skip
    for n, batch in enumerate(batches):
        async with store.transaction() as tx:
            keys = sorted({(o["identity_uuid"], o["primitive"]) for o in batch})
            loaded = await tx.load_states(keys, lock=True)
            states = table.write(engine.ingest(batch), loaded, 500.0 + n, remember=False)
            assert states.created == len(keys) - len(loaded)
            await tx.write_states(states, engine, loaded)
        await check(states)


async def test_batch_writes_refuse_rows_of_unknown_attackers_and_identities(store: Store) -> None:
    """What a foreign key refused is refused by the batch paths too (on
    PostgreSQL the store checks the batch's attackers and identities)."""
    from decnet_attr import Engine, Thresholds
    from decnet_attr._core import StateTable
    from decnet_attr.registry import value_kind_for

    with pytest.raises(StoreError):
        async with store.transaction() as tx:
            await tx.insert_validated(_validated([_item("o1", "e1")]), {})
    assert await store.count_observations() == 0
    engine = Engine(Thresholds())
    result = engine.ingest(
        [{"identity_uuid": "nobody", "primitive": "environmental.shell_type", "value": "bash",
          "ts": 1e9}]
    )  # fmt: skip
    states = StateTable(value_kind_for).write(result, None, 1e9, remember=False)
    with pytest.raises(StoreError):
        async with store.transaction() as tx:
            await tx.write_states(states, engine, {})
    assert await store.attribution_for_identity("nobody") == []


async def test_write_states_twice_in_one_transaction(store: Store) -> None:
    """Each write stands alone: the second one of a transaction writes its
    own rows, not the first one's again."""
    from decnet_attr import Engine, Thresholds
    from decnet_attr._core import StateTable
    from decnet_attr.registry import value_kind_for
    from decnet_attr.store.models import StateRow

    ident = await make_attacker(store, "a")
    assert ident is not None
    engine = Engine(Thresholds())
    table = StateTable(value_kind_for)
    prim = "environmental.shell_type"
    key = (ident, prim)
    first = {"identity_uuid": ident, "primitive": prim, "value": "bash", "ts": 1e9}
    async with store.transaction() as tx:
        states = table.write(engine.ingest([first]), None, 1.0, remember=False)
        await tx.write_states(states, engine, {})
    async with store.transaction() as tx:
        for n, value in enumerate(["zsh", "fish"], 1):
            loaded = await tx.load_states([key], lock=True)
            later = dict(first, value=value, ts=1e9 + n)
            states = table.write(engine.ingest([later]), loaded, 1.0 + n, remember=False)
            await tx.write_states(states, engine, loaded)
        want = states.rows(StateRow, engine.export_windows([key]))
    async with store.transaction() as tx:
        assert list((await tx.load_states([key])).values()) == want


async def test_insert_validated_knows_stored_items_whatever_their_text(store: Store) -> None:
    """Items come back as duplicates (not as a failed write) whatever
    characters their evidence references hold: the admission check reads
    them back exactly as they were stored."""
    await make_attacker(store, "a")
    tricky = [
        'quote " and \\ backslash',
        "tab\tnewline\nbell\x07",
        "é ü ß 漢字 🚀",
        "\x7f\x1f/</script>",
    ]
    items = [_item(f"t{i}", ev) for i, ev in enumerate(tricky)]
    async with store.transaction() as tx:
        assert await tx.insert_validated(_validated(items), {}) == list(range(len(tricky)))
    again = [_item(f"u{i}", ev) for i, ev in enumerate(tricky)]  # new ids, stored evidence
    async with store.transaction() as tx:
        assert await tx.insert_validated(_validated(items), {}) == []
        assert await tx.insert_validated(_validated(again), {}) == []
    assert await store.count_observations() == len(tricky)
    assert await store.stored_positions(_validated(again)) == list(range(len(tricky)))
