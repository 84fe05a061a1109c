"""``POST /api/v1/observations``: sensors push observation events over HTTP.

The body is a JSON array (or one object) or NDJSON. It is validated in one
Rust pass (:mod:`decnet_attr.observations`, the same validator the worker
uses); the accepted items go to the bus as ONE unit on
``attacker.observation.batch`` (cut into a few messages only when the body
is larger than :data:`BATCH_CHUNK_BYTES`), never one message per
observation; with ingest partitions, one unit per partition the body
touches, on ``attacker.ingest.<k>``. The bus is the only path: the API never writes observations to
the store, the worker does (and acks), so a 202 means *durably accepted*: on the
in-process bus the body is written to the ingest journal (without the
journal: the worker has committed the batch), on NATS JetStream has stored
the message.

Answers: 202 ``{"accepted", "ids", "rejected": [{"index", "code",
"reason"}], "duplicates": [{"index", "id"}]}`` when at least one item was
accepted or was a duplicate of an observation accepted before (a retry,
stored or still waiting to be merged); 422 ``{"detail": [{"index",
"code", "reason"}]}`` when none was; 400 for a body that is not JSON; 413
for a body or a batch too large; 415 for another content type; 503 (+
``Retry-After``) when the bus cannot accept durably right now or the
pipeline is too far behind (the body then lists what was accepted before).
Give every item an ``id``: a retry with the same ids is de-duplicated end
to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any

from aiohttp import web

from decnet_attr._core import Dedupe
from decnet_attr.bus import Bus, BusError, BusPayloadTooLarge
from decnet_attr.config import Settings
from decnet_attr.observations import (
    OFF_LOOP_BYTES,
    InvalidJSONError,
    TooManyItemsError,
    ValidatedBatch,
    validate,
)
from decnet_attr.server.auth import INGEST_ROLES, Principal, require
from decnet_attr.server.errors import (
    JSON_CONTENT_TYPE,
    bad_request,
    json_response,
    payload_too_large,
    service_unavailable,
    unprocessable,
    unsupported_media_type,
)
from decnet_attr.server.keys import (
    BUS,
    COUNTERS,
    DUPLICATES_BY_SENSOR,
    HANDED_OVER,
    INGEST_FIRST,
    SETTINGS,
    STORE,
)
from decnet_attr.store import StoreError
from decnet_attr.topics import EVENT_TYPE_OBSERVATION_BATCH, OBSERVATION_BATCH, ingest_partition

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

ROUTE_NAME = "ingest_observations"
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/ndjson"})
ACCEPTED_TYPES = frozenset({JSON_CONTENT_TYPE}) | NDJSON_TYPES

#: Largest NDJSON handed to the bus in one message (NATS' default
#: max_payload is 1 MiB, and the text is escaped once more in the envelope).
BATCH_CHUNK_BYTES = 384 * 1024

#: Counter (in the app's counters) of observations handed to the bus and not
#: yet acknowledged durable, across requests.
INFLIGHT = "ingest_inflight"


def rejection(index: int, code: str, reason: str) -> dict[str, Any]:
    return {"index": index, "code": code, "reason": reason}


# ---- body handling -------------------------------------------------------------------------
async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refusing (413) more than ``limit`` bytes while reading."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise payload_too_large(f"request body larger than {limit} bytes", limit)
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            raise payload_too_large(f"request body larger than {limit} bytes", limit)
    return bytes(buf)


def _destinations(batch: ValidatedBatch, partitions: int) -> list[tuple[str, list[int]]]:
    """Where the accepted items go: one batch topic, or with ingest
    partitions each attacker's partition subject."""
    if partitions <= 1:
        return [(OBSERVATION_BATCH, list(range(len(batch))))]
    return [
        (ingest_partition(k), positions)
        for k, positions in enumerate(batch.partition(partitions))
        if positions
    ]


def split_for_bus(batch: ValidatedBatch, partitions: int) -> list[tuple[str, list[int], bytes]]:
    """The bus messages for the accepted items: ``(topic, positions,
    NDJSON)`` per destination, cut so that each NDJSON stays under
    :data:`BATCH_CHUNK_BYTES` (each item encoded once, in Rust, without the
    GIL: a large body's parts are made on a thread)."""
    return [
        (topic, chunk, ndjson)
        for topic, positions in _destinations(batch, partitions)
        for chunk, ndjson in batch.ndjson_chunks(BATCH_CHUNK_BYTES, positions)
    ]


def batch_id(ids: list[str]) -> str:
    """A batch's bus id: a digest of its observation ids, so a retried body
    is recognised as a duplicate by the bus (JetStream's duplicate window)
    as well as by the store."""
    h = hashlib.blake2b(digest_size=16)
    for i in ids:
        h.update(i.encode())
        h.update(b"\n")
    return "batch-" + h.hexdigest()


