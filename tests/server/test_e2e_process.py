"""End to end: ``decnet-attr serve`` as a real process (API + worker + SSE in
one process, SQLite + in-process bus), driven over HTTP on 127.0.0.1 and by
the ``users`` command, then stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

BIN = Path(sys.executable).with_name("decnet-attr")
HAVE_WORKER = importlib.util.find_spec("decnet_attr.worker") is not None
HAVE_SSE = importlib.util.find_spec("decnet_attr.server.sse") is not None

pytestmark = [
    pytest.mark.skipif(
        not HAVE_WORKER, reason="decnet_attr.worker cannot be imported (needed to ingest)"
    ),
    pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} is not installed"),
    pytest.mark.timeout(120),
]

SHELL = "environmental.shell_type"
STARTUP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(path: Path) -> str:
    return path.read_text()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECNET_ATTR_")}
    env.update(extra)
    return env


async def cli(data_dir: Path, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN),
        "users",
        "--data-dir",
        str(data_dir),
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(
        proc.communicate(None if stdin is None else stdin.encode()), 30
    )
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class SseReader:
    """Frames of an SSE response: (event name or None, data or None)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def frame(self) -> tuple[str | None, str | None]:
        event: str | None = None
        data: list[str] = []
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if event is not None or data:
                    return event, "\n".join(data) if data else None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)

    async def until(self, name: str, timeout: float = 15.0) -> Any:
        async def go() -> Any:
            while True:
                event, data = await self.frame()
                if event == name:
                    import json

                    return json.loads(data or "null")

        return await asyncio.wait_for(go(), timeout)


