"""``tune impact`` on a seeded store reports exactly what ``recompute``
then does; ``tune export`` writes the stored series with empty labels."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from decnet_attr.cli import main
from decnet_attr.config import Settings
from decnet_attr.store import Store, open_store
from decnet_attr.store.base import ObservationRow, StateRow
from decnet_attr.tune.data import GenParams, generate
from decnet_attr.tune.impact import impact
from decnet_attr.worker.recompute import recompute

#: changes the multi-actor rule and the categorical windows: badges move
#: both ways and identities start and stop being multi-actor
PROPOSED = {"alternation_min_len": 5, "majority": 3, "multi_actor_min_primitives": 3}


async def seed(store: Store, settings: Settings) -> int:
    rows = generate(21, GenParams(identities=6, length=16))
    attackers = sorted({o["identity_uuid"] for o in rows})
    async with store.transaction() as tx:
        await tx.ensure_attackers([(a, None, 1.0) for a in attackers])
        identity, _ = await tx.ensure_identities(attackers, 1.0)
        await tx.insert_observations(
            [
                ObservationRow(
                    id=f"o{i}",
                    attacker_uuid=o["identity_uuid"],
                    primitive=o["primitive"],
                    value_json=orjson.dumps(o["value"]).decode(),
                    ts=o["ts"],
                    evidence_ref=f"e{i}",
                    identity_uuid=identity[o["identity_uuid"]],
                )
                for i, o in enumerate(rows)
            ]
        )
    await recompute(store, settings)  # states under the current thresholds
    return len(rows)


async def all_states(store: Store) -> dict[tuple[str, str], StateRow]:
    out = {}
    for ident in await identities(store):
        for r in await store.attribution_for_identity(ident):
            out[(r.identity_uuid, r.primitive)] = r
    return out


async def identities(store: Store) -> list[str]:
    seen: set[str] = set()
    async for batch in store.iter_observations(batch_size=1000):
        seen.update(r.identity_uuid for r in batch if r.identity_uuid)
    return sorted(seen)


@pytest.fixture
async def seeded(tmp_path: Path) -> Any:
    settings = Settings(data_dir=tmp_path)
    store = open_store(settings.store_url)
    await store.open()
    n = await seed(store, settings)
    try:
        yield store, settings, n
    finally:
        await store.close()


async def test_impact_is_what_recompute_does(seeded: Any) -> None:
    store, current, n = seeded
    proposed = current.replace(thresholds=json.dumps(PROPOSED))
    before = await all_states(store)
    multi_before = set(await store.multi_actor_identities(2))

    forecast = await impact(store, current, proposed)
    assert await all_states(store) == before  # nothing written

    await recompute(store, proposed)
    after = await all_states(store)
    multi_after = set(await store.multi_actor_identities(3))
    moved = Counter(
        (before[k].state if k in before else None, after[k].state)
        for k in after
        if k not in before or before[k].state != after[k].state
    )
    assert {(t["from"], t["to"]): t["count"] for t in forecast["transitions"]} == dict(moved)
    assert forecast["start_multi_actor"] == sorted(multi_after - multi_before)
    assert forecast["stop_multi_actor"] == sorted(multi_before - multi_after)
    assert forecast["observations"] == n
    # the thresholds were chosen so that the check is not vacuous
    assert moved and forecast["stop_multi_actor"]


async def test_impact_of_the_current_thresholds_is_nothing(seeded: Any) -> None:
    store, current, _ = seeded
    forecast = await impact(store, current, current)
    assert forecast["transitions"] == []
    assert forecast["start_multi_actor"] == forecast["stop_multi_actor"] == []


def test_cli_impact_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=tmp_path)

    async def prepare() -> int:
        store = open_store(settings.store_url)
        await store.open()
        try:
            return await seed(store, settings)
        finally:
            await store.close()

    n = asyncio.run(prepare())
    dd = str(tmp_path)
    new = json.dumps(PROPOSED)
    assert main(["tune", "impact", "--data-dir", dd, "--thresholds", new, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["transitions"] and out["keys"] > 0
    assert main(["tune", "impact", "--data-dir", dd, "--thresholds", "[1]"]) == 2
    assert main(["tune", "impact", "--data-dir", dd, "--thresholds", new]) == 0
    assert "stop being multi-actor" in capsys.readouterr().out

    exported = tmp_path / "export.ndjson"
    assert main(["tune", "export", "--data-dir", dd, "--out", str(exported)]) == 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(lines) == n
    assert all(x["label"]["state"] is None for x in lines)
    # the export is accepted by evaluate (replayed, nothing scored)
    assert main(["tune", "evaluate", str(exported), "--format", "json"]) == 0


async def test_explain_names_the_thresholds_that_applied(seeded: Any) -> None:
    from decnet_attr.worker.recompute import explain_state

    store, current, _ = seeded
    own = {"per_primitive": {"motor.input_modality": {"majority": 3}}}
    settings = current.replace(thresholds=json.dumps(own))
    attacker = "steady-21-00000"  # the generator's identity names are the attackers
    ex = await explain_state(store, settings, attacker, "motor.input_modality")
    assert ex is not None
    assert ex["thresholds_scope"] == "primitive"
    assert ex["thresholds_overrides"] == {"majority": 3}
    assert ex["detail"]["majority"] == 3
    assert ex["thresholds"]["per_primitive"] == own["per_primitive"]
    other = await explain_state(store, settings, attacker, "environmental.shell_type")
    assert other is not None and other["thresholds_scope"] == "global"
    assert other["thresholds_overrides"] == {} and other["detail"]["majority"] == 4
