"""Faults on the scale-out deployment (real nats-server, real PostgreSQL):

- ``kill -9`` of a ``decnet-attr worker`` subprocess mid-stream, then a
  restart: nothing lost, nothing stored or merged twice (PostgreSQL, and the
  embedded-style SQLite file store);
- a nats-server restart while sensors publish: every acknowledged publish
  is stored;
- PostgreSQL down for a moment: the worker naks, retries and recovers;
- hostile events on the real bus: each rejected and counted, the worker
  keeps merging.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.bus import BusError, BusUnavailable
from decnet_attr.store import Store
from decnet_attr.store.base import DEAD_LETTER_MAX_BYTES, StoreUnavailable
from decnet_attr.topics import attacker_observation
from decnet_attr.worker import AttributionWorker
from decnet_attr.worker.recompute import recompute
from tests.natsserver import NatsServer
from tests.pgserver import PgServer
from tests.worker.conftest import (
    P_ALT1,
    P_ALT2,
    P_DRIFT,
    P_HASH,
    P_NUM,
    NatsBusFactory,
    StoreFactory,
    assert_states_equal_oracle,
    assert_stored_exactly_once,
    consumer_drained,
    consumer_info,
    need_postgres,
    publish_durable,
    publish_with_retry,
    set_ack_wait,
    stored_count,
    wait_until,
    worker_settings,
)
from tests.worker.helpers import mk_obs, own_hash, query

pytestmark = pytest.mark.timeout(60)


# ---- a long mixed stream ------------------------------------------------------------------


def stream(n: int, *, tag: str, attackers: int = 10, seed: int = 7) -> list[dict[str, Any]]:
    """*n* observations over several attackers and primitives, in publish
    order; chunks are published newest-first, so many arrive late (older ts
    than observations already merged). Every ts is distinct."""
    rnd = random.Random(seed)
    prims = [P_ALT1, P_ALT2, P_DRIFT, P_HASH, P_NUM]
    out = []
    for j in range(n):
        a = f"{tag}-{j % attackers:02d}"
        p = prims[(j // attackers) % len(prims)]
        ts = 2_000_000.0 + j * 1.5
        if p == P_ALT1:
            v: Any = rnd.choice(["typed", "pasted"])
        elif p == P_ALT2:
            v = ["bash", "zsh"][(j // (attackers * len(prims))) % 2]
        elif p == P_DRIFT:
            v = "steady" if j < n // 2 else rnd.choice(["steady", "bursty"])
        elif p == P_HASH:
            v = own_hash(a, rnd.randrange(4))
            ts = 2_000_000.0 + j * 900.0  # spread over days: the 24 h window matters
        else:
            v = rnd.choice([1000, 1010, 990, 1500, 2000])
        out.append(mk_obs(a, p, v, ts))
    chunked = []
    for k in range(0, n, 40):
        chunked += list(reversed(out[k : k + 40]))
    return chunked


class Publisher:
    """A sensor publishing durably in the background (chunks of concurrent
    publishes, a short pause between chunks); records what was acked."""

    def __init__(
        self,
        bus: Any,
        items: list[dict[str, Any]],
        *,
        chunk: int = 50,
        pause: float = 0.01,
        retry: bool = False,
        deadline: float = 40.0,
    ) -> None:
        self.bus = bus
        self.items = items
        self.chunk = chunk
        self.pause = pause
        self.retry = retry
        self.deadline = time.monotonic() + deadline
        self.acked: set[str] = set()
        self.failed: list[tuple[str, str]] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Publisher:
        self.task = asyncio.create_task(self._run())
        return self

    async def _one(self, o: dict[str, Any]) -> None:
        try:
            if self.retry:
                await publish_with_retry(self.bus, o, deadline=self.deadline)
            else:
                await self.bus.publish_durable(
                    attacker_observation(o["primitive"]), o, event_id=o["id"], timeout=10.0
                )
        except BusError as exc:
            self.failed.append((o["id"], repr(exc)))
            return
        self.acked.add(o["id"])

    async def _run(self) -> None:
        for k in range(0, len(self.items), self.chunk):
            await asyncio.gather(*(self._one(o) for o in self.items[k : k + self.chunk]))
            await asyncio.sleep(self.pause)

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def finish(self, timeout: float = 30.0) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout)

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


@pytest.fixture
async def publishers() -> AsyncIterator[list[Publisher]]:
    started: list[Publisher] = []
    try:
        yield started
    finally:
        for p in started:
            await p.cancel()


async def _diag(store: Store, bus: Any) -> str:
    try:
        info = await consumer_info(bus)
        return f"(stored={await stored_count(store)}, pending={info.num_pending}, ack_pending={info.num_ack_pending})"
    except Exception as exc:
        return f"({exc!r})"


# ---- SIGKILL ----------------------------------------------------------------------------------


async def _sigkill_scenario(
    *,
    tmp_path: Path,
    nats_url: str,
    db_url: str,
    store: Store | None,
    open_sqlite: Path | None,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    spawn_worker: Any,
    publishers: list[Publisher],
    n: int,
    tag: str,
) -> Store:
    data_dir = tmp_path / "data"
    proc = spawn_worker(bus_url=nats_url, db_url=db_url, data_dir=data_dir)
    pub = await make_nats_bus(nats_url, name="sensor")
    # the worker binds the durable with a 30 s ack_wait; shorten it so that the
    # killed worker's unacked deliveries come back within this test
    await set_ack_wait(pub, 1.0, expect_current=30.0)
    if store is None:
        assert open_sqlite is not None
        store = await make_store(f"sqlite:///{open_sqlite}")
    items = stream(n, tag=tag)
    sensor = Publisher(pub, items, chunk=40, pause=0.02).start()
    publishers.append(sensor)

    async def some_stored() -> bool:
        assert proc.alive(), proc.log()
        return await stored_count(store) >= n // 5

    await wait_until(some_stored, 30, "the worker stored a first part", lambda: _diag(store, pub))
    await proc.kill9()
    at_kill = await stored_count(store)
    assert 0 < at_kill < n, f"killed mid-stream ({at_kill} of {n} stored)"
    assert proc.proc is not None and proc.proc.returncode == -9
    await asyncio.sleep(0.3)
    frozen = await stored_count(store)
    assert frozen == at_kill  # nobody else is writing
    proc.start()  # same command, same environment
    await set_ack_wait(pub, 1.0, expect_current=30.0)
    await sensor.finish()
    assert not sensor.failed and sensor.acked == {o["id"] for o in items}

    async def all_stored() -> bool:
        assert proc.alive(), proc.log()
        return await stored_count(store) == n and await consumer_drained(pub)

    await wait_until(
        all_stored, 30, "everything stored after the restart", lambda: _diag(store, pub)
    )
    await assert_stored_exactly_once(store, {o["id"] for o in items})
    attackers = sorted({o["attacker_uuid"] for o in items})
    await assert_states_equal_oracle(store, items, attackers)
    settings = worker_settings(tmp_path, nats_url, db_url)
    report = await recompute(store, settings, dry_run=True)
    assert report["changed"] == [] and report["dropped"] == [], report["changed"][:5]
    assert report["observations"] == n
    assert proc.alive()
    return store


async def test_sigkill_mid_stream_then_restart_postgres(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    spawn_worker: Any,
    publishers: list[Publisher],
) -> None:
    store = await make_store(pg_dsn)  # migrated before the worker starts
    await _sigkill_scenario(
        tmp_path=tmp_path,
        nats_url=nats_srv.url,
        db_url=pg_dsn,
        store=store,
        open_sqlite=None,
        make_nats_bus=make_nats_bus,
        make_store=make_store,
        spawn_worker=spawn_worker,
        publishers=publishers,
        n=3000,
        tag="kpg",
    )


async def test_sigkill_mid_stream_then_restart_sqlite_file(
    tmp_path: Path,
    nats_srv: NatsServer,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    spawn_worker: Any,
    publishers: list[Publisher],
) -> None:
    # DECNET_ATTR_DB_URL unset: the worker uses <data dir>/attr.db (SQLite, WAL);
    # the test reads the same file (opened once the worker is up)
    await _sigkill_scenario(
        tmp_path=tmp_path,
        nats_url=nats_srv.url,
        db_url="",
        store=None,
        open_sqlite=(tmp_path / "data" / "attr.db").resolve(),
        make_nats_bus=make_nats_bus,
        make_store=make_store,
        spawn_worker=spawn_worker,
        publishers=publishers,
        n=2000,
        tag="ksq",
    )


# ---- nats-server restart ---------------------------------------------------------------------


async def test_nats_server_restart_while_sensors_publish(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
    publishers: list[Publisher],
) -> None:
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn)
    wbus = await make_nats_bus(nats_srv.url, name="worker", ack_wait=2.0)
    w = AttributionWorker(settings, wbus, await make_store(pg_dsn))
    await w.start()
    workers.append(w)
    store = await make_store(pg_dsn)
    items = stream(1600, tag="nrs")
    # four sensors, each with its own connection, retrying on BusUnavailable
    sensors = []
    for k in range(4):
        bus = await make_nats_bus(nats_srv.url, name=f"sensor-{k}")
        sensors.append(Publisher(bus, items[k::4], chunk=10, pause=0.01, retry=True).start())
    publishers.extend(sensors)

    async def a_third_acked() -> bool:
        return sum(len(s.acked) for s in sensors) >= len(items) // 3

    await wait_until(a_third_acked, 20, "a third published")
    acked_before = sum(len(s.acked) for s in sensors)
    await nats_srv.astop()
    await asyncio.sleep(1.0)
    assert not any(s.done for s in sensors), "the restart happens mid-stream"
    await nats_srv.astart()
    for s in sensors:
        await s.finish()
    acked = set().union(*(s.acked for s in sensors))
    assert acked_before < len(acked)
    assert not [f for s in sensors for f in s.failed]
    assert acked == {o["id"] for o in items}  # the sensors retried until acked

    async def all_stored() -> bool:
        return await stored_count(store) == len(items) and await consumer_drained(wbus)

    await wait_until(all_stored, 30, "every acked publish stored", lambda: _diag(store, wbus))
    await assert_stored_exactly_once(store, acked)
    await assert_states_equal_oracle(store, items, sorted({o["attacker_uuid"] for o in items}))
    assert wbus.stats()["reconnects"] >= 1
    assert w.running


# ---- PostgreSQL unavailable ------------------------------------------------------------------


@pytest.fixture
def own_pg() -> Any:
    """A PostgreSQL server of this test's own (it gets stopped and started)."""
    need_postgres()
    srv = PgServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


