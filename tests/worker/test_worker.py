"""The attribution worker on the embedded default (in-process bus + SQLite)
and, for the store-dependent behaviour, on PostgreSQL too."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from decnet_attr import Thresholds
from decnet_attr.bus import Bus, Delivery, Event
from decnet_attr.config import Settings
from decnet_attr.store import ObservationRow, Store
from decnet_attr.topics import OBSERVATION_BATCH, attacker_observation, system_control
from decnet_attr.worker import AttributionWorker
from decnet_attr.worker.recompute import explain_state, recompute
from tests import oracle
from tests.worker.helpers import mk_obs, oracle_states, publish_all, stored_states, wait_for

pytestmark = pytest.mark.timeout(120)


@dataclass
class FakeDelivery(Delivery):
    event: Event
    acked: bool = False
    naked: bool = False

    async def ack(self) -> None:
        self.acked = True

    async def nak(self, delay: float | None = None) -> None:
        self.naked = True

    @property
    def redelivered(self) -> bool:
        return False


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path, heartbeat_interval=0.2, multi_actor_tick=3600, batch_delay=0.001
    )


A = "attacker-a"


async def test_states_equal_the_oracle_and_events_follow_the_commit(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    seen: list[Event] = []
    rows_at_event: list[int] = []

    async def collect() -> None:
        async with bus.subscribe("attribution.>") as sub:
            async for ev in sub:
                if ev.topic.endswith("state_changed"):
                    # the row is committed before the event is published
                    ident = ev.payload["identity_uuid"]
                    row = await store.get_state(ident, ev.payload["primitive"])
                    rows_at_event.append(0 if row is None else row.observation_count)
                seen.append(ev)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.01)
    values = ["typed", "typed", "typed", "pasted", "typed", "pasted", "typed", "pasted"]
    obs = [mk_obs(A, "motor.input_modality", v, 100.0 + i) for i, v in enumerate(values)]
    obs += [mk_obs(A, "toolchain.c2.beacon_interval_ms", 1000 + i, 100.0 + i) for i in range(6)]
    for o in obs:  # one by one: every prefix goes through its own batch
        await publish_all(bus, [o])
    want = oracle_states(obs)
    got = await stored_states(store, [A])
    assert set(got) == set(want)
    for key, st in want.items():
        assert oracle.same(got[key], st), (key, got[key], st)
    await wait_for(lambda: sum(e.topic.endswith("state_changed") for e in seen) >= 3)
    task.cancel()
    changes = [e for e in seen if e.topic.endswith("state_changed")]
    assert all(n > 0 for n in rows_at_event)
    first = changes[0].payload
    assert first["old_state"] is None and first["new_state"] == "unknown"
    assert set(first) >= {
        "identity_uuid",
        "primitive",
        "old_state",
        "new_state",
        "current_value",
        "confidence",
        "observation_count",
        "ts",
        "attacker_uuids",
        "last_change_ts",
        "last_observation_ts",
    }
    assert first["attacker_uuids"] == [A]
    assert first["ts"] == first["last_observation_ts"]
    assert changes[0].type == "profile.state_changed"
    updates = [e for e in seen if e.topic == "attribution.profile.updated"]
    assert updates, "a row that changed without a state transition is announced as profile.updated"
    assert worker.stats.merged == len(obs)


async def test_last_change_ts_kept_while_state_holds(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    steady = [mk_obs(A, "motor.keystroke_cadence", "steady", float(t)) for t in range(6)]
    await publish_all(bus, steady[:2])  # unknown (too few)
    await publish_all(bus, steady[2:3])  # unknown → stable at ts 2
    await publish_all(bus, steady[3:])  # still stable: last_change_ts kept
    att = await store.get_attacker(A)
    assert att is not None and att.identity_id
    row = await store.get_state(att.identity_id, "motor.keystroke_cadence")
    assert row is not None
    assert (row.state, row.last_change_ts, row.last_observation_ts) == ("stable", 2.0, 5.0)
    assert row.version == 3
    assert row.previous_state == "unknown"  # the state before the last transition
    if store.lazy_windows:  # the window is written later, coalesced
        assert (row.window_json, row.window_seq) == (None, 0)
        await worker.checkpoint_all()
        row = await store.get_state(att.identity_id, "motor.keystroke_cadence")
        assert row is not None and row.window_seq == 6  # it covers the 6 stored observations
    assert json.loads(row.window_json or "{}")["count"] == 6


async def test_bad_events_are_dead_lettered_and_the_worker_lives(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    p = "motor.input_modality"
    good = mk_obs(A, p, "typed", 1.0)
    bad_payloads: list[tuple[str, Any, str]] = [
        (attacker_observation(p), "not a dict", "not_object: item must be a JSON object"),
        (
            attacker_observation(p),
            {**good, "id": "b1", "ts": "yesterday"},
            "ts must be a finite number",
        ),
        (
            attacker_observation(p),
            {**good, "id": "b2", "value": "x" * 10_000_000},
            "above the limit",
        ),
        (
            attacker_observation(p),
            {**good, "id": "b3", "primitive": "motor.keystroke_cadence"},
            "does not match",
        ),
        (
            attacker_observation("made.up.primitive"),
            {**good, "id": "b4", "primitive": "made.up.primitive"},
            "unknown primitive",
        ),
        ("attacker.observation.*", {**good, "id": "b5"}, "is not attacker.observation"),
        (attacker_observation(p), {**good, "id": "b6", "attacker_uuid": ""}, "attacker_uuid"),
        (
            attacker_observation("toolchain.c2.beacon_interval_ms"),
            {**good, "id": "b7", "primitive": "toolchain.c2.beacon_interval_ms", "value": "fast"},
            "value_not_numeric: toolchain.c2.beacon_interval_ms is numeric but the value",
        ),
        (attacker_observation(p), {**good, "id": "b8", "confidence": 7}, "bad_confidence"),
        (
            attacker_observation(p),
            {k: v for k, v in good.items() if k != "value"} | {"id": "b9"},
            "missing field value",
        ),
    ]
    deliveries = [
        FakeDelivery(Event(topic=t, payload=pl, id=f"e{i}"))
        for i, (t, pl, _r) in enumerate(bad_payloads)
    ]  # type: ignore[arg-type]
    deliveries.append(FakeDelivery(Event(topic=attacker_observation(p), payload=good, id="ok")))
    await worker.process(list(deliveries))  # type: ignore[arg-type]
    assert all(d.acked for d in deliveries), (
        "bad events are acked (dead-lettered), not redelivered forever"
    )
    assert worker.stats.rejected == len(bad_payloads)
    assert worker.stats.merged == 1
    assert await store.dead_letter_count() == len(bad_payloads)
    rows = await _dead_letters(store)
    for (_t, _p, reason), (_topic, got_reason) in zip(bad_payloads, rows):
        assert reason in got_reason, (reason, got_reason)
    # and the worker keeps consuming
    await publish_all(bus, [mk_obs(A, p, "typed", 2.0), mk_obs(A, p, "typed", 3.0)])
    assert (await stored_states(store, [A]))[("", p)].state == "stable"


async def _dead_letters(store: Store) -> list[tuple[str, str]]:
    from tests.worker.helpers import query

    return [
        (r[0], r[1])
        for r in await query(store, "SELECT topic, reason FROM dead_letters ORDER BY seq")
    ]


async def test_duplicates_are_stored_and_merged_once(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    o = mk_obs(A, "motor.input_modality", "typed", 1.0)
    await publish_all(bus, [o, o])
    await publish_all(bus, [o])
    same_evidence = {
        **mk_obs(A, "motor.input_modality", "pasted", 2.0),
        "evidence_ref": o["evidence_ref"],
    }
    await publish_all(bus, [same_evidence])
    st = (await stored_states(store, [A]))[("", "motor.input_modality")]
    assert st.observation_count == 1
    from tests.worker.helpers import query

    assert (await query(store, "SELECT count(*) FROM observations"))[0][0] == 1
    # the bus drops the repeated event ids; the store drops the repeated
    # (evidence_ref, primitive)
    assert (worker.stats.received, worker.stats.duplicates) == (2, 1)


async def test_identity_formed_once_per_attacker(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    formed: list[Event] = []

    async def collect() -> None:
        async with bus.subscribe("identity.>") as sub:
            async for ev in sub:
                formed.append(ev)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.01)
    await publish_all(
        bus, [mk_obs(A, "motor.input_modality", "typed", float(t), ip="10.0.0.7") for t in range(3)]
    )
    await publish_all(bus, [mk_obs(A, "motor.keystroke_cadence", "steady", 4.0)])
    await wait_for(lambda: len(formed) >= 1)
    await asyncio.sleep(0.05)
    task.cancel()
    assert len(formed) == 1
    att = await store.get_attacker(A)
    assert att is not None and att.ip == "10.0.0.7"
    assert formed[0].payload == {
        "identity_uuid": att.identity_id,
        "attacker_uuid": A,
        "ts": formed[0].payload["ts"],
    }


async def test_attacker_observed_registers_attackers(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    await asyncio.sleep(0.05)
    await bus.publish(
        "attacker.observed", {"attacker_uuid": "obs-1", "attacker_ip": "192.0.2.9", "ts": 5.0}
    )
    await wait_for(lambda: worker.stats.attackers_observed == 1)
    att = await store.get_attacker("obs-1")
    assert att is not None and att.ip == "192.0.2.9"


def alternation(
    attacker: str, prim: str, a: str, b: str, start: float, n: int = 5
) -> list[dict[str, Any]]:
    return [mk_obs(attacker, prim, a if i % 2 == 0 else b, start + i) for i in range(n)]


async def test_multi_actor_fires_dedupes_refires_and_rearms(
    settings: Settings, worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    fired: list[Event] = []

    async def collect() -> None:
        async with bus.subscribe("attribution.profile.multi_actor_suspected") as sub:
            async for ev in sub:
                fired.append(ev)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.01)
    await publish_all(bus, alternation(A, "motor.input_modality", "typed", "pasted", 0))
    assert fired == []  # one primitive is not enough
    await publish_all(bus, alternation(A, "environmental.shell_type", "bash", "zsh", 0))
    await wait_for(lambda: len(fired) == 1)
    p = fired[0].payload
    assert p["primitives"] == ["environmental.shell_type", "motor.input_modality"]
    assert p["evidence_summary"] == "2 primitives flagged multi_actor"
    assert p["confidence"] == 0.6 and p["attacker_uuids"] == [A]
    assert p["evidence"]["motor.input_modality"]["values"] == [
        "typed",
        "pasted",
        "typed",
        "pasted",
        "typed",
    ]
    # same set again (another alternating observation keeps both multi_actor): no re-fire
    await publish_all(bus, [mk_obs(A, "motor.input_modality", "pasted", 5.0)])
    await asyncio.sleep(0.05)
    assert len(fired) == 1
    # growth → re-fire
    await publish_all(bus, alternation(A, "motor.keystroke_cadence", "steady", "bursty", 0))
    await wait_for(lambda: len(fired) == 2)
    assert len(fired[1].payload["primitives"]) == 3
    # a restart does not re-fire (the dedupe is persisted)
    await worker.stop()
    w2 = AttributionWorker(settings, bus, store)
    await w2.start()
    try:
        assert await w2.tick_multi_actor() == 0
        # shrinking 3 → 2 is a different set: fires (DECNET semantics)
        await publish_all(
            bus, [mk_obs(A, "environmental.shell_type", "bash", 10.0 + i) for i in range(5)]
        )
        await wait_for(lambda: len(fired) == 3)
        assert fired[2].payload["primitives"] == ["motor.input_modality", "motor.keystroke_cadence"]
        # below 2 → re-armed, nothing fires
        await publish_all(
            bus, [mk_obs(A, "motor.keystroke_cadence", "steady", 10.0 + i) for i in range(5)]
        )
        await asyncio.sleep(0.05)
        assert len(fired) == 3
        # back to 2 → fires again
        await publish_all(bus, alternation(A, "environmental.shell_type", "bash", "zsh", 20))
        await wait_for(lambda: len(fired) == 4)
        assert fired[3].payload["primitives"] == [
            "environmental.shell_type",
            "motor.input_modality",
        ]
    finally:
        await w2.stop()
        task.cancel()


async def test_restart_rebuilds_from_stored_windows(
    settings: Settings, bus: Bus, store: Store
) -> None:
    obs = [mk_obs(A, "motor.input_modality", v, float(i)) for i, v in enumerate("aabababbbbbaab")]
    obs += [mk_obs(A, "motor.digraph_simhash", f"h{i % 4}", i * 20000.0) for i in range(12)]
    obs += [mk_obs(A, "toolchain.c2.beacon_interval_ms", 100 + 10 * i, float(i)) for i in range(12)]
    w1 = AttributionWorker(settings, bus, store)
    await w1.start()
    await publish_all(bus, obs[: len(obs) // 2])
    await w1.stop()
    w2 = AttributionWorker(settings, bus, store)  # fresh engine: nothing in memory
    await w2.start()
    assert len(w2.engine) == 0
    await publish_all(bus, obs[len(obs) // 2 :])
    await w2.stop()
    want = oracle_states(obs)
    got = await stored_states(store, [A])
    for key, st in want.items():
        assert oracle.same(got[key], st), key
    # no full-series reload: only the batch's keys were loaded, from windows
    assert len(w2.engine) == len({(o["primitive"]) for o in obs[len(obs) // 2 :]})


async def test_the_keys_of_an_identity_formed_in_the_batch_are_not_read(
    settings: Settings, bus: Bus, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing can have written state rows, multi-actor flags or a
    signature of an identity the batch's own transaction forms, so none are
    looked up (a new attacker's observations cost no reads); a worker
    meeting the identity again, with nothing of it in memory, reads them,
    and the states stay exact."""
    from decnet_attr.store.sqlite import SqliteTx

    asked: list[tuple[str, str]] = []
    flags_asked: list[str] = []
    load = SqliteTx.load_states
    primitives, signatures = SqliteTx.multi_actor_primitives, SqliteTx.multi_actor_signatures

    async def spy(self: SqliteTx, keys: Any, **kw: Any) -> Any:
        asked.extend(keys)
        return await load(self, keys, **kw)

    async def spy_primitives(self: SqliteTx, idents: Any) -> Any:
        flags_asked.extend(idents)
        return await primitives(self, idents)

    async def spy_signatures(self: SqliteTx, idents: Any, **kw: Any) -> Any:
        flags_asked.extend(idents)
        return await signatures(self, idents, **kw)

    monkeypatch.setattr(SqliteTx, "load_states", spy)
    monkeypatch.setattr(SqliteTx, "multi_actor_primitives", spy_primitives)
    monkeypatch.setattr(SqliteTx, "multi_actor_signatures", spy_signatures)
    first = [mk_obs(a, "motor.input_modality", "typed", 1.0) for a in ("new-1", "new-2")]
    first += [mk_obs("new-1", "toolchain.c2.beacon_interval_ms", 100, 2.0)]
    w1 = AttributionWorker(settings, bus, store)
    await w1.start()
    await publish_all(bus, first)
    await w1.stop()
    assert asked == [] and flags_asked == []
    later = [mk_obs("new-1", "motor.input_modality", "pasted", 3.0)]
    w2 = AttributionWorker(settings, bus, store)  # holds no row of new-1's identity
    await w2.start()
    await publish_all(bus, later)
    await w2.stop()
    assert [k[1] for k in asked] == ["motor.input_modality"]
    assert len(flags_asked) == 2  # its flags and its signature
    want = oracle_states(first + later)
    got = await stored_states(store, ["new-1", "new-2"])
    assert set(got) == set(want)
    for key, st in want.items():
        assert oracle.same(got[key], st), key


