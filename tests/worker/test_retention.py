"""Retention: raw observations older than the horizon are pruned in bulk (a
seq range, by the marks the worker notes); states and windows survive, and
everything merged later stays exact — on SQLite (lazy windows) and
PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.bus import Bus, get_bus
from decnet_attr.config import Settings
from decnet_attr.store import Store, open_store
from decnet_attr.worker import AttributionWorker
from tests import oracle
from tests.pgserver import PgServer
from tests.worker.conftest import need_postgres, stored_count
from tests.worker.helpers import (
    assert_runs_cover_rows,
    mk_obs,
    oracle_states,
    publish_all,
    query,
    stored_states,
)

A = "ret-attacker"


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield ""
        return
    need_postgres()
    srv: PgServer = request.getfixturevalue("pg_server")
    dsn = await srv.create_database()
    try:
        yield dsn
    finally:
        await srv.drop_database(dsn)


@pytest.fixture
async def setup(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[Settings, Store, Bus]]:
    settings = Settings(
        data_dir=tmp_path,
        db_url=db_url,
        heartbeat_interval=0.5,
        multi_actor_tick=3600,
        retention=100.0,
        retention_interval=3600.0,  # the test drives the passes
    )
    store = open_store(settings.store_url)
    await store.open()
    bus = get_bus("memory://")
    await bus.connect()
    try:
        yield settings, store, bus
    finally:
        await bus.close()
        await store.close()


def _obs(prefix: str, n: int, t0: float) -> list[dict[str, Any]]:
    values = "aabab"
    return [
        mk_obs(A, "motor.input_modality", values[i % len(values)], t0 + i) for i in range(n)
    ] + [mk_obs(A, "toolchain.c2.beacon_interval_ms", 100 + i, t0 + i) for i in range(n)]


async def test_old_observations_are_pruned_and_states_stay_exact(
    setup: tuple[Settings, Store, Bus],
) -> None:
    settings, store, bus = setup
    old, recent, later = _obs("o", 6, 1000.0), _obs("r", 4, 2000.0), _obs("l", 3, 3000.0)
    w = AttributionWorker(dataclasses.replace(settings, window_checkpoint=3600.0), bus, store)
    await w.start()
    await publish_all(bus, old)
    assert await w.prune_once(now=10_000.0) == 0  # a mark at 10 000: nothing is old yet
    await publish_all(bus, recent)
    await w.prune_once(now=10_050.0)  # a mark at 10 050
    # horizon 100 s at 10 120: the mark at 10 000 is older, the one at 10 050 is not
    assert await w.prune_once(now=10_120.0) == len(old)
    assert await stored_count(store) == len(recent)
    assert w.stats.pruned == len(old)
    await assert_runs_cover_rows(store)
    # the runs the prune emptied went with their rows
    empty = await query(
        store,
        "SELECT first_seq FROM observation_runs r WHERE NOT EXISTS (SELECT 1 FROM "
        "observations o WHERE o.seq BETWEEN r.first_seq AND r.last_seq)",
    )
    assert empty == []
    w.checkpoint_all = _crash  # type: ignore[method-assign]  # no window written at stop
    await w.stop()
    # a fresh worker (nothing in memory) continues exactly: the windows
    # written before the prune cover what it took
    w2 = AttributionWorker(settings, bus, store)
    await w2.start()
    await publish_all(bus, later)
    await w2.stop()
    want = oracle_states(old + recent + later)
    got = await stored_states(store, [A])
    for key, st in want.items():
        assert oracle.same(got[key], st), key


async def test_nothing_is_pruned_without_a_horizon(setup: tuple[Settings, Store, Bus]) -> None:
    settings, store, bus = setup
    w = AttributionWorker(dataclasses.replace(settings, retention=0.0), bus, store)
    await w.start()
    await publish_all(bus, _obs("o", 3, 1000.0))
    await w.prune_once(now=10_000.0)
    assert await w.prune_once(now=99_999.0) == 0
    assert await stored_count(store) == 6
    await w.stop()


async def _crash() -> None:
    return None
