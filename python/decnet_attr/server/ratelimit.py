"""In-memory sliding-window rate limits (per process, bounded memory).

Like DECNET's slowapi ``memory://`` limiter (reference §6.2): each process
counts on its own, so with several API processes the effective limit is the
per-process limit times the number of processes. Keys are the TCP peer IP
(``X-Forwarded-For`` only when the operator says a trusted proxy sets it), a
lower-cased username or a user uuid.

Each key keeps at most ``limit`` timestamps (a sliding log, exact), and at most
``max_keys`` keys are tracked: beyond that the least recently used keys are
forgotten (their windows restart; that favours the client, never blocks it).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from aiohttp import web

__all__ = ["SlidingWindowLimiter", "client_ip"]


class SlidingWindowLimiter:
    """``limit`` hits per ``window`` seconds per key."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if window <= 0:
            raise ValueError("window must be > 0")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.limit = limit
        self.window = float(window)
        self.max_keys = max_keys
        self._clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hits)

    def retry_after(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may hit again (0.0: allowed now). Records nothing."""
        t = self._clock() if now is None else now
        hits = self._hits.get(key)
        if hits is None:
            return 0.0
        self._expire(hits, t)
        if not hits:
            del self._hits[key]
            return 0.0
        if len(hits) < self.limit:
            return 0.0
        return max(hits[0] + self.window - t, 0.001)

    def record(self, key: str, now: float | None = None) -> None:
        """Count one hit for ``key``."""
        t = self._clock() if now is None else now
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= self.max_keys:
                self._evict(t)
            hits = deque(maxlen=self.limit)
            self._hits[key] = hits
        else:
            self._hits.move_to_end(key)
            self._expire(hits, t)
        hits.append(t)

    def hit(self, key: str, now: float | None = None) -> float:
        """Check and, if allowed, record one hit. Returns 0.0 when allowed,
        else the seconds to wait (nothing recorded)."""
        t = self._clock() if now is None else now
        wait = self.retry_after(key, t)
        if wait == 0.0:
            self.record(key, t)
        return wait

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self._hits.clear()
        else:
            self._hits.pop(key, None)

    def _expire(self, hits: deque[float], now: float) -> None:
        cutoff = now - self.window
        while hits and hits[0] <= cutoff:
            hits.popleft()

    def _evict(self, now: float) -> None:
        """Make room for one key: drop keys whose windows are empty, else the
        least recently used."""
        cutoff = now - self.window
        stale = [k for k, h in self._hits.items() if not h or h[-1] <= cutoff]
        for k in stale:
            del self._hits[k]
        while len(self._hits) >= self.max_keys:
            self._hits.popitem(last=False)


def client_ip(request: web.Request, *, trust_forwarded_for: bool) -> str:
    """The client address used as a rate-limit key.

    The TCP peer, unless ``trust_forwarded_for``: then the right-most valid
    address of ``X-Forwarded-For`` (the one our own proxy appended; the
    left-most entries are whatever the client claimed).
    """
    if trust_forwarded_for:
        for raw in reversed(request.headers.getall("X-Forwarded-For", [])):
            for part in reversed(raw.split(",")):
                candidate = part.strip()
                if not candidate:
                    continue
                try:
                    return str(ipaddress.ip_address(candidate))
                except ValueError:
                    break
            break
    return request.remote or "unknown"
