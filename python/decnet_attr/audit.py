"""The audit log: one line per security event, never collapsed.

Events go to the ``decnet_attr.audit`` logger at INFO (WARNING for refusals),
one line each, as ``audit <event> outcome=<outcome> user=<name>
address=<address> [key=value …]``. Values that are not plain tokens are
JSON-quoted, so an attacker-chosen username cannot forge a second line or a
field. With ``--log-format json`` the same fields are also separate keys
(``event``, ``outcome``, ``user``, ``address``, …).

:class:`decnet_attr.logs.RepeatFilter`, which collapses floods of identical
messages, never touches this logger: ten logins in a second are ten lines.

Events: ``login`` (ok / failed / throttled), ``logout`` (the token is
revoked), ``password_change`` (ok / failed / throttled; every older token is
cut off), ``ticket_refused`` (an SSE ticket that did not authenticate), and
from the ``users`` command ``user_added``, ``user_disabled`` and
``user_password_set`` (address ``local-cli``).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Final

__all__ = ["AUDIT_LOGGER", "audit", "audit_logger"]

AUDIT_LOGGER: Final = "decnet_attr.audit"
_PLAIN = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,128}$")
_log = logging.getLogger(AUDIT_LOGGER)


def audit_logger() -> logging.Logger:
    return _log


def _value(value: object) -> str:
    text = "-" if value is None else str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def audit(
    event: str,
    outcome: str,
    *,
    user: str | None,
    address: str | None,
    **fields: object,
) -> None:
    """Log one security event (WARNING when ``outcome`` is not ``ok``)."""
    parts = [f"audit {event} outcome={outcome}", f"user={_value(user)}"]
    parts.append(f"address={_value(address)}")
    parts.extend(f"{k}={_value(v)}" for k, v in fields.items())
    level = logging.INFO if outcome == "ok" else logging.WARNING
    extra: dict[str, object] = {
        "event": event,
        "outcome": outcome,
        "user": user,
        "address": address,
    }
    extra.update({f"audit_{k}": v for k, v in fields.items()})
    _log.log(level, "%s", " ".join(parts), extra=extra)
