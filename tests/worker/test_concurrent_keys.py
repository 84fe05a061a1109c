"""Two workers on one PostgreSQL store creating the same state row at once.

A key (identity, primitive) seen for the first time has no row to lock, so
two workers can both load "no row", each merge its own observation, and
both write the row: without a check the second write replaces the first
and the stored state misses an observation (the workers reload it from the
store afterwards, so the loss is permanent). Two attackers of one identity
(rolled up) observed at the same moment by two workers is how it happens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from decnet_attr.bus import get_bus
from decnet_attr.registry import value_kind_for
from decnet_attr.topics import OBSERVATION_BATCH
from decnet_attr.worker import AttributionWorker
from tests import oracle
from tests.worker.conftest import StoreFactory, worker_settings
from tests.worker.helpers import mk_obs

pytestmark = pytest.mark.timeout(60)

PRIM = "environmental.shell_type"


async def _one_identity_two_attackers(store: Any, pg_dsn: str) -> str:
    """Attackers att-1 and att-2 of one identity (as a roll-up leaves
    them); the identity."""
    async with store.transaction() as tx:
        await tx.ensure_attackers([("att-1", None, 1.0), ("att-2", None, 1.0)])
        ident: str = (await tx.ensure_identities(["att-1"], 1.0))[0]["att-1"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE attackers SET identity_id = $1 WHERE uuid = 'att-2'", ident)
    finally:
        await conn.close()
    return ident


async def test_two_workers_creating_one_state_row_lose_no_observation(
    tmp_path: Path, pg_dsn: str, make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = worker_settings(tmp_path, "memory://", pg_dsn, clustering=False)
    store_a, store_b = await make_store(settings.store_url), await make_store(settings.store_url)
    ident = await _one_identity_two_attackers(store_a, pg_dsn)

    bus = get_bus("memory://")
    await bus.connect()
    consumer = bus.durable_consumer("attacker.observation.>", durable="t")
    obs = [mk_obs("att-1", PRIM, "bash", 10.0), mk_obs("att-2", PRIM, "zsh", 11.0)]
    for i, o in enumerate(obs):
        await bus.publish(
            OBSERVATION_BATCH,
            {"ndjson": orjson.dumps(o).decode() + "\n", "count": 1},
            event_id=f"b{i}",
        )
    first, second = await consumer.fetch(2, timeout=1.0)

    worker_a = AttributionWorker(settings, bus, store_a)
    worker_b = AttributionWorker(settings, bus, store_b)
    # both reach their state rows having found none: the race, made certain
    both_merged = asyncio.Barrier(2)
    for w in (worker_a, worker_b):
        real = w._write_states

        async def at_barrier(*args: Any, _real: Any = real, **kw: Any) -> Any:
            try:
                await asyncio.wait_for(both_merged.wait(), 2.0)
            except (TimeoutError, asyncio.BrokenBarrierError):
                pass  # a retry after the other committed: no need to wait
            return await _real(*args, **kw)

        monkeypatch.setattr(w, "_write_states", at_barrier)
    await asyncio.wait_for(
        asyncio.gather(worker_a.process([first]), worker_b.process([second])), 30
    )
    await consumer.aclose()
    await bus.close()

    # the row holds both observations, as one worker alone would have it
    (got,) = stored_rows = await store_a.attribution_for_identity(ident)
    assert len(stored_rows) == 1
    want = oracle.aggregate(oracle.sort_series(obs), value_kind_for(PRIM))
    assert got.observation_count == 2 == want.observation_count
    assert (got.state, orjson.loads(got.current_value_json)) == (want.state, want.current_value)
    assert got.confidence == want.confidence


async def test_creating_a_row_that_exists_is_a_conflict_on_a_shared_store(
    pg_dsn: str, make_store: StoreFactory
) -> None:
    from decnet_attr.store import StoreConflict
    from decnet_attr.store.base import StateRow

    store = await make_store(pg_dsn)
    async with store.transaction() as tx:
        await tx.ensure_attackers([("att-1", None, 1.0)])
        ident = (await tx.ensure_identities(["att-1"], 1.0))[0]["att-1"]
    row = StateRow(ident, PRIM, '"bash"', "stable", 0.9, 3, 1.0, 2.0, version=1)
    other = StateRow(ident, "motor.input_modality", '"typed"', "stable", 0.9, 1, 1.0, 2.0)
    async with store.transaction() as tx:
        await tx.upsert_states([row], created=[(ident, PRIM)])
    # another writer "creates" the same row again, and a new one with it
    with pytest.raises(StoreConflict):
        async with store.transaction() as tx:
            await tx.upsert_states(
                [row, other], created=[(ident, PRIM), (ident, "motor.input_modality")]
            )
    assert [r.primitive for r in await store.attribution_for_identity(ident)] == [PRIM]
    # rows not announced as created are replaced as before
    async with store.transaction() as tx:
        await tx.upsert_states([row, other], created=[(ident, "motor.input_modality")])
    assert len(await store.attribution_for_identity(ident)) == 2


async def test_a_worker_builds_on_the_rows_it_wrote_and_rereads_one_changed_meanwhile(
    tmp_path: Path, pg_dsn: str, make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a shared store a worker does not read back the state rows it
    wrote last: it writes the next version over the one it holds. When
    another worker changed the row meanwhile, that write finds another
    version, the batch fails with a conflict, and it runs again on the
    row as stored: no observation of either worker is lost."""
    from decnet_attr.store.postgres import PostgresTx

    settings = worker_settings(tmp_path, "memory://", pg_dsn, clustering=False)
    store_a, store_b = await make_store(settings.store_url), await make_store(settings.store_url)
    ident = await _one_identity_two_attackers(store_a, pg_dsn)

    asked: list[Any] = []
    load = PostgresTx.load_states

    async def spy(self: PostgresTx, keys: Any, **kw: Any) -> Any:
        asked.extend(keys)
        return await load(self, keys, **kw)

    monkeypatch.setattr(PostgresTx, "load_states", spy)
    bus = get_bus("memory://")
    await bus.connect()
    consumer = bus.durable_consumer("attacker.observation.>", durable="t")
    worker_a = AttributionWorker(settings, bus, store_a)
    worker_b = AttributionWorker(settings, bus, store_b)
    obs = [
        (worker_a, mk_obs("att-1", PRIM, "bash", 10.0)),
        (worker_a, mk_obs("att-1", PRIM, "bash", 11.0)),
        (worker_b, mk_obs("att-2", PRIM, "zsh", 12.0)),
        (worker_a, mk_obs("att-1", PRIM, "bash", 13.0)),
    ]
    reads: list[int] = []

    async def process(i: int, w: AttributionWorker, o: dict[str, Any]) -> None:
        await bus.publish(
            OBSERVATION_BATCH,
            {"ndjson": orjson.dumps(o).decode() + "\n", "count": 1},
            event_id=f"b{i}",
        )
        (delivery,) = await consumer.fetch(1, timeout=1.0)
        asked.clear()
        await asyncio.wait_for(w.process([delivery]), 30)
        reads.append(len(asked))

    for i, (w, o) in enumerate(obs):
        await process(i, w, o)
    # a: the first batch reads (no row yet), the second does not (its own
    # row); b reads a's row; a's last write meets b's version: it runs again
    # and reads the row the second time
    assert reads == [1, 0, 1, 1]
    (got,) = await store_a.attribution_for_identity(ident)
    series = [o for _w, o in obs]
    want = oracle.aggregate(oracle.sort_series(series), value_kind_for(PRIM))
    assert got.observation_count == 4 == want.observation_count
    assert (got.state, orjson.loads(got.current_value_json)) == (want.state, want.current_value)
    assert got.version == 4
    # a row deleted meanwhile (as a roll-up deletes a key's row) is not
    # written again from what the worker held: the batch runs again on no row
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DELETE FROM attribution_state")
    finally:
        await conn.close()
    reads.clear()
    await process(9, worker_a, mk_obs("att-1", PRIM, "bash", 14.0))
    await consumer.aclose()
    await bus.close()
    assert reads == [1]
    (got,) = await store_a.attribution_for_identity(ident)
    assert (got.version, got.observation_count) == (1, 1)
