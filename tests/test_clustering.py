"""The clusterer's policy and configuration, and its quality on the seeded
ground truth (the benchmark's generator, at a test-sized scale)."""

from __future__ import annotations

import json

import pytest
from benches.cluster_workload import HASSH, generate, pairwise

from decnet_attr._core import Clusterer, DecnetAttrError, all_pairs_components
from decnet_attr.clustering import DEFAULT_WEIGHTS, SIMHASH_PRIMITIVES, cluster_config
from decnet_attr.config import ConfigError, Settings
from decnet_attr.registry import registry


def test_default_fingerprints_are_registry_primitives() -> None:
    for prim in DEFAULT_WEIGHTS:
        assert prim in registry().primitives
    for prim in SIMHASH_PRIMITIVES:
        assert registry().primitives[prim].kind == "hash"
        assert prim in DEFAULT_WEIGHTS


def test_overrides_merge_into_the_defaults_and_zero_turns_off() -> None:
    cfg = cluster_config({"weights": {HASSH: 0, "toolchain.tls.ja3_client": 0.25}, "max_share": 9})
    assert HASSH not in cfg.weights
    assert cfg.weights["toolchain.tls.ja3_client"] == 0.25
    assert cfg.max_share == 9
    c = cfg.make()
    assert not c.is_fingerprint(HASSH) and c.is_fingerprint("toolchain.tls.ja3_client")


@pytest.mark.parametrize(
    "raw",
    [
        '{"weights": {"no.such.primitive": 1}}',
        '{"weights": {"toolchain.tls.ja3_client": -1}}',
        '{"weights": []}',
        '{"threshold": 0}',
        '{"full_share": 8, "max_share": 4}',
        '{"hamming_max": 40}',
        '{"bands": 3}',
        "[1]",
        "{not json",
    ],
)
def test_bad_cluster_settings_are_refused_at_start(raw: str) -> None:
    with pytest.raises(ConfigError, match="cluster"):
        Settings(cluster=raw)


def test_the_binding_refuses_a_simhash_without_weight() -> None:
    with pytest.raises(DecnetAttrError, match="no weight"):
        Clusterer([(HASSH, 1.0)], ["motor.digraph_simhash"])


def test_links_report_their_evidence() -> None:
    c = cluster_config().make()
    changed = c.add(
        [
            ("a", HASSH, json.dumps("h")),
            ("b", HASSH, json.dumps("h")),
            ("a", "motor.digraph_simhash", json.dumps("00000000000000ff")),
            ("b", "motor.digraph_simhash", json.dumps("00000000000000fe")),
        ]
    )
    assert changed == ["b"]
    [(x, y, evidence)] = c.links(["b", "a"])
    assert (x, y) == ("a", "b")
    assert evidence == [
        ("motor.digraph_simhash", '"00000000000000ff"', '"00000000000000fe"', 1, 0.375),
        (HASSH, '"h"', '"h"', 0, 1.0),
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_precision_at_the_default_weights(seed: int) -> None:
    """At 10k attackers (common values are common at that scale; a few
    thousand is too small a sample of a shared tool's users)."""
    gt = generate(10_000, seed=seed)
    c = cluster_config().make()
    c.add(gt.observations)
    comps = {tuple(c.component(a)) for a in gt.operator_of}
    precision, recall = pairwise([list(x) for x in comps], gt.operator_of)
    assert precision >= 0.99, precision
    assert recall > 0.6, recall


def test_the_incremental_clusterer_equals_an_all_pairs_pass() -> None:
    cfg = cluster_config()
    gt = generate(2000, seed=5)
    c = cfg.make()
    c.add(gt.observations)
    reference = all_pairs_components(obs=gt.observations, **cfg.args())
    assert any(len(g) > 1 for g in reference)
    assert sorted(map(tuple, reference)) == sorted(
        {tuple(c.component(a)) for g in reference for a in g}
    )
