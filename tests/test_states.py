"""``StateTable`` and ``StateWrite``: a batch's state rows and events built
in Rust from the engine's change records, checked against the rules written
out here in Python (version, last change, previous state), the column order
the store binds, and the event payloads the worker publishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet_attr import Engine
from decnet_attr._core import STATE_VALUE_COLUMNS, StateTable
from decnet_attr.registry import value_kind_for
from decnet_attr.store.base import StateRow
from decnet_attr.store.sqlite import SqliteStore

PRIM = "motor.input_modality"
CHANGED = ("t.changed", "state_changed")
UPDATED = ("t.updated", "profile_updated")


def _obs(identity: str, value: Any, ts: float, primitive: str = PRIM) -> dict[str, Any]:
    return {"identity_uuid": identity, "primitive": primitive, "value": value, "ts": ts}


def _stored(
    identity: str, state: str, version: int, last_change: float, previous: str | None
) -> StateRow:
    return StateRow(
        identity, PRIM, '"x"', state, 0.5, 3, last_change, last_change, version=version,
        previous_state=previous,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abc"), min_size=1, max_size=6), min_size=1, max_size=12))
def test_rows_follow_the_rules_batch_after_batch(batches: list[list[str]]) -> None:
    """Version +1 per write; the last change and the previous state move
    only when the state differs from the row before."""
    engine, table = Engine(), StateTable(value_kind_for)
    ts = 0.0
    model: tuple[str, int, float, str | None] | None = None  # state, version, last change, previous
    for values in batches:
        obs = []
        for v in values:
            ts += 1.0
            obs.append(_obs("i1", v, ts))
        (row,) = table.write(engine.ingest(obs), None, 1000.0).rows(StateRow)
        if model is None:
            model = (row.state, 1, ts, None)
        elif model[0] != row.state:
            model = (row.state, model[1] + 1, ts, model[0])
        else:
            model = (row.state, model[1] + 1, model[2], model[3])
        assert (row.state, row.version, row.last_change_ts, row.previous_state) == model
        assert row.last_observation_ts == ts
        assert ("i1", PRIM) in table
        assert table.version("i1", PRIM) == model[1]


def test_a_key_not_held_builds_on_the_loaded_row_and_a_held_one_on_its_own() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    loaded = {("i1", PRIM): _stored("i1", "drifting", 7, 5.0, "stable")}
    (row,) = table.write(engine.ingest([_obs("i1", "typed", 10.0)]), loaded, 1.0).rows(StateRow)
    assert (row.version, row.previous_state, row.last_change_ts) == (8, "drifting", 10.0)
    # held now: the loaded row (older) is not looked at again
    (row,) = table.write(engine.ingest([_obs("i1", "typed", 11.0)]), loaded, 2.0).rows(StateRow)
    assert row.version == 9
    table.forget([("i1", PRIM)])
    assert ("i1", PRIM) not in table and len(table) == 0
    (row,) = table.write(engine.ingest([_obs("i1", "typed", 12.0)]), loaded, 3.0).rows(StateRow)
    assert row.version == 8


def test_without_remember_nothing_is_held() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    table.write(engine.ingest([_obs("i1", "typed", 1.0)]), None, 1.0, remember=False)
    assert len(table) == 0
    assert table.missing([("i1", PRIM)]) == [("i1", PRIM)]


def test_a_table_over_its_limit_is_emptied_before_it_holds_the_batch() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    first = table.write(engine.ingest([_obs(f"i{n}", "typed", 1.0) for n in range(5)]), None, 1.0)
    assert not first.cleared and len(table) == 5
    second = table.write(engine.ingest([_obs("j", "typed", 2.0)]), None, 2.0, limit=3)
    assert second.cleared and len(table) == 1
    assert table.missing([("i0", PRIM), ("j", PRIM)]) == [("i0", PRIM)]


def test_params_bind_the_columns_in_order_updates_apart_from_inserts() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    loaded = {("old", PRIM): _stored("old", "stable", 2, 5.0, None)}
    batch = [_obs("old", "typed", 10.0), _obs("new", {"k": [1, 2]}, 11.0, "environmental.locale")]
    states = table.write(engine.ingest(batch), loaded, 99.0)
    updates, inserts = states.params()
    (update,) = updates
    (insert,) = inserts
    cols = len(STATE_VALUE_COLUMNS)
    assert update[cols:] == ("old", PRIM)
    assert insert[:2] == ("new", "environmental.locale")
    up = dict(zip(STATE_VALUE_COLUMNS, update[:cols], strict=True))
    ins = dict(zip(STATE_VALUE_COLUMNS, insert[2:], strict=True))
    rows = {r.identity_uuid: r for r in states.rows(StateRow)}
    for got, row in ((up, rows["old"]), (ins, rows["new"])):
        assert got == {
            "current_value": row.current_value_json,
            "state": row.state,
            "confidence": row.confidence,
            "observation_count": row.observation_count,
            "last_change_ts": row.last_change_ts,
            "last_observation_ts": row.last_observation_ts,
            "kind": value_kind_for(row.primitive),
            "version": row.version,
            "updated_at": 99.0,
            "previous_state": row.previous_state,
        }
    assert ins["current_value"] == '{"k":[1,2]}'
    assert up["version"] == 3


def test_rows_carry_the_windows_given() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    states = table.write(engine.ingest([_obs("a", 1, 1.0), _obs("b", 2, 1.0)]), None, 1.0)
    rows = states.rows(StateRow, ["w-a", None])
    assert [(r.identity_uuid, r.window_json) for r in rows] == [("a", "w-a"), ("b", None)]
    assert states.keys() == [("a", PRIM), ("b", PRIM)]
    assert states.identities() == ["a", "b"]


def test_events_say_changed_only_where_the_state_differs_from_the_row_before() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    state = engine.ingest([_obs("same", "typed", 1.0)])[0].state.state
    loaded = {("same", PRIM): _stored("same", state, 4, 0.5, None)}
    batch = [_obs("same", "typed", 1.0), _obs("fresh", "typed", 2.0)]
    engine = Engine()
    states = table.write(engine.ingest(batch), loaded, 50.0)
    who = ["a1", "a2"]
    events, changed = states.events({"same": who}, CHANGED, UPDATED)
    assert changed == 1
    (t1, same, e1), (t2, fresh, e2) = events
    assert (t1, e1) == UPDATED and (t2, e2) == CHANGED
    assert list(same) == [
        "identity_uuid", "primitive", "old_state", "new_state", "current_value", "confidence",
        "observation_count", "ts", "attacker_uuids", "last_change_ts", "last_observation_ts",
        "emitted_at", "version",
    ]  # fmt: skip
    assert same["attacker_uuids"] is who
    assert (same["old_state"], same["new_state"], same["version"]) == (state, state, 5)
    assert (same["last_change_ts"], same["ts"], same["emitted_at"]) == (0.5, 1.0, 50.0)
    assert same["current_value"] == "typed"
    assert fresh["old_state"] is None and fresh["attacker_uuids"] == []
    assert (fresh["version"], fresh["last_change_ts"]) == (1, 2.0)
    # each payload is a dict of its own (they are made as copies of one)
    same["version"] = -1
    assert fresh["version"] == 1
    assert fresh is not same and fresh["primitive"] == same["primitive"] == PRIM


def test_multi_lists_every_row_of_an_identity_with_a_multi_actor_row() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    other = "environmental.locale"
    loaded = {("m", PRIM): _stored("m", "multi_actor", 2, 1.0, None)}
    batch = [_obs("m", "typed", 5.0), _obs("m", "en", 5.0, other), _obs("plain", "typed", 5.0)]
    states = table.write(engine.ingest(batch), loaded, 9.0)
    got = sorted(states.multi())
    assert [(i, p, before) for i, p, _s, before in got] == [
        ("m", other, None),
        ("m", PRIM, "multi_actor"),
    ]


def test_a_kind_is_asked_once_per_primitive() -> None:
    asked: list[str] = []

    def kind_of(primitive: str) -> str:
        asked.append(primitive)
        return "categorical"

    engine, table = Engine(), StateTable(kind_of)
    for ts in (1.0, 2.0):
        table.write(engine.ingest([_obs("a", "x", ts), _obs("b", "y", ts)]), None, ts)
    assert asked == [PRIM]


def test_a_kind_that_is_not_text_is_an_error() -> None:
    engine, table = Engine(), StateTable(lambda _p: 3)
    with pytest.raises(TypeError):
        table.write(engine.ingest([_obs("a", "x", 1.0)]), None, 1.0)


def test_written_keys_wait_for_their_windows_oldest_first_keeping_their_first_time() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    table.write(engine.ingest([_obs("a", "x", 1.0), _obs("b", "x", 1.0)]), None, 10.0)
    table.write(engine.ingest([_obs("c", "x", 2.0), _obs("a", "y", 2.0)]), None, 20.0)
    assert table.pending == 3
    # "a" changed again at 20 but has waited since 10
    assert table.take_pending(15.0) == [("a", PRIM), ("b", PRIM)]
    assert table.pending == 1
    assert table.take_pending(15.0) == []
    table.write(engine.ingest([_obs("a", "z", 3.0)]), None, 30.0)
    assert table.take_pending(limit=1) == [("c", PRIM)]
    assert table.take_pending() == [("a", PRIM)]
    assert table.pending == 0


def test_pending_keys_outlive_forget_and_clear_but_not_settle() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    table.write(engine.ingest([_obs(f"i{n}", "x", 1.0) for n in range(4)]), None, 1.0)
    table.forget([("i0", PRIM)])  # the row is read again; the window still waits
    table.write(engine.ingest([_obs("j", "x", 2.0)]), None, 2.0, limit=2)  # clears the rows
    assert len(table) == 1 and table.pending == 5
    table.settle([("i1", PRIM), ("nobody", PRIM)])
    assert table.take_pending() == [("i0", PRIM), ("i2", PRIM), ("i3", PRIM), ("j", PRIM)]
    # a key settled, then written again, waits from its new time
    table.write(engine.ingest([_obs("i1", "y", 3.0)]), None, 3.0)
    table.settle([("i1", PRIM)])
    table.write(engine.ingest([_obs("i1", "z", 4.0)]), None, 4.0)
    assert table.take_pending(3.5) == []
    assert table.take_pending(4.0) == [("i1", PRIM)]


def test_without_remember_no_window_waits() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    table.write(engine.ingest([_obs("a", "x", 1.0)]), None, 1.0, remember=False)
    assert table.pending == 0 and table.take_pending() == []


def test_write_current_builds_the_engines_states_by_the_same_rules() -> None:
    engine, table = Engine(), StateTable(value_kind_for)
    engine.ingest([_obs("a", "x", 1.0), _obs("a", "x", 2.0), _obs("b", "y", 3.0)])
    loaded = {("a", PRIM): _stored("a", "drifting", 4, 0.5, "stable")}
    states = table.write_current(engine, [("a", PRIM), ("b", PRIM), ("gone", PRIM)], loaded, 9.0)
    a, b = states.rows(StateRow)
    assert states.keys() == [("a", PRIM), ("b", PRIM)]  # a key the engine lacks is left out
    held = {r.identity_uuid: engine.get(r.identity_uuid, PRIM) for r in (a, b)}
    for row in (a, b):
        st = held[row.identity_uuid]
        assert st is not None
        assert (row.state, row.observation_count) == (st.state, st.observation_count)
        assert row.last_observation_ts == st.last_observation_ts
    assert (a.version, a.previous_state, a.last_change_ts) == (5, "drifting", 2.0)
    assert (b.version, b.previous_state, b.last_change_ts) == (1, None, 3.0)
    events, changed = states.events({"a": ["x1"]}, CHANGED, UPDATED)
    assert changed == 2 and [e[1]["old_state"] for e in events] == ["drifting", None]
    assert len(table) == 0 and table.pending == 0  # not remembered unless asked


async def _store_with_an_identity(path: Path, *, native: bool = True) -> tuple[SqliteStore, str]:
    """An open SQLite store (its native writer or aiosqlite) holding one
    attacker and its identity; the identity's uuid."""
    store = SqliteStore(path)
    store.native_writer = native
    await store.open()
    async with store.transaction() as tx:
        await tx.ensure_attackers([("a1", None, 0.0)])
        ident = (await tx.ensure_identities(["a1"], 0.0))[0]["a1"]
    return store, ident


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abc"), min_size=1, max_size=6), min_size=2, max_size=8))
def test_the_store_holds_the_rows_written_whether_the_state_stays_or_changes(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[str]]
) -> None:
    """The SQLite writer updates a row whose state stays with a statement
    that leaves the state columns alone: what it stores equals the row
    written, batch after batch, as for a row whose state changes."""
    import asyncio

    path = tmp_path_factory.mktemp("states") / "attr.db"

    async def run() -> None:
        store, ident = await _store_with_an_identity(path)
        try:
            engine, table = Engine(), StateTable(value_kind_for)
            ts = 0.0
            for values in batches:
                obs = []
                for v in values:
                    ts += 1.0
                    obs.append(_obs(ident, v, ts))
                states = table.write(engine.ingest(obs), None, 1000.0)
                (want,) = states.rows(StateRow)
                async with store.transaction() as tx:
                    await tx.upsert_state_values(states)
                got = await store.get_state(ident, PRIM)
                assert got is not None
                fields = (
                    "state", "previous_state", "version", "last_change_ts", "last_observation_ts",
                    "observation_count", "confidence", "current_value_json",
                )  # fmt: skip
                assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields]
        finally:
            await store.close()

    asyncio.run(run())


