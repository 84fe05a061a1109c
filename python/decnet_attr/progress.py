"""Progress for long CLI work: a bar on a terminal, plain periodic lines
otherwise (logs and CI stay readable)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        interval: float = 5.0,
        unit: str = "obs",
        logger: logging.Logger | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # not on a terminal and a logger given: progress goes out as log
        # records (so --log-format json stays one JSON object per line)
        self.logger = None if self.tty else logger
        self.interval = 0.1 if self.tty else interval
        self.unit = unit
        self.done = 0
        self.start = time.perf_counter()
        self._last = time.perf_counter()

    def rate(self) -> float:
        dt = time.perf_counter() - self.start
        return self.done / dt if dt > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._render(final=False)

    def _render(self, *, final: bool) -> None:
        rate = self.rate()
        if self.logger is not None:
            self.logger.info(
                "%s: %d %s, %.0f %s/s",
                self.label,
                self.done,
                self.unit,
                rate,
                self.unit,
                extra={
                    "progress": self.label,
                    "done": self.done,
                    "total": self.total,
                    "rate": round(rate, 1),
                },
            )
            return
        if self.total:
            frac = min(1.0, self.done / self.total)
            if self.tty:
                width = 30
                bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
                end = "\n" if final else ""
                self.stream.write(
                    f"\r{self.label} [{bar}] {self.done:,}/{self.total:,} {self.unit} "
                    f"{frac:6.1%} {rate:,.0f} {self.unit}/s\x1b[K{end}"
                )
            else:
                self.stream.write(
                    f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({frac:.1%}), "
                    f"{rate:,.0f} {self.unit}/s\n"
                )
        else:
            prefix = "\r" if self.tty else ""
            end = "\n" if (final or not self.tty) else ""
            clear = "\x1b[K" if self.tty else ""
            self.stream.write(
                f"{prefix}{self.label}: {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s{clear}{end}"
            )
        self.stream.flush()

    def close(self) -> None:
        self._render(final=True)
