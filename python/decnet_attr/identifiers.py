"""The one rule for attacker identifiers and the one normal form of attacker
addresses, shared by registration (``POST /api/v1/attackers``) and ingest.

Attacker uuids are 1 to 64 characters of ``[A-Za-z0-9-]``: enough for a UUID
in any of its usual spellings and for DECNET's own identifiers, and nothing a
log line, a URL path or an HTML page would interpret (no spaces, slashes,
markup or bidirectional controls).

Addresses are normalised so that one host is one attacker: an IPv4-mapped
IPv6 address (``::ffff:203.0.113.7``) becomes its IPv4 form, an IPv6 zone id
(``fe80::1%eth0``) is dropped (it names an interface of the sensor, not a
property of the attacker), and IPv6 is written in the canonical compressed
lower-case form (RFC 5952, as :mod:`ipaddress` writes it).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final

__all__ = [
    "ATTACKER_UUID_MAX",
    "ATTACKER_UUID_PROBLEM",
    "ATTACKER_UUID_RE",
    "IP_TEXT_MAX",
    "is_attacker_uuid",
    "normalise_ip",
]

ATTACKER_UUID_MAX: Final = 64
ATTACKER_UUID_RE: Final = re.compile(rf"^[A-Za-z0-9-]{{1,{ATTACKER_UUID_MAX}}}$")
#: The message of a uuid that breaks the rule.
ATTACKER_UUID_PROBLEM: Final = f"uuid must be 1-{ATTACKER_UUID_MAX} characters of [A-Za-z0-9-]"
#: Longest address text looked at (an IPv6 address with a zone id fits).
IP_TEXT_MAX: Final = 64


def is_attacker_uuid(value: object) -> bool:
    """True when ``value`` is a string that follows the attacker uuid rule."""
    return isinstance(value, str) and ATTACKER_UUID_RE.fullmatch(value) is not None


def normalise_ip(value: Any) -> str:
    """The canonical text of an IPv4/IPv6 address, or :class:`ValueError`.

    ``::ffff:a.b.c.d`` → ``a.b.c.d``; ``fe80::1%eth0`` → ``fe80::1``;
    ``2001:DB8:0:0::1`` → ``2001:db8::1``.
    """
    if not isinstance(value, str) or not value or len(value) > IP_TEXT_MAX:
        raise ValueError("ip must be an IPv4 or IPv6 address")
    text = value.strip()
    try:
        addr = ipaddress.ip_address(text.partition("%")[0] if ":" in text else text)
    except ValueError:
        raise ValueError(f"ip is not a valid IP address: {value[:IP_TEXT_MAX]!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)