def _check_content_type(request: web.Request) -> str:
    mimetype = request.content_type.lower()
    if mimetype not in ACCEPTED_TYPES:
        raise unsupported_media_type(
            "Unsupported Media Type: expected application/json, application/x-ndjson "
            f"or application/jsonl, got {request.content_type or 'none'}"
        )
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8", "us-ascii"):
        raise unsupported_media_type(f"Unsupported charset {charset[:40]!r}: use utf-8")
    return mimetype


# ---- the route -----------------------------------------------------------------------------
@routes.post("/api/v1/observations", name=ROUTE_NAME)
@require(*INGEST_ROLES)
async def ingest(request: web.Request, principal: Principal) -> web.StreamResponse:
    settings: Settings = request.app[SETTINGS]
    mimetype = _check_content_type(request)
    body = await read_body(request, settings.max_body_bytes)
    checking = request.app[INGEST_FIRST].enter()
    try:
        return await _ingest(request, principal, mimetype, body, checking)
    finally:
        checking.leave()


async def _ingest(
    request: web.Request, principal: Principal, mimetype: str, body: bytes, checking: Checking
) -> web.StreamResponse:
    """:func:`ingest` once the body is read (``checking`` is left as the
    body goes to the bus)."""
    settings: Settings = request.app[SETTINGS]
    counters = request.app[COUNTERS]
    handed = request.app[HANDED_OVER]
    check = functools.partial(
        _check_body,
        handed,
        body,
        settings,
        source=f"api:{principal.username}",
        id_prefix=uuid_mod.uuid4().hex[:24],
    )
    try:
        # the Rust passes release the GIL: a large body is validated (and
        # checked against what was handed over) on a thread while the event
        # loop serves the other clients
        batch, pending = (
            await asyncio.get_running_loop().run_in_executor(None, check)
            if len(body) >= OFF_LOOP_BYTES
            else check()
        )
    except TooManyItemsError as exc:
        raise payload_too_large(str(exc)) from None
    except InvalidJSONError as exc:
        raise bad_request(str(exc)) from None
    rejected = [rejection(i, code, reason) for i, code, reason in batch.rejected]
    if mimetype not in NDJSON_TYPES and body.lstrip()[:1] != b"[":
        # application/json that is not an array: exactly one JSON value
        if batch.items == 0:
            raise bad_request("invalid JSON: the body is empty")
        if batch.items > 1:
            raise bad_request(
                "invalid JSON: more than one JSON value (send NDJSON as application/x-ndjson)"
            )
        if rejected and rejected[0]["code"] == "invalid_json":
            raise bad_request(rejected[0]["reason"])
    if batch.items == 0:
        raise bad_request("empty batch: no observations in the request body")
    if (
        mimetype in NDJSON_TYPES
        and len(rejected) == batch.items
        and all(r["code"] == "invalid_json" for r in rejected)
    ):
        raise bad_request(f"invalid NDJSON: no line is JSON (line 1: {rejected[0]['reason']})")
    _count(counters, "observations_rejected_total", len(rejected))
    if not len(batch):
        raise unprocessable(rejected)
    # observations stored before, or accepted before and not merged yet (a
    # retry, or an id another sensor used): reported as such, not handed
    # over again
    duplicates: list[dict[str, Any]] = []
    try:
        known = await request.app[STORE].stored_positions(batch)
    except StoreError:
        known = []  # the worker's own dedupe still keeps them out
    if pending:
        known = sorted(set(known).union(pending))
    if known:
        ids, indexes = batch.ids, batch.indexes
        duplicates = [{"index": indexes[p], "id": ids[p]} for p in known]
        _count(counters, "observations_duplicate_total", len(known))
        by_sensor = request.app[DUPLICATES_BY_SENSOR]
        by_sensor[principal.username] = by_sensor.get(principal.username, 0) + len(known)
        gone = set(known)
        batch = batch.take([p for p in range(len(batch)) if p not in gone])
        if not len(batch):
            return json_response(
                {"accepted": 0, "ids": [], "rejected": rejected, "duplicates": duplicates},
                status=202,
            )

    # back-pressure: a bound on what is accepted but not merged yet (bodies
    # being handed over, plus what the journal holds unacknowledged), instead
    # of queueing without limit while the worker lags
    inflight = counters.get(INFLIGHT, 0)
    waiting = inflight + request.app[BUS].backlog()
    if waiting and waiting + len(batch) > settings.ingest_queue_max:
        _count(counters, "ingest_backpressure_total", 1)
        raise service_unavailable(
            f"ingest is behind: {waiting} observations are waiting to be merged",
            retry_after=1.0,
            extra={"accepted": 0, "ids": []},
        )
    counters[INFLIGHT] = inflight + len(batch)
    try:
        split = functools.partial(split_for_bus, batch, settings.partitions)
        parts = (
            await asyncio.get_running_loop().run_in_executor(None, split)
            if len(body) >= OFF_LOOP_BYTES
            else split()
        )
        checking.leave()  # the bus may wait for the worker: do not hold it back
        accepted_ids, failure = await hand_over(
            request.app[BUS], batch, settings.partitions, rejected, parts
        )
    finally:
        counters[INFLIGHT] -= len(batch)
    _remember(handed, batch, accepted_ids)
    _count(counters, "observations_accepted_total", len(accepted_ids))
    if failure is not None:
        _count(counters, "ingest_unavailable_total", 1)
        log.warning(
            "ingest by %s: bus unavailable after %d of %d observations: %s",
            principal.username,
            len(accepted_ids),
            len(batch),
            failure,
        )
        raise service_unavailable(
            f"observations cannot be accepted durably right now: {failure}",
            retry_after=1.0,
            extra={"accepted": len(accepted_ids), "ids": accepted_ids},
        )
    rejected.sort(key=lambda r: int(r["index"]))
    if not accepted_ids:
        raise unprocessable(rejected)
    return json_response(
        {
            "accepted": len(accepted_ids),
            "ids": accepted_ids,
            "rejected": rejected,
            "duplicates": duplicates,
        },
        status=202,
    )