async def test_serve_process_end_to_end(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            str(BIN),
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=clean_env(DECNET_ATTR_LOG_LEVEL="INFO"),
        )
    try:
        await _scenario(proc, data_dir, base, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _read_admin_password(proc: asyncio.subprocess.Process, log_path: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        except TimeoutError:
            break
        if not raw:
            break
        line = raw.decode()
        seen.append(line)
        m = re.search(r"initial admin password: (\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no admin password printed: {seen!r}\n{_read(log_path)}")


async def _wait_ready(session: aiohttp.ClientSession, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    body = await resp.json()
                    assert body == {
                        "status": "ok",
                        "checks": {"store": True, "bus": True, "worker": True},
                        "bus": {"transport": "memory", "reconnects": 0, "dropped": 0},
                    }
                    return
        await asyncio.sleep(0.1)
    raise AssertionError("server not ready:\n" + _read(log_path))


async def _scenario(
    proc: asyncio.subprocess.Process, data_dir: Path, base: str, log_path: Path
) -> None:
    admin_password = await _read_admin_password(proc, log_path)
    assert len(admin_password) >= 12
    assert _mode(data_dir / "jwt.secret") == 0o600
    assert _mode(data_dir) == 0o700

    # users are managed by the CLI on the same data dir while the server runs
    code, out, err = await cli(
        data_dir, "add", "analyst", "--role", "viewer", stdin="viewer pw 12345\n"
    )
    assert code == 0, err
    # the only thing on stderr is the audit line (security review item 3)
    assert [ln.split(": ", 1)[1] for ln in err.splitlines()] == [
        "audit user_added outcome=ok user=analyst address=local-cli role=viewer"
    ], err
    code, _out, err = await cli(
        data_dir, "add", "probe", "--role", "sensor", stdin="sensor pw 12345\n"
    )
    assert code == 0, err

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await _wait_ready(http, base, log_path)

        async def login(user: str, password: str) -> dict[str, Any]:
            async with http.post(
                f"{base}/api/v1/auth/login", json={"username": user, "password": password}
            ) as r:
                assert r.status == 200, await r.text()
                return dict(await r.json())

        def auth(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        # the admin must change the generated password first
        admin = await login("admin", admin_password)
        assert admin["must_change_password"] is True
        async with http.get(f"{base}/api/v1/attackers", headers=auth(admin["access_token"])) as r:
            assert r.status == 403
        async with http.post(
            f"{base}/api/v1/auth/change-password",
            json={"old_password": admin_password, "new_password": "The admin's new pw 9"},
            headers=auth(admin["access_token"]),
        ) as r:
            assert r.status == 200
            admin_token = (await r.json())["access_token"]
        async with http.get(f"{base}/api/v1/attackers", headers=auth(admin_token)) as r:
            assert r.status == 200
            assert (await r.json())["total"] == 0

        sensor = (await login("probe", "sensor pw 12345"))["access_token"]
        viewer = (await login("analyst", "viewer pw 12345"))["access_token"]

        async with http.post(
            f"{base}/api/v1/attackers", json={"ip": "203.0.113.9"}, headers=auth(sensor)
        ) as r:
            assert r.status == 201
            attacker = (await r.json())["uuid"]

        # a live stream, if the relay exists
        stream: aiohttp.ClientResponse | None = None
        reader: SseReader | None = None
        if HAVE_SSE:
            async with http.post(f"{base}/api/v1/auth/sse-ticket", headers=auth(viewer)) as r:
                assert r.status == 200
                ticket = (await r.json())["ticket"]
            stream = await http.get(
                f"{base}/api/v1/attackers/{attacker}/events",
                params={"ticket": ticket},
                timeout=aiohttp.ClientTimeout(total=None, sock_read=30),
            )
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            reader = SseReader(stream)
            snapshot = await reader.until("snapshot")
            assert snapshot["attacker_uuid"] == attacker
            assert snapshot["observations"] == []

        now = time.time()
        batch = [
            {
                "attacker_uuid": attacker,
                "primitive": SHELL,
                "value": "bash",
                "ts": now + i,
                "id": f"e2e-{i}",
            }
            for i in range(3)
        ]
        async with http.post(f"{base}/api/v1/observations", json=batch, headers=auth(sensor)) as r:
            assert r.status == 202, await r.text()
            assert await r.json() == {
                "accepted": 3,
                "ids": ["e2e-0", "e2e-1", "e2e-2"],
                "rejected": [],
                "duplicates": [],
            }

        # the worker merges them: poll the attribution until it is stable
        deadline = time.monotonic() + 15
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            async with http.get(
                f"{base}/api/v1/attackers/{attacker}/attribution", headers=auth(viewer)
            ) as r:
                assert r.status == 200
                body = await r.json()
            rows = {row["primitive"]: row for row in body["primitives"]}
            if rows.get(SHELL, {}).get("state") == "stable":
                break
            await asyncio.sleep(0.1)
        assert body["identity_uuid"] is not None
        assert body["primitives"] == [
            {
                "primitive": SHELL,
                "current_value": "bash",
                "state": "stable",
                "confidence": 1.0,
                "observation_count": 3,
                "last_change_ts": body["primitives"][0]["last_change_ts"],
                "last_observation_ts": now + 2,
            }
        ]

        if reader is not None:
            first = await reader.until("observation")
            assert first["payload"]["attacker_uuid"] == attacker
            assert first["payload"]["primitive"] == SHELL
            changed = await reader.until("attribution.state_changed")
            assert changed["payload"]["identity_uuid"] == body["identity_uuid"]
            assert changed["payload"]["primitive"] == SHELL

        code, out, _err = await cli(data_dir, "list")
        assert code == 0
        assert [ln.split()[:2] for ln in out.splitlines()[1:]] == [
            ["admin", "admin"],
            ["analyst", "viewer"],
            ["probe", "sensor"],
        ]

        # graceful stop: exit 0 within a few seconds, the stream is closed
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        assert code == 0, _read(log_path)
        assert time.monotonic() - t0 < 10
        if stream is not None and reader is not None:
            with pytest.raises((EOFError, aiohttp.ClientError)):
                while True:
                    await asyncio.wait_for(reader.frame(), 5)
            stream.release()

    log = _read(log_path)
    assert f"listening on {base}" in log
    assert "Traceback" not in log
