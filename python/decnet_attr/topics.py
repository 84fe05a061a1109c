"""Bus topic catalogue, builders, validation and NATS-style matching.

Convention
----------
Topic constants hold **full topics**, exactly as they travel on the bus
(``ATTRIBUTION_PROFILE_STATE_CHANGED == "attribution.profile.state_changed"``),
never leaves relative to their root as DECNET's constants do. The other
constants are named by kind:

- ``*_PATTERN``: subscription patterns (may contain ``*`` / ``>``);
- ``*_ROOT``: first tokens (``"attacker"``); ``*_SUFFIX``: the trailing token
  of per-worker ``system.<worker>.<suffix>`` topics;
- ``*_PREFIX``: a full topic prefix to which a leaf is appended
  (``ATTACKER_OBSERVATION_PREFIX == "attacker.observation"``);
- ``EVENT_TYPE_*``: envelope ``type`` values; ``WORKER_CONTROL_*``: control
  payload ``action`` values; ``ATTRIBUTION_WORKER``: a worker name.

The leaf builders (:func:`attacker`, :func:`attribution`, :func:`identity`,
:func:`system`, ...) take a leaf *relative to their root* and return the full
topic: ``identity("observation.linked") == IDENTITY_OBSERVATION_LINKED``. Do not
pass a full-topic constant to a leaf builder.

Validation is stricter than DECNET's (docs/decnet.md#topic-validation): every token of
a built or published topic must be non-empty and free of ``.``, ``*``, ``>``,
whitespace and control characters. :func:`matches` itself keeps DECNET's exact
semantics (docs/decnet.md#topic-matching) and never validates.
"""

from __future__ import annotations

import functools
import re

__all__ = [
    "ATTACKER_FINGERPRINTED",
    "ATTACKER_FINGERPRINT_ROTATED",
    "ATTACKER_INTEL_ENRICHED",
    "ATTACKER_OBSERVATION_PREFIX",
    "ATTACKER_OBSERVED",
    "ATTACKER_PATTERN",
    "ATTACKER_ROOT",
    "ATTACKER_SCORED",
    "ATTACKER_SESSION_ENDED",
    "ATTACKER_SESSION_STARTED",
    "ATTRIBUTION_PATTERN",
    "ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED",
    "ATTRIBUTION_PROFILE_PREFIX",
    "ATTRIBUTION_PROFILE_STATE_CHANGED",
    "ATTRIBUTION_PROFILE_UPDATED",
    "ATTRIBUTION_ROOT",
    "ATTRIBUTION_WORKER",
    "CAMPAIGN_ROOT",
    "CREDENTIAL_ROOT",
    "EVENT_TYPE_FINGERPRINT_ROTATED",
    "EVENT_TYPE_HEALTH",
    "EVENT_TYPE_MULTI_ACTOR_SUSPECTED",
    "EVENT_TYPE_OBSERVATION_BATCH",
    "EVENT_TYPE_PROFILE_UPDATED",
    "EVENT_TYPE_STATE_CHANGED",
    "IDENTITY_CAMPAIGN_ASSIGNED",
    "IDENTITY_FORMED",
    "IDENTITY_MERGED",
    "IDENTITY_OBSERVATION_LINKED",
    "IDENTITY_PATTERN",
    "IDENTITY_ROOT",
    "IDENTITY_UNMERGED",
    "INGEST_PATTERN",
    "INGEST_PREFIX",
    "MAX_TOPIC_BYTES",
    "OBSERVATION_BATCH",
    "OBSERVATION_PATTERN",
    "ROOTS",
    "SYSTEM_ATTRIBUTION_CONTROL",
    "SYSTEM_ATTRIBUTION_HEALTH",
    "SYSTEM_AUTH_REVOKED",
    "SYSTEM_BUS_HEALTH",
    "SYSTEM_CONTROL_PATTERN",
    "SYSTEM_CONTROL_SUFFIX",
    "SYSTEM_HEALTH_PATTERN",
    "SYSTEM_HEALTH_SUFFIX",
    "SYSTEM_LOG",
    "SYSTEM_ROOT",
    "WEBHOOK_SUBSCRIPTIONS_CHANGED",
    "WORKER_CONTROL_START",
    "WORKER_CONTROL_STOP",
    "attacker",
    "attacker_observation",
    "attribution",
    "campaign",
    "credential",
    "identity",
    "ingest_partition",
    "is_observation_batch",
    "is_pattern",
    "matches",
    "primitive_from_topic",
    "sse_event_name",
    "system",
    "system_control",
    "system_health",
    "validate_leaf",
    "validate_pattern",
    "validate_segment",
    "validate_topic",
]

