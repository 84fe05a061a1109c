"""``decnet-attr replay FILE``: merge a file of observations (NDJSON or a
JSON array; e.g. exported from DECNET's ``observations`` table) with the
engine and print every (identity, primitive) state.

An observation needs ``value`` and ``ts`` plus ``primitive`` and either
``identity_uuid`` or ``attacker_uuid`` (DECNET's table has the attacker; its
stub identity is one per attacker). A ``value`` given as JSON text (how the
table stores it) is decoded.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import orjson

from decnet_attr import Engine
from decnet_attr.config import Settings
from decnet_attr.progress import Progress

log = logging.getLogger(__name__)


def _items(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == b"[":
            for i, item in enumerate(orjson.loads(f.read())):
                yield i + 1, item
            return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield lineno, exc


def _normalise(item: Any) -> dict[str, Any] | str:
    if isinstance(item, Exception):
        return f"invalid JSON: {item}"
    if not isinstance(item, dict):
        return "not an object"
    out = dict(item)
    if "identity_uuid" not in out:
        if "attacker_uuid" not in out:
            return "needs identity_uuid or attacker_uuid"
        out["identity_uuid"] = out["attacker_uuid"]
    v = out.get("value")
    if isinstance(v, str) and v[:1] in '[{"':
        try:
            out["value"] = json.loads(v)
        except ValueError:
            pass
    return out


def replay_file(
    path: Path,
    settings: Settings,
    *,
    batch: int = 10_000,
    fmt: str = "table",
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    if not path.exists():
        print(f"decnet-attr: {path}: no such file", file=sys.stderr)
        return 1
    engine = Engine(settings.make_thresholds(), max_value_bytes=settings.max_value_bytes)
    progress = Progress(
        f"replay {path.name}", logger=log if settings.log_format == "json" else None
    )
    rejected: list[tuple[int, str]] = []
    pending: list[dict[str, Any]] = []
    lines: list[int] = []
    t0 = time.perf_counter()
    total = 0

    def flush() -> None:
        nonlocal total
        res = engine.ingest(pending)
        for e in res.errors:
            rejected.append((lines[e.index], e.reason))
        total += len(pending)
        progress.update(len(pending))
        pending.clear()
        lines.clear()

    for lineno, item in _items(path):
        norm = _normalise(item)
        if isinstance(norm, str):
            rejected.append((lineno, norm))
            continue
        pending.append(norm)
        lines.append(lineno)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    progress.close()
    elapsed = time.perf_counter() - t0
    keys = engine.keys()
    states = engine.get_many(keys)
    if fmt == "json":
        for (ident, prim), st in zip(keys, states):
            if st is not None:
                out.write(
                    orjson.dumps(
                        {"identity_uuid": ident, "primitive": prim, **st.to_dict()}
                    ).decode()
                    + "\n"
                )
    else:
        rows = [("IDENTITY", "PRIMITIVE", "STATE", "CONFIDENCE", "COUNT", "CURRENT VALUE")]
        for (ident, prim), st in zip(keys, states):
            if st is None:
                continue
            value = json.dumps(st.current_value, ensure_ascii=False)
            if len(value) > 40:
                value = value[:37] + "..."
            rows.append(
                (ident, prim, st.state, f"{st.confidence:.2f}", str(st.observation_count), value)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    for lineno, reason in rejected[:20]:
        log.warning("line %d rejected: %s", lineno, reason, extra={"line": lineno})
    if len(rejected) > 20:
        log.warning("%d more observations rejected", len(rejected) - 20)
    rate = total / elapsed if elapsed > 0 else 0.0
    log.info(
        "replayed %d observations (%d rejected) into %d keys in %.2f s: %.0f obs/s",
        total,
        len(rejected),
        len(keys),
        elapsed,
        rate,
        extra={
            "observations": total,
            "rejected": len(rejected),
            "keys": len(keys),
            "seconds": round(elapsed, 3),
            "obs_per_s": round(rate),
        },
    )
    return 0
