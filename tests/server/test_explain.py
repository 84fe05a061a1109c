"""``GET /api/v1/attackers/{uuid}/attribution/{primitive}/explain``: the auth
matrix, the 404s, and the explanation of states the real worker produced
(in-process bus + SQLite, observations ingested over the API)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from decnet_attr.server.app import create_app
from decnet_attr.server.routes.explain import json_safe
from tests.server.conftest import (
    ClientFactory,
    Harness,
    bearer,
    fast_passwords,
    make_settings,
)

SHELL = "environmental.shell_type"
BEACON = "toolchain.c2.beacon_interval_ms"


def explain_url(attacker: str, primitive: str) -> str:
    return f"/api/v1/attackers/{attacker}/attribution/{primitive}/explain"


@pytest.fixture
async def wh(tmp_path: Path, aiohttp_client: ClientFactory) -> Harness:
    """The real app with the attribution worker running in process."""
    settings = make_settings(tmp_path / "data", worker=True)
    app = create_app(settings, worker=True, passwords=fast_passwords(), auth_cache_ttl=0.0)
    client = await aiohttp_client(app)
    return Harness(app=app, client=client, settings=settings)


class World:
    def __init__(self, h: Harness) -> None:
        self.h = h
        self.sensor = ""
        self.viewer = ""
        self.admin = ""
        self.ts = time.time() - 600.0

    async def setup(self) -> None:
        self.sensor = await self.h.token("probe", "sensor")
        self.viewer = await self.h.token("analyst", "viewer")
        self.admin = await self.h.token("boss", "admin")

    async def register(self, ip: str) -> str:
        resp = await self.h.client.post(
            "/api/v1/attackers", json={"ip": ip}, headers=bearer(self.sensor)
        )
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["uuid"])

    async def ingest(self, attacker: str, primitive: str, values: list[Any]) -> list[float]:
        items = []
        stamps = []
        for v in values:
            self.ts += 1.0
            stamps.append(self.ts)
            items.append(
                {"attacker_uuid": attacker, "primitive": primitive, "value": v, "ts": self.ts}
            )
        resp = await self.h.client.post(
            "/api/v1/observations", json=items, headers=bearer(self.sensor)
        )
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["accepted"] == len(items)
        return stamps

    async def explain(self, attacker: str, primitive: str, token: str | None = None) -> Any:
        resp = await self.h.client.get(
            explain_url(attacker, primitive), headers=bearer(token or self.viewer)
        )
        return resp.status, await resp.json()


@pytest.fixture
async def world(wh: Harness) -> World:
    w = World(wh)
    await w.setup()
    return w


# ---- auth matrix ---------------------------------------------------------------------------
async def test_no_token_is_401(world: World) -> None:
    attacker = await world.register("203.0.113.1")
    resp = await world.h.client.get(explain_url(attacker, SHELL))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await resp.json() == {"detail": "Could not validate credentials"}


async def test_bad_token_is_401(world: World) -> None:
    attacker = await world.register("203.0.113.1")
    for header in ("Bearer not-a-jwt", "Basic YWRtaW46YWRtaW4=", "Bearer "):
        resp = await world.h.client.get(
            explain_url(attacker, SHELL), headers={"Authorization": header}
        )
        assert resp.status == 401, header


async def test_unknown_attacker_with_no_token_is_401(world: World) -> None:
    resp = await world.h.client.get(explain_url("nobody", SHELL))
    assert resp.status == 401  # auth before the 404


async def test_sensor_is_403(world: World) -> None:
    attacker = await world.register("203.0.113.1")
    await world.ingest(attacker, SHELL, ["bash"] * 3)
    status, body = await world.explain(attacker, SHELL, world.sensor)
    assert (status, body) == (403, {"detail": "Insufficient permissions"})
    # the role gate comes before the 404, too
    status, body = await world.explain("nobody", SHELL, world.sensor)
    assert status == 403


async def test_must_change_password_is_403(world: World) -> None:
    token = await world.h.token("newbie", "viewer", must_change=True)
    attacker = await world.register("203.0.113.1")
    status, body = await world.explain(attacker, SHELL, token)
    assert status == 403
    assert body == {"detail": "Password change required before accessing this resource"}


# ---- 404s ----------------------------------------------------------------------------------
async def test_unknown_attacker_is_404(world: World) -> None:
    status, body = await world.explain("0f0f0f0f-no-such-attacker", SHELL)
    assert (status, body) == (404, {"detail": "Attacker not found"})
    status, body = await world.explain("x" * 200, SHELL)
    assert (status, body) == (404, {"detail": "Attacker not found"})


async def test_attacker_without_identity_is_404(world: World) -> None:
    attacker = await world.register("203.0.113.2")
    status, body = await world.explain(attacker, SHELL)
    assert (status, body) == (404, {"detail": "Attribution not found"})


async def test_unknown_primitive_is_404(world: World) -> None:
    attacker = await world.register("203.0.113.3")
    await world.ingest(attacker, SHELL, ["bash"] * 3)
    for primitive in ("cognitive.cognitive_load", "no.such.primitive", "p" * 300):
        status, body = await world.explain(attacker, primitive)
        assert (status, body) == (404, {"detail": "Attribution not found"}), primitive


# ---- content -------------------------------------------------------------------------------
async def test_alternation_is_explained(world: World) -> None:
    attacker = await world.register("198.51.100.7")
    values = ["bash", "zsh", "bash", "zsh", "bash"]
    stamps = await world.ingest(attacker, SHELL, values)

    status, ex = await world.explain(attacker, SHELL)
    assert status == 200, ex
    attribution = await (
        await world.h.client.get(
            f"/api/v1/attackers/{attacker}/attribution", headers=bearer(world.viewer)
        )
    ).json()
    (row,) = attribution["primitives"]

    assert ex["attacker_uuid"] == attacker
    assert ex["identity_uuid"] == attribution["identity_uuid"]
    assert ex["primitive"] == SHELL
    assert ex["kind"] == "categorical"
    assert ex["rule"] == "two_value_alternation"
    assert "alternate" in ex["rule_description"]
    assert ex["window"] == [{"ts": ts, "value": v} for ts, v in zip(stamps, values)]
    assert ex["observation_count"] == 5
    assert ex["state"] == {
        "current_value": "bash",
        "state": "multi_actor",
        "confidence": 0.6,
        "observation_count": 5,
        "last_observation_ts": stamps[-1],
    }
    detail = ex["detail"]
    assert detail["flips"] == 4
    assert detail["repeats"] == 0
    assert detail["distinct"] == 2
    assert detail["top_count"] == 3
    assert detail["majority_needed"] == 4
    assert detail["alternation_min_len"] == 4
    assert detail["multi_actor_max_confidence"] == 0.6
    thresholds = ex["thresholds"]
    assert thresholds["window_n"] == 5
    assert thresholds["majority"] == 4
    assert thresholds["min_observations"] == 3
    assert thresholds["multi_actor_max_confidence"] == 0.6
    # the stored row agrees with the attribution endpoint
    stored = ex["stored"]
    assert stored["state"] == row["state"] == "multi_actor"
    assert stored["confidence"] == row["confidence"]
    assert stored["observation_count"] == row["observation_count"] == 5
    assert stored["last_change_ts"] == row["last_change_ts"]
    assert stored["last_observation_ts"] == row["last_observation_ts"] == stamps[-1]
    assert isinstance(stored["version"], int) and stored["version"] >= 1
    assert "previous_state" in ex

    # admins may read it as well
    status, again = await world.explain(attacker, SHELL, world.admin)
    assert status == 200
    assert again["rule"] == "two_value_alternation"


async def test_stable_then_alternating_keeps_the_window(world: World) -> None:
    attacker = await world.register("198.51.100.8")
    first = await world.ingest(attacker, SHELL, ["bash"] * 3)
    status, ex = await world.explain(attacker, SHELL)
    assert status == 200
    assert ex["state"]["state"] == "stable"
    assert ex["rule"] != "two_value_alternation"

    more = await world.ingest(attacker, SHELL, ["zsh", "bash", "zsh"])
    status, ex = await world.explain(attacker, SHELL)
    assert status == 200
    assert ex["rule"] == "two_value_alternation"
    assert ex["state"]["state"] == "multi_actor"
    assert [w["ts"] for w in ex["window"]] == first + more
    assert ex["detail"]["flips"] == 3
    assert ex["detail"]["repeats"] == 1
    assert ex["stored"]["last_change_ts"] == more[-1]


async def test_numeric_primitive_is_explained(world: World) -> None:
    attacker = await world.register("198.51.100.9")
    await world.ingest(attacker, BEACON, [1000, 1010, 990, 1000])
    status, ex = await world.explain(attacker, BEACON)
    assert status == 200, ex
    assert ex["kind"] == "numeric"
    assert ex["state"]["state"] == "stable"
    detail = ex["detail"]
    assert detail["cv"] < detail["conflict_dispersion_pct"]
    assert detail["ewma_alpha"] == 0.3
    assert [w["value"] for w in ex["window"]] == [1000.0, 1010.0, 990.0, 1000.0]


async def test_primitive_with_dots_and_encoding(world: World) -> None:
    attacker = await world.register("198.51.100.10")
    await world.ingest(attacker, SHELL, ["bash"] * 3)
    resp = await world.h.client.get(
        f"/api/v1/attackers/{attacker}/attribution/environmental%2Eshell_type/explain",
        headers=bearer(world.viewer),
    )
    assert resp.status == 200
    assert (await resp.json())["primitive"] == SHELL


def test_json_safe() -> None:
    deep: Any = []
    cursor = deep
    for _ in range(100):
        nxt: list[Any] = []
        cursor.append(nxt)
        cursor = nxt
    value = {
        "nan": math.nan,
        "inf": -math.inf,
        "ok": 1.5,
        "tuple": (1, "a"),
        "set": {2, 1},
        3: Path("/x"),
        "nested": {"b": [True, None]},
        "deep": deep,
    }
    out = json_safe(value)
    assert out["nan"] is None
    assert out["inf"] is None
    assert out["ok"] == 1.5
    assert out["tuple"] == [1, "a"]
    assert out["set"] == [1, 2]
    assert out["3"] == "/x"
    assert out["nested"] == {"b": [True, None]}
    depth = 0
    cursor = out["deep"]
    while isinstance(cursor, list) and cursor:
        cursor = cursor[0]
        depth += 1
    assert depth < 70
