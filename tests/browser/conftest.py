"""Fixtures for the dashboard tests: ``decnet-attr serve`` as a real process
(127.0.0.1, a free port, a temporary data dir; restartable on the same port),
Debian's Chromium driven by Playwright, a tiny JSON client for the API, and a
screenshot of the page in ``test-artifacts/`` when a test fails.

Playwright's own browser downloads are not used: the tests run only where
``/usr/bin/chromium`` exists and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
BIN = Path(sys.executable).with_name("decnet-attr")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: Longest single wait of the tests (start-up, a badge, a reconnect).
WAIT = 10.0

requires_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is not installed (apt-get install chromium); "
    "Playwright's own browsers are not used",
)


# ---- failure screenshots -------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item (``item.rep_call``) for fixtures."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or bool(rep.failed)


def artifact_path(request: pytest.FixtureRequest, suffix: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
    return ARTIFACTS / f"{name}{suffix}"


# ---- the server process --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECNET_ATTR_")}
    env.update(extra)
    return env


@dataclass
class ServeProcess:
    """``decnet-attr serve`` on 127.0.0.1:``port`` with ``data_dir``."""

    data_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    admin_password: str | None = None
    #: extra ``DECNET_ATTR_*`` settings for the process
    env: dict[str, str] = field(default_factory=dict)
    _lines: list[str] = field(default_factory=list)
    _password_seen: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, expect_password: bool) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._password_seen.clear()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN),
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=clean_env(DECNET_ATTR_LOG_LEVEL="INFO", **self.env),
            )
        self._reader = threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True)
        self._reader.start()
        if expect_password:
            if not self._password_seen.wait(WAIT):
                raise AssertionError(f"no admin password printed: {self._lines!r}\n{self.log()}")
        self.wait_ready()

    def _read_stdout(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            self._lines.append(line)
            m = re.search(r"initial admin password: (\S+)", line)
            if m:
                self.admin_password = m.group(1)
                self._password_seen.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.05)
        raise AssertionError(f"serve not ready within {WAIT} s:\n{self.log()}")

    def stop(self, *, timeout: float = WAIT) -> int:
        """SIGTERM, then wait (SIGKILL after ``timeout``); the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)
        if self._reader is not None:
            self._reader.join(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
        return int(proc.returncode)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def users_cli(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``decnet-attr users --data-dir D …`` (common flags before the action)."""
        return subprocess.run(
            [str(BIN), "users", "--data-dir", str(self.data_dir), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=WAIT,
            env=clean_env(),
            check=False,
        )


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Generator[ServeProcess, None, None]:
    """A (not yet started) server on a free port; always killed at the end."""
    if not BIN.exists():
        pytest.skip(f"{BIN} is not installed")
    server = ServeProcess(
        data_dir=tmp_path / "data", port=free_port(), log_path=tmp_path / "serve.log"
    )
    try:
        yield server
    finally:
        server.kill()
        if _failed(request):
            with contextlib.suppress(OSError):
                shutil.copyfile(server.log_path, artifact_path(request, ".serve.log"))


# ---- a small JSON client -------------------------------------------------------------------
class ApiError(AssertionError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


class Api:
    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            exc.close()
            raise ApiError(exc.code, text) from None
        return json.loads(raw) if raw else None

    def login(self, username: str, password: str) -> dict[str, Any]:
        body = self.call("POST", "/api/v1/auth/login", {"username": username, "password": password})
        self.token = body["access_token"]
        return dict(body)


# ---- the browser ---------------------------------------------------------------------------
@dataclass
class BrowserPage:
    page: Any  # playwright.sync_api.Page
    console: list[str]


@pytest.fixture
def browser_page(request: pytest.FixtureRequest) -> Generator[BrowserPage, None, None]:
    """A fresh Chromium page (dark scheme); on failure a full-page screenshot
    and the browser console go to ``test-artifacts/``."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed; Playwright's own browsers are not used")
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=WAIT * 1000
        )
        try:
            context = browser.new_context(
                viewport={"width": 1360, "height": 900}, color_scheme="dark"
            )
            context.set_default_timeout(WAIT * 1000)
            page = context.new_page()
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
            try:
                yield BrowserPage(page, console)
            finally:
                if _failed(request):
                    with contextlib.suppress(Exception):
                        page.screenshot(
                            path=str(artifact_path(request, ".png")), full_page=True, timeout=5000
                        )
                    with contextlib.suppress(OSError):
                        artifact_path(request, ".console.txt").write_text("\n".join(console))
                context.close()
        finally:
            browser.close()
