"""``decnet-attr serve`` on its embedded default (in-process bus with the
ingest journal, SQLite) killed with SIGKILL while sensors post: every
observation a 202 accepted is merged exactly once after the restart, also
those the worker had not merged yet when the process died, and the states
equal the oracle's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from decnet_attr.worker.recompute import recompute
from tests.worker.conftest import (
    StoreFactory,
    assert_states_equal_oracle,
    assert_stored_exactly_once,
    wait_until,
    worker_settings,
)
from tests.worker.helpers import query
from tests.worker.test_faults import stream

BIN = Path(sys.executable).with_name("decnet-attr")
pytestmark = [
    pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} is not installed"),
    pytest.mark.timeout(180),
]

BODY = 50  # observations per POST
SENSORS = 4
SENSOR_PASSWORD = "sensor pw 12345"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECNET_ATTR_")}
    # the worker waits for fuller batches: merges trail the 202s, so the kill
    # finds observations that are only in the journal
    env.update(DECNET_ATTR_BATCH_DELAY="0.4", DECNET_ATTR_LOG_LEVEL="WARNING")
    return env


class Serve:
    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *, first: bool) -> str | None:
        """Start; the first start returns the admin password it prints."""
        with self.log.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                str(BIN),
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=_env(),
            )
        password = None
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                with contextlib.suppress(asyncio.TimeoutError):
                    raw = await asyncio.wait_for(self.proc.stdout.readline(), 0.05)
                    if m := re.search(rb"initial admin password: (\S+)", raw):
                        password = m.group(1).decode()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        if r.status == 200 and (password is not None or not first):
                            return password
                await asyncio.sleep(0.05)
        raise AssertionError("serve did not start:\n" + self.log.read_text())

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        assert self.proc.returncode == -9

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def test_sigkill_of_serve_loses_nothing_the_journal_accepted(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    data_dir = tmp_path / "data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Serve(data_dir, port, tmp_path / "serve.log")
    try:
        password = await serve.start(first=True)
        assert password is not None
        items = stream(3000, tag="jk")
        bodies = [items[i : i + BODY] for i in range(0, len(items), BODY)]
        accepted: set[str] = set()
        users = await asyncio.create_subprocess_exec(
            str(BIN),
            *("users", "--data-dir", str(data_dir), "add", "probe", "--role", "sensor"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=_env(),
        )
        await asyncio.wait_for(users.communicate(SENSOR_PASSWORD.encode() + b"\n"), 30)
        assert users.returncode == 0
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
            await serve.kill9()
            at_kill = set(accepted)
            stored = {r[0] for r in await query(store, "SELECT id FROM observations")}
            # the journal held accepted observations the worker had not stored
            assert at_kill - stored, "the kill found nothing in the journal only"
            await serve.start(first=False)
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
        await serve.stop()
