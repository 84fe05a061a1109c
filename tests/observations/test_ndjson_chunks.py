"""``ValidatedBatch.ndjson_chunks``: the accepted items as NDJSON cut into
parts under a byte bound (what ingest hands to the bus), each item once."""

from __future__ import annotations

import orjson
import pytest

from decnet_attr.config import Settings
from decnet_attr.observations import validate


def _batch(n: int, big: int | None = None) -> object:
    return validate(
        b"\n".join(
            orjson.dumps(
                {
                    "attacker_uuid": "att-1",
                    "primitive": "environmental.shell_type",
                    "value": ("x" * 3000) if i == big else "bash",
                    "ts": 1_700_000_000.0 + i,
                    "id": f"o-{i}",
                }
            )
            for i in range(n)
        ),
        Settings(),
    )


@pytest.mark.parametrize("max_bytes", [1, 300, 1000, 10**6])
def test_parts_stay_under_the_bound_and_hold_each_item_once(max_bytes: int) -> None:
    b = _batch(40, big=7)
    select = [p for p in range(40) if p % 3]
    parts = b.ndjson_chunks(max_bytes, select)
    assert [p for positions, _ in parts for p in positions] == select
    assert b"".join(text for _, text in parts) == b.ndjson(select)
    for positions, text in parts:
        assert text.count(b"\n") == len(positions)
        # a part over the bound holds one item, too large to share
        assert len(text) <= max_bytes or len(positions) == 1
    if max_bytes == 10**6:
        assert len(parts) == 1
    assert b.ndjson_chunks(max_bytes, []) == []
    with pytest.raises(IndexError, match="position 40"):
        b.ndjson_chunks(max_bytes, [0, 40])
