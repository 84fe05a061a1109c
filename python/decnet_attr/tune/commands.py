"""The ``decnet-attr tune …`` sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decnet_attr.config import ConfigError, Settings
from decnet_attr.progress import Progress

log = logging.getLogger(__name__)


def add_parsers(
    sub: Any, common: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    t: argparse.ArgumentParser = sub.add_parser(
        "tune", help="calibrate the thresholds on labelled series"
    )
    tsub = t.add_subparsers(dest="tune_command", required=True)

    g = tsub.add_parser("generate", help="write labelled NDJSON from seeded synthetic families")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--out", type=Path, required=True)
    size = g.add_mutually_exclusive_group()
    size.add_argument("--identities", type=int, default=None, help="identities per family")
    size.add_argument("--observations", type=int, default=None, help="about this many in all")
    g.add_argument("--length", type=int, default=None, help="observations per key")
    g.add_argument("--families", default="", help="comma-separated subset (default: all)")

    e = tsub.add_parser("evaluate", help="replay labelled NDJSON and score the thresholds")
    e.add_argument("data", type=Path)
    e.add_argument(
        "--thresholds", default=None, help="JSON thresholds to score (default: defaults)"
    )
    e.add_argument("--html", type=Path, default=None, help="also write a self-contained report")
    e.add_argument("--format", choices=["table", "json"], default="table")

    s = tsub.add_parser("search", help="search the thresholds; keep the Pareto front")
    s.add_argument("data", type=Path)
    s.add_argument("--trials", type=int, default=500)
    s.add_argument("--timeout", type=float, default=None, help="stop proposing after N seconds")
    s.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--per-kind",
        action="store_true",
        help="then refine the choice with per-value-kind overrides (per_kind in the JSON)",
    )
    s.add_argument(
        "--per-primitive",
        action="store_true",
        help="then refine it with per-primitive overrides (per_primitive in the JSON)",
    )
    s.add_argument(
        "--out", type=Path, default=None, help="write the chosen DECNET_ATTR_THRESHOLDS JSON"
    )
    s.add_argument(
        "--holdout", type=Path, default=None, help="labelled NDJSON to report the choice on"
    )
    s.add_argument("--html", type=Path, default=None)
    s.add_argument("--format", choices=["table", "json"], default="table")

    i = tsub.add_parser(
        "impact", help="what --thresholds would change in the live store (writes nothing)"
    )
    i.add_argument("--data-dir", type=Path, default=None)
    i.add_argument("--db-url", default=None)
    i.add_argument("--thresholds", dest="new_thresholds", required=True, help="the proposed JSON")
    i.add_argument("--format", choices=["table", "json"], default="table")

    x = tsub.add_parser("export", help="stored series as NDJSON with an empty label to fill in")
    common(x)
    x.add_argument("--out", type=Path, required=True)
    return t


def _thresholds(text: str | None) -> Any:
    from decnet_attr import Thresholds

    return Settings(thresholds=text or "").make_thresholds() if text else Thresholds()


def tune_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import numpy  # noqa: F401
    except ImportError:
        print(
            "decnet-attr tune needs the 'tune' extra: pip install 'decnet-attr[tune]'",
            file=sys.stderr,
        )
        return 2
    cmd = args.tune_command
    if cmd == "generate":
        return _generate(args)
    if cmd == "evaluate":
        return _evaluate(args)
    if cmd == "search":
        return _search(args)
    if cmd == "impact":
        return asyncio.run(_impact(args, settings))
    if cmd == "export":
        return asyncio.run(_export(args, settings))
    raise AssertionError(cmd)


def _generate(args: argparse.Namespace) -> int:
    from decnet_attr.tune.data import GenParams, generate, size_for, write_ndjson

    kw: dict[str, Any] = {}
    if args.length is not None:
        kw["length"] = args.length
    if args.identities is not None:
        kw["identities"] = args.identities
    if args.families:
        kw["families"] = tuple(f.strip() for f in args.families.split(",") if f.strip())
    gp = GenParams(**kw)
    if args.observations is not None:
        gp = size_for(args.observations, gp)
    try:
        rows = generate(args.seed, gp)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    n = write_ndjson(str(args.out), rows)
    print(
        f"wrote {n:,} labelled observations ({gp.identities} identities per family) to {args.out}"
    )
    return 0


def _load(path: Path) -> Any:
    from decnet_attr.tune.data import read_ndjson
    from decnet_attr.tune.evaluate import load

    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    try:
        return load(read_ndjson(str(path)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _evaluate(args: argparse.Namespace) -> int:
    from decnet_attr import Thresholds
    from decnet_attr.tune import report
    from decnet_attr.tune.evaluate import evaluate
    from decnet_attr.tune.scenarios import run_scenarios

    ds = _load(args.data)
    th = _thresholds(args.thresholds)
    named = [("given" if args.thresholds else "defaults", evaluate(ds, th))]
    if args.thresholds:
        named.append(("defaults", evaluate(ds, Thresholds())))
    scen = run_scenarios(th)
    if args.format == "json":
        print(
            json.dumps(
                {n: m.to_dict() for n, m in named} | {"scenarios": [s.__dict__ for s in scen]}
            )
        )
    else:
        print(
            f"{args.data}: {ds.n:,} observations, {ds.labelled:,} labelled, {len(ds.keys):,} keys\n"
        )
        print(report.metrics_table(named))
        print(report.confusion_table(named[0][1]))
        print(report.scenario_table(scen))
    if args.html:
        args.html.write_text(
            report.page(
                f"decnet-attr tune evaluate {args.data.name}",
                [*report.metrics_sections(named), report.scenario_section(scen)],
            )
        )
        print(f"report: {args.html}", file=sys.stderr)
    return 0 if all(s.passed for s in scen) or args.thresholds else 1


def _search(args: argparse.Namespace) -> int:
    from decnet_attr import Thresholds
    from decnet_attr.tune import report
    from decnet_attr.tune.evaluate import evaluate
    from decnet_attr.tune.scenarios import run_scenarios
    from decnet_attr.tune.search import OBJECTIVES, search, thresholds_json

    if not args.data.exists():
        raise ConfigError(f"{args.data}: no such file")
    progress = Progress("search", args.trials, unit="configs")
    res = search(
        str(args.data),
        trials=args.trials,
        timeout=args.timeout,
        workers=args.workers,
        seed=args.seed,
        per_kind=args.per_kind,
        per_primitive=args.per_primitive,
        progress=progress,
    )
    progress.close()
    chosen = thresholds_json(res.chosen.params)
    holdout = None
    if args.holdout:
        ho = _load(args.holdout)
        holdout = [
            ("chosen (held out)", evaluate(ho, Thresholds(**res.chosen.params))),
            ("defaults (held out)", evaluate(ho, Thresholds())),
        ]
    cols = ["#", *OBJECTIVES, "multi_f1", "coverage"]
    front = sorted(res.front, key=lambda t: -t.metrics["multi_f1"])

    def row(t: Any, mark: str = "") -> list[Any]:
        return [f"{t.number}{mark}"] + [t.metrics[c] for c in cols[1:]]

    rows = [row(res.default, " defaults"), row(res.chosen, " chosen")] + [
        row(t) for t in front[:15]
    ]
    if args.format == "json":
        print(
            json.dumps(
                {
                    "trials": len(res.trials),
                    "seconds": res.seconds,
                    "per_minute": res.per_minute,
                    "front": [{"number": t.number, **t.metrics, "params": t.params} for t in front],
                    "defaults": res.default.metrics,
                    "chosen": {
                        "number": res.chosen.number,
                        **res.chosen.metrics,
                        "thresholds": chosen,
                    },
                    "holdout": {n: m.summary() for n, m in holdout} if holdout else None,
                }
            )
        )
    else:
        print(
            f"{len(res.trials)} configurations in {res.seconds:.1f} s with {res.workers} workers "
            f"({res.per_minute:,.0f}/min); Pareto front: {len(res.front)}\n"
        )
        print(report.table(rows, cols))
        if holdout:
            print(report.metrics_table(holdout))
        print(f"DECNET_ATTR_THRESHOLDS='{json.dumps(chosen, separators=(',', ':'))}'")
    if args.out:
        args.out.write_text(json.dumps(chosen, indent=2) + "\n")
        print(f"chosen thresholds: {args.out}", file=sys.stderr)
    if args.html:
        pts = [
            (t.metrics["multi_recall"], t.metrics["multi_precision"], "#bbb", f"trial {t.number}")
            for t in res.trials
        ]
        pts += [
            (
                t.metrics["multi_recall"],
                t.metrics["multi_precision"],
                "#4a78c2",
                f"front {t.number}",
            )
            for t in res.front
        ]
        pts2 = [
            (t.metrics["flapping_per_100"], t.metrics["drift_delay"], "#bbb", f"trial {t.number}")
            for t in res.trials
        ] + [
            (
                t.metrics["flapping_per_100"],
                t.metrics["drift_delay"],
                "#4a78c2",
                f"front {t.number}",
            )
            for t in res.front
        ]
        for t, colour, name in (
            (res.default, "#d33", "defaults"),
            (res.chosen, "#1a9c3a", "chosen"),
        ):
            pts.append((t.metrics["multi_recall"], t.metrics["multi_precision"], colour, name))
            pts2.append((t.metrics["flapping_per_100"], t.metrics["drift_delay"], colour, name))
        legend = (
            '<p class="legend"><span style="color:#bbb">● trial</span>'
            '<span style="color:#4a78c2">● Pareto front</span>'
            '<span style="color:#d33">● defaults</span><span style="color:#1a9c3a">● chosen</span></p>'
        )
        ds_main = _load(args.holdout or args.data)
        chosen_m = evaluate(ds_main, Thresholds(**res.chosen.params))
        default_m = evaluate(ds_main, Thresholds())
        sections = [
            (
                "Pareto front",
                legend
                + report._svg_scatter("pareto", pts, "multi-actor recall", "multi-actor precision")
                + report._svg_scatter(
                    "pareto-drift", pts2, "flapping per 100 stationary obs", "drift delay (obs)"
                ),
            ),
            ("Front", report.html_table(rows, cols)),
            ("Chosen DECNET_ATTR_THRESHOLDS", f"<pre>{json.dumps(chosen, indent=2)}</pre>"),
        ]
        where = "held-out set" if args.holdout else "search set"
        sections += report.metrics_sections(
            [(f"chosen, {where}", chosen_m), (f"defaults, {where}", default_m)]
        )
        sections.append(report.scenario_section(run_scenarios(Thresholds(**res.chosen.params))))
        args.html.write_text(report.page(f"decnet-attr tune search {args.data.name}", sections))
        print(f"report: {args.html}", file=sys.stderr)
    return 0


async def _open_store(settings: Settings) -> Any:
    from decnet_attr.worker.recompute import _open

    store = _open(settings)
    await store.open()
    return store


async def _impact(args: argparse.Namespace, settings: Settings) -> int:
    from decnet_attr.tune import report
    from decnet_attr.tune.impact import impact

    current = settings
    proposed = current.replace(thresholds=args.new_thresholds)
    proposed.make_thresholds()  # a bad JSON is a ConfigError before the store opens
    store = await _open_store(current)
    try:
        progress = Progress("impact", await store.count_observations())
        res = await impact(store, current, proposed, progress=progress)
        progress.close()
    finally:
        await store.close()
    if args.format == "json":
        print(json.dumps(res))
        return 0
    print(
        f"replayed {res['observations']:,} observations into {res['keys']:,} keys "
        "(nothing written; `decnet-attr recompute` applies it)\n"
    )
    rows = [[t["from"] or "(new)", t["to"], t["count"]] for t in res["transitions"]]
    print(report.table(rows or [["-", "-", 0]], ["from", "to", "badges"]))
    print(
        f"confidence changes only: {res['confidence_only']:,}; stale rows dropped: {res['dropped']:,}"
    )
    for title, ids in (
        ("start being multi-actor", res["start_multi_actor"]),
        ("stop being multi-actor", res["stop_multi_actor"]),
    ):
        print(f"\nidentities that would {title}: {len(ids)}")
        for ident in ids[:50]:
            print(f"  {ident}")
        if len(ids) > 50:
            print(f"  … {len(ids) - 50} more (--format json lists all)")
    return 0


async def _export(args: argparse.Namespace, settings: Settings) -> int:
    from decnet_attr.tune.impact import export

    store = await _open_store(settings)
    try:
        progress = Progress("export", await store.count_observations())
        with args.out.open("wb") as f:
            n = await export(store, f, progress=progress)
        progress.close()
    finally:
        await store.close()
    print(f"wrote {n:,} observations to {args.out}; fill in label.state", file=sys.stderr)
    return 0