#: Maximum encoded size of a topic or pattern, in bytes (UTF-8).
MAX_TOPIC_BYTES = 512

# -- roots ---------------------------------------------------------------------------------
TOPOLOGY_ROOT = "topology"
DECKY_ROOT = "decky"
ATTACKER_ROOT = "attacker"
IDENTITY_ROOT = "identity"
CAMPAIGN_ROOT = "campaign"
SYSTEM_ROOT = "system"
CREDENTIAL_ROOT = "credential"
ATTRIBUTION_ROOT = "attribution"
ORCHESTRATOR_ROOT = "orchestrator"
CANARY_ROOT = "canary"
SMTP_ROOT = "smtp"
EMAIL_ROOT = "email"
TTP_ROOT = "ttp"

#: DECNET's root prefixes (docs/decnet.md#topic-catalogue), in catalogue order.
ROOTS: tuple[str, ...] = (
    TOPOLOGY_ROOT,
    DECKY_ROOT,
    ATTACKER_ROOT,
    IDENTITY_ROOT,
    CAMPAIGN_ROOT,
    SYSTEM_ROOT,
    CREDENTIAL_ROOT,
    ATTRIBUTION_ROOT,
    ORCHESTRATOR_ROOT,
    CANARY_ROOT,
    SMTP_ROOT,
    EMAIL_ROOT,
    TTP_ROOT,
)

# -- attacker.* ----------------------------------------------------------------------------
#: ``attacker.observation``; observation topics are ``attacker.observation.<primitive>``.
ATTACKER_OBSERVATION_PREFIX = "attacker.observation"
#: The pattern the attribution worker and the SSE relay subscribe to.
OBSERVATION_PATTERN = "attacker.observation.>"
#: Observations handed over as one unit (an HTTP body, validated): the
#: payload is ``{"ndjson": <one DECNET observation payload per line>,
#: "count": n}``. A single leaf, so it can never be a primitive's topic
#: (primitives are dotted); inside OBSERVATION_PATTERN, so the worker's one
#: durable consumer and the NATS stream carry it.
OBSERVATION_BATCH = "attacker.observation.batch"
EVENT_TYPE_OBSERVATION_BATCH = "observation.batch"
#: With ingest partitions (``DECNET_ATTR_PARTITIONS`` > 1) the API publishes
#: a body's observations split by attacker on ``attacker.ingest.<k>``: a
#: subject space of its own, so each partition's consumer overlaps neither
#: the others nor the consumer of DECNET's per-observation events.
INGEST_PREFIX = "attacker.ingest"
INGEST_PATTERN = "attacker.ingest.>"


def ingest_partition(k: int) -> str:
    """The subject of ingest partition ``k``."""
    return f"{INGEST_PREFIX}.{int(k)}"


def is_observation_batch(topic: str) -> bool:
    """True for the topics that carry API batches (one or partitioned)."""
    return topic == OBSERVATION_BATCH or topic.startswith(INGEST_PREFIX + ".")


ATTACKER_FINGERPRINT_ROTATED = "attacker.fingerprint_rotated"
ATTACKER_FINGERPRINTED = "attacker.fingerprinted"
ATTACKER_OBSERVED = "attacker.observed"
#: Has no publisher in DECNET; the SSE relay still forwards it.
ATTACKER_SCORED = "attacker.scored"
ATTACKER_SESSION_STARTED = "attacker.session.started"
ATTACKER_SESSION_ENDED = "attacker.session.ended"
ATTACKER_INTEL_ENRICHED = "attacker.intel.enriched"
ATTACKER_PATTERN = "attacker.>"

# -- attribution.* -------------------------------------------------------------------------
ATTRIBUTION_PROFILE_PREFIX = "attribution.profile"
ATTRIBUTION_PROFILE_STATE_CHANGED = "attribution.profile.state_changed"
ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED = "attribution.profile.multi_actor_suspected"
#: Our addition (docs/decnet.md#profile-updated): current value / confidence / count changed.
ATTRIBUTION_PROFILE_UPDATED = "attribution.profile.updated"
ATTRIBUTION_PATTERN = "attribution.>"

# -- identity.* ----------------------------------------------------------------------------
IDENTITY_FORMED = "identity.formed"
IDENTITY_OBSERVATION_LINKED = "identity.observation.linked"
IDENTITY_MERGED = "identity.merged"
IDENTITY_UNMERGED = "identity.unmerged"
IDENTITY_CAMPAIGN_ASSIGNED = "identity.campaign.assigned"
IDENTITY_PATTERN = "identity.>"

