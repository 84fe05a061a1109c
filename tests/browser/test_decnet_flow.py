"""DECNET's page flow in a real browser against a real ``decnet-attr serve``.

The page is ``decnet_flow.html``, our stand-in for DECNET's front-end written
from its client contract (DECNET's React app cannot be built here). It is
served from another origin than the API (another port of 127.0.0.1, as
DECNET's stock setup serves its UI), so the server runs with
``DECNET_ATTR_CORS_ORIGINS``: log in with the forced password change, list the
attackers with DECNET's query, open one, mint a ticket per stream, open the
attacker and identity streams, then a sensor posts observations and the
identity appears (``formed``) and a badge changes state live.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.browser.conftest import (
    WAIT,
    Api,
    BrowserPage,
    ServeProcess,
    free_port,
    requires_chromium,
)

pytestmark = [requires_chromium, pytest.mark.timeout(60)]

PAGE = Path(__file__).with_name("decnet_flow.html")
SHELL = "environmental.shell_type"
NEW_ADMIN_PASSWORD = "A much better admin passw0rd"
SENSOR_PASSWORD = "sensor password 1234"


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def ui_origin() -> Iterator[str]:
    """The page's own origin: a tiny static server on another port."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def test_decnet_page_flow(serve: ServeProcess, browser_page: BrowserPage, ui_origin: str) -> None:
    from playwright.sync_api import expect

    serve.env["DECNET_ATTR_CORS_ORIGINS"] = ui_origin
    serve.start(expect_password=True)
    assert serve.admin_password
    page: Any = browser_page.page
    done = serve.users_cli("add", "sensor1", "--role", "sensor", stdin=f"{SENSOR_PASSWORD}\n")
    assert done.returncode == 0, done.stderr
    sensor = Api(serve.base)
    sensor.login("sensor1", SENSOR_PASSWORD)
    attacker = sensor.call("POST", "/api/v1/attackers", {"ip": "203.0.113.77"})["uuid"]

    requests: list[str] = []
    statuses: list[tuple[int, str]] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("response", lambda r: statuses.append((r.status, r.url)))

    # ---- login and the forced password change ---------------------------------------------
    page.goto(f"{ui_origin}/?api={serve.base}", wait_until="domcontentloaded")
    page.fill("#username", "admin")
    page.fill("#password", serve.admin_password)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("change-password-form")).to_be_visible()
    page.fill("#old", serve.admin_password)
    page.fill("#new", NEW_ADMIN_PASSWORD)
    page.get_by_test_id("change-password-submit").click()

    # ---- the attackers list ---------------------------------------------------------------
    expect(page.get_by_test_id("attackers-total")).to_have_text("1 UNIQUE SOURCES")
    card = page.get_by_test_id(f"attacker-card-{attacker}")
    expect(card).to_contain_text("203.0.113.77")
    expect(card).to_contain_text("events 0")
    assert f"{serve.base}/api/v1/attackers?limit=50&offset=0&sort_by=recent" in requests

    # ---- the attacker page and its two streams ----------------------------------------------
    card.click()
    expect(page.get_by_test_id("attacker-ip")).to_have_text("203.0.113.77")
    expect(page.get_by_test_id("attacker-identity")).to_have_text(
        ""
    )  # none before its first observation
    expect(page.get_by_test_id("attacker-stream")).to_have_text("open")
    expect(page.get_by_test_id("identity-stream")).to_have_text("open")
    streams = [u for u in requests if "/events?" in u]
    assert len(streams) == 2
    tickets = [parse_qs(urlsplit(u).query)["ticket"][0] for u in streams]
    assert len(set(tickets)) == 2  # one fresh ticket per stream
    assert all("." not in t for t in tickets)  # opaque tickets, never the JWT
    assert sum(u.endswith("/api/v1/auth/sse-ticket") for u in requests) == 2

    # ---- a sensor posts observations: the identity forms, the badge changes live ----------
    ts = time.time() - 60

    def ingest(*values: str) -> None:
        nonlocal ts
        items = []
        for v in values:
            ts += 1
            items.append({"attacker_uuid": attacker, "primitive": SHELL, "value": v, "ts": ts})
        assert sensor.call("POST", "/api/v1/observations", items)["accepted"] == len(items)

    ingest("bash")
    badge = page.get_by_test_id(f"attribution-badge-{SHELL}")
    expect(badge).to_have_attribute("data-state", "unknown")
    expect(badge).to_have_text("UNKNOWN")
    reader = Api(serve.base)
    reader.login("admin", NEW_ADMIN_PASSWORD)
    identity = reader.call("GET", f"/api/v1/attackers/{attacker}/attribution")
    # the identity stream's `formed` made the page fetch the attacker again
    expect(page.get_by_test_id("attacker-identity")).to_have_text(identity["identity_uuid"])
    ingest("bash", "bash")
    expect(badge).to_have_attribute("data-state", "stable", timeout=WAIT * 1000)
    expect(badge).to_have_text("STABLE")
    expect(badge).to_have_attribute("title", "STABLE • confidence 100% over 3 observation(s)")
    ingest("zsh", "bash", "zsh")
    expect(badge).to_have_attribute("data-state", "multi_actor")
    expect(badge).to_have_text("MULTI-ACTOR")

    # the streams stayed up (no reconnect, no refused request, no script error)
    expect(page.get_by_test_id("attacker-stream")).to_have_text("open")
    expect(page.get_by_test_id("identity-stream")).to_have_text("open")
    assert sum(u.endswith("/api/v1/auth/sse-ticket") for u in requests) == 2
    assert [s for s in statuses if s[0] >= 400] == []
    assert not [c for c in browser_page.console if c.startswith(("pageerror", "error"))]
