"""No import cycles in ``decnet_attr``.

The graph is read from the source with :mod:`ast`: an edge for every
``import`` / ``from … import`` a module runs, at its top or inside a
function (a lazy import still ties the two modules together). Imports under
``if TYPE_CHECKING:`` are not run and do not count. ``from pkg import name``
points at ``pkg.name`` when that is a module, else at ``pkg``.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import decnet_attr

PACKAGE_DIR = Path(decnet_attr.__file__).parent


def modules(package_dir: Path) -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    root = package_dir.parent
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of *tree*, skipping ``if TYPE_CHECKING:`` bodies
    (their ``else:`` branch runs and is kept)."""
    if isinstance(tree, (ast.Import, ast.ImportFrom)):
        yield tree
        return
    if isinstance(tree, ast.If) and _is_type_checking(tree.test):
        for node in tree.orelse:
            yield from _run_imports(node)
        return
    for child in ast.iter_child_nodes(tree):
        yield from _run_imports(child)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module *name* imports when it runs."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _run_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in known:
                out.add(sub)
            elif target in known:
                out.add(target)
    out.discard(name)
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    known = modules(package_dir)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of *graph* (its modules, the first repeated last), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 50  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_lazy_import_back_is_a_cycle(tmp_path: Path) -> None:
    """The shape the server had: the factory imports the routes inside a
    function, the routes import the app keys from the factory's module."""
    pkg = write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/app.py": "KEY = 1\ndef create():\n    from pkg import routes\n",
            "pkg/routes.py": "from pkg.app import KEY\n",
        },
    )
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"pkg.app", "pkg.routes"}


@pytest.mark.parametrize(
    "importer",
    [
        "from . import a\n",
        "from .a import X\n",
        "import pkg.a\n",
        "from pkg import a\n",
        "def f():\n    from pkg.a import X\n",
    ],
)
def test_every_import_form_is_an_edge(tmp_path: Path, importer: str) -> None:
    pkg = write(
        tmp_path,
        {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import Y\nX = 1\n", "pkg/b.py": importer},
    )
    assert find_cycle(import_graph(pkg)) is not None


def test_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    pkg = write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import Y\nX = 1\n",
            "pkg/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.a import X\nY = 1\n"
            ),
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.b"] == set() and find_cycle(graph) is None