def _check_body(
    handed: Dedupe, body: bytes, settings: Settings, *, source: str, id_prefix: str
) -> tuple[ValidatedBatch, list[int]]:
    """The body validated, and the positions of its accepted items that were
    handed over before (accepted, maybe not merged yet)."""
    batch = validate(
        body,
        settings,
        source=source,
        id_prefix=id_prefix,
        api=True,
        max_items=settings.max_batch_items,
    )
    return batch, handed.seen_batch(batch)


class Checking:
    """One body being checked (see :class:`IngestFirst`); :meth:`leave` is
    idempotent."""

    __slots__ = ("_first", "_in")

    def __init__(self, first: IngestFirst) -> None:
        self._first = first
        self._in = True

    def leave(self) -> None:
        if self._in:
            self._in = False
            self._first._leave()


class IngestFirst:
    """Sensors first, while the journal has room. In ``serve`` the API and
    the worker share one event loop, and a worker with a backlog would
    take most of it: each step of a sensor's request (validation on a
    thread, the duplicate check, the hand-over) would wait behind a batch
    being built, and the 202s would come at the merge's pace. So while a
    body is being checked (from the end of its upload to its hand-over),
    the worker waits before building its next batch, at most ``most``
    seconds, unless ``room()`` says what waits to be merged has reached the
    bound (``DECNET_ATTR_INGEST_QUEUE_MAX``): a burst is taken at the
    journal's speed and merged right after it; under a sustained flood the
    worker still builds a batch every ``most`` seconds, and at the bound it
    no longer waits at all (ingest answers 503 there)."""

    def __init__(self, room: Callable[[], bool], most: float = 0.05) -> None:
        self.room = room
        self.most = most
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> Checking:
        self.active += 1
        self._idle.clear()
        return Checking(self)

    def _leave(self) -> None:
        self.active -= 1
        if not self.active:
            self._idle.set()

    async def wait(self) -> None:
        """The worker's turn (awaited before each batch)."""
        if self.active and self.room():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.most)


def _remember(handed: Dedupe, batch: ValidatedBatch, accepted_ids: list[str]) -> None:
    """Note what the bus took. Checked before the hand-over and noted after
    it (no await in between here), so a body the bus refused can be sent
    again; two bodies with the same ids racing each other are both handed
    over, and the worker's exactly-once admission keeps one."""
    if not accepted_ids:
        return
    select = None
    if len(accepted_ids) < len(batch):
        took = set(accepted_ids)
        ids = batch.ids
        select = [p for p in range(len(batch)) if ids[p] in took]
    handed.admit_batch(batch, select)
    handed.commit()


def _count(counters: dict[str, int], name: str, n: int) -> None:
    counters[name] = counters.get(name, 0) + n


async def hand_over(
    bus: Bus,
    batch: ValidatedBatch,
    partitions: int,
    rejected: list[dict[str, Any]],
    parts: list[tuple[str, list[int], bytes]] | None = None,
) -> tuple[list[str], str | None]:
    """Hand the accepted items to the bus: one message per destination and
    chunk (usually one; ``parts``, made by :func:`split_for_bus` when not given);
    stop at the first the bus could not take. Items the bus refuses as too
    large are added to ``rejected``. Returns the accepted ids and the
    failure (None: all accepted)."""
    ids = batch.ids
    indexes = batch.indexes
    accepted: list[str] = []
    if parts is None:
        parts = split_for_bus(batch, partitions)
    for topic, part, ndjson in parts:
        part_ids = [ids[p] for p in part]
        payload = {"ndjson": ndjson.decode(), "count": len(part)}
        try:
            await bus.publish_durable(
                topic,
                payload,
                event_type=EVENT_TYPE_OBSERVATION_BATCH,
                event_id=batch_id(part_ids),
            )
        except BusPayloadTooLarge as exc:
            rejected.extend(
                rejection(indexes[p], "too_large_for_bus", f"too large for the bus: {exc}")
                for p in part
            )
            continue
        except (BusError, RuntimeError, TimeoutError, OSError) as exc:
            return accepted, str(exc) or type(exc).__name__
        accepted.extend(part_ids)
    return accepted, None
