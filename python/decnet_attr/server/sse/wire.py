"""The wire side of Server-Sent Events: what goes over the connection.

Frames (``event:`` / ``id:`` / ``data:``, serialised once and kept both as
the bare frame and as the HTTP/1.1 chunk), the keepalive comment and the
``retry:`` preamble, the control messages (``stale``, ``gap``, ``error``), the
resume cursor a client sends back (``Last-Event-ID``: ``<epoch>-<seq>``) and
the resume buffer that answers it. Nothing here knows about attackers, the
bus or who is listening: that is the fan-out side
(:mod:`decnet_attr.server.sse.hub`).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Final

import orjson
from aiohttp import web

from decnet_attr.bus.base import Event

__all__ = [
    "ERROR",
    "KEEPALIVE",
    "KEEPALIVE_CHUNKED",
    "SSE_HEADERS",
    "WRITE_HIGH_WATER",
    "Frame",
    "ResumeBuffer",
    "chunk",
    "encode",
    "event_data",
    "gap",
    "message",
    "message_with_id",
    "parse_cursor",
    "preamble",
    "requested_cursor",
    "stale",
]

SSE_HEADERS: Final[dict[str, str]] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

#: The comment line that keeps an idle connection (and the proxies on its
#: way) alive; also the first bytes of every stream.
KEEPALIVE: Final = b": keepalive\n\n"
#: Frames are written straight to the transport while it holds less than this.
WRITE_HIGH_WATER: Final = 64 * 1024
#: What a stream says when it breaks after its headers went out.
ERROR: Final = b'event: error\ndata: {"message":"Stream interrupted"}\n\n'
#: Longest sequence number a cursor may carry (digits).
_CURSOR_DIGITS: Final = 19


def chunk(raw: bytes) -> bytes:
    """*raw* as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(raw), raw)


KEEPALIVE_CHUNKED: Final = chunk(KEEPALIVE)


def preamble(retry_ms: int) -> bytes:
    """The first bytes of a stream: a keepalive and the reconnection delay."""
    return KEEPALIVE + b"retry: %d\n\n" % retry_ms


def message(name: bytes, data: bytes) -> bytes:
    """A frame without an id (not resumable): ``event: <name>`` + ``data:``."""
    return b"event: %b\ndata: %b\n\n" % (name, data)


def message_with_id(name: bytes, epoch: bytes, seq: int, data: bytes) -> bytes:
    """A resumable frame: its ``id:`` is the cursor ``<epoch>-<seq>``."""
    return b"event: %b\nid: %b-%d\ndata: %b\n\n" % (name, epoch, seq, data)


def stale(reason: str) -> bytes:
    """``event: stale``: what the client had may be incomplete; a snapshot follows."""
    return message(b"stale", orjson.dumps({"reason": reason}))


def gap(dropped: int) -> bytes:
    """``event: gap``: *dropped* frames were not delivered; a snapshot follows."""
    return message(b"gap", orjson.dumps({"dropped": dropped}))


def event_data(event: Event) -> bytes:
    """A live event's ``data:``: ``{topic, type, ts, payload}``."""
    body = {"topic": event.topic, "type": event.type, "ts": event.ts, "payload": event.payload}
    try:
        return orjson.dumps(body)
    except TypeError:  # (orjson's encode error is one)
        # an integer beyond 64 bits, which the validator accepts as a value
        # and orjson does not write: the standard library does
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class Frame:
    """One frame with an id (``event: <name>``, ``id: <epoch>-<seq>``,
    ``data:``), serialised once and shared by every stream and resume buffer.
    ``data`` is the HTTP/1.1 chunk (``<len>\\r\\n<frame>\\r\\n``)."""

    __slots__ = ("data", "off", "seq")

    def __init__(self, seq: int, raw: bytes) -> None:
        head = b"%x\r\n" % len(raw)
        self.seq = seq
        self.off = len(head)
        self.data = head + raw + b"\r\n"

    def raw(self) -> bytes:
        return self.data[self.off : -2]

    def raw_data(self) -> bytes:
        """The ``data:`` field of the frame (one line: JSON never has a raw newline)."""
        raw = self.raw()
        start = raw.index(b"\ndata: ") + 7
        return raw[start : raw.index(b"\n", start)]


def encode(frames: Sequence[Frame], chunked: bool) -> bytes:
    """*frames* as one write: chunk-encoded, or bare (HTTP/1.0)."""
    if chunked:
        return frames[0].data if len(frames) == 1 else b"".join([f.data for f in frames])
    return b"".join([f.raw() for f in frames])


# ---- resuming ------------------------------------------------------------------------------
def requested_cursor(request: web.Request) -> str:
    """The cursor a reconnecting client sends: the ``Last-Event-ID`` header
    (what browsers send), else the ``last_event_id`` query parameter."""
    return request.headers.get("Last-Event-ID") or request.query.get("last_event_id", "")


def parse_cursor(text: str, epoch: str, last_seq: int) -> tuple[int | None, str]:
    """The sequence number of cursor *text* and, when it cannot be resumed,
    why (the reason of the ``stale`` frame): ``(None, "")`` for no cursor.
    A cursor of another *epoch* (another start of the relay), or beyond the
    last frame given (*last_seq*), is unknown."""
    if not text:
        return None, ""
    cursor_epoch, sep, seq_s = text.strip().rpartition("-")
    if not sep or not seq_s.isascii() or not seq_s.isdigit() or len(seq_s) > _CURSOR_DIGITS:
        return None, "malformed cursor"
    if cursor_epoch != epoch:
        return None, "unknown epoch"
    seq = int(seq_s)
    if seq > last_seq:
        return None, "unknown cursor"
    return seq, ""


class ResumeBuffer:
    """The last frames of a stream's source, for clients that come back.

    ``covered_from``: every frame with ``seq > covered_from`` is in
    ``frames`` (none was lost); a cursor ``>= covered_from`` resumes.
    ``maxlen`` 0 keeps no frame (nothing resumes).
    """

    __slots__ = ("covered_from", "frames")

    def __init__(self, seq: int, maxlen: int) -> None:
        self.frames: deque[Frame] = deque(maxlen=maxlen)
        self.covered_from = seq

    def append(self, frame: Frame) -> None:
        frames = self.frames
        maxlen = frames.maxlen
        if not maxlen:
            self.covered_from = frame.seq
            return
        if len(frames) >= maxlen:
            self.covered_from = frames[0].seq
        frames.append(frame)

    def since(self, cursor: int) -> list[Frame] | None:
        """The frames after *cursor*; None when older frames were dropped
        (the client needs a snapshot)."""
        if cursor < self.covered_from:
            return None
        return [f for f in self.frames if f.seq > cursor]

    def restart(self, seq: int) -> None:
        """Forget every frame: only cursors ``>= seq`` resume from now on."""
        self.frames.clear()
        self.covered_from = seq
