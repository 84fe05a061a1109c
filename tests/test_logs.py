"""decnet_attr.logs: JSON lines, the repeat filter, and ``--log-format json``
of the real CLI."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from decnet_attr import logs
from decnet_attr.logs import JsonFormatter, RepeatFilter, configure_logging

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "observations.ndjson"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging() replaces the root handlers: put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class Stderr:
    """Replaces ``sys.stderr`` by a buffer. Done inside the test body: pytest's
    own capture puts its ``sys.stderr`` back between fixture set-up and the call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", self.buf)

    def getvalue(self) -> str:
        return self.buf.getvalue()

    def clear(self) -> None:
        self.buf.truncate(0)
        self.buf.seek(0)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# ---- JSON formatting ------------------------------------------------------------------------
def test_json_lines_have_the_core_fields_and_extras(
    monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    stderr = Stderr(monkeypatch)
    configure_logging("json", "DEBUG")
    log = logging.getLogger("decnet_attr.test.json")
    log.info("merged %d observations", 3, extra={"batch": 7, "path": Path("/x/y"), "ratio": 0.5})
    log.debug("déjà vu: %s", "ü")
    log.warning("two\nlines")
    out = json_lines(stderr.getvalue())
    assert len(out) == 3  # one object per line; the newline in a message is escaped
    first = out[0]
    assert set(first) == {"ts", "level", "logger", "msg", "batch", "path", "ratio"}
    assert first["level"] == "info"
    assert first["logger"] == "decnet_attr.test.json"
    assert first["msg"] == "merged 3 observations"
    assert (first["batch"], first["path"], first["ratio"]) == (7, "/x/y", 0.5)  # default=str
    assert isinstance(first["ts"], float)
    assert out[1] == {**out[1], "level": "debug", "msg": "déjà vu: ü"}
    assert "déjà vu" in stderr.getvalue()  # ensure_ascii=False
    assert out[2]["msg"] == "two\nlines" and out[2]["level"] == "warning"


def test_json_exception_is_one_field(monkeypatch: pytest.MonkeyPatch, root_logging: None) -> None:
    stderr = Stderr(monkeypatch)
    configure_logging("json")
    log = logging.getLogger("decnet_attr.test.exc")
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.exception("failed")
    (record,) = json_lines(stderr.getvalue())
    assert record["level"] == "error" and record["msg"] == "failed"
    assert "Traceback" in record["exc"] and "ValueError: bad thing" in record["exc"]


def test_level_and_text_format(monkeypatch: pytest.MonkeyPatch, root_logging: None) -> None:
    stderr = Stderr(monkeypatch)
    configure_logging("json", "warning")
    log = logging.getLogger("decnet_attr.test.level")
    log.info("hidden")
    log.warning("shown")
    assert [r["msg"] for r in json_lines(stderr.getvalue())] == ["shown"]

    stderr.clear()
    configure_logging("text")
    assert len(logging.getLogger().handlers) == 1  # replaced, not added
    log.info("plain %s", "text")
    line = stderr.getvalue().strip()
    assert line.endswith(" INFO decnet_attr.test.level: plain text")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_private_and_reserved_attributes_are_not_extras() -> None:
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "m %s", ("a",), None)
    record._private = 1
    record.custom = {"k": [1, 2]}
    out = json.loads(JsonFormatter().format(record))
    assert out == {
        "ts": out["ts"],
        "level": "info",
        "logger": "n",
        "msg": "m a",
        "custom": {"k": [1, 2]},
    }


# ---- the repeat filter ----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(logs, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def flood() -> Iterator[tuple[logging.Logger, Collect]]:
    log = logging.getLogger("decnet_attr.test.flood")
    handler = Collect()
    handler.addFilter(RepeatFilter(10.0))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        yield log, handler
    finally:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)


