"""A big ``ValidatedBatch`` is freed on a thread of its own, not by whoever
drops the last reference (the event loop, usually): its data stays whole
for every other holder, and a forked child frees in place."""

from __future__ import annotations

import gc
import multiprocessing
import os
from pathlib import Path

import orjson

from decnet_attr.benchkit import as_events
from decnet_attr.config import Settings
from decnet_attr.observations import validate


def _batch(n: int, seed: int = 0) -> bytes:
    return b"\n".join(orjson.dumps(o) for o in as_events(n, seed=seed))


def _threads() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return names


def test_a_big_batch_is_freed_on_the_freeing_thread_and_a_part_taken_stays_whole() -> None:
    settings = Settings()
    batch = validate(_batch(500), settings, ndjson=True)
    expected = batch.keys({a: a for a, _ip, _ts in batch.attackers()})
    part = batch.take(list(range(0, 500, 7)))
    del batch
    gc.collect()
    assert "attr-free" in _threads()
    got = part.keys({a: a for a, _ip, _ts in part.attackers()})
    assert got == expected[::7]
    # and many more, each freed away from here, while new ones are made
    for seed in range(20):
        b = validate(_batch(200, seed), settings, ndjson=True)
        assert len(b) == 200
        del b


def _child() -> None:
    b = validate(_batch(300), Settings(), ndjson=True)
    assert len(b) == 300
    del b
    os._exit(0)


def test_a_forked_child_frees_in_place() -> None:
    # the parent has the freeing thread; the child does not
    validate(_batch(100), Settings(), ndjson=True)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_child)
    p.start()
    p.join(30)
    assert p.exitcode == 0
