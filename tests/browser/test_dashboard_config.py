"""The dashboard takes the multi-actor minimum from the server.

With ``multi_actor_min_primitives`` set to 3, two primitives in state
``multi_actor`` are no suspicion yet: the banner waits for the third. A page
that kept its own copy of the minimum (2, DECNET's default) would show it at
the second.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.browser.conftest import WAIT, BrowserPage, ServeProcess, requires_chromium
from tests.browser.test_dashboard import Scenario

pytestmark = [requires_chromium, pytest.mark.timeout(60)]

ANALYST_PASSWORD = "analyst password 1234"
SENSOR_PASSWORD = "sensor password 1234"
ALTERNATING: dict[str, tuple[str, ...]] = {
    "environmental.shell_type": ("zsh", "bash", "zsh", "bash"),
    "cognitive.exploration_style": ("methodical", "chaotic", "methodical", "chaotic"),
    "cognitive.cognitive_load": ("low", "high", "low", "high"),
}


def test_the_banner_follows_the_servers_minimum(
    serve: ServeProcess, browser_page: BrowserPage
) -> None:
    from playwright.sync_api import expect

    serve.env["DECNET_ATTR_THRESHOLDS"] = json.dumps({"multi_actor_min_primitives": 3})
    serve.start(expect_password=True)
    for name, role, password in (
        ("analyst", "viewer", ANALYST_PASSWORD),
        ("sensor1", "sensor", SENSOR_PASSWORD),
    ):
        done = serve.users_cli("add", name, "--role", role, stdin=f"{password}\n")
        assert done.returncode == 0, done.stderr
    s = Scenario(serve, browser_page)
    s.sensor.login("sensor1", SENSOR_PASSWORD)
    s.attacker = s.sensor.call("POST", "/api/v1/attackers", {"ip": "198.51.100.77"})["uuid"]
    page: Any = s.page

    page.goto(f"{serve.base}/#/attackers/{s.attacker}", wait_until="domcontentloaded")
    page.fill("#login-username", "analyst")
    page.fill("#login-password", ANALYST_PASSWORD)
    page.get_by_test_id("login-submit").click()
    expect(s.status()).to_have_attribute("data-status", "connected", timeout=WAIT * 1000)

    banner = page.get_by_test_id("multi-actor-banner")
    primitives = list(ALTERNATING)
    for primitive in primitives[:2]:
        s.ingest(primitive, *ALTERNATING[primitive])
        s.expect_state(primitive, "multi_actor", "MULTI-ACTOR", deadline=WAIT)
    expect(banner).to_be_hidden()

    third = primitives[2]
    s.ingest(third, *ALTERNATING[third])
    s.expect_state(third, "multi_actor", "MULTI-ACTOR", deadline=WAIT)
    expect(banner).to_be_visible(timeout=WAIT * 1000)
    for primitive in primitives:
        expect(banner).to_contain_text(primitive)
    assert not [line for line in s.console if "error" in line.lower()], s.console
