"""Benchmark helpers: each case records its throughput; a summary table
(obs/s, and the ratio of every engine case to the baseline) is printed at
the end, ready for benches/RESULTS.md."""

from __future__ import annotations

from typing import Any

import pytest

_rows: list[tuple[str, float, str]] = []


def record(benchmark: Any, label: str, items_per_call: int) -> float:
    stats = benchmark.stats.stats
    rate = items_per_call / stats.median if stats.median else 0.0
    benchmark.extra_info["obs_per_s"] = rate
    _rows.append((label, rate, "/s"))
    return rate


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rows:
        return
    tr = terminalreporter
    tr.section("decnet-attr benchmark summary (median)")
    width = max(len(label) for label, _, _ in _rows)
    for label, value, unit in _rows:
        tr.write_line(f"{label:<{width}}  {value:>14,.1f} {unit}")


@pytest.fixture(autouse=True)
def _bench_only(request: pytest.FixtureRequest) -> None:
    """Benchmarks are not tests: skip unless pytest-benchmark is enabled
    (`make bench` passes --benchmark-enable)."""
    cfg = request.config
    disabled = cfg.getoption("benchmark_disable", False) and not cfg.getoption(
        "benchmark_enable", False
    )
    if disabled and "benchmark" in request.fixturenames:
        pytest.skip("benchmarks run with `make bench`")
