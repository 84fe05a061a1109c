"""decnet_attr.progress: a bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import io
import re
import sys
from types import SimpleNamespace

import pytest

from decnet_attr import progress as progress_mod
from decnet_attr.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(perf_counter=c.perf_counter))
    return c


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


# ---- terminal -------------------------------------------------------------------------------
def test_tty_gets_a_carriage_return_bar_with_totals_and_rate(clock: Clock) -> None:
    out = FakeTTY()
    p = Progress("replay obs.ndjson", total=1000, stream=out)
    assert p.tty and p.interval == 0.1
    clock.now += 0.05
    p.update(100)  # sooner than the redraw interval: nothing yet
    assert out.getvalue() == ""
    clock.now += 0.45  # 0.5 s in, 500 done
    p.update(400)
    assert out.getvalue() == (
        "\rreplay obs.ndjson [###############---------------] 500/1,000 obs  50.0% 1,000 obs/s\x1b[K"
    )
    clock.now += 0.5
    p.update(500)
    p.close()
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 3
    assert frames[1].startswith("replay obs.ndjson [" + "#" * 30 + "] 1,000/1,000 obs 100.0% ")
    assert not frames[1].endswith("\n")  # redrawn in place
    # each redraw clears the rest of the line (a shorter frame leaves no tail)
    assert frames[2] == f"replay obs.ndjson [{'#' * 30}] 1,000/1,000 obs 100.0% 1,000 obs/s\x1b[K\n"


def test_tty_bar_width_is_fixed_and_capped(clock: Clock) -> None:
    out = FakeTTY()
    p = Progress("x", total=3, stream=out, unit="rows")
    for _ in range(5):  # overshoot the total
        clock.now += 1
        p.update(1)
    p.close()
    for frame in out.getvalue().split("\r")[1:]:
        bar = re.search(r"\[([#-]*)\]", frame)
        assert bar is not None and len(bar.group(1)) == 30
    assert out.getvalue().endswith("x [" + "#" * 30 + "] 5/3 rows 100.0% 1 rows/s\x1b[K\n")


def test_tty_without_a_total_shows_count_and_rate(clock: Clock) -> None:
    out = FakeTTY()
    p = Progress("recompute", stream=out)
    clock.now += 2
    p.update(12_345)
    p.close()
    assert out.getvalue() == (
        "\rrecompute: 12,345 obs, 6,172 obs/s\x1b[K\rrecompute: 12,345 obs, 6,172 obs/s\x1b[K\n"
    )


# ---- not a terminal -------------------------------------------------------------------------
def test_non_tty_gets_plain_periodic_lines(clock: Clock) -> None:
    out = Pipe()
    p = Progress("replay big.ndjson", total=100_000, stream=out, interval=5.0)
    assert not p.tty
    for _ in range(4):  # 4 s: under the interval
        clock.now += 1
        p.update(10_000)
    assert out.getvalue() == ""
    clock.now += 1  # 5 s
    p.update(10_000)
    clock.now += 1
    p.update(10_000)  # 1 s after the last line: quiet
    clock.now += 4
    p.update(40_000)  # 10 s
    p.close()
    lines = out.getvalue().splitlines(keepends=True)
    assert lines == [
        "replay big.ndjson: 50,000/100,000 obs (50.0%), 10,000 obs/s\n",
        "replay big.ndjson: 100,000/100,000 obs (100.0%), 10,000 obs/s\n",
        "replay big.ndjson: 100,000/100,000 obs (100.0%), 10,000 obs/s\n",
    ]
    assert "\r" not in out.getvalue() and "#" not in out.getvalue()


def test_non_tty_without_a_total(clock: Clock) -> None:
    out = Pipe()
    p = Progress("recompute", stream=out, interval=1.0, unit="keys")
    clock.now += 1
    p.update(7)
    clock.now += 1
    p.close()
    assert out.getvalue() == "recompute: 7 keys, 7 keys/s\nrecompute: 7 keys, 4 keys/s\n"


def test_stream_without_isatty_is_not_a_terminal_and_default_is_stderr(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Bare:
        def __init__(self) -> None:
            self.parts: list[str] = []

        def write(self, s: str) -> int:
            self.parts.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    bare = Bare()
    p = Progress("x", total=2, stream=bare)  # type: ignore[arg-type]
    assert not p.tty
    p.update(2)
    p.close()
    assert bare.parts == ["x: 2/2 obs (100.0%), 0 obs/s\n"]

    err = Pipe()
    monkeypatch.setattr(sys, "stderr", err)
    q = Progress("y")
    assert q.stream is err
    q.close()
    assert err.getvalue() == "y: 0 obs, 0 obs/s\n"


def test_zero_elapsed_rate_is_zero(clock: Clock) -> None:
    p = Progress("z", total=10, stream=Pipe())
    p.update(5)
    assert p.rate() == 0.0
    clock.now += 0.5
    assert p.rate() == 10.0
