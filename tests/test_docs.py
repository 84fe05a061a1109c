"""Citations of ``docs/decnet.md#<anchor>`` lead somewhere.

The code explains DECNET's behaviour by pointing at our own docs; every
anchor it names must exist there, and the docs must not cite documents
outside the repository (``§`` section numbers of an outside reference).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "decnet.md"
CITATION = re.compile(r"docs/decnet\.md#([a-z0-9-]+)")
SOURCES = ("python", "rust/src", "tests", "benches", "README.md")
SUFFIXES = {".py", ".pyi", ".rs", ".js", ".md", ".json"}


def anchors() -> set[str]:
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC.read_text()))


def cited() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for source in SOURCES:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            if file.suffix not in SUFFIXES:
                continue
            for anchor in CITATION.findall(file.read_text(errors="replace")):
                out.setdefault(anchor, set()).add(str(file.relative_to(ROOT)))
    return out


def test_every_cited_anchor_exists() -> None:
    known = anchors()
    missing = {a: sorted(files) for a, files in cited().items() if a not in known}
    assert missing == {}
    assert len(cited()) >= 10  # the code does cite the docs


def test_anchors_are_unique() -> None:
    found = re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC.read_text())
    assert len(found) == len(set(found))


def test_the_docs_cite_nothing_outside() -> None:
    text = DOC.read_text()
    assert "§" not in text
    assert "DESIGN.md" not in text
