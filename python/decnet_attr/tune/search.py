"""Multi-objective search over every ``Thresholds`` field.

Optuna's NSGA-II proposes configurations; worker processes (one per core by
default) each hold the labelled set, replay it through the engine and send
back the metrics. The objectives are multi-actor precision and recall
(maximised), drift delay and flapping (minimised); the non-dominated
trials form the Pareto front (macro-F1 is a fifth objective). The
*chosen* point is the front member with the best multi-actor F1 among
those no worse than the defaults on drift delay and flapping, within
``MACRO_F1_TOLERANCE`` of their macro-F1, and passing DECNET's calibration
scenarios (ties: lower delay, then higher macro-F1); if none qualifies the
defaults stay.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from decnet_attr import Thresholds
from decnet_attr.progress import Progress
from decnet_attr.tune.data import read_ndjson
from decnet_attr.tune.evaluate import Dataset, evaluate, load
from decnet_attr.tune.scenarios import run_scenarios

log = logging.getLogger(__name__)

DEFAULTS: dict[str, float | int] = Thresholds().to_dict()

#: name -> (type, low, high, log scale). Every Thresholds field is searched;
#: ``stable_dispersion_pct`` is read by no v0 rule and
#: ``multi_actor_tick_secs`` only paces the worker's safety net, so the
#: replay cannot tell their values apart (they stay in the space so that a
#: future rule using them is searched without a code change).
SPACE: dict[str, tuple[type, float, float, bool]] = {
    "window_n": (int, 3, 12, False),
    "min_observations": (int, 2, 6, False),
    "majority": (int, 2, 12, False),
    "alternation_min_len": (int, 2, 12, False),
    "ewma_alpha": (float, 0.05, 1.0, False),
    "stable_dispersion_pct": (float, 0.05, 1.0, False),
    "drift_mean_shift_pct": (float, 0.05, 1.5, False),
    "conflict_dispersion_pct": (float, 0.2, 3.0, False),
    "numeric_conflict_confidence": (float, 0.1, 0.9, False),
    "hash_drift_max": (int, 0, 5, False),
    "hash_window_secs": (float, 3600.0, 7 * 86400.0, True),
    "multi_actor_max_confidence": (float, 0.3, 0.9, False),
    "multi_actor_min_primitives": (int, 1, 4, False),
    "multi_actor_tick_secs": (float, 10.0, 600.0, True),
}
assert set(SPACE) == set(DEFAULTS), "the search space must cover every Thresholds field"

#: The front is over multi-actor precision and recall, drift delay and
#: flapping, plus macro-F1 so that a choice never buys those by giving up
#: the per-state accuracy.
OBJECTIVES = ("multi_precision", "multi_recall", "drift_delay", "flapping_per_100", "macro_f1")
DIRECTIONS: tuple[Literal["maximize", "minimize"], ...] = (
    "maximize",
    "maximize",
    "minimize",
    "minimize",
    "maximize",
)

#: How much macro-F1 the chosen point may give up against the defaults.
MACRO_F1_TOLERANCE = 0.01


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    metrics: dict[str, float]

    def values(self) -> tuple[float, ...]:
        return tuple(self.metrics[o] for o in OBJECTIVES)


@dataclass
class SearchResult:
    trials: list[Trial]
    front: list[Trial]
    default: Trial
    chosen: Trial
    seconds: float
    workers: int

    @property
    def per_minute(self) -> float:
        return 60.0 * len(self.trials) / self.seconds if self.seconds else 0.0


# ---- worker processes ---------------------------------------------------------------

_ds: Dataset | None = None


def _init_worker(path: str) -> None:
    global _ds
    _ds = load(read_ndjson(path))


def _run(params: dict[str, Any]) -> dict[str, float]:
    assert _ds is not None
    return evaluate(_ds, Thresholds(**params)).summary()


# ---- search ---------------------------------------------------------------------------


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    better = False
    for x, y, d in zip(a, b, DIRECTIONS):
        if d == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(trials: list[Trial]) -> list[Trial]:
    vals = [t.values() for t in trials]
    front = []
    seen: set[tuple[float, ...]] = set()
    for i, t in enumerate(trials):
        if vals[i] in seen:
            continue
        if not any(dominates(vals[j], vals[i]) for j in range(len(trials)) if j != i):
            front.append(t)
            seen.add(vals[i])
    return front


def admissible(t: Trial, default: Trial) -> bool:
    """No worse than the defaults on drift delay and flapping, and within
    the tolerance on macro-F1."""
    d = default.metrics
    return (
        t.metrics["drift_delay"] <= d["drift_delay"]
        and t.metrics["flapping_per_100"] <= d["flapping_per_100"]
        and t.metrics["macro_f1"] >= d["macro_f1"] - MACRO_F1_TOLERANCE
    )


def _rank(t: Trial) -> tuple[float, ...]:
    m = t.metrics
    return (-m["multi_f1"], m["drift_delay"], m["flapping_per_100"], -m["macro_f1"])


def combinations(moves: list[Trial], default: Trial) -> list[dict[str, Any]]:
    """The admissible one-field moves that improve something, best first,
    applied cumulatively (m1, m1+m2, …): the second generation."""
    d = default.metrics
    good = [
        t
        for t in moves
        if admissible(t, default)
        and (
            t.metrics["multi_f1"] > d["multi_f1"]
            or t.metrics["drift_delay"] < d["drift_delay"]
            or t.metrics["flapping_per_100"] < d["flapping_per_100"]
        )
    ]
    good.sort(key=_rank)
    out: list[dict[str, Any]] = []
    params = {k: DEFAULTS[k] for k in SPACE}
    used: set[str] = set()
    for t in good:
        (field,) = [k for k in SPACE if t.params[k] != DEFAULTS[k]]
        if field in used:
            continue
        used.add(field)
        params = {**params, field: t.params[field]}
        if len(used) > 1:
            out.append(dict(params))
    return out


def choose(front: list[Trial], default: Trial) -> Trial:
    ok = sorted((t for t in front if admissible(t, default)), key=_rank)
    for t in ok:
        if t.metrics["multi_f1"] < default.metrics["multi_f1"]:
            break
        if all(s.passed for s in run_scenarios(Thresholds(**t.params))):
            return t
    return default


def neighbours() -> list[dict[str, Any]]:
    """The defaults with one field moved a step either way (integers by
    one, reals by 25 % and 60 %): the first generation, so that small
    improvements on the defaults are measured, not left to chance."""
    out = []
    for name, (typ, lo, hi, _log) in SPACE.items():
        v = DEFAULTS[name]
        steps: list[float] = [v - 1, v + 1] if typ is int else [v * 0.6, v * 0.8, v * 1.25, v * 1.6]
        for c in steps:
            if lo <= c <= hi:
                out.append({**{k: DEFAULTS[k] for k in SPACE}, name: typ(c)})
    return out


#: The scoped fields each value kind's merger reads.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "categorical": ("min_observations", "majority", "alternation_min_len"),
    "numeric": (
        "min_observations",
        "ewma_alpha",
        "drift_mean_shift_pct",
        "conflict_dispersion_pct",
    ),
    "hash": ("hash_drift_max",),
}


def _steps(name: str, v: float) -> list[float | int]:
    typ, lo, hi, _log = SPACE[name]
    raw: list[float] = [v - 1, v + 1] if typ is int else [v * 0.6, v * 0.8, v * 1.25, v * 1.6]
    return [typ(c) for c in raw if lo <= c <= hi and typ(c) != v]


def refine_scoped(
    run: Callable[[list[dict[str, Any]]], list[dict[str, float]]],
    chosen: Trial,
    default: Trial,
    *,
    scope: Literal["per_kind", "per_primitive"],
    targets: dict[str, tuple[str, ...]],
    first_number: int,
    rounds: int = 2,
) -> tuple[Trial, list[Trial]]:
    """Greedy overrides on top of the chosen point, per value kind or per
    primitive (``targets``: name -> the scoped fields its merger reads):
    each round tries one step of every field of every target (in parallel)
    and keeps the best admissible improvement that still passes DECNET's
    scenarios. Returns the best trial and all the trials run."""
    best = chosen
    tried: list[Trial] = []
    n = first_number
    for _ in range(rounds):
        scoped: dict[str, dict[str, Any]] = best.params.get(scope, {})
        cands = []
        for name, fields in targets.items():
            cur = scoped.get(name, {})
            for f in fields:
                for v in _steps(f, cur.get(f, best.params[f])):
                    cands.append({**best.params, scope: {**scoped, name: {**cur, f: v}}})
        results = run(cands)
        improved = False
        for params, m in zip(cands, results):
            t = Trial(n, params, m)
            n += 1
            tried.append(t)
            if (
                admissible(t, default)
                and _rank(t) < _rank(best)
                and all(x.passed for x in run_scenarios(Thresholds(**params)))
            ):
                best, improved = t, True
        if not improved:
            break
    return best, tried


def primitive_targets(path: str) -> dict[str, tuple[str, ...]]:
    """Every primitive in a labelled file, with its kind's scoped fields."""
    from decnet_attr.registry import value_kind_for

    names = sorted({str(o.get("primitive")) for o in read_ndjson(path)})
    return {p: KIND_FIELDS[value_kind_for(p)] for p in names}


