"""decnet_attr.identifiers: one attacker-uuid rule, one address normal form."""

from __future__ import annotations

import pytest

from decnet_attr.identifiers import is_attacker_uuid, normalise_ip


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("::FFFF:cb00:7107", "203.0.113.7"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%eth1", "fe80::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        (" 198.51.100.9 ", "198.51.100.9"),
    ],
)
def test_one_host_is_one_address(raw: str, canonical: str) -> None:
    assert normalise_ip(raw) == canonical


@pytest.mark.parametrize(
    "raw", ["", "999.1.1.1", "example.com", "1.2.3.4%eth0", 12, None, "1" * 65]
)
def test_not_addresses(raw: object) -> None:
    with pytest.raises(ValueError):
        normalise_ip(raw)


@pytest.mark.parametrize("value", ["att-1", "0b5e7a52-0000-4000-8000-00000000000a", "A" * 64, "x"])
def test_attacker_uuids_accepted(value: str) -> None:
    assert is_attacker_uuid(value)


@pytest.mark.parametrize(
    "value",
    ["", "a" * 65, "a b", "a/b", "<img src=x>", "abc\u202edef", "abc\n", "ünï", 5, None],
)
def test_attacker_uuids_refused(value: object) -> None:
    assert not is_attacker_uuid(value)
