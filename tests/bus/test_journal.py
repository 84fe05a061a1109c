"""The ingest journal (``bus/journal.py``) and the in-process bus with one:
a durable publish returns once written, what no consumer acked comes back
after a restart, a torn tail is survived, acked segments are deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet_attr.bus import BusUnavailable, Event
from decnet_attr.bus.journal import Journal, JournalError
from decnet_attr.bus.memory import InProcessBus

pytestmark = pytest.mark.timeout(30)

TOPIC = "attacker.ingest.0"


def batch(n: int, tag: str) -> dict[str, object]:
    return {"ndjson": "\n".join(f'{{"id":"{tag}-{i}"}}' for i in range(n)), "count": n}


async def test_append_ack_and_reopen(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    assert j.open() == []
    seqs = [await j.append(Event(TOPIC, batch(3, f"b{i}"), id=f"e{i}")) for i in range(4)]
    assert seqs == [1, 2, 3, 4]
    assert j.backlog == 12 and j.pending == 4
    j.ack(2)  # out of order: 1 still open, so nothing below 2 counts yet
    j.ack(1)
    assert j.backlog == 6
    j.close()

    again = Journal(tmp_path / "j")
    pending = again.open()
    assert [(s, e.id) for s, e in pending] == [(3, "e2"), (4, "e3")]
    assert pending[0][1].payload == batch(3, "b2") and pending[0][1].topic == TOPIC
    assert again.backlog == 6
    assert await again.append(Event(TOPIC, {}, id="new")) == 5  # numbering goes on
    again.close()


async def test_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    await j.append(Event(TOPIC, batch(1, "a"), id="a"))
    await j.append(Event(TOPIC, batch(1, "b"), id="b"))
    j.close()
    (segment,) = sorted((tmp_path / "j").glob("*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-5])  # the process died in the middle of the second write
    again = Journal(tmp_path / "j")
    assert [e.id for _s, e in again.open()] == ["a"]
    assert await again.append(Event(TOPIC, {}, id="c")) == 2
    again.close()
    third = Journal(tmp_path / "j")
    assert [e.id for _s, e in third.open()] == ["a", "c"]
    third.close()


async def test_a_damaged_record_ends_its_segment(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    for tag in "abc":
        await j.append(Event(TOPIC, {"x": tag * 50}, id=tag))
    j.close()
    (segment,) = sorted((tmp_path / "j").glob("*.log"))
    data = bytearray(segment.read_bytes())
    at = data.index(b"b" * 50)
    data[at] ^= 0xFF  # the crc of record 2 no longer matches
    segment.write_bytes(bytes(data))
    again = Journal(tmp_path / "j")
    assert [e.id for _s, e in again.open()] == ["a"]
    again.close()


async def test_acked_segments_are_deleted(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", segment_bytes=200)
    j.open()
    seqs = [await j.append(Event(TOPIC, {"pad": "x" * 150}, id=f"e{i}")) for i in range(6)]
    assert len(list((tmp_path / "j").glob("*.log"))) >= 5
    for s in seqs:
        j.ack(s)
    j.flush()
    assert len(list((tmp_path / "j").glob("*.log"))) == 1  # only the one being written
    j.close()
    again = Journal(tmp_path / "j")
    assert again.open() == []
    again.close()


async def test_one_process_at_a_time(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    with pytest.raises(JournalError, match="in use"):
        Journal(tmp_path / "j").open()
    j.close()
    other = Journal(tmp_path / "j")
    other.open()
    other.close()


async def test_fsync_mode_shares_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    j = Journal(tmp_path / "j", fsync=True)
    j.open()
    monkeypatch.setattr(os, "fsync", counting)
    seqs = await asyncio.gather(*(j.append(Event(TOPIC, {}, id=f"e{i}")) for i in range(20)))
    assert sorted(seqs) == list(range(1, 21))
    assert 1 <= len(calls) < 20  # concurrent appends waited on shared fsyncs
    j.close()


# ---- the bus with a journal ------------------------------------------------------------------


async def test_durable_publish_returns_once_written(tmp_path: Path) -> None:
    bus = InProcessBus(journal=tmp_path / "j")
    await bus.connect()
    consumer = bus.durable_consumer("attacker.ingest.>", durable="attribution")
    # nobody fetches: without a journal this would wait for the ack and time out
    ev = await asyncio.wait_for(bus.publish_durable(TOPIC, batch(5, "a"), timeout=0.5), timeout=0.4)
    assert bus.backlog() == 5
    (d,) = await consumer.fetch(10, timeout=0.5)
    assert d.event.id == ev.id
    await d.ack()
    await asyncio.sleep(0)  # the journal hears of the ack on the next loop turn
    assert bus.backlog() == 0
    await bus.close()


async def test_unacked_events_are_redelivered_after_a_restart(tmp_path: Path) -> None:
    bus = InProcessBus(journal=tmp_path / "j")
    await bus.connect()
    consumer = bus.durable_consumer("attacker.ingest.>", durable="attribution")
    sent = [await bus.publish_durable(TOPIC, batch(2, f"b{i}")) for i in range(3)]
    _first, second, _third = await consumer.fetch(10, timeout=0.5)
    await second.ack()  # the first and third were never acked: "the process died"
    await bus.close()

    bus2 = InProcessBus(journal=tmp_path / "j")
    await bus2.connect()
    assert bus2.backlog() == 4
    consumer2 = bus2.durable_consumer("attacker.ingest.>", durable="attribution")
    got = await consumer2.fetch(10, timeout=0.5)
    assert [d.event.id for d in got] == [sent[0].id, sent[2].id]
    assert got[0].event.payload == sent[0].payload and got[0].event.ts == sent[0].ts
    for d in got:
        await d.ack()
    await asyncio.sleep(0)
    assert bus2.backlog() == 0
    await bus2.close()

    bus3 = InProcessBus(journal=tmp_path / "j")
    await bus3.connect()
    consumer3 = bus3.durable_consumer("attacker.ingest.>", durable="attribution")
    assert await consumer3.fetch(10, timeout=0.2) == []
    await bus3.close()


async def test_no_consumer_is_refused_before_writing(tmp_path: Path) -> None:
    bus = InProcessBus(journal=tmp_path / "j")
    await bus.connect()
    with pytest.raises(BusUnavailable):
        await bus.publish_durable(TOPIC, batch(1, "a"))
    assert bus.backlog() == 0
    await bus.close()
    j = Journal(tmp_path / "j")
    assert j.open() == []
    j.close()


@pytest.mark.parametrize("can_truncate", [True, False])
async def test_a_failed_write_does_not_hide_later_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_truncate: bool
) -> None:
    import os

    j = Journal(tmp_path / "j")
    j.open()
    await j.append(Event(TOPIC, {"x": 1}, id="before"))
    real_write = os.write

    def half_then_fail(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    if not can_truncate:

        def no_truncate(fd: int, size: int) -> None:
            raise OSError(5, "I/O error")

        monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(OSError, match="No space"):
        await j.append(Event(TOPIC, {"x": 2}, id="failed"))
    monkeypatch.undo()
    await j.append(Event(TOPIC, {"x": 3}, id="after"))
    j.close()
    again = Journal(tmp_path / "j")
    assert [e.id for _s, e in again.open()] == ["before", "after"]
    again.close()


# ---- any sequence of appends, acks, rotations and restarts -----------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 400)),  # payload size: rotations happen
        st.tuples(st.just("ack"), st.integers(0, 10_000)),  # which unacked record (modulo)
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
        st.tuples(st.just("crash"), st.just(0)),
        # the process dies in the middle of writing a record (this many bytes
        # of it reach the file): that append never returned
        st.tuples(st.just("crash_mid_write"), st.integers(1, 60)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_OPS)
def test_a_restart_redelivers_every_unacked_record_in_order(ops: list[tuple[str, int]]) -> None:
    """Whatever happened before a restart: every record not acknowledged
    comes back, in order, with its payload; an acknowledged one may come
    back only if its acknowledgement was not written yet (the store's
    exactly-once admission absorbs it), never one acknowledged before the
    last flush."""
    import os
    import tempfile

    async def run(directory: Path) -> None:
        j = Journal(directory, segment_bytes=600)
        pending = j.open()
        assert pending == []
        payloads: dict[int, str] = {}
        unacked: list[int] = []
        acked_flushed: set[int] = set()
        acked: set[int] = set()
        for op, arg in ops:
            if op == "append":
                body = "x" * arg
                seq = await j.append(Event(TOPIC, {"body": body}, id=f"e{len(payloads)}"))
                payloads[seq] = body
                unacked.append(seq)
            elif op == "ack" and unacked:
                seq = unacked.pop(arg % len(unacked))
                j.ack(seq)
                acked.add(seq)
            elif op == "flush":
                j.flush()
                acked_flushed |= acked
            elif op in ("restart", "crash", "crash_mid_write"):
                if op == "restart":
                    j.close()  # a graceful stop writes every ack down
                    acked_flushed |= acked
                else:  # the process dies: nothing more is written
                    if op == "crash_mid_write":
                        os.write(j._fd, b"\x00" * arg)  # the start of a record
                    os.close(j._fd)
                    os.close(j._lock_fd)
                j = Journal(directory, segment_bytes=600)
                back = j.open()
                seqs = [s for s, _e in back]
                assert seqs == sorted(seqs)
                assert set(unacked) <= set(seqs), "an unacknowledged record was lost"
                assert not (set(seqs) & acked_flushed), "a written ack was forgotten"
                assert all(e.payload == {"body": payloads[s]} for s, e in back)
                # what came back is pending again until acked
                unacked = seqs
                acked -= set(seqs)
                acked_flushed = set(acked)
        j.close()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(Path(d) / "j"))


async def test_the_journal_is_private_to_its_user(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.open()
    seq = await j.append(Event(TOPIC, {"secret": "observations"}, id="e"))
    j.ack(seq)
    j.flush()
    j.close()
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o700
    files = list((tmp_path / "j").iterdir())
    assert {p.name for p in files} >= {"acked", "lock"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o600 for p in files}


async def test_a_torn_record_at_the_start_of_the_newest_segment(tmp_path: Path) -> None:
    """The newest segment is named after the next number: a crash during its
    first write leaves it holding only a torn record, and the journal opened
    afterwards writes that same segment again. The torn bytes must go, or
    every record written after them would be unreadable."""
    j = Journal(tmp_path / "j")
    j.open()
    await j.append(Event(TOPIC, {"x": 1}, id="a"))
    j.close()
    j = Journal(tmp_path / "j")
    j.open()  # starts segment 2
    await j.append(Event(TOPIC, {"x": 2}, id="b"))
    j.close()
    newest = sorted((tmp_path / "j").glob("*.log"))[-1]
    newest.write_bytes(newest.read_bytes()[:10])  # b's write was cut short
    j = Journal(tmp_path / "j")
    assert [e.id for _s, e in j.open()] == ["a"]
    await j.append(Event(TOPIC, {"x": 3}, id="c"))
    j.close()
    j = Journal(tmp_path / "j")
    assert [e.id for _s, e in j.open()] == ["a", "c"]
    j.close()


async def test_each_partition_gets_its_own_records_back(tmp_path: Path) -> None:
    """With ingest partitions every owner is a durable group of its own: a
    restart hands each the unacknowledged records of its subject only."""
    bus = InProcessBus(journal=tmp_path / "j")
    await bus.connect()
    p0 = bus.durable_consumer("attacker.ingest.0", durable="attribution-p0")
    p1 = bus.durable_consumer("attacker.ingest.1", durable="attribution-p1")
    zero = [await bus.publish_durable("attacker.ingest.0", batch(1, f"z{i}")) for i in range(2)]
    one = [await bus.publish_durable("attacker.ingest.1", batch(1, f"o{i}")) for i in range(2)]
    (first_zero, _), _ = await p0.fetch(10, timeout=0.5), await p1.fetch(10, timeout=0.5)
    await first_zero.ack()  # only p0's first record is done
    await bus.close()

    again = InProcessBus(journal=tmp_path / "j")
    await again.connect()
    try:
        p1 = again.durable_consumer("attacker.ingest.1", durable="attribution-p1")
        assert [d.event.id for d in await p1.fetch(10, timeout=0.5)] == [e.id for e in one]
        p0 = again.durable_consumer("attacker.ingest.0", durable="attribution-p0")
        assert [d.event.id for d in await p0.fetch(10, timeout=0.5)] == [zero[1].id]
    finally:
        await again.close()