async def test_postgres_down_for_a_moment(
    tmp_path: Path,
    nats_srv: NatsServer,
    own_pg: PgServer,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
    publishers: list[Publisher],
) -> None:
    dsn = await own_pg.create_database()
    settings = worker_settings(tmp_path, nats_srv.url, dsn)
    wbus = await make_nats_bus(nats_srv.url, name="worker", ack_wait=5.0)
    w = AttributionWorker(settings, wbus, await make_store(dsn))
    await w.start()
    workers.append(w)
    store = await make_store(dsn)
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    items = stream(2000, tag="pgd")
    sensor = Publisher(pub, items, chunk=40, pause=0.03).start()
    publishers.append(sensor)

    async def some_stored() -> bool:
        return await stored_count(store) >= len(items) // 5

    await wait_until(some_stored, 20, "a first part stored")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, own_pg.stop)  # fast shutdown: connections cut
    failures_before = w.stats.batch_failures
    await asyncio.sleep(1.5)
    await loop.run_in_executor(None, own_pg.start)
    await sensor.finish()
    assert sensor.acked == {o["id"] for o in items}

    async def all_stored() -> bool:
        try:
            return await stored_count(store) == len(items) and await consumer_drained(pub)
        except Exception:  # the test's own pool reconnects too
            return False

    await wait_until(
        all_stored, 30, "everything stored after the outage", lambda: _diag(store, pub)
    )
    assert w.stats.batch_failures > failures_before, (
        "the outage was noticed (batches failed and were retried)"
    )
    await assert_stored_exactly_once(store, {o["id"] for o in items})
    await assert_states_equal_oracle(store, items, sorted({o["attacker_uuid"] for o in items}))
    report = await recompute(store, settings, dry_run=True)
    assert report["changed"] == [] and report["dropped"] == []
    assert w.running


