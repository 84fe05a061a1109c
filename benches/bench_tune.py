"""Threshold search benchmarks (issue: tuning). Run with ``make bench``.

- search throughput: configurations per minute over a 100,000-observation
  labelled set, one worker process per core (target: >= 500/min on 2 cores);
- the held-out check: generate with one seed, search on it, then score the
  chosen configuration and DECNET's defaults on a set generated with another
  seed; the chosen one must beat the defaults on multi-actor F1 and on drift
  delay at equal or lower flapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from benches.conftest import record
from decnet_attr import Thresholds
from decnet_attr.tune.data import GenParams, generate, read_ndjson, size_for, write_ndjson
from decnet_attr.tune.evaluate import evaluate, load
from decnet_attr.tune.search import SearchResult, search

OBS = 100_000
TRIALS = 600


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tune")
    gp = size_for(OBS, GenParams())
    train, held = d / "train.ndjson", d / "held.ndjson"
    write_ndjson(str(train), generate(1, gp))
    write_ndjson(str(held), generate(2, gp))
    return train, held


_result: dict[str, SearchResult] = {}


def test_search_throughput(benchmark: Any, sets: tuple[Path, Path]) -> None:
    train, _ = sets
    workers = os.cpu_count() or 1

    def run() -> None:
        _result["r"] = search(
            str(train), trials=TRIALS, workers=workers, seed=0, per_kind=True, per_primitive=True
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    res = _result["r"]
    benchmark.extra_info["configs_per_minute"] = res.per_minute
    benchmark.extra_info["observations"] = OBS
    benchmark.extra_info["workers"] = workers
    record(
        benchmark,
        f"tune search: configurations over {OBS:,} obs ({workers} workers)",
        len(res.trials),
    )
    print(
        f"\nsearch: {len(res.trials)} configurations in {res.seconds:.1f} s = {res.per_minute:,.0f}/min"
    )


def test_held_out_chosen_beats_defaults(benchmark: Any, sets: tuple[Path, Path]) -> None:
    _, held = sets
    if "r" not in _result:
        pytest.skip("needs test_search_throughput first")
    res = _result["r"]
    ds = load(read_ndjson(str(held)))
    chosen = benchmark.pedantic(
        lambda: evaluate(ds, Thresholds(**res.chosen.params)), rounds=1, iterations=1
    )
    default = evaluate(ds, Thresholds())
    for name, m in (("chosen", chosen), ("defaults", default)):
        benchmark.extra_info[name] = m.summary()
        print(f"\nheld out, {name}: {m.summary()}")
    print(f"chosen thresholds: {res.chosen.params}")
    record(benchmark, "tune evaluate: one configuration, held-out set (obs/s)", ds.n)
    assert chosen.multi_f1 > default.multi_f1
    assert chosen.drift_delay_score < default.drift_delay_score
    assert chosen.flapping_per_100 <= default.flapping_per_100
