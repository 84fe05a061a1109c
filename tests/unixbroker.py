"""A DECNET-style Unix-socket bus broker for tests, written from the protocol
description (not DECNET's code), plus a raw client to play DECNET's publishers
and subscribers.

Protocol: a frame is an ASCII header line ``VERB args\\n`` (at most 4 KiB), a
big-endian uint32 body length and a JSON body (at most 1 MiB). Verbs HELLO,
PUB, SUB, UNSUB, EVT, BYE. The broker keeps per connection a name, a set of
patterns and an outbound queue of 1,024 frames (drop-oldest); a PUB is
rebuilt from its body's ``payload`` and ``type`` with a fresh id and ts and
sent as EVT to every *other* connection with a matching pattern (once per
connection). A protocol violation (bad header, oversized frame, empty SUB or
PUB topic, EVT from a client, bad JSON) closes that connection.

Test hooks: :meth:`UnixBroker.inject` writes raw bytes to every connection
(malformed frames), :meth:`UnixBroker.wait_for_patterns` waits until a
connection has subscribed what a test needs, :meth:`UnixBroker.stop` /
:meth:`UnixBroker.start` restart it on the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from decnet_attr.topics import matches

MAX_HEADER = 4096
MAX_BODY = 1024 * 1024
QUEUE = 1024
VERBS = {"HELLO", "PUB", "SUB", "UNSUB", "EVT", "BYE"}


class BrokerProtocolError(Exception):
    pass


def frame(verb: str, args: str = "", body: Any = None) -> bytes:
    data = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
    header = (f"{verb} {args}".rstrip() + "\n").encode("ascii")
    return header + struct.pack(">I", len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        header = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise BrokerProtocolError("EOF in header") from exc
    except asyncio.LimitOverrunError as exc:
        raise BrokerProtocolError("header too long") from exc
    if len(header) > MAX_HEADER:
        raise BrokerProtocolError("header too long")
    try:
        line = header.rstrip(b"\r\n").decode("ascii")
    except UnicodeDecodeError as exc:
        raise BrokerProtocolError("header not ASCII") from exc
    if not line:
        raise BrokerProtocolError("empty header")
    verb, _, args = line.partition(" ")
    if verb not in VERBS:
        raise BrokerProtocolError(f"unknown verb {verb!r}")
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if length > MAX_BODY:
        raise BrokerProtocolError("body too large")
    body = await reader.readexactly(length) if length else b""
    return verb, args.strip(), body


@dataclass(eq=False)
class Peer:
    writer: asyncio.StreamWriter
    name: str = ""
    patterns: set[str] = field(default_factory=set)
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    dropped: int = 0
    closed: bool = False


class UnixBroker:
    """The broker. ``async with UnixBroker(path) as b`` starts and stops it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.peers: set[Peer] = set()
        self.published: list[tuple[str, dict[str, Any]]] = []  # (topic, PUB body) received
        self.protocol_errors = 0
        self.connections = 0  # accepted so far
        self._server: asyncio.AbstractServer | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for peer in list(self.peers):
            self._close(peer)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.peers.clear()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> UnixBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test hooks ----------------------------------------------------------------------
    def inject(self, data: bytes, name: str | None = None) -> None:
        """Write raw bytes to every connection (or those HELLO'd as *name*)."""
        for peer in self.peers:
            if name is None or peer.name == name:
                peer.writer.write(data)

    def publish(self, topic: str, payload: dict[str, Any], event_type: str = "") -> None:
        """A server-side event (no origin): like DECNET's heartbeats."""
        self._fanout(topic, payload, event_type, None)

    async def wait_for_patterns(self, *patterns: str, timeout: float = 5.0) -> Peer:
        """Until one connection has subscribed all *patterns*; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            for peer in self.peers:
                if set(patterns) <= peer.patterns:
                    return peer
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no connection subscribed {patterns}: {[p.patterns for p in self.peers]}"
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    # -- connections -----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(writer)
        self.peers.add(peer)
        self.connections += 1
        sender = asyncio.create_task(self._send_loop(peer))
        try:
            while True:
                got = await read_frame(reader)
                if got is None:
                    break
                verb, args, body = got
                if verb == "BYE":
                    break
                self._handle(peer, verb, args, body)
                self._changed.set()
        except BrokerProtocolError:
            self.protocol_errors += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._close(peer)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self._changed.set()

    def _handle(self, peer: Peer, verb: str, args: str, body: bytes) -> None:
        if verb == "HELLO":
            peer.name = args
        elif verb == "SUB":
            if not args:
                raise BrokerProtocolError("SUB without pattern")
            peer.patterns.add(args)
        elif verb == "UNSUB":
            peer.patterns.discard(args)
        elif verb == "PUB":
            if not args:
                raise BrokerProtocolError("PUB without topic")
            try:
                data = orjson.loads(body) if body else {}
            except orjson.JSONDecodeError as exc:
                raise BrokerProtocolError("bad JSON") from exc
            if not isinstance(data, dict):
                raise BrokerProtocolError("body not an object")
            self.published.append((args, data))
            self._fanout(args, data.get("payload") or {}, data.get("type") or "", peer)
        else:  # EVT from a client
            raise BrokerProtocolError(f"{verb} from a client")

    def _fanout(self, topic: str, payload: Any, etype: str, origin: Peer | None) -> None:
        envelope = {
            "v": 1,
            "id": uuid.uuid4().hex,  # the broker stamps its own id and ts
            "topic": topic,
            "type": etype,
            "ts": time.time(),
            "payload": payload,
        }
        data = frame("EVT", topic, envelope)
        for peer in self.peers:
            if peer is origin or peer.closed:
                continue
            if not any(matches(p, topic) for p in peer.patterns):
                continue
            while True:
                try:
                    peer.queue.put_nowait(data)
                    break
                except asyncio.QueueFull:
                    peer.queue.get_nowait()
                    peer.dropped += 1

    async def _send_loop(self, peer: Peer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while not peer.closed:
                data = await peer.queue.get()
                peer.writer.write(data)
                await peer.writer.drain()

    def _close(self, peer: Peer) -> None:
        if peer.closed:
            return
        peer.closed = True
        self.peers.discard(peer)
        with contextlib.suppress(Exception):
            peer.writer.close()


class RawClient:
    """A bare protocol client (DECNET's profiler, its SSE relay...)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path, name: str = "decnet-test") -> RawClient:
        reader, writer = await asyncio.open_unix_connection(str(path))
        client = cls(reader, writer)
        writer.write(frame("HELLO", name))
        return client

    async def sub(self, *patterns: str) -> None:
        for p in patterns:
            self.writer.write(frame("SUB", p))
        await self.writer.drain()

    async def pub(self, topic: str, payload: dict[str, Any], event_type: str = "") -> None:
        envelope = {
            "v": 1,
            "id": uuid.uuid4().hex,
            "topic": topic,
            "type": event_type,
            "ts": time.time(),
            "payload": payload,
        }
        self.writer.write(frame("PUB", topic, envelope))
        await self.writer.drain()

    async def next_event(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        """(topic, envelope) of the next EVT."""
        while True:
            got = await asyncio.wait_for(read_frame(self.reader), timeout)
            if got is None:
                raise EOFError("broker closed the connection")
            verb, args, body = got
            if verb == "EVT":
                data = orjson.loads(body)
                assert isinstance(data, dict)
                return args, data

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(frame("BYE"))
            self.writer.close()
            await self.writer.wait_closed()


def short_socket_dir() -> Path:
    """A fresh directory with a short path (Unix socket paths are limited to
    ~107 bytes, which pytest's tmp_path can exceed)."""
    return Path(tempfile.mkdtemp(prefix="dab-", dir="/tmp"))
