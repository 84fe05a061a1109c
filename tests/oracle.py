"""A pure-Python oracle of DECNET's v0 mergers, written from the rules in
reference §4.3–4.6 (not from the Rust code), plus our one deliberate
difference: list and dict values are compared by canonical JSON (sorted
keys, compact) instead of crashing.

It is slow and obvious on purpose: it recomputes from the whole series.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

WINDOW_N = 5
MIN_OBS = 3
MAJORITY = 4
ALTERNATION_MIN_LEN = 4
EWMA_ALPHA = 0.3
DRIFT_SHIFT = 0.30
CONFLICT_CV = 1.0
HASH_DRIFT_MAX = 2
HASH_WINDOW = 86400.0
MULTI_ACTOR_MAX_CONF = 0.6


@dataclass(frozen=True)
class OState:
    current_value: Any
    state: str
    confidence: float
    observation_count: int
    last_observation_ts: float


class _Key:
    """Hashable stand-in with Python equality for scalars and canonical
    JSON for lists/dicts."""

    __slots__ = ("k",)

    def __init__(self, v: Any) -> None:
        if isinstance(v, (list, tuple, dict)):
            self.k: Any = ("json", json.dumps(v, sort_keys=True, separators=(",", ":")))
        else:
            self.k = ("scalar", v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self.k == other.k

    def __hash__(self) -> int:
        return hash(self.k)


def _to_float(v: Any) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("not finite")
    return f


def _most_common(values: list[Any]) -> tuple[Any, int]:
    counts: Counter[_Key] = Counter(_Key(v) for v in values)
    # first key inserted among the maximal ones; the key object kept by
    # Counter is the first occurrence, whose raw value we return
    best = max(counts.values())
    for v in values:
        if counts[_Key(v)] == best:
            return v, best
    raise AssertionError


def is_alternation(values: list[Any]) -> bool:
    r = values[-WINDOW_N:]
    if len(r) < ALTERNATION_MIN_LEN:
        return False
    if len({_Key(v) for v in r}) != 2:
        return False
    flips = sum(1 for a, b in zip(r, r[1:]) if _Key(a) != _Key(b))
    repeats = (len(r) - 1) - flips
    return flips >= 2 * max(repeats, 1)


def categorical(obs: list[dict[str, Any]]) -> OState:
    n = len(obs)
    last = obs[-1]
    last_ts = float(last["ts"])
    if n < MIN_OBS:
        return OState(last["value"], "unknown", 0.0, n, last_ts)
    values = [o["value"] for o in obs]
    recent = values[-WINDOW_N:]
    top_value, top_count = _most_common(recent)
    confidence = top_count / len(recent)
    clear = top_count >= min(MAJORITY, len(recent))
    if not clear:
        if is_alternation(values):
            return OState(
                last["value"], "multi_actor", min(confidence, MULTI_ACTOR_MAX_CONF), n, last_ts
            )
        return OState(last["value"], "conflicted", confidence, n, last_ts)
    older = values[-2 * WINDOW_N : -WINDOW_N]
    if not older:
        state = "stable"
    else:
        older_top, older_count = _most_common(older)
        if older_count < min(MAJORITY, len(older)):
            state = "drifting"
        elif _Key(older_top) != _Key(top_value):
            state = "drifting"
        else:
            state = "stable"
    return OState(top_value, state, confidence, n, last_ts)


def _ewma(vals: list[float]) -> float:
    s = vals[0]
    for v in vals[1:]:
        s = EWMA_ALPHA * v + (1 - EWMA_ALPHA) * s
    return s


def numeric(obs: list[dict[str, Any]]) -> OState:
    n = len(obs)
    last = obs[-1]
    last_ts = float(last["ts"])
    if n < MIN_OBS:
        return OState(_to_float(last["value"]), "unknown", 0.0, n, last_ts)
    recent = [_to_float(o["value"]) for o in obs[-WINDOW_N:]]
    older = [_to_float(o["value"]) for o in obs[-2 * WINDOW_N : -WINDOW_N]]
    mean = _ewma(recent)
    total = 0.0
    for v in recent:  # left-to-right, like the spec's Σ
        total += (v - mean) ** 2
    std = math.sqrt(total / len(recent))
    if mean == 0:
        cv = 0.0 if std == 0 else 1e9
    else:
        cv = std / abs(mean)
    if cv > CONFLICT_CV:
        return OState(mean, "conflicted", 0.5, n, last_ts)
    conf = max(0.0, 1.0 - min(cv, 1.0))
    if older:
        older_mean = _ewma(older)
        shift = abs(mean - older_mean) / (abs(older_mean) or 1.0)
        if shift >= DRIFT_SHIFT:
            return OState(mean, "drifting", conf, n, last_ts)
    return OState(mean, "stable", conf, n, last_ts)


def hash_merger(obs: list[dict[str, Any]]) -> OState:
    n = len(obs)
    last = obs[-1]
    last_ts = float(last["ts"])
    cutoff = last_ts - HASH_WINDOW
    distinct = {
        _Key(o["value"]) for o in obs if float(o["ts"]) >= cutoff and o["value"] is not None
    }
    rotations = max(0, len(distinct) - 1)
    conf = 1 / (1 + rotations)
    if rotations == 0:
        state = "stable"
    elif rotations <= HASH_DRIFT_MAX:
        state = "drifting"
    else:
        state = "conflicted"
    return OState(last["value"], state, conf, n, last_ts)


def aggregate(obs: list[dict[str, Any]], value_kind: str | None = None) -> OState:
    if not obs:
        return OState(None, "unknown", 0.0, 0, 0.0)
    if value_kind in (None, "categorical"):
        return categorical(obs)
    if value_kind == "numeric":
        return numeric(obs)
    if value_kind == "hash":
        return hash_merger(obs)
    raise ValueError(value_kind)


def sort_series(arrivals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Series order: by ts, ties in arrival order (sorted() is stable)."""
    return sorted(arrivals, key=lambda o: float(o["ts"]))


def same(a: Any, b: Any) -> bool:
    """Compare an AttributionState (Rust) with an OState, exactly: floats
    bit-for-bit, current_value with its type."""

    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return ("f", v.hex())
        if isinstance(v, bool):
            return ("b", v)
        if isinstance(v, int):
            return ("i", v)
        if isinstance(v, (list, tuple, dict)):
            return ("j", json.dumps(v, sort_keys=True))
        return (type(v).__name__, v)

    return (
        norm(a.current_value) == norm(b.current_value)
        and a.state == b.state
        and a.confidence.hex() == float(b.confidence).hex()
        and a.observation_count == b.observation_count
        and float(a.last_observation_ts).hex() == float(b.last_observation_ts).hex()
    )