async def test_worker_connections_terminated_repeatedly(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
    publishers: list[Publisher],
) -> None:
    """pg_terminate_backend on the worker's connections, again and again,
    while the stream flows: failed batches are retried or nak'ed, nothing is
    lost or merged twice."""
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn)
    wbus = await make_nats_bus(nats_srv.url, name="worker", ack_wait=5.0)
    w = AttributionWorker(settings, wbus, await make_store(pg_dsn))
    await w.start()
    workers.append(w)
    store = await make_store(pg_dsn)
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    items = stream(1500, tag="pgt")
    sensor = Publisher(pub, items, chunk=30, pause=0.02).start()
    publishers.append(sensor)
    mine = (await query(store, "SELECT pg_backend_pid()"))[0][0]
    killed = 0
    while not sensor.done:
        rows = await query(
            store,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND pid <> {int(mine)} AND backend_type = 'client backend'",
        )
        killed += sum(1 for r in rows if r[0])
        await asyncio.sleep(0.05)
    await sensor.finish()
    assert killed > 0

    async def all_stored() -> bool:
        return await stored_count(store) == len(items) and await consumer_drained(pub)

    await wait_until(all_stored, 30, "everything stored", lambda: _diag(store, pub))
    await assert_stored_exactly_once(store, {o["id"] for o in items})
    await assert_states_equal_oracle(store, items, sorted({o["attacker_uuid"] for o in items}))
    assert w.running


