"""``_core.Dedupe``, the in-memory exactly-once admission, used on a
``ValidatedBatch``: by id and by ``(evidence_ref, primitive)``, transactional,
and (the batch's keys being hashed once) the same answers from every
``Dedupe`` of the process that looks at one batch."""

from __future__ import annotations

import orjson
import pytest

from decnet_attr._core import Dedupe
from decnet_attr.config import Settings
from decnet_attr.observations import validate


def batch(*items: tuple[str, str]) -> object:
    """Accepted items (id, evidence_ref), one primitive."""
    return validate(
        b"\n".join(
            orjson.dumps(
                {
                    "attacker_uuid": "att-1",
                    "primitive": "environmental.shell_type",
                    "value": "bash",
                    "ts": 1_700_000_000.0 + n,
                    "id": i,
                    "evidence_ref": ev,
                }
            )
            for n, (i, ev) in enumerate(items)
        ),
        Settings(),
    )


def test_a_batch_checked_by_several_dedupes_gets_each_ones_answer() -> None:
    b = batch(("a", "e1"), ("b", "e2"), ("c", "e3"))
    first, second = Dedupe(100), Dedupe(100)
    assert first.admit_batch(b, [0, 2]) == [0, 2]
    first.commit()
    # the same batch object (its keys made once) against another Dedupe
    assert second.seen_batch(b) == []
    assert first.seen_batch(b) == [0, 2]
    assert second.admit_batch(b) == [0, 1, 2]
    second.rollback()
    assert second.seen_batch(b) == []
    # another batch with the same id, or the same evidence and primitive
    again = batch(("a", "x1"), ("z", "e3"), ("y", "e2"))
    assert first.seen_batch(again) == [0, 1]
    assert first.admit_batch(again) == [2]


def test_admit_batch_refuses_a_position_outside_the_batch() -> None:
    b = batch(("a", "e1"))
    d = Dedupe(10)
    with pytest.raises(IndexError, match="position 1"):
        d.admit_batch(b, [1])
    assert len(d) == 0
