"""Property tests of the Rust core against the pure-Python oracle."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from decnet_attr import Engine, aggregate_observations
from tests import oracle

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cat_values = st.one_of(
    st.sampled_from(["a", "b", "c", "ünï", "日本", ""]),
    st.none(),
    st.booleans(),
    st.integers(min_value=-1, max_value=2),
    st.sampled_from([0.0, 1.0, 1.5, -0.0, 2.0]),
    st.sampled_from([[1, 2], ["x"], [1.0, 2], [], [True]]),
    st.sampled_from([{"a": 1}, {"b": [1.0], "a": None}, {"a": 1.0}]),
)
two_values = st.sampled_from(["x", "y"])
num_values = st.one_of(
    st.integers(min_value=-50, max_value=500),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.none(),
    st.booleans(),
    st.sampled_from([0, 0.0, -1, 1, "12.5", " 3 ", "1_000", -0.0]),
)
hash_values = st.one_of(
    st.sampled_from(["aa11", "bb22", "cc33", "dd44", "ee55"]),
    st.none(),
    st.sampled_from([["x", 1], {"k": "v"}, 1, 1.0, True]),
)
timestamps = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 3600.0, 86399.0, 86400.0, 86400.5, 172800.0, 1e9]),
    st.integers(min_value=0, max_value=300_000).map(float),
)


def series(
    values: st.SearchStrategy[Any], max_size: int = 25
) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(st.fixed_dictionaries({"value": values, "ts": timestamps}), max_size=max_size)


def check_aggregate(obs: list[dict[str, Any]], kind: str | None) -> None:
    got = aggregate_observations(obs, value_kind=kind)
    want = oracle.aggregate(obs, kind)
    assert oracle.same(got, want), (obs, kind, got, want)


@SETTINGS
@given(series(cat_values), st.sampled_from([None, "categorical"]))
def test_categorical_matches_oracle(obs: list[dict[str, Any]], kind: str | None) -> None:
    check_aggregate(obs, kind)


@SETTINGS
@given(series(two_values, 12))
def test_two_value_alternations(obs: list[dict[str, Any]]) -> None:
    check_aggregate(obs, "categorical")


@SETTINGS
@given(series(num_values))
# (v - mean) ** 2 is libm's pow in Python, one bit off d * d here
@example([{"value": v, "ts": float(i)} for i, v in enumerate([None, 1e-12, 1e-12])])
def test_numeric_matches_oracle(obs: list[dict[str, Any]]) -> None:
    check_aggregate(obs, "numeric")


@SETTINGS
@given(st.lists(st.sampled_from([-1.0, 1.0, 0.0, -2.0, 2.0]), min_size=3, max_size=12))
def test_zero_mean_numerics(vals: list[float]) -> None:
    check_aggregate([{"value": v, "ts": float(i)} for i, v in enumerate(vals)], "numeric")


@SETTINGS
@given(series(hash_values, 30))
def test_hash_matches_oracle(obs: list[dict[str, Any]]) -> None:
    check_aggregate(obs, "hash")


KINDS = {"cat": "categorical", "num": "numeric", "hash": "hash"}
VALUES = {"cat": cat_values, "num": num_values, "hash": hash_values}


@st.composite
def arrival_streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[int]]:
    """Observations for a few keys in a random arrival order (late arrivals,
    ties), and random batch cut points."""
    items: list[dict[str, Any]] = []
    for ident in draw(
        st.lists(st.sampled_from(["id-a", "id-b"]), min_size=1, max_size=2, unique=True)
    ):
        for prim in draw(
            st.lists(st.sampled_from(list(KINDS)), min_size=1, max_size=3, unique=True)
        ):
            for o in draw(series(VALUES[prim], 25)):
                items.append(
                    {"identity_uuid": ident, "primitive": prim, "value_kind": KINDS[prim], **o}
                )
    items = draw(st.permutations(items))
    cuts = sorted(draw(st.lists(st.integers(0, max(len(items), 1)), max_size=6)))
    return items, cuts


def batches(items: list[dict[str, Any]], cuts: list[int]) -> list[list[dict[str, Any]]]:
    out, pos = [], 0
    for c in [*cuts, len(items)]:
        out.append(items[pos:c])
        pos = max(pos, c)
    return out


def expected(prefix: list[dict[str, Any]]) -> dict[tuple[str, str], oracle.OState]:
    keys: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in prefix:
        keys.setdefault((o["identity_uuid"], o["primitive"]), []).append(o)
    return {k: oracle.aggregate(oracle.sort_series(v), KINDS[k[1]]) for k, v in keys.items()}


@SETTINGS
@given(arrival_streams(), st.booleans())
def test_engine_equals_oracle_on_every_prefix(
    stream: tuple[list[dict[str, Any]], list[int]], use_json: bool
) -> None:
    items, cuts = stream
    eng = Engine()
    seen: list[dict[str, Any]] = []
    for batch in batches(items, cuts):
        if use_json:
            res = eng.ingest_json(b"\n".join(orjson.dumps(o) for o in batch))
        else:
            res = eng.ingest(batch)
        assert res.errors == []
        before = expected(seen)
        seen.extend(batch)
        want = expected(seen)
        # one change record per key touched, with the right old and new state
        touched = {(o["identity_uuid"], o["primitive"]) for o in batch}
        assert {(c.identity_uuid, c.primitive) for c in res} == touched
        for c in res:
            key = (c.identity_uuid, c.primitive)
            assert oracle.same(c.state, want[key])
            if key in before:
                assert c.old_state is not None and oracle.same(c.old_state, before[key])
                assert c.state_changed == (before[key].state != want[key].state)
            else:
                assert c.old_state is None and c.state_changed
        for key, st_ in want.items():
            got = eng.get(*key)
            assert got is not None and oracle.same(got, st_), (key, got, st_)
    assert len(eng) == len(expected(seen))


@SETTINGS
@given(arrival_streams())
def test_export_import_resumes_exactly(stream: tuple[list[dict[str, Any]], list[int]]) -> None:
    items, cuts = stream
    parts = batches(items, cuts)
    eng = Engine()
    seen: list[dict[str, Any]] = []
    for i, batch in enumerate(parts):
        eng.ingest(batch)
        seen.extend(batch)
        if i == len(parts) // 2:
            # "restart": a fresh engine rebuilt only from the exported windows
            windows = eng.export_windows(eng.keys())
            assert all(w is not None for w in windows)
            fresh = Engine()
            assert fresh.import_windows([w for w in windows if w]) == []
            for key in eng.keys():
                assert fresh.get(*key) == eng.get(*key)
            eng = fresh
    for key, st_ in expected(seen).items():
        got = eng.get(*key)
        assert got is not None and oracle.same(got, st_)


@SETTINGS
@given(series(cat_values, 40))
def test_window_export_is_bounded(obs: list[dict[str, Any]]) -> None:
    eng = Engine()
    eng.ingest([{"identity_uuid": "i", "primitive": "p", **o} for o in obs])
    if not obs:
        return
    doc = json.loads(eng.export_window("i", "p") or "null")
    assert doc["count"] == len(obs)
    assert len(doc["window"]) == min(len(obs), 10)
