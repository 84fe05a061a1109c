"""The attribution worker's numbers and their Prometheus collector.

:class:`WorkerStats` is what the worker counts; each field that is exposed
says under which name, beside the field. The counters stay plain ints
because the worker gives back what a failed transaction attempt counted
(Prometheus counters only grow); the two histograms are prometheus-client's.
:class:`WorkerCollector` reads a worker when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from prometheus_client import Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from decnet_attr.metrics import PREFIX, Stat, counter, family, flag, without_created

if TYPE_CHECKING:
    from decnet_attr.worker.worker import AttributionWorker

__all__ = ["BATCH_SIZE_BUCKETS", "MERGE_SECONDS_BUCKETS", "WorkerCollector", "WorkerStats"]

#: Bounds of ``decnet_attr_worker_batch_size`` (observations per batch).
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000)
#: Bounds of ``decnet_attr_worker_merge_seconds``.
MERGE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _counted(name: str, doc: str) -> Any:
    """A counter field, exposed as ``decnet_attr_<name>_total``."""
    return field(default=0, metadata={"stat": counter(doc, name)})


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(f"{PREFIX}_{name}", doc, buckets=buckets, registry=None)


@dataclass
class WorkerStats:
    received: int = _counted(
        "worker_observations_received", "Observation events the worker received."
    )
    merged: int = _counted(
        "worker_observations_merged", "Observations stored and merged into the engine."
    )
    duplicates: int = _counted(
        "worker_observations_duplicate", "Observations dropped as already stored."
    )
    rejected: int = _counted(
        "worker_observations_rejected", "Observation events that failed validation."
    )
    dead_lettered: int = _counted(
        "worker_observations_dead_lettered", "Rejected events stored as dead letters."
    )
    batches: int = _counted(
        "worker_batches", "Micro-batch transactions committed (one per lane of a batch)."
    )
    batch_failures: int = _counted("worker_batch_failures", "Failed micro-batch commit attempts.")
    redelivered: int = _counted(
        "worker_observations_redelivered", "Observation events delivered again."
    )
    published: int = _counted(
        "worker_events_published", "Events the worker published after commits."
    )
    state_changes: int = _counted("worker_state_changes", "Attribution state changes.")
    multi_actor_fired: int = _counted(
        "worker_multi_actor_suspected", "multi_actor_suspected events fired."
    )
    identities_formed: int = _counted("worker_identities_formed", "Stub identities created.")
    identities_merged: int = _counted(
        "worker_identities_merged", "Identity merges (attackers moved into another identity)."
    )
    identities_unmerged: int = _counted(
        "worker_identities_unmerged",
        "Identity un-merges (attackers given back to a revived identity).",
    )
    attackers_observed: int = _counted(
        "worker_attackers_observed", "attacker.observed events registered."
    )
    pending_merged: int = _counted(
        "worker_observations_pending_merged", "Stored-but-unmerged rows merged."
    )
    # not exposed
    windows_saved: int = 0
    pruned: int = 0
    #: commit time minus the newest observation ts of the last batch
    lag_seconds: float = 0.0
    #: Unix time of the last committed batch (0: none yet)
    last_batch_at: float = 0.0
    batch_size: Histogram = field(
        default_factory=lambda: _histogram(
            "worker_batch_size", "Events per micro-batch.", BATCH_SIZE_BUCKETS
        )
    )
    merge_seconds: Histogram = field(
        default_factory=lambda: _histogram(
            "worker_merge_seconds",
            "Seconds to store and merge one batch (one lane of it).",
            MERGE_SECONDS_BUCKETS,
        )
    )

    def counters(self) -> Iterator[tuple[str, Stat, int]]:
        """(field, declaration, value) of every exposed counter."""
        for f in fields(self):
            stat = f.metadata.get("stat")
            if stat is not None:
                yield f.name, stat, getattr(self, f.name)


class WorkerCollector(Collector):
    """The in-process worker's families (none when no worker runs here)."""

    def __init__(self, worker: AttributionWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        yield GaugeMetricFamily(
            f"{PREFIX}_worker_running",
            "1 while the in-process attribution worker runs.",
            value=flag(worker.running),
        )
        if worker.last_heartbeat > 0:
            yield GaugeMetricFamily(
                f"{PREFIX}_worker_heartbeat_age_seconds",
                "Seconds since the worker's consumer loop last turned.",
                value=max(0.0, time.monotonic() - worker.last_heartbeat),
            )
        yield GaugeMetricFamily(
            f"{PREFIX}_engine_keys",
            "(identity, primitive) keys held by the engine.",
            value=float(len(worker.engine)),
        )
        stats = worker.stats
        for name, stat, value in stats.counters():
            yield family(PREFIX, name, stat, float(value))
        yield GaugeMetricFamily(
            f"{PREFIX}_worker_lag_seconds",
            "Commit time minus the newest observation ts of the last batch.",
            value=stats.lag_seconds,
        )
        if stats.last_batch_at:
            yield GaugeMetricFamily(
                f"{PREFIX}_worker_last_batch_timestamp_seconds",
                "Unix time of the last committed batch.",
                value=stats.last_batch_at,
            )
        for hist in (stats.batch_size, stats.merge_seconds):
            for metric in hist.collect():
                yield without_created(metric)
