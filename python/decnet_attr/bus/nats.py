"""NATS bus: core NATS for fan-out, JetStream for the durable observation stream.

- Subjects are the topics as they are; message data is :meth:`Event.to_json`,
  so the publisher's event id and ts travel end to end.
- :meth:`NatsBus.connect` creates (or updates) the JetStream stream
  (file storage, limits retention, duplicate window, max age).
- :meth:`NatsBus.publish_durable` is a JetStream publish with the
  ``Nats-Msg-Id`` header set to the event id (so a retry is de-duplicated by the
  server within the duplicate window) and returns once the PubAck arrived, i.e.
  once the stream stored the event.
- A plain :meth:`NatsBus.publish` on a stream subject is stored by JetStream
  as well (without a PubAck, so without a durability guarantee).
- :meth:`NatsBus.durable_consumer` uses a JetStream *pull* consumer with the
  given durable name (explicit ack): every process using the same name shares
  the work; anything not acked within ``ack_wait`` is redelivered.
- The client reconnects forever with a fixed wait (``max_reconnect_attempts=-1``);
  core subscriptions are replayed by nats-py on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats.errors as nerr
import nats.js.errors as jserr
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as jsapi

from decnet_attr.bus.base import (
    EVENT_SCHEMA_VERSION,
    UNDECODABLE,
    Bus,
    BusError,
    BusPayloadTooLarge,
    BusUnavailable,
    Delivery,
    DurableConsumer,
    Event,
    QueueSubscription,
    RateLimitedLog,
    Subscription,
    envelope,
)
from decnet_attr.topics import (
    INGEST_PATTERN,
    OBSERVATION_PATTERN,
    matches,
    validate_pattern,
    validate_segment,
    validate_topic,
)

__all__ = ["NatsBus"]

logger = logging.getLogger(__name__)
_rl = RateLimitedLog(logger)

#: Errors meaning "the server cannot be reached / did not answer in time".
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # nats.errors.TimeoutError is a subclass
    OSError,
    nerr.NoRespondersError,
    nerr.OutboundBufferLimitError,
    nerr.ConnectionReconnectingError,
    nerr.StaleConnectionError,
    nerr.ConnectionClosedError,
    nerr.NoServersError,
    jserr.NoStreamResponseError,
    jserr.ServiceUnavailableError,
)

_TRANSIENT_OR_UNAVAILABLE: tuple[type[BaseException], ...] = (BusUnavailable, *_TRANSIENT)

_MSG_ID_HEADER = "Nats-Msg-Id"
_VALID_CACHE_SIZE = 4096


def _redact(url: str) -> str:
    """*url* without user info (credentials never reach the logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done-callback for abandoned tasks: fetch their outcome so that asyncio
    does not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


class _SharedSub:
    """One NATS subscription per distinct pattern, shared by every local
    subscription with that pattern: each message is decoded once."""

    __slots__ = ("attach_task", "locals", "nsub", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.locals: dict[_NatsSubscription, None] = {}
        self.nsub: Any = None
        self.attach_task: asyncio.Task[None] | None = None


class _NatsSubscription(QueueSubscription):
    def __init__(self, bus: NatsBus, shared: _SharedSub, maxsize: int) -> None:
        super().__init__(
            shared.pattern, maxsize, on_close=bus._unsubscribe, on_drop=bus._count_drop
        )
        self._bus = bus
        self.shared = shared

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._bus._wait_ready(self), timeout)


def _delivered(reply: str | None) -> int:
    """How many times JetStream has delivered a message, from its reply
    subject (``$JS.ACK.<stream>.<consumer>.<delivered>.…``, nine tokens, or
    with a domain and an account hash first, eleven or more); 0 for a
    subject of neither form. nats-py's ``Msg.metadata`` parses every field
    and builds a datetime: ~4 % of the worker's loop on the
    one-event-per-message path, for this one number."""
    tokens: list[str] = reply.split(".") if reply else []
    if (len(tokens) != 9 and len(tokens) < 11) or tokens[:2] != ["$JS", "ACK"]:
        return 0
    try:
        return int(tokens[4] if len(tokens) == 9 else tokens[6])
    except ValueError:
        return 0


class _NatsDelivery(Delivery):
    def __init__(self, consumer: _NatsDurableConsumer, msg: Msg, event: Event) -> None:
        self.consumer = consumer
        self.msg = msg
        self.event = event
        self._redelivered = _delivered(msg.reply) > 1
        self._settled = False

    @property
    def redelivered(self) -> bool:
        return self._redelivered

    async def ack(self) -> None:
        if await self._settle("ack", self.msg.ack):
            self.consumer.bus._durable_acked += 1

    async def nak(self, delay: float | None = None) -> None:
        await self._settle("nak", functools.partial(self.msg.nak, delay=delay))

    async def _settle(self, what: str, reply: Callable[[], Awaitable[None]]) -> bool:
        """Send the first ack or nak (*reply*); True if the server took it. A
        failure is logged: the message comes back after ``ack_wait``."""
        if self._settled:
            return False
        self._settled = True
        self.consumer._inflight.pop(self, None)
        try:
            await reply()
        except nerr.MsgAlreadyAckdError:
            return False
        except (nerr.Error, OSError) as exc:
            _rl.warning(
                f"nats-{what}",
                "durable %s of %s failed (%s); it will be redelivered after ack_wait",
                what,
                self.event.id,
                _describe(exc),
            )
            return False
        return True

    def __repr__(self) -> str:
        return f"<_NatsDelivery {self.event.topic} id={self.event.id}>"


def _queued(psub: JetStreamContext.PullSubscription) -> list[Msg]:
    """The JetStream messages waiting in a pull subscription's queue (taken
    out of it; status messages, which carry no reply subject, are dropped)."""
    queue = getattr(getattr(psub, "_sub", None), "_pending_queue", None)
    out: list[Msg] = []
    if queue is None:
        return out
    while not queue.empty():
        msg = queue.get_nowait()
        if msg.reply:
            out.append(msg)
    return out


class _NatsDurableConsumer(DurableConsumer):
    def __init__(self, bus: NatsBus, pattern: str, durable: str) -> None:
        self.bus = bus
        self.pattern = pattern
        self.durable = durable
        self._psub: JetStreamContext.PullSubscription | None = None
        self._bind_lock: asyncio.Lock | None = None
        self._inflight: dict[_NatsDelivery, None] = {}
        self._closed = False
        self._closed_fut: asyncio.Future[None] | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("durable consumer closed")
        if self.bus._closed:
            raise BusError("bus closed")

    async def _bind(self) -> JetStreamContext.PullSubscription:
        bus = self.bus
        js = await bus._jetstream()
        config = jsapi.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            deliver_policy=jsapi.DeliverPolicy.ALL,
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            ack_wait=bus._ack_wait,
            max_ack_pending=bus._max_ack_pending,
            max_deliver=bus._max_deliver,
            filter_subject=self.pattern,
        )
        try:
            await js.add_consumer(bus._stream, config=config)
        except jserr.APIError as exc:
            # Typically: the durable exists with a configuration that cannot be
            # updated in place. Bind to it as it is rather than fail.
            try:
                info = await js.consumer_info(bus._stream, self.durable)
            except jserr.NotFoundError:
                raise BusError(
                    f"cannot create durable consumer {self.durable!r}: {_describe(exc)}"
                ) from exc
            logger.warning(
                "durable consumer %r exists with a different configuration "
                "(filter %r, ack_wait %s); using it as is: %s",
                self.durable,
                info.config.filter_subject,
                info.config.ack_wait,
                _describe(exc),
            )
        psub = await js.pull_subscribe_bind(durable=self.durable, stream=bus._stream)
        logger.debug("bound durable consumer %r on %r", self.durable, self.pattern)
        return psub

    async def _ensure_bound(self, timeout: float) -> JetStreamContext.PullSubscription:
        if self._psub is not None:
            return self._psub
        if self._bind_lock is None:
            self._bind_lock = asyncio.Lock()
        async with self._bind_lock:
            if self._psub is None:
                self._psub = await asyncio.wait_for(self._bind(), timeout)
            return self._psub

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(float(timeout), 0.0)
        if self._closed_fut is None:
            self._closed_fut = loop.create_future()
        try:
            psub = await self._ensure_bound(max(timeout, self.bus._request_timeout))
        except _TRANSIENT_OR_UNAVAILABLE as exc:
            # Not reachable yet (server down, JetStream not answering): behave
            # like an empty fetch so that worker loops simply keep polling.
            self._check_open()
            _rl.warning(
                f"nats-bind:{self.durable}",
                "durable consumer %r not available yet (%s); will retry",
                self.durable,
                _describe(exc),
            )
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.wait({self._closed_fut}, timeout=remaining)
            self._check_open()
            return []
        except BusError:
            raise
        except RuntimeError as exc:  # the bus was closed meanwhile
            raise BusError(str(exc)) from exc
        except jserr.APIError as exc:
            raise BusError(f"durable consumer {self.durable!r}: {_describe(exc)}") from exc
        remaining = max(deadline - loop.time(), 0.01)
        # Run the pull in its own task so that closing the consumer (or the bus)
        # wakes this fetch at once instead of after its timeout.
        inner = loop.create_task(psub.fetch(batch=max_messages, timeout=remaining))
        waiters: set[asyncio.Future[Any]] = {inner, self._closed_fut}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not inner.done():
                inner.cancel()
                inner.add_done_callback(_retrieve)
        if not inner.done() or inner.cancelled():
            self._check_open()
            return []
        try:
            msgs = inner.result()
        except TimeoutError:  # includes nats.errors.TimeoutError
            return []
        except nerr.ConnectionClosedError as exc:
            self._check_open()
            raise BusUnavailable("NATS connection closed") from exc
        except jserr.APIError as exc:
            # e.g. the consumer was deleted: rebind on the next fetch.
            _rl.warning(
                f"nats-fetch:{self.durable}",
                "fetch on durable consumer %r failed (%s); rebinding",
                self.durable,
                _describe(exc),
            )
            self._psub = None
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            return []
        except (nerr.Error, OSError) as exc:
            self._check_open()
            _rl.warning(
                f"nats-fetch:{self.durable}",
                "fetch on durable consumer %r failed: %s",
                self.durable,
                _describe(exc),
            )
            return []
        out: list[Delivery] = []
        for msg in msgs:
            try:
                event = Event.from_json(msg.subject, msg.data)
            except ValueError as exc:
                # handed on (not dropped) so the consumer can dead-letter it
                # with its reason; the payload marks it undecodable
                self.bus._invalid += 1
                raw = bytes(msg.data[:65536]).decode("utf-8", "replace")
                msg_id = (msg.headers or {}).get(_MSG_ID_HEADER) if msg.headers else None
                event = Event(
                    topic=msg.subject,
                    payload={UNDECODABLE: raw, "error": str(exc)[:500]},
                    id=str(msg_id) if msg_id else uuid.uuid4().hex,
                )
            delivery = _NatsDelivery(self, msg, event)
            self._inflight[delivery] = None
            out.append(delivery)
        self.bus._durable_delivered += len(out)
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        self.bus._consumers.pop(self, None)
        inflight = list(self._inflight)
        self._inflight.clear()
        nc = self.bus._nc
        if nc is not None and not nc.is_closed:
            for delivery in inflight:
                with contextlib.suppress(Exception):
                    await delivery.nak()
            psub, self._psub = self._psub, None
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
                # A pull that timed out before reading everything it asked
                # for leaves the rest in the subscription's queue: delivered
                # as far as the server knows, so hand those back too, or they
                # wait for ack_wait. nats-py has no public call that takes
                # queued messages without pulling more, hence its queue.
                for msg in _queued(psub):
                    with contextlib.suppress(Exception):
                        await msg.nak()
        self._psub = None

    def __repr__(self) -> str:
        return f"<_NatsDurableConsumer {self.durable!r} {self.pattern!r} closed={self._closed}>"


