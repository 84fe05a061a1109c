"""In-process bus: the embedded default (no services needed).

Fan-out behaves like DECNET's in-process bus (docs/decnet.md#bus-in-process): bounded queue per
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
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decnet_attr.bus.base import (
    EVENT_SCHEMA_VERSION,
    Bus,
    BusUnavailable,
    DurableConsumer,
    Event,
    QueueSubscription,
    RateLimitedLog,
    Subscription,
)
from decnet_attr.bus.journal import Journal
from decnet_attr.bus.local import (
    DurableCounts,
    Entry,
    LocalGroup,
    await_acks,
    join_group,
)
from decnet_attr.topics import matches, validate_pattern, validate_topic

__all__ = ["InProcessBus"]

logger = logging.getLogger(__name__)
_rl = RateLimitedLog(logger)

#: How many acked event ids each durable group remembers for de-duplication.
_RECENT_ACKED = 4096


class _Group(LocalGroup):
    """A durable group that refuses an event when full (the publisher waits
    for room) and de-duplicates by event id: an id pending shares its entry,
    an id acked recently is acked at once."""

    def __init__(self, counts: DurableCounts, name: str, pattern: str, maxsize: int) -> None:
        super().__init__(counts, name, pattern, maxsize)
        self.by_id: dict[str, Entry] = {}
        # oldest first; an OrderedDict, because a plain dict whose oldest key
        # is found with next(iter(...)) scans the slots its deletions left
        # at the front: ~2 us an ack at 4,096 ids, against ~0.5 us
        self.recent: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.by_id)

    def offer(self, event: Event, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool] | None:
        """Enqueue without waiting. Returns the ack future, or ``None`` if full."""
        existing = self.by_id.get(event.id)
        if existing is not None:
            assert existing.future is not None
            return existing.future
        if event.id in self.recent:
            fut: asyncio.Future[bool] = loop.create_future()
            fut.set_result(True)
            return fut
        if len(self.by_id) >= self.maxsize:
            return None
        fut = loop.create_future()
        entry = Entry(event, fut)
        self.by_id[event.id] = entry
        self.ready.append(entry)
        self.items.set()
        return fut

    async def enqueue(self, event: Event, deadline: float) -> asyncio.Future[bool]:
        """Enqueue, waiting for room until *deadline* (loop time): back-pressure."""
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise BusUnavailable("bus closed")
            fut = self.offer(event, loop)
            if fut is not None:
                return fut
            await self.wait_for_space(deadline)

    def acked(self, entry: Entry) -> None:
        if entry.done:
            return
        eid = entry.event.id
        self.by_id.pop(eid, None)
        recent = self.recent
        recent[eid] = None
        if len(recent) > _RECENT_ACKED:
            recent.popitem(last=False)
        super().acked(entry)

    def close(self) -> None:
        """Also fails the publishers of the events in flight."""
        for entry in self.by_id.values():
            entry.resolve(False)
        self.by_id.clear()
        super().close()


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
        self._durable = DurableCounts()
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
    def _check_topic(self, topic: str) -> None:
        self._route_for(topic)  # validates a topic it has not seen

    async def _publish(self, event: Event) -> None:
        topic = event.topic
        subs = self._route_for(topic)
        self._published += 1
        self._fanout(event, subs)
        if self._groups:
            groups = self._group_route.get(topic)
            if groups is None:
                groups = self._groups_for(topic)
            if groups:
                self._offer_untracked(event, groups)

    async def publish_many(self, events: Sequence[tuple[str, Any, str, str]]) -> int:
        """:meth:`Bus.publish_many` in one pass: each topic is routed once,
        and the events of one call share their time."""
        if self._closed:
            raise RuntimeError("bus is closed")
        now = time.time()
        routes: dict[str, tuple[list[QueueSubscription], list[_Group]]] = {}
        sent = 0
        for topic, payload, etype, eid in events:
            route = routes.get(topic)
            if route is None:
                try:
                    subs = self._route_for(topic)  # validates a topic it has not seen
                except ValueError as exc:
                    logger.warning("publish on %s failed: %s", topic[:200], exc)
                    continue
                route = routes[topic] = (subs, self._groups_for(topic) if self._groups else [])
            if not isinstance(payload, dict):
                logger.warning("publish on %s failed: the payload is not a dict", topic[:200])
                continue
            event = Event.of(topic, payload, etype, EVENT_SCHEMA_VERSION, now, eid)
            self._published += 1
            subs, groups = route
            if subs:
                self._fanout(event, subs)
            if groups:
                self._offer_untracked(event, groups)
            sent += 1
        return sent

    def _offer_untracked(self, event: Event, groups: list[_Group]) -> None:
        """A plain publish on a durable topic also reaches the durable groups (as
        JetStream stores every message on a stream subject), without waiting."""
        loop = asyncio.get_running_loop()
        for group in groups:
            self._offer(group, event, loop)

    def _offer(
        self, group: _Group, event: Event, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[bool] | None:
        """Queue *event* for *group* without waiting; a full group drops it
        (counted and logged): ``None`` then."""
        fut = group.offer(event, loop)
        if fut is None:
            self._durable.dropped += 1
            _rl.warning(
                f"durable-full:{group.name}",
                "durable queue %r full (%d unacked): %s on %s not queued for it",
                group.name,
                group.maxsize,
                event.id,
                event.topic,
            )
        return fut

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
    def _check_durable(self, topic: str) -> None:
        if not any(g.consumers for g in self._groups_for(topic)):
            raise BusUnavailable(f"no durable consumer registered for {topic!r}")

    async def _publish_durable(self, event: Event, timeout: float) -> None:
        subs = self._route_for(event.topic)
        groups = self._groups_for(event.topic)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        journal = self._journal
        seq = await journal.append(event) if journal is not None else 0
        futures: list[asyncio.Future[bool]] = []
        try:
            for group in groups:
                if group.consumers:
                    futures.append(await group.enqueue(event, deadline))
                elif (fut := self._offer(group, event, loop)) is not None and journal is not None:
                    futures.append(fut)  # held for a consumer to come
        finally:
            if journal is not None:
                self._settle(seq, futures)
        self._durable.published += 1
        self._published += 1
        self._fanout(event, subs)
        if journal is None:  # else durable: written to the journal
            await await_acks(
                futures,
                event,
                deadline,
                timeout,
                "bus closed before the durable event was acknowledged",
            )

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
                self._durable.redelivered += 1
                self._settle(seq, [fut])
        self._replay = keep

    def durable_consumer(self, pattern: str, *, durable: str) -> DurableConsumer:
        if self._closed:
            raise RuntimeError("bus is closed")

        def create() -> _Group:
            self._group_route.clear()
            return _Group(self._durable, durable, pattern, self._durable_queue_size)

        consumer = join_group(self._groups, pattern, durable, self._ack_wait, create)
        self._redeliver(self._groups[durable])
        return consumer

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "published": self._published,
            "delivered": self._delivered,
            "dropped": self._dropped,
            "subscriptions": len(self._subs),
            "durable_published": self._durable.published,
            "durable_delivered": self._durable.delivered,
            "durable_acked": self._durable.acked,
            "durable_redelivered": self._durable.redelivered,
            "durable_dropped": self._durable.dropped,
            "durable_pending": sum(len(g.by_id) for g in self._groups.values()),
            "durable_consumers": sum(len(g.consumers) for g in self._groups.values()),
            "journal_backlog": self.backlog(),
            "reconnects": 0,
        }
