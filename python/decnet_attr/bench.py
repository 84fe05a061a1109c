"""``decnet-attr bench``: size a deployment on this machine.

Runs, for a bounded time, the engine alone (per batch size, and in one
process per core), the embedded pipeline (in-process bus + SQLite, per
``DECNET_ATTR_BATCH_MAX``) and, when ``--bus-url``/``--db-url`` point at a
reachable NATS and PostgreSQL, the scale-out pipeline; prints obs/s and
latency per batch size and worker count, and recommends the batch size and
worker count for ``--target`` obs/s. The measuring code is
``decnet_attr.benchkit``, the same the ``benches/`` suite uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from decnet_attr.config import Settings
from decnet_attr.progress import Progress

log = logging.getLogger(__name__)


async def _reachable(settings: Settings) -> str | None:
    """Why the external deployment cannot be measured, or None."""
    if not (settings.bus_url.startswith("nats://") and settings.shared_store):
        return "no nats:// bus and postgresql:// store configured"
    from decnet_attr.bus import get_bus
    from decnet_attr.store import store_for

    try:
        bus = get_bus(settings.bus_url)
        await asyncio.wait_for(bus.connect(), 5)
        await bus.close()
        store = store_for(settings)
        await asyncio.wait_for(store.open(), 5)
        await store.close()
    except Exception as exc:  # any failure to connect means: skip it
        return f"not reachable: {type(exc).__name__}: {exc}"
    return None


def bench_command(
    settings: Settings,
    *,
    seconds: float,
    target: float,
    sizes: list[int],
    keys: int,
    events: int,
    fmt: str,
) -> int:
    from decnet_attr import benchkit

    cores = os.cpu_count() or 1
    samples: list[benchkit.Sample] = []
    steps = 2 * len(sizes) + (1 if cores > 1 else 0)
    progress = Progress("bench", steps, unit="runs")
    for size in sizes:
        samples.append(benchkit.measure_engine(keys, size, seconds))
        progress.update(1)
    if cores > 1:
        samples.append(benchkit.measure_engine_processes(keys, max(sizes), seconds, cores))
        progress.update(1)
    for size in sizes:
        samples.append(asyncio.run(benchkit.measure_pipeline(size, events)))
        progress.update(1)
    why_not = asyncio.run(_reachable(settings))
    if why_not is None:
        for size in sizes:
            samples.append(
                asyncio.run(
                    benchkit.measure_pipeline(
                        size, events, bus_url=settings.bus_url, db_url=settings.store_url
                    )
                )
            )
    progress.close()
    rec = benchkit.recommend(samples, target, cores)
    if fmt == "json":
        print(
            json.dumps(
                {
                    "cores": cores,
                    "samples": [asdict(s) for s in samples],
                    "external": why_not or "measured",
                    "recommendation": rec,
                }
            )
        )
        return 0
    from decnet_attr.tune.report import table

    rows = [
        [s.what, s.batch, s.workers, round(s.obs_per_s), s.p50_ms, s.p99_ms, s.calls]
        for s in samples
    ]
    print(f"{cores} cores; engine runs {seconds:g} s each, pipeline runs {events:,} observations\n")
    print(
        table(
            rows,
            ["deployment", "batch", "workers", "obs/s", "p50 ms/batch", "p99 ms/batch", "batches"],
        )
    )
    if why_not:
        print(f"NATS + PostgreSQL: {why_not}")
    print(
        f"\nfor {target:,.0f} obs/s: DECNET_ATTR_BATCH_MAX={rec['batch_max']} with "
        f"{rec['workers']} worker(s) ({rec['deployment']}, measured "
        f"{rec['measured_obs_per_s']:,} obs/s per worker, planned at "
        f"{benchkit.HEADROOM:.0%})"
    )
    if not rec["fits_this_machine"]:
        print(
            f"this machine has {cores} cores: spread the workers over more machines "
            "(NATS + PostgreSQL)",
            file=sys.stderr,
        )
    return 0


def add_parser(sub: Any, common: Any) -> None:
    b = sub.add_parser("bench", help="measure this machine and recommend batch size and workers")
    common(b)
    b.add_argument("--seconds", type=float, default=2.0, help="per engine run (default 2)")
    b.add_argument("--target", type=float, default=10_000, help="obs/s to plan for")
    b.add_argument("--batch-sizes", default="100,500,2000,5000", help="comma-separated batch sizes")
    b.add_argument("--keys", type=int, default=20_000, help="keys the engine holds")
    b.add_argument("--events", type=int, default=10_000, help="observations per pipeline run")
    b.add_argument("--format", choices=["table", "json"], default="table")
