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

from decnet_attr import _core

__all__ = [
    "ATTACKER_UUID_MAX",
    "ATTACKER_UUID_PROBLEM",
    "ATTACKER_UUID_RE",
    "IP_TEXT_MAX",
    "ip_key",
    "is_attacker_uuid",
    "normalise_ip",
]

#: The rule itself lives with the observation validator (Rust), so ingest and
#: registration cannot disagree; these are its Python faces.
ATTACKER_UUID_MAX: Final = _core.ATTACKER_UUID_MAX
ATTACKER_UUID_RE: Final = re.compile(rf"^[A-Za-z0-9-]{{1,{ATTACKER_UUID_MAX}}}$")
#: The message of a uuid that breaks the rule.
ATTACKER_UUID_PROBLEM: Final = f"uuid must be 1-{ATTACKER_UUID_MAX} characters of [A-Za-z0-9-]"
#: Longest address text looked at (an IPv6 address with a zone id fits).
IP_TEXT_MAX: Final = 64


def is_attacker_uuid(value: object) -> bool:
    """True when ``value`` is a string that follows the attacker uuid rule."""
    return isinstance(value, str) and _core.is_attacker_uuid(value)


def normalise_ip(value: Any) -> str:
    """The canonical text of an IPv4/IPv6 address, or :class:`ValueError`.

    ``::ffff:a.b.c.d`` → ``a.b.c.d``; ``fe80::1%eth0`` → ``fe80::1``;
    ``2001:DB8:0:0::1`` → ``2001:db8::1``.
    """
    if not isinstance(value, str) or not value or len(value) > IP_TEXT_MAX:
        raise ValueError("ip must be an IPv4 or IPv6 address")
    canonical = _core.normalise_ip(value)
    if canonical is None:
        raise ValueError(f"ip is not a valid IP address: {value[:IP_TEXT_MAX]!r}")
    return canonical


def ip_key(value: Any) -> str | None:
    """An address as 32 hex digits of its 128-bit value (IPv4 as the
    IPv4-mapped IPv6 address), so that a network is a range of keys; None
    for anything that is not an address."""
    if not isinstance(value, str):
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv4Address):
        addr = ipaddress.IPv6Address(f"::ffff:{addr}")
    return f"{int(addr):032x}"


def network_keys(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[str, str]:
    """The first and last :func:`ip_key` of a network."""
    lo, hi = net.network_address, net.broadcast_address
    return ip_key(str(lo)) or "", ip_key(str(hi)) or ""
