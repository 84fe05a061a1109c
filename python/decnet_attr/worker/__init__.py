"""The attribution worker: bus → validated micro-batches → one store
transaction with the Rust engine's merge → commit → events."""

from decnet_attr.worker.metrics import WorkerStats
from decnet_attr.worker.worker import AttributionWorker

__all__ = ["AttributionWorker", "WorkerStats"]
