"""Ingest on the embedded default with the journal: the 202 comes once the
body is written to the journal (before any merge), the bound on what waits
to be merged answers 503 with Retry-After, and what a 202 accepted is
delivered again to the consumer after a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from decnet_attr.bus.memory import InProcessBus
from tests.server.conftest import HarnessFactory, bearer

pytestmark = pytest.mark.timeout(30)

URL = "/api/v1/observations"
SHELL = "environmental.shell_type"


def body(n: int, start: int = 0) -> bytes:
    return b"\n".join(
        orjson.dumps(
            {
                "attacker_uuid": "att-1",
                "primitive": SHELL,
                "value": "bash",
                "ts": 1_700_000_000.0 + i,
                "id": f"obs-{i}",
            }
        )
        for i in range(start, start + n)
    )


async def post(h: Any, token: str, data: bytes) -> Any:
    return await h.client.post(
        URL, data=data, headers={**bearer(token), "Content-Type": "application/x-ndjson"}
    )


async def test_202_once_written_and_the_bound_on_waiting_observations(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(ingest_journal=True, ingest_queue_max=10)
    assert isinstance(h.bus, InProcessBus)
    token = await h.token("probe-1", "sensor")
    # a consumer that never acks: without the journal this POST would wait
    # for the ack and fail; with it, the 202 needs only the write
    consumer = h.bus.durable_consumer("attacker.observation.>", durable="attribution")
    resp = await asyncio.wait_for(post(h, token, body(6)), 2.0)
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["accepted"] == 6
    assert h.bus.backlog() == 6
    assert sorted((h.settings.data_dir / "journal").glob("*.log"))

    # 6 waiting + 6 more > 10: refused, nothing written
    resp = await post(h, token, body(6, start=6))
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert "6 observations are waiting" in (await resp.json())["detail"]
    assert h.bus.backlog() == 6
    assert h.counters["ingest_backpressure_total"] == 1

    # once the consumer acks, the journal lets go and ingest goes on
    (d,) = await consumer.fetch(10, timeout=1.0)
    await d.ack()
    await asyncio.sleep(0)
    assert h.bus.backlog() == 0
    resp = await post(h, token, body(6, start=6))
    assert resp.status == 202
    await consumer.aclose()


async def test_what_a_202_accepted_comes_back_after_a_restart(
    make_harness: HarnessFactory,
) -> None:
    h = await make_harness(ingest_journal=True)
    token = await h.token("probe-1", "sensor")
    consumer = h.bus.durable_consumer("attacker.observation.>", durable="attribution")
    resp = await post(h, token, body(3))
    assert resp.status == 202
    await consumer.aclose()
    await h.bus.close()  # the process ends before anything was merged

    again = InProcessBus(journal=h.settings.data_dir / "journal")
    await again.connect()
    try:
        consumer = again.durable_consumer("attacker.observation.>", durable="attribution")
        (d,) = await consumer.fetch(10, timeout=1.0)
        assert d.event.payload["count"] == 3
        assert [orjson.loads(ln)["id"] for ln in d.event.payload["ndjson"].splitlines()] == [
            "obs-0",
            "obs-1",
            "obs-2",
        ]
    finally:
        await again.close()


async def test_a_resent_observation_still_waiting_in_the_journal_is_a_duplicate(
    make_harness: HarnessFactory,
) -> None:
    """A 202 tells the truth per item: an observation accepted before and not
    merged yet (it waits in the journal) comes back as a duplicate when a
    sensor sends it again, by id or by (evidence_ref, primitive), and is not
    handed over twice."""
    h = await make_harness(ingest_journal=True)
    token = await h.token("probe-1", "sensor")
    consumer = h.bus.durable_consumer("attacker.observation.>", durable="attribution")
    resp = await post(h, token, body(3))
    assert resp.status == 202
    assert (await resp.json())["accepted"] == 3
    # the same three, plus one new; nothing was merged meanwhile
    resp = await post(h, token, body(4))
    assert resp.status == 202
    doc = await resp.json()
    assert doc["accepted"] == 1 and doc["ids"] == ["obs-3"]
    assert doc["duplicates"] == [{"index": i, "id": f"obs-{i}"} for i in range(3)]
    assert h.bus.backlog() == 4
    assert h.counters["observations_duplicate_total"] == 3
    # a new id with an (evidence_ref, primitive) already accepted
    same_evidence = orjson.dumps(
        {
            "attacker_uuid": "att-1",
            "primitive": SHELL,
            "value": "bash",
            "ts": 1_700_000_100.0,
            "id": "obs-other",
            "evidence_ref": "ev-1",
        }
    )
    first = orjson.loads(same_evidence)
    first["id"] = "obs-first"
    assert (await post(h, token, orjson.dumps(first))).status == 202
    doc = await (await post(h, token, same_evidence)).json()
    assert doc["accepted"] == 0 and doc["duplicates"] == [{"index": 0, "id": "obs-other"}]
    await consumer.aclose()
