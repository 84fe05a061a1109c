"""The BEHAVE primitive registry, shipped as data (``data/primitives.json``).

Names, value kinds and allowed values are facts of ``behave-shell`` 0.1.4
(docs/decnet.md#primitive-registry). The Rust engine compiles in the same file, so Python and
Rust can never disagree about a primitive's kind.

An unknown primitive is not silent: it is counted (:func:`unknown_primitives`)
and logged once per name.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

log = logging.getLogger(__name__)

MergerKind = Literal["categorical", "numeric", "hash"]

_unknown: Counter[str] = Counter()
_unknown_lock = threading.Lock()


@dataclass(frozen=True)
class PrimitiveSpec:
    """One registry entry."""

    name: str
    kind: str  # the BEHAVE ValueKind: categorical, numeric, hash, array, free_string, bool
    allowed: tuple[str, ...] | None
    min_value: float | None
    decnet_emits: bool
    since: str

    @property
    def merger_kind(self) -> MergerKind:
        if self.kind == "numeric":
            return "numeric"
        if self.kind == "hash":
            return "hash"
        return "categorical"


@dataclass(frozen=True)
class Registry:
    name: str
    version: str
    primitives: dict[str, PrimitiveSpec]

    def __contains__(self, primitive: object) -> bool:
        return primitive in self.primitives

    def __len__(self) -> int:
        return len(self.primitives)


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The packaged registry (loaded once)."""
    text = resources.files("decnet_attr").joinpath("data/primitives.json").read_text("utf-8")
    doc: dict[str, Any] = json.loads(text)
    prims = {
        name: PrimitiveSpec(
            name=name,
            kind=spec["kind"],
            allowed=tuple(spec["allowed"]) if "allowed" in spec else None,
            min_value=spec.get("min"),
            decnet_emits=bool(spec.get("decnet_emits", False)),
            since=str(spec.get("since", "")),
        )
        for name, spec in doc["primitives"].items()
    }
    return Registry(name=doc["registry"], version=doc["version"], primitives=prims)


def value_kind_for(primitive: str) -> MergerKind:
    """The merger a primitive uses: NUMERIC → ``"numeric"``, HASH → ``"hash"``,
    everything else (and unknown names) → ``"categorical"``.

    An unknown name is counted and logged once (at WARNING).
    """
    spec = registry().primitives.get(primitive)
    if spec is not None:
        return spec.merger_kind
    note_unknown(primitive)
    return "categorical"


def note_unknown(primitive: str) -> None:
    """Count an unknown primitive; log it the first time it is seen."""
    with _unknown_lock:
        first = primitive not in _unknown
        _unknown[primitive] += 1
    if first:
        log.warning(
            "unknown primitive %r (not in %s %s): using the categorical merger",
            primitive[:200],
            registry().name,
            registry().version,
        )


def unknown_primitives() -> dict[str, int]:
    """Unknown primitive names seen by :func:`value_kind_for`, with counts."""
    with _unknown_lock:
        return dict(_unknown)


def is_known(primitive: str) -> bool:
    return primitive in registry().primitives
