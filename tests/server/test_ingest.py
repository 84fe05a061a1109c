"""``POST /api/v1/observations``: validation, limits, and the envelopes it
publishes on the durable bus path (a stub consumer stands in for the worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from decnet_attr.bus import Event, batch_observations
from decnet_attr.observations import rejection_codes
from decnet_attr.server.routes.ingest import batch_id
from tests.server.conftest import Harness, HarnessFactory, bearer

URL = "/api/v1/observations"
SHELL = "environmental.shell_type"


def obs(i: int = 0, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "attacker_uuid": "att-1",
        "primitive": SHELL,
        "value": "bash",
        "ts": 1_700_000_000.0 + i,
        "id": f"obs-{i}",
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


async def post(h: Harness, token: str, body: Any, content_type: str = "application/json") -> Any:
    data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    return await h.client.post(
        URL, data=data, headers={**bearer(token), "Content-Type": content_type}
    )


@pytest.fixture
async def sensor(harness: Harness) -> str:
    return await harness.token("probe-1", "sensor")


# ---- happy path and envelopes ---------------------------------------------------------------
async def test_accepted_observations_are_published_durably(
    harness: Harness, sensor: str, observations_consumer: list[Event]
) -> None:
    items = [
        obs(0),
        obs(
            1,
            primitive="motor.input_modality",
            value="typed",
            confidence=0.5,
            window={"start_ts": 1.0, "end_ts": 2.5},
            source="sensor/shell",
            evidence_ref="shard:d1/ssh/x#1",
            identity_ref="ident-x",
            attacker_ip="2001:DB8::7",
            v=1,
        ),
    ]
    resp = await post(harness, sensor, items)
    assert resp.status == 202, await resp.text()
    assert await resp.json() == {
        "accepted": 2,
        "ids": ["obs-0", "obs-1"],
        "rejected": [],
        "duplicates": [],
    }
    # 202 = the consumer acked already (in-process bus): the events are there now
    events = sorted(observations_consumer, key=lambda e: e.id)
    assert [(e.topic, e.id, e.type) for e in events] == [
        ("attacker.observation.environmental.shell_type", "obs-0", SHELL),
        ("attacker.observation.motor.input_modality", "obs-1", "motor.input_modality"),
    ]
    assert events[0].payload == {
        "primitive": SHELL,
        "value": "bash",
        "confidence": 1.0,
        "window": {"start_ts": 1_700_000_000.0, "end_ts": 1_700_000_000.0},
        "source": "api:probe-1",
        "evidence_ref": "api:obs-0",
        "identity_ref": None,
        "id": "obs-0",
        "ts": 1_700_000_000.0,
        "v": 1,
        "attacker_uuid": "att-1",
    }
    assert list(events[0].payload) == [
        "primitive",
        "value",
        "confidence",
        "window",
        "source",
        "evidence_ref",
        "identity_ref",
        "id",
        "ts",
        "v",
        "attacker_uuid",
    ]
    assert events[1].payload == {
        "primitive": "motor.input_modality",
        "value": "typed",
        "confidence": 0.5,
        "window": {"start_ts": 1.0, "end_ts": 2.5},
        "source": "sensor/shell",
        "evidence_ref": "shard:d1/ssh/x#1",
        "identity_ref": "ident-x",
        "id": "obs-1",
        "ts": 1_700_000_001.0,
        "v": 1,
        "attacker_uuid": "att-1",
        "attacker_ip": "2001:db8::7",
    }
    assert harness.counters["observations_accepted_total"] == 2
    # the API never writes observations itself: only the worker does
    assert await harness.store.count_observations() == 0


async def test_admin_may_ingest_and_ids_are_generated(
    harness: Harness, observations_consumer: list[Event]
) -> None:
    token = await harness.token("root", "admin")
    resp = await post(harness, token, obs(0, id=...))
    assert resp.status == 202
    body = await resp.json()
    (oid,) = body["ids"]
    assert len(oid) == 32 and int(oid, 16) >= 0
    (event,) = observations_consumer
    assert event.id == oid
    assert event.payload["id"] == oid
    assert event.payload["evidence_ref"] == f"api:{oid}"
    assert event.payload["source"] == "api:root"


async def test_a_single_object_is_a_batch_of_one(
    harness: Harness, sensor: str, observations_consumer: list[Event]
) -> None:
    resp = await post(harness, sensor, obs(3))
    assert resp.status == 202
    assert (await resp.json())["ids"] == ["obs-3"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-ndjson",
        "application/jsonl",
        "application/x-ndjson; charset=utf-8",
        "application/jsonl;charset=UTF-8",
    ],
)
async def test_ndjson(
    harness: Harness, sensor: str, observations_consumer: list[Event], content_type: str
) -> None:
    body = b"\n".join(
        [
            orjson.dumps(obs(0)),
            b"",
            b"{not json",
            orjson.dumps(obs(1)) + b"\r",
            b"   ",
            orjson.dumps(obs(2, ts="late")),
        ]
    )
    resp = await post(harness, sensor, body, content_type)
    assert resp.status == 202, await resp.text()
    result = await resp.json()
    assert result["accepted"] == 2
    assert result["ids"] == ["obs-0", "obs-1"]
    assert [r["index"] for r in result["rejected"]] == [1, 3]
    assert result["rejected"][0]["reason"].startswith("invalid JSON: ")
    assert result["rejected"][1] == {
        "index": 3,
        "code": "bad_ts",
        "reason": "ts must be a finite number",
    }
    assert sorted(e.id for e in observations_consumer) == ["obs-0", "obs-1"]


async def test_a_body_is_one_bus_message(
    harness: Harness,
    sensor: str,
    observations_consumer: list[Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orig = harness.bus.publish_durable
    topics: list[str] = []

    async def counting(topic: str, *a: Any, **kw: Any) -> Event:
        topics.append(topic)
        return await orig(topic, *a, **kw)

    monkeypatch.setattr(harness.bus, "publish_durable", counting)
    items = [obs(i) for i in range(1200)]
    resp = await post(harness, sensor, items)
    assert topics == ["attacker.observation.batch"]
    assert resp.status == 202
    body = await resp.json()
    assert body["accepted"] == 1200
    assert body["ids"] == [f"obs-{i}" for i in range(1200)]
    assert len({e.id for e in observations_consumer}) == 1200


# ---- partial and total rejection ------------------------------------------------------------
async def test_mixed_batch(
    harness: Harness, sensor: str, observations_consumer: list[Event]
) -> None:
    items = [
        obs(0),
        obs(1, primitive="no.such.primitive"),
        obs(2),
        obs(0),  # same id as item 0
        "not an object",
    ]
    resp = await post(harness, sensor, items)
    assert resp.status == 202
    assert await resp.json() == {
        "accepted": 2,
        "ids": ["obs-0", "obs-2"],
        "rejected": [
            {
                "index": 1,
                "code": "unknown_primitive",
                "reason": "unknown primitive 'no.such.primitive'",
            },
            {"index": 3, "code": "duplicate", "reason": "duplicate id 'obs-0' in this batch"},
            {"index": 4, "code": "not_object", "reason": "item must be a JSON object"},
        ],
        "duplicates": [],
    }
    assert harness.counters["observations_rejected_total"] == 3


BAD_ITEMS: list[tuple[dict[str, Any], str]] = [
    (
        obs(attacker_uuid=""),
        "attacker_uuid must be 1-64 characters of [A-Za-z0-9-]",
    ),
    (
        obs(attacker_uuid="a" * 65),
        "attacker_uuid must be 1-64 characters of [A-Za-z0-9-]",
    ),
    (obs(attacker_uuid=7), "attacker_uuid must be 1-64 characters of [A-Za-z0-9-]"),
    (obs(primitive=None), "primitive must be a non-empty dotted name"),
    (obs(primitive="environmental.*"), "unknown primitive 'environmental.*'"),
    (obs(primitive="environmental..shell_type"), "unknown primitive 'environmental..shell_type'"),
    (obs(primitive="environmental.shell type"), "unknown primitive 'environmental.shell type'"),
    (obs(primitive="environmental.>"), "unknown primitive 'environmental.>'"),
    (obs(value=...), "missing field value"),
    (obs(value="x" * 9000), "value is 9002 bytes, above the limit of 8192"),
    (
        obs(primitive="toolchain.c2.beacon_interval_ms", value="soon"),
        'toolchain.c2.beacon_interval_ms is numeric but the value "soon" is not a finite number',
    ),
    (obs(ts=...), "ts must be a finite number"),
    (obs(ts=True), "ts must be a finite number"),
    (obs(ts="1700000000"), "ts must be a finite number"),
    (obs(ts=1e400), "ts must be a finite number"),
    (obs(confidence=1.5), "confidence must be null or a number in [0, 1]"),
    (obs(confidence=-0.1), "confidence must be null or a number in [0, 1]"),
    (obs(confidence=False), "confidence must be null or a number in [0, 1]"),
    (obs(id="has space"), "id must be 1-128 characters of [A-Za-z0-9_.:-]"),
    (obs(id="x" * 129), "id must be 1-128 characters of [A-Za-z0-9_.:-]"),
    (obs(id=12), "id must be 1-128 characters of [A-Za-z0-9_.:-]"),
    (obs(attacker_ip="300.1.1.1"), "attacker_ip is not a valid IP address: '300.1.1.1'"),
    (obs(attacker_ip=1), "attacker_ip must be an IP address"),
    (obs(window=[1, 2]), "window must be {start_ts, end_ts} with finite numbers"),
    (obs(window={"start_ts": 1}), "window must be {start_ts, end_ts} with finite numbers"),
    (obs(window={"start_ts": 2, "end_ts": 1}), "window end_ts is before start_ts"),
    (obs(source=""), "source must be a non-empty string of at most 512 characters"),
    (obs(source=5), "source must be a non-empty string of at most 512 characters"),
    (
        obs(evidence_ref="e" * 513),
        "evidence_ref must be a non-empty string of at most 512 characters",
    ),
    (obs(identity_ref=["x"]), "identity_ref must be a non-empty string of at most 128 characters"),
    (obs(v=2), "v must be 1"),
    (obs(extra="x"), "unknown field(s): extra"),
]


async def test_all_bad_is_422_with_per_index_reasons(harness: Harness, sensor: str) -> None:
    items = [item for item, _reason in BAD_ITEMS]
    resp = await post(harness, sensor, items)
    assert resp.status == 422
    detail = (await resp.json())["detail"]
    assert [(d["index"], d["reason"]) for d in detail] == [
        (i, reason) for i, (_item, reason) in enumerate(BAD_ITEMS)
    ]
    assert {d["code"] for d in detail} <= set(rejection_codes())


async def test_null_confidence_defaults_to_one(
    harness: Harness, sensor: str, observations_consumer: list[Event]
) -> None:
    resp = await post(harness, sensor, [obs(0, confidence=None, value={"nested": [1, "a"]})])
    assert resp.status == 202
    (event,) = observations_consumer
    assert event.payload["confidence"] == 1.0
    assert event.payload["value"] == {"nested": [1, "a"]}


# ---- body and format errors -----------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_unsupported_media_type(harness: Harness, sensor: str, content_type: str) -> None:
    resp = await post(harness, sensor, [obs(0)], content_type)
    assert resp.status == 415
    assert "detail" in await resp.json()


async def test_auth_comes_before_the_content_type(harness: Harness) -> None:
    resp = await harness.client.post(URL, data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status == 401
    viewer = await harness.token("vic", "viewer")
    resp = await post(harness, viewer, [obs(0)])
    assert resp.status == 403
    assert await resp.json() == {"detail": "Insufficient permissions"}


@pytest.mark.parametrize(
    ("body", "detail_prefix"),
    [
        (b"[{", "invalid JSON: "),
        (b"", "invalid JSON: "),
        (b"42", "the body must be a JSON array of observations (or one observation)"),
        (b'"x"', "the body must be a JSON array of observations (or one observation)"),
        (b"[]", "empty batch: no observations in the request body"),
    ],
)
async def test_bad_json(harness: Harness, sensor: str, body: bytes, detail_prefix: str) -> None:
    resp = await post(harness, sensor, body)
    assert resp.status == 400
    assert (await resp.json())["detail"].startswith(detail_prefix)


async def test_ndjson_with_no_json_line_is_400(harness: Harness, sensor: str) -> None:
    resp = await post(harness, sensor, b"nope\n{also not\n", "application/x-ndjson")
    assert resp.status == 400
    assert (await resp.json())["detail"].startswith("invalid NDJSON: no line is JSON")


async def test_body_too_large(make_harness: HarnessFactory) -> None:
    h = await make_harness(max_body_bytes=1000)
    token = await h.token("probe", "sensor")
    big = orjson.dumps([obs(i) for i in range(30)])
    assert len(big) > 1000
    resp = await post(h, token, big)
    assert resp.status == 413
    assert await resp.json() == {"detail": "request body larger than 1000 bytes"}

    # no Content-Length (chunked): refused while reading
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    resp = await h.client.post(
        URL, data=chunks(), headers={**bearer(token), "Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert await resp.json() == {"detail": "request body larger than 1000 bytes"}


async def test_too_many_items(make_harness: HarnessFactory) -> None:
    h = await make_harness(max_batch_items=3)
    token = await h.token("probe", "sensor")
    resp = await post(h, token, [obs(i) for i in range(4)])
    assert resp.status == 413
    assert await resp.json() == {"detail": "4 items, above the limit of 3"}
    ndjson = b"\n".join(orjson.dumps(obs(i)) for i in range(4))
    resp = await post(h, token, ndjson, "application/x-ndjson")
    assert resp.status == 413
    assert await resp.json() == {"detail": "4 items, above the limit of 3"}


# ---- the bus cannot accept ------------------------------------------------------------------
async def test_no_durable_consumer_is_503(harness: Harness, sensor: str) -> None:
    resp = await post(harness, sensor, [obs(0), obs(1)])
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    body = await resp.json()
    assert body["detail"].startswith("observations cannot be accepted durably right now: ")
    assert "no durable consumer" in body["detail"]
    assert body["accepted"] == 0 and body["ids"] == []
    assert harness.counters["ingest_unavailable_total"] == 1


async def test_consumer_that_never_acks_is_503(
    harness: Harness, sensor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = harness.bus.durable_consumer("attacker.observation.>", durable="attribution")
    orig = harness.bus.publish_durable

    async def quick(*a: Any, **kw: Any) -> Event:
        kw["timeout"] = 0.2
        return await orig(*a, **kw)

    monkeypatch.setattr(harness.bus, "publish_durable", quick)
    try:
        resp = await post(harness, sensor, [obs(0)])
        assert resp.status == 503
        assert "not acknowledged" in (await resp.json())["detail"]
    finally:
        await consumer.aclose()


async def test_partial_failure_reports_what_was_accepted(
    harness: Harness, sensor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import decnet_attr.server.routes.ingest as ri

    monkeypatch.setattr(ri, "BATCH_CHUNK_BYTES", 1)  # one observation per message
    orig = harness.bus.publish_durable
    calls = {"n": 0}

    async def flaky(*a: Any, **kw: Any) -> Event:
        calls["n"] += 1
        if calls["n"] > 2:
            from decnet_attr.bus import BusUnavailable

            raise BusUnavailable("stream full")
        kw["timeout"] = 1.0
        return await orig(*a, **kw)

    monkeypatch.setattr(harness.bus, "publish_durable", flaky)
    consumer = harness.bus.durable_consumer("attacker.observation.>", durable="attribution")

    async def ack_all() -> None:
        while True:
            for d in await consumer.fetch(10, timeout=0.1):
                await d.ack()

    task = asyncio.create_task(ack_all())
    try:
        resp = await post(harness, sensor, [obs(i) for i in range(5)])
        assert resp.status == 503
        body = await resp.json()
        assert body["accepted"] == 2
        assert body["ids"] == ["obs-0", "obs-1"]
        assert body["detail"].endswith("stream full")
        assert calls["n"] == 3  # the fourth part was never tried
    finally:
        task.cancel()
        await consumer.aclose()


# ---- NATS JetStream: 202 once the stream stored the events ------------------------------------
@pytest.fixture
def nats_url() -> Any:
    from tests.natsserver import NatsServer, nats_server_path

    if nats_server_path() is None:
        pytest.skip("nats-server not installed")
    with NatsServer() as server:
        yield server.url


async def test_ingest_on_nats_jetstream(make_harness: HarnessFactory, nats_url: str) -> None:
    h = await make_harness(bus_url=nats_url)
    assert h.bus.name != "memory"
    token = await h.token("probe", "sensor")
    # JetStream stores the events even before any worker is attached
    resp = await post(h, token, [obs(0), obs(1, attacker_ip="192.0.2.1"), obs(2, ts="x")])
    assert resp.status == 202, await resp.text()
    assert await resp.json() == {
        "accepted": 2,
        "ids": ["obs-0", "obs-1"],
        "rejected": [{"index": 2, "code": "bad_ts", "reason": "ts must be a finite number"}],
        "duplicates": [],
    }
    consumer = h.bus.durable_consumer("attacker.observation.>", durable="attribution")
    try:
        got: list[Event] = []
        raw: list[Event] = []
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < 2 and asyncio.get_running_loop().time() < deadline:
            for d in await consumer.fetch(10, timeout=1.0):
                raw.append(d.event)
                got.extend(batch_observations(d.event))
                await d.ack()
        # one JetStream message for the body, its id a digest of the batch's ids
        assert [(e.topic, e.id) for e in raw] == [
            ("attacker.observation.batch", batch_id(["obs-0", "obs-1"]))
        ]
        got.sort(key=lambda e: e.id)
        assert [(e.topic, e.id, e.type) for e in got] == [
            ("attacker.observation.environmental.shell_type", "obs-0", SHELL),
            ("attacker.observation.environmental.shell_type", "obs-1", SHELL),
        ]
        assert got[1].payload["attacker_ip"] == "192.0.2.1"
        assert got[1].payload["evidence_ref"] == "api:obs-1"
    finally:
        await consumer.aclose()
