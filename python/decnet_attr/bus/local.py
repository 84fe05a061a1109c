"""Durable consumer groups held in this process.

The in-process bus (``memory://``) and DECNET's Unix-socket bus (``unix://``,
whose broker acknowledges nothing) keep their durable groups here, in the
same way: a :class:`LocalGroup` is one bounded queue shared by the
consumers that joined it (competing consumers); a fetch takes events off its
front, a delivery not acked within ``ack_wait`` (or nak'ed, or left by a
consumer that closes) goes back to the front and is counted as redelivered;
an ack settles the event's future, which :func:`await_acks` waits for in
``publish_durable``. A late ack (after ``ack_wait`` expired) still counts:
the consumer committed the event. Ack and nak are idempotent; the first of
the two decides.

What the transports do differently stays with them: what a full queue does
(the in-process bus refuses and makes the publisher wait, and de-duplicates
by event id; the Unix bus drops the oldest queued event) and how the number
of pending events is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from decnet_attr.bus.base import BusError, BusUnavailable, Delivery, DurableConsumer, Event
from decnet_attr.topics import validate_pattern, validate_segment

__all__ = [
    "DurableCounts",
    "Entry",
    "LocalConsumer",
    "LocalDelivery",
    "LocalGroup",
    "await_acks",
    "join_group",
]

logger = logging.getLogger(__name__)

_INFLIGHT, _ACKED, _NAKED, _EXPIRED = 0, 1, 2, 3


@dataclass(slots=True)
class DurableCounts:
    """What a bus's durable path counted (its ``durable_*`` statistics)."""

    published: int = 0
    delivered: int = 0
    acked: int = 0
    redelivered: int = 0
    dropped: int = 0


class Entry:
    """One event in a group: queued, in flight (``current``) or done."""

    __slots__ = ("current", "deliveries", "done", "event", "future")

    def __init__(self, event: Event, future: asyncio.Future[bool] | None) -> None:
        self.event = event
        self.future = future
        self.deliveries = 0
        self.done = False
        self.current: LocalDelivery | None = None

    def resolve(self, ok: bool) -> None:
        """Tell the publisher waiting for it (if any)."""
        fut = self.future
        if fut is not None and not fut.done():
            fut.set_result(ok)

    def settle(self, ok: bool) -> None:
        self.done = True
        self.current = None
        self.resolve(ok)


