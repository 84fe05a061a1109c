"""The attribution worker.

Consumes ``attacker.observation.>`` from the bus's durable stream in
micro-batches and, per batch:

1. validates every event in one Rust pass (:mod:`decnet_attr.observations`,
   the validator HTTP ingest uses too); bad ones become dead letters with
   their reason code. A delivery is either one DECNET observation event or
   a batch handed over by the API (``attacker.observation.batch``);
2. in ONE store transaction: registers unknown attackers, creates stub
   identities atomically, inserts the observations (idempotent by id and by
   ``(evidence_ref, primitive)``), brings the engine's windows for the
   batch's keys up to date (the keys whose rows it does not hold; under row
   locks on PostgreSQL, where several workers share the store), merges the
   batch in the Rust engine, writes the changed state rows with their
   retained windows (on PostgreSQL each over the version it was built on),
   and updates the persisted multi-actor dedupe;
3. commits, THEN acks the messages and publishes ``identity.formed``,
   ``attribution.profile.state_changed`` / ``profile.updated`` and
   ``attribution.profile.multi_actor_suspected``.

If anything fails before the commit, the transaction rolls back, the keys the
batch touched are evicted from the engine (they reload from the store) and
the messages are nak'ed for redelivery: accepted data is never lost and
never merged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import orjson

from decnet_attr import Engine, IngestResult
from decnet_attr._core import StateTable, StateWrite
from decnet_attr.bus import Bus, BusError, Delivery
from decnet_attr.bus.base import EVENT_SCHEMA_VERSION, UNDECODABLE
from decnet_attr.bus.helpers import run_control_listener, run_health_heartbeat
from decnet_attr.config import Settings
from decnet_attr.logs import RepeatFilter
from decnet_attr.observations import OFF_LOOP_BYTES, ValidatedBatch, ndjson_lines, validate
from decnet_attr.registry import value_kind_for
from decnet_attr.store.base import (
    DeadLetter,
    ObservationRow,
    StateRow,
    Store,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    Tx,
)
from decnet_attr.topics import (
    ATTACKER_OBSERVED,
    ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED,
    ATTRIBUTION_PROFILE_STATE_CHANGED,
    ATTRIBUTION_PROFILE_UPDATED,
    EVENT_TYPE_MULTI_ACTOR_SUSPECTED,
    EVENT_TYPE_PROFILE_UPDATED,
    EVENT_TYPE_STATE_CHANGED,
    IDENTITY_FORMED,
    OBSERVATION_PATTERN,
    ingest_partition,
    is_observation_batch,
    primitive_from_topic,
)
from decnet_attr.worker.identities import IdentityRollup
from decnet_attr.worker.metrics import WorkerStats
from decnet_attr.worker.recompute import feed_series

log = logging.getLogger(__name__)
log.addFilter(RepeatFilter(10.0))

Key = tuple[str, str]

#: Most retained windows one batch's transaction writes (lazy windows).
CHECKPOINT_KEYS = 5000
#: Events published between two turns of the event loop (after a commit).
PUBLISH_SLICE = 256
#: Fewest accepted observations a batch needs to be cut into lanes.
LANE_MIN = 1000
#: Most state rows the worker remembers to skip reading them back (lazy mode,
#: and on a shared store: see ``_load_windows``).
MAX_CACHED_ROWS = 1_000_000


# counted inside a transaction attempt; rolled back with it
_ATTEMPT_COUNTERS = (
    "windows_saved",
    "merged",
    "duplicates",
    "identities_formed",
    "identities_merged",
    "identities_unmerged",
    "state_changes",
    "multi_actor_fired",
)


#: An event to publish after the commit: ``(topic, payload, event_type)``,
#: the payload a dict, or on a bus taking them (``Bus.wire_events``) the
#: whole envelope's JSON bytes.
Outgoing = tuple[str, dict[str, Any] | bytes, str]


def lane_of(owner: str, lanes: int) -> int:
    """The lane of an identity (or of an attacker the worker has not seen)."""
    return zlib.crc32(owner.encode()) % lanes


class _AttemptStats:
    """The worker's counters as one transaction attempt sees them: the
    ones an attempt counts (``_ATTEMPT_COUNTERS``) go to the attempt, and
    reach the worker's counters only when it commits (:meth:`commit`);
    everything else goes straight through."""

    __slots__ = ("delta", "real")

    def __init__(self, real: WorkerStats) -> None:
        object.__setattr__(self, "real", real)
        object.__setattr__(self, "delta", dict.fromkeys(_ATTEMPT_COUNTERS, 0))

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.real, name)
        if name in self.delta:
            return value + self.delta[name]
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.delta:
            self.delta[name] = value - getattr(self.real, name)
        else:
            setattr(self.real, name, value)

    def commit(self) -> None:
        for name, n in self.delta.items():
            if n:
                setattr(self.real, name, getattr(self.real, name) + n)


class _Claim:
    """The identities one transaction attempt holds in the worker's engine
    (shared store): no other transaction of the worker merges into them
    until ``done`` is resolved, as the attempt ends."""

    __slots__ = ("done", "identities")

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.identities: list[str] = []


class _Busy(StoreConflict):
    """Another transaction of this worker holds identities this one needs:
    roll back (holding no lock while waiting), wait for it, run again."""

    def __init__(self, waits: list[asyncio.Future[None]]) -> None:
        super().__init__("identities held by another transaction of this worker")
        self.waits = waits


#: The claim of the running task's transaction attempt.
_CLAIM: contextvars.ContextVar[_Claim | None] = contextvars.ContextVar(
    "attribution_claim", default=None
)

#: The attempt the running task's transaction is (each batch's, and each
#: lane's, runs in a task of its own).
_ATTEMPT: contextvars.ContextVar[_AttemptStats | None] = contextvars.ContextVar(
    "attribution_attempt", default=None
)

#: An identity's flagged primitives and its fired signature (see
#: ``AttributionWorker._multi_actor``), identity -> primitives each.
_MultiActorKnown = tuple[dict[str, list[str]], dict[str, list[str]]]
#: A state row of an identity with a multi-actor row before or after a
#: batch (``StateWrite.multi``): identity, primitive, state, state before.
_MultiRow = tuple[str, str, str, "str | None"]


def _with_batch(
    known: _MultiActorKnown, identities: set[str], rows: list[_MultiRow]
) -> _MultiActorKnown:
    """``known`` (read before the batch) with the batch's state rows applied:
    a key the batch wrote is flagged as its new row says."""
    flagged_before, fired = known
    flagged = {i: set(flagged_before.get(i, ())) for i in identities}
    for ident, prim, state, _before in rows:
        prims = flagged.get(ident)
        if prims is None:
            continue
        if state == "multi_actor":
            prims.add(prim)
        else:
            prims.discard(prim)
    return {i: sorted(p) for i, p in flagged.items()}, fired


def _printable(text: str) -> str:
    """Text a store can hold: PostgreSQL refuses NUL."""
    return text.replace("\x00", "\\u0000")


@dataclass
class _Batch:
    deliveries: list[Delivery]
    valid: ValidatedBatch | None  # the accepted observations
    dead: list[DeadLetter]
    size: int = 0  # observations received (accepted, refused and duplicates)
    # pipelined store: resolved once the batch's COMMIT is queued (the next
    # batch may begin), see AttributionWorker._finish
    committed: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Prepared:
    """A fetch ready for the validator (see :meth:`AttributionWorker._prepare`)."""

    deliveries: list[Delivery]
    lines: list[bytes]
    body: bytes
    envelopes: list[tuple[str | None, str | None]]
    origin: list[tuple[int, str, str]]  # (delivery, topic, event id) per line
    refused: list[tuple[int, DeadLetter]]  # kept in delivery order
    now: float


def _dead(topic: str, reason: str, payload: str, event_id: str, now: float) -> DeadLetter:
    return DeadLetter(
        topic=_printable(topic),
        reason=_printable(reason),
        payload_json=_printable(payload),
        event_id=_printable(event_id[:200]),
        received_at=now,
    )


class AttributionWorker:
    """See the module docstring. ``start()`` spawns the tasks; ``stop()``
    finishes the batch in hand, then stops (the process keeps running)."""

    def __init__(
        self, settings: Settings, bus: Bus, store: Store, *, engine: Engine | None = None
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.thresholds = settings.make_thresholds()
        self.engine = engine or Engine(self.thresholds, max_value_bytes=settings.max_value_bytes)
        self._stats = WorkerStats()
        self.shared = settings.shared_store
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._consumers: list[asyncio.Task[None]] = []
        self._consumer_done = asyncio.Event()
        # Set while no batch is building its transaction on the loop: a
        # committed batch publishes its events once the next one has queued
        # all its writes (the store's writer then runs them meanwhile)
        self._queued = asyncio.Event()
        self._queued.set()
        # the next batch, validated and waiting for the one in hand to commit:
        # resolved when it begins its transaction
        self._next_begun: asyncio.Future[None] | None = None
        # the batches whose transaction is in flight: id -> (generation, keys)
        self._inflight: dict[int, tuple[int, list[Key]]] = {}
        # bumped when a failed transaction doomed those in flight
        self._generation = 0
        # the COMMIT the next batch's reads of committed rows wait for (this
        # batch wrote what the worker keeps no copy of: multi-actor flags, a
        # roll-up's rows), and whether the batch being built sets it
        self._barrier: asyncio.Future[None] | None = None
        self._needs_barrier = False
        # pipelined: the multi-actor flags and signatures this worker wrote
        # (in flight or committed), over what the committed reads return
        self._flags: dict[str, dict[str, bool]] = {}  # identity -> primitive -> flagged
        self._fired: dict[str, list[str] | None] = {}  # identity -> signature (None: re-armed)
        #: Awaited before each batch is built: ``serve`` lets the sensors'
        #: requests go first while the ingest journal has room
        #: (``server.routes.ingest.IngestFirst``).
        self.before_batch: Callable[[], Awaitable[None]] | None = None
        self._running = False
        #: The defect that stopped the worker (None: none).
        self.failure: Exception | None = None
        self.last_heartbeat = 0.0  # monotonic time of the last loop turn
        self._attackers_by_identity: OrderedDict[str, set[str]] = OrderedDict()
        # attacker → identity as last seen committed (a hint: rows are
        # re-pointed if the store says otherwise)
        self._identity_cache: dict[str, str] = {}
        # shared store: identity -> end of the transaction that holds it
        self._busy: dict[str, asyncio.Future[None]] = {}
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        # Retained windows written lazily (single-writer store)
        self.lazy = store.lazy_windows and not self.shared
        # lazy mode: per key the engine holds, what the state row last
        # written says (the next row builds on it without reading it back),
        # and the keys whose windows wait to be written, oldest first
        self._states = StateTable(value_kind_for)
        self._event_seq = 0
        # attackers sharing fingerprints roll up into one identity
        self.rollup = (
            IdentityRollup(self, settings.cluster_config().make()) if settings.clustering else None
        )

    @property
    def stats(self) -> WorkerStats:
        """The worker's counters; inside a transaction attempt, as that
        attempt sees them (what it counted is added once it commits)."""
        attempt = _ATTEMPT.get()
        if attempt is not None and attempt.real is self._stats:
            return attempt  # type: ignore[return-value]
        return self._stats

    @property
    def pipelined(self) -> bool:
        """Batch transactions overlap: the next one is built while the store's
        writer commits this one (the single-writer store; its reads of
        committed rows come from another connection, overlaid with what the
        worker holds of the transactions in flight: the state rows, the
        identities)."""
        return self.lazy and bool(getattr(self.store, "pipelined", False))

    def _handover(self, batch: _Batch, done: asyncio.Future[None]) -> None:
        """The batch's COMMIT is queued: the next batch may begin."""
        if self._needs_barrier:
            self._barrier = done
            self._needs_barrier = False
        fut = batch.committed
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _drop_inflight(self) -> None:
        """A failed transaction doomed every one in flight: forget what they
        changed in memory (they load from the store again)."""
        self._generation += 1
        for _gen, keys in self._inflight.values():
            self._evict(keys)
        self._inflight.clear()
        self._identity_cache.clear()
        self._flags.clear()
        self._fired.clear()
        self._barrier = None
        self._needs_barrier = False

    async def _publish(self, events: list[Outgoing]) -> None:
        """Publish after a commit; never raises. A slice at a time, letting
        the loop run between slices (the next batch's transaction goes on
        meanwhile). Event ids are this worker's prefix plus a counter:
        unique, and much cheaper than a uuid4 each."""
        prefix = self._id_prefix
        for start in range(0, len(events), PUBLISH_SLICE):
            chunk = events[start : start + PUBLISH_SLICE]
            seq = self._event_seq
            self._event_seq += len(chunk)
            try:
                self.stats.published += await self.bus.publish_many(
                    [(t, p, e, f"{prefix}{seq + i:x}") for i, (t, p, e) in enumerate(chunk, 1)]
                )
            except Exception as exc:  # a publish must not fail the committed batch
                log.warning("publishing %d events failed: %s", len(chunk), exc)
            if start + PUBLISH_SLICE < len(events):
                await asyncio.sleep(0)

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running and not self._consumer_done.is_set()

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._stop.clear()
        self._consumer_done.clear()
        self.last_heartbeat = time.monotonic()
        if self.rollup is not None and not len(self.rollup.clusterer):
            await self.rollup.load(self.store)
        if self.pipelined:
            self.store.on_failure = self._drop_inflight  # type: ignore[attr-defined]
        await self.merge_pending()
        s = self.settings
        # join the durable group now, so that events published as soon as
        # start() returns are ours (the in-process bus only queues durable
        # events for groups that exist)
        # DECNET's events (and unpartitioned API batches), then one consumer
        # per owned ingest partition
        sources = [(OBSERVATION_PATTERN, s.durable_name)] + [
            (ingest_partition(k), f"{s.durable_name}-p{k}") for k in s.owned_partitions()
        ]
        consumers: list[asyncio.Task[None]] = []
        for subject, durable in sources:
            first: Any = None
            with contextlib.suppress(BusError, RuntimeError):
                first = self.bus.durable_consumer(subject, durable=durable)
            consumers.append(
                asyncio.create_task(
                    self._consume_loop(subject, durable, first), name=f"attribution-{durable}"
                )
            )
        self._consumers = consumers
        self._tasks = [
            *consumers,
            asyncio.create_task(self._observed_loop(), name="attribution-observed"),
            asyncio.create_task(self._tick_loop(), name="attribution-multi-actor-tick"),
            asyncio.create_task(self._retention_loop(), name="attribution-retention"),
            asyncio.create_task(
                run_health_heartbeat(
                    self.bus, s.worker_name, interval=s.heartbeat_interval, extra=self.health
                ),
                name="attribution-heartbeat",
            ),
            asyncio.create_task(
                run_control_listener(self.bus, s.worker_name, self._stop),
                name="attribution-control",
            ),
        ]
        log.info("attribution worker started (%s store, %s bus)", self.store.dialect, self.bus.name)

    async def stop(self, timeout: float = 10.0) -> None:
        """Drain: the batch in hand is committed and acked, then tasks end."""
        if not self._running:
            return
        self._stop.set()
        if self._consumers:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(
                    asyncio.shield(asyncio.gather(*self._consumers, return_exceptions=True)),
                    timeout,
                )
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        self._consumers = []
        self._running = False
        try:
            await self.checkpoint_all()
        except (StoreError, OSError) as exc:  # replayed from the observations at the next start
            log.warning("could not write the pending windows at stop: %s", exc)
        log.info("attribution worker stopped")

    async def wait_stopped(self) -> None:
        """Until a control ``stop`` (or :meth:`stop`) ends the consumer."""
        await self._stop.wait()

    def health(self) -> dict[str, Any]:
        st = self.stats
        bus = self.bus.stats()
        return {
            "received": st.received,
            "merged": st.merged,
            "rejected": st.rejected,
            "duplicates": st.duplicates,
            "dropped": bus.get("dropped", 0),
            "reconnects": bus.get("reconnects", 0),
            "lag": round(st.lag_seconds, 3),
            "batches": st.batches,
            "batch_failures": st.batch_failures,
            "keys": len(self.engine),
            "running": self.running,
        }

    # ---- the consumer ------------------------------------------------------------------
    async def _consume_loop(self, subject: str, durable: str, first: Any = None) -> None:
        backoff = 0.2
        try:
            while not self._stop.is_set():
                try:
                    consumer = first or self.bus.durable_consumer(subject, durable=durable)
                    first = None
                except (BusError, RuntimeError) as exc:
                    log.warning("cannot open the observation stream (%s); retrying", exc)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                try:
                    async with consumer:
                        backoff = 0.2
                        await self._drain(consumer)
                except (BusError, RuntimeError) as exc:
                    if self._stop.is_set():
                        break
                    log.warning("observation stream ended (%s); reconnecting", exc)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        except Exception as exc:
            # Neither the data's (refused before it gets this far) nor the
            # store's or the bus's (retried above): a defect in this code.
            # Stop the worker, loudly, rather than stay up without a
            # consumer (JetStream and the ingest journal deliver what was not
            # acked again after a restart).
            log.critical(
                "observation consumer %s failed, the worker stops: %r", durable, exc, exc_info=True
            )
            self.failure = exc
            self._stop.set()
        finally:
            if subject == OBSERVATION_PATTERN:
                self._consumer_done.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _drain(self, consumer: Any) -> None:
        """Fetch and validate the next batch while the previous one is being
        committed (the store works on its own thread or server meanwhile),
        and start the next transaction while the previous batch's events are
        being acked and published. Commits stay strictly one after the
        other, in arrival order, and so do the publications."""
        inflight: asyncio.Task[None] | None = None
        committed: asyncio.Future[None] | None = None
        try:
            while not self._stop.is_set():
                self.last_heartbeat = time.monotonic()
                msgs = await self._fill(consumer)
                if not msgs:
                    if inflight is not None:
                        await inflight
                        inflight = committed = None
                    continue
                for group in self._groups(msgs):
                    batch = await self._check_off_loop(group)
                    loop = asyncio.get_running_loop()
                    begun = self._next_begun = loop.create_future()
                    try:
                        if committed is not None:
                            await asyncio.shield(committed)
                        committed = loop.create_future()
                        inflight = asyncio.create_task(
                            self._finish(batch, committed, inflight, begun)
                        )
                    except BaseException:
                        if not begun.done():
                            begun.set_result(None)  # nobody waits for it
                        self._next_begun = None
                        raise
        finally:
            if inflight is not None:
                await asyncio.shield(inflight)

    def _groups(self, msgs: list[Delivery]) -> list[list[Delivery]]:
        """Deliveries cut into micro-batches of at most ``batch_max``
        observations (an API batch counts for its items; one delivery is
        never split)."""
        limit = self.settings.batch_max
        groups: list[list[Delivery]] = [[]]
        size = 0
        for d in msgs:
            ev = d.event
            n = 1
            if is_observation_batch(ev.topic) and isinstance(ev.payload, dict):
                count = ev.payload.get("count")
                n = count if isinstance(count, int) and count > 0 else 1
            if groups[-1] and size + n > limit:
                groups.append([])
                size = 0
            groups[-1].append(d)
            size += n
        return groups

    async def _fill(self, consumer: Any) -> list[Delivery]:
        s = self.settings
        msgs: list[Delivery] = await consumer.fetch(s.batch_max, timeout=0.5)
        if msgs:
            if len(msgs) < s.batch_max and s.batch_delay > 0:
                deadline = time.monotonic() + s.batch_delay
                while len(msgs) < s.batch_max:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    more = await consumer.fetch(s.batch_max - len(msgs), timeout=left)
                    if not more:
                        break
                    msgs.extend(more)
        return msgs

    # ---- one batch ---------------------------------------------------------------------
    async def process(self, deliveries: list[Delivery]) -> None:
        """Validate, store and merge one micro-batch; ack after the commit."""
        await self._finish(self._check(deliveries))

    async def _finish(
        self,
        batch: _Batch,
        committed: asyncio.Future[None] | None = None,
        previous: asyncio.Task[None] | None = None,
        begun: asyncio.Future[None] | None = None,
    ) -> None:
        """Commit one batch, then ack and publish. ``committed`` is resolved as
        soon as the transaction is over (committed or not), so the next batch
        can start its own; ``previous`` (the task of the batch before) is
        awaited before this one's acks and events go out, which keeps the
        publications in commit order; ``begun`` is resolved as this batch
        begins (see :attr:`_next_begun`)."""
        deliveries = batch.deliveries
        failure: Exception | None = None
        published: list[Outgoing] = []
        if begun is not None:
            if not begun.done():
                begun.set_result(None)
            if self._next_begun is begun:
                self._next_begun = None
        self._queued.clear()
        batch.committed = committed
        try:
            published, failure = await self._commit_lanes(batch)
        finally:
            self._queued.set()
            if committed is not None and not committed.done():
                committed.set_result(None)
        if previous is not None:
            await asyncio.shield(previous)
        if published and self.lazy:
            # the next batch, if one is ready, builds its transaction first:
            # its writes (deferred on the store's writer) then keep the
            # writer busy while these events go out (the loop runs one thing
            # at a time). Not on a shared store, whose statements are awaited
            # one by one: the events would wait for a whole transaction.
            if (after := self._next_begun) is not None:
                await asyncio.shield(after)
            await self._queued.wait()
        if failure is not None:
            log.warning("batch of %d failed (%s); redelivering later", len(deliveries), failure)
            for d in deliveries:
                with contextlib.suppress(Exception):
                    await d.nak(delay=1.0)
            # the lanes that did commit (their items come back as duplicates)
            await self._publish(published)
            return
        for d in deliveries:
            await d.ack()
        await self._publish(published)

    def _lanes(self, batch: _Batch) -> list[_Batch]:
        """A large batch on a shared store cut by identity into
        ``worker_lanes`` transactions that run side by side (one builds its
        rows while the server writes another's); dead letters go with the
        first."""
        lanes = self.settings.worker_lanes
        valid = batch.valid
        if lanes <= 1 or not self.shared or valid is None or len(valid) < LANE_MIN:
            return [batch]
        # by identity, as far as the worker knows them (an attacker it has
        # not seen: by itself): two lanes never hold one known identity's
        # keys, so neither builds on what the other has merged and not yet
        # committed
        known = self._identity_cache
        groups: list[list[int]] = [[] for _ in range(lanes)]
        order = valid.by_attacker(None)
        at = 0
        for attacker, n in valid.attacker_runs(order):
            groups[lane_of(known.get(attacker, attacker), lanes)].extend(order[at : at + n])
            at += n
        out: list[_Batch] = []
        for positions in groups:
            if positions:
                first = not out
                out.append(
                    _Batch(
                        batch.deliveries,
                        valid.take(sorted(positions)),
                        batch.dead if first else [],
                        batch.size if first else 0,
                        committed=batch.committed,
                    )
                )
        if not out:
            return [batch]
        return out

    async def _commit_lanes(self, batch: _Batch) -> tuple[list[Outgoing], Exception | None]:
        """The batch's lanes committed side by side: the events of those that
        committed, and the failure of one that did not (or None)."""
        lanes = self._lanes(batch)
        if len(lanes) == 1:
            try:
                return await self._commit_resilient(batch), None
            except (StoreError, OSError) as exc:
                return [], exc
        results = await asyncio.gather(
            *(self._commit_resilient(lane) for lane in lanes), return_exceptions=True
        )
        events: list[Outgoing] = []
        failure: Exception | None = None
        for result in results:
            if isinstance(result, (StoreError, OSError)):
                failure = failure or result
            elif isinstance(result, BaseException):
                raise result
            else:
                events.extend(result)
        return events, failure

    async def _commit_resilient(self, batch: _Batch) -> list[Outgoing]:
        """Commit a batch, retrying transient store failures; a batch the
        store refuses for its data is split in halves until the offending
        observation is alone, and that one becomes a dead letter — one
        hostile event never holds back the others."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._commit(batch)
            except _Busy as busy:
                # rolled back: wait for the other transaction, then again
                # (not a failure: nothing is counted)
                attempt -= 1
                await asyncio.wait(busy.waits)
                continue
            except StoreUnavailable:
                self.stats.batch_failures += 1
                if attempt >= 3 or self._stop.is_set():
                    raise
            except StoreConflict:
                self.stats.batch_failures += 1
                if attempt >= 3 or self._stop.is_set():
                    raise
            except StoreError as exc:
                self.stats.batch_failures += 1
                if self._stop.is_set():
                    raise
                return await self._split(batch, exc)
            await asyncio.sleep(0.05 * attempt)

    async def _split(self, batch: _Batch, exc: StoreError) -> list[Outgoing]:
        valid = batch.valid
        n = len(valid) if valid is not None else 0
        if valid is None or n <= 1:
            dead = list(batch.dead)
            now = time.time()
            for pos in range(n):
                assert valid is not None
                primitive, oid = valid.describe(pos)
                self.stats.rejected += 1
                log.warning("observation %s refused by the store: %s", oid[:128], exc)
                dead.append(
                    _dead(
                        f"attacker.observation.{primitive}",
                        f"store_refused: {str(exc)[:500]}",
                        valid.payload_json(pos),
                        oid,
                        now,
                    )
                )
            return await self._commit(
                _Batch(batch.deliveries, None, dead, committed=batch.committed)
            )
        mid = n // 2
        first = await self._commit_resilient(
            _Batch(
                batch.deliveries,
                valid.take(list(range(mid))),
                batch.dead,
                committed=batch.committed,
            )
        )
        second = await self._commit_resilient(
            _Batch(
                batch.deliveries,
                valid.take(list(range(mid, n))),
                [],
                committed=batch.committed,
            )
        )
        return first + second

    def _check(self, deliveries: list[Delivery]) -> _Batch:
        """Validate a fetch in one pass: DECNET events are re-encoded one line
        each (their topic gives the primitive, their id the fallback id), the
        API's batches go in as they are."""
        prep = self._prepare(deliveries)
        if isinstance(prep, _Batch):
            return prep
        return self._conclude(
            prep, validate(prep.body, self.settings, envelopes=prep.envelopes, ndjson=True)
        )

    async def _check_off_loop(self, deliveries: list[Delivery]) -> _Batch:
        """:meth:`_check`, with the Rust pass of a large fetch on a thread (it
        releases the GIL): the loop meanwhile acks and publishes the batch
        before."""
        prep = self._prepare(deliveries)
        if isinstance(prep, _Batch):
            return prep
        check = functools.partial(
            validate, prep.body, self.settings, envelopes=prep.envelopes, ndjson=True
        )
        if len(prep.body) < OFF_LOOP_BYTES:
            return self._conclude(prep, check())
        return self._conclude(prep, await asyncio.get_running_loop().run_in_executor(None, check))

    def _prepare(self, deliveries: list[Delivery]) -> _Prepared | _Batch:
        """The fetch as NDJSON lines for the validator (or, when nothing is
        left to validate, the finished batch of refusals)."""
        lines: list[bytes] = []
        envelopes: list[tuple[str | None, str | None]] = []
        origin: list[tuple[int, str, str]] = []  # (delivery, topic, event id) per line
        refused: list[tuple[int, DeadLetter]] = []  # kept in delivery order
        now = time.time()
        for pos, d in enumerate(deliveries):
            ev = d.event
            if d.redelivered:
                self.stats.redelivered += 1
            payload = ev.payload
            if is_observation_batch(ev.topic):
                text = payload.get("ndjson") if isinstance(payload, dict) else None
                if not isinstance(text, str):
                    reason = "batch without ndjson"
                    refused.append(
                        (pos, self._refuse(ev.topic, ev.id, "not_object", reason, payload, now))
                    )
                    continue
                part = ndjson_lines(text.encode())  # the items, as the validator counts them
                lines.extend(part)
                envelopes.extend([(None, None)] * len(part))
                origin.extend([(pos, ev.topic, ev.id)] * len(part))
                continue
            primitive = primitive_from_topic(ev.topic)
            if primitive is None:
                reason = f"topic {ev.topic[:200]!r} is not attacker.observation.<primitive>"
                refused.append(
                    (pos, self._refuse(ev.topic, ev.id, "bad_primitive", reason, payload, now))
                )
                continue
            if isinstance(payload, dict) and UNDECODABLE in payload:
                reason = f"undecodable message: {payload.get('error', '?')}"
                refused.append(
                    (pos, self._refuse(ev.topic, ev.id, "invalid_json", reason, payload, now))
                )
                continue
            try:
                lines.append(orjson.dumps(payload))
            except (TypeError, orjson.JSONEncodeError) as exc:
                refused.append(
                    (pos, self._refuse(ev.topic, ev.id, "invalid_json", str(exc), payload, now))
                )
                continue
            envelopes.append((primitive, str(ev.id)))
            origin.append((pos, ev.topic, str(ev.id)))
        size = len(lines) + len(refused)
        self.stats.received += size
        if not lines:
            return _Batch(deliveries, None, [d for _, d in refused], size)
        return _Prepared(deliveries, lines, b"\n".join(lines), envelopes, origin, refused, now)

    def _conclude(self, prep: _Prepared, valid: ValidatedBatch) -> _Batch:
        lines, origin, refused, now = prep.lines, prep.origin, prep.refused, prep.now
        size = len(lines) + len(refused)
        for index, code, reason in valid.rejected:
            if code == "duplicate":
                self.stats.duplicates += 1
                continue
            pos, topic, eid = origin[index]
            line = lines[index].decode("utf-8", "replace")
            refused.append((pos, self._refuse(topic, eid, code, reason, line, now)))
        refused.sort(key=lambda r: r[0])
        return _Batch(prep.deliveries, valid, [d for _, d in refused], size)

    def _refuse(
        self, topic: str, event_id: str, code: str, reason: str, payload: Any, now: float
    ) -> DeadLetter:
        self.stats.rejected += 1
        log.warning(
            "rejected observation event %s on %s: %s: %s", event_id, topic[:200], code, reason
        )
        if isinstance(payload, str):
            body = payload
        else:
            try:
                body = orjson.dumps(payload).decode()
            except (TypeError, orjson.JSONEncodeError):
                body = repr(payload)
        return _dead(topic, f"{code}: {reason}", body, str(event_id), now)

    async def _commit(self, batch: _Batch) -> list[Outgoing]:
        t0 = time.perf_counter()
        now = time.time()
        touched: list[Key] = []
        # what this attempt counts is its own until it commits (transactions
        # of other batches, or lanes of this one, count meanwhile)
        attempt = _AttemptStats(self._stats)
        token = _ATTEMPT.set(attempt)
        claim = _Claim() if self.shared else None
        claim_token = _CLAIM.set(claim)
        # the failures seen when this attempt took the writer (see _drop_inflight)
        generation: int | None = None
        if self.before_batch is not None:
            await self.before_batch()
        pipelined = self.pipelined
        try:
            async with (
                self.store.transaction(  # type: ignore[call-arg]
                    functools.partial(self._handover, batch)
                )
                if pipelined
                else self.store.transaction()
            ) as tx:
                # from here until the handover no other batch runs
                generation = self._generation
                if pipelined:
                    if (barrier := self._barrier) is not None and not barrier.done():
                        await asyncio.wait([barrier])
                    self._inflight[id(touched)] = (generation, touched)
                    self._needs_barrier = False
                if batch.dead:
                    await tx.insert_dead_letters(batch.dead)
                events = await self._merge_in_tx(tx, batch.valid, now, touched)
                self._queued.set()  # what is left is the writer's: the COMMIT
        except BaseException:
            # the engine may hold merges the store never committed (unless a
            # failure before has already dropped everything in flight); the
            # attempt's counts go with it
            if generation is None or generation == self._generation:
                self._evict(touched)
                if pipelined:  # nothing else is in flight: read committed again
                    self._identity_cache.clear()
                    self._flags.clear()
                    self._fired.clear()
            raise
        finally:
            self._inflight.pop(id(touched), None)
            _ATTEMPT.reset(token)
            _CLAIM.reset(claim_token)
            if claim is not None:
                self._release(claim)
        attempt.commit()
        self.stats.dead_lettered += len(batch.dead)
        self.stats.batches += 1
        if batch.size:
            self.stats.batch_size.observe(batch.size)
        self.stats.merge_seconds.observe(time.perf_counter() - t0)
        self.stats.last_batch_at = now
        newest = batch.valid.max_ts() if batch.valid is not None else None
        if newest is not None:
            self.stats.lag_seconds = max(0.0, now - newest)
        return events

    def claim(self, identities: Iterable[str]) -> None:
        """Hold ``identities`` for the running transaction (shared store):
        transactions of this worker run side by side (lanes, partitions)
        and share its engine, so one must not build on another's merges of
        an identity before they commit (if that one then failed and ran
        again, its observations would count twice). Raises :class:`_Busy`
        when another holds one of them."""
        claim = _CLAIM.get()
        if claim is None:
            return
        busy = self._busy
        waits = {
            id(f): f for i in identities if (f := busy.get(i)) is not None and f is not claim.done
        }
        if waits:
            raise _Busy(list(waits.values()))
        for i in identities:
            if i not in busy:
                busy[i] = claim.done
                claim.identities.append(i)

    def _release(self, claim: _Claim) -> None:
        busy = self._busy
        for i in claim.identities:
            if busy.get(i) is claim.done:
                del busy[i]
        claim.done.set_result(None)

    async def _merge_in_tx(
        self,
        tx: Tx,
        valid: ValidatedBatch | None,
        now: float,
        touched: list[Key],
        *,
        already_stored: bool = False,
        identities: dict[str, str] | None = None,
    ) -> list[Outgoing]:
        """Everything of one batch inside the transaction. Returns the events
        to publish after the commit. ``touched`` is filled with the engine
        keys as soon as they may have changed (for eviction on failure);
        ``identities`` (if given) with attacker → identity."""
        if valid is None or not len(valid):
            return []
        events: list[Outgoing] = []
        attackers = valid.attackers()
        await tx.ensure_attackers(attackers)
        if self.pipelined:
            identity_of, formed = await tx.form_identities(
                [a for a, _ip, _ts in attackers], self._identity_cache, now
            )
        else:
            identity_of, formed = await tx.ensure_identities([a for a, _ip, _ts in attackers], now)
        self.claim(identity_of.values())
        if len(self._identity_cache) > 200_000:
            self._identity_cache.clear()
            self._needs_barrier = True  # identities in flight are read again
        self._identity_cache.update(identity_of)
        if identities is not None:
            identities.update(identity_of)
        formed_set = set(formed)
        for a, ident in identity_of.items():
            if ident in formed_set:
                events.append(
                    (
                        IDENTITY_FORMED,
                        {"identity_uuid": ident, "attacker_uuid": a, "ts": now},
                        "formed",
                    )
                )
                self.stats.identities_formed += 1
        # the engine holds the batch's keys before their new observations are
        # stored: a key loaded from a lazily written window replays the
        # stored observations its window does not cover, and this batch's
        # must not be among them
        known: _MultiActorKnown | None = None
        if self.lazy:
            # read now, before this batch's writes are queued on the writer
            # (a read after them would wait until they have all run), and,
            # pipelined, while the keys load: the reads go to another
            # connection
            idents = sorted(set(identity_of.values()))
            # (an identity this transaction forms has no flags or signature yet)
            stored = [i for i in idents if i not in formed_set] if formed_set else idents
            reads = tx.committed_reads()
            both = asyncio.gather(
                reads.multi_actor_primitives(stored), reads.multi_actor_signatures(stored)
            )
            try:
                prior = await self._load_windows(tx, valid.keys(identity_of), touched, formed_set)
            finally:
                flagged, fired = await both
            known = (flagged, fired)
            if self.pipelined:
                known = self._overlaid(idents, known)
        else:
            prior = await self._load_windows(tx, valid.keys(identity_of), touched, formed_set)
        if already_stored:
            new_pos = list(range(len(valid)))
        else:
            new_pos = await tx.insert_validated(valid, identity_of)
            self.stats.duplicates += len(valid) - len(new_pos)
        if not new_pos:
            return events
        for a, _ip, _ts in valid.attackers(new_pos):
            owner = identity_of.get(a)
            if owner is not None:
                self._note_attacker(owner, a)
        result = self.engine.ingest_validated(valid, identity_of, new_pos)
        if result.errors:
            # the validator accepts only what the engine merges, so this is a
            # defect; the rollback keeps the store consistent
            raise StoreError(
                f"engine rejected {len(result.errors)} checked observations: {result.errors[0].reason}"
            )
        self.stats.merged += len(new_pos)
        events.extend(await self._write_states(tx, result, prior, now, known))
        if self.rollup is not None:
            before = len(touched)
            events.extend(await self.rollup.apply(tx, valid, new_pos, now, touched))
            if len(touched) > before:
                # a roll-up rewrote rows the worker keeps no copy of
                self._needs_barrier = True
        if self.lazy and self._states.pending:
            await self._checkpoint(tx, now, touched)
        return events

    def _overlaid(self, idents: list[str], known: _MultiActorKnown) -> _MultiActorKnown:
        """Committed multi-actor flags and signatures with this worker's own
        writes (some maybe still in flight) applied."""
        flagged, fired = known
        flags, signatures = self._flags, self._fired
        for ident in idents:
            mine = flags.get(ident)
            if mine:
                prims = set(flagged.get(ident, ()))
                for p, on in mine.items():
                    if on:
                        prims.add(p)
                    else:
                        prims.discard(p)
                flagged[ident] = sorted(prims)
            if ident in signatures:
                sig = signatures[ident]
                if sig is None:
                    fired.pop(ident, None)
                else:
                    fired[ident] = sig
        return flagged, fired

    async def _checkpoint(
        self, tx: Tx, now: float, touched: list[Key], *, everything: bool = False
    ) -> None:
        """Write the retained windows of keys changed at least
        ``window_checkpoint`` seconds ago (at most ``CHECKPOINT_KEYS`` per
        batch; all of them with ``everything``), inside the batch's
        transaction: a key merged many times in between is written once."""
        if everything:
            keys = self._states.take_pending()
        else:
            keys = self._states.take_pending(now - self.settings.window_checkpoint, CHECKPOINT_KEYS)
        if not keys:
            return
        # if the transaction does not commit, these keys are evicted with the
        # batch's (touched): they reload from the store, window plus replay
        touched.extend(keys)
        # pipelined: the newest seq as the writer runs this (a read would wait)
        seq = None if self.pipelined else await tx.max_observation_seq()
        await tx.save_windows_of(self.engine, keys, seq)
        self.stats.windows_saved += len(keys)

    async def checkpoint_all(self) -> None:
        """Write every pending window now (a graceful stop; before pruning)."""
        if not (self.lazy and self._states.pending):
            return
        touched: list[Key] = []
        try:
            async with self.store.transaction() as tx:
                await self._checkpoint(tx, time.time(), touched, everything=True)
        except BaseException:
            self._evict(touched)
            raise

    def _evict(self, keys: list[Key]) -> None:
        """Forget keys whose stored rows may differ from memory (a batch that
        did not commit): they load from the store again."""
        self.engine.evict(keys)
        self._states.forget(keys)

    # ---- retention -------------------------------------------------------------------
    async def prune_once(self, now: float | None = None) -> int:
        """Note a retention mark, then (with ``retention`` set) delete the
        stored observations older than the horizon, in bulk. Lazily written
        windows that do not cover the cut yet are brought up to date first,
        so no key ever needs a pruned observation. Returns how many went."""
        now = time.time() if now is None else now
        await self.store.mark_observations(now)
        if self.settings.retention <= 0:
            return 0
        cut = await self.store.retention_cut(now - self.settings.retention)
        if cut <= 0:
            return 0
        if self.lazy:
            await self.checkpoint_all()
            while keys := await self.store.stale_window_keys(cut, CHECKPOINT_KEYS):
                await self._save_current_windows(keys)
        deleted = await self.store.prune_observations(cut)
        self.stats.pruned += deleted
        if deleted:
            log.info("retention: pruned %d observations up to seq %d", deleted, cut)
        return deleted

    async def _save_current_windows(self, keys: list[Key]) -> None:
        touched: list[Key] = []
        try:
            async with self.store.transaction() as tx:
                await self._load_windows(tx, keys, touched)
                seq = await tx.max_observation_seq()
                await tx.save_windows_of(self.engine, keys, seq)
        except BaseException:
            self._evict(touched)
            raise
        self._states.settle(keys)

    async def _retention_loop(self) -> None:
        while not self._stop.is_set():
            await self._sleep(self.settings.retention_interval)
            if self._stop.is_set():
                return
            try:
                await self.prune_once()
            except Exception as exc:  # pruning must never kill the worker
                log.warning("retention pass failed: %s", exc)

    async def _load_windows(
        self, tx: Tx, keys: list[Key], touched: list[Key], formed: AbstractSet[str] = frozenset()
    ) -> dict[Key, StateRow]:
        """The stored state rows of the batch's keys that must be read (only
        those of keys the worker holds no row of, see ``_states``; never
        those of identities ``formed`` by this transaction, which nothing
        can have written rows of yet); makes the engine hold exactly the
        stored windows for them.

        On a shared store the rows read are locked, and the engine drops
        what it held of them. A key whose row this worker wrote last (held,
        and its window in the engine) is not read back: its next row is
        written only over that version (``Tx.write_states``), so if another
        worker or a roll-up changed it meanwhile the batch fails with
        ``StoreConflict``, its keys are forgotten, and it runs again on the
        rows as they are."""
        touched.extend(keys)
        if self.lazy:
            # the single writer knows the rows it wrote: read only the others
            # (pipelined, these are read committed: a key written by a
            # transaction in flight is held)
            missing = self._states.missing(keys)
            if formed:
                missing = [k for k in missing if k[0] not in formed]
            prior = await tx.committed_reads().load_states(missing) if missing else {}
            refresh = self.engine.missing(keys)
        elif self.shared:
            held = set(keys).difference(self._states.missing(keys), self.engine.missing(keys))
            refresh = [k for k in keys if k not in held] if held else keys
            self._states.forget(refresh)  # the rows read are what they build on
            wanted = [k for k in refresh if k[0] not in formed] if formed else refresh
            prior = await tx.load_states(wanted, lock=True) if wanted else {}
        else:
            wanted = [k for k in keys if k[0] not in formed] if formed else keys
            prior = await tx.load_states(wanted) if wanted else {}
            refresh = self.engine.missing(keys)
        if not refresh:
            return prior
        if self.shared:
            self.engine.evict(refresh)
        windows: list[str] = []
        rebuild: list[Key] = []
        replay: dict[Key, int] = {}
        for k in refresh:
            row = prior.get(k)
            if row is None:
                if self.lazy and k in self._states:
                    rebuild.append(k)  # written by this worker, no window at hand
                continue
            if row.window_seq is not None:
                replay[k] = row.window_seq  # the window stops there (0: none yet)
            if row.window_json:
                windows.append(row.window_json)
            elif row.window_seq is None:
                rebuild.append(k)
        if windows:
            for err in self.engine.import_windows(windows):
                # a window from other thresholds: rebuild the key from its series
                doc = orjson.loads(windows[err.index])
                key = (doc["identity_uuid"], doc["primitive"])
                replay.pop(key, None)
                rebuild.append(key)
        for ident, prim in rebuild:
            await self._rebuild_key(ident, prim)
        for (ident, prim), after in replay.items():
            feed_series(self.engine, ident, prim, await tx.series_after(ident, prim, after))
        return prior

    async def _rebuild_key(self, identity: str, primitive: str) -> None:
        self.engine.evict([(identity, primitive)])
        series = await self.store.recent_values(identity, primitive, 10**9)
        self.engine.ingest(
            [
                {
                    "identity_uuid": identity,
                    "primitive": primitive,
                    "value": o["value"],
                    "ts": o["ts"],
                }
                for o in series
            ]
        )
        log.info("rebuilt %s/%s from %d stored observations", identity, primitive, len(series))

    async def _write_states(
        self,
        tx: Tx,
        result: IngestResult,
        loaded: dict[Key, StateRow],
        now: float,
        known: _MultiActorKnown | None = None,
    ) -> list[Outgoing]:
        """The batch's state rows (built in Rust from the change records,
        each on the row held for its key or ``loaded`` from the store), and
        its state events."""
        lazy = self.lazy
        # a shared store writes every window with its row: the rows are
        # held (not read back next time), their windows not pending
        states = self._states.write(
            result,
            loaded,
            now,
            remember=lazy or self.shared,
            limit=MAX_CACHED_ROWS,
            pending=lazy,
        )
        if states.cleared:
            self._needs_barrier = True  # the rows in flight are read again
        # the rows go to the store first: its writer runs them while the
        # events are built
        if lazy:
            # (their windows are pending now: see StateTable.write)
            await tx.upsert_state_values(states)
        else:
            # a key with no row had nothing to lock: if another worker created
            # its row meanwhile, the store says so and the batch runs again
            await tx.write_states(states, self.engine, loaded)
        attackers = {ident: self._attackers_of(ident) for ident in states.identities()}
        kinds = (
            (ATTRIBUTION_PROFILE_STATE_CHANGED, EVENT_TYPE_STATE_CHANGED),
            (ATTRIBUTION_PROFILE_UPDATED, EVENT_TYPE_PROFILE_UPDATED),
        )
        events: list[Outgoing]
        if self.bus.wire_events:
            # encoded in Rust, envelope and all, with ids of their own
            first = self._event_seq + 1
            self._event_seq += len(states)
            wire, changed = states.wire_events(
                attackers, *kinds, self._id_prefix, first, EVENT_SCHEMA_VERSION
            )
            events = list(wire)
        else:
            made, changed = states.events(attackers, *kinds)
            events = list(made)
        self.stats.state_changes += changed
        multi = states.multi()
        if multi:
            identities = {m[0] for m in multi}
            if self.pipelined:
                self._note_flags(multi)
            if known is not None:
                known = _with_batch(known, identities, multi)
            events.extend(await self._multi_actor(tx, sorted(identities), now, known))
        return events

    def rebuilt_states(
        self, keys: list[Key], loaded: dict[Key, StateRow], now: float
    ) -> StateWrite:
        """The state rows of keys just rebuilt from their observations (the
        engine's current states, each on its ``loaded`` row), by the same
        rules as a batch's rows."""
        return self._states.write_current(self.engine, keys, loaded, now)

    def _note_flags(self, rows: list[_MultiRow]) -> None:
        """Remember the multi-actor flags the batch's rows set or cleared."""
        flags = self._flags
        if len(flags) > MAX_CACHED_ROWS // 10:
            flags.clear()
            self._needs_barrier = True  # the flags in flight are read again
        for ident, prim, state, old in rows:
            on = state == "multi_actor"
            if on or old == "multi_actor":
                flags.setdefault(ident, {})[prim] = on

    # ---- multi-actor (docs/decnet.md#multi-actor, persisted) ----------------------------
    async def _multi_actor(
        self,
        tx: Tx,
        identities: list[str],
        now: float,
        known: _MultiActorKnown | None = None,
    ) -> list[Outgoing]:
        """Fire (or re-arm) the identities' multi-actor alert. ``known``: the
        flagged primitives and fired signatures as they stand in this
        transaction, when the caller has them (else they are read)."""
        need = self.thresholds.multi_actor_min_primitives
        if known is not None:
            flagged, fired = known
        else:
            flagged = await tx.multi_actor_primitives(identities)
            fired = await tx.multi_actor_signatures(identities, lock=self.shared)
        events: list[Outgoing] = []
        for ident in identities:
            prims = sorted(flagged.get(ident, []))
            last = fired.get(ident)
            if len(prims) < need:
                if last is not None:
                    await tx.set_multi_actor_signature(ident, None, now)  # re-arm
                    self._note_signature(ident, None)
                continue
            if last is not None and sorted(last) == prims:
                continue
            await tx.set_multi_actor_signature(ident, prims, now)
            self._note_signature(ident, prims)
            self.stats.multi_actor_fired += 1
            events.append(
                (
                    ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED,
                    self._suspicion(ident, prims, now),
                    EVENT_TYPE_MULTI_ACTOR_SUSPECTED,
                )
            )
        return events

    def _note_signature(self, ident: str, prims: list[str] | None) -> None:
        if not self.pipelined:
            return
        if len(self._fired) > MAX_CACHED_ROWS // 10:
            self._fired.clear()
            self._needs_barrier = True  # the signatures in flight are read again
        self._fired[ident] = prims

    def _suspicion(self, ident: str, prims: list[str], now: float) -> dict[str, Any]:
        evidence: dict[str, Any] = {}
        for p in prims:
            ex = self.engine.explain(ident, p)
            if ex is None:
                continue
            recent = ex["window"][-self.thresholds.window_n :]
            evidence[p] = {
                "values": [w["value"] for w in recent],
                "flips": ex["detail"].get("flips"),
                "repeats": ex["detail"].get("repeats"),
                "confidence": ex["state"]["confidence"],
                "rule": ex["rule"],
            }
        return {
            "identity_uuid": ident,
            "primitives": prims,
            "evidence_summary": f"{len(prims)} primitives flagged multi_actor",
            "confidence": self.thresholds.multi_actor_max_confidence,
            "ts": now,
            "attacker_uuids": self._attackers_of(ident),
            "evidence": evidence,
        }

    async def tick_multi_actor(self) -> int:
        """Safety net: fire for any identity the batches missed (e.g. rows
        written by a recompute); returns how many fired."""
        need = self.thresholds.multi_actor_min_primitives
        candidates = await self.store.multi_actor_identities(need)
        if not candidates:
            return 0
        events: list[Outgoing] = []
        now = time.time()
        fired = dict(self._fired)
        try:
            async with self.store.transaction() as tx:
                events = await self._multi_actor(tx, sorted(candidates), now)
        except BaseException:
            self._fired = fired  # what the tick noted did not commit
            raise
        await self._publish(events)
        return len(events)

    async def _tick_loop(self) -> None:
        interval = self.settings.multi_actor_tick
        while not self._stop.is_set():
            await self._sleep(interval)
            if self._stop.is_set():
                return
            try:
                await self.tick_multi_actor()
            except Exception as exc:  # the safety net must never kill the worker
                log.warning("multi-actor tick failed: %s", exc)

    # ---- attackers -------------------------------------------------------------------
    def _note_attacker(self, identity: str, attacker: str) -> None:
        s = self._attackers_by_identity.get(identity)
        if s is None:
            s = self._attackers_by_identity[identity] = set()
            if len(self._attackers_by_identity) > 100_000:
                self._attackers_by_identity.popitem(last=False)
        else:
            self._attackers_by_identity.move_to_end(identity)
        s.add(attacker)

    def _attackers_of(self, identity: str) -> list[str]:
        return sorted(self._attackers_by_identity.get(identity, ()))

    # ---- hooks of the identity roll-up (worker/identities.py) -------------------------
    def set_attackers(self, identity: str, attackers: set[str]) -> None:
        """The identity's attackers changed (a merge or un-merge)."""
        self._attackers_by_identity.pop(identity, None)
        for a in sorted(attackers):
            self._note_attacker(identity, a)
            self._identity_cache[a] = identity

    def forget_dirty(self, keys: list[Key]) -> None:
        """Keys rewritten with complete windows need no lazy write, and their
        rows are read from the store again."""
        self._states.settle(keys)
        self._states.forget(keys)

    async def reevaluate_multi_actor(
        self, tx: Tx, identities: list[str], now: float
    ) -> list[Outgoing]:
        return await self._multi_actor(tx, identities, now)

    async def _observed_loop(self) -> None:
        """``attacker.observed`` events register attackers too."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                async with self.bus.subscribe(ATTACKER_OBSERVED) as sub:
                    backoff = 0.5
                    async for ev in sub:
                        await self._register_observed(ev.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("attacker.observed subscription failed: %s", exc)
            await self._sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _register_observed(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        uuid = payload.get("attacker_uuid") or payload.get("uuid")
        ip = payload.get("attacker_ip") or payload.get("ip")
        ts = payload.get("ts")
        if not isinstance(uuid, str) or not uuid or len(uuid) > 128:
            return
        if ip is not None and not isinstance(ip, str):
            ip = None
        when = (
            float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else time.time()
        )
        try:
            async with self.store.transaction() as tx:
                await tx.ensure_attackers([(uuid, ip, when)])
            self.stats.attackers_observed += 1
        except StoreError as exc:
            log.warning("could not register observed attacker %s: %s", uuid, exc)

    # ---- catch-up ----------------------------------------------------------------------
    async def merge_pending(self, limit: int = 5000) -> int:
        """Merge observations stored but not merged yet (bulk imports, or
        rows written by another tool): docs/decnet.md#recompute."""
        total = 0
        after = 0
        while True:
            rows = await self.store.pending_observations(after_seq=after, limit=limit)
            if not rows:
                return total
            valid = self._revalidate(rows)
            touched: list[Key] = []
            identity_of: dict[str, str] = {}
            now = time.time()
            try:
                async with self.store.transaction() as tx:
                    events = await self._merge_in_tx(
                        tx, valid, now, touched, already_stored=True, identities=identity_of
                    )
                    seqs = [r.seq for r in rows if r.seq is not None]
                    await tx.mark_merged(
                        seqs,
                        {
                            r.seq: identity_of[r.attacker_uuid]
                            for r in rows
                            if r.seq is not None and r.attacker_uuid in identity_of
                        },
                    )
            except BaseException:
                self.engine.evict(touched)
                raise
            await self._publish(events)
            total += len(rows)
            self.stats.pending_merged += len(rows)
            after = max((r.seq or 0) for r in rows)
            log.info("merged %d stored-but-unmerged observations", total)

    def _revalidate(self, rows: list[ObservationRow]) -> ValidatedBatch:
        """Stored rows back through the validator (the engine's input)."""
        lines = [
            orjson.dumps(
                {
                    "attacker_uuid": r.attacker_uuid,
                    "primitive": r.primitive,
                    "value": orjson.Fragment(r.value_json),
                    "ts": r.ts,
                    "id": r.id,
                    "evidence_ref": r.evidence_ref,
                }
            )
            for r in rows
        ]
        valid = validate(b"\n".join(lines), self.settings, ndjson=True)
        if valid.rejected:
            index, code, reason = valid.rejected[0]
            raise StoreError(f"stored observation {rows[index].id} is invalid: {code}: {reason}")
        return valid
