"""DECNET's four calibration scenarios, a fixed regression set: each is a
small series with the one state the thresholds must give it. The defaults
pass all of them; ``tune search`` reports whether a candidate does too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decnet_attr import Engine, Thresholds, aggregate_observations


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str
    observed: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.expected == self.observed


def _series(prim: str, values: list[Any], ident: str = "scenario") -> list[dict[str, Any]]:
    return [
        {"identity_uuid": ident, "primitive": prim, "value": v, "ts": 1.7e9 + 86400.0 * i}
        for i, v in enumerate(values)
    ]


def run_scenarios(thresholds: Thresholds | None = None) -> list[Scenario]:
    th = thresholds or Thresholds()
    out: list[Scenario] = []

    def state(obs: list[dict[str, Any]], kind: str | None = None) -> str:
        return aggregate_observations(obs, value_kind=kind, thresholds=th).state

    out.append(
        Scenario(
            "seven agreeing daily values",
            "stable",
            state(_series("environmental.shell_type", ["bash"] * 7)),
            "7 × bash, one a day",
        )
    )
    out.append(
        Scenario(
            "typed then pasted",
            "drifting",
            state(_series("motor.input_modality", ["typed"] * 5 + ["pasted"] * 5)),
            "5 × typed, 5 × pasted",
        )
    )
    out.append(
        Scenario(
            "beacon 5,000 ms → 12,000 ms",
            "drifting",
            state(
                _series("toolchain.c2.beacon_interval_ms", [5000.0] * 5 + [12000.0] * 5),
                "numeric",
            ),
            "5 × 5,000 ms, 5 × 12,000 ms",
        )
    )
    # A/B alternating five times on two primitives: both keys multi_actor
    # with confidence capped, and the identity flagged
    eng = Engine(th)
    alt = _series("environmental.shell_type", ["bash", "zsh"] * 5) + _series(
        "motor.input_modality", ["typed", "pasted"] * 5
    )
    eng.ingest(alt)
    states = [eng.get("scenario", p) for p in ("environmental.shell_type", "motor.input_modality")]
    multi = [s for s in states if s is not None and s.state == "multi_actor"]
    capped = all(s.confidence <= th.multi_actor_max_confidence + 1e-12 for s in multi)
    flagged = len(multi) >= th.multi_actor_min_primitives and capped
    out.append(
        Scenario(
            "A/B alternating on two primitives",
            "multi_actor",
            "multi_actor" if flagged else ",".join(s.state if s else "none" for s in states),
            f"both primitives multi_actor, confidence ≤ {th.multi_actor_max_confidence}",
        )
    )
    out.append(
        Scenario(
            "two observations",
            "unknown",
            state(_series("environmental.shell_type", ["bash", "bash"])),
            "2 × bash",
        )
    )
    out.append(
        Scenario(
            "empty hash series",
            "unknown",
            aggregate_observations([], value_kind="hash", thresholds=th).state,
            "no observations of a hash primitive",
        )
    )
    return out
