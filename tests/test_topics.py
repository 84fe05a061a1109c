from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decnet_attr import topics as T
from decnet_attr.topics import (
    attacker,
    attacker_observation,
    attribution,
    identity,
    matches,
    primitive_from_topic,
    sse_event_name,
    system,
    system_control,
    system_health,
    validate_leaf,
    validate_pattern,
    validate_segment,
    validate_topic,
)

# The truth table of docs/decnet.md#topic-matching: all 16 rows.
TRUTH_TABLE = [
    ("topology.abc.mutation.applied", "topology.abc.mutation.applied", True),
    ("topology.*.mutation.applied", "topology.abc.mutation.applied", True),
    ("topology.*.mutation.*", "topology.abc.mutation.applied", True),
    ("topology.>", "topology.abc.mutation.applied", True),
    ("topology.>", "topology.abc.status", True),
    ("decky.*.state", "decky.xyz.state", True),
    ("system.bus.health", "system.bus.health", True),
    ("topology.abc.mutation.applied", "topology.abc.mutation.failed", False),
    ("topology.*", "topology.abc.mutation.applied", False),
    ("topology.>", "topology", False),
    ("decky.*.state", "decky.state", False),
    ("decky.*.state", "decky.xyz.status", False),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("ttp.rule.reloaded.>", "ttp.rule.reloaded", False),
    (
        "attacker.observation.>",
        "attacker.observation.motor.shell_mastery.tab_completion",
        True,
    ),
]


def test_truth_table_has_16_rows() -> None:
    assert len(TRUTH_TABLE) == 16


