"""The front page in Chromium against a real ``decnet-attr serve``: the fleet
overview stream, the alerts feed, the attackers list updating in place, the
filters kept in the URL, the overview's frame rate under a fast ingest, and
an axe-core accessibility check.

axe-core comes from npm (``make setup`` installs it under ``.build/npm``)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from decnet_attr.server.overview import OVERVIEW_INTERVAL
from tests.browser.conftest import (
    ARTIFACTS,
    ROOT,
    WAIT,
    Api,
    BrowserPage,
    ServeProcess,
    requires_chromium,
)

pytestmark = [requires_chromium, pytest.mark.timeout(90)]

AXE = ROOT / ".build" / "npm" / "node_modules" / "axe-core" / "axe.min.js"
NEW_ADMIN_PASSWORD = "A much better admin passw0rd"
SENSOR_PASSWORD = "sensor password 1234"
SHELL = "environmental.shell_type"
STYLE = "cognitive.exploration_style"
#: How soon an alert must be in the feed after the ingest's 202.
ALERT_DEADLINE = 1.0


class Fleet:
    def __init__(self, server: ServeProcess) -> None:
        self.server = server
        self.sensor = Api(server.base)
        self.ts = time.time() - 3600.0

    def ingest(self, attacker: str, primitive: str, *values: str, step: float = 1.0) -> None:
        items = []
        for v in values:
            self.ts += step
            items.append(
                {"attacker_uuid": attacker, "primitive": primitive, "value": v, "ts": self.ts}
            )
        body = self.sensor.call("POST", "/api/v1/observations", items)
        assert body["accepted"] == len(items), body

    def register(self, ip: str) -> str:
        return str(self.sensor.call("POST", "/api/v1/attackers", {"ip": ip})["uuid"])


def admin_token(serve: ServeProcess) -> str:
    assert serve.admin_password
    api = Api(serve.base)
    api.login("admin", serve.admin_password)
    body = api.call(
        "POST",
        "/api/v1/auth/change-password",
        {"old_password": serve.admin_password, "new_password": NEW_ADMIN_PASSWORD},
    )
    return str(body["access_token"])


def open_front_page(page: Any, serve: ServeProcess, token: str, query: str = "") -> None:
    from playwright.sync_api import expect

    page.goto(serve.base + "/", wait_until="domcontentloaded")
    page.evaluate("t => sessionStorage.setItem('decnet-attr.token', t)", token)
    page.goto(f"{serve.base}/#/{query}", wait_until="domcontentloaded")
    page.reload(wait_until="domcontentloaded")
    expect(page.get_by_test_id("overview-status")).to_have_attribute(
        "data-status", "connected", timeout=WAIT * 1000
    )


def axe_violations(page: Any) -> list[dict[str, Any]]:
    assert AXE.exists(), f"{AXE} is missing: run `make setup` (it installs axe-core from npm)"
    # evaluated through the DevTools protocol: the page's CSP does not apply
    page.evaluate(AXE.read_text() + "\n;0")
    result = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' '))}))"
    )
    return list(result)


def serious(violations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [v for v in violations if v["impact"] in ("serious", "critical")]


@pytest.fixture
def fleet(serve: ServeProcess) -> tuple[Fleet, str]:
    serve.start(expect_password=True)
    token = admin_token(serve)
    done = serve.users_cli("add", "sensor1", "--role", "sensor", stdin=f"{SENSOR_PASSWORD}\n")
    assert done.returncode == 0, done.stderr
    f = Fleet(serve)
    f.sensor.login("sensor1", SENSOR_PASSWORD)
    return f, token


def test_front_page_is_live(
    serve: ServeProcess, browser_page: BrowserPage, fleet: tuple[Fleet, str]
) -> None:
    from playwright.sync_api import expect

    f, token = fleet
    page = browser_page.page
    first = f.register("198.51.100.23")
    f.ingest(first, SHELL, "bash")
    open_front_page(page, serve, token)
    expect(page.get_by_test_id(f"attacker-row-{first}")).to_be_visible()
    expect(page.get_by_test_id("overview-attackers")).to_have_text("1")
    expect(page.get_by_test_id("alerts-feed").locator("li")).to_have_count(0)
    page.evaluate("window.__sameDocument = 7")

    # ---- a new attacker appears in the list, without a reload --------------------------
    second = f.register("203.0.113.9")
    f.ingest(second, SHELL, "bash")
    expect(page.get_by_test_id(f"attacker-row-{second}")).to_be_visible(timeout=WAIT * 1000)
    expect(page.get_by_test_id("overview-attackers")).to_have_text("2", timeout=WAIT * 1000)

    # ---- an alert: in the feed within a second of the sensor's 202 ----------------------
    f.ingest(first, SHELL, "bash", "bash", "zsh", "bash", "zsh")
    f.ingest(first, STYLE, "methodical", "chaotic", "methodical")
    t0 = time.monotonic()
    f.ingest(first, STYLE, "chaotic")
    item = page.get_by_test_id("alert-item").first
    expect(item).to_be_visible(timeout=ALERT_DEADLINE * 1000)
    took = time.monotonic() - t0
    assert took < ALERT_DEADLINE, took
    expect(item).to_contain_text("MULTI-ACTOR SUSPECTED")
    evidence = item.get_by_test_id("alert-evidence")
    expect(evidence).to_contain_text(SHELL)
    expect(evidence).to_contain_text(STYLE)
    expect(item.locator(f'a[href="#/attackers/{first}"]')).to_be_visible()
    # the list's badges follow (the row now carries the multi-actor marker)
    row = page.get_by_test_id(f"attacker-row-{first}")
    expect(row.get_by_test_id("multi-actor-marker")).to_be_visible(timeout=WAIT * 1000)
    expect(row).to_contain_text("MULTI-ACTOR 2")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "front-page.png"), full_page=True, animations="disabled")

    # ---- the overview's frame rate stays bounded under a fast ingest --------------------
    status = page.get_by_test_id("overview-status")
    before = int(status.get_attribute("data-frames"))
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 3.0:
        f.ingest(second, SHELL, *(["bash"] * 200), step=0.001)
        sent += 200
    elapsed = time.monotonic() - t0
    page.wait_for_timeout(OVERVIEW_INTERVAL * 3 * 1000)
    frames = int(status.get_attribute("data-frames")) - before
    bound = (elapsed + OVERVIEW_INTERVAL * 3) / OVERVIEW_INTERVAL + 2
    assert 2 <= frames <= bound, (frames, bound, sent)
    rate = page.get_by_test_id("rate-chart")
    assert int(rate.get_attribute("data-points")) >= 2
    assert page.evaluate("window.__sameDocument") == 7
    print(f"alert in the feed {took:.3f} s after the 202; {frames} frames for {sent} obs")

    # ---- axe-core with alerts and a flagged row on the page, then on the attacker page ------
    bad = serious(axe_violations(page))
    assert bad == [], json.dumps(bad, indent=1)
    page.get_by_test_id(f"attacker-row-{first}").get_by_role("link").click()
    expect(page.get_by_test_id("stream-status")).to_have_attribute("data-status", "connected")
    expect(page.get_by_test_id("multi-actor-banner")).to_be_visible()
    bad = serious(axe_violations(page))
    assert bad == [], json.dumps(bad, indent=1)

    problems = [line for line in browser_page.console if line.startswith("pageerror")]
    assert problems == [], problems


def test_filters_in_the_url_and_accessibility(
    serve: ServeProcess, browser_page: BrowserPage, fleet: tuple[Fleet, str]
) -> None:
    from playwright.sync_api import expect

    f, token = fleet
    page = browser_page.page
    uuids = {ip: f.register(ip) for ip in ("10.1.0.5", "10.1.0.6", "10.2.0.7")}
    for uuid in uuids.values():
        f.ingest(uuid, SHELL, "bash")
    open_front_page(page, serve, token)
    rows = page.locator("tbody tr[data-uuid]")
    expect(rows).to_have_count(3)

    # ---- a filter narrows the list (server-side) and goes into the URL ------------------
    page.locator("body").press("/")  # the search shortcut
    assert page.evaluate("document.activeElement.id") == "filter-ip"
    page.keyboard.type("10.1.0.0/24")
    page.keyboard.press("Enter")
    expect(rows).to_have_count(2)
    expect(page.get_by_test_id("list-range")).to_contain_text("of 2 matching")
    assert "ip=10.1.0.0%2F24" in page.url
    page.get_by_test_id("filter-sort_by").select_option("first_seen")
    expect(page.get_by_test_id(f"attacker-row-{uuids['10.1.0.5']}")).to_be_visible()
    assert "sort_by=first_seen" in page.url

    # ---- it survives a reload --------------------------------------------------------------
    page.reload(wait_until="domcontentloaded")
    expect(rows).to_have_count(2)
    expect(page.get_by_test_id("filter-ip")).to_have_value("10.1.0.0/24")
    expect(page.get_by_test_id("filter-sort_by")).to_have_value("first_seen")
    # newest first seen first (descending is the default order)
    assert [r.get_attribute("data-uuid") for r in rows.all()] == [
        uuids["10.1.0.6"],
        uuids["10.1.0.5"],
    ]

    # ---- keyboard: the filter form and the rows' links are reachable with Tab ---------------
    page.get_by_test_id("filter-clear").focus()
    page.keyboard.press("Enter")
    expect(rows).to_have_count(3)
    focused = []
    for _ in range(40):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.getAttribute('href') || ''"))
    assert any(h == f"#/attackers/{uuids['10.2.0.7']}" for h in focused), focused

    # ---- axe-core: no serious or critical violation -----------------------------------------
    violations = axe_violations(page)
    # axe ran: it exposes its version
    assert page.evaluate("typeof axe.version") == "string"
    print(f"axe-core: {[(v['id'], v['impact']) for v in violations]}")
    bad = serious(violations)
    assert bad == [], json.dumps(bad, indent=1)
