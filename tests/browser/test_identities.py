"""The identity roll-up in a real browser against a real ``decnet-attr serve``:
an attacker's page shows its badges; two attackers then share a HASSH, and
without a reload the badge moves to the merged identity's state and the page
says which identity it rolls up to, with how many attackers and the linking
evidence; the identity page lists both attackers and the merge."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.browser.conftest import WAIT, Api, BrowserPage, ServeProcess, requires_chromium

pytestmark = [requires_chromium, pytest.mark.timeout(60)]

SHELL = "environmental.shell_type"
HASSH = "toolchain.ssh.hassh_client"
NEW_ADMIN_PASSWORD = "A much better admin passw0rd"
SENSOR_PASSWORD = "sensor password 1234"


def test_a_badge_moves_to_the_merged_identity_live(
    serve: ServeProcess, browser_page: BrowserPage
) -> None:
    from playwright.sync_api import expect

    serve.start(expect_password=True)
    assert serve.admin_password
    page: Any = browser_page.page
    done = serve.users_cli("add", "sensor1", "--role", "sensor", stdin=f"{SENSOR_PASSWORD}\n")
    assert done.returncode == 0, done.stderr
    sensor = Api(serve.base)
    sensor.login("sensor1", SENSOR_PASSWORD)
    a = sensor.call("POST", "/api/v1/attackers", {"ip": "198.51.100.31"})["uuid"]
    b = sensor.call("POST", "/api/v1/attackers", {"ip": "198.51.100.32"})["uuid"]
    ts = time.time() - 600

    def ingest(attacker: str, primitive: str, *values: str) -> None:
        nonlocal ts
        items = []
        for v in values:
            ts += 1
            items.append({"attacker_uuid": attacker, "primitive": primitive, "value": v, "ts": ts})
        assert sensor.call("POST", "/api/v1/observations", items)["accepted"] == len(items)

    ingest(a, SHELL, "bash", "bash", "bash")
    ingest(b, SHELL, "zsh", "zsh", "zsh")

    page.goto(serve.base + "/", wait_until="domcontentloaded")
    page.fill("#login-username", "admin")
    page.fill("#login-password", serve.admin_password)
    page.get_by_test_id("login-submit").click()
    page.fill("#cp-old", serve.admin_password)
    page.fill("#cp-new", NEW_ADMIN_PASSWORD)
    page.fill("#cp-confirm", NEW_ADMIN_PASSWORD)
    page.get_by_test_id("change-password-submit").click()
    page.get_by_test_id(f"attacker-row-{a}").click()
    expect(page.get_by_test_id("stream-status")).to_have_attribute("data-status", "connected")
    badge = page.get_by_test_id(f"attribution-badge-{SHELL}")
    expect(badge).to_have_attribute("data-state", "stable")
    rollup = page.get_by_test_id("identity-rollup")
    expect(rollup).to_contain_text("with 1 attacker.")

    reader = Api(serve.base)
    reader.login("admin", NEW_ADMIN_PASSWORD)
    # the two attackers share a fingerprint: their identities merge
    ingest(a, HASSH, "5ca1ab1e")
    ingest(b, HASSH, "5ca1ab1e")
    deadline = time.monotonic() + WAIT
    while True:
        ia = reader.call("GET", f"/api/v1/attackers/{a}/attribution")
        ib = reader.call("GET", f"/api/v1/attackers/{b}/attribution")
        if ia["identity_uuid"] == ib["identity_uuid"]:
            break
        assert time.monotonic() < deadline, "no merge"
        time.sleep(0.05)
    # read again: the first read may predate the merge's commit (when the
    # merged identity keeps a's uuid, the two uuids match from then on)
    ia = reader.call("GET", f"/api/v1/attackers/{a}/attribution")
    merged = {r["primitive"]: r for r in ia["primitives"]}[SHELL]
    assert merged["observation_count"] == 6 and merged["state"] != "stable"
    # live: the badge shows the merged identity's state, the page its roll-up
    expect(badge).to_have_attribute("data-state", merged["state"])
    expect(rollup).to_contain_text("with 2 attackers")
    expect(rollup).to_contain_text(HASSH)
    expect(page.get_by_test_id("rollup-evidence")).to_be_visible()
    assert page.url.endswith(f"#/attackers/{a}")  # no navigation happened

    # the identity page: both attackers and the merge
    rollup.get_by_role("link").click()
    view = page.get_by_test_id("identity-view")
    expect(view).to_be_visible()
    members = page.get_by_test_id("identity-members")
    expect(members.locator(f'tr[data-attacker="{a}"]')).to_be_visible()
    expect(members.locator(f'tr[data-attacker="{b}"]')).to_be_visible()
    expect(page.get_by_test_id("identity-merges").locator('li[data-kind="merged"]')).to_have_count(
        1
    )
    expect(page.get_by_test_id("identity-fingerprints")).to_contain_text("5ca1ab1e")
    expect(page.get_by_test_id("identity-badges")).to_contain_text(SHELL)
    errors = [c for c in browser_page.console if c.startswith(("error", "pageerror"))]
    assert not errors, errors