class LocalGroup:
    """One named durable group: a bounded queue shared by its consumers."""

    def __init__(self, counts: DurableCounts, name: str, pattern: str, maxsize: int) -> None:
        self.counts = counts
        self.name = name
        self.pattern = pattern
        self.maxsize = maxsize
        self.ready: deque[Entry] = deque()
        self.inflight = 0
        self.consumers: dict[LocalConsumer, None] = {}
        self.items = asyncio.Event()
        self.space = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        """Events pending: queued or in flight."""
        return len(self.ready) + self.inflight

    async def wait_for_space(self, deadline: float) -> None:
        """Until the queue has room or is closed: back-pressure for a durable
        publish. :class:`BusUnavailable` if *deadline* (loop time) comes first."""
        loop = asyncio.get_running_loop()
        while len(self) >= self.maxsize and not self.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BusUnavailable(
                    f"durable queue {self.name!r} full ({self.maxsize} unacked events)"
                )
            self.space.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.space.wait(), remaining)

    # -- consumer side ---------------------------------------------------------------------
    def take(self, consumer: LocalConsumer, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        ready = self.ready
        expiry = _Expiry()
        while ready and len(out) < limit:
            entry = ready.popleft()
            if entry.done or entry.current is not None:  # acked late, or already out again
                continue
            entry.deliveries += 1
            out.append(LocalDelivery(self, consumer, entry, expiry))
        if not ready:
            self.items.clear()
        if out:
            self.inflight += len(out)
            self.counts.delivered += len(out)
            expiry.handle = asyncio.get_running_loop().call_later(
                consumer.ack_wait, self._expire, out
            )
        return out

    def _expire(self, deliveries: list[Delivery]) -> None:
        late = 0
        for d in deliveries:
            assert isinstance(d, LocalDelivery)
            if d.leave(_EXPIRED):
                self.requeue(d.entry)
                late += 1
        if late:
            logger.debug("durable %r: %d delivery(ies) not acked in time", self.name, late)

    def acked(self, entry: Entry) -> None:
        if entry.done:
            return
        entry.settle(True)
        self.counts.acked += 1
        self.space.set()

    def requeue(self, entry: Entry, delay: float | None = None) -> None:
        if entry.done or self.closed:
            return
        if delay is not None and delay > 0:
            asyncio.get_running_loop().call_later(delay, self.requeue, entry, None)
            return
        entry.current = None
        self.ready.appendleft(entry)
        self.counts.redelivered += 1
        self.items.set()

    def close(self) -> None:
        """Fail the queued events' publishers and wake every waiter."""
        self.closed = True
        for entry in self.ready:
            entry.settle(False)
        self.ready.clear()
        self.items.set()
        self.space.set()


class _Expiry:
    """The timer of one fetch, which expires its deliveries not acked within
    ``ack_wait``, and how many of them are still in flight. When none is,
    the timer is cancelled, which drops its list of deliveries: otherwise
    every acked delivery (its event, payload, entry and the publisher's
    future) stayed alive until ``ack_wait`` passed, thirty seconds' worth
    of events for the garbage collector to walk."""

    __slots__ = ("handle", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.handle: asyncio.TimerHandle | None = None

    def left(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self.handle is not None:
            self.handle.cancel()
            self.handle = None


class LocalDelivery(Delivery):
    __slots__ = ("consumer", "entry", "event", "expiry", "group", "redelivered_flag", "state")

    def __init__(
        self, group: LocalGroup, consumer: LocalConsumer, entry: Entry, expiry: _Expiry
    ) -> None:
        self.group = group
        self.consumer = consumer
        self.entry = entry
        self.event = entry.event
        self.redelivered_flag = entry.deliveries > 1
        self.state = _INFLIGHT
        self.expiry: _Expiry | None = expiry
        expiry.pending += 1
        entry.current = self
        consumer.inflight[self] = None

    @property
    def redelivered(self) -> bool:
        return self.redelivered_flag

    def leave(self, state: int) -> bool:
        """Leave the in-flight set as *state*; False if no longer in flight."""
        if self.state != _INFLIGHT:
            return False
        self.state = state
        self.consumer.inflight.pop(self, None)
        self.group.inflight -= 1
        if self.expiry is not None:
            self.expiry.left()
            self.expiry = None
        return True

    async def ack(self) -> None:
        if self.state in (_ACKED, _NAKED):
            return
        self.leave(_ACKED)
        self.state = _ACKED  # also after ack_wait expired: a late ack counts
        self.group.acked(self.entry)

    async def nak(self, delay: float | None = None) -> None:
        if self.leave(_NAKED):
            self.group.requeue(self.entry, delay)

    def __repr__(self) -> str:
        return f"<LocalDelivery {self.event.topic} id={self.event.id} state={self.state}>"


class LocalConsumer(DurableConsumer):
    def __init__(self, group: LocalGroup, ack_wait: float) -> None:
        self.group = group
        self.pattern = group.pattern
        self.durable = group.name
        self.ack_wait = ack_wait
        self.inflight: dict[LocalDelivery, None] = {}
        self._closed = False

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        group = self.group
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(float(timeout), 0.0)
        while True:
            if self._closed or group.closed:
                raise BusError("durable consumer closed" if self._closed else "bus closed")
            out = group.take(self, max_messages)
            if out:
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            group.items.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(group.items.wait(), remaining)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        group = self.group
        group.consumers.pop(self, None)
        for delivery in list(self.inflight):
            await delivery.nak()
        group.items.set()  # wake a fetch of this consumer blocked in another task

    def __repr__(self) -> str:
        return f"<LocalConsumer {self.durable!r} {self.pattern!r} closed={self._closed}>"


G = TypeVar("G", bound=LocalGroup)


def join_group(
    groups: dict[str, G],
    pattern: str,
    durable: str,
    ack_wait: float,
    create: Callable[[], G],
) -> LocalConsumer:
    """A new member of the group *durable* (made by *create* on first use);
    :class:`ValueError` if that group reads another pattern."""
    validate_pattern(pattern)
    validate_segment(durable)
    group = groups.get(durable)
    if group is None:
        group = groups[durable] = create()
    elif group.pattern != pattern:
        raise ValueError(
            f"durable consumer {durable!r} already reads {group.pattern!r}, not {pattern!r}"
        )
    consumer = LocalConsumer(group, ack_wait)
    group.consumers[consumer] = None
    return consumer


async def await_acks(
    futures: Sequence[asyncio.Future[bool]],
    event: Event,
    deadline: float,
    timeout: float,
    refused: str,
) -> None:
    """Wait until *deadline* (loop time) for every group's ack of *event*;
    :class:`BusUnavailable` if one does not come, or with *refused* if one
    was refused (dropped, or the bus closed)."""
    waiting = [f for f in futures if not f.done()]
    if waiting:
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        _done, not_done = await asyncio.wait(waiting, timeout=remaining)
        if not_done:
            raise BusUnavailable(
                f"durable event {event.id} on {event.topic!r} not acknowledged within {timeout}s"
            )
    if not all(f.result() for f in futures):
        raise BusUnavailable(refused)
