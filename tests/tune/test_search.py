"""The search: Pareto front, choice rule, JSON output, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decnet_attr import Thresholds
from decnet_attr.cli import main
from decnet_attr.config import Settings
from decnet_attr.tune.data import GenParams, generate, write_ndjson
from decnet_attr.tune.search import (
    DEFAULTS,
    KIND_FIELDS,
    OBJECTIVES,
    SPACE,
    Trial,
    choose,
    combinations,
    dominates,
    neighbours,
    pareto_front,
    refine_scoped,
    search,
    thresholds_json,
)


def trial(
    n: int, p: float, r: float, delay: float, flap: float, f1: float = 0.5, **params: object
) -> Trial:
    m = {
        "multi_precision": p,
        "multi_recall": r,
        "drift_delay": delay,
        "flapping_per_100": flap,
        "macro_f1": f1,
        "multi_f1": 2 * p * r / (p + r) if p + r else 0.0,
    }
    return Trial(n, {**DEFAULTS, **params}, m)


def test_space_covers_every_thresholds_field() -> None:
    assert set(SPACE) == set(Thresholds().to_dict())
    for p in neighbours():
        Thresholds(**p)  # every neighbour is a valid configuration
        assert sum(p[k] != DEFAULTS[k] for k in SPACE) == 1


def test_dominance_and_front() -> None:
    a = trial(0, 0.9, 0.9, 2.0, 5.0)
    b = trial(1, 0.8, 0.9, 2.0, 5.0)  # worse precision only: dominated by a
    c = trial(2, 1.0, 0.5, 1.0, 9.0)  # trades: on the front
    d = trial(3, 0.9, 0.9, 2.0, 5.0)  # same values as a: kept once
    assert dominates(a.values(), b.values()) and not dominates(b.values(), a.values())
    assert not dominates(a.values(), d.values())
    assert [t.number for t in pareto_front([a, b, c, d])] == [0, 2]
    assert len(OBJECTIVES) == len(a.values())


def test_choice_needs_no_worse_delay_and_flapping_and_passing_scenarios() -> None:
    default = trial(0, 0.8, 0.8, 2.0, 5.0)
    faster_but_flappier = trial(1, 1.0, 1.0, 1.0, 6.0, window_n=6)
    better = trial(2, 0.9, 0.9, 2.0, 5.0, alternation_min_len=5)
    best_but_breaks_decnet = trial(3, 1.0, 1.0, 1.0, 4.0, min_observations=8)
    front = [default, faster_but_flappier, better, best_but_breaks_decnet]
    assert choose(front, default).number == 2
    assert choose([default, faster_but_flappier], default).number == 0


def test_combinations_accumulate_good_moves() -> None:
    default = trial(0, 0.8, 0.8, 2.0, 5.0)
    moves = [
        trial(1, 0.9, 0.9, 2.0, 5.0, alternation_min_len=5),
        trial(2, 0.8, 0.8, 1.5, 5.0, ewma_alpha=0.48),
        trial(3, 0.8, 0.8, 2.0, 9.0, majority=3),  # flappier: not used
    ]
    combos = combinations(moves, default)
    assert combos == [{**DEFAULTS, "alternation_min_len": 5, "ewma_alpha": 0.48}]


def test_thresholds_json_is_the_difference_and_loads_as_settings() -> None:
    params = {**DEFAULTS, "window_n": 6, "ewma_alpha": 0.4}
    out = thresholds_json(params)
    assert out == {"window_n": 6, "ewma_alpha": 0.4}
    th = Settings(thresholds=json.dumps(out)).make_thresholds()
    assert th.window_n == 6 and th.ewma_alpha == 0.4


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    path = tmp_path / "train.ndjson"
    write_ndjson(str(path), generate(11, GenParams(identities=4, length=24)))
    return path


def test_search_small(labelled: Path) -> None:
    res = search(str(labelled), trials=60, workers=1, seed=3)
    assert len(res.trials) == 60
    assert res.default.number == 0 and res.default.params == {k: DEFAULTS[k] for k in SPACE}
    assert res.front and all(t in res.trials for t in res.front)
    # nothing in the front is dominated by any trial
    for f in res.front:
        assert not any(dominates(t.values(), f.values()) for t in res.trials)
    assert res.chosen.metrics["multi_f1"] >= res.default.metrics["multi_f1"]
    assert res.chosen.metrics["drift_delay"] <= res.default.metrics["drift_delay"]


def test_cli_search_writes_thresholds_and_html(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, html = tmp_path / "chosen.json", tmp_path / "search.html"
    rc = main(
        [
            "tune", "search", str(labelled), "--trials", "40", "--workers", "1",
            "--out", str(out), "--html", str(html), "--holdout", str(labelled),
        ]
    )  # fmt: skip
    assert rc == 0
    chosen = json.loads(out.read_text())
    Settings(thresholds=json.dumps(chosen)).make_thresholds()
    text = capsys.readouterr().out
    assert "Pareto front" in text and "DECNET_ATTR_THRESHOLDS=" in text
    page = html.read_text()
    assert 'id="pareto"' in page and 'id="confusion"' in page and 'id="drift-delay"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_cli_evaluate_json_and_bad_input(
    labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune", "evaluate", str(labelled), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["defaults"]["observations"] == len(labelled.read_bytes().splitlines())
    assert all(s["expected"] == s["observed"] for s in out["scenarios"])
    assert main(["tune", "evaluate", str(tmp_path / "missing.ndjson")]) == 2
    bad = tmp_path / "bad.ndjson"
    bad.write_text(
        '{"identity_uuid": "i", "primitive": "p", "value": 1, "ts": 1, "label": {"state": "sure"}}\n'
    )
    assert main(["tune", "evaluate", str(bad)]) == 2
    assert "unknown state label" in capsys.readouterr().err
    assert main(["tune", "evaluate", str(labelled), "--thresholds", '{"window_n": 0}']) == 2


def test_refine_scoped_keeps_admissible_improvements() -> None:
    default = trial(0, 0.8, 0.8, 2.0, 5.0)
    calls: list[list[dict[str, object]]] = []

    def run(cands: list[dict[str, object]]) -> list[dict[str, float]]:
        calls.append(cands)
        out = []
        for c in cands:
            pk = c.get("per_kind", {})
            faster = pk.get("numeric", {}).get("drift_mean_shift_pct", 0.3) < 0.3  # type: ignore[union-attr]
            flappy = "categorical" in pk  # type: ignore[operator]
            out.append(trial(0, 0.8, 0.8, 1.0 if faster else 2.0, 9.0 if flappy else 5.0).metrics)
        return out

    best, tried = refine_scoped(
        run, default, default, scope="per_kind", targets=KIND_FIELDS, first_number=10
    )
    assert best.params["per_kind"] == {"numeric": {"drift_mean_shift_pct": 0.18}}
    assert best.metrics["drift_delay"] == 1.0
    assert [t.number for t in tried][:2] == [10, 11]
    out = thresholds_json(best.params)
    assert out == {"per_kind": {"numeric": {"drift_mean_shift_pct": 0.18}}}
    Settings(thresholds=json.dumps(out)).make_thresholds()
