"""Logging set-up for the CLI (library code only uses
``logging.getLogger(__name__)``): plain text or one JSON object per line, a
filter that collapses floods of identical messages (never the audit log) and
one that takes credentials out of every line."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


#: Loggers whose records are never collapsed (one line per security event).
NEVER_COLLAPSED = ("decnet_attr.audit",)

#: Query parameters whose values are credentials.
SECRET_PARAMS = ("ticket", "token", "access_token", "jwt", "password", "secret", "api_key")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:" + "|".join(SECRET_PARAMS) + r")=)[^&;\s\"'#]*")
#: A JWT (three base64url parts, the first an encoded JSON object) wherever it appears.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with credentials replaced: the values of secret query
    parameters (``?ticket=…``, ``&token=…``), bearer tokens and anything
    shaped like a JWT."""
    if "=" in text:
        text = _SECRET_QUERY.sub(r"\g<1>" + REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(r"\g<1>" + REDACTED, text)
    return text


class RedactFilter(logging.Filter):
    """Rewrites a record whose message holds a credential (see :func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the formatter to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class RepeatFilter(logging.Filter):
    """Lets the first occurrence of a (logger, template) through, then at most
    one per ``interval`` seconds, saying how many similar ones were suppressed.
    Records of :data:`NEVER_COLLAPSED` loggers always pass."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name in NEVER_COLLAPSED:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._seen.get(key, (0.0, 0))
            if last and now - last < self.interval:
                self._seen[key] = (last, suppressed + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 10_000:
                self._seen.clear()
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar suppressed)"
        return True


def configure_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
