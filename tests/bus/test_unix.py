"""The ``unix://`` bus (DECNET's Unix-socket broker protocol) against the test
broker in tests/unixbroker.py and bare protocol clients."""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet_attr.bus import BusPayloadTooLarge, BusUnavailable, get_bus
from decnet_attr.bus.unix import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_SKIP_BYTES,
    BadFrame,
    Frame,
    FrameDecoder,
    StreamDesynchronised,
    UnixBus,
    encode_frame,
    socket_path_from_url,
)
from decnet_attr.config import ConfigError, Settings
from tests.unixbroker import RawClient, UnixBroker, frame, short_socket_dir

UnixBusFactory = Callable[..., Awaitable[UnixBus]]


@pytest.fixture
def sock_dir() -> Any:
    d = short_socket_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def broker(sock_dir: Path) -> AsyncIterator[UnixBroker]:
    async with UnixBroker(sock_dir / "bus.sock") as b:
        yield b


@pytest.fixture
async def make_bus(broker: UnixBroker) -> AsyncIterator[UnixBusFactory]:
    buses: list[UnixBus] = []

    async def make(**kw: Any) -> UnixBus:
        options: dict[str, Any] = {"reconnect_min": 0.02, "reconnect_max": 0.2}
        options.update(kw)
        bus = UnixBus(broker.path, **options)
        buses.append(bus)
        await bus.connect()
        return bus

    try:
        yield make
    finally:
        for bus in buses:
            await bus.close()


@pytest.fixture
async def raw(broker: UnixBroker) -> AsyncIterator[RawClient]:
    client = await RawClient.open(broker.path, "profiler")
    try:
        yield client
    finally:
        await client.close()


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await asyncio.sleep(0.01)


# ---- frames --------------------------------------------------------------------------------


def test_encode_frame_layout() -> None:
    assert encode_frame("BYE") == b"BYE\n\x00\x00\x00\x00"
    assert encode_frame("SUB", "a.>") == b"SUB a.>\n\x00\x00\x00\x00"
    assert encode_frame("PUB", "a.b", b"{}") == b"PUB a.b\n\x00\x00\x00\x02{}"
    with pytest.raises(ValueError, match="unknown verb"):
        encode_frame("PING")
    with pytest.raises(ValueError, match="CR or LF"):
        encode_frame("SUB", "a\nb")
    with pytest.raises(ValueError, match="ASCII"):
        encode_frame("PUB", "café.b")
    with pytest.raises(ValueError, match="header"):
        encode_frame("PUB", "a" * MAX_HEADER_BYTES)
    with pytest.raises(BusPayloadTooLarge):
        encode_frame("PUB", "a", b"x" * (MAX_BODY_BYTES + 1))
    assert len(encode_frame("PUB", "a", b"x" * MAX_BODY_BYTES)) == 6 + 4 + MAX_BODY_BYTES


def _kinds(items: list[Frame | BadFrame]) -> list[str]:
    return [f"{i.verb}:{i.args}" if isinstance(i, Frame) else f"bad:{i.kind}" for i in items]


def test_decoder_reassembles_frames_fed_byte_by_byte() -> None:
    stream = (
        encode_frame("EVT", "a.b", b'{"x":1}')
        + b"EVT c.d\r\n\x00\x00\x00\x00"
        + encode_frame("BYE")
    )
    dec = FrameDecoder()
    got: list[Frame | BadFrame] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert _kinds(got) == ["EVT:a.b", "EVT:c.d", "BYE:"]
    first = got[0]
    assert isinstance(first, Frame) and first.body == b'{"x":1}'
    assert dec.buffered == 0


def test_decoder_skips_bad_frames_and_stays_in_step() -> None:
    good = encode_frame("EVT", "ok", b"{}")
    big = MAX_BODY_BYTES + 10
    stream = b"".join(
        [
            b"NOPE x\n\x00\x00\x00\x03abc",  # unknown verb, body skipped
            b"\n\x00\x00\x00\x00",  # empty header line
            b"EVT \xff\xfe\n\x00\x00\x00\x01z",  # not ASCII
            b"EVT " + b"t" * (MAX_HEADER_BYTES + 100) + b"\n\x00\x00\x00\x02hi",  # long header
            b"EVT big\n" + struct.pack(">I", big) + b"y" * big,  # body above 1 MiB
            good,
        ]
    )
    dec = FrameDecoder()
    got: list[Frame | BadFrame] = []
    for i in range(0, len(stream), 777):  # arbitrary chunking
        got += dec.feed(stream[i : i + 777])
    assert _kinds(got) == [
        "bad:malformed",
        "bad:malformed",
        "bad:malformed",
        "bad:oversized",
        "bad:oversized",
        "EVT:ok",
    ]


