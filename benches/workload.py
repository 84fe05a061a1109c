"""Benchmark workloads shaped like DECNET's traffic: re-exported from
``decnet_attr.benchkit`` so that ``decnet-attr bench`` and these benches
measure with the same code."""

from decnet_attr.benchkit import EMITTED, batches, json_array, ndjson, observations

__all__ = ["EMITTED", "batches", "json_array", "ndjson", "observations"]
