"""A pure-Python oracle of DECNET's v0 mergers, written from the rules in
docs/decnet.md#merge-dispatch to #merge-hash (not from the Rust code), plus our one deliberate
difference: list and dict values are compared by canonical JSON (sorted
keys, compact) instead of crashing.

It is slow and obvious on purpose: it recomputes from the whole series.
Every merger takes the thresholds (:class:`OThresholds`, DECNET's constants
by default).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
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
class OThresholds:
    window_n: int = WINDOW_N
    min_observations: int = MIN_OBS
    majority: int = MAJORITY
    alternation_min_len: int = ALTERNATION_MIN_LEN
    ewma_alpha: float = EWMA_ALPHA
    drift_mean_shift_pct: float = DRIFT_SHIFT
    conflict_dispersion_pct: float = CONFLICT_CV
    numeric_conflict_confidence: float = 0.5
    hash_drift_max: int = HASH_DRIFT_MAX
    hash_window_secs: float = HASH_WINDOW
    multi_actor_max_confidence: float = MULTI_ACTOR_MAX_CONF


DEFAULT = OThresholds()


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


def is_alternation(values: list[Any], t: OThresholds = DEFAULT) -> bool:
    r = values[-t.window_n :]
    if len(r) < t.alternation_min_len:
        return False
    if len({_Key(v) for v in r}) != 2:
        return False
    flips = sum(1 for a, b in pairwise(r) if _Key(a) != _Key(b))
    repeats = (len(r) - 1) - flips
    return flips >= 2 * max(repeats, 1)


def categorical(obs: list[dict[str, Any]], t: OThresholds = DEFAULT) -> OState:
    n = len(obs)
    last = obs[-1]
    last_ts = float(last["ts"])
    if n < t.min_observations:
        return OState(last["value"], "unknown", 0.0, n, last_ts)
    values = [o["value"] for o in obs]
    recent = values[-t.window_n :]
    top_value, top_count = _most_common(recent)
    confidence = top_count / len(recent)
    clear = top_count >= min(t.majority, len(recent))
    if not clear:
        if is_alternation(values, t):
            return OState(
                last["value"],
                "multi_actor",
                min(confidence, t.multi_actor_max_confidence),
                n,
                last_ts,
            )
        return OState(last["value"], "conflicted", confidence, n, last_ts)
    older = values[-2 * t.window_n : -t.window_n]
    if not older:
        state = "stable"
    else:
        older_top, older_count = _most_common(older)
        if older_count < min(t.majority, len(older)):
            state = "drifting"
        elif _Key(older_top) != _Key(top_value):
            state = "drifting"
        else:
            state = "stable"
    return OState(top_value, state, confidence, n, last_ts)


def _ewma(vals: list[float], alpha: float = EWMA_ALPHA) -> float:
    s = vals[0]
    for v in vals[1:]:
        s = alpha * v + (1 - alpha) * s
    return s


def numeric(obs: list[dict[str, Any]], t: OThresholds = DEFAULT) -> OState:
    n = len(obs)
    last = obs[-1]
    last_ts = float(last["ts"])
    if n < t.min_observations:
        return OState(_to_float(last["value"]), "unknown", 0.0, n, last_ts)
    recent = [_to_float(o["value"]) for o in obs[-t.window_n :]]
    older = [_to_float(o["value"]) for o in obs[-2 * t.window_n : -t.window_n]]
    mean = _ewma(recent, t.ewma_alpha)
    total = 0.0
    for v in recent:  # left-to-right, like the spec's Σ
        total += (v - mean) ** 2
    std = math.sqrt(total / len(recent))
    if mean == 0:
        cv = 0.0 if std == 0 else 1e9
    else:
        cv = std / abs(mean)
    if cv > t.conflict_dispersion_pct:
        return OState(mean, "conflicted", t.numeric_conflict_confidence, n, last_ts)
    conf = max(0.0, 1.0 - min(cv, 1.0))
    if older:
        older_mean = _ewma(older, t.ewma_alpha)
        shift = abs(mean - older_mean) / (abs(older_mean) or 1.0)
        if shift >= t.drift_mean_shift_pct:
            return OState(mean, "drifting", conf, n, last_ts)
    return OState(mean, "stable", conf, n, last_ts)


def hash_merger(obs: list[dict[str, Any]], t: OThresholds = DEFAULT) -> OState:
    n = len(obs)
    last = obs[-1]
    last_ts = float(last["ts"])
    cutoff = last_ts - t.hash_window_secs
    distinct = {
        _Key(o["value"]) for o in obs if float(o["ts"]) >= cutoff and o["value"] is not None
    }
    rotations = max(0, len(distinct) - 1)
    conf = 1 / (1 + rotations)
    if rotations == 0:
        state = "stable"
    elif rotations <= t.hash_drift_max:
        state = "drifting"
    else:
        state = "conflicted"
    return OState(last["value"], state, conf, n, last_ts)


def aggregate(
    obs: list[dict[str, Any]], value_kind: str | None = None, t: OThresholds = DEFAULT
) -> OState:
    if not obs:
        return OState(None, "unknown", 0.0, 0, 0.0)
    if value_kind in (None, "categorical"):
        return categorical(obs, t)
    if value_kind == "numeric":
        return numeric(obs, t)
    if value_kind == "hash":
        return hash_merger(obs, t)
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
