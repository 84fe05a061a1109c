"""Evaluation metrics on tiny series whose answers are worked out by hand
(the v0 rules with the default thresholds: window 5, majority 4, three
observations before a state)."""

from __future__ import annotations

from typing import Any

import pytest

from decnet_attr import Thresholds
from decnet_attr.tune.evaluate import evaluate, load
from decnet_attr.tune.scenarios import run_scenarios

CAT = "motor.input_modality"
CAT2 = "environmental.shell_type"
NUM = "toolchain.c2.beacon_interval_ms"


def series(
    ident: str,
    prim: str,
    values: list[Any],
    states: list[str | None],
    *,
    change: int | None = None,
    multi: bool = False,
    stationary: bool = True,
) -> list[dict[str, Any]]:
    return [
        {
            "identity_uuid": ident,
            "primitive": prim,
            "value": v,
            "ts": 100.0 + i,
            "label": {
                "state": s,
                "change_point": i == change,
                "multi_actor": multi,
                "stationary": stationary,
                "family": "hand",
            },
        }
        for i, (v, s) in enumerate(zip(values, states))
    ]


def test_steady_key_confusion_f1_coverage() -> None:
    ds = load(series("i", CAT, ["a"] * 5, ["unknown", "unknown", "stable", "stable", "stable"]))
    m = evaluate(ds)
    assert m.confusion[0][0] == 2 and m.confusion[1][1] == 3
    assert sum(map(sum, m.confusion)) == 5
    assert m.macro_f1 == 1.0
    assert m.coverage == pytest.approx(3 / 5)
    assert m.flapping_per_100 == 0.0


def test_mislabelled_observations_lower_macro_f1() -> None:
    # truth says stable from the first observation: the two unknown
    # predictions are errors. stable: P=3/3, R=3/5 -> F1=0.75; unknown has
    # no support (not averaged)
    ds = load(series("i", CAT, ["a"] * 5, ["stable"] * 5))
    m = evaluate(ds)
    assert m.confusion[1][0] == 2 and m.confusion[1][1] == 3
    assert m.per_state_f1 == {"stable": pytest.approx(0.75)}
    assert m.macro_f1 == pytest.approx(0.75)


def test_unlabelled_observations_are_replayed_not_scored() -> None:
    ds = load(series("i", CAT, ["a"] * 5, [None, None, None, "stable", "stable"]))
    m = evaluate(ds)
    assert sum(map(sum, m.confusion)) == 2
    assert ds.labelled == 2 and ds.n == 5


def test_drift_delay_categorical_switch() -> None:
    # a a a a a | b b b b b: after the 1st b the window (a a a a b) is still
    # a clear a; 2nd and 3rd b: no majority (conflicted); 4th b: b×4 over
    # an older a×4 -> drifting. Delay 3.
    values = ["a"] * 5 + ["b"] * 5
    ds = load(series("i", CAT, values, [None] * 10, change=5, stationary=False))
    m = evaluate(ds)
    assert m.drift_delays == [3]
    assert m.drift_missed == 0
    assert m.drift_delay_score == 3.0
    # a faster detector: majority 3 calls it on the 3rd b
    assert evaluate(ds, Thresholds(majority=3)).drift_delays == [2]


def test_undetected_drift_is_a_miss_with_the_rest_of_the_series() -> None:
    # the change is on the last observation: never drifting -> missed,
    # scored as the observations left (1) plus one
    values = ["a"] * 6 + ["b"]
    ds = load(series("i", CAT, values, [None] * 7, change=6, stationary=False))
    m = evaluate(ds)
    assert m.drift_delays == [] and m.drift_missed == 1
    assert m.drift_delay_score == 2.0


def test_flapping_counts_changes_after_warm_up() -> None:
    # a a a b b a a a: unknown, unknown, stable (warm-up), then conflicted
    # from the 4th on (a×3 is no majority of 4; one or two flips are no
    # alternation): one change in 8 observations
    ds = load(series("i", CAT, list("aaabbaaa"), [None] * 8))
    m = evaluate(ds)
    assert m.flapping_per_100 == pytest.approx(100 / 8)
    # the same series marked non-stationary does not count
    ds = load(series("i", CAT, list("aaabbaaa"), [None] * 8, stationary=False))
    assert evaluate(ds).flapping_per_100 == 0.0


def test_multi_actor_precision_recall_per_identity() -> None:
    alt = ["a", "b"] * 5
    rows = (
        # X: two operators alternating on two primitives -> flagged (TP)
        series("X", CAT, alt, [None] * 10, multi=True)
        + series("X", CAT2, alt, [None] * 10, multi=True)
        # Y: one alternating primitive, one operator -> not flagged with
        # two primitives needed (TN), flagged with one (FP)
        + series("Y", CAT, alt, [None] * 10)
        # Z: truly two operators, but they never show it -> missed (FN)
        + series("Z", CAT, ["a"] * 10, [None] * 10, multi=True)
    )
    ds = load(rows)
    m = evaluate(ds)
    assert (m.multi_tp, m.multi_fp, m.multi_fn) == (1, 0, 1)
    assert (m.multi_precision, m.multi_recall) == (1.0, 0.5)
    assert m.multi_f1 == pytest.approx(2 / 3)
    m1 = evaluate(ds, Thresholds(multi_actor_min_primitives=1))
    assert (m1.multi_tp, m1.multi_fp, m1.multi_fn) == (1, 1, 1)
    assert m1.multi_precision == 0.5


def test_numeric_level_shift_detected_on_the_change() -> None:
    # EWMA(0.3) of 100 100 100 100 300 = 160 vs an older 100: +60 % >= 30 %
    values = [100.0] * 5 + [300.0] * 5
    ds = load(series("i", NUM, values, [None] * 10, change=5, stationary=False))
    assert evaluate(ds).drift_delays == [0]


def test_rejected_observation_is_an_error() -> None:
    rows = series("i", CAT, ["a"], ["stable"])
    rows[0]["ts"] = "soon"
    with pytest.raises(ValueError):
        evaluate(load(rows))


def test_defaults_pass_decnet_scenarios_and_a_bad_config_fails() -> None:
    assert all(s.passed for s in run_scenarios())
    failed = {s.name for s in run_scenarios(Thresholds(min_observations=8)) if not s.passed}
    assert failed == {"seven agreeing daily values"}
    failed = {
        s.name for s in run_scenarios(Thresholds(multi_actor_min_primitives=3)) if not s.passed
    }
    assert failed == {"A/B alternating on two primitives"}
