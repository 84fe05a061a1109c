"""Replay labelled series through the Rust engine and score the states.

The replay is arranged in *rounds*: round r holds the r-th observation of
every key (each key's series in ts order), serialised once as NDJSON bytes.
The engine returns one record per key touched by a batch, so after round r
every key's record is its state after its r-th observation; only the
records whose state changed are read (``IngestResult.changed()``), and the
per-observation prediction is filled in from them with numpy. A
configuration therefore costs one ``Engine.ingest_json`` per round and a
few array operations, with no Python per observation.

Metrics:

- confusion matrix of labelled state vs predicted state (per observation)
  and its macro-F1 over the states that occur in the labels;
- multi-actor precision and recall per identity: an identity is flagged
  when at some point at least ``multi_actor_min_primitives`` of its keys
  are ``multi_actor`` at once (when the worker raises its alert), and is
  truly multi-actor when its label says so;
- drift detection delay: observations from a change point to the first
  ``drifting`` state of that key (0 = detected on the change itself); a
  change never detected is a miss, and for the summary counts as the
  observations left in the series plus one;
- flapping: state changes per 100 observations on stationary keys, the
  first change out of ``unknown`` not counted;
- coverage: share of observations whose predicted state is not unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from decnet_attr import Engine, Thresholds
from decnet_attr.tune.data import STATES

CODE = {s: i for i, s in enumerate(STATES)}
UNKNOWN, STABLE, DRIFTING, CONFLICTED, MULTI = range(5)


@dataclass
class Dataset:
    """Labelled observations arranged for fast replay."""

    n: int
    keys: list[tuple[str, str]]
    key_index: dict[tuple[str, str], int]
    offsets: np.ndarray  # key k's observations are [offsets[k], offsets[k+1])
    rounds: list[bytes]  # NDJSON of round r
    round_keys: list[np.ndarray]  # key index of each record of round r
    truth: np.ndarray  # int8 state code per observation, -1 = not labelled
    stationary: np.ndarray  # bool per observation
    change_points: np.ndarray  # global observation indices
    families: list[str]  # per key
    identities: list[str]
    identity_of_key: np.ndarray
    multi_truth: np.ndarray  # bool per identity
    identity_family: list[str]

    @property
    def labelled(self) -> int:
        return int((self.truth >= 0).sum())


def load(rows: Iterable[Mapping[str, Any]]) -> Dataset:
    """Group labelled observations by key (ts order, ties in file order)."""
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for o in rows:
        ident = o.get("identity_uuid") or o.get("attacker_uuid")
        if not isinstance(ident, str) or not isinstance(o.get("primitive"), str):
            raise ValueError(f"observation without identity_uuid/primitive: {dict(o)!r}")
        series.setdefault((ident, o["primitive"]), []).append(o)
    keys = list(series)
    idents: dict[str, int] = {}
    offsets = [0]
    truth: list[int] = []
    stationary: list[bool] = []
    changes: list[int] = []
    families: list[str] = []
    ident_of_key: list[int] = []
    multi: dict[int, bool] = {}
    ident_family: dict[int, str] = {}
    by_round: list[list[int]] = []
    round_lines: list[list[bytes]] = []
    for k, key in enumerate(keys):
        obs = sorted(series[key], key=lambda o: float(o["ts"]))
        ii = idents.setdefault(key[0], len(idents))
        ident_of_key.append(ii)
        first_label = obs[0].get("label") or {}
        families.append(str(first_label.get("family") or ""))
        ident_family.setdefault(ii, families[-1])
        for r, o in enumerate(obs):
            label = o.get("label") or {}
            state = label.get("state")
            if state is not None and state not in CODE:
                raise ValueError(f"unknown state label {state!r} for {key}")
            truth.append(CODE[state] if state is not None else -1)
            stationary.append(bool(label.get("stationary", False)))
            if label.get("change_point"):
                changes.append(len(truth) - 1)
            if label.get("multi_actor"):
                multi[ii] = True
            else:
                multi.setdefault(ii, False)
            if r == len(by_round):
                by_round.append([])
                round_lines.append([])
            by_round[r].append(k)
            round_lines[r].append(
                orjson.dumps(
                    {
                        "identity_uuid": key[0],
                        "primitive": key[1],
                        "value": o.get("value"),
                        "ts": o["ts"],
                    }
                )
            )
        offsets.append(len(truth))
    return Dataset(
        n=len(truth),
        keys=keys,
        key_index={k: i for i, k in enumerate(keys)},
        offsets=np.asarray(offsets, dtype=np.int64),
        rounds=[b"\n".join(lines) + b"\n" for lines in round_lines],
        round_keys=[np.asarray(r, dtype=np.int64) for r in by_round],
        truth=np.asarray(truth, dtype=np.int8),
        stationary=np.asarray(stationary, dtype=bool),
        change_points=np.asarray(changes, dtype=np.int64),
        families=families,
        identities=list(idents),
        identity_of_key=np.asarray(ident_of_key, dtype=np.int64),
        multi_truth=np.asarray([multi[i] for i in range(len(idents))], dtype=bool),
        identity_family=[ident_family[i] for i in range(len(idents))],
    )


@dataclass
class Replay:
    """The predicted state after every observation, and the identities the
    multi-actor rule flagged."""

    pred: np.ndarray  # int8 per observation
    change_at: np.ndarray  # global indices of observations where the state changed
    flagged: np.ndarray  # bool per identity


def replay(ds: Dataset, thresholds: Thresholds | None = None) -> Replay:
    th = thresholds or Thresholds()
    engine = Engine(th)
    need = th.multi_actor_min_primitives
    mark = np.full(ds.n, -1, dtype=np.int8)
    change_at: list[int] = []
    multi_count = [0] * len(ds.identities)
    flagged = np.zeros(len(ds.identities), dtype=bool)
    offsets = ds.offsets
    key_index = ds.key_index
    ident_of_key = ds.identity_of_key
    for r, payload in enumerate(ds.rounds):
        res = engine.ingest_json(payload)
        if res.rejected:
            first = res.errors[0]
            raise ValueError(f"round {r}: {res.rejected} observations rejected: {first.reason}")
        for c in res.changed():
            k = key_index[(c.identity_uuid, c.primitive)]
            g = int(offsets[k]) + r
            new = CODE[c.state.state]
            mark[g] = new
            change_at.append(g)
            old = c.old_state
            was_multi = old is not None and old.state == "multi_actor"
            if (new == MULTI) != was_multi:
                ii = int(ident_of_key[k])
                multi_count[ii] += 1 if new == MULTI else -1
                if multi_count[ii] >= need:
                    flagged[ii] = True
    # forward-fill each key's state from its changes (a key's first
    # observation is always a change, so nothing leaks across keys)
    idx = np.where(mark >= 0, np.arange(ds.n), 0)
    np.maximum.accumulate(idx, out=idx)
    return Replay(
        pred=mark[idx], change_at=np.asarray(sorted(change_at), dtype=np.int64), flagged=flagged
    )


@dataclass
class Metrics:
    confusion: list[list[int]]  # [truth][pred]
    macro_f1: float
    per_state_f1: dict[str, float]
    multi_precision: float
    multi_recall: float
    multi_f1: float
    multi_tp: int
    multi_fp: int
    multi_fn: int
    drift_delays: list[int]  # per detected change point
    drift_missed: int
    drift_delay_score: float  # mean delay, a miss counted as the rest of its series + 1
    flapping_per_100: float
    coverage: float
    observations: int
    per_family: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {
            "macro_f1": round(self.macro_f1, 4),
            "multi_precision": round(self.multi_precision, 4),
            "multi_recall": round(self.multi_recall, 4),
            "multi_f1": round(self.multi_f1, 4),
            "drift_delay": round(self.drift_delay_score, 3),
            "drift_missed": self.drift_missed,
            "flapping_per_100": round(self.flapping_per_100, 3),
            "coverage": round(self.coverage, 4),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__}


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def score(ds: Dataset, rp: Replay) -> Metrics:
    labelled = ds.truth >= 0
    t = ds.truth[labelled].astype(np.int64)
    p = rp.pred[labelled].astype(np.int64)
    conf = np.bincount(t * 5 + p, minlength=25).reshape(5, 5)
    per_state: dict[str, float] = {}
    for s in range(5):
        support = conf[s].sum()
        if not support:
            continue
        tp = conf[s, s]
        per_state[STATES[s]] = _f1(
            _ratio(int(tp), int(conf[:, s].sum())), _ratio(int(tp), int(support))
        )
    macro = sum(per_state.values()) / len(per_state) if per_state else 0.0

    tp = int((rp.flagged & ds.multi_truth).sum())
    fp = int((rp.flagged & ~ds.multi_truth).sum())
    fn = int((~rp.flagged & ds.multi_truth).sum())
    mp, mr = _ratio(tp, tp + fp), _ratio(tp, tp + fn)

    # drift delay: first drifting prediction at or after each change point,
    # within the same key
    key_of_obs = np.searchsorted(ds.offsets, np.arange(ds.n), side="right") - 1
    drifting = np.flatnonzero(rp.pred == DRIFTING)
    delays: list[int] = []
    missed = 0
    penalised: list[float] = []
    for g in ds.change_points.tolist():
        end = int(ds.offsets[key_of_obs[g] + 1])
        j = int(np.searchsorted(drifting, g))
        if j < len(drifting) and drifting[j] < end:
            delays.append(int(drifting[j] - g))
            penalised.append(float(delays[-1]))
        else:
            missed += 1
            penalised.append(float(end - g + 1))
    delay_score = sum(penalised) / len(penalised) if penalised else 0.0

    # flapping on stationary keys: changes after the key's first known state
    st_changes = rp.change_at[ds.stationary[rp.change_at]]
    flips = 0
    if len(st_changes):
        # a key's first change is its first observation, and the way out of
        # unknown is warm-up (the state never returns to unknown)
        first_obs = ds.offsets[key_of_obs[st_changes]] == st_changes
        prev_pred = rp.pred[np.maximum(st_changes - 1, 0)]
        flips = int((~first_obs & (prev_pred != UNKNOWN)).sum())
    stationary_obs = int(ds.stationary.sum())
    flapping = 100.0 * _ratio(flips, stationary_obs)
    coverage = _ratio(int((rp.pred != UNKNOWN).sum()), ds.n)

    per_family: dict[str, dict[str, float]] = {}
    fam_of_ident = np.asarray(ds.identity_family)
    for fam in sorted(set(ds.identity_family)):
        sel = fam_of_ident == fam
        ftp = int((rp.flagged & ds.multi_truth & sel).sum())
        ffp = int((rp.flagged & ~ds.multi_truth & sel).sum())
        per_family[fam] = {
            "identities": int(sel.sum()),
            "flagged_multi_actor": ftp + ffp,
            "truly_multi_actor": int((ds.multi_truth & sel).sum()),
        }
    return Metrics(
        confusion=conf.tolist(),
        macro_f1=macro,
        per_state_f1=per_state,
        multi_precision=mp,
        multi_recall=mr,
        multi_f1=_f1(mp, mr),
        multi_tp=tp,
        multi_fp=fp,
        multi_fn=fn,
        drift_delays=delays,
        drift_missed=missed,
        drift_delay_score=delay_score,
        flapping_per_100=flapping,
        coverage=coverage,
        observations=ds.n,
        per_family=per_family,
    )


def evaluate(ds: Dataset, thresholds: Thresholds | None = None) -> Metrics:
    return score(ds, replay(ds, thresholds))