# -- system.* ------------------------------------------------------------------------------
SYSTEM_LOG = "system.log"
SYSTEM_BUS_HEALTH = "system.bus.health"
SYSTEM_HEALTH_SUFFIX = "health"
SYSTEM_CONTROL_SUFFIX = "control"
SYSTEM_HEALTH_PATTERN = "system.*.health"
SYSTEM_CONTROL_PATTERN = "system.*.control"
WEBHOOK_SUBSCRIPTIONS_CHANGED = "system.webhook.subscriptions_changed"
#: Our addition: an account's tokens were revoked (logout, password change,
#: role change, disabling). Every API process drops its cached sessions of
#: that user and the SSE relay ends the user's streams.
SYSTEM_AUTH_REVOKED = "system.auth.revoked"
#: The worker name the attribution engine uses in ``system.<worker>.*`` topics.
ATTRIBUTION_WORKER = "attribution"
SYSTEM_ATTRIBUTION_HEALTH = "system.attribution.health"
SYSTEM_ATTRIBUTION_CONTROL = "system.attribution.control"

# -- control actions (payload values, not topics) ------------------------------------------
WORKER_CONTROL_STOP = "stop"
WORKER_CONTROL_START = "start"

# -- envelope ``type`` discriminators used by the engine (docs/decnet.md#engine-events) ----
EVENT_TYPE_STATE_CHANGED = "profile.state_changed"
EVENT_TYPE_MULTI_ACTOR_SUSPECTED = "profile.multi_actor_suspected"
EVENT_TYPE_PROFILE_UPDATED = "profile.updated"
EVENT_TYPE_HEALTH = "health"
EVENT_TYPE_FINGERPRINT_ROTATED = "attacker.fingerprint_rotated"


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
_BAD_CHAR = re.compile(r"[.*>\s\x00-\x1f\x7f]")


def _bad_char(token: str) -> str | None:
    m = _BAD_CHAR.search(token)
    return m.group(0) if m else None


def validate_segment(segment: str) -> str:
    """Validate one topic token; return it unchanged.

    Raises :class:`ValueError` if it is empty or contains ``.``, ``*``, ``>``,
    whitespace or a control character (:class:`TypeError` if not a ``str``).
    """
    if not isinstance(segment, str):
        raise TypeError(f"topic segment must be str, not {type(segment).__name__}")
    if not segment:
        raise ValueError("empty topic segment")
    bad = _bad_char(segment)
    if bad is not None:
        raise ValueError(f"invalid character {bad!r} in topic segment {segment!r}")
    return segment


def validate_leaf(leaf: str) -> str:
    """Validate a dotted leaf: every ``.``-separated token must be a valid segment."""
    if not isinstance(leaf, str):
        raise TypeError(f"topic leaf must be str, not {type(leaf).__name__}")
    if not leaf:
        raise ValueError("empty topic leaf")
    for token in leaf.split("."):
        try:
            validate_segment(token)
        except ValueError as exc:
            raise ValueError(f"invalid topic leaf {leaf!r}: {exc}") from None
    return leaf


def _check_size(kind: str, value: str) -> None:
    if len(value) > MAX_TOPIC_BYTES or len(value.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise ValueError(f"{kind} longer than {MAX_TOPIC_BYTES} bytes")


def validate_topic(topic: str) -> str:
    """Validate a full topic to publish on: no wildcards, no empty tokens, no
    whitespace or control characters, at most :data:`MAX_TOPIC_BYTES` bytes."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, not {type(topic).__name__}")
    return _valid_topic(topic)


@functools.lru_cache(maxsize=1024)
def _valid_topic(topic: str) -> str:
    # every publish asks: the valid topics met most recently are kept (a
    # refusal raises, and is not kept)
    if not topic:
        raise ValueError("empty topic")
    _check_size("topic", topic)
    for token in topic.split("."):
        try:
            validate_segment(token)
        except ValueError as exc:
            raise ValueError(f"invalid topic {topic!r}: {exc}") from None
    return topic


def validate_pattern(pattern: str) -> str:
    """Validate a subscription pattern: like :func:`validate_topic` except that
    ``*`` may be a whole token and ``>`` may be the whole last token."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be str, not {type(pattern).__name__}")
    if not pattern:
        raise ValueError("empty pattern")
    _check_size("pattern", pattern)
    tokens = pattern.split(".")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if i != last:
                raise ValueError(f"invalid pattern {pattern!r}: '>' must be the last token")
            continue
        try:
            validate_segment(token)
        except ValueError as exc:
            raise ValueError(f"invalid pattern {pattern!r}: {exc}") from None
    return pattern


