"""Event bus: in-process (``memory://``), NATS/JetStream (``nats://``) or
DECNET's own Unix-socket broker (``unix://``).

>>> bus = get_bus("memory://")
>>> bus = get_bus("nats://127.0.0.1:4222,nats://10.0.0.2:4222", name="worker-1")
>>> bus = get_bus("unix:///run/decnet/bus.sock")

Configuration is passed in; nothing here reads the environment.
"""

from __future__ import annotations

from typing import Any

from decnet_attr.bus.base import (
    EVENT_SCHEMA_VERSION,
    Bus,
    BusError,
    BusPayloadTooLarge,
    BusUnavailable,
    Delivery,
    DurableConsumer,
    Event,
    Subscription,
)
from decnet_attr.bus.helpers import (
    batch_observations,
    make_thread_safe_publisher,
    publish_safely,
    run_control_listener,
    run_health_heartbeat,
)
from decnet_attr.bus.memory import InProcessBus

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "Bus",
    "BusError",
    "BusPayloadTooLarge",
    "BusUnavailable",
    "Delivery",
    "DurableConsumer",
    "Event",
    "InProcessBus",
    "Subscription",
    "batch_observations",
    "get_bus",
    "make_thread_safe_publisher",
    "publish_safely",
    "run_control_listener",
    "run_health_heartbeat",
]


def get_bus(url: str, **kw: Any) -> Bus:
    """Build a bus from a URL (not connected yet).

    - ``memory://`` -> :class:`~decnet_attr.bus.memory.InProcessBus` (*kw*: its
      constructor arguments, e.g. ``queue_size``);
    - ``nats://host:port[,nats://host2:port]`` (``tls://`` also accepted) ->
      :class:`~decnet_attr.bus.nats.NatsBus` (*kw*: its keyword arguments);
    - ``unix:///path/to/bus.sock`` (``unix://`` alone: DECNET's default socket) ->
      :class:`~decnet_attr.bus.unix.UnixBus` (*kw*: its keyword arguments);
    - anything else: :class:`ValueError`.
    """
    if not isinstance(url, str):
        raise ValueError(f"bus url must be a string, not {type(url).__name__}")
    text = url.strip()
    lowered = text.lower()
    if lowered == "memory://" or lowered == "memory:":
        return InProcessBus(**kw)
    if lowered.startswith(("nats://", "tls://")):
        from decnet_attr.bus.nats import NatsBus

        return NatsBus(text, **kw)
    if lowered.startswith("unix://"):
        from decnet_attr.bus.unix import UnixBus, socket_path_from_url

        return UnixBus(socket_path_from_url(text), **kw)
    scheme = text.split("://", 1)[0] if "://" in text else text
    raise ValueError(
        f"unsupported bus url scheme: {scheme!r} (expected memory://, nats:// or unix://)"
    )