async def test_stored_but_unmerged_observations_are_merged_on_start(
    settings: Settings, bus: Bus, store: Store
) -> None:
    async with store.transaction() as tx:
        await tx.ensure_attackers([(A, None, 1.0)])
        await tx.insert_observations(
            [
                ObservationRow(
                    id=f"imp-{i}",
                    attacker_uuid=A,
                    primitive="motor.input_modality",
                    value_json='"typed"',
                    ts=float(i),
                    evidence_ref=f"import:{i}",
                    merged=False,
                )
                for i in range(4)
            ]
        )
    w = AttributionWorker(settings, bus, store)
    await w.start()
    await w.stop()
    st = (await stored_states(store, [A]))[("", "motor.input_modality")]
    assert (st.state, st.observation_count) == ("stable", 4)
    assert await store.pending_observations(after_seq=0, limit=10) == []


async def test_control_stop_stops_only_the_worker(worker: AttributionWorker, bus: Bus) -> None:
    await asyncio.sleep(0.05)
    await bus.publish(system_control("attribution"), {"action": "stop", "requested_by": "test"})
    await asyncio.wait_for(worker.wait_stopped(), 5)
    await wait_for(lambda: not worker.running)
    # the process (this test) is alive and the bus still works
    assert not bus.closed


async def test_a_defect_in_the_worker_stops_it_loudly(
    worker: AttributionWorker, bus: Bus, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """An exception that is neither the data's (refused before it gets that
    far) nor the store's or bus's (retried) is a defect in this code: the
    worker says so and stops, so that its supervisor restarts it, instead
    of staying up without a consumer."""

    def defect(*_args: Any) -> Any:
        raise TypeError("a defect (injected)")

    monkeypatch.setattr(worker, "_prepare", defect)
    o = mk_obs(A, "motor.input_modality", "typed", 1.0)
    await bus.publish(attacker_observation(o["primitive"]), o, event_id=o["id"])
    await asyncio.wait_for(worker.wait_stopped(), 5)
    await wait_for(lambda: not worker.running)
    assert isinstance(worker.failure, TypeError)
    assert any(
        r.levelname == "CRITICAL" and "a defect (injected)" in r.getMessage()
        for r in caplog.records
    )


async def test_health_heartbeat_carries_counters(worker: AttributionWorker, bus: Bus) -> None:
    async with bus.subscribe("system.attribution.health") as sub:
        ev = await asyncio.wait_for(sub.__anext__(), 5)
    assert {"worker", "ts", "received", "merged", "rejected", "dropped", "lag"} <= set(ev.payload)


async def test_recompute_after_a_threshold_change(
    settings: Settings, worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    obs = [mk_obs(A, "motor.input_modality", v, float(i)) for i, v in enumerate("aaaab")]
    await publish_all(bus, obs)
    report = await recompute(store, settings, dry_run=True)
    assert report["changed"] == []
    stricter = settings.replace(thresholds=json.dumps({"majority": 5}))
    report = await recompute(store, stricter, dry_run=False)
    assert [(c["old_state"], c["new_state"]) for c in report["changed"]] == [
        ("stable", "conflicted")
    ]
    st = (await stored_states(store, [A]))[("", "motor.input_modality")]
    want = oracle.aggregate(obs)
    assert st.state == "conflicted" and want.state == "stable"
    ex = await explain_state(store, stricter, A, "motor.input_modality")
    assert ex is not None and ex["rule"] == "no_clear_majority"
    assert ex["thresholds"]["majority"] == 5
    assert Thresholds(majority=5).majority == 5


async def test_a_batch_with_bad_items_applies_all_the_others(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    """An API batch where one item in ten nests deeper than the engine takes:
    the validator refuses exactly those (dead letters with their code), the
    others merge in the same commit — no bisection, no redelivery."""
    from decnet_attr.topics import EVENT_TYPE_OBSERVATION_BATCH

    p = "environmental.shell_type"
    items = [mk_obs(f"att-{i % 7}", p, "bash", 1_700_000_000.0 + i) for i in range(100)]
    for i in range(0, 100, 10):
        items[i]["value"] = orjson.loads("[" * 40 + "1" + "]" * 40)
    text = "".join(orjson.dumps(o).decode() + "\n" for o in items)
    await bus.publish_durable(
        OBSERVATION_BATCH,
        {"ndjson": text, "count": len(items)},
        event_type=EVENT_TYPE_OBSERVATION_BATCH,
        event_id="batch-1",
    )
    assert worker.stats.merged == 90
    assert worker.stats.rejected == 10
    assert worker.stats.batch_failures == 0
    letters = await _dead_letters(store)
    assert len(letters) == 10
    assert all(r.startswith("value_too_deep: ") for _t, r in letters)
    good = [o for i, o in enumerate(items) if i % 10]
    got = await stored_states(store, sorted({o["attacker_uuid"] for o in good}))
    want = oracle_states(good)
    assert set(got) == set(want)
    for key, st in want.items():
        assert oracle.same(got[key], st), key


async def test_a_crash_after_lazy_windows_replays_what_they_do_not_cover(
    settings: Settings, bus: Bus, store: Store
) -> None:
    """Windows written at some seq, more batches merged after it, then a
    crash before the next window write: the restarted worker loads each
    window and replays the stored observations past its seq — exact."""
    import dataclasses

    if not store.lazy_windows:
        pytest.skip("the store writes windows with every batch")
    obs = [mk_obs(A, "motor.input_modality", v, float(i)) for i, v in enumerate("aabababbbbbaab")]
    obs += [mk_obs(A, "toolchain.c2.beacon_interval_ms", 100 + 10 * i, float(i)) for i in range(12)]
    obs.sort(key=lambda o: o["ts"])
    first, rest = obs[:10], obs[10:]
    eager = AttributionWorker(dataclasses.replace(settings, window_checkpoint=0.0), bus, store)
    await eager.start()
    await publish_all(bus, first)  # every batch writes its windows
    await eager.stop()
    lazy = AttributionWorker(dataclasses.replace(settings, window_checkpoint=3600.0), bus, store)
    await lazy.start()
    for o in rest:  # one batch each, none writes a window
        await publish_all(bus, [o])
    lazy.checkpoint_all = _no_checkpoint  # type: ignore[method-assign]  # the crash
    await lazy.stop()
    att = await store.get_attacker(A)
    assert att is not None and att.identity_id
    stale = await store.get_state(att.identity_id, "motor.input_modality")
    assert stale is not None and 0 < (stale.window_seq or 0) < len(obs)
    # explain reads the stale window plus the observations past it
    ex = await explain_state(store, settings, A, "motor.input_modality")
    assert ex is not None
    modality = oracle_states(obs)[("", "motor.input_modality")]
    assert ex["state"]["observation_count"] == modality.observation_count
    assert ex["state"]["state"] == modality.state
    w2 = AttributionWorker(settings, bus, store)
    await w2.start()
    await publish_all(bus, [mk_obs(A, "motor.input_modality", "a", 100.0)])
    await publish_all(bus, [mk_obs(A, "toolchain.c2.beacon_interval_ms", 300, 100.0)])
    await w2.stop()
    everything = [*obs, mk_obs(A, "motor.input_modality", "a", 100.0)]
    everything.append(mk_obs(A, "toolchain.c2.beacon_interval_ms", 300, 100.0))
    want = oracle_states(everything)
    got = await stored_states(store, [A])
    for key, st in want.items():
        assert oracle.same(got[key], st), key


async def _no_checkpoint() -> None:
    return None


async def test_a_conflicting_transaction_is_run_again_not_split(
    worker: AttributionWorker, bus: Bus, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction that lost to a concurrent one (StoreConflict, typed) is
    retried whole; any other store error splits the batch."""
    from decnet_attr.store import StoreConflict

    real = worker._commit
    calls = {"n": 0}

    async def once_conflicting(batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreConflict("deadlock detected")
        return await real(batch)

    monkeypatch.setattr(worker, "_commit", once_conflicting)
    obs = [mk_obs(A, "environmental.shell_type", "bash", float(i)) for i in range(3)]
    await bus.publish_durable(
        OBSERVATION_BATCH,
        {"ndjson": "".join(orjson.dumps(o).decode() + "\n" for o in obs), "count": 3},
        event_id="conflict-1",
    )
    assert calls["n"] == 2  # once more, whole: not split into halves
    assert worker.stats.merged == 3 and worker.stats.batch_failures == 1
    assert await store.dead_letter_count() == 0


@pytest.mark.parametrize(
    "ndjson",
    [
        "[1, 2]",  # a JSON array, not NDJSON
        "5",  # one line, not an object
        '  \n[{"a": 1}]',
        "\x0c\n{}",
        "{}\n \t\n[]\n7",  # a whitespace-only line among bad items
    ],
)
async def test_a_malformed_batch_message_is_dead_lettered_and_the_worker_lives(
    worker: AttributionWorker, bus: Bus, store: Store, ndjson: str
) -> None:
    """A batch message on the bus is NDJSON: each non-blank line is one
    item. Whatever a publisher puts there (an array, a scalar, odd
    whitespace), every bad line is dead-lettered with its own text, the good
    lines of the same message are merged, and the worker goes on."""
    import sqlite3

    good = mk_obs(A, "environmental.shell_type", "bash", 1.0)
    text = ndjson + "\n" + orjson.dumps(good).decode() + "\n"
    await asyncio.wait_for(
        bus.publish_durable(OBSERVATION_BATCH, {"ndjson": text, "count": 2}, event_id="bad-1"),
        5,
    )
    assert worker.running
    assert worker.stats.merged == 1
    bad = [ln for ln in ndjson.split("\n") if ln.strip(" \t\r\x0c")]
    assert worker.stats.rejected == len(bad) and await store.dead_letter_count() == len(bad)
    db = sqlite3.connect(store.path)  # type: ignore[attr-defined]
    try:
        letters = db.execute("SELECT payload FROM dead_letters ORDER BY seq").fetchall()
    finally:
        db.close()
    assert [p for (p,) in letters] == bad  # each with its own line
    # and the next message is processed as usual
    later = mk_obs(A, "environmental.shell_type", "zsh", 2.0)
    await bus.publish_durable(
        OBSERVATION_BATCH,
        {"ndjson": orjson.dumps(later).decode(), "count": 1},
        event_id="good-2",
    )
    assert worker.stats.merged == 2


async def test_a_row_the_store_refuses_in_a_deferred_write_dead_letters_only_it(
    worker: AttributionWorker, bus: Bus, store: Store
) -> None:
    """On SQLite a batch's observation rows are written on the writer thread
    while the worker goes on (a deferred write). If the store refuses one,
    the COMMIT fails, nothing of the batch is kept, the batch is split, and
    only that observation becomes a dead letter: the others are stored once
    and merged as the oracle says."""
    import sqlite3

    assert store.dialect == "sqlite"
    await store._w.execute(  # type: ignore[attr-defined]
        "CREATE TRIGGER poison BEFORE INSERT ON observations WHEN NEW.id = 'obs-poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
    )
    obs = [mk_obs(A, "environmental.shell_type", v, float(i)) for i, v in enumerate("abbabb")]
    obs[3]["id"] = "obs-poison"
    await bus.publish_durable(
        OBSERVATION_BATCH,
        {"ndjson": "".join(orjson.dumps(o).decode() + "\n" for o in obs), "count": len(obs)},
        event_id="poison-1",
    )
    assert worker.stats.merged == 5 and worker.stats.batch_failures >= 1
    db = sqlite3.connect(store.path)  # type: ignore[attr-defined]
    try:
        (letter,) = db.execute("SELECT event_id, reason FROM dead_letters").fetchall()
        ids = sorted(r[0] for r in db.execute("SELECT id FROM observations"))
    finally:
        db.close()
    assert letter[0] == "obs-poison" and letter[1].startswith("store_refused: ")
    assert "poisoned row" in letter[1]
    kept = [o for o in obs if o["id"] != "obs-poison"]
    assert ids == sorted(o["id"] for o in kept)
    want = oracle_states(kept)
    got = await stored_states(store, [A])
    for key, st in want.items():
        assert oracle.same(got[key], st), key


@pytest.mark.parametrize("poisoned", [(100,), (37, 100, 181, 239)], ids=["one", "four"])
async def test_a_refused_row_with_later_batches_in_flight_costs_only_it(
    settings: Settings, bus: Bus, store: Store, poisoned: tuple[int, ...]
) -> None:
    """On SQLite the next batch is built while the store commits the one
    before (pipelined). If a row of one batch is refused, the batches built
    on it fail too and run again: in the end only the refused observation is
    a dead letter, every other one is stored once, and the states equal the
    oracle."""
    import dataclasses
    import sqlite3

    worker = AttributionWorker(dataclasses.replace(settings, batch_max=30), bus, store)
    assert worker.pipelined
    await store._w.execute(  # type: ignore[attr-defined]
        "CREATE TRIGGER poison BEFORE INSERT ON observations WHEN NEW.id LIKE 'obs-poison%' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
    )
    attackers = [f"att-{i}" for i in range(4)]
    obs = [
        mk_obs(attackers[i % 4], "environmental.shell_type", "ab"[(i // 4) % 2], float(i))
        for i in range(240)
    ]
    for n in poisoned:
        obs[n]["id"] = f"obs-poison-{n}"
    messages = [obs[i : i + 30] for i in range(0, len(obs), 30)]
    await worker.start()
    try:
        await asyncio.gather(
            *(
                bus.publish_durable(
                    OBSERVATION_BATCH,
                    {"ndjson": "".join(orjson.dumps(o).decode() + "\n" for o in m), "count": 30},
                    event_id=f"msg-{n}",
                )
                for n, m in enumerate(messages)
            )
        )
        await wait_for(lambda: worker.stats.merged == len(obs) - len(poisoned), timeout=30)
    finally:
        await worker.stop()
    db = sqlite3.connect(store.path)  # type: ignore[attr-defined]
    try:
        letters = [r[0] for r in db.execute("SELECT event_id FROM dead_letters")]
        ids = [r[0] for r in db.execute("SELECT id FROM observations")]
    finally:
        db.close()
    assert sorted(letters) == sorted(f"obs-poison-{n}" for n in poisoned)
    kept = [o for o in obs if not o["id"].startswith("obs-poison")]
    assert sorted(ids) == sorted(o["id"] for o in kept)  # each once
    want = oracle_states(kept)
    got = await stored_states(store, attackers)
    assert set(got) == set(want)
    for key, st in want.items():
        assert oracle.same(got[key], st), key


async def test_a_subscriber_on_the_configured_bus_takes_a_whole_batch_of_events(
    settings: Settings, store: Store
) -> None:
    """One batch touching more keys than a default subscriber queue holds
    publishes one event per key at once: a subscriber of the bus ``serve``
    builds (the SSE relay is one) must take them all without dropping."""
    from decnet_attr.bus import get_bus

    bus = get_bus("memory://", **settings.bus_options())
    await bus.connect()
    worker = AttributionWorker(settings, bus, store)
    await worker.start()
    sub = bus.subscribe("attribution.>")
    try:
        n = settings.batch_max
        items = [
            mk_obs(f"wide-{i:05d}", "environmental.shell_type", "bash", 1_000_000.0 + i)
            for i in range(n)
        ]
        text = "".join(orjson.dumps(o).decode() + "\n" for o in items)
        await bus.publish(OBSERVATION_BATCH, {"ndjson": text, "count": n}, event_id="wide")
        await wait_for(lambda: worker.stats.merged == n, timeout=30)
        await asyncio.sleep(0.05)
        assert sub.dropped == 0
    finally:
        await sub.aclose()
        await worker.stop()
        await bus.close()
