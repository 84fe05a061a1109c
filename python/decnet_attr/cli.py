"""The ``decnet-attr`` command.

Sub-commands: ``serve`` (API + worker, the main job), ``worker`` (the
attribution worker alone, for scale-out), ``users`` (manage accounts),
``replay`` (merge an NDJSON file of observations and print the states),
``recompute`` (rebuild all state from stored observations), ``explain``,
``tune`` (calibrate the thresholds on labelled series) and ``bench`` (size
a deployment on this machine).

Every flag also has a ``DECNET_ATTR_*`` environment variable; flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decnet_attr.config import ConfigError, Settings, setting_help

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
    # On nested sub-commands (users add …) the defaults are SUPPRESS so that
    # a flag given before the sub-command is not reset by the sub-parser.
    d: object = argparse.SUPPRESS if nested else None
    g = p.add_argument_group("common settings (also DECNET_ATTR_* variables)")
    g.add_argument("--data-dir", type=Path, default=d, help="data directory (default .decnet-attr)")
    g.add_argument("--db-url", default=d, help="postgresql://… (default: SQLite in the data dir)")
    g.add_argument("--bus-url", default=d, help="memory:// (default) or nats://host:port")
    g.add_argument("--thresholds", default=d, help='JSON threshold overrides, e.g. {"window_n":6}')
    g.add_argument("--log-format", choices=["text", "json"], default=d)
    g.add_argument("--log-level", default=d)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="decnet-attr",
        description="Attacker attribution for honeypot networks (DECNET-compatible).",
        epilog="Environment variables:\n"
        + "\n".join(f"  {k:<40} {h}" for k, _d, h in setting_help() if h),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP API, SSE relay and (by default) the worker")
    _common(s)
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument(
        "--no-worker",
        dest="worker",
        action="store_false",
        default=None,
        help="do not run the attribution worker in this process",
    )

    w = sub.add_parser("worker", help="run the attribution worker alone (scale-out)")
    _common(w)

    u = sub.add_parser("users", help="manage user accounts")
    _common(u)
    usub = u.add_subparsers(dest="users_command", required=True)
    ua = usub.add_parser("add", help="add a user (password read from stdin)")
    ua.add_argument("name")
    ua.add_argument("--role", choices=["admin", "viewer", "sensor"], default="viewer")
    ul = usub.add_parser("list", help="list users")
    up = usub.add_parser("passwd", help="set a user's password (read from stdin)")
    up.add_argument("name")
    up.add_argument(
        "--no-must-change",
        action="store_true",
        help="do not make the user change this password at the next login",
    )
    ud = usub.add_parser("disable", help="disable a user and revoke their tokens")
    ud.add_argument("name")
    for sp in (ua, ul, up, ud):
        _common(sp, nested=True)

    r = sub.add_parser(
        "replay", help="merge an NDJSON/JSON file of observations and print the states"
    )
    r.add_argument("file", type=Path)
    r.add_argument("--thresholds", default=None)
    r.add_argument("--batch", type=int, default=10_000)
    r.add_argument("--format", choices=["table", "json"], default="table")
    r.add_argument("--log-format", choices=["text", "json"], default=None)
    r.add_argument("--log-level", default=None)

    rc = sub.add_parser("recompute", help="rebuild all attribution state from stored observations")
    _common(rc)
    rc.add_argument(
        "--dry-run", action="store_true", help="report what would change, write nothing"
    )

    ex = sub.add_parser("explain", help="why an attacker's primitive has its state")
    _common(ex)
    ex.add_argument("attacker")
    ex.add_argument("primitive")

    from decnet_attr.bench import add_parser as add_bench
    from decnet_attr.tune.commands import add_parsers

    add_parsers(sub, lambda sp: _common(sp, nested=True))
    add_bench(sub, _common)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    keys = [
        "data_dir",
        "db_url",
        "bus_url",
        "thresholds",
        "log_format",
        "log_level",
        "host",
        "port",
        "worker",
    ]
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    return Settings.from_env(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"decnet-attr: {exc}", file=sys.stderr)
        return 2
    from decnet_attr.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"decnet-attr: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in ("serve", "worker"):
        from decnet_attr.runtime import tune_gc

        tune_gc()
    if args.command == "replay":
        from decnet_attr.replay import replay_file

        return replay_file(args.file, settings, batch=args.batch, fmt=args.format)
    if args.command == "serve":
        from decnet_attr.server.main import serve

        return serve(settings)
    if args.command == "worker":
        from decnet_attr.worker.main import run_worker

        return asyncio.run(run_worker(settings))
    if args.command == "users":
        from decnet_attr.server.users_cli import users_command

        return users_command(args, settings)
    if args.command == "recompute":
        from decnet_attr.worker.recompute import recompute_command

        return asyncio.run(recompute_command(settings, dry_run=args.dry_run))
    if args.command == "explain":
        from decnet_attr.worker.recompute import explain_command

        return asyncio.run(explain_command(settings, args.attacker, args.primitive))
    if args.command == "bench":
        from decnet_attr.bench import bench_command

        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        if not sizes or min(sizes) < 1:
            raise ConfigError("--batch-sizes: positive integers, e.g. 100,500,2000")
        return bench_command(
            settings,
            seconds=args.seconds,
            target=args.target,
            sizes=sizes,
            keys=args.keys,
            events=args.events,
            fmt=args.format,
        )
    if args.command == "tune":
        from decnet_attr.tune.commands import tune_command

        return tune_command(args, settings)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
