"""What the components share to expose their numbers to Prometheus.

Each component declares the numbers it keeps (name, kind, help) beside the
code that counts them and brings its own :class:`~prometheus_client.registry.Collector`
(``bus/metrics.py``, ``worker/metrics.py``, ``server/sse_metrics.py``,
``server/api_metrics.py``); ``server/ops.py`` only registers them in the
app's one :class:`~prometheus_client.CollectorRegistry`. This module holds the
pieces they have in common: the series prefix, the declaration of one
statistic and turning a ``stats()`` mapping into metric families.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = [
    "PREFIX",
    "Stat",
    "counter",
    "family",
    "flag",
    "gauge",
    "number",
    "stat_families",
    "without_created",
]

#: Every series of the project starts with it (``decnet_attr_…``).
PREFIX = "decnet_attr"


@dataclass(frozen=True)
class Stat:
    """One number a component keeps: a ``counter`` (only grows; exposed as
    ``<name>_total``) or a ``gauge`` (a level). ``name`` is the series name
    after the component's prefix, when it is not the statistic's key."""

    kind: Literal["counter", "gauge"]
    doc: str
    name: str | None = None


def counter(doc: str, name: str | None = None) -> Stat:
    return Stat("counter", doc, name)


def gauge(doc: str, name: str | None = None) -> Stat:
    return Stat("gauge", doc, name)


def number(value: Any) -> float | None:
    """A sample value, or None for what is not a number (left out)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return None


def flag(value: Any) -> float:
    return 1.0 if value else 0.0


def _base(name: str) -> str:
    return name[: -len("_total")] if name.endswith("_total") else name


def family(prefix: str, key: str, spec: Stat, value: float) -> Metric:
    """The family of one declared statistic."""
    name = f"{prefix}_{_base(spec.name or key)}"
    if spec.kind == "counter":
        return CounterMetricFamily(name, spec.doc, value=value)
    return GaugeMetricFamily(name, spec.doc, value=value)


def stat_families(
    prefix: str, stats: Mapping[str, Any], specs: Mapping[str, Stat], what: str
) -> Iterator[Metric]:
    """The families of a component's ``stats()``: the declared ones as
    declared, an undeclared number as a counter named after its key (so a
    statistic added without a declaration still shows), what is not a number
    left out."""
    for key, value in sorted(stats.items()):
        v = number(value)
        if v is None:
            continue
        spec = specs.get(key) or counter(f"{what} statistic {key}.")
        yield family(prefix, key, spec, v)


def without_created(metric: Metric) -> Metric:
    """*metric* without its ``_created`` sample (prometheus-client adds one
    to its own counters and histograms; ``/metrics`` never had them)."""
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    out.samples = [s for s in metric.samples if not s.name.endswith("_created")]
    return out