@pytest.mark.parametrize("native", [True, False])
async def test_windows_saved_from_the_engine_are_its_exports(
    tmp_path_factory: pytest.TempPathFactory, native: bool
) -> None:
    """``save_windows_of``: each key the engine holds gets its exported
    window and the seq it covers; a key it does not hold keeps its row as
    it was (the native writer takes the windows straight from the engine)."""
    store, ident = await _store_with_an_identity(
        tmp_path_factory.mktemp("windows") / "attr.db", native=native
    )
    try:
        engine, table = Engine(), StateTable(value_kind_for)
        other = "environmental.locale"
        states = table.write(
            engine.ingest([_obs(ident, "typed", 1.0), _obs(ident, "en", 2.0, other)]), None, 5.0
        )
        async with store.transaction() as tx:
            await tx.upsert_state_values(states)
        engine.evict([(ident, other)])
        async with store.transaction() as tx:
            await tx.save_windows_of(engine, [(ident, PRIM), (ident, other)], 7)
        async with store.transaction() as tx:
            held = await tx.load_states([(ident, PRIM), (ident, other)])
        assert held[(ident, PRIM)].window_json == engine.export_window(ident, PRIM)
        assert held[(ident, PRIM)].window_seq == 7
        assert held[(ident, other)].window_json is None
        assert held[(ident, other)].window_seq == 0  # as the new row was written
    finally:
        await store.close()


