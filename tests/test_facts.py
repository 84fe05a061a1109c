"""Facts defined once: every other place names the one definition."""

from __future__ import annotations

import ast
from pathlib import Path

import decnet_attr
from decnet_attr import STATES, Thresholds, _core, topics
from decnet_attr.store import base as store_base
from decnet_attr.tune import data as tune_data

STUB = Path(decnet_attr.__file__).with_name("_core.pyi")


def test_state_names_come_from_the_engine() -> None:
    assert STATES == ("unknown", "stable", "drifting", "conflicted", "multi_actor")
    assert STATES is _core.STATES
    assert store_base.STATES is STATES
    assert tune_data.STATES is STATES


def test_the_stubs_state_literal_matches_the_engine() -> None:
    tree = ast.parse(STUB.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_StateName":
            literal = node.value
            assert isinstance(literal, ast.Subscript)
            names = ast.literal_eval(literal.slice)
            assert tuple(names) == STATES
            return
    raise AssertionError("_StateName not found in _core.pyi")


def test_every_threshold_is_a_getter_and_a_keyword() -> None:
    """The field list in types.rs drives the getters, to_dict and the constructor."""
    defaults = Thresholds().to_dict()
    assert len(defaults) == 14
    for name, value in defaults.items():
        assert getattr(Thresholds(), name) == value
        assert getattr(Thresholds(**{name: value}), name) == value
        assert name in repr(Thresholds())


def test_auth_revoked_topic() -> None:
    assert topics.SYSTEM_AUTH_REVOKED == "system.auth.revoked"
    assert topics.validate_topic(topics.SYSTEM_AUTH_REVOKED)


def test_the_stubs_threshold_keywords_match_the_engine() -> None:
    """The stub lists the constructor's keywords (stubtest cannot see ``**kwargs``)."""
    tree = ast.parse(STUB.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Thresholds")
    new = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__new__")
    keywords = {a.arg for a in new.args.kwonlyargs}
    assert keywords == set(Thresholds().to_dict()) | {"per_primitive", "per_kind"}
    getters = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    assert set(Thresholds().to_dict()) <= getters
