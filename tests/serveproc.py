"""``decnet-attr serve`` as a real process for tests: 127.0.0.1, a free
port, a data dir of its own, restartable on the same port, stopped with
SIGTERM or killed with SIGKILL (the dashboard tests and the crash tests use
it)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).with_name("decnet-attr")
#: Longest single wait of the tests (start-up, a badge, a reconnect).
WAIT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECNET_ATTR_")}
    env.update(extra)
    return env


@dataclass
class ServeProcess:
    """``decnet-attr serve`` on 127.0.0.1:``port`` with ``data_dir``."""

    data_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    admin_password: str | None = None
    #: extra ``DECNET_ATTR_*`` settings for the process
    env: dict[str, str] = field(default_factory=dict)
    _lines: list[str] = field(default_factory=list)
    _password_seen: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, expect_password: bool) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._password_seen.clear()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN),
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=clean_env(DECNET_ATTR_LOG_LEVEL="INFO", **self.env),
            )
        self._reader = threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True)
        self._reader.start()
        if expect_password:
            if not self._password_seen.wait(WAIT):
                raise AssertionError(f"no admin password printed: {self._lines!r}\n{self.log()}")
        self.wait_ready()

    def _read_stdout(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            self._lines.append(line)
            m = re.search(r"initial admin password: (\S+)", line)
            if m:
                self.admin_password = m.group(1)
                self._password_seen.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.05)
        raise AssertionError(f"serve not ready within {WAIT} s:\n{self.log()}")

    def stop(self, *, timeout: float = WAIT) -> int:
        """SIGTERM, then wait (SIGKILL after ``timeout``); the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)
        if self._reader is not None:
            self._reader.join(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
        return int(proc.returncode)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def users_cli(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``decnet-attr users --data-dir D …`` (common flags before the action)."""
        return subprocess.run(
            [str(BIN), "users", "--data-dir", str(self.data_dir), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=WAIT,
            env=clean_env(),
            check=False,
        )
