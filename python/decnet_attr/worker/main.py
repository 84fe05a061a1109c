"""``decnet-attr worker``: the attribution worker alone, for scale-out
(several workers and API processes sharing NATS + PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import signal

from decnet_attr.bus import get_bus
from decnet_attr.config import Settings
from decnet_attr.store import store_for
from decnet_attr.worker.worker import AttributionWorker

log = logging.getLogger(__name__)


async def run_worker(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = store_for(settings)
    await store.open()
    bus = get_bus(settings.bus_url, **settings.bus_options())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await bus.connect()
        worker = AttributionWorker(settings, bus, store)
        await worker.start()
        log.info("worker %r consuming %s", settings.worker_name, settings.bus_url)
        done_by_control = asyncio.create_task(worker.wait_stopped())
        signalled = asyncio.create_task(stop.wait())
        await asyncio.wait({done_by_control, signalled}, return_when=asyncio.FIRST_COMPLETED)
        for t in (done_by_control, signalled):
            t.cancel()
        await worker.stop()
        return 1 if worker.failure is not None else 0
    finally:
        await bus.close()
        await store.close()
