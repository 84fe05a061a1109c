"""Ingest partitions: the API splits a body by attacker over
``attacker.ingest.<k>``; each worker consumes only the partitions it owns,
so two workers never touch the same identity's rows, and a worker owning
several has a batch in flight for each. On NATS JetStream + PostgreSQL and
on the embedded default, they stay exact against the oracle and fire each
multi-actor alert once."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from decnet_attr._core import partition_of
from decnet_attr.bus import Bus, get_bus
from decnet_attr.config import ConfigError, Settings
from decnet_attr.observations import validate
from decnet_attr.server.routes.ingest import hand_over
from decnet_attr.store import Store
from decnet_attr.worker import AttributionWorker
from tests.natsserver import NatsServer
from tests.worker.conftest import (
    P_ALT1,
    P_ALT2,
    Collector,
    NatsBusFactory,
    StoreFactory,
    Workload,
    assert_one_identity_per_attacker,
    assert_states_equal_oracle,
    assert_stored_exactly_once,
    stored_count,
    wait_until,
    worker_settings,
)

pytestmark = pytest.mark.timeout(90)


async def _post(bus: Bus, settings: Settings, items: list[dict[str, Any]]) -> None:
    """What POST /api/v1/observations does with a body once it is validated."""
    body = b"\n".join(orjson.dumps(o) for o in items)
    batch = validate(body, settings, api=True, id_prefix=uuid.uuid4().hex[:24])
    assert not batch.rejected
    rejected: list[dict[str, Any]] = []
    accepted, failure = await hand_over(bus, batch, settings.partitions, rejected)
    assert failure is None and not rejected and len(accepted) == len(items)


async def test_two_workers_own_one_partition_each(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn, partitions=2, batch_max=64)
    for k in (0, 1):
        w = AttributionWorker(
            settings.replace(worker_name=f"worker-{k}", worker_partitions=str(k)),
            await make_nats_bus(nats_srv.url, name=f"worker-{k}"),
            await make_store(pg_dsn),
        )
        await w.start()
        workers.append(w)
    await _check_partitioned(settings, workers, await make_nats_bus(nats_srv.url, name="api"),
                             await make_store(pg_dsn))  # fmt: skip


async def test_one_worker_owning_every_partition_commits_them_side_by_side(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    """A worker consuming several partitions has a transaction in flight for
    each at once (how one worker uses more than one PostgreSQL backend):
    still exact, each alert once."""
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn, partitions=3, batch_max=64)
    w = AttributionWorker(
        settings, await make_nats_bus(nats_srv.url, name="worker"), await make_store(pg_dsn)
    )
    await w.start()
    workers.append(w)
    await _check_partitioned(settings, workers, await make_nats_bus(nats_srv.url, name="api"),
                             await make_store(pg_dsn))  # fmt: skip


async def test_the_embedded_worker_owning_every_partition_stays_exact(
    tmp_path: Path, make_store: StoreFactory, workers: list[AttributionWorker]
) -> None:
    """The same on the embedded default (in-process bus, SQLite): the
    partitions' batches share the one writer, in whatever order they come."""
    settings = worker_settings(tmp_path, "memory://", partitions=3, batch_max=64)
    bus = get_bus("memory://", **settings.bus_options())
    await bus.connect()
    try:
        w = AttributionWorker(settings, bus, await make_store(settings.store_url))
        await w.start()
        workers.append(w)
        await _check_partitioned(settings, workers, bus, await make_store(settings.store_url))
    finally:
        await w.stop()
        await bus.close()


async def _check_partitioned(
    settings: Settings, workers: list[AttributionWorker], pub: Bus, store: Store
) -> None:
    """Post a workload spanning every partition through ``hand_over``; the
    workers store each observation once, their states equal the oracle's,
    each worker merged the observations of the partitions it owns, and each
    multi-actor alert fires once."""
    parts = settings.partitions
    wl = Workload(10, tag="part")
    owner = {a: partition_of(a, parts) for a in wl.attackers}
    assert set(owner.values()) == set(range(parts)), "the workload spans every partition"
    async with Collector(pub, "attribution.profile.multi_actor_suspected") as ma:
        for start in range(0, len(wl.main), 150):  # several bodies, each spanning all
            await _post(pub, settings, wl.main[start : start + 150])
        await _post(pub, settings, wl.late)

        async def stored() -> bool:
            return await stored_count(store) == len(wl.distinct)

        await wait_until(stored, 45, "all partitions stored")

        async def fired() -> bool:
            return len(ma.events) >= len(wl.multi)

        await wait_until(fired, 15, "multi-actor alerts")
    # each worker merged exactly its own partitions' observations
    # (without partitions, a worker consumes them all: "partition 0")
    per = [
        sum(
            1
            for o in wl.distinct
            if owner[o["attacker_uuid"]] in (w.settings.owned_partitions() or [0])
        )
        for w in workers
    ]
    assert [w.stats.merged for w in workers] == per
    await assert_stored_exactly_once(store, wl.ids)
    await assert_states_equal_oracle(store, wl.distinct, wl.attackers)
    ident = await assert_one_identity_per_attacker(store, wl.attackers)
    got = sorted((e.payload["identity_uuid"], tuple(e.payload["primitives"])) for e in ma.events)
    assert got == sorted((ident[a], tuple(sorted([P_ALT1, P_ALT2]))) for a in wl.multi)


def test_partition_settings_are_checked(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, partitions=3).owned_partitions() == [0, 1, 2]
    assert Settings(
        data_dir=tmp_path, partitions=3, worker_partitions="2,0"
    ).owned_partitions() == [0, 2]
    assert Settings(data_dir=tmp_path).owned_partitions() == []
    for bad in ("3", "-1", "x", ","):
        with pytest.raises(ConfigError):
            Settings(data_dir=tmp_path, partitions=3, worker_partitions=bad)
