"""Bus interface: the event envelope, subscriptions, durable consumers and the bus.

Two delivery paths (docs/decnet.md#bus-delivery):

- **fan-out** (:meth:`Bus.publish` / :meth:`Bus.subscribe`): fire-and-forget,
  at-most-once notification to every matching subscriber, bounded queue per
  subscriber with drop-oldest (every drop counted and logged, rate-limited);
- **durable** (:meth:`Bus.publish_durable` / :meth:`Bus.durable_consumer`):
  at-least-once work distribution for the observation stream; the publisher
  returns only once the event is durably accepted, consumers ack after they
  committed, anything not acked is delivered again.

Event ids are preserved end to end (docs/decnet.md#event-ids), so consumers can
de-duplicate redeliveries.

A transport subclasses :class:`Bus`: :meth:`Bus.publish` and
:meth:`Bus.publish_durable` check their arguments and make the event, then
hand it to the transport's ``_publish`` / ``_publish_durable`` (after
``_check_topic`` and ``_check_durable``). The transports whose durable
groups live in this process (``memory://``, ``unix://``) share them through
``bus/local.py``; every transport's ``stats()`` keys are declared in
``bus/metrics.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import orjson

from decnet_attr.topics import validate_topic

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "Bus",
    "BusError",
    "BusUnavailable",
    "Delivery",
    "DurableConsumer",
    "Event",
    "QueueSubscription",
    "RateLimitedLog",
    "Subscription",
]

logger = logging.getLogger(__name__)

EVENT_SCHEMA_VERSION = 1

#: Minimum seconds between two WARNING lines about drops on one subscription.
DROP_LOG_INTERVAL = 10.0


def _new_id() -> str:
    return uuid.uuid4().hex


_new_object = object.__new__


# ------------------------------------------------------------------------------------------
# envelope
# ------------------------------------------------------------------------------------------
def envelope(
    v: int, id: str, topic: str, type: str, ts: float, payload: dict[str, Any]
) -> dict[str, Any]:
    """An event's wire form, keys in DECNET's order ``v, id, topic, type, ts,
    payload`` (:meth:`Event.to_dict`; a bus that sends events without making
    :class:`Event` objects builds it here too)."""
    return {"v": v, "id": id, "topic": topic, "type": type, "ts": ts, "payload": payload}


@dataclass(frozen=True)
class Event:
    """One bus event (docs/decnet.md#bus-envelope). Immutable; ``payload`` is a plain dict
    shared by every subscriber, so treat it as read-only."""

    topic: str
    payload: dict[str, Any]
    type: str = ""
    v: int = EVENT_SCHEMA_VERSION
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=_new_id)

    @classmethod
    def of(
        cls, topic: str, payload: dict[str, Any], type: str, v: int, ts: float, id: str
    ) -> Event:
        """``Event(topic, payload, type, v, ts, id)``, made for the buses'
        hot paths: a frozen dataclass's ``__init__`` sets each field through
        ``object.__setattr__`` (about 0.7 µs an event); this fills the
        instance's ``__dict__`` directly (about 0.3 µs). Same object: equal,
        frozen, same repr."""
        event = _new_object(cls)
        d = event.__dict__
        d["topic"] = topic
        d["payload"] = payload
        d["type"] = type
        d["v"] = v
        d["ts"] = ts
        d["id"] = id
        return event

    def to_dict(self) -> dict[str, Any]:
        """The wire form (:func:`envelope`)."""
        return envelope(self.v, self.id, self.topic, self.type, self.ts, self.payload)

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON of :meth:`to_dict` (orjson)."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, topic: str, data: Mapping[str, Any]) -> Event:
        """Rebuild an event received on *topic* (docs/decnet.md#bus-envelope).

        - the topic comes from the transport; a ``topic`` key in *data* is ignored;
        - a missing or ``None`` payload gives ``{}``; any other non-object payload
          raises :class:`ValueError`;
        - a missing, ``None`` or empty ``type`` gives ``""`` (other values are ``str()``-ed);
        - ``v`` is coerced with ``int()`` (default 1), ``ts`` with ``float()``
          (missing or ``None``: now; non-finite: :class:`ValueError`);
        - a missing or empty ``id`` gives a fresh uuid4 hex.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"event body must be a JSON object, not {type(data).__name__}")
        payload = data.get("payload")
        if payload is None:
            payload = {}
        elif not isinstance(payload, dict):
            if isinstance(payload, Mapping):
                payload = dict(payload)
            else:
                raise ValueError(
                    f"event payload must be a JSON object, not {type(payload).__name__}"
                )
        raw_type = data.get("type")
        etype = "" if raw_type is None else str(raw_type)
        raw_v = data.get("v")
        try:
            v = EVENT_SCHEMA_VERSION if raw_v is None else int(raw_v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid event version {raw_v!r}") from exc
        raw_ts = data.get("ts")
        if raw_ts is None:
            ts = time.time()
        else:
            try:
                ts = float(raw_ts)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid event ts {raw_ts!r}") from exc
            if not math.isfinite(ts):
                raise ValueError(f"invalid event ts {raw_ts!r}")
        raw_id = data.get("id")
        eid = str(raw_id) if raw_id not in (None, "") else _new_id()
        return cls(topic=topic, payload=payload, type=etype, v=v, ts=ts, id=eid)

    @classmethod
    def from_json(cls, topic: str, raw: bytes) -> Event:
        """Parse a JSON object (bytes or str); :class:`ValueError` on bad JSON or a
        non-object."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"invalid event JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"event body must be a JSON object, not {type(data).__name__}")
        return cls.from_dict(topic, data)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
class BusError(RuntimeError):
    """A bus operation failed."""


#: Payload key of a durable delivery whose bytes were not a valid envelope
#: (the raw text, truncated, is its value); consumers dead-letter it.
UNDECODABLE = "_undecodable"


class BusPayloadTooLarge(BusError):
    """The event can never be published: it exceeds the transport's size limit
    (NATS ``max_payload``). Permanent: retrying cannot help."""


class BusUnavailable(BusError):
    """The bus cannot do this right now (no server, no durable consumer, timeout).

    Transient: the caller may retry (with the same ``event_id`` for durable
    publishes, so that the retry is de-duplicated).
    """


# ------------------------------------------------------------------------------------------
# logging helper
# ------------------------------------------------------------------------------------------
class RateLimitedLog:
    """At most one WARNING per *interval* seconds per key; suppressed lines are
    counted and reported with the next one that gets through."""

    def __init__(
        self, log: logging.Logger, interval: float = DROP_LOG_INTERVAL, max_keys: int = 1024
    ) -> None:
        self._log = log
        self._interval = interval
        self._max_keys = max_keys
        self._state: dict[str, list[float]] = {}

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        """Log *msg* % *args* at WARNING unless *key* logged within the interval.
        Returns whether it was logged."""
        now = time.monotonic()
        st = self._state.get(key)
        if st is not None and now - st[0] < self._interval:
            st[1] += 1
            return False
        if st is None and len(self._state) >= self._max_keys:
            self._state.clear()
        suppressed = int(st[1]) if st is not None else 0
        if suppressed:
            self._log.warning(msg + " (%d similar message(s) suppressed)", *args, suppressed)
        else:
            self._log.warning(msg, *args)
        self._state[key] = [now, 0.0]
        return True


# ------------------------------------------------------------------------------------------
# subscriptions
# ------------------------------------------------------------------------------------------
_C = TypeVar("_C", bound="ClosedOnExit")


class ClosedOnExit(ABC):
    """Leaving ``async with`` calls :meth:`aclose`."""

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Subscription(ClosedOnExit):
    """An async context manager and async iterator of :class:`Event` (docs/decnet.md#bus-delivery).

    Iteration ends (``StopAsyncIteration``) once the subscription or its bus is
    closed. Leaving ``async with`` calls :meth:`aclose`.
    """

    pattern: str

    @abstractmethod
    async def aclose(self) -> None:
        """Unregister; idempotent. Pending iteration ends."""

    @property
    @abstractmethod
    def dropped(self) -> int:
        """Events dropped for this subscriber because its queue was full."""

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the transport has registered the subscription (events
        published from *other* connections after this returns are seen).
        In-process: immediate."""
        return None

    def __aiter__(self) -> Subscription:
        return self

    @abstractmethod
    async def __anext__(self) -> Event: ...


class QueueSubscription(Subscription):
    """Shared implementation: bounded FIFO with drop-oldest.

    The bus calls :meth:`push` (synchronous) for every matching event and
    :meth:`end` when it closes (queued events are still yielded, then iteration
    stops). :meth:`aclose` stops iteration at once and discards the queue.
    """

    def __init__(
        self,
        pattern: str,
        maxsize: int,
        *,
        on_close: Callable[[QueueSubscription], Awaitable[None]] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("queue_size must be >= 1")
        self.pattern = pattern
        self._maxsize = maxsize
        self._queue: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._on_close = on_close
        self._on_drop = on_drop
        self._dropped = 0
        self._unlogged_drops = 0
        self._last_drop_log = -math.inf
        self._last_dropped_topic = ""

    # -- bus side -----------------------------------------------------------------------
    def push(self, event: Event) -> bool:
        """Enqueue *event* (drop-oldest when full). False if already closed."""
        if self._closed:
            return False
        queue = self._queue
        if len(queue) >= self._maxsize:
            old = queue.popleft()
            self._note_drop(old.topic)
        queue.append(event)
        self._wakeup.set()
        return True

    def _note_drop(self, topic: str) -> None:
        self._dropped += 1
        self._unlogged_drops += 1
        self._last_dropped_topic = topic
        if self._on_drop is not None:
            self._on_drop(1)
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._flush_drop_log(now)

    def _flush_drop_log(self, now: float) -> None:
        if not self._unlogged_drops:
            return
        logger.warning(
            "bus subscriber %r queue full (size %d): dropped %d oldest event(s), "
            "%d in total, last dropped topic %s",
            self.pattern,
            self._maxsize,
            self._unlogged_drops,
            self._dropped,
            self._last_dropped_topic,
        )
        self._unlogged_drops = 0
        self._last_drop_log = now

    def end(self, *, drain: bool = True) -> None:
        """Bus closing: stop accepting events; iteration ends once the queue is
        empty (at once if not *drain*)."""
        if not self._closed:
            self._closed = True
            self._flush_drop_log(time.monotonic())
        if not drain:
            self._queue.clear()
        self._wakeup.set()

    # -- consumer side ------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def pending(self) -> int:
        """Events queued and not yet read."""
        return len(self._queue)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def get_nowait(self) -> Event | None:
        """The next queued event, or ``None`` if none is queued."""
        return self._queue.popleft() if self._queue else None

    async def __anext__(self) -> Event:
        queue = self._queue
        while True:
            if queue:
                return queue.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        self.end(drain=False)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            await on_close(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {self.pattern!r} {state} "
            f"pending={len(self._queue)} dropped={self._dropped}>"
        )


# ------------------------------------------------------------------------------------------
# durable path
# ------------------------------------------------------------------------------------------
class Delivery(ABC):
    """One message from the durable stream. Ack once the event is committed;
    nak to get it redelivered. Both are idempotent (only the first counts)."""

    event: Event

    @abstractmethod
    async def ack(self) -> None:
        """Acknowledge: the consumer committed the event; it will not be redelivered."""

    @abstractmethod
    async def nak(self, delay: float | None = None) -> None:
        """Negative-acknowledge: deliver again (after *delay* seconds if given)."""

    @property
    @abstractmethod
    def redelivered(self) -> bool:
        """True if this event had been delivered before (to any consumer)."""


class DurableConsumer(ClosedOnExit):
    """A member of a named durable consumer group (async context manager)."""

    pattern: str
    durable: str

    @abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to *timeout* seconds for the first message, then return at once
        with up to *max_messages* already available. ``[]`` on timeout.
        Raises :class:`BusError` if the bus or this consumer is closed."""

    @abstractmethod
    async def aclose(self) -> None:
        """Detach; unacked deliveries become eligible for redelivery. Idempotent."""


# ------------------------------------------------------------------------------------------
# the bus
# ------------------------------------------------------------------------------------------
class Bus(ABC):
    """Abstract bus. See the module docstring for the two delivery paths."""

    name: str = "abstract"
    #: :meth:`publish_many` also takes events already in their wire form:
    #: ``(topic, envelope JSON bytes, event_type, ignored id)``, the id inside
    #: the bytes (the worker then builds its state events so, in Rust). Only
    #: a bus that sends bytes anyway says yes.
    wire_events: bool = False

    @abstractmethod
    async def connect(self) -> None:
        """Connect; idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Close; idempotent. Ends every subscription's iteration. Terminal."""

    async def __aenter__(self) -> Bus:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        event_id: str | None = None,
        ts: float | None = None,
    ) -> Event:
        """Fire-and-forget fan-out. :class:`ValueError` on an invalid topic
        (wildcards included), :class:`RuntimeError` on a closed bus."""
        if self.closed:
            raise RuntimeError("bus is closed")
        self._check_topic(topic)
        event = self._make_event(topic, payload, event_type, event_id, ts)
        await self._publish(event)
        return event

    async def publish_many(self, events: Sequence[tuple[str, Any, str, str]]) -> int:
        """:meth:`publish` each ``(topic, payload, event_type, event_id)`` in
        order; an event that cannot go out (an invalid topic, a bus that
        fails it) is logged and the others still go. Returns how many went
        out. :class:`RuntimeError` on a closed bus. A bus may do it in one
        pass (the in-process bus does)."""
        if self.closed:
            raise RuntimeError("bus is closed")
        sent = 0
        for topic, payload, etype, eid in events:
            try:
                await self.publish(topic, payload, event_type=etype, event_id=eid)
            except Exception as exc:
                logger.warning("publish on %s failed: %s", topic[:200], exc)
                continue
            sent += 1
        return sent

    async def publish_durable(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        event_id: str | None = None,
        ts: float | None = None,
        timeout: float = 5.0,
    ) -> Event:
        """Publish and return only once durably accepted; :class:`BusUnavailable`
        otherwise. Also fanned out to ordinary subscribers."""
        if self.closed:
            raise RuntimeError("bus is closed")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self._check_topic(topic)
        self._check_durable(topic)
        event = self._make_event(topic, payload, event_type, event_id, ts)
        await self._publish_durable(event, timeout)
        return event

    # -- what a transport implements ----------------------------------------------------------
    def _check_topic(self, topic: str) -> None:
        """:class:`ValueError` unless *topic* is a valid concrete topic."""
        validate_topic(topic)

    @abstractmethod
    def _check_durable(self, topic: str) -> None:
        """:class:`BusUnavailable` if no durable publish on *topic* can succeed
        (checked before the event is made)."""

    @abstractmethod
    async def _publish(self, event: Event) -> None:
        """Send *event* (topic and bus already checked) to the subscribers."""

    @abstractmethod
    async def _publish_durable(self, event: Event, timeout: float) -> None:
        """Send *event* durably; return once it is accepted, within *timeout*."""

    @abstractmethod
    def subscribe(self, pattern: str) -> Subscription:
        """Subscribe (synchronous). :class:`RuntimeError` on a closed bus."""

    @abstractmethod
    def durable_consumer(self, pattern: str, *, durable: str) -> DurableConsumer:
        """Join the durable consumer group *durable* reading events matching *pattern*."""

    @property
    @abstractmethod
    def connected(self) -> bool:
        """True while the transport is usable."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` was called."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: at least ``published``, ``delivered``, ``dropped``,
        ``subscriptions``, ``durable_pending``, ``reconnects``."""

    def backlog(self) -> int:
        """Observations this bus has taken durably that no consumer has acked
        yet, when it knows (the in-process bus with a journal); else 0."""
        return 0

    # -- shared helpers --------------------------------------------------------------------
    @staticmethod
    def _make_event(
        topic: str,
        payload: dict[str, Any],
        event_type: str,
        event_id: str | None,
        ts: float | None,
    ) -> Event:
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict, not {type(payload).__name__}")
        return Event.of(
            topic,
            payload,
            event_type,
            EVENT_SCHEMA_VERSION,
            time.time() if ts is None else float(ts),
            event_id if event_id else uuid.uuid4().hex,
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("connected" if self.connected else "disconnected")
        return f"<{type(self).__name__} {state}>"