@pytest.mark.parametrize(("pattern", "topic", "expected"), TRUTH_TABLE)
def test_matches_truth_table(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.*.b", "a..b", False),  # empty token never matches '*'
        ("a.>", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>.ignored", "a.b", True),  # everything after '>' is ignored
        (">", "a", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("A.b", "a.b", False),  # case-sensitive
        ("a.b*", "a.bc", False),  # '*' inside a token is literal
        ("a.b*", "a.b*", True),
    ],
)
def test_matches_quirks(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


_token = st.sampled_from(["a", "b", "c", "obs", "x1"])
_topic = st.lists(_token, min_size=1, max_size=5).map(".".join)


@st.composite
def _pattern(draw: st.DrawFn) -> str:
    toks = draw(st.lists(st.one_of(_token, st.just("*")), min_size=0, max_size=4))
    if draw(st.booleans()) or not toks:
        toks.append(">")
    return ".".join(toks)


def _regex_oracle(pattern: str, topic: str) -> bool:
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(tok))
    return re.fullmatch(r"\.".join(parts), topic) is not None


@given(_pattern(), _topic)
def test_matches_agrees_with_regex_oracle_on_valid_input(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    assert matches(pattern, topic) is _regex_oracle(pattern, topic)


@given(_topic)
def test_literal_pattern_matches_itself(topic: str) -> None:
    assert matches(topic, topic)


# -- segment / leaf / topic / pattern validation -------------------------------------------
@pytest.mark.parametrize(
    "bad", ["", "a.b", "*", ">", "a*", "b>", " ", "a b", "a\tb", "a\nb", "a\u00a0b", "a\x00b"]
)
def test_validate_segment_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_segment(bad)


@pytest.mark.parametrize("good", ["sniffer", "attribution", "x-1", "under_score", "ünï"])
def test_validate_segment_accepts(good: str) -> None:
    assert validate_segment(good) == good


def test_validate_segment_type() -> None:
    with pytest.raises(TypeError):
        validate_segment(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a. b", "a.b c"])
def test_validate_leaf_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_leaf(bad)


@pytest.mark.parametrize(
    "bad",
    ["", "a..b", "a.*", "a.>", ">", "*", "a.b*", "a b", "a.\tb", "a.", "x" * 513],
)
def test_validate_topic_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_topic(bad)


def test_validate_topic_size_limit_is_in_bytes() -> None:
    assert validate_topic("x" * 512) == "x" * 512
    with pytest.raises(ValueError):
        validate_topic("é" * 257)  # 514 bytes


@pytest.mark.parametrize(
    "good", ["a", "a.b", "*", ">", "a.*", "a.>", "*.b.>", "system.*.health", "a.*.c.>"]
)
def test_validate_pattern_accepts(good: str) -> None:
    assert validate_pattern(good) == good


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", ">.a", "a.b*", "a.>x", "a b", "a.", ".a"])
def test_validate_pattern_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_pattern(bad)


def test_is_pattern() -> None:
    assert T.is_pattern("a.*")
    assert T.is_pattern("a.>")
    assert not T.is_pattern("a.b")
    assert not T.is_pattern("a.b*")


# -- builders ------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [attacker, attribution, identity, system, T.campaign])
def test_leaf_builders_reject_empty(builder: object) -> None:
    with pytest.raises(ValueError):
        builder("")  # type: ignore[operator]


def test_builders_pinned_examples() -> None:
    assert system_health("sniffer") == "system.sniffer.health"
    assert system_control("mutator") == "system.mutator.control"
    assert identity("observation.linked") == T.IDENTITY_OBSERVATION_LINKED
    assert identity("observation.linked") == "identity.observation.linked"
    assert attribution("profile.state_changed") == T.ATTRIBUTION_PROFILE_STATE_CHANGED
    assert attacker("fingerprint_rotated") == T.ATTACKER_FINGERPRINT_ROTATED
    assert system("bus.health") == T.SYSTEM_BUS_HEALTH
    assert system_health(T.ATTRIBUTION_WORKER) == T.SYSTEM_ATTRIBUTION_HEALTH
    assert system_control(T.ATTRIBUTION_WORKER) == T.SYSTEM_ATTRIBUTION_CONTROL


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "x\ny"])
def test_system_worker_builders_validate_segment(bad: str) -> None:
    with pytest.raises(ValueError):
        system_health(bad)
    with pytest.raises(ValueError):
        system_control(bad)


def test_attacker_observation() -> None:
    p = "motor.shell_mastery.tab_completion"
    assert attacker_observation(p) == f"attacker.observation.{p}"
    assert attacker_observation("temporal.typing_cadence") == (
        "attacker.observation.temporal.typing_cadence"
    )
    assert matches(T.OBSERVATION_PATTERN, attacker_observation(p))


@pytest.mark.parametrize("bad", ["", "a..b", "a.*", "a.>", "a b", ".a", "a.", "*"])
def test_attacker_observation_is_stricter_than_decnet(bad: str) -> None:
    with pytest.raises(ValueError):
        attacker_observation(bad)


def test_compatibility_topics() -> None:
    # docs/decnet.md#compatibility-surface: topics decnet_attr must keep.
    assert T.ATTACKER_OBSERVATION_PREFIX == "attacker.observation"
    assert T.OBSERVATION_PATTERN == "attacker.observation.>"
    assert T.ATTRIBUTION_PROFILE_STATE_CHANGED == "attribution.profile.state_changed"
    assert T.ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED == (
        "attribution.profile.multi_actor_suspected"
    )
    assert T.ATTRIBUTION_PROFILE_UPDATED == "attribution.profile.updated"
    assert T.SYSTEM_ATTRIBUTION_HEALTH == "system.attribution.health"
    assert T.SYSTEM_ATTRIBUTION_CONTROL == "system.attribution.control"
    assert T.ATTACKER_SCORED == "attacker.scored"
    assert T.ATTACKER_FINGERPRINT_ROTATED == "attacker.fingerprint_rotated"
    assert T.ATTACKER_SESSION_ENDED == "attacker.session.ended"
    assert T.IDENTITY_MERGED == "identity.merged"
    assert T.IDENTITY_UNMERGED == "identity.unmerged"
    assert T.SYSTEM_BUS_HEALTH == "system.bus.health"
    assert T.WEBHOOK_SUBSCRIPTIONS_CHANGED == "system.webhook.subscriptions_changed"
    assert T.WORKER_CONTROL_STOP == "stop"
    assert T.EVENT_TYPE_STATE_CHANGED == "profile.state_changed"
    assert T.EVENT_TYPE_MULTI_ACTOR_SUSPECTED == "profile.multi_actor_suspected"
    assert T.EVENT_TYPE_HEALTH == "health"
    assert len(T.ROOTS) == 13


def test_every_full_topic_constant_is_a_valid_topic() -> None:
    skip_suffixes = ("_ROOT", "_SUFFIX", "_PATTERN")
    for name in T.__all__:
        value = getattr(T, name)
        if not isinstance(value, str) or not name.isupper():
            continue
        if name.endswith(skip_suffixes) or name.startswith(("EVENT_TYPE_", "WORKER_CONTROL_")):
            continue
        if name == "ATTRIBUTION_WORKER":
            continue
        assert "." in value, name
        assert validate_topic(value) == value, name
        assert value.split(".")[0] in T.ROOTS, name
    for name in T.__all__:
        if name.endswith("_PATTERN"):
            validate_pattern(getattr(T, name))


# -- primitive / SSE -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (
            "attacker.observation.motor.shell_mastery.tab_completion",
            "motor.shell_mastery.tab_completion",
        ),
        ("attacker.observation.x", "x"),
        ("attacker.observation", None),
        ("attacker.observation.", None),
        ("attacker.observation..x", None),
        ("attacker.observation.*", None),
        ("attacker.observationx.y", None),
        ("attacker.fingerprint_rotated", None),
        ("attribution.profile.state_changed", None),
        ("", None),
    ],
)
def test_primitive_from_topic(topic: str, expected: str | None) -> None:
    assert primitive_from_topic(topic) == expected


@pytest.mark.parametrize(
    ("topic", "name"),
    [
        ("attacker.observation.motor.x", "observation"),
        ("attacker.observation.toolchain.c2.beacon_interval_ms", "observation"),
        ("attacker.fingerprint_rotated", "fingerprint.rotated"),
        ("attacker.scored", "attacker.scored"),
        ("attribution.profile.state_changed", "attribution.state_changed"),
        ("attribution.profile.multi_actor_suspected", "attribution.multi_actor_suspected"),
        ("attribution.profile.updated", "attribution.updated"),
        ("identity.merged", "identity.merged"),
        ("system.attribution.health", "system.attribution.health"),
    ],
)
def test_sse_event_name(topic: str, name: str) -> None:
    assert sse_event_name(topic) == name


def test_topic_answers_are_kept_for_a_bounded_number_of_topics() -> None:
    """Each delivery and each publish asks about its topic, so the answers
    are kept; a publisher making up topics cannot grow what is kept, and a
    refused topic is refused every time."""
    from decnet_attr.topics import _primitive_of, _valid_topic, validate_topic

    for i in range(5000):
        assert primitive_from_topic(f"attacker.observation.made.up{i}") == f"made.up{i}"
        validate_topic(f"made.up.topic{i}")
    assert _primitive_of.cache_info().currsize <= 1024
    assert _valid_topic.cache_info().currsize <= 1024
    for _ in range(3):
        with pytest.raises(ValueError):
            validate_topic("bad topic")
        assert primitive_from_topic("attacker.observation.a..b") is None
