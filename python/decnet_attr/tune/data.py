"""Labelled observation series.

One NDJSON line per observation: the observation itself (``identity_uuid``,
``primitive``, ``value``, ``ts``) plus ``label``, the ground truth at that
point of the key's series::

    {"state": "stable",          # expected state of the key after this observation
     "family": "drift_numeric",  # which generator made it (free text in exports)
     "change_point": false,      # the behaviour changed at this observation
     "operator": "A",            # who produced it
     "multi_actor": false,       # the identity is really several operators
     "stationary": true}         # the key's behaviour never changes (flapping counts here)

A ``state`` of null means "not labelled" (an analyst's export before it is
filled in): such observations are replayed but not scored.

The generator families are seeded and parameterised; the same seed and
parameters give byte-identical output.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from decnet_attr import STATES as STATES

#: Under this many observations of a key the truth is "unknown": too little
#: evidence for anyone to call it (DECNET's own scenario: two observations
#: stay unknown).
TRUTH_MIN_OBS = 3

#: Observations after a change point that are labelled ``drifting`` (the
#: behaviour is moving) before the new value counts as the stable habit.
DRIFT_SPAN = 10

SESSION_SECS = 3600.0
TS0 = 1.75e9

CATEGORICAL = {
    "environmental.shell_type": ("bash", "zsh", "fish", "powershell"),
    "motor.input_modality": ("typed", "pasted", "mixed"),
    "environmental.keyboard_layout": ("qwerty", "azerty", "qwertz"),
    "environmental.terminal_multiplexer": ("none", "tmux", "screen"),
    "cognitive.exploration_style": ("methodical", "chaotic", "targeted"),
}
NUMERIC = ("toolchain.c2.beacon_interval_ms", "toolchain.c2.beacon_jitter_cv")
HASHES = ("toolchain.ssh.hassh_client", "toolchain.tls.ja3_client")


@dataclass(frozen=True)
class GenParams:
    """Size and noise of the generated families."""

    identities: int = 20  # per family
    length: int = 30  # observations per key (sessions per identity)
    outlier_rate: float = 0.08  # steady operator: share of off-habit values
    numeric_noise: float = 0.05  # relative noise of a numeric habit
    shift_min: float = 1.6  # numeric level shift factor range
    shift_max: float = 3.0
    share_min: float = 0.55  # interleaved operators: the main one's share
    share_max: float = 0.8
    families: tuple[str, ...] = field(default=())  # empty = all


Obs = dict[str, Any]
Family = Callable[[random.Random, GenParams, str, float], list[Obs]]


def _hash(rnd: random.Random) -> str:
    return f"{rnd.getrandbits(64):016x}"


def _truth_steady(i: int) -> str:
    return "unknown" if i < TRUTH_MIN_OBS - 1 else "stable"


def _drift_truth(i: int, change: int) -> str:
    if i < TRUTH_MIN_OBS - 1:
        return "unknown"
    if change <= i < change + DRIFT_SPAN:
        return "drifting"
    return "stable"


def _obs(
    ident: str,
    prim: str,
    value: Any,
    ts: float,
    state: str,
    family: str,
    *,
    operator: str = "A",
    change: bool = False,
    multi: bool = False,
    stationary: bool = True,
) -> Obs:
    return {
        "identity_uuid": ident,
        "primitive": prim,
        "value": value,
        "ts": ts,
        "label": {
            "state": state,
            "family": family,
            "change_point": change,
            "operator": operator,
            "multi_actor": multi,
            "stationary": stationary,
        },
    }


def _habit(rnd: random.Random) -> dict[str, Any]:
    """One operator's habits: a value per categorical primitive, a level per
    numeric one, a tool hash per hash primitive."""
    h: dict[str, Any] = {p: rnd.choice(vals) for p, vals in CATEGORICAL.items()}
    h["toolchain.c2.beacon_interval_ms"] = rnd.choice([2000.0, 5000.0, 10000.0, 30000.0])
    h["toolchain.c2.beacon_jitter_cv"] = rnd.choice([0.1, 0.2, 0.4])
    for p in HASHES:
        h[p] = _hash(rnd)
    return h


def _noisy(rnd: random.Random, level: float, noise: float) -> float:
    return round(level * (1.0 + rnd.gauss(0.0, noise)), 3)


def steady(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """One operator, every primitive a habit, with occasional outliers."""
    h = _habit(rnd)
    out = []
    for i in range(gp.length):
        ts = t0 + i * SESSION_SECS
        truth = _truth_steady(i)
        for p, vals in CATEGORICAL.items():
            v = rnd.choice(vals) if rnd.random() < gp.outlier_rate else h[p]
            out.append(_obs(ident, p, v, ts, truth, "steady"))
        for p in NUMERIC:
            level = h[p] * (2.5 if rnd.random() < gp.outlier_rate / 2 else 1.0)
            out.append(_obs(ident, p, _noisy(rnd, level, gp.numeric_noise), ts, truth, "steady"))
        for p in HASHES:
            out.append(_obs(ident, p, h[p], ts, truth, "steady"))
    return out


def _change_point(rnd: random.Random, gp: GenParams) -> int:
    lo = max(TRUTH_MIN_OBS + 5, gp.length // 3)
    hi = max(lo, gp.length - DRIFT_SPAN - 2)
    return rnd.randint(lo, hi)


def drift_categorical(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """A categorical habit switches for good at a known change point (the
    other primitives stay steady)."""
    h = _habit(rnd)
    prim = rnd.choice(sorted(CATEGORICAL))
    new = rnd.choice([v for v in CATEGORICAL[prim] if v != h[prim]])
    change = _change_point(rnd, gp)
    out = []
    for i in range(gp.length):
        ts = t0 + i * SESSION_SECS
        v = h[prim] if i < change else new
        out.append(
            _obs(
                ident,
                prim,
                v,
                ts,
                _drift_truth(i, change),
                "drift_categorical",
                change=i == change,
                stationary=False,
            )
        )
        out.append(
            _obs(
                ident,
                "toolchain.c2.beacon_interval_ms",
                _noisy(rnd, h["toolchain.c2.beacon_interval_ms"], gp.numeric_noise),
                ts,
                _truth_steady(i),
                "drift_categorical",
            )
        )
    return out


def drift_numeric(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """A numeric level (e.g. the beacon interval) shifts at a change point."""
    prim = "toolchain.c2.beacon_interval_ms"
    level = rnd.choice([2000.0, 5000.0, 10000.0])
    factor = rnd.uniform(gp.shift_min, gp.shift_max)
    if rnd.random() < 0.5:
        factor = 1.0 / factor
    change = _change_point(rnd, gp)
    out = []
    for i in range(gp.length):
        ts = t0 + i * SESSION_SECS
        lv = level if i < change else level * factor
        out.append(
            _obs(
                ident,
                prim,
                _noisy(rnd, lv, gp.numeric_noise),
                ts,
                _drift_truth(i, change),
                "drift_numeric",
                change=i == change,
                stationary=False,
            )
        )
    return out


def _two_operators(rnd: random.Random) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    a, b = _habit(rnd), _habit(rnd)
    prims = sorted(CATEGORICAL)
    differ = rnd.sample(prims, rnd.randint(2, 3))
    for p in prims:
        if p in differ:
            if b[p] == a[p]:
                b[p] = rnd.choice([v for v in CATEGORICAL[p] if v != a[p]])
        else:
            b[p] = a[p]
    return a, b, differ


def _shared(
    rnd: random.Random, gp: GenParams, ident: str, t0: float, family: str, who: list[str]
) -> list[Obs]:
    a, b, differ = _two_operators(rnd)
    out = []
    for i, op in enumerate(who):
        ts = t0 + i * SESSION_SECS
        h = a if op == "A" else b
        for p in CATEGORICAL:
            truth = (
                "unknown" if i < TRUTH_MIN_OBS - 1 else ("multi_actor" if p in differ else "stable")
            )
            out.append(_obs(ident, p, h[p], ts, truth, family, operator=op, multi=True))
    return out


def multi_alternating(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """Two operators take turns on one identity (A B A B …); they differ on
    two or three primitives and agree on the others."""
    start = rnd.randrange(2)
    who = ["AB"[(i + start) % 2] for i in range(gp.length)]
    return _shared(rnd, gp, ident, t0, "multi_alternating", who)


def multi_interleaved(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """Two operators with unequal shares, sessions interleaved at random."""
    share = rnd.uniform(gp.share_min, gp.share_max)
    who = ["A" if rnd.random() < share else "B" for _ in range(gp.length)]
    if "B" not in who:
        who[rnd.randrange(len(who))] = "B"
    return _shared(rnd, gp, ident, t0, "multi_interleaved", who)


def hash_updates(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """A tool fingerprint that changes for good now and then (an update):
    drifting for a while after each, stable otherwise."""
    prim = rnd.choice(HASHES)
    change = _change_point(rnd, gp)
    old, new = _hash(rnd), _hash(rnd)
    out = []
    for i in range(gp.length):
        ts = t0 + i * SESSION_SECS
        out.append(
            _obs(
                ident,
                prim,
                old if i < change else new,
                ts,
                _drift_truth(i, change),
                "hash_updates",
                change=i == change,
                stationary=False,
            )
        )
    return out


def hash_two_toolchains(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """One operator using two toolchains side by side: neither a drift nor
    several operators — two live values, ``conflicted``."""
    prim = rnd.choice(HASHES)
    tools = (_hash(rnd), _hash(rnd))
    out = []
    first_both = None
    for i in range(gp.length):
        ts = t0 + i * SESSION_SECS
        v = tools[rnd.randrange(2)] if i else tools[0]
        if v == tools[1] and first_both is None:
            first_both = i
        truth = "stable" if first_both is None else "conflicted"
        if i < TRUTH_MIN_OBS - 1:
            truth = "unknown"
        out.append(_obs(ident, prim, v, ts, truth, "hash_two_toolchains"))
    return out


def sparse(rnd: random.Random, gp: GenParams, ident: str, t0: float) -> list[Obs]:
    """Keys seen once or twice (or only with an empty hash): unknown."""
    h = _habit(rnd)
    out = []
    for p in rnd.sample(sorted(CATEGORICAL) + list(NUMERIC), 3):
        for i in range(rnd.randint(1, TRUTH_MIN_OBS - 1)):
            v = _noisy(rnd, h[p], gp.numeric_noise) if p in NUMERIC else h[p]
            out.append(_obs(ident, p, v, t0 + i * SESSION_SECS, "unknown", "sparse"))
    return out


FAMILIES: dict[str, Family] = {
    "steady": steady,
    "drift_categorical": drift_categorical,
    "drift_numeric": drift_numeric,
    "multi_alternating": multi_alternating,
    "multi_interleaved": multi_interleaved,
    "hash_updates": hash_updates,
    "hash_two_toolchains": hash_two_toolchains,
    "sparse": sparse,
}


def generate(seed: int, params: GenParams | None = None) -> list[Obs]:
    """The labelled observations of every family, in ts order per key;
    identities are ``<family>-<seed>-<n>`` so two seeds never collide."""
    gp = params or GenParams()
    names = gp.families or tuple(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    out: list[Obs] = []
    for fi, name in enumerate(names):
        # one stream per family: adding a family does not reshuffle the others
        rnd = random.Random(f"{seed}:{name}")
        for n in range(gp.identities):
            ident = f"{name}-{seed}-{n:05d}"
            t0 = TS0 + (fi * gp.identities + n) * 7.0
            out.extend(FAMILIES[name](rnd, gp, ident, t0))
    return out


def size_for(target_obs: int, params: GenParams) -> GenParams:
    """``params`` with as many identities per family as it takes to make
    about ``target_obs`` observations."""
    probe = generate(0, GenParams(**{**params.__dict__, "identities": 4}))
    per_identity = max(1.0, len(probe) / 4)
    n = max(1, round(target_obs / per_identity))
    return GenParams(**{**params.__dict__, "identities": n})


def dumps(obs: Obs) -> bytes:
    return orjson.dumps(obs) + b"\n"


def write_ndjson(path: str, rows: list[Obs]) -> int:
    with open(path, "wb") as f:
        for o in rows:
            f.write(dumps(o))
    return len(rows)


def read_ndjson(path: str) -> Iterator[Obs]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{lineno}: not an object")
            yield item