def _suggest(trial: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (typ, lo, hi, logscale) in SPACE.items():
        if typ is int:
            out[name] = trial.suggest_int(name, int(lo), int(hi))
        else:
            out[name] = trial.suggest_float(name, lo, hi, log=logscale)
    return out


def search(
    path: str,
    *,
    trials: int = 500,
    timeout: float | None = None,
    workers: int | None = None,
    seed: int = 0,
    per_kind: bool = False,
    per_primitive: bool = False,
    progress: Progress | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Search ``trials`` configurations (or until ``timeout`` seconds) over
    the labelled NDJSON file at ``path``; with ``per_kind`` and/or
    ``per_primitive``, then refine the chosen point with overrides."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workers = workers or os.cpu_count() or 1
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(16, 8 * workers))
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
    study.enqueue_trial({k: DEFAULTS[k] for k in SPACE})
    first = [{k: DEFAULTS[k] for k in SPACE}, *neighbours()]
    for p in first[1:]:
        study.enqueue_trial(p)
    done: list[Trial] = []
    ctx = multiprocessing.get_context("spawn")
    t0 = 0.0
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(path,)
    ) as pool:
        # warm the workers (each loads the set once) before the clock starts
        warm = [pool.submit(_run, dict(DEFAULTS)) for _ in range(workers)]
        for f in warm:
            f.result()
        t0 = time.perf_counter()
        running: dict[Future[dict[str, float]], Any] = {}
        asked = 0

        def more() -> None:
            nonlocal asked
            while len(running) < 2 * workers and asked < trials:
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    return
                ot = study.ask()
                running[pool.submit(_run, _suggest(ot))] = ot
                asked += 1

        more()
        while running:
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in finished:
                ot = running.pop(f)
                m = f.result()
                t = Trial(ot.number, dict(ot.params), m)
                study.tell(ot, list(t.values()))
                done.append(t)
                if on_trial:
                    on_trial(t)
                if progress:
                    progress.update(1)
            if len(done) == len(first):
                # the defaults and their neighbours are in: combine the good moves
                by_number = sorted(done, key=lambda t: t.number)
                for p in combinations(by_number[1:], by_number[0]):
                    study.enqueue_trial(p)
            more()
        done.sort(key=lambda t: t.number)
        default = done[0]
        front = pareto_front(done)
        chosen = choose(front, default)
        stages: list[tuple[Literal["per_kind", "per_primitive"], dict[str, tuple[str, ...]]]] = []
        if per_kind:
            stages.append(("per_kind", KIND_FIELDS))
        if per_primitive:
            stages.append(("per_primitive", primitive_targets(path)))
        for scope, targets in stages:
            chosen, extra = refine_scoped(
                lambda cs: list(pool.map(_run, cs)),
                chosen,
                default,
                scope=scope,
                targets=targets,
                first_number=len(done),
            )
            done.extend(extra)
        if stages:
            front = pareto_front(done)
    seconds = time.perf_counter() - t0
    return SearchResult(
        trials=done,
        front=front,
        default=default,
        chosen=chosen,
        seconds=seconds,
        workers=workers,
    )


def thresholds_json(params: dict[str, Any]) -> dict[str, Any]:
    """The ``DECNET_ATTR_THRESHOLDS`` object for a configuration: only the
    fields that differ from the defaults."""
    t = Thresholds(**params).to_dict()
    return {k: v for k, v in t.items() if v != DEFAULTS.get(k)}
