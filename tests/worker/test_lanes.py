"""Lanes: on a shared store (PostgreSQL) a worker cuts a large batch by
attacker into ``worker_lanes`` transactions that run side by side, so its
loop builds one lane's rows while the server writes another's. The lanes
stay exact against the oracle, fire each multi-actor alert once, and a lane
that fails does not take back what another committed: the batch comes
again, and the committed lane's items are answered as duplicates."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from decnet_attr.bus import get_bus
from decnet_attr.store import StoreUnavailable
from decnet_attr.topics import OBSERVATION_BATCH
from decnet_attr.worker import AttributionWorker
from decnet_attr.worker import worker as worker_module
from decnet_attr.worker.worker import lane_of
from tests.natsserver import NatsServer
from tests.worker.conftest import (
    Collector,
    NatsBusFactory,
    StoreFactory,
    Workload,
    assert_states_equal_oracle,
    assert_stored_exactly_once,
    worker_settings,
)
from tests.worker.helpers import mk_obs, query
from tests.worker.test_partitions import _check_partitioned

pytestmark = pytest.mark.timeout(90)


class _Overlap:
    """The most transactions of one batch (its deliveries) a worker had in
    flight at once (ingest partitions have a batch in flight each: those
    are not counted together)."""

    def __init__(self, worker: AttributionWorker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.most = 0
        now: dict[int, int] = {}
        real = worker._commit

        async def counted(batch: Any) -> Any:
            key = id(batch.deliveries)
            now[key] = now.get(key, 0) + 1
            self.most = max(self.most, now[key])
            try:
                return await real(batch)
            finally:
                now[key] -= 1

        monkeypatch.setattr(worker, "_commit", counted)


@pytest.mark.parametrize("partitions", [1, 3])
async def test_a_worker_commits_the_lanes_of_a_batch_side_by_side(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
    monkeypatch: pytest.MonkeyPatch,
    partitions: int,
) -> None:
    monkeypatch.setattr(worker_module, "LANE_MIN", 1)
    settings = worker_settings(
        tmp_path, nats_srv.url, pg_dsn, partitions=partitions, batch_max=64, worker_lanes=2
    )
    w = AttributionWorker(
        settings, await make_nats_bus(nats_srv.url, name="worker"), await make_store(pg_dsn)
    )
    overlap = _Overlap(w, monkeypatch)
    await w.start()
    workers.append(w)
    await _check_partitioned(settings, workers, await make_nats_bus(nats_srv.url, name="api"),
                             await make_store(pg_dsn))  # fmt: skip
    assert overlap.most >= 2, "no two lanes were ever in flight at once"


async def test_one_lane_is_one_transaction_below_the_minimum_or_on_sqlite(
    tmp_path: Path, pg_dsn: str, make_store: StoreFactory
) -> None:
    """Small batches (a round trip per lane is not worth it) and the
    single-writer store (SQLite has its own overlap) are not cut."""
    obs = [mk_obs(f"lane-{i}", "environmental.shell_type", "bash", 10.0 + i) for i in range(8)]
    for db_url in (pg_dsn, ""):
        settings = worker_settings(tmp_path, "memory://", db_url, worker_lanes=2)
        w = AttributionWorker(settings, get_bus("memory://"), await make_store(settings.store_url))
        batch = w._check(await _deliveries(obs))
        assert len(w._lanes(batch)) == 1
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(worker_module, "LANE_MIN", 1)
            lanes = w._lanes(batch)
            assert len(lanes) == (2 if db_url else 1)
            # every item in exactly one lane, in the batch's order
            got = sorted(oid for lane in lanes for oid in _ids(lane))
            assert got == sorted(o["id"] for o in obs)
            assert all(_ids(lane) == sorted(_ids(lane)) for lane in lanes)
            if db_url:
                # attackers of one identity the worker knows share a lane
                split = {lane_of(o["attacker_uuid"], 2) for o in obs}
                assert split == {0, 1}
                w._identity_cache.update({o["attacker_uuid"]: "one" for o in obs})
                assert len(w._lanes(batch)) == 1


async def test_a_failed_lane_leaves_the_committed_one_and_the_batch_comes_again(
    tmp_path: Path, pg_dsn: str, make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "LANE_MIN", 1)
    settings = worker_settings(tmp_path, "memory://", pg_dsn, clustering=False, worker_lanes=2)
    store = await make_store(pg_dsn)
    bus = get_bus("memory://")
    await bus.connect()
    w = AttributionWorker(settings, bus, store)
    # attackers of both lanes; the second lane's transactions fail until the
    # batch is delivered again
    wl = Workload(6, tag="lane")
    # (new attackers: each its own lane's owner)
    lane = {a: lane_of(a, 2) for a in wl.attackers}
    assert set(lane.values()) == {0, 1}
    failing = {a for a in wl.attackers if lane[a] == 1}
    real = w._merge_in_tx
    attempts: list[int] = []

    async def fail_first_delivery(tx: Any, valid: Any, *args: Any, **kw: Any) -> Any:
        if valid is not None and {a for a, _ip, _ts in valid.attackers()} & failing:
            attempts.append(len(attempts))
            if len(attempts) <= 3:  # every retry of the first delivery
                # once the other lane has counted what it merged: a failed
                # attempt takes back its own counts only
                result = await real(tx, valid, *args, **kw)
                await asyncio.sleep(0.2)
                raise StoreUnavailable(f"injected after {len(result)} events")
        return await real(tx, valid, *args, **kw)

    monkeypatch.setattr(w, "_merge_in_tx", fail_first_delivery)
    consumer = bus.durable_consumer("attacker.observation.>", durable="lanes")
    async with Collector(bus, "attribution.profile.>") as events:
        await bus.publish(
            OBSERVATION_BATCH,
            {
                "ndjson": "".join(orjson.dumps(o).decode() + "\n" for o in wl.main),
                "count": len(wl.main),
            },
            event_id="lanes-1",
        )
        first = await consumer.fetch(10, timeout=1.0)
        await w.process(first)
        await asyncio.sleep(0.05)
        # the committed lane's events went out; none of the failed lane's
        # (the failed lane registered its attackers in the transaction it
        # rolled back)
        ident = dict(await query(store, "SELECT uuid, identity_id FROM attackers"))
        assert set(ident) == set(wl.attackers) - failing
        seen = {e.payload["identity_uuid"] for e in events.of("state_changed")}
        assert seen == set(ident.values())
        merged_first = w.stats.merged
        assert merged_first == sum(1 for o in wl.main if o["attacker_uuid"] not in failing)
        # the batch comes again (nak'ed with a delay): the committed lane's
        # items are duplicates now, the other lane's are merged
        again = await consumer.fetch(10, timeout=5.0)
        assert [d.event.id for d in again] == ["lanes-1"] and again[0].redelivered
        await w.process(again)
        await asyncio.sleep(0.05)
    assert w.stats.merged == len(wl.main)
    assert w.stats.duplicates == merged_first
    await consumer.aclose()
    await bus.close()
    await assert_stored_exactly_once(store, {o["id"] for o in wl.main})
    await assert_states_equal_oracle(store, wl.main, wl.attackers)


async def _deliveries(obs: list[dict[str, Any]]) -> list[Any]:
    bus = get_bus("memory://")
    await bus.connect()
    consumer = bus.durable_consumer("attacker.observation.>", durable="lanes-cut")
    await bus.publish(
        OBSERVATION_BATCH,
        {"ndjson": "".join(orjson.dumps(o).decode() + "\n" for o in obs), "count": len(obs)},
        event_id="cut-1",
    )
    got = await consumer.fetch(10, timeout=1.0)
    await consumer.aclose()
    await bus.close()
    return got


def _ids(lane: Any) -> list[str]:
    valid = lane.valid
    return [valid.describe(i)[1] for i in range(len(valid))]
