"""JSON error bodies (``{"detail": ...}``, FastAPI's shape, docs/decnet.md#http-errors) and the
middlewares that make every error of the API look like that.

Handlers raise the helpers below (aiohttp :class:`~aiohttp.web.HTTPException`
subclasses whose body is already JSON). :func:`error_middleware` converts the
HTTP exceptions aiohttp raises itself (404 for an unknown path, 405, 413 from
``client_max_size``, …) and turns any unexpected exception into a 500 whose body
never carries a traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.typedefs import Middleware

from decnet_attr.bus.base import RateLimitedLog
from decnet_attr.store import StoreUnavailable

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log, interval=10.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# ---- the exact detail strings of the contract (docs/decnet.md#http-errors) -----------------
CREDENTIALS_DETAIL = "Could not validate credentials"
BAD_LOGIN_DETAIL = "Invalid username or password"
MUST_CHANGE_DETAIL = "Password change required before accessing this resource"
FORBIDDEN_DETAIL = "Insufficient permissions"
ATTACKER_NOT_FOUND_DETAIL = "Attacker not found"
INTERNAL_DETAIL = "Internal Server Error"

JSON_CONTENT_TYPE = "application/json"


def json_body(data: Any) -> bytes:
    return orjson.dumps(data)


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response serialised with orjson (compact, UTF-8)."""
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def http_error(
    cls: type[web.HTTPException], detail: Any, headers: Mapping[str, str] | None = None
) -> web.HTTPException:
    return cls(
        text=orjson.dumps({"detail": detail}).decode(),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def retry_after_seconds(seconds: float) -> str:
    """``Retry-After`` value: whole seconds, rounded up, at least 1."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))


def bad_request(detail: Any) -> web.HTTPException:
    return http_error(web.HTTPBadRequest, detail)


def unauthorized(detail: str = CREDENTIALS_DETAIL) -> web.HTTPException:
    return http_error(web.HTTPUnauthorized, detail, {"WWW-Authenticate": "Bearer"})


def forbidden(detail: str = FORBIDDEN_DETAIL) -> web.HTTPException:
    return http_error(web.HTTPForbidden, detail)


def not_found(detail: str = "Not Found") -> web.HTTPException:
    return http_error(web.HTTPNotFound, detail)


def conflict(detail: Any) -> web.HTTPException:
    return http_error(web.HTTPConflict, detail)


def payload_too_large(detail: str, max_size: float = 0) -> web.HTTPException:
    return web.HTTPRequestEntityTooLarge(
        max_size,
        text=orjson.dumps({"detail": detail}).decode(),
        content_type=JSON_CONTENT_TYPE,
    )


def unsupported_media_type(detail: str) -> web.HTTPException:
    return http_error(web.HTTPUnsupportedMediaType, detail)


def unprocessable(detail: Any) -> web.HTTPException:
    return http_error(web.HTTPUnprocessableEntity, detail)


def too_many_requests(detail: str, retry_after: float) -> web.HTTPException:
    return http_error(
        web.HTTPTooManyRequests, detail, {"Retry-After": retry_after_seconds(retry_after)}
    )


def service_unavailable(
    detail: str, retry_after: float = 1.0, extra: Mapping[str, Any] | None = None
) -> web.HTTPException:
    body = {"detail": detail, **(extra or {})}
    return web.HTTPServiceUnavailable(
        text=orjson.dumps(body).decode(),
        content_type=JSON_CONTENT_TYPE,
        headers={"Retry-After": retry_after_seconds(retry_after)},
    )


async def read_json(request: web.Request) -> Any:
    """The request body parsed as JSON: 422 when it is missing, 400 when it
    is not JSON, 413 beyond the application's ``client_max_size``."""
    raw = await request.read()
    if not raw.strip():
        raise unprocessable("a JSON request body is required")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid JSON: {exc}") from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """:func:`read_json`, which must give an object (else 422)."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise unprocessable(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---- response headers ----------------------------------------------------------------------
#: What every response says in ``Server:`` (no product versions to fingerprint).
SERVER_HEADER = "decnet-attr"
#: Path prefix of the API: its answers (tokens, attacker data, errors) are
#: never stored by a browser or a proxy cache.
API_PREFIX = "/api/"


async def security_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: ``Server: decnet-attr`` everywhere and
    ``Cache-Control: no-store`` on API answers that set no policy of their own."""
    response.headers["Server"] = SERVER_HEADER
    if request.path.startswith(API_PREFIX):
        response.headers.setdefault("Cache-Control", "no-store")


# ---- middlewares ---------------------------------------------------------------------------
_DROP_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def _as_json(exc: web.HTTPException) -> web.StreamResponse:
    """An aiohttp HTTP exception as a JSON response (a JSON body is kept as is)."""
    if exc.content_type == JSON_CONTENT_TYPE and exc.body:
        body = exc.body
    else:
        text = (exc.text or "").strip()
        # aiohttp's default text is "<status>: <reason>"; keep anything more telling
        detail = text if text and not text.startswith(f"{exc.status}:") else exc.reason
        body = orjson.dumps({"detail": detail})
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _DROP_HEADERS}
    return web.Response(
        body=body,
        status=exc.status,
        reason=exc.reason,
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def make_error_middleware(counters: dict[str, int]) -> Middleware:
    """The middleware turning every error into ``{"detail": ...}``; counts 5xx
    answers in ``counters["http_5xx_total"]``."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:  # redirects and friends pass through untouched
                raise
            if exc.status >= 500:
                counters["http_5xx_total"] = counters.get("http_5xx_total", 0) + 1
            return _as_json(exc)
        except (ConnectionError, PayloadEncodingError) as exc:
            # The client went away (or broke its body) mid-request: its fault,
            # nobody is left to read an answer, and it is not worth a traceback.
            _rl.warning(
                "client-gone",
                "%s %s: incomplete request from a client: %s",
                request.method,
                request.path,
                type(exc).__name__,
            )
            return json_response({"detail": "Incomplete request"}, status=400)
        except StoreUnavailable as exc:
            counters["http_5xx_total"] = counters.get("http_5xx_total", 0) + 1
            log.warning("store unavailable during %s %s: %s", request.method, request.path, exc)
            return json_response(
                {"detail": "Service temporarily unavailable"},
                status=503,
                headers={"Retry-After": "1"},
            )
        except Exception:
            counters["http_5xx_total"] = counters.get("http_5xx_total", 0) + 1
            log.exception("unhandled error in %s %s", request.method, request.path)
            return json_response({"detail": INTERNAL_DETAIL}, status=500)

    return error_middleware


def is_json_type(mimetype: str) -> bool:
    """``application/json`` or a ``+json`` structured-syntax type."""
    return mimetype == JSON_CONTENT_TYPE or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def make_content_type_middleware(own_checks: Collection[str] = ()) -> Middleware:
    """The middleware answering 415 to a POST/PUT/PATCH body that is not JSON,
    as in DECNET (docs/decnet.md#rate-limits).

    ``own_checks``: the names of the routes that accept more than JSON and
    check the content type themselves (after authentication); they are
    skipped here.
    """
    skip = frozenset(own_checks)

    @web.middleware
    async def content_type_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method in ("POST", "PUT", "PATCH")
            and request.body_exists
            and request.match_info.http_exception is None  # unknown route: its 404/405 first
        ):
            route_name = request.match_info.route.name
            if route_name is None or route_name not in skip:
                if not is_json_type(request.content_type.lower()):
                    raise unsupported_media_type(
                        f"Unsupported Media Type: expected {JSON_CONTENT_TYPE}, "
                        f"got {request.content_type or 'none'}"
                    )
        return await handler(request)

    return content_type_middleware
