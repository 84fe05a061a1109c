"""Sensors first: while a body is being checked, the in-process worker waits
before building its next batch (bounded in time, and not at all once what
waits to be merged reaches the bound)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from decnet_attr.server.app import create_app
from decnet_attr.server.keys import INGEST_FIRST, WORKER
from decnet_attr.server.routes.ingest import IngestFirst
from tests.server.conftest import ClientFactory, Harness, bearer, fast_passwords, make_settings

pytestmark = pytest.mark.timeout(30)


async def returns_within(coro: object, seconds: float) -> bool:
    try:
        await asyncio.wait_for(coro, seconds)  # type: ignore[arg-type]
    except TimeoutError:
        return False
    return True


async def test_the_worker_waits_while_a_body_is_checked_and_no_longer() -> None:
    room = [True]
    first = IngestFirst(lambda: room[0], most=5.0)
    assert await returns_within(first.wait(), 0.1)  # nobody checking: at once
    checking = first.enter()
    waiting = asyncio.ensure_future(first.wait())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    checking.leave()
    checking.leave()  # idempotent: counted once
    assert await returns_within(waiting, 0.5)
    assert first.active == 0


async def test_the_wait_is_bounded_and_ends_at_the_bound() -> None:
    room = [True]
    first = IngestFirst(lambda: room[0], most=0.1)
    first.enter()  # a flood: somebody is always checking
    t0 = time.perf_counter()
    await first.wait()
    assert 0.08 <= time.perf_counter() - t0 < 1.0
    room[0] = False  # what waits to be merged reached the bound
    assert await returns_within(first.wait(), 0.05)


async def test_serve_merges_a_body_once_the_sensors_bodies_are_checked(
    tmp_path: Path, aiohttp_client: ClientFactory
) -> None:
    """The app hands the worker its turn: with another body being checked,
    the worker does not build the batch of a body it has received; once
    that check is over, it merges it."""
    settings = make_settings(tmp_path / "data", worker=True, ingest_journal=True)
    app = create_app(settings, worker=True, passwords=fast_passwords(), auth_cache_ttl=0.0)
    client = await aiohttp_client(app)
    h = Harness(app=app, client=client, settings=settings)
    token = await h.token("probe", "sensor")
    worker = app[WORKER]
    assert worker is not None
    first = app[INGEST_FIRST]
    first.most = 10.0
    other = first.enter()  # another sensor's body, still being checked
    item = {
        "attacker_uuid": "att-1",
        "primitive": "environmental.shell_type",
        "value": "bash",
        "ts": time.time() - 60.0,
    }
    resp = await client.post("/api/v1/observations", json=[item], headers=bearer(token))
    assert resp.status == 202, await resp.text()
    await asyncio.sleep(0.5)
    assert worker.stats.merged == 0
    other.leave()
    deadline = time.monotonic() + 5.0
    while worker.stats.merged < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert worker.stats.merged == 1


def test_a_202_that_waits_for_the_merge_does_not_hold_the_worker_back(tmp_path: Path) -> None:
    """Without the journal a 202 comes after the worker's commit: letting
    the sensors go first would only make them wait longer."""
    app = create_app(
        make_settings(tmp_path, worker=True, ingest_journal=False),
        worker=True,
        passwords=fast_passwords(),
    )
    worker = app[WORKER]
    assert worker is not None and worker.before_batch is None
    app = create_app(
        make_settings(tmp_path, worker=True, ingest_journal=True),
        worker=True,
        passwords=fast_passwords(),
    )
    worker = app[WORKER]
    assert worker is not None and worker.before_batch == app[INGEST_FIRST].wait
