"""What the overview stream (``GET /api/v1/overview/events``) says about the
fleet: counters kept by the SSE relay as events pass, and the summary built
from them at most :data:`OVERVIEW_INTERVAL` apart.

Everything here is O(1) per bus event (an observation batch counts as its
``count``, it is never expanded) and the summary is built once per tick for
every client: what a client costs does not grow with the ingest rate.

The summary (the ``overview`` frame's data and the snapshot's ``overview``)::

    {"ts": epoch,
     "attackers": n, "identities": n, "states": {state: primitives, ...},
     "observations_total": n seen on the bus since start,
     "ingest_rate": observations per second (over the last RATE_WINDOW s),
     "accepted_total": n accepted by this process's API,
     "inflight": observations handed to the bus, not yet durable (or null),
     "lag_seconds": the worker's lag (or null),
     "alerts_total": n, "new_attackers_total": n,
     "workers": [{"worker", "running", "age_seconds", "lag", "merged",
                  "received"}, ...]}

The totals (attackers, identities, states) are read from the store at most
every :data:`COUNTS_INTERVAL` seconds, and only when events arrived since.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Final

from aiohttp import web

from decnet_attr.server.keys import COUNTERS, WORKER
from decnet_attr.store import STATES, Store, StoreError

__all__ = [
    "ALERTS_KEPT",
    "COUNTS_INTERVAL",
    "OVERVIEW_INTERVAL",
    "RATE_WINDOW",
    "Overview",
]

log = logging.getLogger(__name__)

#: Seconds between two coalesced ``overview`` frames (at most 2 a second).
OVERVIEW_INTERVAL: Final = 0.5
#: Seconds between two reads of the store's totals.
COUNTS_INTERVAL: Final = 2.0
#: The ingest rate is the observations seen over this many seconds.
RATE_WINDOW: Final = 3.0
#: Recent alerts kept for the snapshot of a new client.
ALERTS_KEPT: Final = 50
#: Longest wait for the store's totals before the summary goes out without them.
COUNTS_TIMEOUT: Final = 2.0
#: Worker health fields copied from its heartbeat.
_HEALTH_FIELDS: Final = ("running", "lag", "merged", "received")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Overview:
    """Counters of the fleet, fed by the relay (:meth:`note_*`, synchronous)
    and summarised by :meth:`summary` (awaits the store now and then)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.observations = 0
        self.alerts_total = 0
        self.new_attackers_total = 0
        #: events that may change the store's totals since they were last read
        self.changed = True
        #: bumped by every note: the relay sends a frame only when it moved
        self.version = 0
        self._counts: dict[str, Any] = {
            "attackers": 0,
            "identities": 0,
            "states": dict.fromkeys(STATES, 0),
        }
        self._counts_at = -COUNTS_INTERVAL
        self._samples: deque[tuple[float, int]] = deque()
        self._health: dict[str, tuple[float, dict[str, Any]]] = {}
        self.alerts: deque[bytes] = deque(maxlen=ALERTS_KEPT)
        self.counts_failures = 0

    # -- fed by the relay (O(1) per event) -------------------------------------------------
    def note_batch(self, payload: dict[str, Any]) -> None:
        n = payload.get("count")
        self.observations += n if isinstance(n, int) and n > 0 else 0
        self.changed = True
        self.version += 1

    def note_observation(self) -> None:
        self.observations += 1
        self.changed = True
        self.version += 1

    def note_change(self) -> None:
        self.changed = True
        self.version += 1

    def note_alert(self, data: bytes) -> None:
        """An alert's frame data (kept for the snapshot, newest last)."""
        self.alerts_total += 1
        self.alerts.append(data)
        self.changed = True
        self.version += 1

    def note_new_attacker(self) -> None:
        self.new_attackers_total += 1
        self.changed = True
        self.version += 1

    def note_health(self, topic: str, payload: dict[str, Any]) -> None:
        worker = payload.get("worker")
        name = worker if isinstance(worker, str) and worker else topic
        self._health[name[:64]] = (time.time(), payload)
        if len(self._health) > 64:  # a bounded table, whatever publishes
            oldest = min(self._health, key=lambda k: self._health[k][0])
            del self._health[oldest]
        self.version += 1

    # -- the summary -----------------------------------------------------------------------
    def _rate(self, now: float) -> float:
        samples = self._samples
        samples.append((now, self.observations))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        t0, n0 = samples[0]
        return (self.observations - n0) / (now - t0) if now > t0 else 0.0

    def counts_due(self, loop_now: float) -> bool:
        """True when the store's totals may be out of date and may be read again."""
        return self.changed and loop_now - self._counts_at >= COUNTS_INTERVAL

    async def _refresh_counts(self, loop_now: float) -> None:
        if not self.counts_due(loop_now):
            return
        self.changed = False
        self._counts_at = loop_now
        try:
            self._counts = await asyncio.wait_for(self._store.overview_counts(), COUNTS_TIMEOUT)
        except (TimeoutError, StoreError) as exc:
            self.changed = True
            self.counts_failures += 1
            log.debug("overview: store totals unavailable: %s", exc)

    def _workers(self, app: web.Application | None, now: float) -> list[dict[str, Any]]:
        seen = dict(self._health)
        worker = app.get(WORKER) if app is not None else None
        if worker is not None:  # in this process: fresher than its heartbeat
            try:
                seen[str(worker.settings.worker_name)] = (now, dict(worker.health()))
            except Exception as exc:
                log.debug("overview: worker health failed: %s", exc)
        out = []
        for name, (at, payload) in sorted(seen.items()):
            entry: dict[str, Any] = {"worker": name, "age_seconds": round(max(0.0, now - at), 1)}
            for key in _HEALTH_FIELDS:
                value = payload.get(key)
                entry[key] = value if isinstance(value, (bool, int, float)) else None
            out.append(entry)
        return out

    async def summary(self, app: web.Application | None, loop_now: float) -> dict[str, Any]:
        await self._refresh_counts(loop_now)
        now = time.time()
        counters = app.get(COUNTERS) if app is not None else None
        workers = self._workers(app, now)
        lags = [w["lag"] for w in workers if _number(w["lag"]) is not None]
        inflight = _number((counters or {}).get("ingest_inflight"))
        return {
            "ts": now,
            "attackers": self._counts["attackers"],
            "identities": self._counts["identities"],
            "states": dict(self._counts["states"]),
            "observations_total": self.observations,
            "ingest_rate": round(self._rate(loop_now), 1),
            "accepted_total": int((counters or {}).get("observations_accepted_total", 0)),
            "inflight": int(inflight) if inflight is not None else None,
            "lag_seconds": max(lags) if lags else None,
            "alerts_total": self.alerts_total,
            "new_attackers_total": self.new_attackers_total,
            "workers": workers,
        }
