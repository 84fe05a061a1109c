"""The ``tune`` HTML report opens in Chromium with its charts, and loads
nothing from the network."""

from __future__ import annotations

from pathlib import Path

from decnet_attr.cli import main
from decnet_attr.tune.data import GenParams, generate, write_ndjson
from tests.browser.conftest import BrowserPage


def test_search_report_renders_its_charts(browser_page: BrowserPage, tmp_path: Path) -> None:
    data = tmp_path / "train.ndjson"
    write_ndjson(str(data), generate(2, GenParams(identities=3, length=24)))
    html = tmp_path / "report.html"
    assert (
        main(["tune", "search", str(data), "--trials", "45", "--workers", "1", "--html", str(html)])
        == 0
    )

    page = browser_page.page
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(html.as_uri())
    assert requests == [html.as_uri()]  # self-contained: nothing else fetched

    pareto = page.locator("svg#pareto")
    assert pareto.is_visible()
    box = pareto.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 200
    # every trial is a point; the defaults and the chosen point are marked
    assert page.locator("svg#pareto circle.pt").count() >= 45
    assert page.locator('svg#pareto circle[fill="#d33"]').count() == 1
    assert page.locator('svg#pareto circle[fill="#1a9c3a"]').count() == 1
    assert page.locator("svg#pareto-drift circle.pt").count() >= 45

    heat = page.locator("svg#confusion")
    assert heat.is_visible()
    assert page.locator("svg#confusion rect.cell").count() == 25
    # the cell colours follow the counts: not all the same
    fills = page.eval_on_selector_all(
        "svg#confusion rect.cell", "els => els.map(e => e.getAttribute('fill'))"
    )
    assert len(set(fills)) > 2

    bars = page.locator("svg#drift-delay rect.bar")
    assert bars.count() >= 1
    heights = page.eval_on_selector_all(
        "svg#drift-delay rect.bar", "els => els.map(e => e.getBBox().height)"
    )
    assert max(heights) > 50
    assert page.get_by_text("DECNET calibration scenarios").is_visible()
    assert not [c for c in browser_page.console if c.startswith(("error", "pageerror"))]


def test_evaluate_report_renders(browser_page: BrowserPage, tmp_path: Path) -> None:
    data = tmp_path / "set.ndjson"
    write_ndjson(str(data), generate(3, GenParams(identities=3, length=24)))
    html = tmp_path / "evaluate.html"
    given = '{"alternation_min_len": 5}'
    assert main(["tune", "evaluate", str(data), "--thresholds", given, "--html", str(html)]) == 0
    page = browser_page.page
    page.goto(html.as_uri())
    # the summary compares the given thresholds with the defaults
    assert page.locator("table").first.locator("th").all_inner_texts() == [
        "metric",
        "given",
        "defaults",
    ]
    assert page.locator("svg#confusion rect.cell").count() == 25
    assert page.locator("svg#drift-delay rect.bar").count() >= 1
    assert page.locator("td.pass").count() == 6