class NatsBus(Bus):
    """Bus over NATS (``nats://host:port[,nats://host2:port]``).

    :param url: one or more comma-separated ``nats://`` (or ``tls://``) URLs.
    :param name: client name shown by the server.
    :param stream: JetStream stream holding the durable events.
    :param stream_subjects: subjects captured by that stream.
    :param queue_size: per-subscriber queue bound (drop-oldest beyond it).
    :param max_reconnect_attempts: ``-1`` reconnects forever.
    :param reconnect_time_wait: seconds between reconnect attempts to one server.
    :param connect_timeout: bound on :meth:`connect` (which raises
        :class:`BusUnavailable` when no server answers within it).
    :param request_timeout: JetStream API request timeout (stream/consumer setup).
    :param stream_max_age: seconds a stored event is kept (limits retention).
    :param duplicate_window: seconds within which a re-published event id is
        recognised as a duplicate by JetStream.
    :param stream_max_bytes: stream size cap (``-1``: unlimited).
    :param ack_wait: seconds before an unacked delivery is redelivered.
    :param max_ack_pending: unacked deliveries a durable consumer may have.
    :param max_deliver: delivery attempts per event (``-1``: unlimited).
    :param manage_stream: create/update the stream on connect.
    :param pending_size: bytes nats-py buffers while disconnected.
    """

    name = "nats"
    wire_events = True

    def __init__(
        self,
        url: str,
        *,
        name: str = "decnet-attr",
        stream: str = "DECNET_OBSERVATIONS",
        stream_subjects: tuple[str, ...] | list[str] = (OBSERVATION_PATTERN, INGEST_PATTERN),
        queue_size: int = 1024,
        max_reconnect_attempts: int = -1,
        reconnect_time_wait: float = 2.0,
        connect_timeout: float = 5.0,
        request_timeout: float = 5.0,
        stream_max_age: float = 7 * 86400.0,
        duplicate_window: float = 120.0,
        stream_max_bytes: int = -1,
        ack_wait: float = 30.0,
        max_ack_pending: int = 20000,
        max_deliver: int = -1,
        manage_stream: bool = True,
        pending_size: int = 8 * 1024 * 1024,
    ) -> None:
        servers = [u.strip() for u in url.split(",") if u.strip()]
        if not servers:
            raise ValueError("empty NATS url")
        for server in servers:
            scheme = server.split("://", 1)[0].lower() if "://" in server else ""
            if scheme not in ("nats", "tls"):
                raise ValueError(f"not a nats:// url: {_redact(server)!r}")
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if connect_timeout <= 0 or request_timeout <= 0 or ack_wait <= 0:
            raise ValueError("timeouts must be > 0")
        validate_segment(stream)
        subjects = tuple(stream_subjects)
        if not subjects:
            raise ValueError("stream_subjects must not be empty")
        for subject in subjects:
            validate_pattern(subject)
        self._servers = servers
        self._client_name = name
        self._stream = stream
        self._stream_subjects = subjects
        self._queue_size = queue_size
        self._max_reconnect_attempts = max_reconnect_attempts
        self._reconnect_time_wait = float(reconnect_time_wait)
        self._connect_timeout = float(connect_timeout)
        self._request_timeout = float(request_timeout)
        self._stream_max_age = float(stream_max_age)
        self._duplicate_window = float(duplicate_window)
        self._stream_max_bytes = stream_max_bytes
        self._ack_wait = float(ack_wait)
        self._max_ack_pending = max_ack_pending
        self._max_deliver = max_deliver
        self._manage_stream = manage_stream
        self._pending_size = pending_size

        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self._subs: dict[_NatsSubscription, None] = {}
        self._shared: dict[str, _SharedSub] = {}
        self._attaching: set[asyncio.Task[None]] = set()
        self._sync_lock: asyncio.Lock | None = None
        self._sync_sub: Any = None
        self._sync_nc: NatsClient | None = None
        self._sync_inbox = ""
        self._consumers: dict[_NatsDurableConsumer, None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._valid_topics: set[str] = set()
        self._durable_inflight = 0

        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._invalid = 0
        self._reconnects = 0
        # between a disconnect and our reconnect callback: nats-py is
        # connected again a moment before it calls back, and until then the
        # reconnect is not counted (connected waits for it, so readiness
        # and the metrics agree)
        self._down = False
        self._disconnects = 0
        self._durable_published = 0
        self._durable_duplicates = 0
        self._durable_delivered = 0
        self._durable_acked = 0

    @property
    def url(self) -> str:
        """The server URLs without credentials."""
        return ",".join(_redact(s) for s in self._servers)

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._closed:
            raise RuntimeError("bus is closed")
        if self._nc is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                raise RuntimeError("bus is closed")
            if self._nc is not None:
                return
            await self._do_connect()

    async def _do_connect(self) -> None:
        nc = NatsClient()
        options: dict[str, Any] = {
            "servers": self._servers,
            "name": self._client_name,
            "allow_reconnect": True,
            "max_reconnect_attempts": self._max_reconnect_attempts,
            "reconnect_time_wait": self._reconnect_time_wait,
            "connect_timeout": min(self._connect_timeout, 2.0),
            "pending_size": self._pending_size,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            # every subject this bus sends is checked by its own, stricter
            # topic and pattern rules first (validate_topic, validate_pattern)
            "skip_subject_validation": True,
        }
        try:
            # nats-py retries the initial connection forever with
            # max_reconnect_attempts=-1: bound it ourselves.
            await asyncio.wait_for(nc.connect(**options), self._connect_timeout)
        except asyncio.CancelledError:
            await self._discard(nc)
            raise
        except Exception as exc:
            await self._discard(nc)
            raise BusUnavailable(
                f"cannot connect to NATS at {self.url} within {self._connect_timeout}s: "
                f"{_describe(exc)}"
            ) from exc
        js = nc.jetstream(timeout=self._request_timeout)
        if self._manage_stream:
            try:
                await self._ensure_stream(js)
            except BaseException:
                await self._discard(nc)
                raise
        if self._closed:  # close() ran while we were connecting
            await self._discard(nc)
            raise RuntimeError("bus is closed")
        self._nc = nc
        self._js = js
        logger.info("connected to NATS at %s", self.url)
        for shared in self._shared.values():
            if shared.nsub is None and shared.attach_task is None:
                self._schedule_attach(shared)

    @staticmethod
    async def _discard(nc: NatsClient) -> None:
        with contextlib.suppress(Exception):
            await nc.close()

    def _stream_config(self) -> jsapi.StreamConfig:
        return jsapi.StreamConfig(
            name=self._stream,
            subjects=list(self._stream_subjects),
            retention=jsapi.RetentionPolicy.LIMITS,
            storage=jsapi.StorageType.FILE,
            discard=jsapi.DiscardPolicy.OLD,
            max_age=self._stream_max_age,
            max_bytes=self._stream_max_bytes,
            max_msgs=-1,
            duplicate_window=self._duplicate_window,
        )

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the stream, or update it when our managed settings differ."""
        config = self._stream_config()
        try:
            try:
                info = await js.stream_info(self._stream)
            except jserr.NotFoundError:
                await js.add_stream(config)
                logger.info(
                    "created JetStream stream %s for %s", self._stream, self._stream_subjects
                )
                return
            current = info.config
            if (
                sorted(current.subjects or []) != sorted(self._stream_subjects)
                or current.max_age != config.max_age
                or current.duplicate_window != config.duplicate_window
                or (current.max_bytes or -1) != self._stream_max_bytes
            ):
                try:
                    await js.update_stream(config)
                    logger.info("updated JetStream stream %s", self._stream)
                except jserr.APIError as exc:
                    logger.warning(
                        "JetStream stream %s differs from the configuration and could not "
                        "be updated: %s",
                        self._stream,
                        _describe(exc),
                    )
        except _TRANSIENT as exc:
            raise BusUnavailable(
                f"JetStream not available at {self.url}: {_describe(exc)}"
            ) from exc
        except jserr.APIError as exc:
            raise BusError(f"cannot set up JetStream stream {self._stream}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        subs = list(self._subs)
        self._subs.clear()
        self._shared.clear()
        for sub in subs:
            sub.end(drain=True)
        consumers = list(self._consumers)
        self._consumers.clear()
        for consumer in consumers:
            with contextlib.suppress(Exception):
                await consumer.aclose()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        nc, self._nc = self._nc, None
        self._js = None
        if nc is not None:
            await self._discard(nc)  # nats-py writes out pending commands first
            logger.info("NATS bus closed")

    @property
    def connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected and not self._down and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    # -- nats-py callbacks (must never raise) ------------------------------------------------
    async def _on_error(self, exc: Exception) -> None:
        try:
            if self._nc is None or self._closed:
                logger.debug("NATS: %s", _describe(exc))
            else:
                _rl.warning("nats-error:" + type(exc).__name__, "NATS: %s", _describe(exc))
        except Exception:
            pass

    async def _on_disconnected(self) -> None:
        try:
            if not self._closed and self._nc is not None:
                self._down = True
                self._disconnects += 1
                logger.warning("disconnected from NATS at %s; reconnecting", self.url)
        except Exception:
            pass

    async def _on_reconnected(self) -> None:
        try:
            self._reconnects += 1
            self._down = False
            logger.info("reconnected to NATS at %s", self.url)
            if self._manage_stream and self._js is not None and not self._closed:
                self._spawn(self._ensure_stream_quietly())
        except Exception:
            pass

    async def _on_closed(self) -> None:
        try:
            if not self._closed and self._nc is not None:
                logger.error(
                    "NATS connection to %s closed for good (reconnect attempts exhausted)",
                    self.url,
                )
                for sub in list(self._subs):
                    sub.end(drain=True)
        except Exception:
            pass

    async def _ensure_stream_quietly(self) -> None:
        js = self._js
        if js is None:
            return
        try:
            await self._ensure_stream(js)
        except BusError as exc:
            _rl.warning("nats-stream", "re-checking the JetStream stream failed: %s", exc)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.warning("NATS bus background task failed: %s", _describe(exc))

    # -- helpers -----------------------------------------------------------------------------
    def _check_topic(self, topic: str) -> None:
        if topic in self._valid_topics:
            return
        validate_topic(topic)
        if len(self._valid_topics) >= _VALID_CACHE_SIZE:
            self._valid_topics.clear()
        self._valid_topics.add(topic)

    async def _client(self) -> NatsClient:
        if self._closed:
            raise RuntimeError("bus is closed")
        if self._nc is None:
            await self.connect()
        nc = self._nc
        if nc is None:  # closed concurrently
            raise RuntimeError("bus is closed")
        if nc.is_closed:
            raise BusUnavailable("NATS connection closed (reconnect attempts exhausted)")
        if self._attaching:
            # Pending SUBs go on the wire before our next PUB, so that a process
            # sees its own events (as with the in-process bus).
            await asyncio.wait(set(self._attaching))
        return nc

    async def _jetstream(self) -> JetStreamContext:
        await self._client()
        js = self._js
        if js is None:
            raise RuntimeError("bus is closed")
        return js

    def _count_drop(self, n: int) -> None:
        self._dropped += n

    # -- fan-out -----------------------------------------------------------------------------
    async def publish_many(self, events: Sequence[tuple[str, Any, str, str]]) -> int:
        """:meth:`Bus.publish_many` in one pass: the client is looked up once,
        the events of one call share their time, and each goes out as its
        wire form straight away, without an :class:`Event` and two coroutine
        layers each (the worker publishes one event per state row it writes:
        a quarter of its loop on this bus went there). An event whose payload
        is bytes is in its wire form already (:attr:`Bus.wire_events`)."""
        try:
            nc = await self._client()
        except BusUnavailable as exc:
            logger.warning("publishing %d events failed: %s", len(events), exc)
            return 0
        now = time.time()
        sent = 0
        for topic, payload, etype, eid in events:
            try:
                self._check_topic(topic)
                if isinstance(payload, bytes):
                    await self._send(nc, topic, payload)
                    sent += 1
                    continue
                if not isinstance(payload, dict):
                    raise TypeError("the payload is not a dict")
                data = orjson.dumps(
                    envelope(
                        EVENT_SCHEMA_VERSION, eid or uuid.uuid4().hex, topic, etype, now, payload
                    )
                )
                await self._send(nc, topic, data)
            except Exception as exc:
                logger.warning("publish on %s failed: %s", topic[:200], exc)
                continue
            sent += 1
        return sent

    async def _send(self, nc: NatsClient, topic: str, data: bytes) -> None:
        """One core NATS message, nats-py's errors as the bus's."""
        try:
            await nc.publish(topic, data)
        except nerr.MaxPayloadError as exc:
            raise BusPayloadTooLarge(
                f"event on {topic!r} is {len(data)} bytes, above the server's max_payload"
            ) from exc
        except (nerr.Error, OSError) as exc:
            raise BusUnavailable(f"publish on {topic!r} failed: {_describe(exc)}") from exc
        self._published += 1

    async def _publish(self, event: Event) -> None:
        await self._send(await self._client(), event.topic, event.to_json())

    def subscribe(self, pattern: str) -> Subscription:
        if self._closed:
            raise RuntimeError("bus is closed")
        validate_pattern(pattern)
        shared = self._shared.get(pattern)
        if shared is None:
            shared = _SharedSub(pattern)
            self._shared[pattern] = shared
            if self._nc is not None:
                self._schedule_attach(shared)
        sub = _NatsSubscription(self, shared, self._queue_size)
        shared.locals[sub] = None
        self._subs[sub] = None
        return sub

    def _schedule_attach(self, shared: _SharedSub) -> None:
        task = self._spawn(self._attach(shared))
        shared.attach_task = task
        self._attaching.add(task)

    async def _attach(self, shared: _SharedSub) -> None:
        try:
            await self._attach_inner(shared)
        finally:
            task = shared.attach_task
            shared.attach_task = None
            if task is not None:
                self._attaching.discard(task)

    async def _attach_inner(self, shared: _SharedSub) -> None:
        nc = self._nc
        if nc is None or self._shared.get(shared.pattern) is not shared:
            return
        targets = shared.locals

        async def on_msg(msg: Msg) -> None:
            if not targets:
                return
            try:
                event = Event.from_json(msg.subject, msg.data)
            except ValueError as exc:
                self._invalid += 1
                _rl.warning(
                    "nats-invalid", "dropping undecodable message on %s: %s", msg.subject, exc
                )
                return
            delivered = 0
            for sub in targets:
                if sub.push(event):
                    delivered += 1
            self._delivered += delivered

        nsub = await nc.subscribe(shared.pattern, cb=on_msg)
        if self._shared.get(shared.pattern) is not shared:  # released meanwhile
            with contextlib.suppress(Exception):
                await nsub.unsubscribe()
            return
        shared.nsub = nsub

    async def _wait_ready(self, sub: _NatsSubscription) -> None:
        await self._round_trip(self._request_timeout)

    async def _unsubscribe(self, sub: QueueSubscription) -> None:
        assert isinstance(sub, _NatsSubscription)
        if sub in self._subs:
            del self._subs[sub]
        shared = sub.shared
        shared.locals.pop(sub, None)
        if shared.locals or self._shared.get(shared.pattern) is not shared:
            return
        del self._shared[shared.pattern]
        nsub, shared.nsub = shared.nsub, None
        nc = self._nc
        if nsub is not None and nc is not None and not nc.is_closed:
            try:
                await nsub.unsubscribe()
            except (nerr.Error, OSError) as exc:
                logger.debug("NATS unsubscribe of %r failed: %s", sub.pattern, _describe(exc))

    async def flush(self, timeout: float = 5.0) -> None:
        """Round trip to the server: everything this bus sent so far (PUBs, SUBs)
        has been processed by the server when this returns."""
        await self._round_trip(timeout)

    async def _round_trip(self, timeout: float) -> None:
        # Not nats-py's flush(): in nats-py 2.16 it writes PING straight to the
        # socket, ahead of commands still in the pending buffer, so its PONG does
        # not prove that an earlier SUB reached the server. Instead we publish a
        # token to a private inbox we subscribe to ourselves and wait for it to
        # come back: that message travels behind everything sent before it.
        nc = await self._client()  # also waits for pending SUBs
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        try:
            async with self._sync_lock:
                if self._sync_sub is None or self._sync_nc is not nc:
                    self._sync_inbox = nc.new_inbox()
                    self._sync_sub = await nc.subscribe(self._sync_inbox)
                    self._sync_nc = nc
                token = uuid.uuid4().hex.encode()
                await nc.publish(self._sync_inbox, token)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while True:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise nerr.TimeoutError
                    msg = await self._sync_sub.next_msg(timeout=remaining)
                    if msg.data == token:
                        return
        except (TimeoutError, nerr.Error, OSError) as exc:
            raise BusUnavailable(f"NATS round trip failed: {_describe(exc)}") from exc

    # -- durable -----------------------------------------------------------------------------
    def _check_durable(self, topic: str) -> None:
        if not any(matches(s, topic) for s in self._stream_subjects):
            raise BusUnavailable(
                f"topic {topic!r} is not captured by stream {self._stream} "
                f"({', '.join(self._stream_subjects)})"
            )

    async def _publish_durable(self, event: Event, timeout: float) -> None:
        topic = event.topic
        data = event.to_json()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._durable_inflight += 1
        try:
            try:
                js = await asyncio.wait_for(self._jetstream(), timeout)
                remaining = max(deadline - loop.time(), 0.001)
                ack = await asyncio.wait_for(
                    js.publish(
                        topic,
                        data,
                        timeout=remaining,
                        headers={_MSG_ID_HEADER: event.id},
                    ),
                    remaining + 0.5,
                )
            except BusError:
                raise
            except nerr.MaxPayloadError as exc:
                raise BusPayloadTooLarge(
                    f"event {event.id} on {topic!r} is {len(data)} bytes, above the server's "
                    f"max_payload"
                ) from exc
            except _TRANSIENT as exc:
                if self._closed:
                    raise BusUnavailable("bus closed") from exc
                raise BusUnavailable(
                    f"durable publish of {event.id} on {topic!r} not acknowledged within "
                    f"{timeout}s: {_describe(exc)}"
                ) from exc
            except jserr.APIError as exc:
                raise BusError(f"JetStream rejected {event.id} on {topic!r}: {exc}") from exc
            except nerr.Error as exc:
                raise BusUnavailable(
                    f"durable publish of {event.id} on {topic!r} failed: {_describe(exc)}"
                ) from exc
        finally:
            self._durable_inflight -= 1
        if ack.duplicate:
            self._durable_duplicates += 1
        self._durable_published += 1
        self._published += 1

    def durable_consumer(self, pattern: str, *, durable: str) -> DurableConsumer:
        if self._closed:
            raise RuntimeError("bus is closed")
        validate_pattern(pattern)
        validate_segment(durable)
        consumer = _NatsDurableConsumer(self, pattern, durable)
        self._consumers[consumer] = None
        return consumer

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        unacked = sum(len(c._inflight) for c in self._consumers)
        return {
            "published": self._published,
            "delivered": self._delivered,
            "dropped": self._dropped,
            "subscriptions": len(self._subs),
            "invalid": self._invalid,
            "durable_published": self._durable_published,
            "durable_duplicates": self._durable_duplicates,
            "durable_delivered": self._durable_delivered,
            "durable_acked": self._durable_acked,
            "durable_pending": self._durable_inflight + unacked,
            "durable_consumers": len(self._consumers),
            "reconnects": self._reconnects,
            "disconnects": self._disconnects,
        }
