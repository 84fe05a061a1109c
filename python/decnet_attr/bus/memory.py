"""In-process bus: the embedded default (no services needed).

Fan-out behaves like DECNET's FakeBus (reference §1.4): bounded queue per
subscriber with drop-oldest, and the publisher receives its own events when it
is also subscribed. Dispatch is by a per-topic route cache (topic -> matching
subscriptions) that is updated incrementally on subscribe/unsubscribe, so the
hot path is one dict lookup plus one append per subscriber.

The durable path emulates a JetStream work queue in memory: each named durable
consumer group has one bounded queue shared by its members (competing
consumers); :meth:`InProcessBus.publish_durable` waits until every matching
group *with an attached consumer* has acked the event. A plain
:meth:`InProcessBus.publish` on a topic a durable group reads is queued for that
group too, without waiting (as JetStream stores every message published on a
stream subject); it is dropped, counted and logged if the group is full.
Without a journal, "durable" means "committed by the consumer", not
"persisted": the bus holds nothing across a process restart. With a journal
(:mod:`decnet_attr.bus.journal`, what ``serve`` uses by default), a durable
publish returns once the event is written to the journal; the event is
acknowledged in the journal when every group has acked it, and what was not
acknowledged is redelivered after a restart (to the first durable group
opened on a matching pattern).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Any

from decnet_attr.bus.base import (
    Bus,
    BusError,
    BusUnavailable,
    Delivery,
    DurableConsumer,
    Event,
    QueueSubscription,
    RateLimitedLog,
    Subscription,
)
from decnet_attr.bus.journal import Journal
from decnet_attr.topics import matches, validate_pattern, validate_segment, validate_topic

__all__ = ["InProcessBus"]

logger = logging.getLogger(__name__)
_rl = RateLimitedLog(logger)

#: How many acked event ids each durable group remembers for de-duplication.
_RECENT_ACKED = 4096

_INFLIGHT, _ACKED, _NAKED, _EXPIRED = 0, 1, 2, 3


class _Pending:
    """An event waiting in (or in flight from) one durable group."""

    __slots__ = ("current", "deliveries", "done", "event", "future")

    def __init__(self, event: Event, future: asyncio.Future[bool]) -> None:
        self.event = event
        self.future = future
        self.done = False
        self.deliveries = 0
        self.current: _MemDelivery | None = None


class _Group:
    """One named durable consumer group: a queue shared by its members."""

    def __init__(self, bus: InProcessBus, name: str, pattern: str, maxsize: int) -> None:
        self.bus = bus
        self.name = name
        self.pattern = pattern
        self.maxsize = maxsize
        self.ready: deque[_Pending] = deque()
        self.by_id: dict[str, _Pending] = {}
        self.recent: dict[str, None] = {}
        self.consumers: dict[_MemDurableConsumer, None] = {}
        self.items = asyncio.Event()
        self.space = asyncio.Event()
        self.closed = False

    # -- producer side ---------------------------------------------------------------------
    def offer(self, event: Event, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool] | None:
        """Enqueue without waiting. Returns the ack future, or ``None`` if full.
        A duplicate id shares the pending entry (or is acked at once if recent)."""
        existing = self.by_id.get(event.id)
        if existing is not None:
            return existing.future
        if event.id in self.recent:
            fut: asyncio.Future[bool] = loop.create_future()
            fut.set_result(True)
            return fut
        if len(self.by_id) >= self.maxsize:
            return None
        fut = loop.create_future()
        pending = _Pending(event, fut)
        self.by_id[event.id] = pending
        self.ready.append(pending)
        self.items.set()
        return fut

    async def enqueue(self, event: Event, deadline: float) -> asyncio.Future[bool]:
        """Enqueue, waiting for space until *deadline* (loop time): backpressure."""
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise BusUnavailable("bus closed")
            fut = self.offer(event, loop)
            if fut is not None:
                return fut
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BusUnavailable(
                    f"durable queue {self.name!r} full ({self.maxsize} unacked events)"
                )
            self.space.clear()
            try:
                await asyncio.wait_for(self.space.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    # -- consumer side ---------------------------------------------------------------------
    def take(self, consumer: _MemDurableConsumer, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        ready = self.ready
        while ready and len(out) < limit:
            pending = ready.popleft()
            if pending.done or pending.current is not None:
                continue
            pending.deliveries += 1
            delivery = _MemDelivery(self, consumer, pending)
            pending.current = delivery
            consumer.inflight[delivery] = None
            out.append(delivery)
        if not ready:
            self.items.clear()
        if out:
            self.bus._durable_delivered += len(out)
            loop = asyncio.get_running_loop()
            loop.call_later(consumer.ack_wait, self._expire, out)
        return out

    def _expire(self, deliveries: list[Delivery]) -> None:
        expired = 0
        for d in deliveries:
            assert isinstance(d, _MemDelivery)
            if d.state == _INFLIGHT:
                d.state = _EXPIRED
                d.consumer.inflight.pop(d, None)
                self.requeue(d.pending)
                expired += 1
        if expired:
            logger.debug(
                "durable %r: %d delivery(ies) not acked within ack_wait, redelivering",
                self.name,
                expired,
            )

    def ack(self, pending: _Pending) -> None:
        if pending.done:
            return
        pending.done = True
        pending.current = None
        eid = pending.event.id
        self.by_id.pop(eid, None)
        recent = self.recent
        recent[eid] = None
        if len(recent) > _RECENT_ACKED:
            del recent[next(iter(recent))]
        if not pending.future.done():
            pending.future.set_result(True)
        self.bus._durable_acked += 1
        self.space.set()

    def requeue(self, pending: _Pending, delay: float | None = None) -> None:
        if pending.done or self.closed:
            return
        if delay is not None and delay > 0:
            asyncio.get_running_loop().call_later(delay, self.requeue, pending, None)
            return
        pending.current = None
        self.ready.appendleft(pending)
        self.bus._durable_redelivered += 1
        self.items.set()

    def close(self) -> None:
        self.closed = True
        for pending in self.by_id.values():
            if not pending.future.done():
                pending.future.set_result(False)
        self.by_id.clear()
        self.ready.clear()
        self.items.set()
        self.space.set()


class _MemDelivery(Delivery):
    __slots__ = ("consumer", "event", "group", "pending", "redelivered_flag", "state")

    def __init__(self, group: _Group, consumer: _MemDurableConsumer, pending: _Pending) -> None:
        self.group = group
        self.consumer = consumer
        self.pending = pending
        self.event = pending.event
        self.redelivered_flag = pending.deliveries > 1
        self.state = _INFLIGHT

    @property
    def redelivered(self) -> bool:
        return self.redelivered_flag

    async def ack(self) -> None:
        # A late ack (after ack_wait expired) still counts: the consumer committed it.
        if self.state in (_ACKED, _NAKED):
            return
        self.state = _ACKED
        self.consumer.inflight.pop(self, None)
        self.group.ack(self.pending)

    async def nak(self, delay: float | None = None) -> None:
        if self.state != _INFLIGHT:
            return
        self.state = _NAKED
        self.consumer.inflight.pop(self, None)
        self.group.requeue(self.pending, delay)

    def __repr__(self) -> str:
        return f"<_MemDelivery {self.event.topic} id={self.event.id} state={self.state}>"


class _MemDurableConsumer(DurableConsumer):
    def __init__(self, bus: InProcessBus, group: _Group, ack_wait: float) -> None:
        self.bus = bus
        self.group = group
        self.pattern = group.pattern
        self.durable = group.name
        self.ack_wait = ack_wait
        self.inflight: dict[_MemDelivery, None] = {}
        self._closed = False

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        group = self.group
        if self._closed or group.closed:
            raise BusError("durable consumer closed" if self._closed else "bus closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(float(timeout), 0.0)
        while True:
            out = group.take(self, max_messages)
            if out:
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            group.items.clear()
            try:
                await asyncio.wait_for(group.items.wait(), remaining)
            except asyncio.TimeoutError:
                return []
            if self._closed or group.closed:
                raise BusError("durable consumer closed" if self._closed else "bus closed")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        group = self.group
        group.consumers.pop(self, None)
        for delivery in list(self.inflight):
            if delivery.state == _INFLIGHT:
                delivery.state = _NAKED
                group.requeue(delivery.pending)
        self.inflight.clear()
        group.items.set()  # wake a fetch of this consumer blocked in another task

    def __repr__(self) -> str:
        return f"<_MemDurableConsumer {self.durable!r} {self.pattern!r} closed={self._closed}>"


class InProcessBus(Bus):
    """In-process bus (``memory://``).

    :param queue_size: per-subscriber queue bound (drop-oldest beyond it).
    :param durable_queue_size: per durable group bound on unacked events; a
        durable publish waits for space (backpressure) within its timeout.
    :param ack_wait: seconds after which an unacked durable delivery is redelivered.
    :param route_cache_size: distinct topics kept in the dispatch cache.
    :param journal: directory of the ingest journal (None: no journal; a
        durable publish then waits for the acks).
    :param journal_fsync: fsync each journal append (shared by concurrent ones).
    """

    name = "memory"

    def __init__(
        self,
        queue_size: int = 1024,
        durable_queue_size: int = 65536,
        *,
        ack_wait: float = 30.0,
        route_cache_size: int = 4096,
        journal: str | Path | None = None,
        journal_fsync: bool = False,
    ) -> None:
        if queue_size < 1 or durable_queue_size < 1:
            raise ValueError("queue sizes must be >= 1")
        if ack_wait <= 0:
            raise ValueError("ack_wait must be > 0")
        self._queue_size = queue_size
        self._durable_queue_size = durable_queue_size
        self._ack_wait = float(ack_wait)
        self._route_cache_size = route_cache_size
        self._subs: dict[QueueSubscription, None] = {}
        self._route: dict[str, list[QueueSubscription]] = {}
        self._groups: dict[str, _Group] = {}
        self._group_route: dict[str, list[_Group]] = {}
        self._connected = False
        self._closed = False
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._durable_published = 0
        self._durable_delivered = 0
        self._durable_acked = 0
        self._durable_redelivered = 0
        self._durable_dropped = 0
        self._journal = Journal(journal, fsync=journal_fsync) if journal is not None else None
        self._replay: list[tuple[int, Event]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._closed:
            raise RuntimeError("bus is closed")
        if self._journal is not None and not self._journal.opened:
            self._replay = self._journal.open()
        self._connected = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = False
        subs = list(self._subs)
        self._subs.clear()
        self._route.clear()
        for sub in subs:
            sub.end(drain=True)
        for group in self._groups.values():
            group.close()
        self._group_route.clear()
        if self._journal is not None:
            await asyncio.sleep(0)  # acks already given reach the journal (future callbacks)
            self._journal.close()

    @property
    def connected(self) -> bool:
        return self._connected and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    # -- routing -----------------------------------------------------------------------------
    def _route_for(self, topic: str) -> list[QueueSubscription]:
        subs = self._route.get(topic)
        if subs is None:
            validate_topic(topic)
            subs = [s for s in self._subs if matches(s.pattern, topic)]
            if len(self._route) >= self._route_cache_size:
                self._route.clear()
            self._route[topic] = subs
        return subs

    def _groups_for(self, topic: str) -> list[_Group]:
        groups = self._group_route.get(topic)
        if groups is None:
            groups = [g for g in self._groups.values() if matches(g.pattern, topic)]
            if len(self._group_route) >= self._route_cache_size:
                self._group_route.clear()
            self._group_route[topic] = groups
        return groups

    def _fanout(self, event: Event, subs: list[QueueSubscription]) -> None:
        for sub in subs:
            sub.push(event)
        self._delivered += len(subs)

    def _count_drop(self, n: int) -> None:
        self._dropped += n

    async def _unsubscribe(self, sub: QueueSubscription) -> None:
        if sub not in self._subs:
            return
        del self._subs[sub]
        route = self._route
        for topic, subs in route.items():
            if sub in subs:
                route[topic] = [s for s in subs if s is not sub]

    # -- fan-out -----------------------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        event_id: str | None = None,
        ts: float | None = None,
    ) -> Event:
        if self._closed:
            raise RuntimeError("bus is closed")
        subs = self._route.get(topic)
        if subs is None:
            subs = self._route_for(topic)
        event = self._make_event(topic, payload, event_type, event_id, ts)
        self._published += 1
        for sub in subs:
            sub.push(event)
        self._delivered += len(subs)
        if self._groups:
            groups = self._group_route.get(topic)
            if groups is None:
                groups = self._groups_for(topic)
            if groups:
                self._offer_untracked(event, groups)
        return event

    def _offer_untracked(self, event: Event, groups: list[_Group]) -> None:
        """A plain publish on a durable topic also reaches the durable groups (as
        JetStream stores every message on a stream subject), without waiting."""
        loop = asyncio.get_running_loop()
        for group in groups:
            if group.offer(event, loop) is None:
                self._durable_dropped += 1
                _rl.warning(
                    f"durable-full:{group.name}",
                    "durable queue %r full (%d unacked): plain publish of %s on %s not queued",
                    group.name,
                    group.maxsize,
                    event.id,
                    event.topic,
                )

    def subscribe(self, pattern: str) -> Subscription:
        if self._closed:
            raise RuntimeError("bus is closed")
        validate_pattern(pattern)
        sub = QueueSubscription(
            pattern, self._queue_size, on_close=self._unsubscribe, on_drop=self._count_drop
        )
        self._subs[sub] = None
        route = self._route
        for topic, subs in route.items():
            if matches(pattern, topic):
                route[topic] = [*subs, sub]
        return sub

    # -- durable -----------------------------------------------------------------------------
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
        if self._closed:
            raise RuntimeError("bus is closed")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        subs = self._route_for(topic)  # validates the topic
        groups = self._groups_for(topic)
        if not any(g.consumers for g in groups):
            raise BusUnavailable(f"no durable consumer registered for {topic!r}")
        event = self._make_event(topic, payload, event_type, event_id, ts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        journal = self._journal
        seq = await journal.append(event) if journal is not None else 0
        futures: list[asyncio.Future[bool]] = []
        try:
            for group in groups:
                if group.consumers:
                    futures.append(await group.enqueue(event, deadline))
                elif (fut := group.offer(event, loop)) is not None:
                    if journal is not None:  # held for a consumer to come
                        futures.append(fut)
                else:
                    self._durable_dropped += 1
                    _rl.warning(
                        f"durable-full:{group.name}",
                        "durable queue %r (no consumer attached) full, event %s not queued for it",
                        group.name,
                        event.id,
                    )
        finally:
            if journal is not None:
                self._settle(seq, futures)
        self._durable_published += 1
        self._published += 1
        self._fanout(event, subs)
        if journal is not None:
            return event  # durable: written to the journal
        waiting = [f for f in futures if not f.done()]
        if waiting:
            remaining = max(deadline - loop.time(), 0.0)
            _done, not_done = await asyncio.wait(waiting, timeout=remaining)
            if not_done:
                raise BusUnavailable(
                    f"durable event {event.id} on {topic!r} not acknowledged within {timeout}s"
                )
        if not all(f.result() for f in futures):
            raise BusUnavailable("bus closed before the durable event was acknowledged")
        return event

    def _settle(self, seq: int, futures: list[asyncio.Future[bool]]) -> None:
        """Acknowledge journal record ``seq`` once every future is acked
        (one resolved False, a closing bus, leaves it for redelivery)."""
        journal = self._journal
        assert journal is not None
        left = len(futures)
        if not left:
            journal.ack(seq)  # reached no group: nothing would redeliver it
            return

        def one(fut: asyncio.Future[bool]) -> None:
            nonlocal left
            left -= 1
            if not left and all(not f.cancelled() and f.result() for f in futures):
                journal.ack(seq)

        for fut in futures:
            fut.add_done_callback(one)

    def backlog(self) -> int:
        """Observations in the journal not acknowledged yet (0 without one)."""
        return self._journal.backlog if self._journal is not None else 0

    def _redeliver(self, group: _Group) -> None:
        """Queue the journal's unacknowledged records matching a new group."""
        if not self._replay:
            return
        loop = asyncio.get_running_loop()
        keep: list[tuple[int, Event]] = []
        for seq, event in self._replay:
            fut = group.offer(event, loop) if matches(group.pattern, event.topic) else None
            if fut is None:
                keep.append((seq, event))
            else:
                self._durable_redelivered += 1
                self._settle(seq, [fut])
        self._replay = keep

    def durable_consumer(self, pattern: str, *, durable: str) -> DurableConsumer:
        if self._closed:
            raise RuntimeError("bus is closed")
        validate_pattern(pattern)
        validate_segment(durable)
        group = self._groups.get(durable)
        if group is None:
            group = _Group(self, durable, pattern, self._durable_queue_size)
            self._groups[durable] = group
            self._group_route.clear()
        elif group.pattern != pattern:
            raise ValueError(
                f"durable consumer {durable!r} already reads {group.pattern!r}, not {pattern!r}"
            )
        consumer = _MemDurableConsumer(self, group, self._ack_wait)
        group.consumers[consumer] = None
        self._redeliver(group)
        return consumer

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "published": self._published,
            "delivered": self._delivered,
            "dropped": self._dropped,
            "subscriptions": len(self._subs),
            "durable_published": self._durable_published,
            "durable_delivered": self._durable_delivered,
            "durable_acked": self._durable_acked,
            "durable_redelivered": self._durable_redelivered,
            "durable_dropped": self._durable_dropped,
            "durable_pending": sum(len(g.by_id) for g in self._groups.values()),
            "durable_consumers": sum(len(g.consumers) for g in self._groups.values()),
            "journal_backlog": self.backlog(),
            "reconnects": 0,
        }
