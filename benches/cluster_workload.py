"""A seeded ground truth for the identity clusterer: operators with several
IPs (attackers) each, and shared-tool noise.

Each operator has its own toolkit: a HASSH and a JA3 of its own (a custom
build) or, with probability ``common_share``, a common one drawn from a
small Zipf-distributed pool (stock OpenSSH, python-requests, …, shared by
many operators); an SSH banner and key-exchange order from small pools
(weak evidence); a keystroke digraph SimHash of its own, each IP's sessions
a few bits away from it; sometimes a payload SimHash and a C2 endpoint of
its own. Every IP reports a random subset of the operator's fingerprints.

``pairwise`` scores a clustering against the truth: precision (of the
attacker pairs put together, the share that are one operator) and recall
(of the pairs that are one operator, the share put together).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

HASSH = "toolchain.ssh.hassh_client"
JA3 = "toolchain.tls.ja3_client"
BANNER = "toolchain.ssh.ssh_client_banner"
KEX = "toolchain.ssh.kex_algorithm_order"
DIGRAPH = "motor.digraph_simhash"
PAYLOAD = "toolchain.payload.payload_simhash"
C2 = "toolchain.c2.c2_callback_endpoint"

Obs = tuple[str, str, str]  # (attacker, primitive, value_json)


@dataclass
class GroundTruth:
    observations: list[Obs]
    operator_of: dict[str, int]


def _hex(v: int) -> str:
    return json.dumps(f"{v:016x}")


def _flip(rng: random.Random, v: int, bits: int) -> int:
    for b in rng.sample(range(64), bits):
        v ^= 1 << b
    return v


def generate(
    attackers: int,
    *,
    seed: int = 7,
    common_share: float = 0.3,
    common_pool: int = 40,
    max_ips: int = 8,
    start: int = 0,
) -> GroundTruth:
    """About ``attackers`` attackers (whole operators), names from ``start``
    so chunks of a large run do not collide."""
    rng = random.Random(seed * 1_000_003 + start)
    zipf = [1.0 / (i + 1) for i in range(common_pool)]
    common_hassh = [json.dumps(f"common-hassh-{i}") for i in range(common_pool)]
    common_ja3 = [json.dumps(f"common-ja3-{i}") for i in range(common_pool)]
    banners = [json.dumps(f"SSH-2.0-OpenSSH_{i}.{j}") for i in range(7, 10) for j in range(6)]
    kexes = [
        json.dumps(
            sorted(
                ["curve25519", "ecdh-p256", "dh-g14", f"x{i}"],
                key=lambda s, i=i: (hash((s, i)) % 7, s),
            )
        )
        for i in range(12)
    ]
    obs: list[Obs] = []
    operator_of: dict[str, int] = {}
    n = 0
    op = start
    while n < attackers:
        op += 1
        ips = min(attackers - n, rng.randint(1, max_ips))
        own = f"op{op}"
        hassh = (
            rng.choices(common_hassh, zipf)[0]
            if rng.random() < common_share
            else json.dumps(f"{own}-hassh")
        )
        ja3 = (
            rng.choices(common_ja3, zipf)[0]
            if rng.random() < common_share
            else json.dumps(f"{own}-ja3")
        )
        banner = rng.choice(banners)
        kex = rng.choice(kexes)
        digraph = rng.getrandbits(64)
        payload = rng.getrandbits(64) if rng.random() < 0.3 else None
        c2 = json.dumps(f"{own}.example:443") if rng.random() < 0.2 else None
        for i in range(ips):
            a = f"{own}-ip{i}"
            operator_of[a] = op
            n += 1
            if rng.random() < 0.7:
                obs.append((a, HASSH, hassh))
            if rng.random() < 0.6:
                obs.append((a, JA3, ja3))
            if rng.random() < 0.8:
                obs.append((a, BANNER, banner))
            if rng.random() < 0.6:
                obs.append((a, KEX, kex))
            for _ in range(rng.randint(0, 2)):
                obs.append((a, DIGRAPH, _hex(_flip(rng, digraph, rng.randint(0, 2)))))
            if payload is not None and rng.random() < 0.7:
                obs.append((a, PAYLOAD, _hex(_flip(rng, payload, rng.randint(0, 1)))))
            if c2 is not None and rng.random() < 0.8:
                obs.append((a, C2, c2))
    return GroundTruth(obs, operator_of)


def _pairs(sizes: Iterable[int]) -> int:
    return sum(s * (s - 1) // 2 for s in sizes)


def pairwise(components: list[list[str]], operator_of: dict[str, int]) -> tuple[float, float]:
    """(precision, recall) of attacker pairs; attackers missing from
    ``components`` count as singletons."""
    together = _pairs(len(c) for c in components)
    correct = 0
    for c in components:
        correct += _pairs(Counter(operator_of[a] for a in c).values())
    truth = _pairs(Counter(operator_of.values()).values())
    precision = correct / together if together else 1.0
    recall = correct / truth if truth else 1.0
    return precision, recall