def _one_per_kind() -> list[str]:
    from decnet_attr.registry import registry

    out: dict[str, str] = {}
    for p in registry().primitives.values():
        out.setdefault(p.kind, p.name)
    return sorted(out.values())


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_VALUES = st.one_of(
    _JSON_SCALARS,
    st.lists(_JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), _JSON_SCALARS, max_size=3),
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", 'c"\\\n\u00e9']), st.sampled_from(_one_per_kind()),
                  _VALUES),
        min_size=1, max_size=10,
    ),
    st.lists(st.text(max_size=6), max_size=3),
    st.floats(min_value=0, max_value=4e9),
)  # fmt: skip
def test_wire_events_are_the_events_encoded(
    items: list[tuple[str, str, Any]], who: list[str], now: float
) -> None:
    """``wire_events`` gives, once parsed, the envelope a bus would make of
    ``events``: same topics, types, ids, ts and payloads (integers beyond
    64 bits included, which orjson does not encode)."""
    import json

    from decnet_attr.bus.base import envelope

    engine, table = Engine(), StateTable(value_kind_for)
    obs = [_obs(i, v, 1.0 + k, p) for k, (i, p, v) in enumerate(items)]
    result = engine.ingest(obs)
    loaded = {("a", PRIM): _stored("a", "stable", 4, 0.5, None)}
    states = table.write(result, loaded, now)
    attackers = {"a": who, "b": ["x1", "x\u00e9"]}
    events, changed = states.events(attackers, CHANGED, UPDATED)
    wire, wire_changed = states.wire_events(attackers, CHANGED, UPDATED, "pre-", 41, 1)
    assert wire_changed == changed and len(wire) == len(events) == len(states)
    for k, ((topic, payload, kind), (wtopic, data, wkind)) in enumerate(zip(events, wire)):
        assert (wtopic, wkind) == (topic, kind) and isinstance(data, bytes)
        want = envelope(1, f"pre-{41 + k:x}", topic, kind, now, payload)
        got = json.loads(data)
        assert got == json.loads(json.dumps(want))
        assert list(got) == list(want) and list(got["payload"]) == list(payload)  # key order