def is_pattern(pattern: str) -> bool:
    """True if *pattern* has a wildcard token (``*`` or ``>``)."""
    return any(tok == "*" or tok == ">" for tok in pattern.split("."))


# ------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------
def matches(pattern: str, topic: str) -> bool:
    """NATS-style wildcard match with DECNET's exact semantics (docs/decnet.md#topic-matching).

    Tokens are compared in order; ``*`` matches exactly one non-empty token;
    ``>`` matches one or more trailing tokens (anything after it in the pattern
    is ignored); otherwise token counts must be equal. Nothing is validated.
    """
    if "*" not in pattern and ">" not in pattern:
        return pattern == topic
    p_tokens = pattern.split(".")
    t_tokens = topic.split(".")
    n_topic = len(t_tokens)
    for i, p in enumerate(p_tokens):
        if p == ">":
            return n_topic > i
        if i >= n_topic:
            return False
        t = t_tokens[i]
        if p == "*":
            if not t:
                return False
        elif p != t:
            return False
    return len(p_tokens) == n_topic


# ------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------
def _leaf(root: str, leaf: str) -> str:
    return f"{root}.{validate_leaf(leaf)}"


def attacker(leaf: str) -> str:
    """``attacker.<leaf>`` (*leaf* may be dotted)."""
    return _leaf(ATTACKER_ROOT, leaf)


def attribution(leaf: str) -> str:
    """``attribution.<leaf>`` (*leaf* may be dotted)."""
    return _leaf(ATTRIBUTION_ROOT, leaf)


def identity(leaf: str) -> str:
    """``identity.<leaf>`` (*leaf* may be dotted)."""
    return _leaf(IDENTITY_ROOT, leaf)


def system(leaf: str) -> str:
    """``system.<leaf>`` (*leaf* may be dotted)."""
    return _leaf(SYSTEM_ROOT, leaf)


def campaign(leaf: str) -> str:
    """``campaign.<leaf>`` (*leaf* may be dotted)."""
    return _leaf(CAMPAIGN_ROOT, leaf)


def credential(leaf: str) -> str:
    """``credential.<leaf>`` (*leaf* may be dotted)."""
    return _leaf(CREDENTIAL_ROOT, leaf)


def attacker_observation(primitive: str) -> str:
    """``attacker.observation.<primitive>``; the primitive may be dotted
    (``motor.shell_mastery.tab_completion``); each token is validated."""
    return f"{ATTACKER_OBSERVATION_PREFIX}.{validate_leaf(primitive)}"


def system_health(worker: str) -> str:
    """``system.<worker>.health`` (*worker* is a single segment)."""
    return f"{SYSTEM_ROOT}.{validate_segment(worker)}.{SYSTEM_HEALTH_SUFFIX}"


def system_control(worker: str) -> str:
    """``system.<worker>.control`` (*worker* is a single segment)."""
    return f"{SYSTEM_ROOT}.{validate_segment(worker)}.{SYSTEM_CONTROL_SUFFIX}"


_OBS_PREFIX_DOT = ATTACKER_OBSERVATION_PREFIX + "."


def primitive_from_topic(topic: str) -> str | None:
    """The primitive of an ``attacker.observation.<primitive>`` topic, else ``None``.

    ``None`` too when the primitive part is not a valid dotted leaf (empty
    tokens, wildcards, whitespace).
    """
    if not isinstance(topic, str):
        return None
    return _primitive_of(topic)


@functools.lru_cache(maxsize=1024)
def _primitive_of(topic: str) -> str | None:
    # every delivery of a DECNET event asks, and a deployment has a few
    # dozen topics: the answer is kept for the most recent ones (bounded,
    # whatever topics a publisher makes up)
    if not topic.startswith(_OBS_PREFIX_DOT):
        return None
    primitive = topic[len(_OBS_PREFIX_DOT) :]
    try:
        validate_leaf(primitive)
    except ValueError:
        return None
    return primitive


_SSE_NAMES: dict[str, str] = {
    ATTACKER_FINGERPRINT_ROTATED: "fingerprint.rotated",
    ATTACKER_SCORED: "attacker.scored",
    ATTRIBUTION_PROFILE_STATE_CHANGED: "attribution.state_changed",
    ATTRIBUTION_PROFILE_MULTI_ACTOR_SUSPECTED: "attribution.multi_actor_suspected",
    ATTRIBUTION_PROFILE_UPDATED: "attribution.updated",
}


def sse_event_name(topic: str) -> str:
    """SSE ``event:`` name for a bus topic (docs/decnet.md#sse-relay)."""
    if topic.startswith(_OBS_PREFIX_DOT):
        return "observation"
    return _SSE_NAMES.get(topic, topic)
