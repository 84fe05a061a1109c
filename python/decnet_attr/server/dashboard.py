"""The analyst dashboard: ``/`` (the page) and ``/static/<file>`` (its script,
style sheet and icon), served from the package's ``static`` directory.

No build step and no templating: the files are read once at start-up and
served from memory. Only the files found there at start-up exist; any other
name, including every ``..`` or encoded variant, is a 404 without touching the
file system, so there is no path to traverse.

Caching: the page is ``no-cache`` (revalidated with its ETag every time); its
references to the assets carry ``?v=<content hash>`` (rewritten at start-up),
and an asset requested with its current hash is ``immutable`` for a year. An
asset requested without (or with an old) hash is ``no-cache`` + ETag; that is
how the modules ``app.js`` imports are fetched, so a browser revalidates them
(a 304 while unchanged) and never mixes old and new modules.

The page's facts: ``GET /api/v1/dashboard/config`` (viewer or admin) answers
``{"states": [...], "multi_actor_min_primitives": n}``, the state names and
the multi-actor minimum this deployment runs with, so that the script holds
no copy of either.

Every dashboard response carries a strict Content-Security-Policy (no inline
script or style, nothing from another origin, no framing), ``nosniff``,
``Referrer-Policy: no-referrer`` and ``X-Frame-Options: DENY``. The API routes
are not touched.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from decnet_attr import STATES
from decnet_attr.server.auth import READ_ROLES, Principal, require
from decnet_attr.server.errors import json_response, not_found
from decnet_attr.server.keys import SETTINGS

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_PATH",
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "STATIC_DIR",
    "Asset",
    "load_assets",
    "setup_dashboard",
]

#: Where the page and its assets live (packaged data).
STATIC_DIR: Final = Path(__file__).with_name("static")
INDEX: Final = "index.html"
#: The page's facts (state names, multi-actor minimum), read by facts.js.
CONFIG_PATH: Final = "/api/v1/dashboard/config"

CONTENT_SECURITY_POLICY: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

#: Content types by file suffix; files of other types are not served.
CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}

NO_CACHE: Final = "no-cache"
IMMUTABLE: Final = "public, max-age=31536000, immutable"
#: Largest static file loaded (a guard against a stray big file in the directory).
MAX_ASSET_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True)
class Asset:
    """One file, in memory."""

    name: str
    body: bytes
    content_type: str
    etag: str  # quoted strong ETag
    version: str  # short content hash used in ``?v=``


def _asset(name: str, body: bytes, content_type: str) -> Asset:
    digest = hashlib.sha256(body).hexdigest()
    return Asset(name, body, content_type, f'"{digest[:32]}"', digest[:12])


def load_assets(directory: Path = STATIC_DIR) -> tuple[Asset, dict[str, Asset]]:
    """The page (with versioned asset references) and the assets by name.

    Only regular files directly in ``directory`` with a known suffix are
    served; names starting with a dot are skipped. Raises FileNotFoundError
    when the page is missing.
    """
    assets: dict[str, Asset] = {}
    index_body: bytes | None = None
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file() or path.is_symlink():
            continue
        content_type = CONTENT_TYPES.get(path.suffix.lower())
        if content_type is None:
            continue
        body = path.read_bytes()
        if len(body) > MAX_ASSET_BYTES:
            log.warning("dashboard: %s is too large to serve (%d bytes)", path, len(body))
            continue
        if name == INDEX:
            index_body = body
            continue
        assets[name] = _asset(name, body, content_type)
    if index_body is None:
        raise FileNotFoundError(f"dashboard page {directory / INDEX} is missing")
    # Versioned references: "/static/app.js" -> "/static/app.js?v=<hash>".
    html = index_body.decode("utf-8")
    for name, asset in assets.items():
        for quote in ('"', "'"):
            html = html.replace(
                f"{quote}/static/{name}{quote}", f"{quote}/static/{name}?v={asset.version}{quote}"
            )
    index = _asset(INDEX, html.encode("utf-8"), CONTENT_TYPES[".html"])
    return index, assets


def _respond(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    headers = dict(SECURITY_HEADERS)
    headers["Cache-Control"] = cache_control
    headers["ETag"] = asset.etag
    if_none_match = request.headers.get("If-None-Match", "")
    if if_none_match:
        tags = {t.strip() for t in if_none_match.split(",")}
        if asset.etag in tags or f"W/{asset.etag}" in tags or "*" in tags:
            return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    return web.Response(body=asset.body, status=200, headers=headers)


@require(*READ_ROLES)
async def page_config(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The facts the dashboard's script needs from the server."""
    thresholds = request.app[SETTINGS].make_thresholds()
    return json_response(
        {
            "states": list(STATES),
            "multi_actor_min_primitives": int(thresholds.multi_actor_min_primitives),
        }
    )


def setup_dashboard(app: web.Application, directory: Path = STATIC_DIR) -> None:
    """Register ``GET /``, ``GET /static/{name}`` and ``GET`` :data:`CONFIG_PATH`
    on ``app``.

    A missing static directory is logged and the dashboard is left out (the
    API works without it)."""
    try:
        index, assets = load_assets(directory)
    except (FileNotFoundError, NotADirectoryError) as exc:
        log.warning("dashboard disabled: %s", exc)
        return

    async def page(request: web.Request) -> web.StreamResponse:
        return _respond(request, index, NO_CACHE)

    async def static(request: web.Request) -> web.StreamResponse:
        asset = assets.get(request.match_info.get("name", ""))
        if asset is None:
            raise not_found()
        immutable = request.query.get("v") == asset.version
        return _respond(request, asset, IMMUTABLE if immutable else NO_CACHE)

    app.router.add_get("/", page, name="dashboard")
    app.router.add_get("/static/{name}", static, name="dashboard_static")
    app.router.add_get(CONFIG_PATH, page_config, name="dashboard_config")
