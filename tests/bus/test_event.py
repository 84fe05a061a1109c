from __future__ import annotations

import dataclasses
import re
import time

import orjson
import pytest

from decnet_attr.bus import EVENT_SCHEMA_VERSION, Event, get_bus
from decnet_attr.bus.base import BusError, BusUnavailable, RateLimitedLog
from decnet_attr.bus.memory import InProcessBus
from decnet_attr.bus.nats import NatsBus

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def test_defaults() -> None:
    before = time.time()
    ev = Event("a.b", {"x": 1})
    assert ev.type == ""
    assert ev.v == EVENT_SCHEMA_VERSION == 1
    assert before <= ev.ts <= time.time()
    assert HEX32.match(ev.id)
    assert Event("a.b", {}).id != ev.id


def test_frozen() -> None:
    ev = Event("a.b", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.topic = "c"  # type: ignore[misc]


def test_to_dict_key_order_and_json_round_trip() -> None:
    ev = Event("attacker.observation.x", {"k": "é", "n": [1, 2]}, "x", 1, 12.5, "abc")
    d = ev.to_dict()
    assert list(d) == ["v", "id", "topic", "type", "ts", "payload"]
    assert d == {
        "v": 1,
        "id": "abc",
        "topic": "attacker.observation.x",
        "type": "x",
        "ts": 12.5,
        "payload": {"k": "é", "n": [1, 2]},
    }
    raw = ev.to_json()
    assert raw == (
        b'{"v":1,"id":"abc","topic":"attacker.observation.x","type":"x","ts":12.5,'
        b'"payload":{"k":"\xc3\xa9","n":[1,2]}}'
    )
    assert Event.from_json(ev.topic, raw) == ev


def test_from_dict_topic_comes_from_transport() -> None:
    ev = Event.from_dict("real.topic", {"topic": "spoofed.topic", "payload": {}})
    assert ev.topic == "real.topic"


@pytest.mark.parametrize("body", [{}, {"payload": None}])
def test_from_dict_missing_or_null_payload(body: dict[str, object]) -> None:
    assert Event.from_dict("a", body).payload == {}


@pytest.mark.parametrize("payload", [[1, 2], "x", 3, True])
def test_from_dict_non_object_payload(payload: object) -> None:
    with pytest.raises(ValueError):
        Event.from_dict("a", {"payload": payload})


@pytest.mark.parametrize(("raw", "expected"), [(None, ""), ("", ""), ("health", "health")])
def test_from_dict_type(raw: object, expected: str) -> None:
    body = {} if raw is None else {"type": raw}
    assert Event.from_dict("a", body).type == expected
    assert Event.from_dict("a", {"type": None}).type == ""


def test_from_dict_coercions() -> None:
    ev = Event.from_dict("a", {"v": "2", "ts": "1.5", "id": "my-id", "payload": {"a": 1}})
    assert (ev.v, ev.ts, ev.id, ev.payload) == (2, 1.5, "my-id", {"a": 1})
    assert isinstance(ev.ts, float)
    assert Event.from_dict("a", {"ts": 3}).ts == 3.0


def test_from_dict_defaults() -> None:
    before = time.time()
    ev = Event.from_dict("a", {})
    assert ev.v == 1
    assert before <= ev.ts <= time.time()
    assert HEX32.match(ev.id)
    assert HEX32.match(Event.from_dict("a", {"id": ""}).id)
    assert HEX32.match(Event.from_dict("a", {"id": None}).id)


@pytest.mark.parametrize("body", [{"v": "x"}, {"ts": "soon"}, {"ts": float("nan")}, {"v": []}])
def test_from_dict_bad_values(body: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Event.from_dict("a", body)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ValueError):
        Event.from_dict("a", [1])  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b'"x"', b"", b"{"])
def test_from_json_bad(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Event.from_json("a", raw)


def test_from_json_keeps_publisher_id_and_ts() -> None:
    raw = orjson.dumps({"v": 1, "id": "pub-id", "ts": 99.0, "type": "t", "payload": {"z": 0}})
    ev = Event.from_json("x.y", raw)
    assert (ev.id, ev.ts, ev.type, ev.topic) == ("pub-id", 99.0, "t", "x.y")


def test_error_hierarchy() -> None:
    assert issubclass(BusUnavailable, BusError)
    assert issubclass(BusError, RuntimeError)


def test_get_bus() -> None:
    assert isinstance(get_bus("memory://"), InProcessBus)
    bus = get_bus("memory://", queue_size=7)
    assert isinstance(bus, InProcessBus) and bus.name == "memory"
    nb = get_bus("nats://127.0.0.1:4222,nats://127.0.0.1:4223")
    assert isinstance(nb, NatsBus) and nb.name == "nats"
    assert not nb.connected
    for bad in ["", "unix://relative/bus.sock", "redis://x", "memory", "nats:/x", "http://a"]:
        with pytest.raises(ValueError):
            get_bus(bad)
    with pytest.raises(ValueError):
        NatsBus("nats://127.0.0.1:4222,redis://x")


def test_get_bus_never_leaks_credentials() -> None:
    with pytest.raises(ValueError) as info:
        get_bus("redis://user:secret@host")
    assert "secret" not in str(info.value)
    assert "secret" not in NatsBus("nats://user:secret@127.0.0.1:4222").url


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    log = logging.getLogger("test.ratelimit")
    rl = RateLimitedLog(log, interval=3600)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        assert rl.warning("k", "hello %s", 1)
        assert not rl.warning("k", "hello %s", 2)
        assert rl.warning("other", "hello %s", 3)
    assert [r.getMessage() for r in caplog.records] == ["hello 1", "hello 3"]


def test_event_of_is_the_same_event_as_the_constructor_makes() -> None:
    payload = {"identity_uuid": "i", "n": [1, 2]}
    made = Event("attribution.profile.updated", payload, "profile_updated", 1, 12.5, "e-1")
    fast = Event.of("attribution.profile.updated", payload, "profile_updated", 1, 12.5, "e-1")
    assert fast == made and repr(fast) == repr(made)
    assert fast.to_json() == made.to_json() and fast.payload is payload
    assert dataclasses.asdict(fast) == dataclasses.asdict(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.topic = "x"  # type: ignore[misc]
