"""The dashboard's static files: ``/`` and ``/static/<file>`` with their content
types, caching and security headers; no path traversal; no inline script."""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import web

from decnet_attr import STATES
from decnet_attr.server.dashboard import (
    CONFIG_PATH,
    CONTENT_SECURITY_POLICY,
    STATIC_DIR,
    load_assets,
    setup_dashboard,
)
from tests.server.conftest import Harness, HarnessFactory, bearer

SECURITY = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def assert_security_headers(headers: object) -> None:
    for name, value in SECURITY.items():
        assert headers[name] == value, name  # type: ignore[index]


def test_csp_is_strict() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY


async def test_index(harness: Harness) -> None:
    resp = await harness.client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_security_headers(resp.headers)
    assert resp.headers["Cache-Control"] == "no-cache"
    etag = resp.headers["ETag"]
    body = await resp.text()
    assert body.startswith("<!doctype html>")
    assert re.search(r'<script type="module" src="/static/app\.js\?v=[0-9a-f]{12}"></script>', body)
    assert re.search(r'href="/static/style\.css\?v=[0-9a-f]{12}"', body)

    again = await harness.client.get("/", headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""
    assert_security_headers(again.headers)

    head = await harness.client.head("/")
    assert head.status == 200
    assert head.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await head.read() == b""


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
async def test_static_files(harness: Harness, name: str, content_type: str) -> None:
    resp = await harness.client.get(f"/static/{name}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == content_type
    assert_security_headers(resp.headers)
    assert resp.headers["Cache-Control"] == "no-cache"
    assert await resp.read() == (STATIC_DIR / name).read_bytes()

    # the page's versioned reference is cacheable for good
    page = await (await harness.client.get("/")).text()
    m = re.search(rf"/static/{re.escape(name)}\?v=([0-9a-f]+)", page)
    assert m is not None
    versioned = await harness.client.get(f"/static/{name}", params={"v": m.group(1)})
    assert versioned.status == 200
    assert versioned.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    stale = await harness.client.get(f"/static/{name}", params={"v": "000000000000"})
    assert stale.headers["Cache-Control"] == "no-cache"

    cached = await harness.client.get(
        f"/static/{name}", headers={"If-None-Match": resp.headers["ETag"]}
    )
    assert cached.status == 304


async def test_unknown_static_file_is_404(harness: Harness) -> None:
    resp = await harness.client.get("/static/nope.js")
    assert resp.status == 404
    assert await resp.json() == {"detail": "Not Found"}
    # the page itself is only served at "/"
    assert (await harness.client.get("/static/index.html")).status == 404


TRAVERSALS = [
    "/static/../app.py",
    "/static/../dashboard.py",
    "/static/..%2fdashboard.py",
    "/static/..%2Fdashboard.py",
    "/static/%2e%2e/dashboard.py",
    "/static/%2e%2e%2fdashboard.py",
    "/static/%2E%2E%2Fdashboard.py",
    "/static/.%2e/dashboard.py",
    "/static/%252e%252e%252fdashboard.py",
    "/static/..%5cdashboard.py",
    "/static/..\\dashboard.py",
    "/static/%2e%2e%2f%2e%2e%2fconfig.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/app.js%00.py",
    "/static/./app.py",
    "/static/app.js/",
    "/static/",
    "/static",
    "/static/.hidden",
]


async def _raw_get(host: str, port: int, target: str) -> tuple[int, bytes]:
    """Send ``target`` exactly as written (no client-side URL normalisation)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(raw.split(b" ", 2)[1])
    return status, raw


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_no_path_traversal(harness: Harness, target: str) -> None:
    server = harness.client.server
    assert server.host is not None and server.port is not None
    status, raw = await _raw_get(server.host, server.port, target)
    assert status == 404, raw[:300]
    assert b"from __future__" not in raw
    assert b"root:" not in raw


class _PageAudit(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = False
        self.in_script = False
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
            self.in_script = True
        if tag == "style":
            self.problems.append("<style> element")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"event handler attribute {name} on <{tag}>")
            if name == "style":
                self.problems.append(f"style attribute on <{tag}>")
            if name in ("src", "href", "action") and value and re.match(r"^\w+:|^//", value):
                if not value.startswith("#"):
                    self.problems.append(f"external or scheme URL {value!r}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.inline_script = True


@pytest.mark.parametrize("source", ["file", "served"])
async def test_no_inline_script(harness: Harness, source: str) -> None:
    if source == "file":
        html = (STATIC_DIR / "index.html").read_text()
    else:
        html = await (await harness.client.get("/")).text()
    audit = _PageAudit()
    audit.feed(html)
    assert audit.scripts, "the page loads its script"
    assert all(s.get("src", "").startswith("/static/") for s in audit.scripts)  # type: ignore[union-attr]
    assert not audit.inline_script
    assert audit.problems == []


SCRIPTS = sorted(p.name for p in STATIC_DIR.glob("*.js"))
IMPORT = re.compile(r'^import\s[^;]*?from\s+"\./([\w.-]+\.js)";', re.MULTILINE | re.DOTALL)


def test_the_script_is_modules() -> None:
    """app.js is the entry point; every other script is a module it reaches."""
    assert "app.js" in SCRIPTS and len(SCRIPTS) > 2
    seen: set[str] = set()
    todo = ["app.js"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(IMPORT.findall((STATIC_DIR / name).read_text()))
    assert seen == set(SCRIPTS)


def test_script_modules_have_no_import_cycle() -> None:
    graph = {n: IMPORT.findall((STATIC_DIR / n).read_text()) for n in SCRIPTS}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name in done:
            return
        for dep in graph[name]:
            assert dep in graph, f"{name} imports a missing module {dep}"
            visit(dep, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_never_parses_html(script: str) -> None:
    """The script builds the DOM from text only (values come from attackers)."""
    source = (STATIC_DIR / script).read_text()
    js = re.sub(r"^\s*//.*$", "", source, flags=re.MULTILINE)  # code, not comments
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setAttribute("style"',
        "srcdoc",
    ):
        assert sink not in js, sink
    assert "http://" not in js.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in js
    assert "localStorage" not in js  # the token stays in this tab


def test_assets_are_flat_and_known(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<script type="module" src="/static/a.js"></script>')
    (tmp_path / "a.js").write_text("export {};")
    (tmp_path / "notes.md").write_text("not served")
    (tmp_path / ".secret.js").write_text("hidden")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.js").write_text("nested")
    index, assets = load_assets(tmp_path)
    assert sorted(assets) == ["a.js"]
    assert f'src="/static/a.js?v={assets["a.js"].version}"' in index.body.decode()


def test_missing_static_dir_leaves_the_api(tmp_path: Path) -> None:
    app = web.Application()
    setup_dashboard(app, tmp_path / "does-not-exist")
    assert [r.resource.canonical for r in app.router.routes() if r.resource] == []


async def test_every_script_is_served_as_javascript(harness: Harness) -> None:
    for name in SCRIPTS:
        resp = await harness.client.get(f"/static/{name}")
        assert resp.status == 200, name
        assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8", name
        assert_security_headers(resp.headers)


async def test_page_config_needs_a_reader(harness: Harness) -> None:
    resp = await harness.client.get(CONFIG_PATH)
    assert resp.status == 401
    sensor = await harness.token("sensor1", "sensor")
    assert (await harness.client.get(CONFIG_PATH, headers=bearer(sensor))).status == 403


async def test_page_config_gives_the_servers_facts(make_harness: HarnessFactory) -> None:
    """The script's state names and multi-actor minimum come from the server."""
    default = await make_harness()
    token = await default.token("viewer1")
    resp = await default.client.get(CONFIG_PATH, headers=bearer(token))
    assert resp.status == 200
    assert await resp.json() == {
        "states": list(STATES),
        "multi_actor_min_primitives": default.settings.make_thresholds().multi_actor_min_primitives,
    }
    tuned = await make_harness(thresholds='{"multi_actor_min_primitives": 3}')
    token = await tuned.token("viewer2")
    body = await (await tuned.client.get(CONFIG_PATH, headers=bearer(token))).json()
    assert body["multi_actor_min_primitives"] == 3
    for script in SCRIPTS:
        source = (STATIC_DIR / script).read_text()
        assert "MULTI_ACTOR_MIN_PRIMITIVES =" not in source or script == "facts.js", script
        assert '"conflicted"' not in source, script
