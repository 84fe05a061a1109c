"""Process settings of the long-running commands."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from decnet_attr import cli
from decnet_attr.config import Settings
from decnet_attr.runtime import GC_THRESHOLD0, GC_THRESHOLD1, GC_THRESHOLD2, tune_gc


def test_tune_gc_raises_thresholds_and_freezes_startup_objects() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        assert tune_gc() == before
        assert gc.get_threshold() == (GC_THRESHOLD0, GC_THRESHOLD1, GC_THRESHOLD2)
        assert gc.get_freeze_count() > frozen
        # cyclic garbage is still collected
        a: list[object] = []
        a.append(a)
        del a
        assert gc.collect() >= 1
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_worker_command_tunes_the_collector(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import decnet_attr.runtime as runtime
    import decnet_attr.worker.main as worker_main

    calls: list[str] = []

    def fake_tune() -> tuple[int, int, int]:
        calls.append("tuned")
        return gc.get_threshold()

    async def fake_worker(settings: Settings) -> int:
        calls.append(f"worker {settings.data_dir.name}")
        return 0

    monkeypatch.setattr(runtime, "tune_gc", fake_tune)
    monkeypatch.setattr(worker_main, "run_worker", fake_worker)
    assert cli.main(["worker", "--data-dir", str(tmp_path / "d")]) == 0
    assert calls == ["tuned", "worker d"]
