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
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.serveproc import BIN, WAIT, ServeProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
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


# ---- the server process: tests/serveproc.py -------------------------------------------------


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
