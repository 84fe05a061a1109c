"""Writes examples/observations.ndjson: a small, deterministic sample of
BEHAVE observations for three attackers, shaped like DECNET's profiler
output (one burst per session), that exercises every state:

- attacker A (one operator): stable habits, a keyboard-layout drift, a
  steady C2 beacon, a stable typing SimHash;
- attacker B (two operators taking turns): input modality and shell type
  alternate (multi_actor), typing SimHash rotates (conflicted);
- attacker C: only two sessions (unknown: too few observations).

Run: python examples/make_sample.py > examples/observations.ndjson
"""

from __future__ import annotations

import json
import sys

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def obs(attacker: str, n: int, primitive: str, value: object, session: int) -> dict[str, object]:
    ts = T0 + session * 3600.0 + n
    return {
        "id": f"{attacker[:8]}{session:03d}{n:02d}",
        "attacker_uuid": attacker,
        "primitive": primitive,
        "value": value,
        "ts": ts,
        "confidence": 1.0,
        "window": {"start_ts": ts - 900.0, "end_ts": ts},
        "source": "examples/make_sample.py",
        "evidence_ref": f"shard:decky-1/ssh/sample.jsonl#{attacker[:8]}-{session}",
    }


A = "a1a1a1a1-0000-4000-8000-00000000000a"
B = "b2b2b2b2-0000-4000-8000-00000000000b"
C = "c3c3c3c3-0000-4000-8000-00000000000c"


def main() -> None:
    out = []
    for s in range(10):
        p = [
            ("motor.keystroke_cadence", "steady"),
            ("motor.input_modality", "typed"),
            ("environmental.shell_type", "bash"),
            ("environmental.keyboard_layout", "qwerty" if s < 5 else "azerty"),
            ("cognitive.exploration_style", "methodical"),
            ("toolchain.c2.beacon_interval_ms", 60_000 + (s % 3) * 250),
            ("motor.digraph_simhash", "9f3a6c21d4e8b07a"),
        ]
        out += [obs(A, n, prim, v, s) for n, (prim, v) in enumerate(p)]
    for s in range(8):
        first = s % 2 == 0
        p = [
            ("motor.input_modality", "typed" if first else "pasted"),
            ("environmental.shell_type", "bash" if first else "zsh"),
            ("motor.keystroke_cadence", "steady"),
            ("motor.digraph_simhash", f"{0x1000 + s * 7919:016x}"),
            ("cognitive.tool_vocabulary", ["narrow", "broad", "moderate"][s % 3]),
        ]
        out += [obs(B, n, prim, v, 100 + s) for n, (prim, v) in enumerate(p)]
    for s in range(2):
        out += [obs(C, 0, "motor.input_modality", "pasted", 200 + s)]
    out.sort(key=lambda o: o["ts"])  # type: ignore[arg-type,return-value]
    for o in out:
        sys.stdout.write(json.dumps(o, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
