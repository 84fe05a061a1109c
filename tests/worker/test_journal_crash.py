"""``decnet-attr serve`` on its embedded default (in-process bus with the
ingest journal, SQLite) killed with SIGKILL while sensors post: every
observation a 202 accepted is merged exactly once after the restart, also
those the worker had not merged yet when the process died, and the states
equal the oracle's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from decnet_attr.worker.recompute import recompute
from tests.serveproc import BIN, ServeProcess, free_port
from tests.worker.conftest import (
    StoreFactory,
    assert_states_equal_oracle,
    assert_stored_exactly_once,
    wait_until,
    worker_settings,
)
from tests.worker.helpers import query
from tests.worker.test_faults import stream

pytestmark = [
    pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} is not installed"),
    pytest.mark.timeout(180),
]

BODY = 50  # observations per POST
SENSORS = 4
SENSOR_PASSWORD = "sensor pw 12345"
#: the worker waits for fuller batches: merges trail the 202s, so the kill
#: finds observations that are only in the journal
SLOW_MERGES = {"DECNET_ATTR_BATCH_DELAY": "0.4"}


async def test_sigkill_of_serve_loses_nothing_the_journal_accepted(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    serve = ServeProcess(
        data_dir=tmp_path / "data",
        port=free_port(),
        log_path=tmp_path / "serve.log",
        env=SLOW_MERGES,
    )
    data_dir, base = serve.data_dir, serve.base
    try:
        await asyncio.to_thread(serve.start, expect_password=True)
        done = await asyncio.to_thread(
            serve.users_cli, "add", "probe", "--role", "sensor", stdin=SENSOR_PASSWORD + "\n"
        )
        assert done.returncode == 0, done.stderr
        items = stream(3000, tag="jk")
        bodies = [items[i : i + BODY] for i in range(0, len(items), BODY)]
        accepted: set[str] = set()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/api/v1/auth/login",
                json={"username": "probe", "password": SENSOR_PASSWORD},
            ) as r:
                assert r.status == 200, await r.text()
                token = (await r.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}
            queue = list(reversed(bodies))

            async def sensor() -> None:
                while queue:
                    body = queue.pop()
                    data = "\n".join(json.dumps(o) for o in body)
                    while True:  # a sensor retries a body until it gets its answer
                        try:
                            async with http.post(
                                f"{base}/api/v1/observations", data=data, headers=headers
                            ) as resp:
                                if resp.status == 202:
                                    out = await resp.json()
                                    accepted.update(out["ids"])
                                    accepted.update(d["id"] for d in out["duplicates"])
                                    assert out["rejected"] == [], out["rejected"][:3]
                                    break
                                assert resp.status == 503, await resp.text()
                        except (aiohttp.ClientError, ConnectionError):
                            pass
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.01)

            sensors = [asyncio.create_task(sensor()) for _ in range(SENSORS)]
            store = await make_store(f"sqlite:///{(data_dir / 'attr.db').resolve()}")

            async def a_third() -> bool:
                for t in sensors:
                    if t.done():
                        t.result()  # a sensor's failure, raised here
                return len(accepted) >= len(items) // 3

            await wait_until(a_third, 60, "a third accepted")
            await asyncio.to_thread(serve.kill)
            at_kill = set(accepted)
            stored = {r[0] for r in await query(store, "SELECT id FROM observations")}
            # the journal held accepted observations the worker had not stored
            assert at_kill - stored, "the kill found nothing in the journal only"
            await asyncio.to_thread(serve.start, expect_password=False)
            await asyncio.gather(*sensors)

        assert accepted == {o["id"] for o in items}

        async def all_stored() -> bool:
            n = (await query(store, "SELECT count(*) FROM observations"))[0][0]
            return int(n) == len(items)

        await wait_until(all_stored, 60, "everything stored after the restart")
        await assert_stored_exactly_once(store, accepted)
        attackers = sorted({o["attacker_uuid"] for o in items})
        await assert_states_equal_oracle(store, items, attackers)
        settings = worker_settings(tmp_path, "memory://", "")
        report = await recompute(store, settings, dry_run=True)
        assert report["changed"] == [] and report["dropped"] == [], report["changed"][:5]
    finally:
        await asyncio.to_thread(serve.stop)
