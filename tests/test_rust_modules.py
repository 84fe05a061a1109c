"""The Rust core's modules import each other without a cycle.

A cycle (two modules each using the other's items) means neither can be read
or changed alone; shared items belong in a third module both use. The graph
is read from the ``use`` declarations of ``rust/src/core`` and
``rust/src/py`` (``super::x``, ``crate::core::x``, ``crate::py::x``,
including grouped ``use super::{a, b}`` forms); test-only modules
(``*_tests.rs`` and ``mod tests`` blocks) are left out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RUST = Path(__file__).resolve().parent.parent / "rust" / "src"
PACKAGES = ("core", "py")

_USE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.MULTILINE)
_TEST_MOD = re.compile(r"^#\[cfg\(test\)\]\s*\nmod tests\s*\{.*", re.MULTILINE | re.DOTALL)


def _targets(package: str, path: str) -> set[tuple[str, str]]:
    """The (package, module) pairs a ``use`` path names."""
    path = re.sub(r"\s+", "", path)
    prefixes = {"super::": package, "crate::core::": "core", "crate::py::": "py"}
    for prefix, pkg in prefixes.items():
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if rest.startswith("{"):
                names = [n.split("::", 1)[0] for n in re.split(r",(?![^{]*\})", rest[1:-1])]
            else:
                names = [rest.split("::", 1)[0]]
            return {(pkg, n) for n in names if n and n not in ("self", "*")}
    return set()


def module_graph() -> dict[tuple[str, str], set[tuple[str, str]]]:
    graph: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for package in PACKAGES:
        for file in sorted((RUST / package).glob("*.rs")):
            if file.stem in ("mod",) or file.stem.endswith("_tests"):
                continue
            source = _TEST_MOD.sub("", file.read_text())
            deps: set[tuple[str, str]] = set()
            for m in _USE.finditer(source):
                deps |= _targets(package, m.group(1))
            graph[(package, file.stem)] = deps
    return {node: {d for d in deps if d in graph and d != node} for node, deps in graph.items()}


def find_cycle(graph: dict[tuple[str, str], set[tuple[str, str]]]) -> list[str] | None:
    done: set[tuple[str, str]] = set()

    def visit(node: tuple[str, str], path: list[tuple[str, str]]) -> list[str] | None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            return ["::".join(n) for n in cycle]
        if node in done:
            return None
        for dep in sorted(graph[node]):
            found = visit(dep, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def test_the_graph_is_read() -> None:
    graph = module_graph()
    assert ("core", "obs") in graph[("core", "json")]
    assert ("core", "obs") in graph[("core", "fastjson")]
    assert ("core", "json") in graph[("py", "engine")]


def test_no_module_cycle() -> None:
    assert find_cycle(module_graph()) is None


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({("core", "a"): {("core", "b")}, ("core", "b"): {("core", "a")}}, True),
        ({("core", "a"): {("core", "b")}, ("core", "b"): set()}, False),
    ],
)
def test_find_cycle(graph: dict[tuple[str, str], set[tuple[str, str]]], cycle: bool) -> None:
    assert (find_cycle(graph) is not None) is cycle
