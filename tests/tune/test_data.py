"""The labelled generator: seeded, deterministic, labels consistent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from decnet_attr.cli import main
from decnet_attr.tune.data import (
    DRIFT_SPAN,
    FAMILIES,
    STATES,
    TRUTH_MIN_OBS,
    GenParams,
    dumps,
    generate,
    size_for,
)


def blob(seed: int, gp: GenParams | None = None) -> bytes:
    return b"".join(dumps(o) for o in generate(seed, gp))


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    gp = GenParams(identities=3, length=20)
    assert blob(7, gp) == blob(7, gp)
    assert blob(7, gp) != blob(8, gp)


def test_a_family_does_not_depend_on_the_others() -> None:
    one = generate(3, GenParams(identities=2, families=("drift_numeric",)))
    both = generate(3, GenParams(identities=2, families=("steady", "drift_numeric")))
    drift = [o for o in both if o["label"]["family"] == "drift_numeric"]
    assert [(o["primitive"], o["value"]) for o in drift] == [
        (o["primitive"], o["value"]) for o in one
    ]


def test_every_family_and_valid_labels() -> None:
    rows = generate(1, GenParams(identities=4, length=30))
    assert {o["label"]["family"] for o in rows} == set(FAMILIES)
    assert {o["label"]["state"] for o in rows} <= set(STATES)
    series: dict[tuple[str, str], list[dict]] = {}
    for o in rows:
        series.setdefault((o["identity_uuid"], o["primitive"]), []).append(o)
    for obs in series.values():
        ts = [o["ts"] for o in obs]
        assert ts == sorted(ts)
        # too little evidence is unknown, whatever the family
        assert all(o["label"]["state"] == "unknown" for o in obs[: TRUTH_MIN_OBS - 1])
        changes = [i for i, o in enumerate(obs) if o["label"]["change_point"]]
        if changes:
            (c,) = changes
            assert not obs[0]["label"]["stationary"]
            assert obs[c - 1]["value"] != obs[c]["value"] or obs[c]["primitive"].endswith("_ms")
            assert [o["label"]["state"] for o in obs[c : c + DRIFT_SPAN]] == [
                "drifting"
            ] * DRIFT_SPAN
    multi = {o["identity_uuid"] for o in rows if o["label"]["multi_actor"]}
    assert multi == {o["identity_uuid"] for o in rows if o["label"]["family"].startswith("multi_")}
    ops = Counter(o["label"]["operator"] for o in rows if o["label"]["multi_actor"])
    assert set(ops) == {"A", "B"}


def test_sparse_keys_stay_short_and_unknown() -> None:
    rows = generate(5, GenParams(identities=10, families=("sparse",)))
    per_key = Counter((o["identity_uuid"], o["primitive"]) for o in rows)
    assert max(per_key.values()) < TRUTH_MIN_OBS
    assert {o["label"]["state"] for o in rows} == {"unknown"}


def test_unknown_family_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown families"):
        generate(1, GenParams(families=("nope",)))


def test_size_for_hits_the_target() -> None:
    gp = size_for(20_000, GenParams())
    n = len(generate(1, gp))
    assert 0.9 * 20_000 <= n <= 1.1 * 20_000


def test_cli_generate_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    for out in (a, b):
        assert (
            main(["tune", "generate", "--seed", "4", "--identities", "2", "--out", str(out)]) == 0
        )
    assert a.read_bytes() == b.read_bytes() == blob(4, GenParams(identities=2))
