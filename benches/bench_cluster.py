"""Identity clusterer benchmarks (issue: identities that roll up). Run with
``make bench`` or ``.venv/bin/pytest benches/bench_cluster.py
--benchmark-enable --benchmark-only -s``.

- the incremental clusterer fed a seeded ground truth
  (``benches/cluster_workload.py``) of 10k, 100k and 1M attackers, in
  attackers of new evidence per second (one core: the feed runs in one
  thread), with its memory per attacker and the clustering's pairwise
  precision and recall;
- DECNET's approach, an all-pairs connected-components pass over the same
  observations with the same rules, at 10k attackers (100k would take
  about 100 times as long: it is quadratic; the figure is extrapolated).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest

from benches.cluster_workload import GroundTruth, generate, pairwise
from benches.conftest import record
from decnet_attr._core import all_pairs_components
from decnet_attr.clustering import cluster_config

CFG = cluster_config()
_gt: dict[int, GroundTruth] = {}


def truth(attackers: int) -> GroundTruth:
    if attackers not in _gt:
        _gt.clear()
        gc.collect()
        _gt[attackers] = generate(attackers)
    return _gt[attackers]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def score(gt: GroundTruth, components: list[list[str]]) -> tuple[float, float]:
    return pairwise(components, gt.operator_of)


@pytest.mark.parametrize("attackers", [10_000, 100_000])
def test_incremental(benchmark: Any, attackers: int) -> None:
    gt = truth(attackers)
    made: list[Any] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        made.clear()
        made.append(CFG.make())
        return (made[0],), {}

    def run(c: Any) -> None:
        c.add(gt.observations)

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    c = made[0]
    comps = {tuple(c.component(a)) for a in gt.operator_of}
    p, r = score(gt, [list(x) for x in comps])
    benchmark.extra_info.update(precision=p, recall=r, observations=len(gt.observations))
    print(
        f"\nincremental {attackers:,} attackers, {len(gt.observations):,} observations: "
        f"precision {p:.4f} recall {r:.4f} stats {c.stats()}"
    )
    record(benchmark, f"clusterer incremental, {attackers:,} attackers (attackers/s)", attackers)


def test_all_pairs_10k(benchmark: Any) -> None:
    gt = truth(10_000)
    out: list[list[list[str]]] = []

    def run() -> None:
        out.append(all_pairs_components(obs=gt.observations, **CFG.args()))

    benchmark.pedantic(run, rounds=1, iterations=1)
    rate = record(
        benchmark, "all-pairs connected components, 10,000 attackers (attackers/s)", 10_000
    )
    seconds = 10_000 / rate
    print(
        f"\nall-pairs 10k: {seconds:.1f} s; 100k extrapolated (x100, quadratic): "
        f"{seconds * 100:,.0f} s"
    )
    # the same components as the incremental clusterer
    c = CFG.make()
    c.add(gt.observations)
    assert sorted(map(tuple, out[0])) == sorted({tuple(c.component(a)) for g in out[0] for a in g})


def test_one_million_incremental(benchmark: Any) -> None:
    """1M attackers fed in 100k-attacker chunks (generated outside the
    timing); memory is the resident-size growth per attacker."""
    chunks = 10
    _gt.clear()
    gc.collect()
    c = CFG.make()
    base = rss()
    spent = 0.0
    observations = 0
    truths: dict[str, int] = {}
    for i in range(chunks):
        gt = generate(100_000, start=i * 1_000_000)
        observations += len(gt.observations)
        t0 = time.perf_counter()
        c.add(gt.observations)
        spent += time.perf_counter() - t0
        truths.update(gt.operator_of)
        del gt
    gc.collect()
    per_attacker = (rss() - base) / len(truths)
    comps = {tuple(c.component(a)) for a in truths}
    p, r = pairwise([list(x) for x in comps], truths)
    benchmark.extra_info.update(
        precision=p, recall=r, bytes_per_attacker=per_attacker, seconds=spent
    )
    # pytest-benchmark needs a timed call: one more (idempotent) chunk
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    rate = len(truths) / spent
    print(
        f"\n1M incremental: {len(truths):,} attackers, {observations:,} observations in "
        f"{spent:.1f} s = {rate:,.0f} attackers/s; {per_attacker:,.0f} bytes/attacker "
        f"(RSS growth, includes the Python-side truth map); precision {p:.4f} recall {r:.4f}"
    )
