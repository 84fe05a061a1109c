"""In-memory sliding-window rate limits (per process, bounded memory).

Like DECNET's slowapi ``memory://`` limiter (docs/decnet.md#rate-limits): each process
counts on its own, so with several API processes the effective limit is the
per-process limit times the number of processes. Keys are the TCP peer IP
(``X-Forwarded-For`` only when the operator says a trusted proxy sets it), a
lower-cased username or a user uuid.

Each key keeps at most ``limit`` timestamps (a sliding log, exact), and at most
``max_keys`` keys are tracked: beyond that the least recently used keys are
forgotten (their windows restart; that favours the client, never blocks it).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from decnet_attr.identifiers import normalise_ip

__all__ = ["LoginThrottle", "SlidingWindowLimiter", "client_ip"]


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

    def count(self, key: str, now: float | None = None) -> int:
        """Hits of ``key`` inside the window. Records nothing."""
        hits = self._hits.get(key)
        if hits is None:
            return 0
        self._expire(hits, self._clock() if now is None else now)
        return len(hits)

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


@dataclass
class _Pair:
    failures: int = 0
    last: float = 0.0


class LoginThrottle:
    """Failed-login throttling that an attacker cannot turn against an
    account's owner.

    Only *failures* count, never attempts, and a login is refused (429)
    before its password is checked when any of these holds:

    - **address**: the address failed ``limit`` times within ``window``
      seconds (whichever usernames it tried), counting logins in flight;
    - **address × username**: exponential back-off per pair: the first
      ``free`` failures cost nothing, then each one doubles the wait from
      ``base`` seconds up to ``cap`` (a success clears the pair);
    - **username**: the username failed ``limit`` times within ``window``
      (from any addresses) *and* this address has failed recently itself.

    So a correct password from an address with no recent failures always
    reaches the password check, however many failures others caused for that
    username; a guesser spread over many addresses gets one guess per
    address while the username is hot.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        base: float = 1.0,
        cap: float = 900.0,
        free: int = 3,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = float(window)
        self.base = float(base)
        self.cap = float(cap)
        self.free = max(0, int(free))
        self.max_keys = max_keys
        self._clock = clock
        self.by_address = SlidingWindowLimiter(limit, window, max_keys=max_keys, clock=clock)
        self.by_username = SlidingWindowLimiter(limit, window, max_keys=max_keys, clock=clock)
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()
        self._in_flight: dict[str, int] = {}

    def backoff(self, failures: int) -> float:
        """Seconds a pair waits after its ``failures``-th failure."""
        if failures <= self.free:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - self.free - 1, 64))

    def _pair(self, address: str, username: str, now: float) -> _Pair | None:
        pair = self._pairs.get((address, username))
        if pair is not None and now - pair.last > max(self.window, self.cap):
            del self._pairs[(address, username)]
            return None
        return pair

    def retry_after(self, address: str, username: str, now: float | None = None) -> float:
        """Seconds before ``username`` may be tried from ``address`` (0.0: now)."""
        t = self._clock() if now is None else now
        failed = self.by_address.count(address, t)
        wait = self.by_address.retry_after(address, t)
        if not wait and failed + self._in_flight.get(address, 0) >= self.limit:
            wait = 1.0  # the logins in flight would use up the address's allowance
        pair = self._pair(address, username, t)
        if pair is not None:
            wait = max(wait, pair.last + self.backoff(pair.failures) - t)
        if failed:
            wait = max(wait, self.by_username.retry_after(username, t))
        return max(wait, 0.0)

    def begin(self, address: str) -> None:
        """A login from ``address`` passed :meth:`retry_after` and is being checked."""
        self._in_flight[address] = self._in_flight.get(address, 0) + 1

    def end(self, address: str, username: str, *, ok: bool | None) -> None:
        """The login begun from ``address`` ended: ``ok`` True (success),
        False (wrong credentials) or None (neither, e.g. a store error)."""
        n = self._in_flight.get(address, 0) - 1
        if n > 0:
            self._in_flight[address] = n
        else:
            self._in_flight.pop(address, None)
        if ok is None:
            return
        key = (address, username)
        if ok:
            self._pairs.pop(key, None)
            return
        t = self._clock()
        self.by_address.record(address, t)
        self.by_username.record(username, t)
        pair = self._pair(address, username, t)
        if pair is None:
            if len(self._pairs) >= self.max_keys:
                self._pairs.popitem(last=False)
            pair = self._pairs[key] = _Pair()
        else:
            self._pairs.move_to_end(key)
        pair.failures += 1
        pair.last = t


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
                    return normalise_ip(candidate)
                except ValueError:
                    break
            break
    remote = request.remote
    if not remote:
        return "unknown"
    try:
        return normalise_ip(remote)
    except ValueError:
        return remote