def test_decoder_gives_up_on_an_absurd_length() -> None:
    dec = FrameDecoder()
    with pytest.raises(StreamDesynchronised):
        dec.feed(b"EVT x\n" + struct.pack(">I", MAX_SKIP_BYTES + 1))


# ---- url and configuration -----------------------------------------------------------------


def test_urls_and_settings(tmp_path: Path) -> None:
    assert socket_path_from_url("unix:///run/decnet/bus.sock") == Path("/run/decnet/bus.sock")
    assert socket_path_from_url("unix://~/.decnet/bus.sock") == Path.home() / ".decnet/bus.sock"
    assert socket_path_from_url("unix://").name == "bus.sock"  # DECNET's default
    for bad in ("unix://relative.sock", "unix:///a.sock?x=1", "nats://x"):
        with pytest.raises(ValueError):
            socket_path_from_url(bad)
    bus = get_bus("unix:///tmp/x/bus.sock", ack_wait=3.0)
    assert isinstance(bus, UnixBus) and bus.path == Path("/tmp/x/bus.sock")
    assert bus.name == "unix"
    s = Settings.from_env({"DECNET_ATTR_BUS_URL": "unix:///run/decnet/bus.sock"})
    assert s.bus_url == "unix:///run/decnet/bus.sock"
    with pytest.raises(ConfigError):
        Settings(bus_url="redis://x")
    with pytest.raises(ValueError):
        UnixBus(tmp_path / "s", name="bad\nname")


async def test_connect_fails_clearly_without_a_broker(sock_dir: Path) -> None:
    bus = UnixBus(sock_dir / "none.sock", connect_timeout=0.2, reconnect_min=0.02)
    with pytest.raises(BusUnavailable, match="cannot connect"):
        await bus.connect()
    assert not bus.connected
    await bus.close()


# ---- fan-out -------------------------------------------------------------------------------


