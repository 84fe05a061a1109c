"""The ingest journal: an append-only file log behind the in-process bus's
durable events, so that a durable publish can be acknowledged once the
event is on disk instead of once the worker has merged it.

Layout: a directory of segment files ``<first seq>.log`` (20 digits), each a
run of records ``seq (u64) · length (u32) · crc32 (u32) · event JSON``
(little-endian), plus ``acked``: the highest sequence number at or below which
every record has been acknowledged by its consumers, followed by the
numbers above it acknowledged out of order. Appends go to the
newest segment; a segment is rotated at ``segment_bytes`` and deleted once
all of its records are acknowledged. At open, the records after ``acked``
come back for redelivery, in order; a torn record at the tail of a segment
(a crash in the middle of a write) ends that segment. Redelivering a record
whose merge had committed but whose acknowledgement had not been written
yet is harmless: the store admits each observation once.

Durability: a record is written with ``write(2)`` before :meth:`Journal.append`
returns, so it survives the process dying (as SQLite's WAL does at
``synchronous = NORMAL``). With ``fsync=True`` the append also waits for an
``fsync`` (shared by the appends that arrive meanwhile), which makes it
survive a power loss too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import orjson

from decnet_attr.bus.base import Event

__all__ = ["Journal", "JournalError"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<QII")
_SUFFIX = ".log"
_ACKED = "acked"
_LOCK = "lock"
#: How often (seconds) the acknowledged position is written down at most.
ACK_FLUSH_INTERVAL = 0.5


class JournalError(OSError):
    """The journal cannot be opened (e.g. another process holds it)."""


def _weight(event: Event) -> int:
    """How many observations an event carries (an API batch: its count)."""
    count = event.payload.get("count") if isinstance(event.payload, dict) else None
    return count if isinstance(count, int) and count > 0 else 1


class Journal:
    """One process's journal directory (exclusive: a lock file is held)."""

    def __init__(
        self, directory: str | Path, *, fsync: bool = False, segment_bytes: int = 64 << 20
    ) -> None:
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be >= 1")
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._lock_fd = -1
        self._fd = -1
        self._size = 0
        self._torn = False  # a failed write could not be cut off
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        self._next = 1
        self._acked = 0  # every seq <= this is acknowledged
        self._acked_written = 0
        self._above: set[int] = set()  # acknowledged out of order, above _acked
        self._above_written: frozenset[int] = frozenset()
        self._acked_at = 0.0
        self._unacked: dict[int, int] = {}  # seq -> weight, in seq order
        self._backlog = 0
        self._synced = 0
        self._syncing: asyncio.Future[None] | None = None

    # ---- open / close --------------------------------------------------------------
    def open(self) -> list[tuple[int, Event]]:
        """Open (creating the directory), take the lock, and return the
        records not acknowledged yet, oldest first."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise JournalError(
                f"ingest journal {self.directory} is in use by another process"
            ) from exc
        self._lock_fd = fd
        self._acked, above = self._read_acked()
        self._acked_written = self._acked
        self._above = {s for s in above if s > self._acked}  # kept until the position passes them
        self._above_written = frozenset(self._above)
        pending: list[tuple[int, Event]] = []
        last = self._acked
        segments = self._list_segments()
        for first, path in segments:
            self._segments.append((first, path))
            for seq, event in self._read_segment(path, newest=path == segments[-1][1]):
                last = max(last, seq)
                if seq > self._acked and seq not in above:
                    pending.append((seq, event))
        # a number acknowledged out of order is never given out again, even
        # if its record was lost with a damaged segment
        self._next = max(last, *above, 0) + 1
        for seq, event in pending:
            w = _weight(event)
            self._unacked[seq] = w
            self._backlog += w
        self._synced = last
        self._rotate()  # new records go to a fresh segment
        self._drop_acked_segments()
        if pending:
            log.info("ingest journal: %d unacknowledged event(s) to redeliver", len(pending))
        return pending

    def close(self) -> None:
        """Write the acknowledged position down and release the files."""
        if self._lock_fd < 0:
            return
        with contextlib.suppress(OSError):
            self._write_acked(force=True)
        if self._fd >= 0:
            if self.fsync:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        os.close(self._lock_fd)
        self._lock_fd = -1

    @property
    def opened(self) -> bool:
        return self._lock_fd >= 0

    # ---- appends ---------------------------------------------------------------------
    async def append(self, event: Event) -> int:
        """Write one event; returns its sequence number once it is durable."""
        if self._fd < 0:
            raise JournalError("ingest journal is closed")
        body = event.to_json()
        if self._size >= self.segment_bytes or self._torn:
            if self._syncing is not None:
                await asyncio.shield(self._syncing)
            self._rotate()
        seq = self._next
        record = _HEADER.pack(seq, len(body), zlib.crc32(body)) + body
        view = memoryview(record)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # (disk full, I/O error) a part of the record may be on disk: cut
            # it off, or records written after it could not be read back
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._torn = True  # the next append starts a new segment
            raise
        self._next += 1
        self._size += len(record)
        w = _weight(event)
        self._unacked[seq] = w
        self._backlog += w
        if self.fsync:
            await self._sync_to(seq)
        return seq

    async def _sync_to(self, seq: int) -> None:
        """Wait for an fsync covering ``seq``; appends meanwhile share one."""
        loop = asyncio.get_running_loop()
        while self._synced < seq:
            if self._syncing is not None:
                await asyncio.shield(self._syncing)
                continue
            target = self._next - 1
            self._syncing = loop.run_in_executor(None, os.fsync, self._fd)
            try:
                await asyncio.shield(self._syncing)
            finally:
                self._syncing = None
            self._synced = max(self._synced, target)

    # ---- acknowledgements --------------------------------------------------------------
    def ack(self, seq: int) -> None:
        """Every consumer has acknowledged record ``seq``."""
        w = self._unacked.pop(seq, None)
        if w is None:
            return
        self._backlog -= w
        self._acked = (next(iter(self._unacked)) - 1) if self._unacked else self._next - 1
        if seq > self._acked:
            self._above.add(seq)
        elif self._above:
            self._above = {s for s in self._above if s > self._acked}
        if time.monotonic() - self._acked_at >= ACK_FLUSH_INTERVAL:
            self._write_acked()

    @property
    def backlog(self) -> int:
        """Observations written but not acknowledged yet."""
        return self._backlog

    @property
    def pending(self) -> int:
        """Records written but not acknowledged yet."""
        return len(self._unacked)

    def flush(self) -> None:
        """Write the acknowledged position down now (and drop the segments
        it covers)."""
        self._write_acked(force=True)

    # ---- files -------------------------------------------------------------------------
    def _list_segments(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.directory.iterdir():
            if p.suffix == _SUFFIX and p.stem.isdigit():
                out.append((int(p.stem), p))
        return sorted(out)

    def _read_segment(self, path: Path, *, newest: bool) -> list[tuple[int, Event]]:
        data = path.read_bytes()
        out: list[tuple[int, Event]] = []
        pos = 0
        while pos + _HEADER.size <= len(data):
            seq, length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            pos += _HEADER.size + length
            try:
                raw = orjson.loads(body)
                out.append((seq, Event.from_dict(str(raw.get("topic") or ""), raw)))
            except (
                ValueError,
                AttributeError,
            ) as exc:  # a record we wrote ourselves: a defect or damage
                log.error("ingest journal %s: unreadable record %d skipped: %s", path, seq, exc)
        if pos < len(data):
            log.warning(
                "ingest journal %s: %d unreadable byte(s) after record %d%s",
                path.name,
                len(data) - pos,
                out[-1][0] if out else 0,
                " cut off" if newest else " left in place",
            )
            if newest:
                # a write the process did not finish; new records may be
                # appended to this segment and must not sit behind it
                os.truncate(path, pos)
        return out

    def _rotate(self) -> None:
        if self._fd >= 0:
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
        path = self.directory / f"{self._next:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._torn = False
        if not self._segments or self._segments[-1][1] != path:
            self._segments.append((self._next, path))
        if self.fsync:
            self._sync_directory()

    def _sync_directory(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _read_acked(self) -> tuple[int, set[int]]:
        try:
            words = (self.directory / _ACKED).read_text().split()
        except FileNotFoundError:
            return 0, set()
        try:
            numbers = [int(w) for w in words]
        except ValueError:
            log.error("ingest journal: unreadable %s; redelivering everything", _ACKED)
            return 0, set()
        if not numbers:
            return 0, set()
        return max(0, numbers[0]), set(numbers[1:])

    def _write_acked(self, *, force: bool = False) -> None:
        self._acked_at = time.monotonic()
        if self._acked == self._acked_written and self._above == self._above_written and not force:
            return
        tmp = self.directory / (_ACKED + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as fh:
            fh.write(" ".join(map(str, [self._acked, *sorted(self._above)])))
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.directory / _ACKED)
        self._acked_written = self._acked
        self._above_written = frozenset(self._above)
        self._drop_acked_segments()

    def _drop_acked_segments(self) -> None:
        """Delete the segments (not the one being written) whose records are
        all at or below the written acknowledged position."""
        while len(self._segments) > 1 and self._segments[1][0] - 1 <= self._acked_written:
            _first, path = self._segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
