"""Per-primitive and per-value-kind thresholds: the engine against the
oracle run with the thresholds that should apply, and ``explain`` naming
the scope that decided."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decnet_attr import DecnetAttrError, Engine, Thresholds
from tests import oracle

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

P_OWN = "motor.input_modality"  # categorical with its own thresholds
P_PLAIN = "environmental.shell_type"  # categorical, global thresholds
P_NUM = "toolchain.c2.beacon_interval_ms"  # numeric, the kind's thresholds
P_HASH = "motor.digraph_simhash"  # hash, its own thresholds

categorical_fields = {
    "min_observations": st.integers(1, 6),
    "majority": st.integers(1, 8),
    "alternation_min_len": st.integers(1, 8),
    "multi_actor_max_confidence": st.sampled_from([0.2, 0.45, 0.6, 0.9]),
}
numeric_fields = {
    "min_observations": st.integers(1, 6),
    "ewma_alpha": st.sampled_from([0.1, 0.3, 0.55, 1.0]),
    "drift_mean_shift_pct": st.sampled_from([0.05, 0.3, 0.8]),
    "conflict_dispersion_pct": st.sampled_from([0.2, 1.0, 2.5]),
    "numeric_conflict_confidence": st.sampled_from([0.1, 0.5, 0.9]),
}
hash_fields = {"hash_drift_max": st.integers(0, 4)}


def partial(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


def obs_of(prim: str, values: list[Any]) -> list[dict[str, Any]]:
    return [
        {"identity_uuid": "ident", "primitive": prim, "value": v, "ts": float(100 * i)}
        for i, v in enumerate(values)
    ]


@SETTINGS
@given(
    base=partial({**categorical_fields, "window_n": st.integers(2, 8)}),
    own=partial(categorical_fields),
    num=partial(numeric_fields),
    hsh=partial(hash_fields),
    cat_a=st.lists(st.sampled_from("xyz"), max_size=20),
    cat_b=st.lists(st.sampled_from("xy"), max_size=20),
    nums=st.lists(st.sampled_from([10.0, 11.0, 30.0, 0.0, 95.5]), max_size=20),
    hashes=st.lists(st.sampled_from(["h1", "h2", "h3", "h4"]), max_size=20),
)
def test_overrides_match_the_oracle(
    base: dict[str, Any],
    own: dict[str, Any],
    num: dict[str, Any],
    hsh: dict[str, Any],
    cat_a: list[str],
    cat_b: list[str],
    nums: list[float],
    hashes: list[str],
) -> None:
    th = Thresholds(
        **base,
        per_primitive={P_OWN: own, P_HASH: hsh},
        per_kind={"numeric": num},
    )
    engine = Engine(th)
    series = {
        P_OWN: obs_of(P_OWN, cat_a),
        P_PLAIN: obs_of(P_PLAIN, cat_b),
        P_NUM: obs_of(P_NUM, nums),
        P_HASH: obs_of(P_HASH, hashes),
    }
    for obs in series.values():
        engine.ingest(obs)
    glob = oracle.OThresholds(**base)
    want_th = {
        P_OWN: dataclasses.replace(glob, **own),
        P_PLAIN: glob,
        P_NUM: dataclasses.replace(glob, **num),
        P_HASH: dataclasses.replace(glob, **hsh),
    }
    kinds = {P_OWN: "categorical", P_PLAIN: "categorical", P_NUM: "numeric", P_HASH: "hash"}
    for prim, obs in series.items():
        got = engine.get("ident", prim)
        if not obs:
            assert got is None
            continue
        want = oracle.aggregate(obs, kinds[prim], want_th[prim])
        assert got is not None and oracle.same(got, want), (prim, obs, got, want)
        ex = engine.explain("ident", prim)
        assert ex is not None
        scope = {P_OWN: "primitive", P_PLAIN: "global", P_NUM: "value_kind", P_HASH: "primitive"}
        assert ex["thresholds_scope"] == scope[prim]
        given_fields = {P_OWN: own, P_PLAIN: {}, P_NUM: num, P_HASH: hsh}[prim]
        assert ex["thresholds_overrides"] == given_fields


def test_primitive_wins_over_kind_and_round_trips() -> None:
    th = Thresholds(
        per_primitive={P_OWN: {"majority": 3}},
        per_kind={"categorical": {"majority": 5}},
    )
    e = Engine(th)
    for p in (P_OWN, P_PLAIN):
        e.ingest(obs_of(p, list("aaab")))
    own, plain = e.explain("ident", P_OWN), e.explain("ident", P_PLAIN)
    assert own is not None and plain is not None
    assert (own["thresholds_scope"], own["detail"]["majority"]) == ("primitive", 3)
    assert (plain["thresholds_scope"], plain["detail"]["majority"]) == ("value_kind", 5)
    # a a a b: 3 of 4 is a majority of 3, not of 5
    assert own["state"]["state"] == "stable" and plain["state"]["state"] == "conflicted"
    assert Thresholds(**th.to_dict()) == th
    assert "per_primitive={'motor.input_modality': {'majority': 3}}" in repr(th)
    assert "per_primitive" not in Thresholds().to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_primitive": {P_OWN: {"window_n": 3}}}, "cannot be set per primitive"),
        ({"per_kind": {"numeric": {"multi_actor_min_primitives": 1}}}, "cannot be set per kind"),
        ({"per_kind": {"text": {"majority": 2}}}, "not a value kind"),
        ({"per_primitive": {P_OWN: {"ewma_alpha": 0.0}}}, "ewma_alpha must be in"),
        ({"per_primitive": [P_OWN]}, "must be a dict of dicts"),
        ({"per_primitive": {P_OWN: 3}}, "must be a dict"),
    ],
)
def test_bad_overrides_are_typed_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DecnetAttrError, match=message):
        Thresholds(**kwargs)