def test_repeats_within_the_interval_are_suppressed_then_counted(
    clock: Clock, flood: tuple[logging.Logger, Collect]
) -> None:
    log, got = flood
    log.warning("dropped frame for %s", "sub-1")
    for i in range(5):  # same template, other arguments: still a repeat
        clock.now += 1
        log.warning("dropped frame for %s", f"sub-{i}")
    assert got.messages == ["dropped frame for sub-1"]
    clock.now += 10  # 15 s after the first
    log.warning("dropped frame for %s", "sub-9")
    assert got.messages[-1] == "dropped frame for sub-9 (5 similar suppressed)"
    clock.now += 1
    log.warning("dropped frame for %s", "sub-10")  # new window
    clock.now += 10
    log.warning("dropped frame for %s", "sub-11")
    assert got.messages[1:] == [
        "dropped frame for sub-9 (5 similar suppressed)",
        "dropped frame for sub-11 (1 similar suppressed)",
    ]


def test_distinct_templates_loggers_and_errors_pass(
    clock: Clock, flood: tuple[logging.Logger, Collect]
) -> None:
    log, got = flood
    log.info("a")
    log.info("b")
    log.info("a")
    log.error("boom")
    log.error("boom")  # ERROR and above are never suppressed
    assert got.messages == ["a", "b", "boom", "boom"]
    clock.now += 10.0  # exactly the interval: allowed again
    log.info("a")
    assert got.messages[-1] == "a (1 similar suppressed)"


def test_repeat_filter_without_suppression_leaves_the_record_alone(clock: Clock) -> None:
    f = RepeatFilter(1.0)
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "once %s", ("z",), None)
    assert f.filter(rec) is True
    assert rec.getMessage() == "once z"


def test_configure_logging_collapses_floods(
    monkeypatch: pytest.MonkeyPatch, root_logging: None, clock: Clock
) -> None:
    stderr = Stderr(monkeypatch)
    configure_logging("json")
    log = logging.getLogger("decnet_attr.test.cfgflood")
    for _ in range(100):
        log.warning("queue full")
    clock.now += 11
    log.warning("queue full")
    assert [r["msg"] for r in json_lines(stderr.getvalue())] == [
        "queue full",
        "queue full (99 similar suppressed)",
    ]


# ---- the CLI --------------------------------------------------------------------------------
def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("decnet-attr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "decnet_attr.cli"]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECNET_ATTR_")}
    return subprocess.run(
        [*cli_command(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def split_stderr(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    records: list[dict[str, Any]] = []
    plain: list[str] = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            plain.append(line)
            continue
        assert isinstance(value, dict), line
        records.append(value)
    return records, plain


def test_cli_replay_log_format_json() -> None:
    proc = run_cli("replay", str(SAMPLE), "--log-format", "json", "--log-level", "DEBUG")
    assert proc.returncode == 0, proc.stderr
    records, plain = split_stderr(proc.stderr)
    # in JSON mode everything on stderr is a JSON record: progress and summary too
    assert plain == [], plain
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r)
    summary = [r for r in records if r["logger"] == "decnet_attr.replay" and "obs_per_s" in r]
    assert len(summary) == 1
    assert summary[0]["observations"] == 112 and summary[0]["rejected"] == 0
    assert summary[0]["msg"].startswith("replayed 112 observations (0 rejected) into")
    assert any("progress" in r for r in records)
    assert proc.stdout.startswith("IDENTITY")


def test_cli_log_format_json_emits_json_records(tmp_path: Path) -> None:
    """A sub-command that does log (store migration and opening)."""
    proc = run_cli(
        "recompute",
        "--dry-run",
        "--data-dir",
        str(tmp_path),
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
    )
    assert proc.returncode == 0, proc.stderr
    records, _plain = split_stderr(proc.stderr)
    ours = [r for r in records if r["logger"].startswith("decnet_attr.")]
    assert ours, proc.stderr
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r)
        assert r["level"] in {"debug", "info", "warning", "error", "critical"}
    assert any(r["logger"] == "decnet_attr.store.schema" for r in ours)


def test_cli_log_format_text_is_not_json(tmp_path: Path) -> None:
    proc = run_cli("recompute", "--dry-run", "--data-dir", str(tmp_path), "--log-level", "DEBUG")
    assert proc.returncode == 0, proc.stderr
    records, plain = split_stderr(proc.stderr)
    assert not records
    assert any(" INFO decnet_attr.store.schema: " in line for line in plain)
