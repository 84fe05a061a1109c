"""Benchmark workloads shaped like DECNET's traffic.

A session end produces a burst of one observation per emitted primitive
(38 of them) for one attacker (reference §3.3). ``keys`` = identities × 38.
Values are mostly the identity's habit (80 %), otherwise random among the
registry's allowed values; hash primitives rotate 20 % of the time.
"""

from __future__ import annotations

import random
from typing import Any

import orjson

from decnet_attr.registry import registry

EMITTED = [p for p in registry().primitives.values() if p.decnet_emits]


def observations(
    keys: int, n: int, *, seed: int = 7, ts0: float = 1.7e9, sweep: bool = False
) -> list[dict[str, Any]]:
    """`n` observations over `keys` keys (identities × 38). Sessions pick a
    random identity, or with ``sweep`` go round-robin so every key exists."""
    rnd = random.Random(seed)
    idents = max(1, -(-keys // len(EMITTED)) if sweep else keys // len(EMITTED))
    out: list[dict[str, Any]] = []
    ts = ts0
    session = 0
    while len(out) < n:
        ident = session % idents if sweep else rnd.randrange(idents)
        session += 1
        ts += 1.0
        for spec in EMITTED:
            if spec.kind == "hash":
                value: Any = f"{rnd.getrandbits(64) if rnd.random() < 0.2 else ident:016x}"
            elif not spec.allowed:
                value = "en-US"
            else:
                pick = rnd.randrange(1 << 30) if rnd.random() < 0.2 else ident
                value = spec.allowed[pick % len(spec.allowed)]
            out.append(
                {
                    "identity_uuid": f"{ident:032x}",
                    "primitive": spec.name,
                    "value": value,
                    "ts": ts,
                    "confidence": 1.0,
                }
            )
    return out[:n]


def batches(obs: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [obs[i : i + size] for i in range(0, len(obs), size)]


def ndjson(batch: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(o) for o in batch) + b"\n"


def json_array(batch: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(batch)
