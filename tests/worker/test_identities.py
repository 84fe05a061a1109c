"""Identities that roll up: the worker merges and un-merges identities as the
clusterer links attackers, and every identity's states equal the oracle
over its attackers' observations (SQLite here; PostgreSQL in the races)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.bus import Bus, Event, get_bus
from decnet_attr.config import Settings
from decnet_attr.registry import value_kind_for
from decnet_attr.store import Store, open_store
from decnet_attr.store.identities import IdentityOps
from decnet_attr.topics import attacker_observation
from decnet_attr.worker import AttributionWorker
from decnet_attr.worker import worker as worker_module
from tests import oracle
from tests.worker.conftest import Collector, wait_until
from tests.worker.helpers import (
    _Row,
    assert_runs_cover_rows,
    mk_obs,
    publish_all,
    query,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

HASSH = "toolchain.ssh.hassh_client"
JA3 = "toolchain.tls.ja3_client"
BANNER = "toolchain.ssh.ssh_client_banner"
KEX = "toolchain.ssh.kex_algorithm_order"
SIM = "motor.digraph_simhash"
MODALITY = "motor.input_modality"
CADENCE = "motor.keystroke_cadence"
BEACON = "toolchain.c2.beacon_interval_ms"


def make_settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "heartbeat_interval": 0.2,
        "multi_actor_tick": 3600,
        "batch_delay": 0.001,
    }
    base.update(kw)
    return Settings(**base)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, cluster=json.dumps({"full_share": 3, "max_share": 3}))


async def identity_of(store: Store, attacker: str) -> str:
    att = await store.get_attacker(attacker)
    assert att is not None and att.identity_id is not None
    return att.identity_id


async def assert_states_equal_oracle(store: Store, observations: list[dict[str, Any]]) -> None:
    """Every identity's stored state per primitive equals the v0 merge over
    its attackers' observations in ts order, and nothing else is stored."""
    by_identity: dict[str, list[dict[str, Any]]] = {}
    for o in observations:
        by_identity.setdefault(await identity_of(store, o["attacker_uuid"]), []).append(o)
    expected_keys = set()
    for ident, obs in by_identity.items():
        series: dict[str, list[dict[str, Any]]] = {}
        for o in obs:
            series.setdefault(o["primitive"], []).append(o)
        rows = {r.primitive: r for r in await store.attribution_for_identity(ident)}
        assert set(rows) == set(series), (ident, sorted(rows), sorted(series))
        for prim, s in series.items():
            want = oracle.aggregate(oracle.sort_series(s), value_kind_for(prim))
            row = rows[prim]
            got = _Row(
                json.loads(row.current_value_json),
                row.state,
                row.confidence,
                row.observation_count,
                row.last_observation_ts,
            )
            assert oracle.same(got, want), (ident, prim, vars(got), want)
            expected_keys.add((ident, prim))
    stored = {
        tuple(r)
        for r in await query(store, "SELECT identity_uuid, primitive FROM attribution_state")
    }
    assert stored == expected_keys


