"""The fan-out side of the Server-Sent-Events relay: who listens to what.

One hub per process serves ``GET /api/v1/attackers/{uuid}/events`` (and the
identity and overview streams): it subscribes to the bus once, routes every
event to the channels (attacker, identity, overview) whose streams want it,
and keeps each stream's queue. The bytes on the wire (frames, keepalives,
cursors, the resume buffer) are :mod:`decnet_attr.server.sse.wire`'s.

Wire-compatible with DECNET's relay (docs/decnet.md#sse-relay, docs/decnet.md#dashboard-contract): the same event names,
``{topic, type, ts, payload}`` data for live events and a bare snapshot object,
plus what DECNET lacks:

- **One set of bus subscriptions per process.** A router looks every event up
  in an index (attacker → channel of streams; identity → attackers) instead
  of filtering it in every stream, and serialises it ONCE: all streams of an
  attacker share the frame bytes (already chunk-encoded for HTTP/1.1).
- **The identity follows the attacker**: ``identity.formed`` / ``identity.merged``
  and the ``attacker_uuids`` of attribution payloads update the index, so a
  page opened before the attacker had an identity starts receiving
  attribution events once it forms (docs/decnet.md#sse-identity-follow).
- **Resumable**: every event frame has an ``id: <epoch>-<seq>``; a bounded
  per-attacker resume buffer replays what a reconnecting client
  (``Last-Event-ID``) missed; an unknown cursor gets ``event: stale`` and a
  fresh snapshot, never a silent skip (docs/decnet.md#sse-resume).
- **Slow clients never stall others**: the router never awaits a stream. A
  stream that keeps up is written to directly; one that does not gets a
  bounded queue, and on overflow ``event: gap`` + a fresh snapshot (closed if
  it overflows again soon).
- **Everything that can fail is answered before the 200 headers**: 401/403
  (the ``authenticate`` callable), 404, the per-user cap (429 with
  ``Retry-After``; docs/decnet.md#sse-connection-cap), 503.
- **Streams end** on ``system.auth.revoked``, when ``still_valid`` says so (every
  few seconds), at the token's ``exp`` and at :meth:`SseHub.stop`.
- **Bus outages**: streams stay open with keepalives while the relay
  resubscribes with backoff; when events may have been lost, every stream gets
  ``event: stale`` + a fresh snapshot and old cursors stop being resumable.

Writes bypass aiohttp's per-write machinery once the headers are out: the
router collects the frames of a batch (whatever the bus had queued) per
stream and writes them to the transport in one call (chunk-encoded here);
aiohttp's writer is only used to wait for a slow transport to drain.

Ordering: frames reach a stream in bus order *per subscription pattern*;
events of different patterns published at the same instant (an observation
and the attribution change it caused) may be routed in either order, as
with DECNET's relay and with NATS (one subscription per pattern). Ids are
assigned at routing time, so they always increase along a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11

from decnet_attr import topics
from decnet_attr.bus.base import Bus, Event, QueueSubscription, RateLimitedLog, Subscription
from decnet_attr.bus.helpers import batch_observations
from decnet_attr.config import Settings
from decnet_attr.server.connections import tune_socket
from decnet_attr.server.errors import http_error
from decnet_attr.server.overview import OVERVIEW_INTERVAL, Overview
from decnet_attr.server.sse.wire import (
    ERROR,
    KEEPALIVE,
    KEEPALIVE_CHUNKED,
    SSE_HEADERS,
    WRITE_HIGH_WATER,
    Frame,
    ResumeBuffer,
    chunk,
    encode,
    event_data,
    gap,
    message,
    message_with_id,
    parse_cursor,
    preamble,
    requested_cursor,
    stale,
)
from decnet_attr.server.wire import attribution_row, identity_entry
from decnet_attr.store.base import AttackerRow, Store, StoreError
from decnet_attr.topics import SYSTEM_AUTH_REVOKED

__all__ = [
    "PATTERNS",
    "SYSTEM_AUTH_REVOKED",
    "PrincipalLike",
    "SseHub",
]

logger = logging.getLogger(__name__)
_rl = RateLimitedLog(logger)


#: The relay's bus subscriptions (one set per process).
PATTERNS: Final[tuple[str, ...]] = (
    topics.OBSERVATION_PATTERN,
    topics.INGEST_PATTERN,
    topics.ATTACKER_FINGERPRINT_ROTATED,
    topics.ATTACKER_SCORED,
    topics.ATTRIBUTION_PATTERN,
    topics.IDENTITY_PATTERN,
    topics.SYSTEM_HEALTH_PATTERN,
    SYSTEM_AUTH_REVOKED,
)

#: Frames collected for one stream within a router batch before writing early.
COALESCE_MAX: Final = 64
#: Events routed per batch before the collected frames are written.
BATCH_MAX: Final = 1024
#: Longest attacker uuid looked up (anything longer is a 404 without a query).
MAX_UUID_LEN: Final = 128
#: Idle resume buffers kept at most (oldest evicted first).
MAX_IDLE_CHANNELS: Final = 4096
#: Concurrent snapshot loads (connect storms, mass resync after a bus outage).
SNAPSHOT_CONCURRENCY: Final = 32
#: Event-name cache bound (names are derived from topics).
_NAME_CACHE_MAX: Final = 1024
#: Identities in the identity stream's snapshot (DECNET's page size).
IDENTITY_SNAPSHOT_LIMIT: Final = 50
_IDENTITY_DOT: Final = topics.IDENTITY_ROOT + "."
_OBSERVATION_DOT: Final = topics.ATTACKER_OBSERVATION_PREFIX + "."
_SYSTEM_DOT: Final = topics.SYSTEM_ROOT + "."
_HEALTH_DOT: Final = "." + topics.SYSTEM_HEALTH_SUFFIX
#: The overview stream's names for what it relays one by one.
OVERVIEW_ALERT: Final = b"alert"
OVERVIEW_NEW_ATTACKER: Final = b"attacker.new"
#: Seconds between two ``overview`` frames when nothing changed.
OVERVIEW_IDLE: Final = 5.0


class PrincipalLike(Protocol):
    """What the relay needs of the ``authenticate`` callable's result."""

    @property
    def user_uuid(self) -> str: ...

    @property
    def username(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def jti(self) -> str | None: ...

    @property
    def exp(self) -> float | None: ...

    @property
    def via_ticket(self) -> bool: ...


Authenticate = Callable[[web.Request], Awaitable[PrincipalLike]]
StillValid = Callable[[web.Application, Any, float], Awaitable[bool]]


def _strs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


# ------------------------------------------------------------------------------------------
# frames, channels, streams
# ------------------------------------------------------------------------------------------
class _Channel:
    """Everything the hub keeps for one attacker (or one fleet-wide stream
    kind): its open streams, its identity, and the resume buffer."""

    __slots__ = ("buffer", "identity", "streams", "uuid")

    def __init__(self, uuid: str, seq: int, maxlen: int) -> None:
        self.uuid = uuid
        self.identity: str | None = None
        self.streams: set[_Stream] = set()
        self.buffer = ResumeBuffer(seq, maxlen)

    def push(self, frame: Frame) -> None:
        self.buffer.append(frame)
        streams = self.streams
        if len(streams) == 1:
            for s in streams:
                s.offer(frame)
                return
        for s in tuple(streams):
            s.offer(frame)


class _Resync:
    __slots__ = ("gap", "head", "seq")

    def __init__(self, gap: bool, head: bytes, seq: int) -> None:
        self.gap = gap
        self.head = head
        self.seq = seq


class _Stream:
    """One open SSE response.

    The router calls :meth:`offer` (synchronous, never awaits). While the
    handler is parked with nothing pending (``direct``), offered frames are
    collected and written by the router itself at the end of its batch
    (:meth:`SseHub._flush`: one ``send`` per stream per batch); otherwise the
    handler task is woken to write them, waiting for the transport to drain.
    """

    __slots__ = (
        "attacker_uuid",
        "channel",
        "chunked",
        "closed",
        "direct",
        "draining",
        "dropped",
        "exp",
        "exp_timer",
        "feed",
        "hub",
        "last_gap",
        "last_write",
        "principal",
        "queue",
        "reason",
        "resync",
        "transport",
        "user",
        "waiter",
        "writer",
    )

    def __init__(
        self,
        hub: SseHub,
        attacker_uuid: str,
        principal: PrincipalLike,
        *,
        feed: _Channel | None = None,
    ) -> None:
        self.hub = hub
        #: "" for a fleet-wide stream (identities, overview)
        self.attacker_uuid = attacker_uuid
        #: the hub's channel of a fleet-wide stream; None for an attacker's
        self.feed = feed
        self.principal = principal
        self.user = principal.user_uuid
        self.exp = principal.exp
        self.exp_timer: asyncio.TimerHandle | None = None
        self.channel: _Channel | None = None
        self.transport: asyncio.Transport | None = None
        self.writer: AbstractStreamWriter | None = None
        self.chunked = True
        self.queue: list[Frame] = []
        #: True while the handler is parked with nothing pending: the router
        #: and the keepalive tick may then write to the transport themselves.
        self.direct = False
        self.draining = False
        self.closed = False
        self.reason = ""
        self.waiter: asyncio.Future[None] | None = None
        self.last_write = 0.0
        self.resync: _Resync | None = None
        self.last_gap = -math.inf
        self.dropped = 0

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def offer(self, frame: Frame) -> None:
        """Deliver a frame (router side, synchronous)."""
        if self.closed:
            return
        q = self.queue
        n = len(q)
        hub = self.hub
        if n >= hub._queue_size:
            self._overflow(frame)
            return
        q.append(frame)
        if self.direct:
            if not n:
                hub._dirty.append(self)
            elif n >= COALESCE_MAX:
                hub._flush_stream(self)
        elif not n:
            self.wake()

    def _overflow(self, frame: Frame) -> None:
        hub = self.hub
        n = len(self.queue) + 1
        self.queue = []
        self.dropped += n
        hub._frames_dropped += n
        now = time.monotonic()
        pending = self.resync
        if (pending is not None and pending.gap) or now - self.last_gap < hub._gap_close_window:
            _rl.warning(
                "sse-slow",
                "SSE stream of %s for attacker %s overflowed twice within %.0f s: closing it",
                self.user,
                self.attacker_uuid,
                hub._gap_close_window,
            )
            hub._close(self, "slow")
            return
        self.last_gap = now
        hub._gaps += 1
        head = gap(n)
        self.resync = _Resync(True, head, frame.seq)
        self.direct = False
        self.wake()

    def mark_stale(self, reason: str, seq: int) -> None:
        if self.closed:
            return
        self.queue = []
        pending = self.resync
        head = stale(reason)
        if pending is not None and pending.gap:
            head = pending.head + head
        self.resync = _Resync(pending is not None and pending.gap, head, seq)
        self.direct = False
        self.wake()


# ------------------------------------------------------------------------------------------
# the hub
# ------------------------------------------------------------------------------------------
class SseHub:
    """The process-wide SSE relay.

    >>> hub = SseHub(settings=settings, bus=bus, store=store,
    ...              authenticate=authenticate_stream, still_valid=principal_still_valid)
    >>> app[SSE_HUB] = hub        # the routes of decnet_attr.server.routes.events call hub.handle*
    >>> await hub.start(app)      # after the bus and store are open
    >>> await hub.stop()          # from app.on_shutdown: ends every stream first

    Call :meth:`stop` from ``on_shutdown`` (aiohttp waits for running
    handlers *before* ``cleanup_ctx`` teardown runs); calling it again from the
    teardown is a no-op.

    The keyword-only tunables (not environment settings) exist for tests:
    ``resume_ttl`` (seconds an attacker's resume buffer outlives its last
    stream), ``revalidate_interval`` (``still_valid`` period),
    ``gap_close_window`` (a second overflow within it closes the stream),
    ``max_backoff`` (bus resubscribe backoff cap).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        bus: Bus,
        store: Store,
        authenticate: Authenticate,
        still_valid: StillValid,
        resume_ttl: float = 300.0,
        revalidate_interval: float = 5.0,
        gap_close_window: float = 10.0,
        max_backoff: float = 10.0,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._store = store
        self._authenticate = authenticate
        self._still_valid = still_valid
        self._resume_ttl = float(resume_ttl)
        self._revalidate_interval = float(revalidate_interval)
        self._gap_close_window = float(gap_close_window)
        self._max_backoff = float(max_backoff)
        self._keepalive = max(float(settings.sse_keepalive), 0.01)
        self._tick = min(max(self._keepalive / 4, 0.02), 1.0)
        self._queue_size = settings.sse_queue_size
        self._resume_len = max(int(settings.sse_resume_buffer), 0)
        self._cap = settings.sse_max_per_user
        self._preamble = preamble(settings.sse_retry_ms)
        self._retry_after = str(max(1, math.ceil(settings.sse_retry_ms / 1000)))

        self._app: web.Application | None = None
        self._epoch = ""
        self._epoch_b = b""
        self._seq = 0
        self._now = 0.0  # loop time, refreshed by the router and the tick
        self._running = False
        self._stopped = False

        # indexes
        self._streams: dict[_Stream, None] = {}
        self._by_attacker: dict[str, _Channel] = {}
        self._by_identity: dict[str, set[str]] = {}
        self._by_user: dict[str, dict[_Stream, None]] = {}
        #: The identity stream's channel: every ``identity.*`` event, for every stream
        #: of ``/identities/events`` (never idle-evicted).
        self._identities = _Channel("", 0, self._resume_len)
        #: The overview stream's channel: alerts and new attackers one by one (and
        #: resumable); the coalesced ``overview`` frames go to its streams only.
        self._overview = _Channel("", 0, self._resume_len)
        self.overview = Overview(store)
        self._overview_last: Frame | None = None
        self._overview_interval = OVERVIEW_INTERVAL
        # attacker uuid -> loop time its last stream left, oldest first (an
        # OrderedDict: evicting from the front of a plain dict rescans the
        # slots earlier deletions left, quadratic in a mass eviction)
        self._idle: OrderedDict[str, float] = OrderedDict()
        self._dirty: list[_Stream] = []  # streams with frames to write at the end of a batch
        self._names: dict[str, bytes] = {}

        # tasks
        self._tasks: list[asyncio.Task[None]] = []
        self._kick: asyncio.Event | None = None
        self._subscribed = False
        self._outage = False
        self._seen_bus: Bus | None = None
        self._seen_reconnects = 0
        self._handlers = 0
        self._handlers_done: asyncio.Event | None = None
        self._snap_sem: asyncio.Semaphore | None = None

        # counters
        self._streams_total = 0
        self._events_in = 0
        self._events_routed = 0
        self._frames_sent = 0
        self._frames_dropped = 0
        self._gaps = 0
        self._stale = 0
        self._resumes = 0
        self._snapshots = 0
        self._closed_revoked = 0
        self._closed_expired = 0
        self._closed_slow = 0
        self._rejected_cap = 0
        self._resubscribes = 0
        self._resyncs = 0
        self._bad_events = 0
        self._overview_frames = 0

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def epoch(self) -> str:
        """The random token of this hub start (the first part of every event id)."""
        return self._epoch

    @property
    def bus(self) -> Bus:
        return self._bus

    async def start(self, app: web.Application) -> None:
        """Subscribe to the bus and start the router and housekeeping tasks."""
        if self._running:
            return
        if self._stopped:
            raise RuntimeError("SseHub cannot be restarted")
        self._app = app
        self._epoch = secrets.token_hex(4)
        self._epoch_b = self._epoch.encode()
        self._seq = 0
        loop = asyncio.get_running_loop()
        self._now = loop.time()
        self._kick = asyncio.Event()
        self._handlers_done = asyncio.Event()
        self._handlers_done.set()
        self._snap_sem = asyncio.Semaphore(SNAPSHOT_CONCURRENCY)
        self._running = True
        subs = self._subscribe_all(self._bus)
        self._tasks = [
            asyncio.create_task(self._relay(self._bus, subs), name="sse-relay"),
            asyncio.create_task(self._housekeeping(), name="sse-housekeeping"),
            asyncio.create_task(self._revalidate(), name="sse-revalidate"),
            asyncio.create_task(self._overview_loop(), name="sse-overview"),
        ]
        logger.debug("SSE hub started (epoch %s)", self._epoch)

    async def stop(self, timeout: float = 5.0) -> None:
        """End every open stream, release the subscriptions and tasks.
        Idempotent. Waits up to *timeout* seconds for the handlers to return."""
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        if self._kick is not None:
            self._kick.set()
        for stream in list(self._streams):
            self._close(stream, "shutdown")
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscribed = False
        done = self._handlers_done
        if done is not None and not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except TimeoutError:
                logger.warning("SSE hub stop: %d handler(s) still running", self._handlers)
        self._by_attacker.clear()
        self._by_identity.clear()
        self._idle.clear()
        logger.debug("SSE hub stopped")

    def set_bus(self, bus: Bus) -> None:
        """Use another bus (the old one is not closed): the relay resubscribes
        at once. Events may have been lost meanwhile, so every stream gets
        ``event: stale`` + a fresh snapshot once the new subscriptions are up."""
        self._bus = bus
        self._outage = True
        if self._kick is not None:
            self._kick.set()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges (for ``/metrics`` and tests)."""
        return {
            "streams_open": len(self._streams),
            "streams_total": self._streams_total,
            "events_in": self._events_in,
            "events_routed": self._events_routed,
            "frames_sent": self._frames_sent,
            "frames_dropped": self._frames_dropped,
            "gaps": self._gaps,
            "stale": self._stale,
            "resumes": self._resumes,
            "snapshots": self._snapshots,
            "closed_revoked": self._closed_revoked,
            "closed_expired": self._closed_expired,
            "closed_slow": self._closed_slow,
            "rejected_cap": self._rejected_cap,
            "bus_connected": self._subscribed and self._bus.connected and not self._outage,
            "bus_resubscribes": self._resubscribes,
            "resyncs": self._resyncs,
            "bad_events": self._bad_events,
            "overview_frames": self._overview_frames,
            "channels": len(self._by_attacker),
            "identities": len(self._by_identity),
            "users": len(self._by_user),
            "handlers": self._handlers,
        }

    # -- request handling --------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The ``GET /api/v1/attackers/{uuid}/events`` handler."""
        attacker_uuid = request.match_info.get("uuid") or request.match_info.get(
            "attacker_uuid", ""
        )
        return await self._handle(request, attacker_uuid)

    async def handle_identities(self, request: web.Request) -> web.StreamResponse:
        """The ``GET /api/v1/identities/events`` handler: DECNET's identity stream.
        A ``snapshot`` (``{"identities": [...]}``, the most recently updated
        identities) then every ``identity.*`` event, named by its topic without
        the ``identity.`` root (``formed``, ``merged``, …). Same authentication,
        per-user cap, resume and keepalives as the attacker streams."""
        return await self._handle(request, None, self._identities)

    async def handle_overview(self, request: web.Request) -> web.StreamResponse:
        """The ``GET /api/v1/overview/events`` handler: the fleet at a glance.
        A ``snapshot`` (``{"overview": summary, "alerts": [recent alerts, newest
        first]}``), then ``overview`` frames (the summary of
        :mod:`decnet_attr.server.overview`, coalesced: at most one per
        ``OVERVIEW_INTERVAL``, none while nothing changes but one every
        :data:`OVERVIEW_IDLE` s), plus every ``multi_actor_suspected`` event
        as an ``alert`` frame and every ``identity.formed`` (an attacker's first
        observation) as an ``attacker.new`` frame, both resumable. Same
        authentication, per-user cap and keepalives as the attacker streams."""
        return await self._handle(request, None, self._overview)

    async def _handle(
        self, request: web.Request, attacker_uuid: str | None, feed: _Channel | None = None
    ) -> web.StreamResponse:
        if not self._running:
            raise http_error(web.HTTPServiceUnavailable, "Event stream unavailable")
        principal = await self._authenticate(request)
        if not self._running:
            raise http_error(web.HTTPServiceUnavailable, "Event stream unavailable")
        exp = principal.exp
        if exp is not None and exp <= time.time():
            raise http_error(web.HTTPUnauthorized, "Token expired")
        user = principal.user_uuid
        if not self._has_slot(user):
            self._rejected_cap += 1
            raise http_error(
                web.HTTPTooManyRequests,
                f"SSE connection limit ({self._cap}) reached",
                headers={"Retry-After": self._retry_after},
            )
        if attacker_uuid is not None and (not attacker_uuid or len(attacker_uuid) > MAX_UUID_LEN):
            raise http_error(web.HTTPNotFound, "Attacker not found")

        stream = _Stream(self, attacker_uuid or "", principal, feed=feed)
        if exp is not None:
            stream.exp_timer = asyncio.get_running_loop().call_later(
                max(exp - time.time(), 0.0), self._close, stream, "expired"
            )
        self._streams[stream] = None
        self._by_user.setdefault(user, {})[stream] = None
        self._handlers += 1
        assert self._handlers_done is not None
        self._handlers_done.clear()
        resp: web.StreamResponse | None = None
        try:
            opening = await self._opening(stream, request)
            if request.method == "HEAD":
                return web.Response(status=200, headers=SSE_HEADERS)

            resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
            if request.version >= HttpVersion11:
                resp.enable_chunked_encoding()
            else:
                stream.chunked = False
            writer = await resp.prepare(request)
            self._streams_total += 1
            await resp.write(opening)
            del opening  # do not keep the snapshot alive for the stream's lifetime
            transport = request.transport
            if writer is None or transport is None:
                self._close(stream, "disconnected")
                return resp
            stream.writer = writer
            stream.transport = transport
            tune_socket(transport, self._settings.dead_peer_timeout)  # vanished peers
            stream.last_write = asyncio.get_running_loop().time()
            await self._serve(stream)
        except Exception as exc:
            if resp is None or not resp.prepared:
                raise
            if not isinstance(exc, ConnectionError):
                logger.exception("SSE stream for attacker %r failed", attacker_uuid)
                t = request.transport
                if t is not None and not t.is_closing():
                    t.write(chunk(ERROR) if stream.chunked else ERROR)
        finally:
            self._close(stream, "disconnected")
            self._handlers -= 1
            if self._handlers == 0 and self._handlers_done is not None:
                self._handlers_done.set()
        t = request.transport
        if t is None or t.is_closing() or stream.reason == "slow":
            if t is not None and not t.is_closing():
                t.abort()
            return resp
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    def _has_slot(self, user: str) -> bool:
        """True when *user* may open another stream. Streams whose connection
        is already closing (a page reload: the client dropped the old stream
        just before asking for the new one) are closed now instead of at the
        next housekeeping tick, so they do not count."""
        active = self._by_user.get(user)
        if active is None or len(active) < self._cap:
            return True
        for s in list(active):
            t = s.transport
            if t is not None and t.is_closing():
                self._close(s, "disconnected")
        return len(self._by_user.get(user) or ()) < self._cap

    async def _opening(self, stream: _Stream, request: web.Request) -> bytes:
        """Register *stream* and build the first bytes of the response:
        preamble, then the replayed frames or (``stale`` +) a snapshot.
        Raises the HTTP errors that must precede the headers."""
        cursor_text = requested_cursor(request)
        cursor, stale_reason = parse_cursor(cursor_text, self._epoch, self._seq)
        # Register before reading the store: whatever is routed from now on
        # is queued for this stream (the snapshot may repeat some of it).
        replay, evicted = self._attach(stream, cursor)
        if evicted:
            stale_reason = "cursor evicted"
        seq0 = self._seq
        channel = stream.channel
        assert channel is not None
        try:
            row = None
            if stream.feed is None:
                row = await self._store.get_attacker(stream.attacker_uuid)
                if row is None:
                    self._close(stream, "not found")
                    raise http_error(web.HTTPNotFound, "Attacker not found")
                if channel.identity is None and row.identity_id:
                    self._set_identity(channel, row.identity_id)
            parts = [self._preamble]
            if replay is not None:
                self._resumes += 1
                parts.extend(f.raw() for f in replay)
                self._frames_sent += len(replay)
                last = self._overview_last
                if channel is self._overview and last is not None:
                    parts.append(last.raw())  # the counters, without waiting for a tick
            else:
                if cursor_text:
                    self._stale += 1
                    parts.append(stale(stale_reason))
                parts.append(await self._snapshot(channel, seq0, row))
        except StoreError as exc:
            logger.warning(
                "SSE connect for attacker %s: store error: %s", stream.attacker_uuid, exc
            )
            raise http_error(web.HTTPServiceUnavailable, "Store unavailable") from None
        if stream.closed:
            if stream.reason in ("revoked", "expired"):
                raise http_error(web.HTTPUnauthorized, "Not authenticated")
            raise http_error(web.HTTPServiceUnavailable, "Event stream unavailable")
        return b"".join(parts)

    async def _serve(self, stream: _Stream) -> None:
        """The handler's loop: write what the router queued, resynchronise
        after a gap or an outage, park when there is nothing to do."""
        loop = asyncio.get_running_loop()
        while not stream.closed:
            resync = stream.resync
            if resync is not None:
                stream.resync = None
                channel = stream.channel
                assert channel is not None
                try:
                    snap = await self._snapshot(channel, resync.seq, None)
                except StoreError as exc:
                    logger.warning(
                        "SSE resync of attacker %s: store error: %s", stream.attacker_uuid, exc
                    )
                    await self._send(stream, ERROR)
                    self._close(stream, "error")
                    return
                if stream.closed:
                    return
                await self._send(stream, resync.head + snap)
                continue
            frames = stream.queue
            if frames:
                stream.queue = []
                self._frames_sent += len(frames)
                await self._write(stream, encode(frames, stream.chunked))
                continue
            fut: asyncio.Future[None] = loop.create_future()
            stream.waiter = fut
            stream.direct = True
            try:
                await fut
            finally:
                stream.waiter = None
                stream.direct = False

    async def _send(self, stream: _Stream, raw: bytes) -> None:
        await self._write(stream, chunk(raw) if stream.chunked else raw)

    async def _write(self, stream: _Stream, data: bytes) -> None:
        t = stream.transport
        if t is None or t.is_closing():
            raise ConnectionResetError("client disconnected")
        t.write(data)
        stream.last_write = asyncio.get_running_loop().time()
        writer = stream.writer
        if writer is not None and t.get_write_buffer_size() >= WRITE_HIGH_WATER:
            stream.draining = True
            try:
                # the write deadline: a client that stops reading (or vanished)
                # gives its slot back instead of holding it until TCP gives up
                await asyncio.wait_for(writer.drain(), self._settings.sse_write_timeout)
            except TimeoutError:
                self._close(stream, "slow")
                raise ConnectionResetError("client stopped reading") from None
            finally:
                stream.draining = False

    async def _snapshot(self, channel: _Channel, seq: int, row: AttackerRow | None) -> bytes:
        """``event: snapshot`` with the latest observation per primitive and the
        identity's attribution rows (one REST call fewer for the client); for
        the identity stream, the most recently updated identities."""
        sem = self._snap_sem
        assert sem is not None
        if channel is self._overview:
            async with sem:
                summary = await self.overview.summary(self._app, self._now)
            self._snapshots += 1
            alerts = b",".join(reversed(self.overview.alerts))
            data = b'{"overview":%b,"alerts":[%b]}' % (orjson.dumps(summary), alerts)
            return message_with_id(b"snapshot", self._epoch_b, seq, data)
        if channel is self._identities:
            async with sem:
                identities = await self._store.recent_identities(IDENTITY_SNAPSHOT_LIMIT)
            self._snapshots += 1
            data = orjson.dumps({"identities": [identity_entry(i) for i in identities]})
            return message_with_id(b"snapshot", self._epoch_b, seq, data)
        store = self._store
        uuid = channel.uuid
        async with sem:
            if row is None:
                row = await store.get_attacker(uuid)
                if row is not None and channel.identity is None and row.identity_id:
                    self._set_identity(channel, row.identity_id)
            observations = await store.latest_observations(uuid)
            identity = channel.identity
            rows = await store.attribution_for_identity(identity) if identity else []
        body = {
            "attacker_uuid": uuid,
            "observations": observations,
            "identity_uuid": identity,
            "attribution": [attribution_row(r) for r in rows],
        }
        self._snapshots += 1
        return message_with_id(b"snapshot", self._epoch_b, seq, orjson.dumps(body))

    # -- index -------------------------------------------------------------------------------
    def _attach(self, stream: _Stream, cursor: int | None) -> tuple[list[Frame] | None, bool]:
        """Put *stream* into its attacker's channel. Returns the frames to
        replay (None: send a snapshot) and whether the cursor was evicted."""
        uuid = stream.attacker_uuid
        channel = stream.feed or self._by_attacker.get(uuid)
        if channel is None:
            channel = _Channel(uuid, self._seq, self._resume_len)
            self._by_attacker[uuid] = channel
        elif stream.feed is None:
            self._idle.pop(uuid, None)
        channel.streams.add(stream)
        stream.channel = channel
        if cursor is None:
            return None, False
        replay = channel.buffer.since(cursor)
        return replay, replay is None

    def _close(self, stream: _Stream, reason: str) -> None:
        """End a stream (idempotent): out of every index at once, so its cap
        slot is free; the handler wakes up and finishes the response."""
        if stream.closed:
            return
        stream.closed = True
        stream.direct = False
        stream.reason = reason
        if stream.exp_timer is not None:
            stream.exp_timer.cancel()
            stream.exp_timer = None
        stream.queue = []
        self._streams.pop(stream, None)
        users = self._by_user.get(stream.user)
        if users is not None:
            users.pop(stream, None)
            if not users:
                del self._by_user[stream.user]
        channel = stream.channel
        if channel is not None:
            channel.streams.discard(stream)
            if not channel.streams and stream.feed is None:
                if self._running and reason != "not found":
                    self._idle[channel.uuid] = self._now
                else:
                    self._drop_channel(channel)
        if reason == "revoked":
            self._closed_revoked += 1
        elif reason == "expired":
            self._closed_expired += 1
        elif reason == "slow":
            self._closed_slow += 1
        logger.debug(
            "SSE stream of %s for attacker %s closed: %s", stream.user, stream.attacker_uuid, reason
        )
        stream.wake()
        t = stream.transport
        if t is not None and (stream.draining or reason == "slow") and not t.is_closing():
            t.abort()

    def _drop_channel(self, channel: _Channel) -> None:
        self._by_attacker.pop(channel.uuid, None)
        self._idle.pop(channel.uuid, None)
        if channel.identity is not None:
            attackers = self._by_identity.get(channel.identity)
            if attackers is not None:
                attackers.discard(channel.uuid)
                if not attackers:
                    del self._by_identity[channel.identity]
        channel.buffer.frames.clear()

    def _set_identity(self, channel: _Channel, identity: str) -> None:
        old = channel.identity
        if old == identity:
            return
        if old is not None:
            attackers = self._by_identity.get(old)
            if attackers is not None:
                attackers.discard(channel.uuid)
                if not attackers:
                    del self._by_identity[old]
        channel.identity = identity
        self._by_identity.setdefault(identity, set()).add(channel.uuid)

    # -- routing -----------------------------------------------------------------------------
    def _frame(self, event: Event, name: bytes | None = None) -> Frame:
        """The frame of a live event; ``name``: its ``event:`` name (default:
        the attacker stream's name for the topic)."""
        topic = event.topic
        if name is None:
            name = self._names.get(topic)
            if name is None:
                name = topics.sse_event_name(topic).encode()
                if len(self._names) >= _NAME_CACHE_MAX:
                    self._names.clear()
                self._names[topic] = name
        return self._frame_of(name, event_data(event))

    def _frame_of(self, name: bytes, data: bytes) -> Frame:
        self._seq += 1
        seq = self._seq
        return Frame(seq, message_with_id(name, self._epoch_b, seq, data))

    def _dispatch(self, event: Event) -> None:
        """Route one bus event (synchronous; never awaits a stream)."""
        self._events_in += 1
        topic = event.topic
        payload = event.payload
        overview = self.overview
        if topics.is_observation_batch(topic):
            overview.note_batch(payload)
            # the API's batches: one frame per observation of a watched attacker
            if self._by_attacker:
                for ev in batch_observations(event, self._by_attacker):
                    self._dispatch_attacker(ev)
        elif topic.startswith("attacker."):
            if topic.startswith(_OBSERVATION_DOT):
                overview.note_observation()
            self._dispatch_attacker(event)
        elif topic.startswith("attribution."):
            overview.note_change()
            self._dispatch_attribution(event, payload)
            if topic == topics.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED:
                data = event_data(event)
                overview.note_alert(data)
                self._push_overview(OVERVIEW_ALERT, data)
        elif topic.startswith(_IDENTITY_DOT):
            overview.note_change()
            self._dispatch_identity(topic, payload)
            # the identity stream: named by the topic without its root (DECNET's names)
            frame = self._frame(event, topic[len(_IDENTITY_DOT) :].encode())
            self._events_routed += 1
            self._identities.push(frame)
            if topic == topics.IDENTITY_FORMED:
                overview.note_new_attacker()
                self._push_overview(OVERVIEW_NEW_ATTACKER, frame.raw_data())
        elif topic == SYSTEM_AUTH_REVOKED:
            self._revoke(payload)
        elif topic.startswith(_SYSTEM_DOT) and topic.endswith(_HEALTH_DOT):
            overview.note_health(topic, payload)

    def _push_overview(self, name: bytes, data: bytes) -> None:
        """An overview frame for the open overview streams. With none open,
        no frame is made: the resume buffer is emptied instead, so a cursor
        from before is answered with ``stale`` and a snapshot (which holds the
        recent alerts), never a silent skip."""
        channel = self._overview
        if channel.streams:
            self._events_routed += 1
            channel.push(self._frame_of(name, data))
        elif channel.buffer.frames or channel.buffer.covered_from <= self._seq:
            # every cursor given so far is now older than what the buffer covers
            channel.buffer.restart(self._seq + 1)

    def _dispatch_attacker(self, event: Event) -> None:
        attacker = event.payload.get("attacker_uuid")
        channel = self._by_attacker.get(attacker) if isinstance(attacker, str) else None
        if channel is None:
            return
        frame = self._frame(event)
        self._events_routed += 1
        channel.push(frame)

    def _dispatch_attribution(self, event: Event, payload: dict[str, Any]) -> None:
        by_attacker = self._by_attacker
        if not by_attacker:
            return  # no attacker stream open: nobody to route it to
        identity = payload.get("identity_uuid")
        if not isinstance(identity, str):
            identity = None
        targets: list[_Channel] = []
        listed = _strs(payload.get("attacker_uuids"))
        for a in listed:
            channel = by_attacker.get(a)
            if channel is not None:
                if identity is not None and channel.identity != identity:
                    self._set_identity(channel, identity)
                targets.append(channel)
        if identity is not None:
            known = self._by_identity.get(identity)
            if known:
                if not targets:
                    targets = [by_attacker[a] for a in known]
                else:
                    seen = {c.uuid for c in targets}
                    targets.extend(by_attacker[a] for a in known if a not in seen)
        if not targets:
            return
        frame = self._frame(event)
        self._events_routed += 1
        for channel in targets:
            channel.push(frame)

    def _dispatch_identity(self, topic: str, payload: dict[str, Any]) -> None:
        if topic == topics.IDENTITY_MERGED:
            # DECNET's names (winner_uuid / loser_uuid) or ours
            loser = payload.get("loser_uuid", payload.get("identity_uuid"))
            into = payload.get("winner_uuid", payload.get("merged_into_uuid"))
            if not isinstance(loser, str) or not isinstance(into, str) or into == loser:
                return
            attackers = self._by_identity.get(loser)
            for a in list(attackers or ()):
                self._set_identity(self._by_attacker[a], into)
            for a in _strs(payload.get("attacker_uuids")):
                channel = self._by_attacker.get(a)
                if channel is not None:
                    self._set_identity(channel, into)
            return
        identity = payload.get("identity_uuid")
        if topic == topics.IDENTITY_UNMERGED:
            identity = payload.get("resurrected_uuid", identity)
        if not isinstance(identity, str):
            return
        for a in _strs(payload.get("attacker_uuid")) + _strs(payload.get("attacker_uuids")):
            channel = self._by_attacker.get(a)
            if channel is not None:
                self._set_identity(channel, identity)

    def _revoke(self, payload: dict[str, Any]) -> None:
        user = payload.get("user_uuid")
        if not isinstance(user, str):
            return
        streams = self._by_user.get(user)
        if not streams:
            return
        jti = payload.get("jti")
        for s in list(streams):
            if jti is None or s.principal.jti is None or s.principal.jti == jti:
                self._close(s, "revoked")

    def _resync_all(self, reason: str) -> None:
        """Events may have been lost: no old cursor resumes any more, and every
        open stream gets ``event: stale`` + a fresh snapshot."""
        self._seq += 1
        barrier = self._seq
        for channel in (*self._by_attacker.values(), self._identities, self._overview):
            channel.buffer.restart(barrier)
        streams = list(self._streams)
        for s in streams:
            s.mark_stale(reason, barrier)
        self._resyncs += 1
        self._stale += len(streams)
        if streams:
            logger.info("SSE relay: %s; resynchronising %d stream(s)", reason, len(streams))

    # -- background tasks --------------------------------------------------------------------
    def _subscribe_all(self, bus: Bus) -> list[Subscription]:
        subs: list[Subscription] = []
        try:
            for pattern in PATTERNS:
                subs.append(bus.subscribe(pattern))
        except Exception as exc:
            _rl.warning("sse-subscribe", "SSE relay cannot subscribe to the bus: %s", exc)
            for sub in subs:
                if isinstance(sub, QueueSubscription):
                    sub.end(drain=False)
            self._outage = True
            return []
        self._subscribed = True
        return subs

    async def _wait_kick(self, timeout: float) -> bool:
        kick = self._kick
        assert kick is not None
        if not kick.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(kick.wait(), timeout)
        return kick.is_set()

    async def _relay(self, bus: Bus, subs: list[Subscription]) -> None:
        """Keep one set of subscriptions alive; resubscribe with backoff
        (0.5 s doubling to ``max_backoff``), at once after :meth:`set_bus`."""
        kick = self._kick
        assert kick is not None
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while self._running:
            if subs:
                started = loop.time()
                await self._run_subscriptions(subs)
                subs = []
                if not self._running:
                    break
                self._outage = True
                if loop.time() - started >= self._max_backoff:
                    backoff = 0.5
                if not kick.is_set() and self._bus is bus:
                    logger.warning("SSE relay: bus subscription ended; resubscribing")
            if not kick.is_set() and self._bus is bus:
                if await self._wait_kick(backoff):
                    backoff = 0.5
                else:
                    backoff = min(backoff * 2, self._max_backoff)
            else:
                backoff = 0.5
            if not self._running:
                break
            kick.clear()
            bus = self._bus
            subs = self._subscribe_all(bus)
            if subs:
                self._resubscribes += 1
                logger.info("SSE relay: resubscribed to the bus")

    async def _run_subscriptions(self, subs: list[Subscription]) -> None:
        """Pump *subs* until one ends (bus closed) or the relay is kicked."""
        kick = self._kick
        assert kick is not None
        self._maybe_resync()
        pumps = [asyncio.create_task(self._pump(sub)) for sub in subs]
        kicked = asyncio.create_task(kick.wait())
        tasks = [*pumps, kicked]
        try:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.wait_ready(timeout=5.0)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._subscribed = False
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.aclose()

    async def _pump(self, sub: Subscription) -> None:
        """Route what *sub* delivers, in batches (what is queued at once),
        then write the frames collected for each stream in one go."""
        loop = asyncio.get_running_loop()
        route = self._route
        queued = sub if isinstance(sub, QueueSubscription) else None
        dropped = sub.dropped
        async for event in sub:
            self._now = loop.time()
            route(event)
            if queued is not None:
                n = 1
                while n < BATCH_MAX:
                    more = queued.get_nowait()
                    if more is None:
                        break
                    route(more)
                    n += 1
            self._flush()
            if sub.dropped != dropped:
                dropped = sub.dropped
                self._resync_all("relay subscription overflowed")

    def _route(self, event: Event) -> None:
        try:
            self._dispatch(event)
        except Exception:
            self._bad_events += 1
            _rl.warning("sse-dispatch", "SSE relay: cannot route %s", event.topic)
            logger.debug("SSE relay: routing %s failed", event.topic, exc_info=True)

    def _flush(self) -> None:
        """Write the frames collected during a batch: one write per stream."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for stream in dirty:
            if stream.queue:
                self._flush_stream(stream)

    def _flush_stream(self, stream: _Stream) -> None:
        frames = stream.queue
        if not stream.direct:
            if frames:
                stream.wake()
            return
        t = stream.transport
        if t is None or t.is_closing():
            self._close(stream, "disconnected")
            return
        if t.get_write_buffer_size() >= WRITE_HIGH_WATER:
            # not keeping up: the handler writes them once the transport drains
            stream.direct = False
            stream.wake()
            return
        stream.queue = []
        t.write(encode(frames, stream.chunked))
        stream.last_write = self._now
        self._frames_sent += len(frames)

    def _check_bus(self) -> None:
        """A transport that reconnects underneath live subscriptions (NATS)
        loses the events in between: note it (seen down, or its reconnect
        counter moved) so that streams are resynchronised."""
        bus = self._bus
        if not self._subscribed:
            return
        if not bus.connected:
            self._outage = True
        try:
            reconnects = int(bus.stats().get("reconnects", 0))
        except Exception:
            return
        if bus is not self._seen_bus:
            self._seen_bus = bus
        elif reconnects != self._seen_reconnects:
            self._outage = True
        self._seen_reconnects = reconnects

    def _maybe_resync(self) -> None:
        if self._outage and self._subscribed and self._bus.connected:
            self._outage = False
            self._resync_all("bus reconnected")

    async def _housekeeping(self) -> None:
        """Keepalives, disconnect and expiry detection, idle buffer eviction,
        bus state — one task for every stream."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._tick)
            now = self._now = loop.time()
            wall = time.time()
            keepalive = self._keepalive
            for s in list(self._streams):
                t = s.transport
                if t is not None and t.is_closing():
                    self._close(s, "disconnected")
                    continue
                if s.exp is not None and s.exp <= wall:
                    self._close(s, "expired")
                    continue
                if s.direct and t is not None and not s.queue and now - s.last_write >= keepalive:
                    if t.get_write_buffer_size() < WRITE_HIGH_WATER:
                        t.write(KEEPALIVE_CHUNKED if s.chunked else KEEPALIVE)
                        s.last_write = now
            self._evict(now)
            self._check_bus()
            self._maybe_resync()

    def _evict(self, now: float) -> None:
        idle = self._idle
        if not idle:
            return
        ttl = self._resume_ttl
        while idle:
            uuid, since = next(iter(idle.items()))
            if now - since < ttl and len(idle) <= MAX_IDLE_CHANNELS:
                break
            del idle[uuid]
            channel = self._by_attacker.get(uuid)
            if channel is not None and not channel.streams:
                self._drop_channel(channel)

    async def _overview_loop(self) -> None:
        """The coalesced ``overview`` frames: one summary for every overview
        stream, at most one per ``OVERVIEW_INTERVAL``, whatever the ingest rate."""
        loop = asyncio.get_running_loop()
        sent_version = -1
        sent_at = -math.inf
        while True:
            await asyncio.sleep(self._overview_interval)
            if not self._overview.streams:
                continue
            now = loop.time()
            version = self.overview.version
            quiet = version == sent_version and not self.overview.counts_due(now)
            if quiet and now - sent_at < OVERVIEW_IDLE:
                continue
            try:
                summary = await self.overview.summary(self._app, now)
            except Exception:
                _rl.warning("sse-overview", "SSE relay: the overview summary failed")
                logger.debug("SSE overview summary failed", exc_info=True)
                continue
            sent_version, sent_at = version, now
            frame = Frame(self._seq, message(b"overview", orjson.dumps(summary)))
            self._overview_last = frame
            self._overview_frames += 1
            self._now = loop.time()
            for s in tuple(self._overview.streams):
                s.offer(frame)
            self._flush()

    async def _revalidate(self) -> None:
        """Every few seconds, ask ``still_valid`` once per (user, token)."""
        while True:
            await asyncio.sleep(self._revalidate_interval)
            groups: dict[tuple[str, str | None], list[_Stream]] = {}
            for s in self._streams:
                groups.setdefault((s.user, s.principal.jti), []).append(s)
            app = self._app
            assert app is not None
            now = time.time()
            for streams in groups.values():
                live = [s for s in streams if not s.closed]
                if not live:
                    continue
                try:
                    ok = await self._still_valid(app, live[0].principal, now)
                except Exception as exc:
                    _rl.warning("sse-revalidate", "SSE revalidation failed: %s", exc)
                    continue
                if not ok:
                    for s in live:
                        self._close(s, "revoked")
