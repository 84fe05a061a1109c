"""The wire side of the SSE relay, without a hub: frames, cursors, the
resume buffer."""

from __future__ import annotations

import pytest

from decnet_attr.server.sse.wire import (
    KEEPALIVE,
    Frame,
    ResumeBuffer,
    chunk,
    encode,
    gap,
    message,
    message_with_id,
    parse_cursor,
    preamble,
    stale,
)


def frame(seq: int) -> Frame:
    return Frame(seq, message_with_id(b"x", b"ep", seq, b'{"n":%d}' % seq))


def test_frames() -> None:
    f = frame(7)
    assert f.raw() == b'event: x\nid: ep-7\ndata: {"n":7}\n\n'
    assert f.data == chunk(f.raw())
    assert f.raw_data() == b'{"n":7}'
    assert chunk(b"abc") == b"3\r\nabc\r\n"
    assert message(b"overview", b"{}") == b"event: overview\ndata: {}\n\n"
    assert stale("unknown epoch") == b'event: stale\ndata: {"reason":"unknown epoch"}\n\n'
    assert gap(3) == b'event: gap\ndata: {"dropped":3}\n\n'
    assert preamble(2500) == KEEPALIVE + b"retry: 2500\n\n"


def test_encode() -> None:
    frames = [frame(1), frame(2)]
    assert encode(frames, True) == frames[0].data + frames[1].data
    assert encode(frames, False) == frames[0].raw() + frames[1].raw()
    assert encode(frames[:1], True) is frames[0].data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (None, "")),
        ("ep-3", (3, "")),
        (" ep-0 ", (0, "")),
        ("ep-5", (5, "")),
        ("ep-6", (None, "unknown cursor")),
        ("other-3", (None, "unknown epoch")),
        ("ep3", (None, "malformed cursor")),
        ("ep-", (None, "malformed cursor")),
        ("ep--3", (None, "unknown epoch")),
        ("ep-３", (None, "malformed cursor")),  # a non-ASCII digit
        ("ep-" + "1" * 20, (None, "malformed cursor")),
    ],
)
def test_parse_cursor(text: str, expected: tuple[int | None, str]) -> None:
    assert parse_cursor(text, "ep", 5) == expected


def test_resume_buffer() -> None:
    buf = ResumeBuffer(0, 3)
    assert buf.since(0) == []
    for seq in range(1, 4):
        buf.append(frame(seq))
    assert [f.seq for f in buf.since(1) or ()] == [2, 3]
    buf.append(frame(4))  # frame 1 falls out: cursor 0 can no longer resume
    assert buf.covered_from == 1
    assert buf.since(0) is None
    assert [f.seq for f in buf.since(1) or ()] == [2, 3, 4]
    buf.restart(9)
    assert buf.since(4) is None and buf.since(9) == []


def test_resume_buffer_of_size_zero_resumes_nothing_older() -> None:
    buf = ResumeBuffer(0, 0)
    buf.append(frame(1))
    assert buf.since(0) is None
    assert buf.since(1) == [] and not buf.frames


def test_event_data_carries_an_integer_beyond_64_bits() -> None:
    """The validator accepts any JSON integer as a value, and orjson writes
    none beyond 64 bits: such a state event still reaches the streams."""
    import json

    from decnet_attr.bus import Event
    from decnet_attr.server.sse.wire import event_data

    big = -(2**63) - 1
    event = Event(
        "attribution.profile.state_changed",
        {"identity_uuid": "i1", "current_value": big, "note": "é"},
        type="profile.state_changed",
        ts=5.0,
    )
    data = event_data(event)
    assert json.loads(data) == {
        "topic": "attribution.profile.state_changed",
        "type": "profile.state_changed",
        "ts": 5.0,
        "payload": {"identity_uuid": "i1", "current_value": big, "note": "é"},
    }
    assert b"\n" not in data  # one data: line
