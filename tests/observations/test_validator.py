"""The one validator against the documented rules (README, "Observation
rules"): a reference written from that table decides accept/refuse and the
code for generated items, and the Rust validator must agree on every one."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decnet_attr.config import Settings
from decnet_attr.observations import normalise_ip, rejection_codes, validate
from decnet_attr.registry import registry

PRIMS = sorted(registry().primitives)
NUMERIC = [p for p in PRIMS if registry().primitives[p].merger_kind == "numeric"]
FIELDS = {
    "attacker_uuid",
    "primitive",
    "value",
    "ts",
    "attacker_ip",
    "confidence",
    "evidence_ref",
    "id",
    "window",
    "source",
    "identity_ref",
    "v",
}
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
ATTACKER_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
MAX_VALUE = 8192
TS_MIN = 0.0
NOW = 1_800_000_000.0  # the validation's "now"
TS_MAX = NOW + Settings().ts_max_ahead


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


def _numeric_ok(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, (int, float)):
        return math.isfinite(float(v))
    if isinstance(v, str):
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False
    return False


def _text(v: Any, limit: int) -> bool:
    return v is None or (isinstance(v, str) and 0 < len(v) <= limit)


def expected(item: Any) -> str | None:
    """The README table, in its order: the first rule an item breaks."""
    if not isinstance(item, dict):
        return "not_object"
    if set(item) - FIELDS:
        return "unknown_field"
    a = item.get("attacker_uuid")
    if not (isinstance(a, str) and ATTACKER_RE.fullmatch(a)):
        return "bad_attacker_uuid"
    p = item.get("primitive")
    if not (isinstance(p, str) and 0 < len(p) <= 200):
        return "bad_primitive"
    if p not in registry().primitives:
        return "unknown_primitive"
    if "value" not in item:
        return "missing_value"
    v = item["value"]
    if _depth(v) > 32:
        return "value_too_deep"
    if len(orjson.dumps(v, option=orjson.OPT_SORT_KEYS)) > MAX_VALUE:
        return "value_too_large"
    if p in NUMERIC and not _numeric_ok(v):
        return "value_not_numeric"
    if not _num(item.get("ts")):
        return "bad_ts"
    if not TS_MIN <= item["ts"] <= TS_MAX:
        return "ts_out_of_range"
    c = item.get("confidence")
    if c is not None and not (_num(c) and 0 <= c <= 1):
        return "bad_confidence"
    i = item.get("id")
    if not (isinstance(i, str) and ID_RE.match(i)):
        return "bad_id"
    w = item.get("window")
    if w is not None:
        if not (
            isinstance(w, dict)
            and set(w) == {"start_ts", "end_ts"}
            and _num(w["start_ts"])
            and _num(w["end_ts"])
        ):
            return "bad_window"
        if w["end_ts"] < w["start_ts"]:
            return "bad_window"
    if not _text(item.get("source"), 512):
        return "bad_source"
    if not _text(item.get("evidence_ref"), 512):
        return "bad_evidence_ref"
    if not _text(item.get("identity_ref"), 128):
        return "bad_identity_ref"
    if "v" in item and not (type(item["v"]) is int and item["v"] == 1):
        return "bad_version"
    ip = item.get("attacker_ip")
    if ip is not None:
        if not isinstance(ip, str) or len(ip) > 64:
            return "bad_attacker_ip"
        try:
            text = ip.strip()
            ipaddress.ip_address(text.split("%")[0] if ":" in text else text)
        except ValueError:
            return "bad_attacker_ip"
    for name in ("source", "evidence_ref", "identity_ref"):
        if isinstance(item.get(name), str) and "\x00" in item[name]:
            return "nul_character"
    return None


ids = st.one_of(
    st.from_regex(ID_RE, fullmatch=True),
    st.text(max_size=6),
    st.integers(-5, 5),
    st.none(),
    st.just("x" * 129),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=8,
)
deep = st.integers(30, 40).map(lambda n: orjson.loads("[" * n + "1" + "]" * n))
numbers = st.one_of(
    st.floats(-10.0, 2e9, allow_nan=False),
    st.integers(-5, 2 * 10**9),
    st.sampled_from([TS_MAX, TS_MAX + 1.0]),
    st.text(max_size=3),
)
texts = st.one_of(st.none(), st.text(max_size=8), st.just(""), st.just("e" * 513), st.just("a\x00"))
windows = st.one_of(
    st.none(),
    st.fixed_dictionaries({"start_ts": numbers, "end_ts": numbers}),
    st.just([1, 2]),
    st.fixed_dictionaries({"start_ts": numbers}),
)
ips = st.one_of(
    st.none(),
    st.ip_addresses().map(str),
    st.just("::ffff:203.0.113.7"),
    st.just("fe80::1%eth0"),
    st.just("300.1.1.1"),
    st.integers(-5, 5),
)
items = st.fixed_dictionaries(
    {
        "attacker_uuid": st.one_of(ids, st.from_regex(ATTACKER_RE, fullmatch=True)),
        "primitive": st.one_of(st.sampled_from(PRIMS), st.just("no.such.prim"), st.none()),
        "ts": numbers,
    },
    optional={
        "value": st.one_of(values, deep, st.just("x" * 9000), st.just("12.5")),
        "id": ids,
        "confidence": st.one_of(st.none(), st.floats(-1, 2, allow_nan=False), st.booleans()),
        "window": windows,
        "source": texts,
        "evidence_ref": texts,
        "identity_ref": texts,
        "attacker_ip": ips,
        "v": st.one_of(st.just(1), st.just(2), st.just(True), st.just("1")),
        "extra": st.just(1),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(items, st.integers(-5, 5), st.text(max_size=3)), min_size=1, max_size=8))
def test_the_validator_follows_the_documented_rules(batch: list[Any]) -> None:
    got = validate(orjson.dumps(batch), Settings(), now=NOW)
    codes = {i: code for i, code, _msg in got.rejected}
    accepted = set(got.indexes)
    seen: set[str] = set()
    for i, item in enumerate(batch):
        want = expected(item)
        if want is None and item["id"] in seen:
            want = "duplicate"
        if want is None:
            seen.add(item["id"])
            assert i in accepted, (item, codes.get(i))
        else:
            assert codes.get(i) == want, (item, codes.get(i), want)
    assert set(codes.values()) <= set(rejection_codes())


def test_accepted_items_come_back_canonical() -> None:
    item = {
        "attacker_uuid": "a-1",
        "primitive": "environmental.shell_type",
        "value": {"b": [1, 2.5], "a": None},
        "ts": 1_700_000_000,
        "id": "o1",
        "attacker_ip": "::ffff:203.0.113.7",
    }
    got = validate(orjson.dumps(item), Settings())
    (line,) = got.ndjson().splitlines()
    assert orjson.loads(line) == {
        "primitive": "environmental.shell_type",
        "value": {"a": None, "b": [1, 2.5]},
        "confidence": None,
        "window": None,
        "source": None,
        "evidence_ref": "obs:o1",
        "identity_ref": None,
        "id": "o1",
        "ts": 1_700_000_000.0,
        "v": 1,
        "attacker_uuid": "a-1",
        "attacker_ip": "203.0.113.7",
    }


def test_one_host_one_address() -> None:
    assert normalise_ip("::ffff:203.0.113.7") == normalise_ip("203.0.113.7") == "203.0.113.7"
    assert normalise_ip("fe80::1%eth0") == normalise_ip("fe80::1%eth1") == "fe80::1"
    assert normalise_ip("not an ip") is None


def test_timestamps_outside_the_configured_range_are_refused() -> None:
    s = Settings(ts_min=946_684_800.0, ts_max_ahead=600.0)
    now = 1_800_000_000.0
    batch = [
        {
            "attacker_uuid": "a",
            "primitive": "environmental.shell_type",
            "value": "sh",
            "ts": ts,
            "id": f"t{i}",
        }
        for i, ts in enumerate([1e30, now + 601, now + 599, 0.0, -1e9, 946_684_800.0])
    ]
    got = validate(orjson.dumps(batch), s, now=now)
    assert got.indexes == [2, 5]
    assert [(i, c) for i, c, _m in got.rejected] == [
        (0, "ts_out_of_range"),
        (1, "ts_out_of_range"),
        (3, "ts_out_of_range"),
        (4, "ts_out_of_range"),
    ]


def test_a_batch_names_its_keys_once_each_in_first_seen_order() -> None:
    def item(i: int, attacker: str, primitive: str) -> dict[str, Any]:
        return {
            "attacker_uuid": attacker,
            "primitive": primitive,
            "value": "x",
            "ts": 1e9 + i,
            "id": f"o{i}",
        }

    shell, locale = "environmental.shell_type", "environmental.locale"
    order = [("a", shell), ("b", shell), ("a", locale), ("a", shell), ("c", shell), ("b", shell)]
    body = b"\n".join(orjson.dumps(item(i, a, p)) for i, (a, p) in enumerate(order))
    got = validate(body, Settings())
    # a and b are one identity; c has none yet and is left out
    keys = got.keys({"a": "i1", "b": "i1"})
    assert keys == [("i1", shell), ("i1", locale)]
    assert got.keys({"a": "i1", "b": "i2"}, [1, 3, 5]) == [("i2", shell), ("i1", shell)]
    assert got.keys({}) == []