async def test_stats_do_not_count_rolled_back_attempts(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from decnet_attr.store.postgres import PostgresTx

    real = PostgresTx.write_states
    calls = {"n": 0}

    async def flaky(self: PostgresTx, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailable("postgresql unavailable: connection lost (injected)")
        await real(self, *args)

    monkeypatch.setattr(PostgresTx, "write_states", flaky)
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn)
    w = AttributionWorker(
        settings, await make_nats_bus(nats_srv.url, name="worker"), await make_store(pg_dsn)
    )
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    store = await make_store(pg_dsn)
    items = [mk_obs("stats-a", P_DRIFT, "steady", 10.0 + i) for i in range(5)]
    await publish_durable(pub, items)  # one batch
    await w.start()
    workers.append(w)

    async def stored() -> bool:
        return await stored_count(store) == 5 and await consumer_drained(pub)

    await wait_until(stored, 10, "stored")
    assert w.stats.batch_failures == 1  # the injected failure happened, and was retried
    await assert_states_equal_oracle(store, items, ["stats-a"])  # the data is right...
    assert (w.stats.merged, w.stats.identities_formed) == (5, 1)  # ...the counters are not


# ---- hostile events --------------------------------------------------------------------------


async def _dead_letters(store: Store) -> list[tuple[str, str, str, int]]:
    rows = await query(
        store, "SELECT event_id, topic, reason, length(payload) FROM dead_letters ORDER BY seq"
    )
    return [(r[0], r[1], r[2], int(r[3])) for r in rows]


async def test_hostile_events_on_the_real_bus(
    tmp_path: Path,
    nats_srv_big: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    srv = nats_srv_big  # max_payload 16 MiB, so that a 10 MB event reaches the worker
    settings = worker_settings(tmp_path, srv.url, pg_dsn)
    wbus = await make_nats_bus(srv.url, name="worker")
    w = AttributionWorker(settings, wbus, await make_store(pg_dsn))
    await w.start()
    workers.append(w)
    store = await make_store(pg_dsn)
    pub = await make_nats_bus(srv.url, name="sensor")
    p = P_ALT1
    good = mk_obs("hostile-a", p, "typed", 1.0)

    def bad(eid: str, **kw: Any) -> dict[str, Any]:
        out = {**good, "id": eid, **kw}
        return {k: v for k, v in out.items() if v is not _DROP}

    # (topic, payload, expected reason) through the NatsBus API
    cases: list[tuple[str, dict[str, Any], str]] = [
        (attacker_observation(p), bad("h-ts", ts="yesterday"), "ts must be a finite number"),
        (attacker_observation(p), bad("h-att", attacker_uuid=12345), "attacker_uuid"),
        (
            attacker_observation(P_NUM),
            bad("h-num", primitive=P_NUM, value={"fast": [1, 2]}),
            "not a finite number",
        ),
        (attacker_observation(p), bad("h-big", value="x" * 10_000_000), "above the limit"),
        (
            attacker_observation("made.up.primitive"),
            bad("h-unk", primitive="made.up.primitive"),
            "unknown primitive",
        ),
        (attacker_observation(p), bad("h-mis", primitive=P_ALT2), "does not match"),
        (attacker_observation(p), bad("h-conf", confidence="high"), "confidence"),
        (attacker_observation(p), bad("h-win", window="yesterday"), "window must be"),
        (attacker_observation(p), bad("bad id with spaces"), "id must be"),
        (attacker_observation(p), bad("h-noval", value=_DROP), "missing field value"),
        (attacker_observation(p), bad("h-ev", evidence_ref=["a", "b"]), "evidence_ref"),
    ]
    for topic, payload, _reason in cases:
        eid = (
            payload["id"]
            if isinstance(payload.get("id"), str) and " " not in payload["id"]
            else "h-id"
        )
        await pub.publish_durable(topic, payload, event_id=eid, timeout=10.0)
    # raw bytes straight through nats-py, durably (JetStream publish)
    js = pub._js
    assert js is not None
    undecodable = [
        b"\xff\xfe this is not JSON",
        b"[1, 2, 3]",
        b'{"v": 1, "id": "raw-str", "payload": "a string"}',
    ]
    for i, raw in enumerate(undecodable):
        await js.publish("attacker.observation.x", raw, headers={"Nats-Msg-Id": f"raw-{i}"})
    # decodable envelopes whose payloads are hostile reach the worker
    raw_rejected = [
        (attacker_observation(p), b'{"v": 1, "id": "raw-empty", "payload": {}}', "attacker_uuid"),
        (
            "attacker.observation.x",
            b'{"v": 1, "id": "raw-x", "payload": {"attacker_uuid": "a", "value": 1, "ts": 1}}',
            "unknown primitive",
        ),
    ]
    for topic, raw, _reason in raw_rejected:
        await js.publish(topic, raw)
    # undecodable messages are dead-lettered too, with their reason
    raw_rejected += [("attacker.observation.x", raw, "undecodable message") for raw in undecodable]
    n_rejected = len(cases) + len(raw_rejected)

    async def all_rejected() -> bool:
        return w.stats.rejected >= n_rejected and await consumer_drained(pub)

    await wait_until(all_rejected, 20, "hostile events handled", lambda: _diag(store, pub))
    assert w.running, "the worker survived"
    # then good events are still merged
    goods = [mk_obs("hostile-a", p, "typed", 2.0 + i) for i in range(4)]
    await publish_durable(pub, goods)

    async def goods_stored() -> bool:
        return await stored_count(store) == len(goods) and await consumer_drained(pub)

    await wait_until(
        goods_stored, 20, "good events after the hostile ones", lambda: _diag(store, pub)
    )
    await assert_states_equal_oracle(store, goods, ["hostile-a"])
    assert w.stats.rejected == n_rejected and w.stats.dead_lettered == n_rejected
    assert await store.dead_letter_count() == n_rejected
    letters = await _dead_letters(store)
    assert len(letters) == n_rejected
    expected = [(t, r) for t, _pl, r in cases] + [(t, r) for t, _raw, r in raw_rejected]
    got_by_reason = sorted((t, r) for _eid, t, r, _n in letters)
    for topic, reason in expected:
        assert any(t == topic and reason in r for t, r in got_by_reason), (
            topic,
            reason,
            got_by_reason,
        )
    big = [n for eid, _t, r, n in letters if "above the limit" in r]
    assert big and big[0] <= DEAD_LETTER_MAX_BYTES, (
        "the 10 MB payload is truncated in the dead letter"
    )
    # undecodable bytes never reach the worker: the bus terminates them (no
    # redelivery) and counts them
    assert wbus.stats()["invalid"] == len(undecodable)
    info = await consumer_info(pub)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


_DROP = object()


async def test_oversized_event_on_a_default_server(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    """nats-server's default max_payload is 1 MiB: a bigger durable publish
    fails at the publisher and nothing reaches the worker."""
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn)
    w = AttributionWorker(
        settings, await make_nats_bus(nats_srv.url, name="worker"), await make_store(pg_dsn)
    )
    await w.start()
    workers.append(w)
    store = await make_store(pg_dsn)
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    huge = mk_obs("big-a", P_ALT1, "x" * 2_000_000, 1.0)
    with pytest.raises(BusError):
        await pub.publish_durable(
            attacker_observation(P_ALT1), huge, event_id=huge["id"], timeout=5.0
        )
    ok = mk_obs("big-a", P_ALT1, "typed", 2.0)
    await publish_durable(pub, [ok])

    async def stored() -> bool:
        return await stored_count(store) == 1 and await consumer_drained(pub)

    await wait_until(stored, 10, "the next event stored")
    assert (w.stats.received, w.stats.rejected) == (1, 0)
    assert w.running


async def test_oversized_publish_is_not_reported_as_transient(
    nats_srv: NatsServer, make_nats_bus: NatsBusFactory
) -> None:
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    huge = mk_obs("big-a", P_ALT1, "x" * 2_000_000, 1.0)
    with pytest.raises(BusError) as info:
        await pub.publish_durable(
            attacker_observation(P_ALT1), huge, event_id=huge["id"], timeout=5.0
        )
    assert not isinstance(info.value, BusUnavailable), repr(info.value)


async def test_undecodable_bytes_are_dead_lettered(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn)
    w = AttributionWorker(
        settings, await make_nats_bus(nats_srv.url, name="worker"), await make_store(pg_dsn)
    )
    await w.start()
    workers.append(w)
    store = await make_store(pg_dsn)
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    js = pub._js
    assert js is not None
    await js.publish("attacker.observation.x", b"\xff\xfe not JSON")

    async def consumed() -> bool:
        return await consumer_drained(pub)

    await wait_until(consumed, 10, "consumed")
    await asyncio.sleep(0.2)
    assert w.stats.rejected == 1
    assert await store.dead_letter_count() == 1


async def test_nul_characters_do_not_poison_the_batch(
    tmp_path: Path,
    nats_srv: NatsServer,
    pg_dsn: str,
    make_nats_bus: NatsBusFactory,
    make_store: StoreFactory,
    workers: list[AttributionWorker],
) -> None:
    settings = worker_settings(tmp_path, nats_srv.url, pg_dsn, batch_delay=0.05)
    store = await make_store(pg_dsn)
    pub = await make_nats_bus(nats_srv.url, name="sensor")
    goods = [mk_obs("nul-a", P_ALT1, "typed", 1.0 + i) for i in range(3)]
    poison = {**mk_obs("nul-a", P_ALT1, "typed", 9.0), "source": "sensor\x00one"}
    # published before the worker starts: all of them land in its first batch
    await publish_durable(pub, [goods[0], poison, *goods[1:]], concurrency=1)
    js = pub._js
    assert js is not None
    await js.publish(
        attacker_observation(P_ALT1),
        b'{"v": 1, "id": "env\\u0000id", "payload": {"value": 1}}',  # rejected -> dead letter
    )
    w = AttributionWorker(
        settings, await make_nats_bus(nats_srv.url, name="worker"), await make_store(pg_dsn)
    )
    await w.start()
    workers.append(w)

    async def settled() -> bool:
        return await stored_count(store) == len(goods) and await store.dead_letter_count() == 2

    await wait_until(
        settled, 4, "good events merged, NUL events dead-lettered", lambda: _diag(store, pub)
    )
    await assert_states_equal_oracle(store, goods, ["nul-a"])