async def test_a_shared_fingerprint_merges_identities_exactly(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    a, b = "att-a", "att-b"
    obs = [mk_obs(a, MODALITY, v, 10.0 + i) for i, v in enumerate(["typed", "typed", "pasted"])]
    obs += [mk_obs(a, BEACON, 1000 + i, 10.0 + i) for i in range(3)]
    obs += [mk_obs(b, MODALITY, v, 11.5 + i) for i, v in enumerate(["pasted", "typed", "typed"])]
    obs += [mk_obs(b, BEACON, 2000, 12.5)]
    async with Collector(bus, "identity.>") as col:
        await publish_all(bus, obs)
        ia, ib = await identity_of(store, a), await identity_of(store, b)
        assert ia != ib
        await assert_states_equal_oracle(store, obs)
        link = [mk_obs(a, HASSH, "c0ffee", 20.0), mk_obs(b, HASSH, "c0ffee", 21.0)]
        await publish_all(bus, link)
        obs += link
        await wait_for(lambda: bool(col.of("identity.merged")))
    winner, loser = min(ia, ib), max(ia, ib)
    assert await identity_of(store, a) == winner == await identity_of(store, b)
    await assert_states_equal_oracle(store, obs)
    merged = [e.payload for e in col.of("identity.merged")]
    assert len(merged) == 1
    m = merged[0]
    assert (m["winner_uuid"], m["loser_uuid"]) == (winner, loser)
    assert (m["identity_uuid"], m["merged_into_uuid"]) == (loser, winner)
    loser_attacker = a if ia == loser else b
    assert m["attacker_uuids"] == [loser_attacker]
    assert m["evidence"][0]["evidence"][0]["primitive"] == HASSH
    linked = [e.payload for e in col.of("identity.observation.linked")]
    assert linked == [
        {
            "identity_uuid": winner,
            "observation_uuid": loser_attacker,
            "attacker_uuid": loser_attacker,
        }
    ]
    # observations stay attached to their attacker; the loser is marked
    rows = await query(store, "SELECT DISTINCT attacker_uuid, identity_uuid FROM observations")
    assert sorted(rows) == [(a, winner), (b, winner)]
    rows = await query(
        store, f"SELECT merged_into_uuid FROM attacker_identities WHERE uuid = '{loser}'"
    )
    assert rows == [(winner,)]
    history = await query(
        store, "SELECT kind, winner_uuid, loser_uuid, attacker_uuids FROM identity_merges"
    )
    assert history == [("merged", winner, loser, json.dumps([loser_attacker]))]
    assert worker.stats.identities_merged == 1 and worker.stats.identities_unmerged == 0


async def test_a_batch_after_a_merge_builds_on_the_rebuilt_rows(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    """A merge rewrites the winner's state rows; the next batch on those keys
    starts from the rewritten rows (one version further), not from what the
    worker wrote before the merge."""
    a, b = "att-a", "att-b"
    obs = [mk_obs(a, MODALITY, v, 1.0 + i) for i, v in enumerate(["typed", "typed", "typed"])]
    obs += [mk_obs(b, MODALITY, v, 1.5 + i) for i, v in enumerate(["pasted", "pasted"])]
    async with Collector(bus, "identity.>") as col:
        await publish_all(bus, obs)
        link = [mk_obs(a, HASSH, "c0ffee", 5.0), mk_obs(b, HASSH, "c0ffee", 6.0)]
        await publish_all(bus, link)
        obs += link
        await wait_for(lambda: bool(col.of("identity.merged")))
    ident = await identity_of(store, a)
    assert ident == await identity_of(store, b)
    rebuilt = {r.primitive: r for r in await store.attribution_for_identity(ident)}[MODALITY]
    more = [mk_obs(a, MODALITY, "typed", 9.0)]
    await publish_all(bus, more)
    obs += more
    after = {r.primitive: r for r in await store.attribution_for_identity(ident)}[MODALITY]
    assert after.observation_count == rebuilt.observation_count + 1
    assert after.version == rebuilt.version + 1, (rebuilt.version, after.version)
    await assert_states_equal_oracle(store, obs)


async def test_a_value_turning_ubiquitous_unmerges_and_recomputes_both_sides(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    a, b = "att-a", "att-b"
    obs = [mk_obs(a, MODALITY, v, 1.0 + i) for i, v in enumerate(["typed", "pasted", "typed"])]
    obs += [mk_obs(b, MODALITY, v, 1.5 + i) for i, v in enumerate(["pasted", "pasted"])]
    obs += [mk_obs(a, HASSH, "common", 5.0), mk_obs(b, HASSH, "common", 6.0)]
    async with Collector(bus, "identity.>") as col:
        await publish_all(bus, obs)
        assert await identity_of(store, a) == await identity_of(store, b)
        await assert_states_equal_oracle(store, obs)
        # max_share is 3: two more attackers with the value make it ubiquitous
        more = [mk_obs(c, HASSH, "common", 7.0) for c in ("att-c", "att-d")]
        await publish_all(bus, more[:1])
        assert len({await identity_of(store, x) for x in (a, b, "att-c")}) == 1
        await publish_all(bus, more[1:])
        obs += more
        await wait_for(lambda: bool(col.of("identity.unmerged")))
    idents = {x: await identity_of(store, x) for x in (a, b, "att-c", "att-d")}
    assert len(set(idents.values())) == 4, idents
    await assert_states_equal_oracle(store, obs)
    unmerged = [e.payload for e in col.of("identity.unmerged")]
    first = min(idents[a], idents[b], idents["att-c"])
    # the three were one identity (the smallest stub uuid); the other two come back
    assert {u["resurrected_uuid"] for u in unmerged} == {idents[x] for x in (a, b, "att-c")} - {
        first
    }
    for u in unmerged:
        assert u["former_winner_uuid"] == first
        rows = await query(
            store,
            f"SELECT merged_into_uuid FROM attacker_identities WHERE uuid = '{u['resurrected_uuid']}'",
        )
        assert rows == [(None,)]
    kinds = [r[0] for r in await query(store, "SELECT kind FROM identity_merges ORDER BY id")]
    assert kinds == ["merged", "merged", "unmerged", "unmerged"]
    assert (worker.stats.identities_merged, worker.stats.identities_unmerged) == (2, 2)


async def test_multi_actor_is_reevaluated_on_the_merged_identity(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    """Each attacker alone has one alternating primitive (no alert: two are
    needed); once merged, the identity has two and the alert fires for it."""

    def alternation(attacker: str, prim: str, a: str, b: str, start: float) -> list[dict[str, Any]]:
        return [mk_obs(attacker, prim, a if i % 2 == 0 else b, start + i) for i in range(5)]

    obs = alternation("att-a", MODALITY, "typed", "pasted", 1.0)
    obs += alternation("att-b", "environmental.shell_type", "bash", "zsh", 2.0)
    async with Collector(bus, "attribution.profile.multi_actor_suspected") as col:
        await publish_all(bus, obs)
        assert not col.events
        link = [mk_obs("att-a", HASSH, "hh", 20.0), mk_obs("att-b", HASSH, "hh", 21.0)]
        await publish_all(bus, link)
        await wait_for(lambda: bool(col.events))
    [alert] = [e.payload for e in col.events]
    winner = await identity_of(store, "att-a")
    assert alert["identity_uuid"] == winner == await identity_of(store, "att-b")
    assert alert["primitives"] == sorted(["environmental.shell_type", MODALITY])
    assert alert["attacker_uuids"] == ["att-a", "att-b"]
    await assert_states_equal_oracle(store, obs + link)


#: The clusterer of the scenarios: links form from two shared fingerprints.
SCENARIO_CLUSTER = json.dumps({"full_share": 2, "max_share": 3})


def scenario(seed: int) -> list[list[dict[str, Any]]]:
    """Batches of observations for a handful of attackers: behaviour plus
    fingerprints drawn from small pools (so links form, and some values turn
    common or ubiquitous and break them)."""
    rng = random.Random(seed)
    attackers = [f"s{seed}-att{i}" for i in range(rng.randint(4, 7))]
    pools = {
        HASSH: [f"h{i}" for i in range(5)],
        JA3: [f"j{i}" for i in range(5)],
        BANNER: ["SSH-2.0-a", "SSH-2.0-b"],
        KEX: [["k1", "k2"], ["k2", "k1"]],
        SIM: ["00000000000000f0", "00000000000000f1", "0000000000000f00", "ff00000000000000"],
        MODALITY: ["typed", "pasted"],
        CADENCE: ["steady", "bursty"],
        BEACON: [1000, 1010, 5000],
    }
    batches = []
    t = 100.0
    for _ in range(rng.randint(6, 14)):
        batch = []
        for _ in range(rng.randint(2, 8)):
            prim = rng.choice(list(pools))
            # ts not in arrival order: the merge must sort the union by ts
            batch.append(
                mk_obs(rng.choice(attackers), prim, rng.choice(pools[prim]), t + rng.random() * 5)
            )
            t += 1.0
        batches.append(batch)
    return batches


async def test_any_sequence_of_merges_and_unmerges_leaves_oracle_states(
    tmp_path: Path, bus: Bus
) -> None:
    """Twelve seeded scenarios on SQLite; together they merge and un-merge."""
    totals = [0, 0]
    for seed in range(12):
        (tmp_path / f"s{seed}").mkdir()
        merged, unmerged = await run_scenario(tmp_path / f"s{seed}", bus, seed, "")
        totals[0] += merged
        totals[1] += unmerged
    assert totals[0] >= 20 and totals[1] >= 3, totals


@pytest.mark.parametrize("seed", range(4))
async def test_any_sequence_of_merges_and_unmerges_on_postgresql(
    tmp_path: Path, bus: Bus, seed: int, pg_dsn: str
) -> None:
    await run_scenario(tmp_path, bus, seed, pg_dsn)


@pytest.mark.parametrize("seed", range(12))
async def test_merges_and_unmerges_on_postgresql_with_every_batch_in_lanes(
    tmp_path: Path, bus: Bus, seed: int, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with every batch cut into lanes (transactions side by side):
    an identity's attackers share a lane, so no lane builds on what another
    merged and did not commit. Cut by attacker instead, a lane that failed
    (a deadlock with the other) and ran again counted an observation twice
    the other had already built on."""
    monkeypatch.setattr(worker_module, "LANE_MIN", 1)
    await run_scenario(tmp_path, bus, seed, pg_dsn)


@pytest.mark.parametrize("seed", range(12))
async def test_merges_and_unmerges_across_the_partitions_of_one_worker(
    tmp_path: Path, seed: int, pg_dsn: str
) -> None:
    """The scenarios posted as the API hands bodies over with two ingest
    partitions, one worker owning both: its partitions' transactions run
    side by side on one engine, and roll-ups join attackers of both into
    one identity. Before an identity was held by one transaction at a time
    (``AttributionWorker.claim``), every run of these failed: a partition
    built on the other's merges before they committed, and an observation
    counted twice once the other failed and ran again."""
    from tests.worker.test_partitions import _post

    settings = make_settings(
        tmp_path,
        db_url=pg_dsn,
        partitions=2,
        cluster=SCENARIO_CLUSTER,
    )
    bus = get_bus("memory://", **settings.bus_options())
    await bus.connect()
    store = open_store(settings.store_url)
    await store.open()
    worker = AttributionWorker(settings, bus, store)
    await worker.start()
    try:
        obs: list[dict[str, Any]] = []
        for batch in scenario(seed):
            await _post(bus, settings, batch)
            obs += batch

            async def committed(n: int = len(obs)) -> bool:
                return worker.stats.merged + worker.stats.duplicates >= n

            await wait_until(committed, 10, "the batch committed")
            await assert_states_equal_oracle(store, obs)
    finally:
        await worker.stop()
        await store.close()
        await bus.close()


async def run_scenario(tmp_path: Path, bus: Bus, seed: int, db_url: str) -> tuple[int, int]:
    """Feed a scenario batch by batch, checking every identity against the
    oracle after each; returns (merges, un-merges)."""
    settings = make_settings(tmp_path, db_url=db_url, cluster=SCENARIO_CLUSTER)
    store = open_store(settings.store_url)
    await store.open()
    worker = AttributionWorker(settings, bus, store)
    await worker.start()
    try:
        obs: list[dict[str, Any]] = []
        for batch in scenario(seed):
            await publish_all(bus, batch)
            obs += batch
            await assert_states_equal_oracle(store, obs)
            await assert_runs_cover_rows(store)
        # the identities are the clusterer's components (as an all-pairs pass sees them)
        assert worker.rollup is not None
        cl = worker.rollup.clusterer
        for o in obs:
            a = o["attacker_uuid"]
            mates = cl.component(a)
            assert {await identity_of(store, x) for x in mates} == {await identity_of(store, a)}
        counts = (worker.stats.identities_merged, worker.stats.identities_unmerged)
        # a restart reloads the clusterer from the store and changes nothing
        await worker.stop()
        before = sorted(await query(store, "SELECT uuid, identity_id FROM attackers"))
        worker = AttributionWorker(settings, bus, store)
        await worker.start()
        assert worker.rollup is not None and len(worker.rollup.clusterer) > 0
        await publish_all(bus, [mk_obs(obs[0]["attacker_uuid"], MODALITY, "typed", 999.0)])
        assert sorted(await query(store, "SELECT uuid, identity_id FROM attackers")) == before
    finally:
        await worker.stop()
        await store.close()
    return counts


async def test_a_merge_that_fails_midway_recovers_on_redelivery(
    worker: AttributionWorker, bus: Bus, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = "att-a", "att-b"
    base = [mk_obs(a, MODALITY, "typed", 1.0), mk_obs(b, MODALITY, "pasted", 2.0)]
    await publish_all(bus, base)
    real_move = IdentityOps.move
    calls = {"n": 0}

    async def failing_move(self: IdentityOps, attackers: Any, identity: str) -> None:
        calls["n"] += 1
        await real_move(self, attackers, identity)
        if calls["n"] == 1:
            raise OSError("simulated crash in the middle of a merge")

    monkeypatch.setattr(IdentityOps, "move", failing_move)
    link = [mk_obs(a, HASSH, "x1", 3.0), mk_obs(b, HASSH, "x1", 4.0)]
    # the first attempt rolls back; the bus redelivers and the merge completes
    await publish_all(bus, link, timeout=20.0)
    await wait_for(lambda: calls["n"] >= 2, timeout=10.0)
    assert await identity_of(store, a) == await identity_of(store, b)
    await assert_states_equal_oracle(store, base + link)
    assert (await query(store, "SELECT count(*) FROM identity_merges"))[0][0] == 1


async def test_clustering_can_be_turned_off(tmp_path: Path, bus: Bus) -> None:
    settings = make_settings(tmp_path, clustering=False)
    store = open_store(settings.store_url)
    await store.open()
    worker = AttributionWorker(settings, bus, store)
    await worker.start()
    try:
        await publish_all(bus, [mk_obs("x", HASSH, "h", 1.0), mk_obs("y", HASSH, "h", 2.0)])
        assert await identity_of(store, "x") != await identity_of(store, "y")
    finally:
        await worker.stop()
        await store.close()


# ---- several workers on PostgreSQL ----------------------------------------------------------
def deliveries(items: list[dict[str, Any]]) -> list[Any]:
    from tests.worker.test_worker import FakeDelivery

    return [
        FakeDelivery(Event(topic=attacker_observation(o["primitive"]), payload=o, id=o["id"]))
        for o in items
    ]


async def pg_workers(tmp_path: Path, dsn: str, n: int) -> list[tuple[AttributionWorker, Store]]:
    out = []
    for i in range(n):
        settings = make_settings(tmp_path / f"w{i}", db_url=dsn, worker_name=f"attribution-{i}")
        store = open_store(settings.store_url)
        await store.open()
        b = get_bus("memory://")
        await b.connect()
        out.append((AttributionWorker(settings, b, store), store))
    return out


async def test_two_workers_racing_on_one_pair_make_one_merge(tmp_path: Path, pg_dsn: str) -> None:
    (w1, s1), (w2, s2) = await pg_workers(tmp_path, pg_dsn, 2)
    try:
        base = [mk_obs("att-a", MODALITY, "typed", 1.0), mk_obs("att-b", MODALITY, "pasted", 2.0)]
        await w1.process(deliveries(base))
        # both workers see evidence for the same pair at the same time
        one = [mk_obs("att-a", HASSH, "h", 3.0), mk_obs("att-b", HASSH, "h", 4.0)]
        two = [mk_obs("att-a", HASSH, "h", 5.0), mk_obs("att-b", HASSH, "h", 6.0)]
        await asyncio.gather(w1.process(deliveries(one)), w2.process(deliveries(two)))
        assert await identity_of(s1, "att-a") == await identity_of(s1, "att-b")
        assert await query(s1, "SELECT kind FROM identity_merges") == [("merged",)]
        await assert_states_equal_oracle(s1, base + one + two)
    finally:
        for w, s in ((w1, s1), (w2, s2)):
            await w.bus.close()
            await s.close()


async def test_a_link_across_workers_is_found(tmp_path: Path, pg_dsn: str) -> None:
    """Each worker sees one side of the evidence: the second learns the
    first's fingerprints from the shared store."""
    (w1, s1), (w2, s2) = await pg_workers(tmp_path, pg_dsn, 2)
    try:
        first = [mk_obs("att-a", HASSH, "h", 1.0), mk_obs("att-a", MODALITY, "typed", 1.5)]
        second = [mk_obs("att-b", HASSH, "h", 2.0), mk_obs("att-b", MODALITY, "typed", 2.5)]
        await w1.process(deliveries(first))
        await w2.process(deliveries(second))
        assert await identity_of(s1, "att-a") == await identity_of(s1, "att-b")
        await assert_states_equal_oracle(s1, first + second)
        # the first worker follows when the identity next gets observations
        more = [mk_obs("att-a", MODALITY, "pasted", 3.0)]
        await w1.process(deliveries(more))
        await assert_states_equal_oracle(s1, first + second + more)
    finally:
        for w, s in ((w1, s1), (w2, s2)):
            await w.bus.close()
            await s.close()
