"""Which observations link attackers into one identity, and how strongly.

The clusterer itself is Rust (:class:`decnet_attr._core.Clusterer`); this
module holds its policy: the fingerprint primitives with their weights, the
SimHash primitives compared by Hamming distance, and the thresholds, all
overridable with the ``cluster`` setting (a JSON object, see
:func:`cluster_config`).

Two attackers are linked when the weights of what they share add up to
``threshold``. At the defaults a tool or network fingerprint (HASSH, JA3,
JA4, JARM, a C2 endpoint, a payload or TLS-certificate SimHash) links on its
own; weaker ones (an SSH banner, the key-exchange order, HTTP header order,
keystroke digraph SimHash, …) weigh half and need a second one. A value
shared by more than ``full_share`` attackers keeps only ``full_share /
sharers`` of its weight (a value common to a few operators needs
corroboration); one shared by more than ``max_share`` attackers is
ubiquitous (a stock OpenSSH client) and is no evidence at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decnet_attr._core import Clusterer
from decnet_attr.registry import registry

#: Primitive → weight (a link needs ``threshold``, 1.0 by default).
DEFAULT_WEIGHTS: dict[str, float] = {
    "toolchain.ssh.hassh_client": 1.0,
    "toolchain.ssh.hassh_server": 1.0,
    "toolchain.tls.ja3_client": 1.0,
    "toolchain.tls.ja3s_server": 1.0,
    "toolchain.tls.ja4_client": 1.0,
    "toolchain.tls.ja4s_server": 1.0,
    "toolchain.tls.jarm_server": 1.0,
    "toolchain.tls.tls_cert_simhash": 1.0,
    "toolchain.payload.payload_simhash": 1.0,
    "toolchain.c2.c2_callback_endpoint": 1.0,
    "toolchain.ssh.ssh_client_banner": 0.5,
    "toolchain.ssh.kex_algorithm_order": 0.5,
    "toolchain.http.header_order_fingerprint": 0.5,
    "toolchain.transport.h2_akamai_fingerprint": 0.5,
    "toolchain.protocol_abuse.kerberos_etype_offer": 0.5,
    "toolchain.c2.attack_software_id": 0.5,
    "motor.digraph_simhash": 0.5,
}

#: The fingerprints compared by Hamming distance (64-bit SimHashes).
SIMHASH_PRIMITIVES: tuple[str, ...] = (
    "motor.digraph_simhash",
    "toolchain.payload.payload_simhash",
    "toolchain.tls.tls_cert_simhash",
)


@dataclass(frozen=True)
class ClusterConfig:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    simhash: tuple[str, ...] = SIMHASH_PRIMITIVES
    threshold: float = 1.0
    full_share: int = 6
    max_share: int = 32
    hamming_max: int = 3

    def args(self) -> dict[str, Any]:
        """The clusterer's arguments (also :func:`all_pairs_components`'s)."""
        return {
            "weights": sorted(self.weights.items()),
            "simhash": [p for p in self.simhash if p in self.weights],
            "threshold": self.threshold,
            "full_share": self.full_share,
            "max_share": self.max_share,
            "hamming_max": self.hamming_max,
        }

    def make(self) -> Clusterer:
        return Clusterer(**self.args())


def cluster_config(overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """The defaults with ``overrides`` applied: ``threshold``,
    ``full_share``, ``max_share``, ``hamming_max``, and ``weights`` (primitive → weight,
    merged into the defaults; 0 turns a primitive off). Unknown keys and
    primitives the registry does not know are refused (ValueError)."""
    o = dict(overrides or {})
    unknown = set(o) - {"threshold", "full_share", "max_share", "hamming_max", "weights"}
    if unknown:
        raise ValueError(f"unknown cluster setting(s): {', '.join(sorted(unknown))}")
    weights = dict(DEFAULT_WEIGHTS)
    extra = o.pop("weights", {})
    if not isinstance(extra, dict):
        raise ValueError("cluster weights must be an object of primitive: weight")
    for prim, w in extra.items():
        if prim not in registry().primitives:
            raise ValueError(f"cluster weight for unknown primitive {prim!r}")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
            raise ValueError(f"cluster weight of {prim} must be a number >= 0")
        weights[prim] = float(w)
    weights = {p: w for p, w in weights.items() if w > 0}
    cfg = ClusterConfig(weights=weights, **o)
    cfg.make()  # validates thresholds in the one place that applies them
    return cfg