async def test_hello_sub_and_events_both_ways(
    broker: UnixBroker, make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus(name="attr-test")
    sub = bus.subscribe("attacker.observation.>")
    await sub.wait_ready(5)
    peer = await broker.wait_for_patterns("attacker.observation.>")
    assert peer.name == "attr-test"

    await raw.pub("attacker.observation.motor.input_modality", {"value": "typed"}, "motor")
    ev = await asyncio.wait_for(sub.__anext__(), 5)
    assert ev.topic == "attacker.observation.motor.input_modality"
    assert (ev.type, ev.payload) == ("motor", {"value": "typed"})
    assert len(ev.id) == 32  # the broker's id

    await raw.sub("attribution.>")
    await until(lambda: "attribution.>" in {p for x in broker.peers for p in x.patterns})
    sent = await bus.publish("attribution.profile.state_changed", {"k": 1}, event_type="t")
    topic, envelope = await raw.next_event()
    assert topic == "attribution.profile.state_changed"
    assert list(envelope) == ["v", "id", "topic", "type", "ts", "payload"]
    assert (envelope["type"], envelope["payload"]) == ("t", {"k": 1})
    assert envelope["id"] != sent.id  # re-stamped by the broker
    # what we sent was our full envelope
    assert broker.published[-1][1]["id"] == sent.id
    assert list(broker.published[-1][1]) == ["v", "id", "topic", "type", "ts", "payload"]
    st = bus.stats()
    assert (st["published"], st["received"], st["reconnects"], st["malformed"]) == (1, 1, 0, 0)


async def test_a_process_sees_its_own_events(make_bus: UnixBusFactory) -> None:
    bus = await make_bus()
    sub = bus.subscribe("attribution.>")
    sent = await bus.publish("attribution.profile.state_changed", {"a": 1})
    ev = await asyncio.wait_for(sub.__anext__(), 1)
    assert ev.id == sent.id and ev.payload == {"a": 1}


async def test_subscribe_is_ordered_before_later_frames(
    broker: UnixBroker, make_bus: UnixBusFactory
) -> None:
    """No sleeping: the SUB is on the wire before flush's token, so once flush
    returns the broker has it (DECNET's own client races its SUB)."""
    bus = await make_bus()
    for i in range(20):
        bus.subscribe(f"t{i}.>")
        await bus.flush(5)
        peer = await broker.wait_for_patterns(f"t{i}.>", timeout=0)
        assert f"t{i}.>" in peer.patterns


async def test_first_event_after_wait_ready_is_never_lost(
    broker: UnixBroker, make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus()
    for i in range(10):
        sub = bus.subscribe(f"first.{i}")
        await sub.wait_ready(5)
        await raw.pub(f"first.{i}", {"i": i})
        ev = await asyncio.wait_for(sub.__anext__(), 5)
        assert ev.payload == {"i": i}
        await sub.aclose()
    await bus.flush()
    assert all(
        p.patterns <= {x for x in p.patterns if x.startswith("_decnet_attr.sync.")}
        for p in broker.peers
        if p.name.startswith("decnet-attr")
    )


async def test_unsub_only_when_the_last_local_user_leaves(
    broker: UnixBroker, make_bus: UnixBusFactory
) -> None:
    bus = await make_bus(name="u")
    a = bus.subscribe("x.>")
    b = bus.subscribe("x.>")
    await bus.flush()
    peer = await broker.wait_for_patterns("x.>")
    await a.aclose()
    await bus.flush()
    assert "x.>" in peer.patterns
    await b.aclose()
    await bus.flush()
    assert "x.>" not in peer.patterns


async def test_slow_subscriber_drops_oldest_and_counts(
    make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus(queue_size=2)
    sub = bus.subscribe("d.>")
    await sub.wait_ready(5)
    for i in range(5):
        await raw.pub("d.x", {"i": i})
    await until(lambda: bus.stats()["received"] == 5)
    got = [(await sub.__anext__()).payload["i"] for _ in range(2)]
    assert got == [3, 4]
    assert sub.dropped == 3 and bus.stats()["dropped"] == 3


async def test_publish_limits_never_reach_the_broker(
    broker: UnixBroker, make_bus: UnixBusFactory
) -> None:
    bus = await make_bus()
    with pytest.raises(BusPayloadTooLarge):
        await bus.publish("a.b", {"x": "y" * MAX_BODY_BYTES})
    with pytest.raises(ValueError):
        await bus.publish("a.*", {})
    with pytest.raises(ValueError, match="ASCII"):
        await bus.publish("café.b", {})
    with pytest.raises(ValueError, match="ASCII"):
        bus.subscribe("café.>")
    await bus.publish("a.b", {"ok": True})
    await bus.flush()
    assert broker.protocol_errors == 0 and broker.connections == 2  # bus + flush probe
    assert [t for t, _ in broker.published if not t.startswith("_")] == ["a.b"]
    assert bus.stats()["published"] == 1


# ---- hostile frames ------------------------------------------------------------------------


async def test_malformed_and_oversized_frames_are_counted_and_survived(
    broker: UnixBroker, make_bus: UnixBusFactory, raw: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await make_bus(name="victim")
    sub = bus.subscribe("h.>")
    await sub.wait_ready(5)
    big = MAX_BODY_BYTES + 1
    broker.inject(
        b"".join(
            [
                b"WHAT h.x\n\x00\x00\x00\x00",  # unknown verb
                frame("EVT", "h.x", b"{not json"),  # bad JSON
                frame("EVT", "h.x", b"[1,2]"),  # not an object
                frame("EVT", "h.x", {"payload": [1]}),  # payload not an object
                frame("EVT", "h.x", {"payload": {}, "ts": "soon"}),  # bad ts
                frame("EVT", "", {"payload": {}}),  # no topic
                frame("SUB", "h.>"),  # a client verb from the broker
                b"EVT " + b"h" * (MAX_HEADER_BYTES + 1) + b"\n\x00\x00\x00\x00",
                b"EVT h.big\n" + struct.pack(">I", big) + b"z" * big,
            ]
        ),
        name="victim",
    )
    await raw.pub("h.after", {"still": "alive"})
    ev = await asyncio.wait_for(sub.__anext__(), 5)
    assert (ev.topic, ev.payload) == ("h.after", {"still": "alive"})
    st = bus.stats()
    assert (st["malformed"], st["oversized"], st["reconnects"], st["disconnects"]) == (7, 2, 0, 0)
    assert bus.connected
    assert "skipped a malformed frame" in caplog.text
    assert caplog.text.count("skipped a malformed frame") < 7  # rate-limited


async def test_an_unparseable_stream_costs_a_reconnect_not_the_bus(
    broker: UnixBroker, make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus(name="victim")
    sub = bus.subscribe("h.>")
    await sub.wait_ready(5)
    broker.inject(b"EVT h.x\n" + struct.pack(">I", 0xFFFFFFFF), name="victim")
    await until(lambda: bus.stats()["reconnects"] == 1, what="reconnected")
    await sub.wait_ready(5)
    await raw.pub("h.after", {"n": 1})
    ev = await asyncio.wait_for(sub.__anext__(), 5)
    assert ev.payload == {"n": 1}
    assert bus.stats()["oversized"] == 1


# ---- broker restarts -----------------------------------------------------------------------


async def test_reconnect_resubscribe_and_send_what_queued_meanwhile(
    broker: UnixBroker, make_bus: UnixBusFactory
) -> None:
    bus = await make_bus(name="r", outbox_size=3)
    sub = bus.subscribe("r.>")
    await sub.wait_ready(5)
    await broker.stop()
    await until(lambda: not bus.connected, what="disconnect noticed")
    for i in range(5):  # the broker is away: queued, oldest dropped beyond 3
        await bus.publish("out.x", {"i": i})
    assert bus.stats()["outbox_pending"] == 3
    await broker.start()
    await until(lambda: bus.connected, what="reconnected")
    await bus.flush()  # behind the re-sent SUBs and the outbox on the new connection
    peer = await broker.wait_for_patterns("r.>", timeout=0)
    assert peer.name == "r"
    assert [b["payload"]["i"] for t, b in broker.published if t == "out.x"] == [2, 3, 4]
    st = bus.stats()
    assert (st["reconnects"], st["disconnects"], st["outbox_dropped"], st["dropped"]) == (
        1,
        1,
        2,
        2,
    )
    assert st["outbox_pending"] == 0
    watcher = await RawClient.open(broker.path, "watcher")
    await watcher.pub("r.back", {"ok": 1})
    ev = await asyncio.wait_for(sub.__anext__(), 5)
    assert ev.payload == {"ok": 1}
    await watcher.close()


async def test_reconnect_survives_a_long_outage_with_backoff(
    broker: UnixBroker, make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus(name="r")
    sub = bus.subscribe("r.>")
    await sub.wait_ready(5)
    await broker.stop()
    await asyncio.sleep(0.6)  # several failed attempts (0.02 s doubling to 0.2 s)
    assert not bus.connected
    assert (bus.stats()["disconnects"], bus.stats()["reconnects"]) == (1, 0)
    await broker.start()
    await until(lambda: bus.connected, what="reconnected")
    await sub.wait_ready(5)
    client = await RawClient.open(broker.path)
    await client.pub("r.x", {"n": 2})
    assert (await asyncio.wait_for(sub.__anext__(), 5)).payload == {"n": 2}
    assert bus.stats()["reconnects"] == 1
    await client.close()


async def test_close_ends_iteration_and_refuses_use(make_bus: UnixBusFactory) -> None:
    bus = await make_bus()
    sub = bus.subscribe("c.>")
    await bus.close()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()
    with pytest.raises(RuntimeError):
        bus.subscribe("c.>")
    with pytest.raises(RuntimeError):
        await bus.publish("c.x", {})
    assert not bus.connected and bus.closed
    await bus.close()


# ---- the local durable path ----------------------------------------------------------------


async def test_durable_group_is_fed_by_the_broker_and_acks_locally(
    make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus(ack_wait=0.3)
    consumer = bus.durable_consumer("attacker.observation.>", durable="attribution")
    await bus.flush()
    for i in range(3):
        await raw.pub(f"attacker.observation.p{i}", {"i": i})
    got: list[Any] = []
    while len(got) < 3:
        got += await consumer.fetch(10, timeout=5)
    assert [d.event.payload["i"] for d in got] == [0, 1, 2]
    await got[0].ack()
    await got[1].nak()
    again = await consumer.fetch(10, timeout=5)
    assert [d.event.payload["i"] for d in again] == [1] and again[0].redelivered
    await again[0].ack()
    # the third is never acked: redelivered after ack_wait
    late = await consumer.fetch(10, timeout=5)
    assert [d.event.payload["i"] for d in late] == [2] and late[0].redelivered
    await late[0].ack()
    await got[2].ack()  # the stale delivery's ack is harmless
    st = bus.stats()
    assert (st["durable_acked"], st["durable_pending"], st["durable_redelivered"]) == (3, 0, 2)
    await consumer.aclose()


async def test_publish_durable_needs_a_local_consumer_and_waits_for_its_ack(
    broker: UnixBroker, make_bus: UnixBusFactory
) -> None:
    bus = await make_bus()
    with pytest.raises(BusUnavailable, match="no durable consumer"):
        await bus.publish_durable("attacker.observation.p", {"x": 1}, timeout=0.5)
    consumer = bus.durable_consumer("attacker.observation.>", durable="g")

    async def work() -> None:
        ds = await consumer.fetch(5, timeout=5)
        for d in ds:
            await d.ack()

    worker = asyncio.create_task(work())
    ev = await bus.publish_durable("attacker.observation.p", {"x": 1}, event_id="e1", timeout=5)
    await worker
    assert ev.id == "e1"
    await bus.flush()
    assert ("attacker.observation.p", "e1") in [(t, b.get("id")) for t, b in broker.published]
    with pytest.raises(BusUnavailable, match="not acknowledged"):
        await bus.publish_durable("attacker.observation.p", {"x": 2}, timeout=0.2)


async def test_durable_group_bound_drops_oldest_and_counts(
    make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus(durable_queue_size=3)
    consumer = bus.durable_consumer("attacker.observation.>", durable="g")
    await bus.flush()
    for i in range(5):
        await raw.pub("attacker.observation.p", {"i": i})
    await until(lambda: bus.stats()["received"] == 5)
    got = await consumer.fetch(10, timeout=1)
    assert [d.event.payload["i"] for d in got] == [2, 3, 4]
    st = bus.stats()
    assert (st["durable_dropped"], st["dropped"]) == (2, 2)


async def test_envelope_fields_as_decnet_sends_them(
    make_bus: UnixBusFactory, raw: RawClient
) -> None:
    bus = await make_bus()
    sub = bus.subscribe("system.>")
    await sub.wait_ready(5)
    await raw.pub("system.bus.health", {"pid": 1, "uptime_sec": 2.5}, "bus.health")
    ev = await asyncio.wait_for(sub.__anext__(), 5)
    assert (ev.v, ev.type, ev.payload) == (1, "bus.health", {"pid": 1, "uptime_sec": 2.5})
    assert orjson.loads(ev.to_json())["topic"] == "system.bus.health"


# ---- decoder properties --------------------------------------------------------------------
_verbs = st.sampled_from(["HELLO", "PUB", "SUB", "UNSUB", "EVT", "BYE"])
_args = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
_frames = st.lists(st.tuples(_verbs, _args, st.binary(max_size=300)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(frames=_frames, cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=50))
def test_decoder_gets_every_frame_back_whatever_the_chunking(
    frames: list[tuple[str, str, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(v, a, b) for v, a, b in frames)
    dec = FrameDecoder()
    got: list[Frame | BadFrame] = []
    pos = 0
    for cut in cuts:
        got += dec.feed(stream[pos : pos + cut])
        pos += cut
    got += dec.feed(stream[pos:])
    assert all(isinstance(f, Frame) for f in got)
    assert [(f.verb, f.args, f.body) for f in got if isinstance(f, Frame)] == frames
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=2000), frames=_frames)
def test_decoder_on_junk_buffers_boundedly_or_gives_up_cleanly(
    junk: bytes, frames: list[tuple[str, str, bytes]]
) -> None:
    """Whatever bytes arrive, feed() either returns (buffering at most one
    header and one body; oversized bodies are skipped, not buffered) or raises
    StreamDesynchronised (the connection is then rebuilt); no other exception
    ever escapes."""
    dec = FrameDecoder()
    stream = junk + b"".join(encode_frame(v, a, b) for v, a, b in frames)
    try:
        for i in range(0, len(stream), 97):
            dec.feed(stream[i : i + 97])
            assert dec.buffered <= MAX_HEADER_BYTES + 4 + MAX_BODY_BYTES
    except StreamDesynchronised:
        pass
