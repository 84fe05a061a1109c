"""Publish helpers, health heartbeat and control listener (docs/decnet.md#bus-helpers).

Differences from DECNET (docs/decnet.md#worker-liveness, docs/decnet.md#log-floods):

- publish failures are logged rate-limited and reported by the return value;
- a control ``stop`` stops *that* worker (sets its ``asyncio.Event``) and never
  signals the process;
- the control listener also returns when the stop event is set by someone else
  or when the bus closes, instead of idling forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from decnet_attr._core import observation_lines
from decnet_attr.bus.base import Bus, Event, RateLimitedLog
from decnet_attr.topics import (
    EVENT_TYPE_HEALTH,
    WORKER_CONTROL_STOP,
    attacker_observation,
    is_observation_batch,
    system_control,
    system_health,
)

__all__ = [
    "batch_observations",
    "make_thread_safe_publisher",
    "publish_safely",
    "run_control_listener",
    "run_health_heartbeat",
]

logger = logging.getLogger(__name__)
_rl = RateLimitedLog(logger)


async def publish_safely(
    bus: Bus | None, topic: str, payload: dict[str, Any], event_type: str = ""
) -> bool:
    """Fire-and-forget publish that never raises (except on cancellation).

    Returns whether the event was handed to the bus. A ``None`` bus is a no-op
    (``False``). Failures are logged at WARNING, at most once per 10 s per topic.
    """
    if bus is None:
        return False
    try:
        await bus.publish(topic, payload, event_type=event_type)
    except Exception as exc:
        _rl.warning(f"publish:{topic}", "bus publish failed topic=%s: %s", topic, exc)
        return False
    return True


def make_thread_safe_publisher(
    bus: Bus | None, loop: asyncio.AbstractEventLoop
) -> Callable[..., None]:
    """A synchronous ``fn(topic, payload, event_type="")`` usable from any thread:
    it schedules :func:`publish_safely` on *loop* and returns at once.

    A ``None`` bus gives a no-op; once the bus (or the loop) is closed, calls
    are dropped silently.
    """

    def publish(topic: str, payload: dict[str, Any], event_type: str = "") -> None:
        if bus is None or bus.closed or loop.is_closed():
            return
        try:
            fut = asyncio.run_coroutine_threadsafe(
                publish_safely(bus, topic, payload, event_type), loop
            )
        except RuntimeError:  # loop closed in the meantime
            return
        fut.add_done_callback(_ignore_result)

    return publish


def _ignore_result(fut: Any) -> None:
    if not fut.cancelled():
        fut.exception()


async def run_health_heartbeat(
    bus: Bus | None,
    worker: str,
    *,
    interval: float = 30.0,
    extra: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Publish ``system.<worker>.health`` now and then every *interval* seconds.

    Payload: ``{"worker": worker, "ts": time.time()}`` updated with ``extra()``
    (if ``extra`` raises, that is logged at DEBUG and the base payload is still
    sent); event type ``"health"``. A ``None`` bus makes it an idle loop.
    Cancelling the task ends it cleanly (the cancellation is absorbed, as in
    DECNET, so ``task.cancel(); await task`` returns ``None``).
    """
    topic = system_health(worker)
    if interval <= 0:
        raise ValueError("interval must be > 0")
    try:
        while True:
            if bus is not None:
                payload: dict[str, Any] = {"worker": worker, "ts": time.time()}
                if extra is not None:
                    try:
                        payload.update(extra())
                    except Exception as exc:
                        logger.debug("health extra() for %s failed: %s", worker, exc)
                await publish_safely(bus, topic, payload, EVENT_TYPE_HEALTH)
            await asyncio.sleep(interval)
    except asyncio.CancelledError:
        logger.debug("health heartbeat for %s stopped", worker)


async def run_control_listener(bus: Bus | None, worker: str, stop: asyncio.Event) -> None:
    """Listen on ``system.<worker>.control``; on ``{"action": "stop"}`` log who
    asked (``requested_by``) and set *stop*, then return.

    Other actions are ignored at DEBUG. Returns as well when *stop* is set by
    someone else, when the subscription ends because the bus closed, or (after
    a WARNING) when the bus cannot subscribe. A ``None`` bus waits for *stop*.
    """
    topic = system_control(worker)
    if bus is None:
        await stop.wait()
        return
    try:
        sub = bus.subscribe(topic)
    except Exception as exc:
        logger.warning("control listener for %s cannot subscribe to %s: %s", worker, topic, exc)
        return

    async def close_on_stop() -> None:
        await stop.wait()
        await sub.aclose()

    watcher = asyncio.ensure_future(close_on_stop())
    try:
        async with sub:
            async for event in sub:
                payload = event.payload
                action = payload.get("action")
                if action == WORKER_CONTROL_STOP:
                    requested_by = payload.get("requested_by") or "<unknown>"
                    logger.info(
                        "worker %s: stop requested by %s via %s", worker, requested_by, topic
                    )
                    stop.set()
                    return
                logger.debug("worker %s: ignoring control action %r", worker, action)
        if not stop.is_set():
            logger.info("control listener for %s ended: bus closed", worker)
    except Exception as exc:
        logger.warning("control listener for %s failed: %s", worker, exc)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def batch_observations(event: Event, attackers: Mapping[str, Any] | None = None) -> list[Event]:
    """The observations inside an ``attacker.observation.batch`` event, as
    the one-per-observation events DECNET publishes (topic
    ``attacker.observation.<primitive>``, the observation's id, the batch's
    ts). With ``attackers``, only the observations of those attackers (the
    filtering runs in Rust, so a relay pays nothing for the others).
    Anything else: ``[]``."""
    if not is_observation_batch(event.topic) or not isinstance(event.payload, dict):
        return []
    text = event.payload.get("ndjson")
    if not isinstance(text, str):
        return []
    if attackers is None:
        picked = [
            (p.get("primitive", ""), p.get("id", ""), p)
            for p in (orjson.loads(line) for line in text.splitlines() if line)
        ]
    else:
        picked = [
            (primitive, oid, orjson.loads(line))
            for _a, primitive, oid, line in observation_lines(text, attackers)
        ]
    return [
        Event(
            topic=attacker_observation(primitive),
            payload=payload,
            type=primitive,
            id=oid,
            ts=event.ts,
        )
        for primitive, oid, payload in picked
    ]
