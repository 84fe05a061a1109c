"""DECNET's own Unix-socket bus, as a client (``unix:///run/decnet/bus.sock``).

DECNET runs a small broker on a Unix socket. Every frame is an ASCII header
line ``VERB args\\n`` (at most 4 KiB), a big-endian 32-bit body length and a
JSON body (at most 1 MiB, possibly empty). A client says ``HELLO <name>``,
``SUB``/``UNSUB <pattern>``, ``PUB <topic>`` with a full envelope
``{v, id, topic, type, ts, payload}`` as body, and receives ``EVT <topic>``
frames; ``BYE`` ends a connection. The broker keeps only ``payload`` and
``type`` of a PUB, stamps a new id and ts, never echoes an event to the
connection that published it, and drops the oldest frame of a connection whose
queue holds 1,024. There is no acknowledgement of anything: the transport is
at-most-once.

What this client adds:

- **Reconnects** with exponential backoff (``reconnect_min`` doubling to
  ``reconnect_max``, with jitter) whenever the broker goes away, then says
  HELLO and SUBs every live pattern again before anything else it sends.
- **Ordered subscriptions.** :meth:`UnixBus.subscribe` writes its SUB
  synchronously, so it reaches the broker before any PUB this process sends
  afterwards; :meth:`UnixBus.flush` (and ``Subscription.wait_ready``) proves
  that the broker has processed everything sent so far, by publishing a token
  from a short-lived second connection until it comes back on this one.
- **Loopback.** The broker does not echo, so a publish is also delivered to
  this process's own matching subscribers (as with the other buses); that is
  how an in-process worker's events reach the in-process SSE relay.
- **Bounded queues, counted drops**: per subscription (drop-oldest), per
  durable group (drop-oldest of the not-yet-delivered events) and for PUBs
  waiting while the broker is away or not reading (``outbox_size`` frames,
  drop-oldest).
- **Hostile input survives.** A malformed frame (bad header, unknown verb,
  bad JSON, a body that is not an envelope) or an oversized one is counted,
  logged (rate-limited) and skipped; only a stream that cannot be
  re-synchronised (a declared body above ``MAX_SKIP_BYTES``) costs a reconnect.

The durable path is local: a durable group is a queue in this process fed by
the broker's EVT frames (and by local publishes); deliveries are acked after
the consumer's commit and redelivered within this process on nak or after
``ack_wait``. Nothing survives the process: what the broker dropped or what
was queued when the process died is lost. :meth:`UnixBus.publish_durable`
therefore needs a consumer of the group in this process (``serve`` with its
worker) and waits for its ack; without one it raises :class:`BusUnavailable`.

Configuration is passed in; nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import struct
import uuid
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import orjson

from decnet_attr.bus.base import (
    Bus,
    BusPayloadTooLarge,
    BusUnavailable,
    DurableConsumer,
    Event,
    QueueSubscription,
    RateLimitedLog,
    Subscription,
)
from decnet_attr.bus.helpers import batch_observations
from decnet_attr.bus.local import DurableCounts, Entry, LocalGroup, await_acks, join_group
from decnet_attr.topics import (
    is_observation_batch,
    matches,
    validate_pattern,
)

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_SKIP_BYTES",
    "Frame",
    "FrameDecoder",
    "UnixBus",
    "default_socket_path",
    "encode_frame",
    "socket_path_from_url",
]

logger = logging.getLogger(__name__)
_rl = RateLimitedLog(logger)

#: Largest header line, newline included (DECNET's limit).
MAX_HEADER_BYTES = 4096
#: Largest frame body (DECNET's limit).
MAX_BODY_BYTES = 1024 * 1024
#: An oversized body up to this size is skipped in stream; a larger declared
#: length means the stream cannot be trusted any more: reconnect.
MAX_SKIP_BYTES = 64 * MAX_BODY_BYTES

HELLO, PUB, SUB, UNSUB, EVT, BYE = "HELLO", "PUB", "SUB", "UNSUB", "EVT", "BYE"
VERBS = frozenset({HELLO, PUB, SUB, UNSUB, EVT, BYE})

#: Topic of the round-trip tokens used by :meth:`UnixBus.flush` (one per bus).
SYNC_PREFIX = "_decnet_attr.sync."

_LEN = struct.Struct(">I")


# ------------------------------------------------------------------------------------------
# socket path
# ------------------------------------------------------------------------------------------
def default_socket_path() -> Path:
    """DECNET's default socket: ``/run/decnet/bus.sock`` when ``/run/decnet`` is
    a writable directory, else ``~/.decnet/bus.sock``."""
    run = Path("/run/decnet")
    if run.is_dir() and os.access(run, os.W_OK):
        return run / "bus.sock"
    return Path.home() / ".decnet" / "bus.sock"


def socket_path_from_url(url: str) -> Path:
    """``unix:///abs/path.sock`` -> the path; ``unix://`` alone -> DECNET's default
    (:func:`default_socket_path`); ``unix://~/x.sock`` is expanded.
    :class:`ValueError` for anything else."""
    text = url.strip()
    if not text.lower().startswith("unix://"):
        raise ValueError(f"not a unix:// url: {url!r}")
    rest = text[len("unix://") :]
    if "?" in rest or "#" in rest:
        raise ValueError(f"unix:// url takes a path only: {url!r}")
    if not rest:
        return default_socket_path()
    path = Path(rest).expanduser()
    if not path.is_absolute():
        raise ValueError(f"unix:// socket path must be absolute: {url!r}")
    return path


# ------------------------------------------------------------------------------------------
# frames
# ------------------------------------------------------------------------------------------
def encode_frame(verb: str, args: str = "", body: bytes = b"") -> bytes:
    """One frame. :class:`ValueError` for an unknown verb, args with CR/LF or
    not ASCII, or a header above :data:`MAX_HEADER_BYTES`;
    :class:`BusPayloadTooLarge` for a body above :data:`MAX_BODY_BYTES`."""
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}")
    if "\n" in args or "\r" in args:
        raise ValueError("frame args must not contain CR or LF")
    try:
        header = (f"{verb} {args}".rstrip() + "\n").encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"frame args must be ASCII: {args[:200]!r}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header is {len(header)} bytes, above {MAX_HEADER_BYTES}")
    if len(body) > MAX_BODY_BYTES:
        raise BusPayloadTooLarge(f"frame body is {len(body)} bytes, above {MAX_BODY_BYTES}")
    return header + _LEN.pack(len(body)) + body


class Frame:
    """A decoded frame (``verb`` is validated, ``body`` is raw bytes)."""

    __slots__ = ("args", "body", "verb")

    def __init__(self, verb: str, args: str, body: bytes) -> None:
        self.verb = verb
        self.args = args
        self.body = body

    def __repr__(self) -> str:
        return f"Frame({self.verb!r}, {self.args!r}, {len(self.body)} bytes)"


class BadFrame:
    """A frame that was skipped: ``kind`` is ``"malformed"`` or ``"oversized"``."""

    __slots__ = ("kind", "reason")

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadFrame({self.kind!r}, {self.reason!r})"


class StreamDesynchronised(Exception):
    """The byte stream cannot be parsed further (the connection must go)."""


_HEADER, _LENGTH, _BODY, _SKIP_LINE, _SKIP_BODY = range(5)


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes as they arrive, get complete
    frames (and :class:`BadFrame` notes for skipped ones) back.

    Every frame is header line, length, body; a bad header (too long, not
    ASCII, empty, unknown verb) or a body above :data:`MAX_BODY_BYTES` is
    skipped as a whole, so the stream stays in step. A declared length above
    :data:`MAX_SKIP_BYTES` raises :class:`StreamDesynchronised`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEADER
        self._verb = ""
        self._args = ""
        self._bad: BadFrame | None = None
        self._need = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        buf = self._buf
        buf += data
        out: list[Frame | BadFrame] = []
        pos = 0
        n = len(buf)
        while True:
            state = self._state
            if state == _HEADER or state == _SKIP_LINE:
                nl = buf.find(b"\n", pos, n)
                if nl < 0:
                    if state == _HEADER and n - pos >= MAX_HEADER_BYTES:
                        self._bad = BadFrame("oversized", f"header above {MAX_HEADER_BYTES} bytes")
                        self._state = _SKIP_LINE
                        pos = n
                    elif state == _SKIP_LINE:
                        pos = n
                    break
                if state == _HEADER:
                    self._bad = self._parse_header(buf, pos, nl)
                pos = nl + 1
                self._state = _LENGTH
            elif state == _LENGTH:
                if n - pos < 4:
                    break
                (length,) = _LEN.unpack_from(buf, pos)
                pos += 4
                if length > MAX_SKIP_BYTES:
                    self._buf = bytearray()
                    raise StreamDesynchronised(
                        f"declared body of {length} bytes: stream out of step"
                    )
                if self._bad is None and length > MAX_BODY_BYTES:
                    self._bad = BadFrame(
                        "oversized", f"{self._verb} body of {length} bytes, above {MAX_BODY_BYTES}"
                    )
                self._need = length
                self._state = _SKIP_BODY if self._bad is not None else _BODY
            elif state == _BODY:
                need = self._need
                if n - pos < need:
                    break
                out.append(Frame(self._verb, self._args, bytes(buf[pos : pos + need])))
                pos += need
                self._state = _HEADER
            else:  # _SKIP_BODY
                take = min(self._need, n - pos)
                pos += take
                self._need -= take
                if self._need:
                    break
                assert self._bad is not None
                out.append(self._bad)
                self._bad = None
                self._state = _HEADER
        if pos:
            del buf[:pos]
        return out

    def _parse_header(self, buf: bytearray, start: int, nl: int) -> BadFrame | None:
        if nl + 1 - start > MAX_HEADER_BYTES:
            return BadFrame("oversized", f"header above {MAX_HEADER_BYTES} bytes")
        end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
        try:
            line = bytes(buf[start:end]).decode("ascii")
        except UnicodeDecodeError:
            return BadFrame("malformed", "header is not ASCII")
        if not line:
            return BadFrame("malformed", "empty header line")
        verb, _, args = line.partition(" ")
        if verb not in VERBS:
            return BadFrame("malformed", f"unknown verb {verb[:40]!r}")
        self._verb = verb
        self._args = args.strip()
        return None


# ------------------------------------------------------------------------------------------
# subscriptions and the local durable groups
# ------------------------------------------------------------------------------------------
class _UnixSubscription(QueueSubscription):
    def __init__(self, bus: UnixBus, pattern: str, maxsize: int) -> None:
        super().__init__(pattern, maxsize, on_close=bus._unsubscribe, on_drop=bus._count_drop)
        self._bus = bus

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self._bus.flush(5.0 if timeout is None else timeout)


class _Group(LocalGroup):
    """A durable group fed by the broker's EVT frames and local publishes;
    when full, the oldest queued event is dropped (the broker does not wait)."""

    def __init__(self, bus: UnixBus, name: str, pattern: str, maxsize: int) -> None:
        super().__init__(bus._durable, name, pattern, maxsize)
        self.bus = bus

    def push(self, event: Event, future: asyncio.Future[bool] | None = None) -> None:
        """Queue *event*; when full, the oldest queued event is dropped (or,
        with nothing queued but everything in flight, this one)."""
        if self.closed:
            return
        if len(self) >= self.maxsize:
            victim = self.ready.popleft() if self.ready else Entry(event, future)
            victim.settle(False)
            self.bus._note_group_drop(self, victim.event)
            if victim.event is event:
                return
        self.ready.append(Entry(event, future))
        self.items.set()


# ------------------------------------------------------------------------------------------
# the connection
# ------------------------------------------------------------------------------------------
class _Connection(asyncio.Protocol):
    """One socket to the broker; hands decoded frames to the bus."""

    def __init__(self, bus: UnixBus) -> None:
        self.bus = bus
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.paused = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * MAX_BODY_BYTES)

    def data_received(self, data: bytes) -> None:
        try:
            items = self.decoder.feed(data)
        except StreamDesynchronised as exc:
            self.bus._note_bad("oversized", str(exc))
            if self.transport is not None:
                self.transport.abort()
            return
        for item in items:
            if isinstance(item, Frame):
                self.bus._on_frame(self, item)
            else:
                self.bus._note_bad(item.kind, item.reason)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.bus._on_writable(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused = True
        if not self.lost.done():
            self.lost.set_result(None)
        self.bus._on_lost(self, exc)

    @property
    def usable(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing()

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self, *, bye: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if bye:
            with contextlib.suppress(Exception):
                t.write(encode_frame(BYE))
        t.close()


# ------------------------------------------------------------------------------------------
# the bus
# ------------------------------------------------------------------------------------------
class UnixBus(Bus):
    """Client of DECNET's Unix-socket broker (``unix://``). See the module docstring.

    :param path: the broker's socket.
    :param name: the name sent with HELLO (default ``decnet-attr[<pid>]``).
    :param queue_size: per-subscriber queue bound (drop-oldest beyond it).
    :param durable_queue_size: per durable group bound on queued + unacked events.
    :param outbox_size: PUB frames kept while the broker is away or not reading
        (drop-oldest beyond it); sent in order once it is back.
    :param ack_wait: seconds after which an unacked durable delivery is redelivered.
    :param connect_timeout: seconds :meth:`connect` keeps trying the first time.
    :param reconnect_min: first reconnect delay (s); doubles per failed attempt...
    :param reconnect_max: ...up to this (s).
    """

    name = "unix"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        queue_size: int = 1024,
        durable_queue_size: int = 65536,
        outbox_size: int = 1024,
        ack_wait: float = 30.0,
        connect_timeout: float = 5.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        route_cache_size: int = 4096,
    ) -> None:
        if queue_size < 1 or durable_queue_size < 1 or outbox_size < 1:
            raise ValueError("queue sizes must be >= 1")
        if ack_wait <= 0 or connect_timeout <= 0 or reconnect_min <= 0:
            raise ValueError("timeouts must be > 0")
        if reconnect_max < reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        self.path = Path(path)
        client = name if name is not None else f"decnet-attr[{os.getpid()}]"
        encode_frame(HELLO, client)  # validates the name (ASCII, no CR/LF, size)
        self.client_name = client
        self._queue_size = queue_size
        self._durable_queue_size = durable_queue_size
        self._outbox_size = outbox_size
        self._ack_wait = float(ack_wait)
        self._connect_timeout = float(connect_timeout)
        self._reconnect_min = float(reconnect_min)
        self._reconnect_max = float(reconnect_max)
        self._route_cache_size = route_cache_size

        self._conn: _Connection | None = None
        self._started = False
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        #: pattern -> local users (subscriptions, durable groups, flush probes)
        self._patterns: dict[str, int] = {}
        self._subs: dict[_UnixSubscription, None] = {}
        self._groups: dict[str, _Group] = {}
        self._sync: dict[str, asyncio.Future[None]] = {}
        self._route: dict[str, tuple[list[_UnixSubscription], list[_Group]]] = {}
        self._outbox: deque[bytes] = deque()

        self._published = 0
        self._delivered = 0
        self._received = 0
        self._dropped = 0
        self._outbox_dropped = 0
        self._malformed = 0
        self._oversized = 0
        self._reconnects = 0
        self._disconnects = 0
        self._durable = DurableCounts()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect (trying for up to ``connect_timeout`` seconds); idempotent.
        :class:`BusUnavailable` if the broker cannot be reached. Once connected
        the bus reconnects on its own until :meth:`close`."""
        if self._closed:
            raise RuntimeError("bus is closed")
        if self._started:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._started:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._connect_timeout
            delay = self._reconnect_min
            while True:
                try:
                    await self._open(max(deadline - loop.time(), 0.05))
                    break
                except OSError as exc:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._closed:
                        raise BusUnavailable(
                            f"cannot connect to the DECNET bus at {self.path} within "
                            f"{self._connect_timeout}s: {exc}"
                        ) from exc
                    await asyncio.sleep(min(delay, remaining))
                    delay = min(delay * 2, self._reconnect_max)
            if self._closed:
                self._drop_connection()
                raise RuntimeError("bus is closed")
            self._started = True
            logger.info("connected to the DECNET bus at %s as %r", self.path, self.client_name)

    async def _open(self, timeout: float) -> None:
        """One connection attempt: connect, HELLO, SUB every pattern, send the outbox."""
        loop = asyncio.get_running_loop()
        _transport, conn = await asyncio.wait_for(
            loop.create_unix_connection(lambda: _Connection(self), str(self.path)), timeout
        )
        if self._closed:
            conn.close(bye=True)
            return
        parts = [encode_frame(HELLO, self.client_name)]
        parts.extend(encode_frame(SUB, p) for p in self._patterns)
        conn.write(b"".join(parts))
        self._conn = conn
        self._on_writable(conn)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(bye=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        conn = self._conn
        if conn is not None and self._outbox:
            self._on_writable(conn)
        self._drop_connection()
        if self._outbox:
            logger.warning(
                "DECNET bus closed with %d event(s) not sent to the broker", len(self._outbox)
            )
            self._outbox.clear()
        for sub in list(self._subs):
            sub.end(drain=True)
        self._subs.clear()
        for group in self._groups.values():
            group.close()
        for fut in self._sync.values():
            if not fut.done():
                fut.cancel()
        self._route.clear()

    @property
    def connected(self) -> bool:
        conn = self._conn
        return not self._closed and conn is not None and conn.usable

    @property
    def closed(self) -> bool:
        return self._closed

    # -- connection events -------------------------------------------------------------------
    def _on_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._closed:
            return
        self._disconnects += 1
        logger.warning(
            "lost the DECNET bus at %s (%s); reconnecting", self.path, exc or "closed by broker"
        )
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = self._reconnect_min
        attempts = 0
        while not self._closed:
            # full jitter on top of half the delay: many clients do not stampede
            await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
            if self._closed:
                return
            attempts += 1
            try:
                await self._open(max(self._connect_timeout, 0.5))
            except Exception as exc:  # OSError, timeout: keep trying whatever it was
                _rl.warning(
                    "unix-reconnect",
                    "DECNET bus at %s still unreachable after %d attempt(s): %s",
                    self.path,
                    attempts,
                    exc,
                )
                delay = min(delay * 2, self._reconnect_max)
                continue
            if self._conn is not None:
                self._reconnects += 1
                logger.info(
                    "reconnected to the DECNET bus at %s after %d attempt(s)", self.path, attempts
                )
            return

    def _on_writable(self, conn: _Connection) -> None:
        """Send queued PUBs while the socket takes them."""
        outbox = self._outbox
        if not outbox or conn is not self._conn or not conn.usable:
            return
        batch: list[bytes] = []
        size = 0
        while outbox and size < 4 * MAX_BODY_BYTES:
            frame = outbox.popleft()
            batch.append(frame)
            size += len(frame)
        conn.write(b"".join(batch))
        if outbox and not conn.paused:
            asyncio.get_running_loop().call_soon(self._on_writable, conn)

    def _send_pub(self, frame: bytes) -> None:
        conn = self._conn
        if conn is not None and conn.usable and not conn.paused and not self._outbox:
            conn.write(frame)
            return
        outbox = self._outbox
        if len(outbox) >= self._outbox_size:
            outbox.popleft()
            self._outbox_dropped += 1
            self._dropped += 1
            _rl.warning(
                "unix-outbox",
                "DECNET bus outbox full (%d frames, broker %s): dropped the oldest event; "
                "%d dropped in total",
                self._outbox_size,
                "away" if conn is None else "not reading",
                self._outbox_dropped,
            )
        outbox.append(frame)

    def _send_control(self, verb: str, pattern: str) -> None:
        conn = self._conn
        if conn is not None:
            conn.write(encode_frame(verb, pattern))
        # while disconnected: the reconnect sends SUB for every live pattern

    # -- frames from the broker --------------------------------------------------------------
    def _on_frame(self, conn: _Connection, frame: Frame) -> None:
        verb = frame.verb
        if verb == EVT:
            self._on_event(frame)
        elif verb == BYE:
            logger.info("the DECNET bus at %s said BYE", self.path)
            if conn.transport is not None:
                conn.transport.close()
        else:
            self._note_bad("malformed", f"unexpected {verb} frame from the broker")

    def _on_event(self, frame: Frame) -> None:
        topic = frame.args
        if not topic:
            self._note_bad("malformed", "EVT without a topic")
            return
        try:
            data = orjson.loads(frame.body) if frame.body else {}
            event = Event.from_dict(topic, data)
        except Exception as exc:  # bad JSON, not an envelope: whatever it is, skip it
            self._note_bad("malformed", f"EVT on {topic[:200]!r}: {exc}")
            return
        if topic.startswith(SYNC_PREFIX):
            fut = self._sync.get(topic)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        self._received += 1
        self._dispatch(event)

    def _note_bad(self, kind: str, reason: str) -> None:
        if kind == "oversized":
            self._oversized += 1
        else:
            self._malformed += 1
        _rl.warning(
            "unix-" + kind, "skipped a %s frame from the DECNET bus: %s", kind, reason[:300]
        )

    # -- local routing -----------------------------------------------------------------------
    def _targets(self, topic: str) -> tuple[list[_UnixSubscription], list[_Group]]:
        hit = self._route.get(topic)
        if hit is None:
            hit = (
                [s for s in self._subs if matches(s.pattern, topic)],
                [g for g in self._groups.values() if matches(g.pattern, topic)],
            )
            if len(self._route) >= self._route_cache_size:
                self._route.clear()
            self._route[topic] = hit
        return hit

    def _dispatch(self, event: Event, skip_groups: bool = False) -> None:
        subs, groups = self._targets(event.topic)
        for sub in subs:
            sub.push(event)
        self._delivered += len(subs)
        if not skip_groups:
            for group in groups:
                group.push(event)

    def _count_drop(self, n: int) -> None:
        self._dropped += n

    def _note_group_drop(self, group: _Group, event: Event) -> None:
        self._durable.dropped += 1
        self._dropped += 1
        _rl.warning(
            "unix-durable:" + group.name,
            "durable queue %r full (%d events): dropped %s on %s; %d dropped in total",
            group.name,
            group.maxsize,
            event.id,
            event.topic,
            self._durable.dropped,
        )

    def _use_pattern(self, pattern: str) -> None:
        n = self._patterns.get(pattern, 0)
        self._patterns[pattern] = n + 1
        if n == 0:
            self._send_control(SUB, pattern)
        self._route.clear()

    def _release_pattern(self, pattern: str) -> None:
        n = self._patterns.get(pattern, 0) - 1
        if n > 0:
            self._patterns[pattern] = n
        else:
            self._patterns.pop(pattern, None)
            if n == 0 and not self._closed:
                self._send_control(UNSUB, pattern)
        self._route.clear()

    # -- fan-out -----------------------------------------------------------------------------
    def _encode_pub(self, event: Event) -> bytes:
        try:
            body = event.to_json()
        except TypeError as exc:
            raise TypeError(f"payload on {event.topic!r} is not JSON: {exc}") from None
        if len(body) > MAX_BODY_BYTES:
            raise BusPayloadTooLarge(
                f"event on {event.topic!r} is {len(body)} bytes, above the DECNET bus limit "
                f"of {MAX_BODY_BYTES}"
            )
        return encode_frame(PUB, event.topic, body)

    async def _publish(self, event: Event) -> None:
        """PUB to the broker (queued in the outbox while it is away) and deliver
        to this process's matching subscribers and durable groups. Never waits."""
        self._send_pub(self._encode_pub(event))
        self._published += 1
        self._dispatch(event)

    def subscribe(self, pattern: str) -> Subscription:
        if self._closed:
            raise RuntimeError("bus is closed")
        validate_pattern(pattern)
        encode_frame(SUB, pattern)  # ASCII and size, before anything changes
        sub = _UnixSubscription(self, pattern, self._queue_size)
        self._subs[sub] = None
        self._use_pattern(pattern)
        return sub

    async def _unsubscribe(self, sub: QueueSubscription) -> None:
        assert isinstance(sub, _UnixSubscription)
        if self._subs.pop(sub, 0) is None:
            self._release_pattern(sub.pattern)

    async def flush(self, timeout: float = 5.0) -> None:
        """Return once the broker has processed every frame this bus wrote so
        far (SUBs included). A private token topic is subscribed on this
        connection and published from a short-lived second one until it comes
        back: the broker handles a connection's frames in order, so our earlier
        frames were handled too. :class:`BusUnavailable` on timeout."""
        if self._closed:
            raise RuntimeError("bus is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        topic = SYNC_PREFIX + uuid.uuid4().hex
        fut: asyncio.Future[None] = loop.create_future()
        self._sync[topic] = fut
        self._use_pattern(topic)
        probe: _Connection | None = None
        try:
            while not fut.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BusUnavailable(f"DECNET bus at {self.path}: no round trip in {timeout}s")
                if probe is None or probe.lost.done():
                    try:
                        _t, fresh = await asyncio.wait_for(
                            loop.create_unix_connection(lambda: _Connection(self), str(self.path)),
                            remaining,
                        )
                    except (TimeoutError, OSError):
                        probe = None
                        await asyncio.sleep(min(0.05, max(remaining, 0)))
                        continue
                    fresh.write(encode_frame(HELLO, self.client_name + "-sync"))
                    probe = fresh
                probe.write(encode_frame(PUB, topic, b'{"payload":{}}'))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), min(0.02, remaining))
        finally:
            self._sync.pop(topic, None)
            self._release_pattern(topic)
            if probe is not None:
                probe.close(bye=True)

    # -- durable -----------------------------------------------------------------------------
    def _check_durable(self, topic: str) -> None:
        _subs, groups = self._targets(topic)
        if not any(g.consumers for g in groups):
            raise BusUnavailable(
                f"no durable consumer for {topic!r} in this process: the DECNET bus "
                "(unix://) acknowledges nothing, so durable publishes need the worker here"
            )

    async def _publish_durable(self, event: Event, timeout: float) -> None:
        """Queue for this process's durable groups and wait for their acks (the
        broker offers no durability); PUB to the broker as well, so DECNET's
        subscribers see the event. :class:`BusUnavailable` without an ack
        within *timeout*."""
        topic = event.topic
        frame = self._encode_pub(event)  # too large for the broker: refused before anything
        _subs, groups = self._targets(topic)
        live = [g for g in groups if g.consumers]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for group in live:  # backpressure: wait for room rather than drop
            await group.wait_for_space(deadline)
        futures: list[asyncio.Future[bool]] = []
        for group in groups:
            fut: asyncio.Future[bool] | None = None
            if group.consumers:
                fut = loop.create_future()
                futures.append(fut)
            group.push(event, fut)
        if is_observation_batch(topic):
            # DECNET's subscribers know one event per observation: the
            # broker gets those, this process's groups the batch
            for one in batch_observations(event):
                self._send_pub(self._encode_pub(one))
        else:
            self._send_pub(frame)
        self._published += 1
        self._durable.published += 1
        self._dispatch(event, skip_groups=True)
        dropped = f"durable event {event.id} on {topic!r} was dropped"
        await await_acks(futures, event, deadline, timeout, dropped)

    def durable_consumer(self, pattern: str, *, durable: str) -> DurableConsumer:
        """Join the local durable group *durable* (created, and its pattern
        subscribed at the broker, on first use; kept until :meth:`close`)."""
        if self._closed:
            raise RuntimeError("bus is closed")

        def create() -> _Group:
            encode_frame(SUB, pattern)  # ASCII and size, before anything changes
            group = _Group(self, durable, pattern, self._durable_queue_size)
            self._use_pattern(pattern)
            return group

        return join_group(self._groups, pattern, durable, self._ack_wait, create)

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        groups: Iterable[_Group] = self._groups.values()
        return {
            "published": self._published,
            "received": self._received,
            "delivered": self._delivered,
            "dropped": self._dropped,
            "outbox_dropped": self._outbox_dropped,
            "outbox_pending": len(self._outbox),
            "malformed": self._malformed,
            "oversized": self._oversized,
            "subscriptions": len(self._subs),
            "durable_published": self._durable.published,
            "durable_delivered": self._durable.delivered,
            "durable_acked": self._durable.acked,
            "durable_redelivered": self._durable.redelivered,
            "durable_dropped": self._durable.dropped,
            "durable_pending": sum(len(g) for g in groups),
            "durable_consumers": sum(len(g.consumers) for g in self._groups.values()),
            "reconnects": self._reconnects,
            "disconnects": self._disconnects,
        }
